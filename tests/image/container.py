"""Run a command inside the built image the way a pod would, without a container runtime.

The OCI layout from `make image` is unpacked with umoci (so the layout itself is what is tested); each
command then runs in a mount namespace of its own over that root filesystem: the root bound read-only
(the chart's readOnlyRootFilesystem), /proc, /dev (with /dev/shm for Ray), and two writable folders for
/tmp and the platform home (the chart's emptyDir and claims), as the image's user, with the image's
environment and, for the default command, its entrypoint. Processes share the host's network namespace,
so servers started inside answer on loopback ports chosen free by the test.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Image:
    bundle: Path  # umoci unpack output: rootfs/ + config.json (the runtime spec made from the image config)
    tmp: Path  # mounted at /tmp
    home: Path  # mounted at /var/lib/oncoserve (ONCOSERVE_HOME)

    @classmethod
    def unpack(cls, layout: Path, tag: str, where: Path) -> Image:
        bundle = where / "bundle"
        result = subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"umoci unpack failed: {result.stderr[-2000:]}")
        image = cls(bundle, where / "tmp", where / "home")
        for path in (image.tmp, image.home):
            path.mkdir(mode=0o750)
            os.chown(path, image.uid, image.gid)
        return image

    @property
    def spec(self) -> dict:
        return json.loads((self.bundle / "config.json").read_text())

    @property
    def rootfs(self) -> Path:
        return self.bundle / self.spec["root"]["path"]

    @property
    def uid(self) -> int:
        return int(self.spec["process"]["user"]["uid"])

    @property
    def gid(self) -> int:
        return int(self.spec["process"]["user"]["gid"])

    @property
    def env(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.spec["process"]["env"])

    @property
    def default_args(self) -> list[str]:
        """The image's ENTRYPOINT + CMD."""
        return list(self.spec["process"]["args"])

    @property
    def entrypoint(self) -> list[str]:
        """ENTRYPOINT alone (tini -- oncoserve): the chart's `args:`-only containers run through it."""
        args = self.default_args
        return args[: args.index("oncoserve") + 1]

    def command(self, args: list[str], env: dict[str, str] | None = None) -> list[str]:
        root = shlex.quote(str(self.rootfs))
        variables = " ".join(shlex.quote(f"{k}={v}") for k, v in {**self.env, **(env or {})}.items())
        script = " && ".join([
            f"mount --bind {root} {root}", f"mount -o remount,bind,ro {root}",
            f"mount -t proc proc {root}/proc", f"mount --rbind /dev {root}/dev",
            f"mount --bind {shlex.quote(str(self.tmp))} {root}/tmp",
            f"mount --bind {shlex.quote(str(self.home))} {root}/var/lib/oncoserve",
            f"cd {root} && exec chroot --userspec={self.uid}:{self.gid} {root} /usr/bin/env -i {variables} "
            f"sh -c 'cd \"$0\" && exec \"$@\"' {shlex.quote(self.spec['process'].get('cwd', '/'))} "
            + " ".join(shlex.quote(a) for a in args),
        ])  # fmt: skip
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]

    def run(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(args, env), capture_output=True, text=True, timeout=timeout)

"""Tell serving when a task's alias moves. MLflow's open-source server has no webhooks for alias
changes in this setup, so the registry is polled at a short interval."""

from __future__ import annotations

import threading
from collections.abc import Callable

from serving.registry import Registry


class AliasWatcher:
    def __init__(self, registry: Registry, task: str, alias: str, on_change: Callable[[str | None, str | None], None],
                 interval_s: float = 2.0, on_same: Callable[[str | None], None] | None = None):  # fmt: skip
        """`on_same(alias)`: called on a poll that finds the alias where it was (a refused move undone)."""
        self.registry, self.task, self.alias = registry, task, alias
        self.on_change, self.interval_s, self.on_same = on_change, interval_s, on_same
        self.current: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> bool:
        """Check the alias now; call on_change(old, new) if it moved. Returns whether it moved."""
        try:
            new = self.registry.alias(self.task, self.alias)
        except Exception:  # registry briefly unreachable: keep serving what is loaded, try again
            return False
        if new == self.current:
            if self.on_same is not None:
                self.on_same(new)
            return False
        old, self.current = self.current, new
        self.on_change(old, new)
        return True

    def start(self) -> "AliasWatcher":
        self.poll_once()
        self._thread = threading.Thread(target=self._run, name=f"alias-watch-{self.task}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=self.interval_s + 1)

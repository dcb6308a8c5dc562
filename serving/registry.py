"""The model registry as oncoserve sees it: MLflow registered models named by task, with aliases
`candidate` (passed automatic gates), `champion` (what serving loads) and `previous` (rollback target).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from serving.tasks import REGISTERED

TASKS = REGISTERED
ALIASES = ("candidate", "champion", "previous")


class RegistryError(LookupError):
    """A task, version or alias the registry does not have, or a registry that cannot be reached."""


class RegistryUnavailable(RegistryError):
    """The registry did not answer (as opposed to answering "no such version")."""


def _absent(exc) -> bool:
    """Whether MLflow said "no such model/version" (as opposed to failing to answer)."""
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST"


@dataclass
class VersionInfo:
    task: str
    version: str
    aliases: list[str]
    run_id: str | None
    source: str
    created_ms: int
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def lineage(self) -> dict[str, str]:
        keys = ("dataset_hash", "git_commit", "preprocessing_version", "run_link", "onnx_opset", "onnx_parity_max_abs_diff")
        return {k: self.tags.get(k, "") for k in keys}

    @property
    def signature(self) -> dict:
        return json.loads(self.tags.get("signature", "{}"))

    def to_json(self) -> dict:
        return {"task": self.task, "version": self.version, "aliases": self.aliases, "run_id": self.run_id,
                "source": self.source, "created_ms": self.created_ms, "metrics": self.metrics, "lineage": self.lineage}  # fmt: skip


class Registry:
    def __init__(self, tracking_uri: str):
        # MLflow is imported here, not with the module: the CLI imports this module for its error types and
        # task names, and `import mlflow` costs seconds on every command.
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self._mlflow_error = MlflowException
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def _unreachable(self, exc) -> RegistryError:
        return RegistryUnavailable(f"registry at {self.tracking_uri} did not answer: {exc.message.splitlines()[0][:300]}")

    def _check_task(self, task: str) -> None:
        if task not in TASKS:
            raise RegistryError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")

    def _info(self, mv) -> VersionInfo:
        tags = dict(mv.tags or {})
        return VersionInfo(
            task=mv.name, version=str(mv.version), aliases=sorted(mv.aliases or []), run_id=mv.run_id,
            source=mv.source, created_ms=int(mv.creation_timestamp or 0),
            metrics=json.loads(tags.get("metrics", "{}")), tags=tags,
        )  # fmt: skip

    def versions(self, task: str) -> list[VersionInfo]:
        self._check_task(task)
        try:
            found = self.client.search_model_versions(f"name='{task}'")
        except self._mlflow_error as exc:
            raise RegistryError(f"registry at {self.tracking_uri} cannot list {task}: {exc.message}") from None
        # search_model_versions leaves aliases out in some backends: read them from the model.
        aliases = self.aliases(task)
        infos = [self._info(mv) for mv in found]
        for info in infos:
            info.aliases = sorted(a for a, v in aliases.items() if v == info.version)
        return sorted(infos, key=lambda i: int(i.version))

    def version(self, task: str, version: str) -> VersionInfo:
        self._check_task(task)
        try:
            mv = self.client.get_model_version(task, str(version))
        except self._mlflow_error as exc:
            if not _absent(exc):
                raise self._unreachable(exc) from None
            raise RegistryError(f"{task} version {version} is not in the registry") from None
        info = self._info(mv)
        info.aliases = sorted(a for a, v in self.aliases(task).items() if v == info.version)
        return info

    def aliases(self, task: str) -> dict[str, str]:
        try:
            model = self.client.get_registered_model(task)
        except self._mlflow_error as exc:
            if not _absent(exc):  # a registry that cannot answer must never read as "no aliases"
                raise self._unreachable(exc) from None
            return {}
        return {alias: str(version) for alias, version in (model.aliases or {}).items()}

    def alias(self, task: str, alias: str) -> str | None:
        return self.aliases(task).get(alias)

    def set_alias(self, task: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(task, alias, str(version))

    def delete_alias(self, task: str, alias: str) -> None:
        if self.alias(task, alias) is not None:
            self.client.delete_registered_model_alias(task, alias)

    def set_tag(self, task: str, version: str, key: str, value: str) -> None:
        self.client.set_model_version_tag(task, str(version), key, value)

    def download(self, task: str, version: str, dst: Path | None = None) -> Path:
        """The version's `model/` folder (model.onnx, signature.json, extras.json, MODEL_CARD.md)."""
        import mlflow.artifacts

        info = self.version(task, version)
        dst = dst or Path(tempfile.mkdtemp(prefix=f"{task}-v{version}-"))
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=info.source, dst_path=str(dst), tracking_uri=self.tracking_uri))

    def artifact_text(self, task: str, version: str, name: str) -> str | None:
        """One small file of the version's `model/` folder (without fetching the ONNX), or None."""
        import mlflow.artifacts

        info = self.version(task, version)
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"{info.source}/{name}", dst_path=tempfile.mkdtemp(),
                                                       tracking_uri=self.tracking_uri)  # fmt: skip
        except (self._mlflow_error, OSError):  # absent from this version's artifacts
            return None
        return Path(path).read_text()

    def model_card(self, task: str, version: str) -> str:
        """The card written at training, with the serving runtime `oncoserve compile` measured (once compiled)."""
        card = self.artifact_text(task, version, "MODEL_CARD.md") or "(no model card)"
        tags = self.version(task, version).tags
        if tags.get("compiled_runtime_table"):
            card += (f"\n\n## Serving runtime (measured by `oncoserve compile`)\n\n"
                     f"Served on **{tags.get('compiled_runtime')}**: the fastest CPU runtime whose outputs match the "
                     f"exported reference.\n\n{tags['compiled_runtime_table']}\n")  # fmt: skip
        return card

"""Model sources: where weights come from, resolved to a local released-format file.

A *model source* is a registered model version (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``,
downloaded from the MLflow registry), a released-format file (``checkpoint-last.pth``, an export;
local or ``s3://``), or a training checkpoint / run folder (its consolidated weights are exported first).
"""

from __future__ import annotations

import os
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    pass

from fractalgen import storage
from fractalgen.platform.artifacts.checkpoints import CheckpointNotFound, export_consolidated
from fractalgen.platform.artifacts.model_store import _checkpoint_in_model_dir, client, resolve_version
from fractalgen.sampling_settings import SamplingSettings


@dataclass
class ModelSource:
    """A model source resolved to a local released-format file."""

    source: str
    path: Path
    kind: Literal["registry", "file", "checkpoint"]
    registered_name: str | None = None
    version: str | None = None
    tags: dict[str, str] = field(default_factory=dict)  # the registered version's tags

    @property
    def best_settings(self) -> SamplingSettings:
        """The sweep's best settings recorded on the registered version (empty otherwise)."""
        return SamplingSettings.from_tags(self.tags)


def is_registry_uri(source: str) -> bool:
    return source.startswith("models:/")


def resolve_model_source(
    source: str, *, work_dir: str | os.PathLike[str] | None = None, tracking_uri: str | None = None,
    endpoint: str | None = None,
) -> ModelSource:  # fmt: skip
    """Resolve ``source`` (module docstring) to a local released-format file, downloading or exporting
    into ``work_dir`` (a new temporary folder when None) as needed. ``FileNotFoundError`` /
    ``ValueError`` with a readable message when the source does not exist; ``CheckpointError`` (a
    ``ValueError``) naming the file when a checkpoint's DeepSpeed file is foreign or holds objects
    safe loading refuses (nothing is ever unpickled unsafely: ``fractalgen/platform/artifacts/checkpoints.py``;
    files are loaded by ``load_model``, with ``weights_only``)."""
    work = Path(work_dir or tempfile.mkdtemp(prefix="fractalgen-model-"))
    if is_registry_uri(source):
        return download_version(source, work, tracking_uri=tracking_uri)
    scheme = urllib.parse.urlparse(source).scheme
    if scheme == "s3":
        if storage.exists(source, endpoint=endpoint) and not storage.is_dir(source, endpoint=endpoint):
            local = work / storage.basename(source)
            storage.download_file(source, str(local), endpoint=endpoint)
            return ModelSource(source, local, "file")
        return _export_checkpoint(source, work, endpoint)
    path = Path(source).expanduser()
    if path.is_file():
        return ModelSource(source, path, "file")
    if path.is_dir():
        return _export_checkpoint(str(path), work, endpoint)
    raise FileNotFoundError(
        f"model source {source!r} is neither a registered model (models:/NAME/VERSION, models:/NAME@ALIAS), "
        "a released-format checkpoint file, nor a training checkpoint folder"
    )


def _export_checkpoint(uri: str, work: Path, endpoint: str | None) -> ModelSource:
    try:
        path = export_consolidated(uri, work / "consolidated.pth", endpoint=endpoint)
    except CheckpointNotFound as err:
        raise FileNotFoundError(str(err)) from None
    return ModelSource(uri, Path(path), "checkpoint")


def download_version(
    uri: str, work: str | os.PathLike[str], *, tracking_uri: str | None = None
) -> ModelSource:
    """Download a registered version's weights; returns a ``generate.ModelSource``."""
    import mlflow.artifacts  # deferred: heavy import

    c = client(tracking_uri)
    mv = resolve_version(uri, c=c)
    dest = Path(work) / f"{mv.name}-v{mv.version}"
    dest.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(dest), tracking_uri=tracking_uri
    )
    return ModelSource(
        source=uri, path=_checkpoint_in_model_dir(Path(local)), kind="registry", registered_name=mv.name,
        version=str(mv.version), tags=dict(mv.tags or {}),
    )  # fmt: skip

"""Turning a model source into images: sampling settings, model sources, seeded batched generation,
and generation + Inception features spread over Ray workers (one GPU each).

Terms:
- *model source*: where weights come from: a registered model version (``models:/NAME/VERSION``,
  ``models:/NAME@ALIAS``), a released-format file (``checkpoint-last.pth``, an export; local or
  ``s3://``), or a training checkpoint / run folder (its consolidated weights are exported first).
- *sampling settings*: ``num_iters`` per level, guidance scale ``cfg``, guidance schedule
  (``linear``/``constant``), ``temperature`` (MULTIPLIES the logits, released meaning), filter
  threshold. ``None`` fields take the model's released defaults.
- *batch i*: images ``i*B .. (i+1)*B - 1`` of a generation job; it is sampled with seed ``seed + i``,
  so the images depend only on (labels, settings, batch size, seed), not on how many workers ran.
- *balanced labels*: image ``j`` gets class ``j mod num_classes`` (FID-50K: 50 images per class).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from fractalgen.platform.ray_connect import connect_ray

if TYPE_CHECKING:
    from fractalgen.models import FractalGen

log = logging.getLogger(__name__)

TAG_PREFIX = "sampling."


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """Settings for ``FractalGen.sample``; ``None`` means the model's released default
    (docs/model.md#released-sampling-settings)."""

    num_iters: tuple[int, ...] | None = None
    cfg: float | None = None
    cfg_schedule: Literal["linear", "constant"] | None = None
    temperature: float | None = None  # multiplies the logits: > 1 sharpens (released meaning)
    filter_threshold: float = 1e-4

    def __post_init__(self) -> None:
        if self.num_iters is not None:
            object.__setattr__(self, "num_iters", tuple(int(i) for i in self.num_iters))
            if any(i < 1 for i in self.num_iters):
                raise ValueError(f"num_iters must be >= 1, got {self.num_iters}")
        if self.cfg is not None and self.cfg < 1.0:
            raise ValueError(f"cfg must be >= 1.0, got {self.cfg}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.cfg_schedule not in (None, "linear", "constant"):
            raise ValueError(f"cfg_schedule must be linear or constant, got {self.cfg_schedule!r}")

    def sample_kwargs(self) -> dict[str, Any]:
        return {"num_iters": self.num_iters, "cfg": self.cfg, "cfg_schedule": self.cfg_schedule,
                "temperature": self.temperature, "filter_threshold": self.filter_threshold}  # fmt: skip

    def resolved(self, config: Any) -> SamplingSettings:
        """Every ``None`` replaced by the model config's default (what sampling actually uses)."""
        return SamplingSettings(
            num_iters=self.num_iters or tuple(config.default_iters()),
            # an unconditional (1-class) model samples without guidance whatever its size's default
            cfg=(1.0 if config.num_classes == 1 else config.sample_cfg) if self.cfg is None else self.cfg,
            cfg_schedule=self.cfg_schedule or config.sample_cfg_schedule,
            temperature=config.sample_temperature if self.temperature is None else self.temperature,
            filter_threshold=self.filter_threshold,
        )

    def merged(self, other: SamplingSettings) -> SamplingSettings:
        """``other``'s set fields override this one's."""
        changes = {
            f.name: getattr(other, f.name)
            for f in dataclasses.fields(other)
            if getattr(other, f.name) is not None
        }
        if other.filter_threshold == SamplingSettings.filter_threshold:
            changes.pop("filter_threshold", None)
        return dataclasses.replace(self, **changes)

    def to_tags(self, prefix: str = TAG_PREFIX) -> dict[str, str]:
        """String tags (``sampling.cfg`` ...) for the set fields; ``num_iters`` as ``64,16``."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[prefix + f.name] = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        return out

    @classmethod
    def from_tags(cls, tags: Mapping[str, str], prefix: str = TAG_PREFIX) -> SamplingSettings:
        """Inverse of ``to_tags``; unknown or missing tags are ignored."""
        kw: dict[str, Any] = {}
        get = lambda k: tags.get(prefix + k)  # noqa: E731
        if get("num_iters"):
            kw["num_iters"] = parse_iters(get("num_iters"))
        for key in ("cfg", "temperature", "filter_threshold"):
            if get(key):
                kw[key] = float(get(key))
        if get("cfg_schedule") in ("linear", "constant"):
            kw["cfg_schedule"] = get("cfg_schedule")
        return cls(**kw)

    def describe(self) -> str:
        return ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in self.to_tags().items()) or "model defaults"


def parse_iters(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"64,16"`` or ``[64, 16]`` -> ``(64, 16)``."""
    if isinstance(text, str):
        parts = [p for p in text.replace(" ", "").split(",") if p]
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"iterations must be integers separated by commas, got {text!r}") from None
    return tuple(int(i) for i in text)


def balanced_labels(num_images: int, num_classes: int) -> torch.Tensor:
    """Class ``j mod num_classes`` for image ``j`` (equal counts when num_images is a multiple)."""
    return torch.arange(num_images, dtype=torch.long) % num_classes


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------ model sources
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
    safe loading refuses (nothing is ever unpickled unsafely: ``fractalgen/platform/checkpointing.py``;
    files are loaded by ``load_model``, with ``weights_only``)."""
    work = Path(work_dir or tempfile.mkdtemp(prefix="fractalgen-model-"))
    if is_registry_uri(source):
        from fractalgen.platform import registry

        return registry.download_version(source, work, tracking_uri=tracking_uri)
    scheme = urllib.parse.urlparse(source).scheme
    if scheme == "s3":
        from fractalgen import storage

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
    from fractalgen.platform.checkpointing import CheckpointNotFound, export_consolidated

    try:
        path = export_consolidated(uri, work / "consolidated.pth", endpoint=endpoint)
    except CheckpointNotFound as err:
        raise FileNotFoundError(str(err)) from None
    return ModelSource(uri, Path(path), "checkpoint")


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> FractalGen:
    """``load_released`` onto ``device`` in evaluation mode."""
    from fractalgen.models import load_released

    return load_released(path).to(device).eval()


# ---------------------------------------------------------------------------------------- generation
def batch_ranges(num_images: int, batch_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of the batches of a job (batch i = images i*B .. (i+1)*B - 1)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return [(s, min(s + batch_size, num_images)) for s in range(0, num_images, batch_size)]


def sample_batch(
    model: Any, labels: torch.Tensor, settings: SamplingSettings, seed: int, *,
    known: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """One batch: ``model.sample`` with the settings and ``seed`` -> (B, 3, S, S) in [0, 1] on the CPU."""
    device = next(model.parameters()).device
    return model.sample(
        labels.to(device), seed=seed, known=known, known_mask=known_mask, **settings.sample_kwargs()
    ).cpu()


def generate_images(
    model: Any,
    labels: torch.Tensor,
    settings: SamplingSettings,
    *,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
    known: torch.Tensor | None = None,
    known_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Images (N, 3, S, S) in [0, 1] for ``labels`` (N,): batch i is sampled with seed ``seed + i``."""
    from tqdm import tqdm

    out = []
    ranges = batch_ranges(len(labels), batch_size)
    for i, (start, stop) in enumerate(tqdm(ranges, desc="sampling", unit="batch", disable=not progress)):
        k = known[start:stop] if known is not None else None
        m = known_mask[start:stop] if known_mask is not None else None
        out.append(sample_batch(model, labels[start:stop], settings, seed + i, known=k, known_mask=m))
    if not out:
        S = model.config.img_size
        return torch.zeros(0, 3, S, S)
    return torch.cat(out)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, S, S) in [0, 1] -> (N, S, S, 3) uint8 (ADM's ``arr_0`` layout)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@dataclass
class GenerationJob:
    """What a generation + features job computes: ``labels`` sampled in batches with the settings."""

    labels: torch.Tensor
    settings: SamplingSettings
    batch_size: int = 64
    seed: int = 0
    keep_images: bool = False  # return the uint8 images too (saving PNGs / an .npz of samples)

    def batches(self) -> list[tuple[int, int, int]]:
        """``[(batch index, start, stop)]``."""
        return [(i, s, e) for i, (s, e) in enumerate(batch_ranges(len(self.labels), self.batch_size))]


class GenerationWorker:
    """Holds a model and the FID Inception on one device; run in-process or as a Ray actor.

    ``model_file`` / ``inception_file``: a local path, or the file's bytes as a numpy uint8 array
    (what the Ray path ships through the object store, so workers on other nodes need no shared disk).
    """

    def __init__(self, model_file: Any, inception_file: Any, device: str | None = None) -> None:
        from fractalgen.platform.evaluation.inception import load_inception

        self.device = pick_device(device)
        self._tmp = tempfile.mkdtemp(prefix="fractalgen-worker-")
        try:  # shipped bytes go through a temporary file, removed once loaded
            self.model = load_model(self._materialise(model_file, "model.pth"), self.device)
            self.inception = load_inception(
                self._materialise(inception_file, "inception.pth"), device=self.device
            )
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _materialise(self, obj: Any, name: str) -> str:
        if isinstance(obj, str | os.PathLike):
            return str(obj)
        path = os.path.join(self._tmp, name)
        np.asarray(obj, dtype=np.uint8).tofile(path)
        return path

    def run(self, job: GenerationJob, batch: tuple[int, int, int]) -> dict[str, Any]:
        """Sample batch ``(i, start, stop)`` with seed ``job.seed + i``; return features and logits."""
        from fractalgen.platform.evaluation.inception import extract_features

        i, start, stop = batch
        images = sample_batch(self.model, job.labels[start:stop], job.settings, job.seed + i)
        feats, logits = extract_features(
            self.inception, images.to(self.device), batch_size=max(1, stop - start)
        )
        out = {"index": i, "features": feats.astype(np.float32), "logits": logits.astype(np.float32)}
        if job.keep_images:
            out["images"] = to_uint8(images)
        return out

    def close(self) -> None:
        """Drop the model and the network (GPU memory) before the worker goes away."""
        self.model = self.inception = None


def _file_bytes(path: str | os.PathLike[str]) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8)


def generate_features(
    model_path: str | os.PathLike[str],
    inception_path: str | os.PathLike[str],
    job: GenerationJob,
    *,
    num_workers: int = 0,
    gpus_per_worker: float = 1.0,
    cpus_per_worker: float = 1.0,
    device: str | None = None,
    progress: bool = True,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, np.ndarray]:
    """Generate ``job`` and compute Inception features: ``{"features", "logits"[, "images"]}`` in
    image order.

    ``num_workers`` 0 runs in this process; -1 one Ray actor per GPU of the cluster; N > 0 starts N Ray actors (each ``gpus_per_worker`` GPUs,
    ``cpus_per_worker`` CPUs; connects to ``RAY_ADDRESS`` or starts a local Ray when none is running)
    and hands them batches as they finish, weights shipped through the object store.
    """
    from tqdm import tqdm

    batches = job.batches()
    results: dict[int, dict[str, Any]] = {}
    bar = tqdm(total=len(job.labels), desc="generating + Inception", unit="img", disable=not progress)
    if num_workers == 0:
        worker = GenerationWorker(model_path, inception_path, device)
        try:
            for b in batches:
                res = worker.run(job, b)
                results[b[0]] = res
                bar.update(b[2] - b[1])
                if on_batch:
                    on_batch(res)
        finally:
            worker.close()
    else:
        import ray

        connect_ray()
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        gpus = gpus_per_worker if cluster_gpus >= gpus_per_worker > 0 else 0
        if num_workers < 0:  # one per GPU of the cluster
            num_workers = max(1, int(cluster_gpus // gpus_per_worker)) if gpus else 1
        actor_cls = ray.remote(num_gpus=gpus, num_cpus=cpus_per_worker)(GenerationWorker)
        model_ref, inc_ref = ray.put(_file_bytes(model_path)), ray.put(_file_bytes(inception_path))
        job_ref = ray.put(job)
        actors = [actor_cls.remote(model_ref, inc_ref, None) for _ in range(min(num_workers, len(batches)))]
        pending: dict[Any, tuple[Any, tuple[int, int, int]]] = {}
        queue = list(batches)
        try:
            for actor in actors:
                if queue:
                    b = queue.pop(0)
                    pending[actor.run.remote(job_ref, b)] = (actor, b)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                actor, b = pending.pop(done[0])
                res = ray.get(done[0])
                results[b[0]] = res
                bar.update(b[2] - b[1])
                if on_batch:
                    on_batch(res)
                if queue:
                    nb = queue.pop(0)
                    pending[actor.run.remote(job_ref, nb)] = (actor, nb)
        finally:
            for actor in actors:
                ray.kill(actor)
    bar.close()
    ordered = [results[i] for i in sorted(results)]
    out = {
        "features": np.concatenate([r["features"] for r in ordered]) if ordered else np.zeros((0, 2048)),
        "logits": np.concatenate([r["logits"] for r in ordered]) if ordered else np.zeros((0, 1008)),
    }
    if job.keep_images and ordered:
        out["images"] = np.concatenate([r["images"] for r in ordered])
    return out

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

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fractalgen.platform.ray_connect import connect_ray
from fractalgen.sampling_settings import SamplingSettings

if TYPE_CHECKING:
    from fractalgen.models import FractalGen

log = logging.getLogger(__name__)


def balanced_labels(num_images: int, num_classes: int) -> torch.Tensor:
    """Class ``j mod num_classes`` for image ``j`` (equal counts when num_images is a multiple)."""
    return torch.arange(num_images, dtype=torch.long) % num_classes


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> FractalGen:
    """``load_released`` onto ``device`` in evaluation mode."""
    from fractalgen.models import load_released  # deferred: heavy import

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
    from tqdm import tqdm  # deferred: heavy import

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
        from fractalgen.platform.evaluation.inception import load_inception  # deferred: heavy import

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
        """Sample batch ``(i, start, stop)`` with seed ``job.seed + i``; return features and logits (and
        ``sample_seconds``: the time spent generating, without the Inception network)."""
        from fractalgen.platform.evaluation.inception import extract_features  # deferred: heavy import

        i, start, stop = batch
        t0 = time.perf_counter()  # generation only (sample_batch returns CPU tensors: the device is done)
        images = sample_batch(self.model, job.labels[start:stop], job.settings, job.seed + i)
        sample_seconds = time.perf_counter() - t0
        feats, logits = extract_features(
            self.inception, images.to(self.device), batch_size=max(1, stop - start)
        )
        out = {"index": i, "features": feats.astype(np.float32), "logits": logits.astype(np.float32),
               "sample_seconds": sample_seconds}  # fmt: skip
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
    from tqdm import tqdm  # deferred: heavy import

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
        import ray  # deferred: heavy import

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

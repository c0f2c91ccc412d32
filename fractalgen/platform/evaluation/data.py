"""Evaluation passes over a prepared shard set (``fractalgen data prepare``): bits/dim and reference
statistics.

Terms:
- *bits/dim* (NLL): the unconditional negative log-likelihood per sub-pixel in bits
  (``FractalGen.nll_bpd``). MAR models mask a random prefix of a random order per forward pass, so
  the released evaluation averages 10 passes per batch (1 for AR models, whose pass is exact); the
  result here is the image-weighted mean over the batches.
- *reference statistics*: ``metrics.Statistics`` of the Inception features of the set's images
  (``fractalgen eval stats``), the FID reference when no ADM file is used.

Images are read in order, without flipping (``build_loader(shuffle=False, flip=False)``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fractalgen.models import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from fractalgen.platform.evaluation.metrics import Statistics

log = logging.getLogger(__name__)


def default_num_passes(model: Any) -> int:
    """10 forward passes for models with a MAR level, 1 for pure AR models (docs/model.md#loss-and-nll)."""
    return 10 if "mar" in model.config.generators else 1


def _loader(uri: str, batch_size: int, endpoint: str | None, local_cache: str | None):
    from fractalgen.pipelines.loader import build_loader  # deferred: heavy import

    return build_loader(
        uri, micro_batch=batch_size, rank=0, world_size=1, shuffle=False, flip=False, drop_last=False,
        local_cache=local_cache, endpoint=endpoint,
    )  # fmt: skip


def denormalise(images: torch.Tensor) -> torch.Tensor:
    """Loader output (ImageNet-normalised) -> RGB in [0, 1], rounded to the 1/255 grid it came from."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype).view(1, 3, 1, 1)
    return ((images * std + mean) * 255).round().clamp(0, 255) / 255


def evaluate_nll(
    model: Any,
    uri: str,
    *,
    batch_size: int = 64,
    num_passes: int | None = None,
    max_images: int | None = None,
    endpoint: str | None = None,
    local_cache: str | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Bits/dim of ``model`` on the shard set ``uri``: ``{"nll_bpd", "num_images", "num_passes"}``."""
    from tqdm import tqdm  # deferred: heavy import

    device = next(model.parameters()).device
    passes = num_passes or default_num_passes(model)
    loader = _loader(uri, batch_size, endpoint, local_cache)
    total, count = 0.0, 0
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the random masks of the MAR passes: the same number for the same data
    bar = tqdm(total=max_images, desc="bits/dim", unit="img", disable=not progress)
    try:
        for images, _labels in loader:
            if max_images is not None and count >= max_images:
                break
            if max_images is not None:
                images = images[: max_images - count]
            bpd = model.nll_bpd(images.to(device), num_passes=passes)
            total += float(bpd) * images.size(0)
            count += images.size(0)
            bar.update(images.size(0))
    finally:
        bar.close()
        torch.random.set_rng_state(generator_state)
    if count == 0:
        raise ValueError(f"{uri} yielded no images")
    return {"nll_bpd": total / count, "num_images": float(count), "num_passes": float(passes)}


def read_images(
    uri: str, *, max_images: int | None = None, batch_size: int = 64, endpoint: str | None = None,
    local_cache: str | None = None,
) -> Iterator[torch.Tensor]:  # fmt: skip
    """Yield batches of the set's images as RGB in [0, 1] (B, 3, S, S), at most ``max_images``."""
    count = 0
    for images, _labels in _loader(uri, batch_size, endpoint, local_cache):
        if max_images is not None:
            images = images[: max_images - count]
        if images.size(0) == 0:
            break
        count += images.size(0)
        yield denormalise(images)
        if max_images is not None and count >= max_images:
            break


def read_labelled_images(
    uri: str, *, max_images: int | None = None, batch_size: int = 64, endpoint: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The set's images as RGB in [0, 1] (N, 3, S, S) and their labels (N,), at most ``max_images``."""
    images, labels, count = [], [], 0
    for batch, batch_labels in _loader(uri, batch_size, endpoint, None):
        if max_images is not None:
            batch, batch_labels = batch[: max_images - count], batch_labels[: max_images - count]
        if batch.size(0) == 0:
            break
        count += batch.size(0)
        images.append(denormalise(batch))
        labels.append(batch_labels)
    if not images:
        raise ValueError(f"{uri} yielded no images")
    return torch.cat(images), torch.cat(labels).long()


def reference_statistics(
    uri: str,
    inception: Any,
    *,
    max_images: int | None = None,
    batch_size: int = 64,
    keep_features: int | None = 10_000,
    endpoint: str | None = None,
    local_cache: str | None = None,
    progress: bool = True,
) -> Statistics:
    """Inception statistics of the shard set ``uri`` (``metrics.Statistics``, with up to
    ``keep_features`` features kept for precision/recall)."""
    from tqdm import tqdm  # deferred: heavy import

    from fractalgen.platform.evaluation.inception import extract_features  # deferred: heavy import
    from fractalgen.platform.evaluation.metrics import feature_statistics  # deferred: heavy import

    feats = []
    device = next(inception.parameters()).device
    with tqdm(total=max_images, desc="reference features", unit="img", disable=not progress) as bar:
        for images in read_images(uri, max_images=max_images, batch_size=batch_size, endpoint=endpoint,
                                  local_cache=local_cache):  # fmt: skip
            f, _ = extract_features(inception, images.to(device), batch_size=batch_size)
            feats.append(f)
            bar.update(len(f))
    if not feats:
        raise ValueError(f"{uri} yielded no images")
    stats = feature_statistics(np.concatenate(feats), keep_features=keep_features)
    stats.meta = {"source": uri}
    return stats

"""Sample-quality metrics on Inception features: FID, Inception Score, precision and recall.

Terms:
- *statistics* of an image set: the mean ``mu`` (2048,) and covariance ``sigma`` (2048, 2048) of its
  Inception pool features (``inception.py``).
- *FID* (Fréchet Inception distance): the Fréchet distance between the Gaussians of two sets'
  statistics, ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``. The trace of
  the matrix square root is the sum of the square roots of the eigenvalues of ``sigma1 sigma2``,
  which are those of the symmetric PSD ``sigma1^(1/2) sigma2 sigma1^(1/2)``: two symmetric eigen
  decompositions, stable where ``scipy.linalg.sqrtm`` needs pytorch-fid's eps retry. With features
  at hand and fewer images than dimensions, the nonzero eigenvalues come from a small N x N matrix.
- *Inception Score* (IS): ``exp(E_x KL(p(y|x) || p(y)))`` over the softmax of the 1008 unbiased
  logits, mean and std over 10 splits (torch-fidelity's definition, used by the released evaluation:
  the images are first put in the order of ``np.random.RandomState(2020).permutation(N)``, so the
  splits, and the score, equal torch-fidelity's; ``shuffle_seed=None`` splits in the given order).
- *precision / recall* (Kynkäänniemi et al. 2019, k = 3): each feature vector's k-NN radius within
  its own set (k-th nearest other member) defines a manifold (union of balls); precision is the
  fraction of generated features inside the reference manifold, recall the fraction of reference
  features inside the generated manifold.
- *reference file*: an ``.npz`` with ``mu`` and ``sigma`` (ADM's reference batches and
  ``fractalgen eval stats`` write these); it may hold ``features`` (ours, for precision/recall) or
  ``arr_0`` (ADM: the reference images, uint8 N x H x W x 3, whose features give precision/recall).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

PR_K = 3
IS_SHUFFLE_SEED = 2020  # torch-fidelity's rng_seed (samples_shuffle=True, its default)


@dataclass
class Statistics:
    """Gaussian statistics of an image set's features (and optionally the features themselves)."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    num_images: int = 0
    features: np.ndarray | None = None  # (N, D) for precision/recall (and a cheaper FID when N < D)
    meta: dict[str, Any] = field(default_factory=dict)


def feature_statistics(features: np.ndarray, *, keep_features: int | None = None) -> Statistics:
    """Mean and (unbiased, as numpy's ``np.cov``) covariance of features (N, D); keeps up to
    ``keep_features`` of them (None: all, 0: none)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D), got shape {x.shape}")
    mu = x.mean(axis=0)
    sigma = np.cov(x, rowvar=False)
    keep = x if keep_features is None else x[:keep_features] if keep_features > 0 else None
    return Statistics(mu=mu, sigma=sigma, num_images=len(x), features=keep)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^(1/2)) for symmetric PSD matrices."""
    s1 = _sqrt_psd(np.asarray(sigma1, dtype=np.float64))
    m = s1 @ np.asarray(sigma2, dtype=np.float64) @ s1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (module docstring)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}"
        )
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(max(value, 0.0))


def fid_from_features(features: np.ndarray, reference: Statistics) -> float:
    """FID of a feature set (N, D) against reference statistics.

    For N <= D, ``sigma1 = A^T A`` with ``A`` the centred features / sqrt(N - 1), and the nonzero
    eigenvalues of ``sigma1 sigma2`` are those of ``A sigma2 A^T`` (N x N): O(N D^2), not O(D^3).
    """
    x = np.asarray(features, dtype=np.float64)
    if len(x) < 2:
        raise ValueError("FID needs at least 2 images")
    mu = x.mean(axis=0)
    if len(x) > x.shape[1]:
        return frechet_distance(mu, np.cov(x, rowvar=False), reference.mu, reference.sigma)
    a = (x - mu) / math.sqrt(len(x) - 1)  # (N, D)
    m = a @ reference.sigma @ a.T  # (N, N)
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())
    diff = mu - reference.mu
    value = diff @ diff + float((a * a).sum()) + np.trace(reference.sigma) - 2.0 * tr_sqrt
    return float(max(value, 0.0))


def inception_score(
    logits: np.ndarray, splits: int = 10, *, shuffle_seed: int | None = IS_SHUFFLE_SEED
) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) from 1008-way logits (N, 1008); the rows are
    permuted as torch-fidelity permutes them (``shuffle_seed``, its ``rng_seed``) before splitting."""
    x = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n = x.size(0)
    if n == 0:
        raise ValueError("the Inception Score needs at least 1 image")
    if shuffle_seed is not None:
        x = x[torch.as_tensor(np.random.RandomState(shuffle_seed).permutation(n))]
    splits = max(1, min(splits, n))
    p = x.softmax(dim=1)
    log_p = x.log_softmax(dim=1)
    scores = []
    for k in range(splits):
        part, log_part = (
            p[k * n // splits : (k + 1) * n // splits],
            log_p[k * n // splits : (k + 1) * n // splits],
        )
        py = part.mean(dim=0, keepdim=True)
        kl = (part * (log_part - py.log())).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    radii = torch.empty(x.size(0), dtype=x.dtype, device=x.device)
    for i in range(0, x.size(0), chunk):
        d = torch.cdist(x[i : i + chunk], x)  # (c, N), includes the distance 0 to itself
        radii[i : i + chunk] = d.kthvalue(k + 1, dim=1).values
    return radii


def _inside(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    inside = torch.empty(query.size(0), dtype=torch.bool, device=query.device)
    for i in range(0, query.size(0), chunk):
        d = torch.cdist(query[i : i + chunk], support)  # (c, M)
        inside[i : i + chunk] = (d <= radii.unsqueeze(0)).any(dim=1)
    return inside


def precision_recall(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    k: int = PR_K,
    chunk: int = 1024,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` against ``real`` features."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    if r.size(0) <= k or f.size(0) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} real and generated images")
    r_radii, f_radii = _knn_radii(r, k, chunk), _knn_radii(f, k, chunk)
    precision = float(_inside(f, r, r_radii, chunk).float().mean())
    recall = float(_inside(r, f, f_radii, chunk).float().mean())
    return precision, recall


# ------------------------------------------------------------------------------- reference files
def save_statistics(stats: Statistics, path: str | os.PathLike[str]) -> Path:
    """Write ``mu``, ``sigma`` (ADM / torch-fidelity layout), ``num_images``, optional ``features``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {"mu": stats.mu, "sigma": stats.sigma, "num_images": np.int64(stats.num_images)}
    if stats.features is not None:
        arrays["features"] = np.asarray(stats.features, dtype=np.float32)
    for key, value in stats.meta.items():
        arrays[f"meta_{key}"] = np.asarray(str(value))
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_statistics(
    path: str | os.PathLike[str], *, extractor: Any = None, max_images: int | None = 10_000
) -> Statistics:
    """Reference statistics from an ``.npz`` (module docstring).

    Precision/recall need reference features: ``features`` if stored, else (ADM files) the features
    of up to ``max_images`` of ``arr_0`` when an ``extractor(images_uint8_nhwc) -> features`` is given.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference statistics {path} do not exist: give an ADM reference batch (.npz with mu and "
            "sigma) or compute one from validation shards with `fractalgen eval stats`"
        )
    with np.load(path, allow_pickle=False) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path} has no 'mu' and 'sigma' arrays (found {sorted(data.files)})")
        stats = Statistics(mu=np.asarray(data["mu"], np.float64), sigma=np.asarray(data["sigma"], np.float64))
        stats.num_images = int(data["num_images"]) if "num_images" in data else 0
        stats.meta = {k[5:]: str(data[k]) for k in data.files if k.startswith("meta_")}
        if "features" in data:
            stats.features = np.asarray(data["features"], np.float64)
        elif "arr_0" in data and extractor is not None and max_images != 0:
            images = data["arr_0"]
            if max_images is not None:
                images = images[:max_images]
            stats.features = np.asarray(extractor(images), np.float64)
            if not stats.num_images:
                stats.num_images = len(data["arr_0"])
    if stats.mu.ndim != 1 or stats.sigma.shape != (stats.mu.size, stats.mu.size):
        raise ValueError(f"{path}: mu {stats.mu.shape} and sigma {stats.sigma.shape} do not fit together")
    return stats


@dataclass
class SampleMetrics:
    """Metrics of a generated set against reference statistics (None where not computable)."""

    num_images: int
    fid: float
    inception_score: float
    inception_score_std: float
    precision: float | None = None
    recall: float | None = None

    def as_dict(self) -> dict[str, float]:
        out = {"num_images": float(self.num_images), "fid": self.fid, "inception_score": self.inception_score,
               "inception_score_std": self.inception_score_std}  # fmt: skip
        if self.precision is not None and self.recall is not None:
            out.update(precision=self.precision, recall=self.recall)
        return out


def compute_metrics(
    features: np.ndarray,
    logits: np.ndarray,
    reference: Statistics,
    *,
    precision_recall_images: int | None = 10_000,
    device: str | torch.device = "cpu",
) -> SampleMetrics:
    """FID, IS and (when the reference holds features) precision/recall of a generated set."""
    fid = fid_from_features(features, reference)
    is_mean, is_std = inception_score(logits)
    precision = recall = None
    if reference.features is not None and precision_recall_images != 0:
        n = precision_recall_images or len(features)
        real, fake = reference.features[:n], np.asarray(features)[:n]
        if len(real) > PR_K and len(fake) > PR_K:
            precision, recall = precision_recall(real, fake, device=device)
    return SampleMetrics(len(features), fid, is_mean, is_std, precision, recall)

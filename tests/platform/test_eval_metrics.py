"""FID, Inception Score, precision/recall and reference files, checked against direct computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from fractalgen.platform.evaluation.metrics import (
    Statistics,
    compute_metrics,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    load_statistics,
    precision_recall,
    save_statistics,
)


def scipy_fid(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's computation: sqrtm of the product, with its eps retry for singular products."""
    diff = mu1 - mu2
    covmean, _ = scipy.linalg.sqrtm(sigma1 @ sigma2, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def gaussian(rng: np.random.Generator, n: int, d: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix * scale + shift


def test_fid_of_a_set_against_itself_is_zero() -> None:
    rng = np.random.default_rng(0)
    x = gaussian(rng, 400, 32)
    s = feature_statistics(x)
    assert frechet_distance(s.mu, s.sigma, s.mu, s.sigma) == pytest.approx(0.0, abs=1e-8)
    assert fid_from_features(x, s) == pytest.approx(0.0, abs=1e-8)
    few = x[:20]  # fewer images than dimensions: the N x N route
    assert fid_from_features(few, feature_statistics(few)) == pytest.approx(0.0, abs=1e-8)


def test_fid_matches_scipy_on_random_gaussians() -> None:
    rng = np.random.default_rng(1)
    x, y = gaussian(rng, 600, 24), gaussian(rng, 500, 24, shift=0.3, scale=1.5)
    sx, sy = feature_statistics(x), feature_statistics(y)
    expected = scipy_fid(sx.mu, sx.sigma, sy.mu, sy.sigma)
    assert expected > 1.0
    assert frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma) == pytest.approx(expected, rel=1e-7)
    assert fid_from_features(x, sy) == pytest.approx(expected, rel=1e-7)  # N > D: the d x d route
    few = x[:10]  # N < D: the N x N route, same value as the d x d computation of its statistics
    sf = feature_statistics(few)
    assert fid_from_features(few, sy) == pytest.approx(
        frechet_distance(sf.mu, sf.sigma, sy.mu, sy.sigma), rel=1e-7
    )
    assert fid_from_features(few, sy) == pytest.approx(scipy_fid(sf.mu, sf.sigma, sy.mu, sy.sigma), rel=1e-4)


def test_inception_score_bounds() -> None:
    assert inception_score(np.zeros((20, 1008)))[0] == pytest.approx(1.0)
    logits = np.full((40, 1008), -50.0)
    logits[np.arange(40), np.arange(40) % 8] = 50.0  # confident, 8 classes equally often
    mean, std = inception_score(logits, splits=1)
    assert mean == pytest.approx(8.0, rel=1e-6) and std == 0.0


def brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    def inside(q, s, r):
        d = np.linalg.norm(q[:, None] - s[None], axis=-1)
        return (d <= r[None]).any(axis=1).mean()

    return float(inside(fake, real, radii(real))), float(inside(real, fake, radii(fake)))


def test_precision_recall_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(60, 8)), rng.normal(loc=0.5, size=(50, 8))
    p, r = precision_recall(real, fake, chunk=16)
    bp, br = brute_precision_recall(real, fake)
    assert p == pytest.approx(bp, abs=1e-6) and r == pytest.approx(br, abs=1e-6)
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, fake + 100.0) == (0.0, 0.0)


def test_reference_files_roundtrip_and_adm_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(30, 16))
    path = save_statistics(feature_statistics(feats, keep_features=12), tmp_path / "ref.npz")
    stats = load_statistics(path)
    assert stats.num_images == 30 and stats.features.shape == (12, 16)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False))
    metrics = compute_metrics(feats, np.zeros((30, 1008)), stats)
    assert metrics.fid == pytest.approx(0.0, abs=1e-8) and metrics.precision is not None

    # ADM reference batch: mu, sigma and the images as arr_0 (N, H, W, 3) uint8
    images = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "adm.npz", arr_0=images, mu=stats.mu, sigma=stats.sigma)
    seen = []

    def extractor(x: np.ndarray) -> np.ndarray:
        seen.append(x.shape)
        return x.reshape(len(x), -1)[:, :16].astype(np.float64)

    adm = load_statistics(tmp_path / "adm.npz", extractor=extractor)
    assert seen == [(5, 8, 8, 3)] and adm.features.shape == (5, 16)
    assert load_statistics(tmp_path / "adm.npz").features is None  # no extractor: FID/IS only

    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="no 'mu' and 'sigma'"):
        load_statistics(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="fractalgen eval stats"):
        load_statistics(tmp_path / "missing.npz")
    assert isinstance(stats, Statistics)


def test_missing_inception_weights_say_where_to_put_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fractalgen.platform.evaluation.inception import (
        FID_WEIGHTS_NAME,
        InceptionWeightsMissing,
        resolve_weights,
    )

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("FRACTALGEN_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(InceptionWeightsMissing) as err:
        resolve_weights(None)
    text = str(err.value)
    assert (
        f"put it at {tmp_path / 'cache' / 'fractalgen' / FID_WEIGHTS_NAME}" in text and "--inception" in text
    )
    with pytest.raises(InceptionWeightsMissing, match=r"nowhere\.pth"):
        resolve_weights(tmp_path / "nowhere.pth")

"""FID and Inception Score equal torch-fidelity 0.4.0's (the released FractalGen evaluation) on the same
images and the same Inception weights file, to 1e-4 relative.

The weights file is the session's random FID Inception (``write_random_weights``): its state dict keys
are torch-fidelity's ``FeatureExtractorInceptionV3`` keys, which loads it strictly through
``feature_extractor_weights_path`` (nothing is downloaded). What has to agree for the numbers to agree:

- the resize to 299x299: TensorFlow 1.x's bilinear resize (``resize_like_tf1``, torch-fidelity's
  ``interpolate_bilinear_2d_like_tensorflow1x``), not ``F.interpolate`` (pytorch-fid);
- the input scaling ``(v - 128) / 128`` of pixel values ``v`` in [0, 255] (pytorch-fid: ``2 v / 255 - 1``);
- the Inception Score's splits: torch-fidelity permutes the images with ``RandomState(2020)`` first;
- FID: torch-fidelity takes the real parts of the square roots of the (complex) eigenvalues of the
  non-symmetric ``sigma1 sigma2``, we the eigenvalues of a symmetric PSD matrix (``metrics.py``); the
  same number up to rounding, which the test bounds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

torch_fidelity = pytest.importorskip("torch_fidelity", minversion="0.4.0")

from torch_fidelity.interpolate_compat_tensorflow import (  # noqa: E402
    interpolate_bilinear_2d_like_tensorflow1x,
)
from torch_fidelity.metric_isc import isc_features_to_metric  # noqa: E402

from fractalgen.platform.evaluation.inception import (  # noqa: E402
    extract_features,
    load_inception,
    resize_like_tf1,
)
from fractalgen.platform.evaluation.metrics import (  # noqa: E402
    feature_statistics,
    fid_from_features,
    inception_score,
)

RTOL = 1e-4
N = 16  # images per set: 4 x 16 Inception passes at 299x299 on the CPU (~12 s on 2 cores)


class _Images(torch.utils.data.Dataset):
    """uint8 (3, H, W) tensors, as torch-fidelity takes a Dataset."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _image_set(seed: int, size: tuple[int, int], cells: int) -> torch.Tensor:
    """(N, 3, H, W) uint8: smooth random colour fields (``cells`` x ``cells`` upsampled) plus noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(N, 3, cells, cells, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
    x = smooth * 255 + 20 * torch.randn(N, 3, *size, generator=g)
    return x.round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize(
    ("src", "dst"), [((32, 32), 299), ((64, 48), 299), ((7, 300), 299), ((400, 350), 299)]
)
def test_resize_is_torch_fidelitys_tensorflow_resize(src: tuple[int, int], dst: int) -> None:
    x = torch.rand(2, 3, *src, generator=torch.Generator().manual_seed(1)) * 255
    ref = interpolate_bilinear_2d_like_tensorflow1x(x, size=(dst, dst), align_corners=False)
    assert torch.equal(resize_like_tf1(x, dst), ref)


def test_inception_score_splits_as_torch_fidelity() -> None:
    logits = torch.randn(103, 1008, generator=torch.Generator().manual_seed(2)) * 4
    ref = isc_features_to_metric(logits, splits=10)  # shuffles with rng_seed 2020 by default
    mean, std = inception_score(logits.numpy(), splits=10)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-9)
    ordered = isc_features_to_metric(logits, splits=10, shuffle=False)
    assert inception_score(logits.numpy(), splits=10, shuffle_seed=None)[0] == pytest.approx(
        ordered["inception_score_mean"], rel=1e-12
    )


def test_fid_and_is_equal_torch_fidelitys(inception_weights: Path, tmp_path: Path) -> None:
    a = _image_set(0, (32, 32), cells=4)  # "generated" set: upsampled 32x32 images
    b = _image_set(1, (64, 48), cells=8)  # "reference" set: another size, non-square, finer structure

    metrics = torch_fidelity.calculate_metrics(
        input1=_Images(a),
        input2=_Images(b),
        fid=True,
        isc=True,
        isc_splits=10,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(inception_weights),
        cuda=False,
        batch_size=N,
        save_cpu_ram=True,  # no DataLoader worker processes
        verbose=False,
        # the features go to tmp_path, to be compared with ours below (no second extraction)
        cache=True,
        cache_root=str(tmp_path),
        input1_cache_name="a",
        input2_cache_name="b",
    )

    net = load_inception(inception_weights)
    feats_a, logits_a = extract_features(net, a, batch_size=N)
    feats_b, _ = extract_features(net, b.permute(0, 2, 3, 1).numpy(), batch_size=N)  # ADM's NHWC layout

    # the networks' outputs first: a mismatch here is preprocessing or weights, not the metric code
    def theirs(name: str, layer: str) -> np.ndarray:
        path = tmp_path / f"{name}-inception-v3-compat-features-{layer}.pt"
        return torch.load(path, weights_only=True).double().numpy()

    for ours, ref in ((feats_a, theirs("a", "2048")), (feats_b, theirs("b", "2048")),
                      (logits_a, theirs("a", "logits_unbiased"))):  # fmt: skip
        assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()

    reference = feature_statistics(feats_b)
    # `eval fid`'s path: generated features against reference statistics (test_eval_metrics.py checks
    # that it equals frechet_distance on the two sets' statistics)
    fid = fid_from_features(feats_a, reference)
    assert fid == pytest.approx(metrics["frechet_inception_distance"], rel=RTOL)

    is_mean, is_std = inception_score(logits_a, splits=10)
    assert is_mean == pytest.approx(metrics["inception_score_mean"], rel=RTOL)
    # random weights give an IS near 1: its excess over 1 must agree too
    assert is_mean - 1 == pytest.approx(metrics["inception_score_mean"] - 1, rel=RTOL)
    assert is_std == pytest.approx(metrics["inception_score_std"], rel=RTOL, abs=1e-6)
    assert fid > 1.0 and is_mean > 1.0 + 1e-3  # the sets differ and the scores are not trivial

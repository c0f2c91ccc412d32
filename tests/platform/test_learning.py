"""``fractalgen.platform.evaluation.learning``: the demo's learning check against independent
computations on synthetic images whose answer is known, and its figures."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fractalgen.platform.evaluation.learning import (
    LearningCheck,
    class_profiles,
    colour_histograms,
    labelled_grid,
    learning_curve_png,
    min_share,
    nearest_classes,
    own_class_share,
    side_by_side,
)

NUM_CLASSES = 8


def _class_images(labels: np.ndarray, rng: np.random.Generator, size: int = 8) -> np.ndarray:
    """(N, 3, size, size) in [0, 1]: class c's pixels scattered around its own colour."""
    palette = np.random.default_rng(123).uniform(0.1, 0.9, size=(NUM_CLASSES, 3))
    noise = rng.normal(0.0, 0.04, size=(len(labels), 3, size, size))
    return np.clip(palette[labels][:, :, None, None] + noise, 0.0, 1.0)


def test_histograms_match_a_direct_count() -> None:
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(5, 3, 6, 6))
    hist = colour_histograms(torch.from_numpy(images), bins=4)
    assert hist.shape == (5, 64) and np.allclose(hist.sum(axis=1), 1.0)
    for n in range(5):  # independent: loop over the pixels
        expected = np.zeros(64)
        for y in range(6):
            for x in range(6):
                r, g, b = (min(int(v * 4), 3) for v in images[n, :, y, x])
                expected[r * 16 + g * 4 + b] += 1 / 36
        assert np.allclose(hist[n], expected)


def test_samples_drawn_from_their_class_colours_score_one() -> None:
    rng = np.random.default_rng(1)
    ref_labels = np.repeat(np.arange(NUM_CLASSES), 16)
    profiles = class_profiles(_class_images(ref_labels, rng), ref_labels, NUM_CLASSES)
    labels = np.repeat(np.arange(NUM_CLASSES), 4)
    generated = torch.from_numpy(_class_images(labels, rng)).float()
    assert own_class_share(generated, torch.from_numpy(labels), profiles) == 1.0
    assert (nearest_classes(generated, profiles) == labels).all()


def test_samples_that_ignore_their_label_score_chance() -> None:
    rng = np.random.default_rng(2)
    ref_labels = np.repeat(np.arange(NUM_CLASSES), 16)
    profiles = class_profiles(_class_images(ref_labels, rng), ref_labels, NUM_CLASSES)
    drawn = rng.integers(0, NUM_CLASSES, size=4000)  # the class whose colours an image really has
    claimed = rng.permutation(drawn)  # the label it was "sampled for": unrelated
    share = own_class_share(_class_images(drawn, rng), claimed, profiles)
    # binomial(4000, 1/8) but for the pairs the permutation left in place: 5 sigma ~ 0.026
    assert abs(share - 1 / NUM_CLASSES) < 0.03


def test_profiles_need_every_class() -> None:
    with pytest.raises(ValueError, match="no reference images"):
        class_profiles(np.zeros((2, 3, 4, 4)), [0, 0], num_classes=2)


def test_learning_check_verdict() -> None:
    assert min_share(8) == pytest.approx(0.375) and min_share(2) == pytest.approx(0.75)
    learned = LearningCheck(
        num_classes=8, num_images=32, share_before=0.125, share_after=0.75, bpd_before=8.0, bpd_after=4.5
    )
    assert learned.learned and learned.chance == 0.125
    assert "24/32" in learned.describe() and "8.00 -> 4.50" in learned.describe()
    assert learned.metrics()["learning.own_class_share"] == 0.75
    assert not LearningCheck(
        num_classes=8, num_images=32, share_before=0.125, share_after=0.3, bpd_before=8.0, bpd_after=4.5
    ).learned
    assert not LearningCheck(
        num_classes=8, num_images=32, share_before=0.125, share_after=0.9, bpd_before=4.0, bpd_after=4.5
    ).learned


def test_figures() -> None:
    images = torch.rand(3 * 2, 3, 8, 8)
    panel = labelled_grid(images, ["a", "b", "c"], per_class=2, title="after")
    assert panel.width >= 2 * 8 * 16  # scaled up: 8 px -> 16x (auto_scale)
    both = side_by_side([panel, panel])
    assert both.width > 2 * panel.width and both.height == panel.height
    png = learning_curve_png([8, 16, 24], [6.0, 5.0, 4.5], evaluated=[(0, 8.0), (24, 4.4)])
    assert Image.open(io.BytesIO(png)).format == "PNG"

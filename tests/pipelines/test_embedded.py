"""The embedded demo/test dataset: built from scikit-image's photographs, fast, deterministic."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from pipelines_helpers import read_dataset

from fractalgen.pipelines.embedded import (
    DEMO_CLASSES,
    PHOTOGRAPHS,
    build_embedded_dataset,
    embedded_class_names,
)
from fractalgen.pipelines.loader import build_loader
from fractalgen.pipelines.summary import read_summary


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(name, "0")  # records the original state, restored after the test
        monkeypatch.delenv(name)


def test_embedded_dataset(tmp_path: Path) -> None:
    import streaming  # noqa: F401 - time the build, not the first import of torch/streaming

    out = str(tmp_path / "embedded16")
    started = time.perf_counter()
    summary = build_embedded_dataset(out, size=16)
    assert time.perf_counter() - started < 20  # a few seconds; generous for a loaded 2-core CI box
    assert summary == read_summary(out)
    assert summary["num_classes"] == 16 == len(PHOTOGRAPHS)
    assert summary["class_names"] == list(embedded_class_names()) == sorted(summary["class_names"])
    assert summary["num_images"] == 512 and summary["class_counts"] == [32] * 16
    assert summary["image_size"] == 16 and summary["source"] == "embedded:skimage.data"

    samples = read_dataset(out)
    images = np.stack([image for _, image in samples.values()])  # (512, 16, 16, 3)
    assert images.shape == (512, 16, 16, 3)
    assert len({image.tobytes() for image in images}) == 512  # distinct images
    labels = np.array([label for label, _ in samples.values()])
    # classes look different: mean colours of the astronaut and the hubble photograph classes differ
    means = np.stack([images[labels == c].reshape(-1, 3).mean(0) for c in range(16)])
    assert np.abs(means[0] - means[10]).max() > 10

    # deterministic: the same arguments give the same images; rebuilding over it is a no-op
    again = read_dataset(build_embedded_dataset(str(tmp_path / "again"), size=16) and str(tmp_path / "again"))
    assert all(np.array_equal(again[k][1], samples[k][1]) and again[k][0] == samples[k][0] for k in samples)
    assert build_embedded_dataset(out, size=16)["created"] == summary["created"]

    loader = build_loader(out, micro_batch=64, rank=0, world_size=1)
    batch_images, batch_labels = next(iter(loader))
    assert batch_images.shape == (64, 3, 16, 16) and batch_labels.max() < 16


def test_embedded_size_32_for_the_demo(tmp_path: Path) -> None:
    summary = build_embedded_dataset(str(tmp_path / "demo"), size=32, images_per_class=4, num_classes=3)
    assert summary["image_size"] == 32 and summary["num_images"] == 12 and summary["num_classes"] == 3
    assert {image.shape for _, image in read_dataset(str(tmp_path / "demo")).values()} == {(32, 32, 3)}


def test_embedded_demo_classes(tmp_path: Path) -> None:
    """``classes`` picks photographs by name (index order: sorted); the demo's 8 are distinct."""
    out = str(tmp_path / "demo-classes")
    summary = build_embedded_dataset(out, size=16, images_per_class=4, classes=DEMO_CLASSES)
    assert summary["class_names"] == sorted(DEMO_CLASSES) and summary["num_classes"] == 8
    assert summary["num_images"] == 32 and summary["embedded"]["classes"] == sorted(DEMO_CLASSES)
    labels = {label for label, _ in read_dataset(out).values()}
    assert labels == set(range(8))
    # another selection over the same folder rebuilds it; an unknown name is refused
    assert build_embedded_dataset(out, size=16, images_per_class=4, classes=["rocket"])["class_names"] == [
        "rocket"
    ]
    with pytest.raises(ValueError, match="classes must be distinct names"):
        build_embedded_dataset(str(tmp_path / "bad"), size=16, classes=["rocket", "no-such-photo"])

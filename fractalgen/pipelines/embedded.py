"""The embedded dataset: a small class-conditional image set for the demo and tests, no download.

Each class is one of the real photographs scikit-image ships inside its wheel (``skimage/data``:
astronaut, brick, camera, ..., rocket); class names are the photographs' names, sorted (index order).
A class's images are random crops of its photograph (random scale and aspect, random position),
randomly flipped and colour-jittered (brightness, contrast, saturation), drawn with a fixed seed:
the same arguments always give the same images. They are written as PNG files in the folder layout
to a temporary folder and converted by ``prepare.prepare_dataset``, the same path as ImageNet, so
they get the ADM centre crop to ``size`` and land in MDS shards with a summary.

``build_embedded_dataset(out, size=32)`` takes a few seconds on one core; the demo uses size 32
and ``DEMO_CLASSES`` (photographs whose colours tell them apart), tests use 16.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from fractalgen import storage
from fractalgen.pipelines import DataError
from fractalgen.pipelines.prepare import PLAN_FILE, prepare_dataset
from fractalgen.pipelines.summary import read_summary

log = logging.getLogger(__name__)

# Photographs (not drawings or synthetic patterns) shipped in scikit-image's wheel.
PHOTOGRAPHS: tuple[str, ...] = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "retina.jpg",
    "rocket.jpg",
)
EMBEDDED_SOURCE = "embedded:skimage.data"

# The demo's classes: 8 photographs with distinct colours and layouts (a nearest-class-mean colour
# histogram names the class of ~94% of their training images, against ~63% over all 16), so that
# a few minutes of CPU training give samples recognisably of their class.
DEMO_CLASSES: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "coins",
    "hubble_deep_field",
    "ihc",
    "motorcycle_left",
    "retina",
    "rocket",
)


def photograph_dir() -> str:
    """The folder holding scikit-image's bundled photographs."""
    import skimage  # deferred: heavy import

    return os.path.join(os.path.dirname(skimage.__file__), "data")


def _jittered_crop(photo, rng: np.random.Generator, side: int):
    """One random crop of ``photo`` (PIL RGB), resized so its short side is ``side``, flipped, jittered."""
    from PIL import Image, ImageEnhance  # deferred: heavy import

    w, h = photo.size
    short = min(w, h)
    scale = rng.uniform(0.35, 1.0)
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw = min(w, max(8, round(short * scale * np.sqrt(aspect))))
    ch = min(h, max(8, round(short * scale / np.sqrt(aspect))))
    x = int(rng.integers(0, w - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    crop = photo.crop((x, y, x + cw, y + ch))
    factor = side / min(cw, ch)
    crop = crop.resize((max(side, round(cw * factor)), max(side, round(ch * factor))), Image.BICUBIC)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.75, 1.25))
    crop = ImageEnhance.Contrast(crop).enhance(rng.uniform(0.75, 1.25))
    crop = ImageEnhance.Color(crop).enhance(rng.uniform(0.6, 1.4))
    return crop


def select_photographs(num_classes: int, classes: Sequence[str] | None = None) -> list[str]:
    """File names of the chosen photographs in class-index order: ``classes`` (names without the
    extension) sorted, or else the first ``num_classes`` of ``PHOTOGRAPHS`` sorted."""
    if classes is not None:
        by_name = {f.rsplit(".", 1)[0]: f for f in PHOTOGRAPHS}
        unknown = sorted(set(classes) - set(by_name))
        if unknown or len(set(classes)) != len(classes) or not classes:
            raise ValueError(f"classes must be distinct names among {sorted(by_name)}, got {list(classes)}")
        return [by_name[c] for c in sorted(classes)]
    if not 1 <= num_classes <= len(PHOTOGRAPHS):
        raise ValueError(f"num_classes must be in 1..{len(PHOTOGRAPHS)}, got {num_classes}")
    return sorted(PHOTOGRAPHS)[:num_classes]


def write_embedded_source(
    folder: str,
    *,
    size: int,
    images_per_class: int,
    num_classes: int,
    seed: int,
    classes: Sequence[str] | None = None,
) -> list[str]:
    """Write the generated images as ``folder/<class>/<class>_NNNN.png``; returns the class names.

    A class's images depend on its photograph, ``seed`` and its class index."""
    from PIL import Image  # deferred: heavy import

    names = select_photographs(num_classes, classes)
    written = []
    for index, filename in enumerate(names):
        cls = filename.rsplit(".", 1)[0]
        written.append(cls)
        with Image.open(os.path.join(photograph_dir(), filename)) as image:
            photo = image.convert("RGB")
        # Work from a copy about 8x the target: crops stay sharp, resizing stays fast.
        shrink = max(1, min(photo.size) // (8 * size))
        if shrink > 1:
            photo = photo.reduce(shrink)
        rng = np.random.default_rng([seed, index])
        os.makedirs(os.path.join(folder, cls), exist_ok=True)
        for i in range(images_per_class):
            side = int(rng.integers(size, 3 * size + 1))  # ADM crop sees both the halving and bicubic paths
            _jittered_crop(photo, rng, side).save(
                os.path.join(folder, cls, f"{cls}_{i:04d}.png"), compress_level=1
            )
    return written


def build_embedded_dataset(
    out: str,
    *,
    size: int = 32,
    images_per_class: int = 32,
    num_classes: int = 16,
    classes: Sequence[str] | None = None,
    seed: int = 0,
    workers: int = 1,
    compression: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """Build the embedded dataset at ``out`` (folder or ``s3://``) and return its summary.

    ``num_classes`` photographs (<= 16; or the photographs named in ``classes``) x
    ``images_per_class`` images, ADM-cropped to ``size`` (32 for the demo, 16 for tests). If ``out`` already holds the embedded dataset built with the
    same arguments it is returned as is, unless ``overwrite``.
    """

    if classes is not None:
        num_classes = len(select_photographs(num_classes, classes))
    params: dict[str, Any] = {
        "size": size, "images_per_class": images_per_class, "num_classes": num_classes, "seed": seed,
    }  # fmt: skip
    if classes is not None:
        params["classes"] = sorted(classes)
    if not overwrite and storage.exists(storage.join(out, "index.json"), endpoint=endpoint):
        summary = read_summary(out, endpoint=endpoint)
        if summary.get("embedded") == params:
            return summary
        if summary.get("source") != EMBEDDED_SOURCE:
            raise DataError(f"{out} holds another dataset ({summary.get('source')}); pass --overwrite")
        overwrite = True
    plan_uri = storage.join(out, PLAN_FILE)
    if not overwrite and storage.exists(plan_uri, endpoint=endpoint):
        # A previous embedded build was interrupted: its temporary source is gone, start again.
        overwrite = os.path.basename(
            str(storage.read_json(plan_uri, endpoint=endpoint)["source"])
        ).startswith("fractalgen-embedded-")
    tmp = tempfile.mkdtemp(prefix="fractalgen-embedded-")
    try:
        classes = write_embedded_source(
            tmp,
            size=size,
            images_per_class=images_per_class,
            num_classes=num_classes,
            seed=seed,
            classes=classes,
        )
        summary = prepare_dataset(
            tmp,
            out,
            size=size,
            workers=workers,
            compression=compression,
            part_size=max(64, images_per_class * num_classes // max(1, workers)),
            class_names=classes,
            overwrite=overwrite,
            progress=progress,
            endpoint=endpoint,
            summary_extra={"source": EMBEDDED_SOURCE, "source_kind": "embedded", "embedded": params},
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def embedded_class_names(num_classes: int = 16) -> Sequence[str]:
    """Class names of the embedded dataset, in index order."""
    return [name.rsplit(".", 1)[0] for name in sorted(PHOTOGRAPHS)[:num_classes]]

"""Test helpers: tiny ImageNet-like sources and an independent ADM crop to check shards against."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = ("n01440764", "n01443537", "n01484850")
MEAN = np.array((0.485, 0.456, 0.406), np.float32)
STD = np.array((0.229, 0.224, 0.225), np.float32)
REPO = Path(__file__).resolve().parents[2]


def random_photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth colour gradient plus noise (compresses like a photo, unlike pure noise): (H, W, 3)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = (
        rng.uniform(0, 255, 3) + rng.uniform(-3, 3, 3) * x[..., None] + rng.uniform(-3, 3, 3) * y[..., None]
    )
    noisy = base + rng.normal(0, 20, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png16_bytes(arr: np.ndarray) -> bytes:
    """A 16-bit PNG written byte by byte (not by PIL): (H, W) grey, (H, W, 2) grey+alpha,
    (H, W, 3) RGB or (H, W, 4) RGBA uint16 values."""
    height, width = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = arr.astype(">u2").reshape(height, width * channels)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def reference_crop(data: bytes, size: int) -> np.ndarray:
    """ADM centre crop written from docs/model.md#training-recipe with PIL operations only
    (independent of the package)."""
    img = Image.open(io.BytesIO(data))
    img = img.convert("RGB")
    while min(img.width, img.height) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = size / min(img.width, img.height)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.BICUBIC)
    left = (img.width - size) // 2
    top = (img.height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def normalised(arr: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8 -> (3, S, S) float32 as the loader should yield it."""
    return ((arr.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def make_images(rng: np.random.Generator, n: int) -> list[bytes]:
    """``n`` JPEGs of random sizes: some need the BOX halving for 16 px, some an upscale."""
    return [
        jpeg_bytes(random_photo(rng, int(rng.integers(12, 80)), int(rng.integers(12, 80)))) for _ in range(n)
    ]


def make_folder_source(root: Path, rng: np.random.Generator, per_class: int = 4, val: int = 5) -> dict:
    """ImageNet layout: ``root/train/<wnid>/<wnid>_<i>.JPEG``, flat ``root/val`` + ``LOC_val_solution.csv``.

    Returns {"train": {key: (bytes, wnid)}, "val": {key: (bytes, wnid)}}.
    """
    out: dict[str, dict[str, tuple[bytes, str]]] = {"train": {}, "val": {}}
    for wnid in WNIDS:
        (root / "train" / wnid).mkdir(parents=True)
        for i, data in enumerate(make_images(rng, per_class)):
            key = f"{wnid}/{wnid}_{i}.JPEG"
            (root / "train" / key).write_bytes(data)
            out["train"][key] = (data, wnid)
    (root / "val").mkdir()
    rows = ["ImageId,PredictionString"]
    for i, data in enumerate(make_images(rng, val)):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        wnid = WNIDS[i % len(WNIDS)]
        (root / "val" / f"{name}.JPEG").write_bytes(data)
        rows.append(f"{name},{wnid} 1 2 30 40 {wnid} 3 4 20 20")
        out["val"][f"{name}.JPEG"] = (data, wnid)
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return out


def make_train_tar(path: Path, rng: np.random.Generator, per_class: int = 4) -> dict[str, tuple[bytes, str]]:
    """ILSVRC2012_img_train.tar layout: an outer tar of ``<wnid>.tar`` files, each a tar of JPEGs.

    The class tars go in reversed wnid order, so labels that followed archive order instead of the
    sorted wnid order would fail ``check_dataset(..., list(WNIDS), ...)``.
    """
    expected: dict[str, tuple[bytes, str]] = {}
    with tarfile.open(path, "w") as outer:
        for wnid in reversed(WNIDS):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for i, data in enumerate(make_images(rng, per_class)):
                    info = tarfile.TarInfo(f"{wnid}_{i}.JPEG")
                    info.size = len(data)
                    inner.addfile(info, io.BytesIO(data))
                    expected[f"{wnid}/{wnid}_{i}.JPEG"] = (data, wnid)
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = buf.tell()
            outer.addfile(info, io.BytesIO(buf.getvalue()))
    return expected


def read_dataset(uri: str) -> dict[str, tuple[int, np.ndarray]]:
    """{key: (label, image uint8 (S, S, 3))} read straight from the shards."""
    from fractalgen.pipelines.inspect import iter_samples

    out = {}
    for sample in iter_samples(uri):
        assert sample["key"] not in out, f"duplicate sample {sample['key']}"
        out[sample["key"]] = (int(sample["label"]), np.asarray(sample["image"]))
    return out


def check_dataset(
    uri: str, expected: dict[str, tuple[bytes, str]], class_names: list[str], size: int
) -> None:
    """Every expected image is in the shards once, equal to the reference crop, with the right label."""
    got = read_dataset(uri)
    assert sorted(got) == sorted(expected)
    for key, (data, name) in expected.items():
        label, image = got[key]
        assert label == class_names.index(name), key
        np.testing.assert_array_equal(image, reference_crop(data, size), err_msg=key)


def run_python(
    code: str, env: dict[str, str] | None = None, timeout: float = 120, **kwargs
) -> subprocess.Popen:
    """Start ``python -c code`` in the repository with the given extra environment."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=full_env, **kwargs)

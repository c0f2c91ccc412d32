"""Data pipeline benchmark: bytes per image and decoded images/s per CPU core, per storage choice.

    python bench/data.py                      # 64 and 256 px, 512 images each
    python bench/data.py --sizes 64 --images 2000 --json results.json

Source images are ImageNet-like JPEGs (about 500x375, quality 90) cut from the photographs that
scikit-image ships, so nothing is downloaded. For each crop size:

- *prepare*: images/s per core of the conversion step shared by all choices (JPEG decode + ADM
  centre crop), measured in one process.
- per storage choice (how the cropped image sits in an MDS shard):
  ``png`` (the default: lossless), ``png+zstd`` (shard compression on top), ``ndarray`` (raw uint8
  HxWx3), ``ndarray+zstd``, and ``jpeg95`` (lossy, so not acceptable for training data; listed to
  show what it would save):
  - *stored B/img*: shard bytes in object storage per image (what is uploaded and downloaded);
  - *cache B/img*: bytes per image in each node's local cache (shards decompressed);
  - *encode img/s*: writing the shards;
  - *first epoch img/s* and *cached epoch img/s*: the training loader (``build_loader``,
    ``num_workers=0``, one torch thread) reading every sample, decoding, flipping, collating and
    normalising, with the shards local; the first epoch includes copying and decompressing shards
    into the cache. One process on one core, so these are per-core rates.

Timings share the machine with whatever else runs; run it on an idle box for numbers to quote.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHOICES = {  # name: (MDS image encoding, shard compression, lossless)
    "png": ("png", None, True),
    "png+zstd": ("png", "zstd", True),
    "ndarray": ("ndarray", None, True),
    "ndarray+zstd": ("ndarray", "zstd", True),
    "jpeg95": ("jpeg", None, False),
}


def source_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` ImageNet-like JPEGs (short side ~375, quality 90) cut from scikit-image's photographs."""
    from PIL import Image

    from fractalgen.pipelines.embedded import PHOTOGRAPHS, photograph_dir

    rng = np.random.default_rng(seed)
    photos = [Image.open(os.path.join(photograph_dir(), name)).convert("RGB") for name in PHOTOGRAPHS]
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = int(min(w, h) * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = photo.crop((x, y, x + side, y + side)).resize((500, 375), Image.BICUBIC)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_shards(crops: list[np.ndarray], folder: str, encoding: str, compression: str | None) -> float:
    """Write the crops as one MDS dataset; returns seconds spent."""
    from PIL import Image
    from streaming import MDSWriter

    size = crops[0].shape[0]
    column = f"ndarray:uint8:{size},{size},3" if encoding == "ndarray" else encoding
    start = time.perf_counter()
    with MDSWriter(
        out=folder, columns={"image": column, "label": "int", "key": "str"}, compression=compression
    ) as w:
        for i, arr in enumerate(crops):
            w.write(
                {
                    "image": arr if encoding == "ndarray" else Image.fromarray(arr),
                    "label": i % 16,
                    "key": str(i),
                }
            )
    return time.perf_counter() - start


def shard_bytes(folder: str) -> tuple[int, int]:
    index = json.loads(Path(folder, "index.json").read_text())
    stored = sum((s["zip_data"] or s["raw_data"])["bytes"] for s in index["shards"])
    raw = sum(s["raw_data"]["bytes"] for s in index["shards"])
    return stored, raw


def read_rate(folder: str, n: int, batch: int = 64) -> tuple[float, float]:
    """(first epoch, cached epoch) images/s of the training loader over the dataset at ``folder``."""
    from fractalgen.pipelines.loader import build_loader

    loader = build_loader(folder, micro_batch=batch, rank=0, world_size=1, drop_last=False, num_workers=0)
    rates = []
    for _ in range(2):
        start, count = time.perf_counter(), 0
        for images, _ in loader:
            count += images.shape[0]
        assert count == n
        rates.append(count / (time.perf_counter() - start))
    return rates[0], rates[1]


def bench_size(size: int, n: int, work: str) -> list[dict]:
    from fractalgen.pipelines.crop import decode_and_crop

    jpegs = source_jpegs(n)
    start = time.perf_counter()
    crops = [decode_and_crop(data, size) for data in jpegs]  # (size, size, 3) uint8 each
    prepare_rate = n / (time.perf_counter() - start)
    rows = []
    for name, (encoding, compression, lossless) in CHOICES.items():
        folder = os.path.join(work, f"{size}-{name}")
        seconds = write_shards(crops, folder, encoding, compression)
        stored, raw = shard_bytes(folder)
        first, cached = read_rate(folder, n)
        rows.append(
            {
                "size": size,
                "choice": name,
                "lossless": lossless,
                "images": n,
                "prepare_img_s": prepare_rate,
                "stored_B_img": stored / n,
                "cache_B_img": raw / n,
                "encode_img_s": n / seconds,
                "first_epoch_img_s": first,
                "cached_epoch_img_s": cached,
            }
        )
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'size':>4} {'choice':<13} {'lossless':<8} {'stored B/img':>12} {'cache B/img':>11} "
        f"{'encode img/s':>12} {'1st epoch img/s':>15} {'cached img/s':>12} {'prepare img/s':>13}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['size']:>4} {r['choice']:<13} {'yes' if r['lossless'] else 'NO':<8} {r['stored_B_img']:>12.0f} "
            f"{r['cache_B_img']:>11.0f} {r['encode_img_s']:>12.0f} {r['first_epoch_img_s']:>15.0f} "
            f"{r['cached_epoch_img_s']:>12.0f} {r['prepare_img_s']:>13.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="crop sizes (default 64 256)")
    parser.add_argument("--images", type=int, default=512, help="images per size (default 512)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # per-core numbers
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(name, None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fractalgen-bench-") as work:
        for size in args.sizes:
            rows += bench_size(size, args.images, work)
    print(
        f"# data pipeline, one process (images/s are per CPU core), {args.images} images per size, "
        f"cpu: {os.cpu_count()} cores visible"
    )
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

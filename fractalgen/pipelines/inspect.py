"""Inspect a prepared dataset: counts, classes, skipped images, and a contact sheet of samples.

Terms:
- *index order*: the order of samples in the merged ``index.json`` (parts in order, shards in
  order, samples in order): the source order, without skipped items.
- *contact sheet*: a PNG grid of sample images (scaled up with nearest neighbour to at least 64 px so
  tiny sets are visible), each captioned with its class name, drawn from up to ``max_shards``
  evenly spaced shards so a look at a large remote dataset downloads only a few shards.

``iter_samples`` reads samples directly with streaming's MDS shard readers (no StreamingDataset,
no shared memory), for inspection and tests.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

from fractalgen import storage
from fractalgen.pipelines import DataError
from fractalgen.pipelines.summary import SKIPPED_PARQUET, read_summary


def read_index(uri: str, *, endpoint: str | None = None) -> dict[str, Any]:
    """The merged ``index.json`` of the dataset at ``uri`` (``DataError`` if there is none)."""
    path = storage.join(uri, "index.json")
    try:
        return storage.read_json(path, endpoint=endpoint)
    except FileNotFoundError:
        raise DataError(f"no MDS dataset at {uri}: {path} is missing") from None


def iter_samples(
    uri: str,
    *,
    shards: Sequence[int] | None = None,
    per_shard: int | Sequence[int] | None = None,
    endpoint: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Decoded samples ``{"image": PIL image or array, "label": int, "key": str}`` in index order.

    ``shards`` restricts to those shard numbers; ``per_shard`` takes N evenly spaced samples of each
    (one N for all, or one per entry of ``shards``).
    """
    from streaming.base.compression import decompress  # deferred: heavy import
    from streaming.base.format import reader_from_json  # deferred: heavy import

    index = read_index(uri, endpoint=endpoint)
    infos = index["shards"]
    chosen = range(len(infos)) if shards is None else shards
    with tempfile.TemporaryDirectory(prefix="fractalgen-inspect-") as tmp:
        for j, n in enumerate(chosen):
            info = infos[n]
            quota = per_shard if per_shard is None or isinstance(per_shard, int) else per_shard[j]
            raw_name = info["raw_data"]["basename"]
            raw_path = os.path.join(tmp, raw_name)
            if info.get("zip_data"):
                zip_name = info["zip_data"]["basename"]
                data = decompress(
                    info["compression"], storage.read_bytes(storage.join(uri, zip_name), endpoint=endpoint)
                )
                os.makedirs(os.path.dirname(raw_path), exist_ok=True)
                with open(raw_path, "wb") as f:
                    f.write(data)
            else:
                storage.download_file(storage.join(uri, raw_name), raw_path, endpoint=endpoint)
            reader = reader_from_json(tmp, None, info)
            total = len(reader)
            if quota is None or quota >= total:
                picks: Sequence[int] = range(total)
            else:  # evenly spaced, so a class-sorted shard still shows several classes
                picks = sorted({(i * total) // quota for i in range(quota)})
            for i in picks:
                yield reader[i]
            os.unlink(raw_path)


def contact_sheet(
    samples: Sequence[dict[str, Any]], class_names: Sequence[str], path: str, *, columns: int = 8
) -> str:
    """Write a PNG grid of ``samples`` captioned with class names to ``path`` (local or s3://)."""

    import numpy as np  # deferred: heavy import
    from PIL import Image, ImageDraw  # deferred: heavy import

    if not samples:
        raise DataError("no samples to draw")
    first = np.asarray(samples[0]["image"])
    side = first.shape[0]
    scale = max(1, -(-64 // side))
    tile = side * scale
    caption = 12
    cols = min(columns, len(samples))
    rows = -(-len(samples) // cols)
    sheet = Image.new("RGB", (cols * (tile + 2), rows * (tile + caption + 2)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, sample in enumerate(samples):
        r, c = divmod(i, cols)
        image = Image.fromarray(
            np.asarray(
                sample["image"].convert("RGB") if hasattr(sample["image"], "convert") else sample["image"]
            )
        )
        x, y = c * (tile + 2) + 1, r * (tile + caption + 2) + 1
        sheet.paste(image.resize((tile, tile), Image.NEAREST), (x, y))
        label = int(sample["label"])
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        draw.text((x, y + tile), name[: max(4, tile // 6)], fill="black")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    storage.write_bytes(path, buf.getvalue())
    return path


def inspect_dataset(
    uri: str,
    *,
    sheet: str | None = None,
    samples: int = 64,
    max_shards: int = 8,
    columns: int = 8,
    show_skipped: int = 10,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """Counts and classes of the dataset at ``uri``; writes a contact sheet PNG to ``sheet`` if given.

    Returns ``{"uri", "num_images", "num_shards", "bytes", "image_size", "num_classes",
    "class_names", "class_counts", "num_skipped", "skipped_reasons", "skipped", "num_renamed",
    "renamed", "skipped_list", "sheet"}``; counts come from the index (always) and the summary (if
    present). ``skipped`` and ``renamed`` hold the first ``show_skipped`` ``{key, reason}`` entries;
    ``skipped_list`` is where all skipped items are listed (``skipped.parquet``; ``summary.json`` too),
    or None if there is no such file.
    """

    index = read_index(uri, endpoint=endpoint)
    shards = index["shards"]
    try:
        summary: dict[str, Any] = read_summary(uri, endpoint=endpoint)
    except DataError:
        summary = {}
    num_images = sum(s["samples"] for s in shards)
    if summary and summary["num_images"] != num_images:
        raise DataError(
            f"{uri}: index holds {num_images} samples but the summary says {summary['num_images']}"
        )
    info = {
        "uri": uri,
        "num_images": num_images,
        "num_shards": len(shards),
        "bytes": sum((s.get("zip_data") or s["raw_data"])["bytes"] for s in shards),
        "image_size": summary.get("image_size"),
        "num_classes": summary.get("num_classes"),
        "class_names": summary.get("class_names", []),
        "class_counts": summary.get("class_counts", []),
        "num_skipped": summary.get("num_skipped"),
        "skipped_reasons": summary.get("skipped_reasons", {}),
        "skipped": summary.get("skipped", [])[: max(0, show_skipped)],
        "num_renamed": summary.get("num_renamed"),
        "renamed": summary.get("renamed", [])[: max(0, show_skipped)],
        "skipped_list": None,
        "sheet": None,
    }
    skipped_list = storage.join(uri, SKIPPED_PARQUET)
    if summary.get("num_skipped") and storage.exists(skipped_list, endpoint=endpoint):
        info["skipped_list"] = skipped_list
    if sheet is not None and samples > 0:
        nonempty = [i for i, s in enumerate(shards) if s["samples"]]
        k = min(max_shards, len(nonempty))
        picked = [nonempty[round(j * (len(nonempty) - 1) / max(1, k - 1))] for j in range(k)] if k else []
        picked = sorted(set(picked))
        # spread the samples evenly; smallest shards first, so what they lack goes to the others
        quota_of, remaining = {}, samples
        for j, n in enumerate(sorted(picked, key=lambda n: shards[n]["samples"])):
            quota_of[n] = min(shards[n]["samples"], -(-remaining // (len(picked) - j)))
            remaining -= quota_of[n]
        quotas = [quota_of[n] for n in picked]
        drawn = list(iter_samples(uri, shards=picked, per_shard=quotas, endpoint=endpoint))
        names = info["class_names"] or []
        info["sheet"] = contact_sheet(drawn, names, sheet, columns=columns)
        if info["image_size"] is None and drawn:
            import numpy as np  # deferred: heavy import

            info["image_size"] = int(np.asarray(drawn[0]["image"]).shape[0])
    return info

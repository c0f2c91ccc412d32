"""The summary of a prepared dataset, as JSON (``summary.json``) and Parquet.

Files written next to the shards by ``prepare.prepare_dataset`` (before the merged ``index.json``):
- ``summary.json``: the dict below.
- ``summary.parquet``: one row per class (``class_index``, ``class_name``, ``num_images``); the
  scalar fields of the summary are in the schema metadata under ``fractalgen_summary``.
- ``skipped.parquet``: one row per skipped source item (``key``, ``reason``).

Summary keys (``read_summary`` guarantees the first four):
- ``num_images``: samples in the shards; ``num_classes``; ``class_names``: list in class-index order
  (ImageNet: sorted wnids); ``image_size``: side of the stored square images.
- ``class_counts`` (per class index), ``bytes`` (stored shard bytes, after compression),
  ``raw_bytes``, ``bytes_per_image``, ``num_shards``, ``num_parts``, ``image_format``, ``columns``,
  ``compression``, ``source``, ``source_kind``, ``split``, ``num_source_items``.
- ``num_skipped``, ``skipped_reasons`` (reason kind -> count), ``skipped`` (list of ``{key, reason}``).
- ``num_renamed``, ``renamed`` (list of ``{key, reason}``): items whose source name is not valid
  UTF-8, stored under ``key`` with the undecodable bytes escaped (datasets prepared before these
  fields existed lack them).
"""

from __future__ import annotations

import io
import json
from typing import Any

from fractalgen import storage
from fractalgen.pipelines import DataError

SUMMARY_JSON = "summary.json"
SUMMARY_PARQUET = "summary.parquet"
SKIPPED_PARQUET = "skipped.parquet"
REQUIRED_KEYS = ("num_images", "num_classes", "class_names", "image_size")


def _parquet_bytes(table) -> bytes:
    import pyarrow.parquet as pq  # deferred: heavy import

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_summary(out: str, summary: dict[str, Any], *, endpoint: str | None = None) -> None:
    """Write ``summary.json``, ``summary.parquet`` and ``skipped.parquet`` into the dataset ``out``."""
    import pyarrow as pa  # deferred: heavy import

    scalars = {k: v for k, v in summary.items() if k not in ("class_names", "class_counts", "skipped")}
    classes = pa.table(
        {
            "class_index": pa.array(range(len(summary["class_names"])), pa.int64()),
            "class_name": pa.array(summary["class_names"], pa.string()),
            "num_images": pa.array(summary["class_counts"], pa.int64()),
        }
    ).replace_schema_metadata({"fractalgen_summary": json.dumps(scalars, sort_keys=True)})
    skipped = pa.table(
        {
            "key": pa.array([s["key"] for s in summary["skipped"]], pa.string()),
            "reason": pa.array([s["reason"] for s in summary["skipped"]], pa.string()),
        }
    )
    storage.write_bytes(storage.join(out, SUMMARY_PARQUET), _parquet_bytes(classes), endpoint=endpoint)
    storage.write_bytes(storage.join(out, SKIPPED_PARQUET), _parquet_bytes(skipped), endpoint=endpoint)
    storage.write_json(storage.join(out, SUMMARY_JSON), summary, endpoint=endpoint)


def read_summary(uri: str, *, endpoint: str | None = None) -> dict[str, Any]:
    """The summary dict of the prepared dataset at ``uri`` (local folder or ``s3://`` prefix).

    Raises ``DataError`` naming the URI if there is no summary (not a prepared dataset, or a
    conversion that has not finished).
    """
    path = storage.join(uri, SUMMARY_JSON)
    try:
        summary = storage.read_json(path, endpoint=endpoint)
    except FileNotFoundError:
        raise DataError(
            f"no dataset summary at {path}: not a prepared dataset, or its conversion has not finished "
            "(run `fractalgen data prepare` again to resume)"
        ) from None
    missing = [k for k in REQUIRED_KEYS if k not in summary]
    if missing:
        raise DataError(f"summary {path} lacks {missing}")
    return summary

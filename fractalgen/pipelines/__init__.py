"""Data pipelines: where users keep images -> ADM centre crop -> MDS shards -> object storage -> batches.

Terms:
- *source*: the images as users keep them: an ImageNet folder (``train/<wnid>/*.JPEG``, ``val`` with
  its labels), an ImageNet tar archive, or Parquet files with an image-bytes and a label column.
- *class index*: position of a class in ``class_names``; for ImageNet the sorted wnid order that
  the released models use.
- *ADM centre crop* (docs/model.md#training-recipe): halve with a BOX filter while the short side
  is >= 2x the target, bicubic-resize the short side to the target, centre crop (``crop.py``).
- *dataset* (prepared): a folder or ``s3://`` prefix holding MDS shards (mosaicml-streaming) in
  ``part-NNNNN/`` sub-folders, ``summary.json`` / ``summary.parquet`` / ``skipped.parquet``, and the
  merged ``index.json``, which is written last: a dataset without it is incomplete.
- *part*: a fixed, contiguous range of source images converted by one writer; the unit of
  parallelism and of resuming (``prepare.py``).
- *sample*: one MDS record ``{"image": uint8 HxWx3 (png), "label": int, "key": source name}``.

Modules (import them directly; this package imports nothing heavy):
- ``fractalgen.storage`` (one level down, shared with the platform): local-or-S3 helpers.
- ``crop``: ``center_crop_arr`` and ``decode_and_crop``.
- ``sources``: ``open_source`` for folders, tars and Parquet.
- ``prepare``: ``prepare_dataset(source, out, *, size, workers, compression, shard_size_limit, ...)``.
- ``summary``: ``read_summary(uri)``.
- ``loader``: ``build_loader(uri, *, micro_batch, rank, world_size, ...)``.
- ``embedded``: ``build_embedded_dataset(out, *, size=32, ...)``, the demo/test set.
- ``inspect``: ``inspect_dataset(uri, ...)`` with a contact sheet PNG.
- ``cli``: ``fractalgen data prepare|inspect|embedded``.
"""

from __future__ import annotations


class DataError(Exception):
    """A dataset or source is missing, incomplete or inconsistent; the message names the URI."""


__all__ = ["DataError"]

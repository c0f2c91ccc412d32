"""``fractalgen data ...``: prepare, inspect and build datasets from the command line.

Sub-commands (each sets ``func(args) -> int``; heavy libraries are imported inside them):
- ``data prepare --source SRC --out OUT --size 64|256``: ImageNet folder / tar / Parquet -> ADM
  centre crop -> MDS shards (local or s3://), in parallel, resumable (run it again after an
  interruption).
- ``data inspect URI``: counts, classes, skipped images, and a contact sheet PNG of samples.
- ``data embedded --out OUT``: the small demo/test set built from scikit-image's photographs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from fractalgen import storage
from fractalgen.cli import CLIError
from fractalgen.pipelines import DataError
from fractalgen.pipelines.inspect import inspect_dataset
from fractalgen.pipelines.prepare import prepare_dataset
from fractalgen.pipelines.summary import read_summary

PREPARE_EPILOG = """\
sources:
  ImageNet folder   ROOT with train/<wnid>/*.JPEG (and val/ with LOC_val_solution.csv or a
                    '<file> <wnid>' labels file); --split picks train (default) or val
  ImageNet tar      ILSVRC2012_img_train.tar (nested <wnid>.tar), a tar of the folder layout,
                    or ILSVRC2012_img_val.tar with --labels (uncompressed tars only)
  Parquet           a .parquet file or a folder of them with an image column (bytes, or a struct
                    with 'bytes') and a label column (class indices or names)
  Any of them may be an s3:// URI; set S3_ENDPOINT_URL (or --endpoint-url) for S3-compatible stores.

examples:
  fractalgen data prepare --source /data/imagenet --out s3://bucket/in64 --size 64 --compression zstd
  fractalgen data prepare --source /data/imagenet --split val --classes s3://bucket/in64 \\
      --out s3://bucket/in64-val --size 64
  fractalgen data prepare --source hub/imagenet-1k/data --split train --out /data/in256 --size 256
"""


def _write_failed(err: OSError, out: str) -> CLIError:
    """A full disk, or S3 still failing after its retries (``storage.StorageError``), while a data
    command wrote ``out``: nothing half-written is published, and the same command resumes."""

    where = "" if err.filename or isinstance(err, storage.StorageError) else f" (writing {out})"
    return CLIError(f"{err}{where}; nothing half-written is published: run the same command again to resume")


def _class_names_arg(value: str | None, endpoint: str | None) -> list[str] | None:
    """--classes: a prepared dataset (its class_names) or a text file with one name per line."""
    if value is None:
        return None

    try:
        if storage.exists(storage.join(value, "summary.json"), endpoint=endpoint):
            return list(read_summary(value, endpoint=endpoint)["class_names"])
        text = storage.read_bytes(value, endpoint=endpoint).decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"--classes {value}: neither a prepared dataset nor a file") from None
    names = [line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not names:
        raise DataError(f"--classes {value}: no class names")
    return names


def _prepare(args: argparse.Namespace) -> int:
    if args.size < 1:
        raise CLIError(f"--size must be positive, got {args.size}")
    try:
        summary = prepare_dataset(
            args.source,
            args.out,
            size=args.size,
            workers=args.workers,
            compression=None if args.compression in (None, "none") else args.compression,
            shard_size_limit=args.shard_size,
            image_format=args.image_format,
            part_size=args.part_size,
            split=args.split,
            labels=args.labels,
            class_names=_class_names_arg(args.classes, args.endpoint_url),
            image_column=args.image_column,
            label_column=args.label_column,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            endpoint=args.endpoint_url,
        )
    except (DataError, ValueError) as err:
        raise CLIError(str(err)) from err
    except OSError as err:
        raise _write_failed(err, args.out) from err
    print(
        f"{args.out}: {summary['num_images']} images, {summary['num_classes']} classes, "
        f"{summary['image_size']}px {summary['image_format']}, {summary['num_shards']} shards, "
        f"{summary['bytes'] / 1e6:.1f} MB ({summary['bytes_per_image']:.0f} B/image), "
        f"{summary['num_skipped']} skipped {summary['skipped_reasons'] or ''}".rstrip()
    )
    if summary.get("num_renamed"):
        print(f"{summary['num_renamed']} renamed: source names that are not valid UTF-8, bytes escaped")
    if summary["num_skipped"] or summary.get("num_renamed"):
        print(
            f"which ones: fractalgen data inspect {args.out} --no-sheet (all in summary.json, skipped.parquet)"
        )
    return 0


def _short(text: str, width: int = 160) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _print_info(info: dict[str, Any]) -> None:
    names = info["class_names"]
    counts = info["class_counts"]
    print(f"dataset      {info['uri']}")
    print(f"images       {info['num_images']} in {info['num_shards']} shards, {info['bytes'] / 1e6:.1f} MB")
    print(f"image size   {info['image_size']}")
    print(f"classes      {info['num_classes']}")
    for i, name in enumerate(names[:20]):
        count = counts[i] if i < len(counts) else "?"
        print(f"  {i:5d}  {name:<32} {count}")
    if len(names) > 20:
        low = min(counts) if counts else "?"
        high = max(counts) if counts else "?"
        print(f"  ... {len(names) - 20} more (images per class: {low}..{high})")
    print(f"skipped      {info['num_skipped']} {info['skipped_reasons'] or ''}".rstrip())
    for item in info["skipped"]:
        print(f"  {item['key']}: {_short(item['reason'])}")
    if info["num_skipped"] and len(info["skipped"]) < info["num_skipped"]:
        print(f"  ... {info['num_skipped'] - len(info['skipped'])} more")
    if info["skipped_list"]:
        print(f"  all skipped: {info['skipped_list']} (and summary.json)")
    if info["num_renamed"]:
        print(f"renamed      {info['num_renamed']} (source names not valid UTF-8, stored with bytes escaped)")
        for item in info["renamed"]:
            print(f"  {item['key']}")
    if info["sheet"]:
        print(f"contact sheet {info['sheet']}")


def _inspect(args: argparse.Namespace) -> int:
    sheet = None
    if not args.no_sheet:
        sheet = args.sheet or f"{storage.basename(args.uri) or 'dataset'}_samples.png"
    try:
        info = inspect_dataset(
            args.uri,
            sheet=sheet,
            samples=args.samples,
            max_shards=args.max_shards,
            show_skipped=args.skipped,
            endpoint=args.endpoint_url,
        )
    except DataError as err:
        raise CLIError(str(err)) from err
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
    else:
        _print_info(info)
    return 0


def _embedded(args: argparse.Namespace) -> int:
    from fractalgen.pipelines.embedded import build_embedded_dataset  # deferred: heavy import

    try:
        summary = build_embedded_dataset(
            args.out,
            size=args.size,
            images_per_class=args.images_per_class,
            num_classes=args.num_classes,
            seed=args.seed,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            endpoint=args.endpoint_url,
        )
    except (DataError, ValueError) as err:
        raise CLIError(str(err)) from err
    except OSError as err:
        raise _write_failed(err, args.out) from err
    print(
        f"{args.out}: {summary['num_images']} images, {summary['num_classes']} classes, {summary['image_size']}px"
    )
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` with its sub-commands ``prepare``, ``inspect`` and ``embedded``."""
    data = subparsers.add_parser(
        "data",
        help="prepare, inspect and build datasets (MDS shards, local or S3)",
        description="Datasets: ImageNet folders, tars or Parquet -> ADM centre crop -> MDS shards in a folder "
        "or S3, streamed into training.",
    )
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda _args: (data.print_help(), 2)[1])

    endpoint_help = "S3-compatible endpoint URL (default: $S3_ENDPOINT_URL, then $AWS_ENDPOINT_URL)"

    p = sub.add_parser(
        "prepare",
        help="convert images to ADM-cropped MDS shards (parallel, resumable)",
        description="Convert a source to MDS shards holding the ADM centre crop (lossless PNG) and the label.\n"
        "Runs in parallel worker processes with a progress bar, writes summary.json, summary.parquet and\n"
        "skipped.parquet, and publishes index.json last. Interrupted? Run the same command again:\n"
        "finished parts are kept, the rest are redone.",
        epilog=PREPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--source", required=True, help="ImageNet folder, .tar, or Parquet file/folder (local or s3://)"
    )
    p.add_argument("--out", required=True, help="output dataset folder or s3:// prefix")
    p.add_argument(
        "--size", type=int, required=True, help="crop side in pixels: 64 or 256 for ImageNet (any size works)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes, one shard writer each (default: all CPUs; 1 = in this process)",
    )
    p.add_argument(
        "--compression",
        default=None,
        help="shard compression: none (default), zstd, zstd:LEVEL, gz, br, bz2, snappy",
    )
    p.add_argument("--shard-size", default="64mb", help="shard size limit before compression (default 64mb)")
    p.add_argument(
        "--image-format",
        choices=("png", "ndarray"),
        default="png",
        help="png: lossless, about half the bytes (default); ndarray: raw uint8, no decode cost",
    )
    p.add_argument(
        "--part-size", type=int, default=10_000, help="images per part, the unit of resuming (default 10000)"
    )
    p.add_argument(
        "--split",
        default=None,
        help="split folder / file prefix to convert (train, val; default train if present)",
    )
    p.add_argument(
        "--labels",
        default=None,
        help="labels file for flat val images (LOC_val_solution.csv or '<file> <wnid>' lines)",
    )
    p.add_argument(
        "--classes",
        default=None,
        help="class list: a prepared dataset (reuse its class order, e.g. train's for val) or a file of names",
    )
    p.add_argument(
        "--image-column", default=None, help="Parquet image column (default: image, img, jpg, ...)"
    )
    p.add_argument("--label-column", default="label", help="Parquet label column (default: label)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete what is at --out instead of resuming (once the source is read and one of its images converts)",
    )
    p.add_argument("--endpoint-url", default=None, help=endpoint_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare)

    p = sub.add_parser(
        "inspect",
        help="counts, classes and a contact sheet PNG of a dataset",
        description="Print image/class counts and skipped images of a prepared dataset and draw a contact sheet "
        "of samples (from a few evenly spaced shards, so remote datasets download little).",
    )
    p.add_argument("uri", help="dataset folder or s3:// prefix")
    p.add_argument(
        "--sheet", default=None, help="contact sheet PNG path, local or s3:// (default: ./<name>_samples.png)"
    )
    p.add_argument("--no-sheet", action="store_true", help="do not draw a contact sheet")
    p.add_argument("--samples", type=int, default=64, help="images on the contact sheet (default 64)")
    p.add_argument("--max-shards", type=int, default=8, help="shards to read samples from (default 8)")
    p.add_argument(
        "--skipped",
        type=int,
        default=10,
        metavar="N",
        help="name the first N skipped images with their reasons (default 10; all are in skipped.parquet)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--endpoint-url", default=None, help=endpoint_help)
    p.set_defaults(func=_inspect)

    p = sub.add_parser(
        "embedded",
        help="build the small demo/test dataset from scikit-image's photographs (no download)",
        description="Build the embedded dataset: each of up to 16 photographs shipped with scikit-image is a class; "
        "random crops, flips and colour jitter (fixed seed) make its images. Takes seconds.",
    )
    p.add_argument("--out", required=True, help="output dataset folder or s3:// prefix")
    p.add_argument(
        "--size", type=int, default=32, help="image side (default 32, the demo model; tests use 16)"
    )
    p.add_argument("--images-per-class", type=int, default=32, help="images per class (default 32)")
    p.add_argument("--num-classes", type=int, default=16, help="classes, at most 16 (default 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if --out holds it already")
    p.add_argument("--endpoint-url", default=None, help=endpoint_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_embedded)

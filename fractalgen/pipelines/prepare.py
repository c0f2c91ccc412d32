"""Prepare a dataset: source images -> ADM centre crop -> MDS shards (local folder or ``s3://``).

Terms:
- *part*: items ``[i * part_size, (i + 1) * part_size)`` of the source (fixed by the plan), converted
  by one ``MDSWriter`` into ``OUT/part-NNNNN/`` (its shards, its ``index.json``, and ``part.json``
  with its counts and skipped images). Parts are the unit of parallelism (one writer per worker
  process at a time) and of resuming: a part is *done* when its ``part.json`` exists.
- *plan*: ``OUT/_prepare/plan.json``: the source fingerprint and every setting that changes the
  shards. Resuming with a different plan is refused (pass ``overwrite=True`` to start again).
- *publishing*: parts are written to a staging folder and published atomically (local: one
  ``rename``; S3: shards, then the part's ``index.json``, then ``part.json``). When every part is
  done, ``summary.json``, ``summary.parquet`` and ``skipped.parquet`` are written, the part indexes
  are merged with streaming's ``merge_index``, and the merged ``OUT/index.json`` is published last:
  readers (``loader.build_loader``) require it, so they never see half a dataset.

Resuming after an interruption (crash, kill, Ctrl-C) is running the same command again: done parts
are kept, partly written parts are deleted and converted again, so the result holds exactly the
images an uninterrupted run would, each once. Corrupt or unreadable images are skipped, counted and
listed with the reason; they never stop the run.

Stored sample: ``{"image": "png" (the cropped uint8 RGB image, lossless), "label": "int",
"key": "str" (the source item's key)}``; ``image_format="ndarray"`` stores raw uint8 HxWx3 instead
(bigger, no decode cost; see ``bench/data.py``).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal

from fractalgen.pipelines import DataError, storage
from fractalgen.pipelines.sources import Part, open_source

log = logging.getLogger(__name__)

DEFAULT_PART_SIZE = 10_000
DEFAULT_SHARD_SIZE_LIMIT = 1 << 26  # 64 MiB, streaming's default
IMAGE_FORMATS = ("png", "ndarray")
PLAN_FILE = "_prepare/plan.json"
PART_MARKER = "part.json"
PROGRESS_EVERY = 32

ImageFormat = Literal["png", "ndarray"]


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def mds_columns(image_format: str, size: int) -> dict[str, str]:
    """The MDS column encodings of a prepared dataset."""
    if image_format == "png":
        image = "png"
    elif image_format == "ndarray":
        image = f"ndarray:uint8:{size},{size},3"
    else:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    return {"image": image, "label": "int", "key": "str"}


@dataclass
class PartTask:
    """Everything a worker needs to convert one part (picklable)."""

    index: int
    part: Part
    out: str
    size: int
    image_format: str
    compression: str | None
    shard_size_limit: int
    staging_root: str
    endpoint: str | None = None


_progress_queue: Any = None


def _init_worker(queue: Any) -> None:
    global _progress_queue
    _progress_queue = queue
    # Ctrl-C is handled by the parent, which shuts the pool down.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _report(n: int) -> None:
    if _progress_queue is not None and n:
        _progress_queue.put(n)


def convert_part(task: PartTask, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Convert one part and publish it; returns its ``part.json`` content."""
    from PIL import Image
    from streaming import MDSWriter

    from fractalgen.pipelines.crop import decode_and_crop

    report = progress or _report
    name = part_name(task.index)
    os.makedirs(task.staging_root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"{name}-", dir=task.staging_root)
    try:
        shard_dir = os.path.join(staging, name)
        counts: Counter[int] = Counter()
        skipped: list[dict[str, str]] = []
        pending = 0
        writer = MDSWriter(
            out=shard_dir,
            columns=mds_columns(task.image_format, task.size),
            compression=task.compression,
            size_limit=task.shard_size_limit,
        )
        for record in task.part.read():
            pending += 1
            if pending >= PROGRESS_EVERY:
                report(pending)
                pending = 0
            if record.error is not None:
                skipped.append({"key": record.key, "reason": record.error})
                continue
            try:
                arr = decode_and_crop(record.data, task.size)  # (size, size, 3) uint8
            except Exception as err:
                skipped.append(
                    {"key": record.key, "reason": f"corrupt or unreadable image: {_clean_reason(err)}"}
                )
                continue
            image = Image.fromarray(arr) if task.image_format == "png" else arr
            writer.write({"image": image, "label": int(record.label), "key": record.key})
            counts[int(record.label)] += 1
        writer.finish()
        report(pending)
        with open(os.path.join(shard_dir, "index.json")) as f:
            index = json.load(f)
        stored = sum((s["zip_data"] or s["raw_data"])["bytes"] for s in index["shards"])
        raw = sum(s["raw_data"]["bytes"] for s in index["shards"])
        marker = {
            "part": task.index,
            "num_items": len(task.part),
            "num_images": sum(counts.values()),
            "class_counts": {str(k): v for k, v in sorted(counts.items())},
            "num_shards": len(index["shards"]),
            "bytes": stored,
            "raw_bytes": raw,
            "skipped": skipped,
        }
        with open(os.path.join(shard_dir, PART_MARKER), "w") as f:
            json.dump(marker, f, sort_keys=True)
        _publish_part(shard_dir, storage.join(task.out, name), task.endpoint)
        return marker
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish_part(shard_dir: str, dest: str, endpoint: str | None) -> None:
    if storage.is_remote(dest):
        # Data first, the part's index next, its marker last: a part without part.json is partial.
        storage.upload_dir(shard_dir, dest, endpoint=endpoint, last=("index.json", PART_MARKER))
    else:
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(shard_dir, dest)  # staging lives under OUT, so this is one atomic rename


def _plan(
    source, *, size: int, image_format: str, compression: str | None, shard_size_limit: int, part_size: int
) -> dict[str, Any]:
    return {
        "version": 1,
        "source": source.uri,
        "source_kind": source.kind,
        "split": getattr(source, "split", None),
        "fingerprint": source.fingerprint(),
        "num_items": len(source),
        "class_names": list(source.class_names),
        "image_size": size,
        "image_format": image_format,
        "compression": compression,
        "shard_size_limit": shard_size_limit,
        "part_size": part_size,
    }


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0].split(" (", 1)[0].strip()


def _drop_merge_notice(record: logging.LogRecord) -> bool:
    return "temporary folder" not in str(record.msg)


def _clean_reason(err: Exception) -> str:
    # Drop object reprs (memory addresses) so the same bad file gives the same reason every run.
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-f]+>", "", f"{type(err).__name__}: {err}")


def _merge_index(out: str, part_names: Sequence[str], endpoint: str | None) -> None:
    """Merge the parts' index.json files into OUT/index.json (published last)."""
    from streaming.base.util import merge_index

    with tempfile.TemporaryDirectory(prefix="fractalgen-merge-") as tmp:
        paths = []
        for name in part_names:
            src = storage.join(out, name, "index.json")
            dest = os.path.join(tmp, "parts", name, "index.json")
            storage.download_file(src, dest, endpoint=endpoint)
            paths.append(dest)
        merged_dir = os.path.join(tmp, "merged")
        os.makedirs(merged_dir)
        # merge_index logs a warning through the root logger (configuring it if it has no
        # handler): keep the root logger as it is and drop that message.
        root = logging.getLogger()
        guard = logging.NullHandler() if not root.handlers else None
        if guard is not None:
            root.addHandler(guard)
        root.addFilter(_drop_merge_notice)
        try:
            merge_index(paths, merged_dir, keep_local=True)
        finally:
            root.removeFilter(_drop_merge_notice)
            if guard is not None:
                root.removeHandler(guard)
        storage.upload_file(
            os.path.join(merged_dir, "index.json"), storage.join(out, "index.json"), endpoint=endpoint
        )


def prepare_dataset(
    source: str,
    out: str,
    *,
    size: int,
    workers: int = 1,
    compression: str | None = None,
    shard_size_limit: int | str = DEFAULT_SHARD_SIZE_LIMIT,
    image_format: ImageFormat = "png",
    part_size: int = DEFAULT_PART_SIZE,
    split: str | None = None,
    labels: str | None = None,
    class_names: Sequence[str] | None = None,
    image_column: str | None = None,
    label_column: str = "label",
    overwrite: bool = False,
    progress: bool = True,
    endpoint: str | None = None,
    staging_dir: str | None = None,
    summary_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Convert ``source`` into an MDS dataset at ``out`` and return its summary (``summary.read_summary``).

    Args:
        source: folder, ``.tar`` or Parquet file/folder, local or ``s3://`` (see ``sources``).
        out: dataset folder or ``s3://`` prefix.
        size: side of the ADM centre crop (64 or 256 for ImageNet; 16/32 for tiny sets).
        workers: worker processes (forked, so they share the imported modules; spawned where fork
            is unavailable); 0 or 1 converts in this process.
        compression: MDS shard compression (``None``, ``"zstd"``, ``"zstd:7"``, ``"gz"``, ...).
        shard_size_limit: bytes per shard before compression (int or ``"64mb"``).
        image_format: ``"png"`` (default, lossless, ~half the bytes) or ``"ndarray"`` (raw uint8).
        part_size: images per part (the unit of parallelism and resuming).
        split, labels, class_names, image_column, label_column: passed to ``sources.open_source``.
        overwrite: delete whatever is at ``out`` first instead of resuming.
        progress: show a tqdm progress bar.
        endpoint: S3 endpoint for boto3 (default: ``storage.endpoint_url()``).
        staging_dir: local scratch folder for S3 output (default: the system temp folder).
        summary_extra: entries added to (or replacing) the written summary, e.g. provenance.

    Raises ``DataError`` for a bad source, a non-dataset ``out``, or a resume with other settings.
    """
    from streaming.base.compression import is_compression
    from streaming.base.util import bytes_to_int

    started = time.time()
    storage.check_scheme(out)
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if part_size < 1:
        raise ValueError(f"part_size must be positive, got {part_size}")
    compression = compression or None
    if compression and not is_compression(compression):
        raise ValueError(f"unknown compression {compression!r} (e.g. zstd, zstd:7, gz, br, bz2, snappy)")
    mds_columns(image_format, size)  # validates image_format
    limit = bytes_to_int(shard_size_limit)

    if overwrite:
        storage.delete_tree(out, endpoint=endpoint)
    plan_uri = storage.join(out, PLAN_FILE)
    existing_plan = (
        storage.read_json(plan_uri, endpoint=endpoint)
        if storage.exists(plan_uri, endpoint=endpoint)
        else None
    )
    if existing_plan is None and storage.list_files(out, endpoint=endpoint):
        raise DataError(
            f"{out} is not empty and holds no FractalGen conversion; choose an empty location or overwrite"
        )

    src = open_source(
        source,
        split=split,
        labels=labels,
        class_names=class_names,
        image_column=image_column,
        label_column=label_column,
        endpoint=endpoint,
    )
    plan = _plan(
        src,
        size=size,
        image_format=image_format,
        compression=compression,
        shard_size_limit=limit,
        part_size=part_size,
    )
    if existing_plan is not None and existing_plan != plan:
        changed = sorted(k for k in set(plan) | set(existing_plan) if plan.get(k) != existing_plan.get(k))
        raise DataError(
            f"{out} holds a conversion with other settings ({', '.join(changed)}); "
            "pass overwrite=True (--overwrite) to start again"
        )
    if existing_plan is None:
        storage.write_json(plan_uri, plan, endpoint=endpoint)
    elif storage.exists(storage.join(out, "index.json"), endpoint=endpoint):
        from fractalgen.pipelines.summary import read_summary

        log.info("%s is already complete", out)
        return read_summary(out, endpoint=endpoint)

    num_parts = (len(src) + part_size - 1) // part_size
    names = [part_name(i) for i in range(num_parts)]
    present = storage.list_files(out, endpoint=endpoint)
    done = {n for n in names if f"{n}/{PART_MARKER}" in present}
    partial = {p.split("/", 1)[0] for p in present if p.startswith("part-")} - done
    for name in sorted(partial):  # leftovers of an interrupted run: convert again from scratch
        log.info("removing partly written %s", storage.join(out, name))
        storage.delete_tree(storage.join(out, name), endpoint=endpoint)
    if storage.is_remote(out):
        staging_root = tempfile.mkdtemp(prefix="fractalgen-prepare-", dir=staging_dir)
    else:
        staging_root = storage.join(out, "_prepare", "staging")
        shutil.rmtree(staging_root, ignore_errors=True)
    todo = [i for i in range(num_parts) if names[i] not in done]
    if done:
        log.info("resuming %s: %d of %d parts already done", out, len(done), num_parts)
    tasks = [
        PartTask(
            i,
            src.part(i * part_size, min(len(src), (i + 1) * part_size)),
            out,
            size,
            image_format,
            compression,
            limit,
            staging_root,
            endpoint,
        )
        for i in todo
    ]
    try:
        _run_tasks(
            tasks,
            workers=workers,
            progress=progress,
            total=sum(len(t.part) for t in tasks),
            desc=f"prepare {size}px",
        )
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)

    markers = [storage.read_json(storage.join(out, n, PART_MARKER), endpoint=endpoint) for n in names]
    summary = _summarise(plan, markers, started)
    summary.update(summary_extra or {})
    from fractalgen.pipelines.summary import write_summary

    write_summary(out, summary, endpoint=endpoint)
    _merge_index(out, names, endpoint)
    log.info(
        "prepared %s: %d images, %d classes, %d skipped, %.1f MB",
        out,
        summary["num_images"],
        summary["num_classes"],
        summary["num_skipped"],
        summary["bytes"] / 1e6,
    )
    return summary


def _run_tasks(tasks: list[PartTask], *, workers: int, progress: bool, total: int, desc: str) -> None:
    from tqdm.auto import tqdm

    if not tasks:
        return
    if workers <= 1:
        with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
            for task in tasks:
                convert_part(task, progress=bar.update)
        return
    # fork: workers inherit the imported modules (streaming imports torch, seconds per process).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    queue = ctx.SimpleQueue()
    with ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)), mp_context=ctx, initializer=_init_worker, initargs=(queue,)
    ) as pool:
        futures: set[Future] = {pool.submit(convert_part, task) for task in tasks}
        try:
            with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
                while futures:
                    finished, futures = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
                    while not queue.empty():
                        bar.update(queue.get())
                    for future in finished:
                        future.result()  # re-raise a worker's error (done parts stay done)
                while not queue.empty():
                    bar.update(queue.get())
        except BaseException:
            # Ctrl-C or a failed part: stop now rather than finishing the running parts (they are
            # redone on resume). Workers ignore SIGINT, so end them explicitly.
            processes = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()
            raise


def _summarise(plan: dict[str, Any], markers: list[dict[str, Any]], started: float) -> dict[str, Any]:
    class_names = plan["class_names"]
    counts = [0] * len(class_names)
    skipped: list[dict[str, str]] = []
    for marker in markers:
        for label, n in marker["class_counts"].items():
            counts[int(label)] += n
        skipped += marker["skipped"]
    num_images = sum(m["num_images"] for m in markers)
    stored = sum(m["bytes"] for m in markers)
    return {
        "format": "mds",
        "version": 1,
        "source": plan["source"],
        "source_kind": plan["source_kind"],
        "split": plan["split"],
        "image_size": plan["image_size"],
        "image_format": plan["image_format"],
        "columns": mds_columns(plan["image_format"], plan["image_size"]),
        "compression": plan["compression"],
        "shard_size_limit": plan["shard_size_limit"],
        "part_size": plan["part_size"],
        "num_parts": len(markers),
        "num_shards": sum(m["num_shards"] for m in markers),
        "num_source_items": plan["num_items"],
        "num_images": num_images,
        "num_classes": len(class_names),
        "class_names": class_names,
        "class_counts": counts,
        "bytes": stored,
        "raw_bytes": sum(m["raw_bytes"] for m in markers),
        "bytes_per_image": stored / num_images if num_images else 0.0,
        "num_skipped": len(skipped),
        "skipped_reasons": dict(sorted(Counter(_reason_kind(s["reason"]) for s in skipped).items())),
        "skipped": skipped,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 3),
    }

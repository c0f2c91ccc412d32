"""Prepare a dataset: source images -> ADM centre crop -> MDS shards (local folder or ``s3://``).

Terms:
- *part*: items ``[i * part_size, (i + 1) * part_size)`` of the source (fixed by the plan), converted
  by one ``MDSWriter`` into ``OUT/part-NNNNN/`` (its shards, its ``index.json``, and ``part.json``
  with its counts and skipped images). Parts are the unit of parallelism (one writer per worker
  process at a time) and of resuming: a part is *done* when its ``part.json`` exists.
- *plan*: ``OUT/_prepare/plan.json``: the source fingerprint and every setting that changes the
  shards. Resuming with a different plan is refused (``--overwrite`` starts again).
- *publishing*: parts are written to a staging folder and published atomically (local: one
  ``rename``; S3: shards, then the part's ``index.json``, then ``part.json``). When every part is
  done, ``summary.json``, ``summary.parquet`` and ``skipped.parquet`` are written, the part indexes
  are merged with streaming's ``merge_index``, and the merged ``OUT/index.json`` is published last:
  readers (``loader.build_loader``) require it, so they never see half a dataset.

Resuming after an interruption (crash, kill, Ctrl-C) is running the same command again: done parts
are kept, partly written parts are deleted and converted again, so the result holds exactly the
images an uninterrupted run would, each once. Corrupt or unreadable images are skipped, counted and
listed with the reason; they never stop the run. A source where *no* image converts is an error
(``DataError`` listing the first skipped items) and leaves nothing at ``out``; with ``overwrite``,
``out`` is deleted only once one image of the source has converted (``_first_image``). Keys that are not
valid UTF-8 (file names in another encoding) are stored with the undecodable bytes escaped
(``caf\\xe9.JPEG``) and listed as *renamed* in the summary.

One run at a time per output (*run lock*): a run holds an ``flock`` on a lock file in the system temp
folder named after ``out``; forked workers share it, so it is released only when the run and all its
workers have ended, and a second run waits ``LOCK_WAIT_S`` for it, then refuses. Workers die with
their parent (``PR_SET_PDEATHSIG`` on Linux, and a thread that watches the parent pid everywhere), so
a SIGKILLed run leaves no workers publishing parts. Each run also writes ``_prepare/run.json`` with a
fresh token; a worker publishes a part only while the token is still its run's (protection where the
lock cannot reach: S3 outputs written from several machines, workers not forked).

Stored sample: ``{"image": "png" (the cropped uint8 RGB image, lossless), "label": "int",
"key": "str" (the source item's key)}``; ``image_format="ndarray"`` stores raw uint8 HxWx3 instead
(bigger, no decode cost; see ``bench/data.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal

from fractalgen import storage
from fractalgen.pipelines import DataError
from fractalgen.pipelines.sources import Part, Record, open_source
from fractalgen.pipelines.summary import read_summary, write_summary

log = logging.getLogger(__name__)

DEFAULT_PART_SIZE = 10_000
DEFAULT_SHARD_SIZE_LIMIT = 1 << 26  # 64 MiB, streaming's default
IMAGE_FORMATS = ("png", "ndarray")
PLAN_FILE = "_prepare/plan.json"
RUN_FILE = "_prepare/run.json"
PART_MARKER = "part.json"
PROGRESS_EVERY = 32
LOCK_WAIT_S = 30.0  # how long a run waits for another run (or a killed run's workers) on the same out
WATCH_PARENT_S = 0.5  # how often a worker checks that its parent is alive (where prctl is missing)
SHOWN_SKIPPED = 10  # skipped items named in the error when no image converts
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

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
    run_token: str | None = None  # publish only while OUT/_prepare/run.json holds this token


_progress_queue: Any = None


def _init_worker(queue: Any, parent_pid: int) -> None:
    global _progress_queue
    _progress_queue = queue
    # Ctrl-C is handled by the parent, which shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)


def _die_with_parent(parent_pid: int) -> None:
    """End this worker process as soon as ``parent_pid`` (its parent) ends, even by SIGKILL.

    Linux: the kernel sends SIGKILL when the parent dies (``prctl(PR_SET_PDEATHSIG)``). Everywhere:
    a daemon thread polls the parent pid (a dead parent's children are re-parented, so it changes).
    """
    if sys.platform.startswith("linux"):
        # Without a usable libc the watcher thread below still ends this process.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(WATCH_PARENT_S)
        if os.getppid() != parent_pid:
            os._exit(1)  # no cleanup: the parent's rerun deletes partly written parts


def safe_key(key: str) -> str:
    """``key`` if it is valid UTF-8 text, else with its undecodable bytes escaped (``caf\\xe9.JPEG``).

    File names that are not UTF-8 reach Python as lone surrogates (``os.fsdecode``), which UTF-8
    writers (MDS, JSON readers, Parquet) refuse.
    """
    try:
        key.encode("utf-8")
        return key
    except UnicodeEncodeError:
        pass
    try:
        raw = key.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that did not come from undecodable bytes
        return key.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def _report(n: int) -> None:
    if _progress_queue is not None and n:
        _progress_queue.put(n)


def convert_part(task: PartTask, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Convert one part and publish it; returns its ``part.json`` content."""
    from PIL import Image  # deferred: heavy import
    from streaming import MDSWriter  # deferred: heavy import

    report = progress or _report
    name = part_name(task.index)
    os.makedirs(task.staging_root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"{name}-", dir=task.staging_root)
    try:
        shard_dir = os.path.join(staging, name)
        counts: Counter[int] = Counter()
        skipped: list[dict[str, str]] = []
        renamed: list[dict[str, str]] = []
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
            key = safe_key(record.key)
            if key != record.key:
                renamed.append({"key": key, "reason": "name is not valid UTF-8: undecodable bytes escaped"})
            arr, reason = _decode(record, task.size)
            if arr is None:
                skipped.append({"key": key, "reason": reason})
                continue
            image = Image.fromarray(arr) if task.image_format == "png" else arr
            try:
                writer.write({"image": image, "label": int(record.label), "key": key})
            except (ValueError, TypeError, KeyError) as err:
                # The sample failed to encode; the writer changes nothing before encoding succeeds.
                # (OSError, e.g. a full disk, stops the run.)
                skipped.append({"key": key, "reason": f"cannot be stored: {_clean_reason(err)}"})
                continue
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
            "renamed": renamed,
        }
        with open(os.path.join(shard_dir, PART_MARKER), "w") as f:
            json.dump(marker, f, sort_keys=True)
        if task.run_token is not None:
            _check_run_token(task.out, task.run_token, task.endpoint, name)
        _publish_part(shard_dir, storage.join(task.out, name), task.endpoint)
        return marker
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _decode(record: Record, size: int) -> tuple[Any, str]:
    """``(the (size, size, 3) uint8 crop, "")`` of a record, or ``(None, why it is skipped)``."""
    from fractalgen.pipelines.crop import UnsupportedImage, decode_and_crop  # deferred: heavy import

    if record.error is not None:
        return None, record.error
    try:
        return decode_and_crop(record.data, size), ""
    except UnsupportedImage as err:
        return None, f"unsupported image: {err}"
    except Exception as err:
        return None, f"corrupt or unreadable image: {_clean_reason(err)}"


def _first_image(src, size: int) -> list[dict[str, str]] | None:
    """None as soon as one item of ``src`` converts; else every item's ``{key, reason}`` (none does).

    ``--overwrite`` checks this before deleting ``out``, so a source of only bad files does not
    cost the dataset there. One process, in source order: a usable source stops at its first image.
    """
    skipped = []
    for record in src.part(0, len(src)).read():
        arr, reason = _decode(record, size)
        if arr is not None:
            return None
        skipped.append({"key": safe_key(record.key), "reason": reason})
    return skipped


def _check_run_token(out: str, token: str, endpoint: str | None, name: str) -> None:
    """Raise ``DataError`` if another run has taken over ``out`` (its ``run.json`` has another token)."""
    try:
        current = storage.read_json(storage.join(out, RUN_FILE), endpoint=endpoint)
    except FileNotFoundError:
        current = {}
    if current.get("token") != token:
        raise DataError(
            f"{out}: another conversion ({_describe_run(current)}) has taken over this output; "
            f"{name} was not published"
        )


def _describe_run(run: dict[str, Any]) -> str:
    if not run:
        return "unknown, its run.json is gone"
    return f"pid {run.get('pid')} on {run.get('host')}, started {run.get('started')}"


def _lock_path(out: str, endpoint: str | None) -> str:
    """The run lock's file: in the system temp folder, named after the output's absolute location."""
    if storage.is_remote(out):
        where = f"{storage.endpoint_url(endpoint) or ''}|{out.rstrip('/')}"
    else:
        where = os.path.realpath(storage.local_path(out))
    digest = hashlib.sha256(where.encode("utf-8", "surrogateescape")).hexdigest()[:20]
    user = getattr(os, "getuid", lambda: "")()
    return os.path.join(tempfile.gettempdir(), f"fractalgen-prepare-{user}-{digest}.lock")


class _RunLock:
    """The run lock of ``out`` (see the module docstring); ``with`` it to hold it.

    The lock is an ``flock`` on an open file, so it is shared by forked workers and released only
    when the last process holding it ends: a run's workers that outlive it keep it held. Leaving the
    ``with`` closes this process's handle without unlocking, for that reason.
    """

    def __init__(self, out: str, endpoint: str | None, wait_s: float) -> None:
        self.out = out
        self.path = _lock_path(out, endpoint)
        self.wait_s = wait_s
        self.file: Any = None

    def __enter__(self) -> _RunLock:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): the run token alone guards publishing
            return self
        self.file = open(self.path, "a+")  # held until __exit__
        try:
            self._wait(fcntl)
        except BaseException:  # refused, or Ctrl-C while waiting
            self.file.close()
            self.file = None
            raise
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}, started {_now()}\n")
        self.file.flush()
        return self

    def _wait(self, fcntl: Any) -> None:
        deadline = time.monotonic() + self.wait_s
        waiting = False
        while True:
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                self.file.seek(0)
                holder = self.file.read().strip() or "unknown"
                if time.monotonic() >= deadline:
                    raise DataError(
                        f"{self.out} is being written by another `fractalgen data prepare` ({holder}), or "
                        "by worker processes of one that was killed and have not ended yet; wait for it "
                        f"to end or stop it, then run again (lock file {self.path})"
                    ) from None
                if not waiting:
                    log.warning(
                        "waiting up to %.0f s for the conversion writing %s (%s)",
                        self.wait_s,
                        self.out,
                        holder,
                    )
                    waiting = True
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _check_output(out: str, plan: dict[str, Any] | None, endpoint: str | None) -> dict[str, Any] | None:
    """The plan of the conversion at ``out`` (None if ``out`` is empty or missing).

    Raises ``DataError`` if ``out`` holds something else, or a conversion with settings other than
    ``plan`` (not compared if ``plan`` is None).
    """
    plan_uri = storage.join(out, PLAN_FILE)
    existing = (
        storage.read_json(plan_uri, endpoint=endpoint)
        if storage.exists(plan_uri, endpoint=endpoint)
        else None
    )
    if existing is None:
        if storage.list_files(out, endpoint=endpoint):
            raise DataError(
                f"{out} is not empty and holds no FractalGen conversion; choose an empty location "
                "or pass --overwrite to delete what is there"
            )
        return None
    if plan is not None and existing != plan:
        changed = sorted(k for k in set(plan) | set(existing) if plan.get(k) != existing.get(k))
        raise DataError(
            f"{out} holds a conversion with other settings ({', '.join(changed)}); "
            "pass --overwrite to start again"
        )
    return existing


def _discard(out: str, endpoint: str | None) -> None:
    """Delete what this conversion wrote at ``out`` (it holds nothing else), keeping a local folder."""
    storage.delete_tree(out, endpoint=endpoint)
    if not storage.is_remote(out):
        os.makedirs(storage.local_path(out), exist_ok=True)


def _no_images_error(source: str, out: str, skipped: list[dict[str, str]], written: str) -> DataError:
    shown = "; ".join(f"{s['key']}: {s['reason']}" for s in skipped[:SHOWN_SKIPPED])
    more = f"; ... and {len(skipped) - SHOWN_SKIPPED} more" if len(skipped) > SHOWN_SKIPPED else ""
    kinds = Counter(_reason_kind(s["reason"]) for s in skipped)
    return DataError(
        f"no image of {source} could be converted (all {len(skipped)} items skipped: "
        f"{', '.join(f'{n} {kind}' for kind, n in sorted(kinds.items()))}); {written}. "
        f"Skipped: {shown}{more}"
    )


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
    # Class names come from folder names too, which may not be UTF-8 (see ``safe_key``).
    return {
        "version": 1,
        "source": source.uri,
        "source_kind": source.kind,
        "split": getattr(source, "split", None),
        "fingerprint": source.fingerprint(),
        "num_items": len(source),
        "class_names": [safe_key(name) for name in source.class_names],
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
    from streaming.base.util import merge_index  # deferred: heavy import

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
        overwrite: delete whatever is at ``out`` (once the source has been read) instead of resuming.
        progress: show a tqdm progress bar.
        endpoint: S3 endpoint for boto3 (default: ``storage.endpoint_url()``).
        staging_dir: local scratch folder for S3 output (default: the system temp folder).
        summary_extra: entries added to (or replacing) the written summary, e.g. provenance.

    Raises ``DataError`` for a bad source, a source of which no image converts, a non-dataset
    ``out``, a resume with other settings, or another run writing ``out`` (after ``LOCK_WAIT_S``).
    Errors found before converting leave ``out`` as it was.
    """
    from streaming.base.compression import is_compression  # deferred: heavy import
    from streaming.base.util import bytes_to_int  # deferred: heavy import

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

    # Check the output and read the source before touching `out`: bad input leaves it as it was.
    if not overwrite:
        _check_output(out, None, endpoint)  # a foreign `out` is refused before a long source scan
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
    if not overwrite:
        _check_output(out, plan, endpoint)
    with _RunLock(out, endpoint, LOCK_WAIT_S):
        if overwrite and storage.list_files(out, endpoint=endpoint):
            bad = _first_image(src, size)
            if bad is not None:
                raise _no_images_error(source, out, bad, f"{out} was left as it was")
            storage.delete_tree(out, endpoint=endpoint)
            existing_plan = None
        else:  # again: another run may have changed `out` while this one waited for the lock
            existing_plan = _check_output(out, plan, endpoint)
        if existing_plan is not None and storage.exists(storage.join(out, "index.json"), endpoint=endpoint):
            log.info("%s is already complete", out)
            return read_summary(out, endpoint=endpoint)
        if existing_plan is None:
            storage.write_json(storage.join(out, PLAN_FILE), plan, endpoint=endpoint)
        token = uuid.uuid4().hex
        run = {"token": token, "pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
        storage.write_json(storage.join(out, RUN_FILE), run, endpoint=endpoint)
        summary = _convert(
            src,
            out,
            plan,
            token,
            workers=workers,
            progress=progress,
            endpoint=endpoint,
            staging_dir=staging_dir,
            started=started,
        )
        if summary["num_images"] == 0:
            _discard(out, endpoint)
            raise _no_images_error(source, out, summary["skipped"], f"nothing was written to {out}")
        summary.update(summary_extra or {})

        write_summary(out, summary, endpoint=endpoint)
        _merge_index(out, [part_name(i) for i in range(summary["num_parts"])], endpoint)
    log.info(
        "prepared %s: %d images, %d classes, %d skipped, %.1f MB",
        out,
        summary["num_images"],
        summary["num_classes"],
        summary["num_skipped"],
        summary["bytes"] / 1e6,
    )
    return summary


def _convert(
    src,
    out: str,
    plan: dict[str, Any],
    token: str,
    *,
    workers: int,
    progress: bool,
    endpoint: str | None,
    staging_dir: str | None,
    started: float,
) -> dict[str, Any]:
    """Convert the parts of ``plan`` not yet done at ``out``; the summary of all parts."""
    part_size, size = plan["part_size"], plan["image_size"]
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
            plan["image_format"],
            plan["compression"],
            plan["shard_size_limit"],
            staging_root,
            endpoint,
            token,
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
    return _summarise(plan, markers, started)


def _run_tasks(tasks: list[PartTask], *, workers: int, progress: bool, total: int, desc: str) -> None:
    from tqdm.auto import tqdm  # deferred: heavy import

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
        max_workers=min(workers, len(tasks)),
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(queue, os.getpid()),
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
    renamed: list[dict[str, str]] = []
    for marker in markers:
        for label, n in marker["class_counts"].items():
            counts[int(label)] += n
        skipped += marker["skipped"]
        renamed += marker.get("renamed", [])  # parts written before renaming existed have none
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
        "num_renamed": len(renamed),
        "renamed": renamed,
        "created": _now(),
        "seconds": round(time.time() - started, 3),
    }

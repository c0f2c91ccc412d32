"""Stream a prepared dataset into training batches (mosaicml-streaming), resumable mid-epoch.

Interface used by training::

    loader = build_loader(uri, micro_batch=B, rank=r, world_size=n, seed=s)
    loader.load_state_dict(state)            # optional: resume where a checkpoint left off
    for epoch in range(...):
        for images, labels in loader:        # images (B, 3, S, S) float32, labels (B,) int64
            ...
            state = loader.state_dict()      # save inside the checkpoint

Terms:
- *micro batch*: samples per rank per step (``micro_batch``); the global batch is
  ``micro_batch * world_size`` (times gradient accumulation, which the trainer owns).
- *epoch*: one pass of the (optionally resampled, ``epoch_size``) dataset split over all ranks:
  each rank sees ``len(dataset) / world_size`` samples, disjoint from the other ranks' samples.
- *loader state*: ``{"epoch", "sample_in_epoch", "num_canonical_nodes", "shuffle_seed", ...}`` from
  ``StreamingDataLoader.state_dict``: global samples consumed in the current epoch. Restored with
  ``load_state_dict`` before iterating, the next epoch iteration starts at the next unseen sample
  (no repeats, no gaps), on any number of ranks that divides the same canonical node count.
- *local cache*: the folder shards are downloaded (and decompressed) into. One per run: ranks on a
  node share it (streaming coordinates them through shared memory); a fresh temporary folder is
  made when ``local_cache`` is None and removed when the process exits.

Images are normalised with ``fractalgen.models.configs.IMAGENET_MEAN/IMAGENET_STD``
(docs/model.md#notation): ``x = (pixel / 255 - mean) / std``; the random horizontal flip of the
released recipe is a deterministic function of (``seed``, epoch, sample id), so a resumed run flips
as the original would. Decoding and flipping happen in DataLoader workers on uint8; normalisation in
the main process on whole batches.

Distributed setup: streaming reads the rank layout only from the ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` environment variables (Ray Train's torch backend and
torchrun set them). ``build_loader`` checks that they agree with the ``rank``/``world_size`` passed
(``DataError`` if not) and sets the missing ones; without ``LOCAL_*`` every rank counts as its own
node, with its own cache. With ``world_size > 1`` streaming synchronises ranks through
``torch.distributed`` (initialised by Ray Train / DeepSpeed; otherwise streaming initialises it from
``MASTER_ADDR``/``MASTER_PORT``), so every rank must call ``build_loader``.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fractalgen import storage
from fractalgen.pipelines import DataError
from fractalgen.pipelines.summary import read_summary

if TYPE_CHECKING:
    from streaming import StreamingDataLoader

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
_cleaned_shared_memory = False


def _flip_bit(seed: int, epoch: int, sample_id: int) -> bool:
    """A fair coin from (seed, epoch, sample id): splitmix64 of the combined key."""
    # Python ints (sample ids arrive as numpy int64, which would overflow)
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(sample_id) + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return bool((z ^ (z >> 31)) & 1)


def _dataset_class():
    from streaming import StreamingDataset  # deferred: heavy import

    class ImageDataset(StreamingDataset):
        """MDS samples -> ``(uint8 (3, S, S) tensor, label[, key])`` with the random flip."""

        def __init__(self, *, flip: bool, flip_seed: int, return_keys: bool, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.flip = flip
            self.flip_seed = flip_seed
            self.return_keys = return_keys

        # A shard download that fails after its retries (``storage.s3_max_attempts`` per request,
        # streaming's ``download_retry`` per shard) fails in streaming's download thread, which then
        # ends the epoch early *without an error*, and the next epoch raises "Background thread
        # failed"; and the shard stays marked as being downloaded, so every rank of the node that
        # needs it waits for it forever (while the failed rank waits for them in a collective). The
        # methods below mark the shard as no longer being downloaded (LOCAL, as streaming leaves a
        # shard whose file went missing: the next rank that reads it downloads it again, and fails
        # itself) and turn both into a DataError naming the shard.
        def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
            try:
                super().prepare_shard(shard_id, blocking)
            except Exception as err:
                self._forget_download(shard_id)
                raise self._shard_error(shard_id, err) from err

        def _forget_download(self, shard_id: int) -> None:
            from streaming.base.dataset import _ShardState  # deferred: heavy import

            lock = getattr(self, "_cache_filelock", None)
            if lock is None:
                return
            with lock:
                if self._shard_states[shard_id] == _ShardState.PREPARING:
                    # not REMOTE: a rank already waiting for this download waits for LOCAL only
                    self._shard_states[shard_id] = _ShardState.LOCAL

        def on_exception(self, future: Any) -> None:
            err = future.exception()
            if err is not None and getattr(self, "_download_error", None) is None:
                self._download_error = err
            super().on_exception(future)

        def __iter__(self) -> Iterator[Any]:
            failed = getattr(self, "_download_error", None)
            try:
                yield from super().__iter__()
            except RuntimeError as err:
                raise (failed or err) if "Background thread failed" in str(err) else err from None
            failed = getattr(self, "_download_error", None)
            if failed is not None:  # streaming cut the epoch short: not a finished epoch
                raise failed

        def _shard_error(self, shard_id: int, err: BaseException) -> BaseException:
            if isinstance(err, DataError):
                return err
            stream = self.streams[self.stream_per_shard[shard_id]]
            info = self.shards[shard_id].zip_data or self.shards[shard_id].raw_data
            where = os.path.join(stream.remote or stream.local, stream.split or "", info.basename)
            return DataError(
                f"cannot fetch shard {where} of the dataset: {storage.s3_error_reason(err)}; the "
                "samples after it were not read (rerun or resume once the store answers)"
            )

        def get_item(self, sample_id: int, retry: int = 7) -> Any:
            sample = super().get_item(sample_id, retry)
            image = sample["image"]
            arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)  # (S, S, 3)
            if self.flip and _flip_bit(self.flip_seed, max(self.next_epoch - 1, 0), sample_id):
                arr = arr[:, ::-1]
            chw = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (3, S, S) uint8
            label = int(sample["label"])
            if self.return_keys:
                return chw, label, sample["key"]
            return chw, label

    return ImageDataset


def _loader_class():
    from streaming import StreamingDataLoader  # deferred: heavy import

    from fractalgen.models.configs import IMAGENET_MEAN, IMAGENET_STD  # deferred: heavy import

    class FractalLoader(StreamingDataLoader):
        """``StreamingDataLoader`` yielding normalised float32 ``(B, 3, S, S)`` images and int64 labels.

        ``state_dict()`` / ``load_state_dict(state)`` come from ``StreamingDataLoader``;
        ``summary`` is the dataset's summary dict (``summary.read_summary``) or None; ``uri`` the
        dataset; ``local_cache`` the folder the shards are read from (the dataset itself for an
        uncompressed local dataset).
        """

        uri: str
        summary: dict[str, Any] | None
        local_cache: str

        def __iter__(self) -> Iterator[Any]:
            # (1, 3, 1, 1) so they broadcast over (B, 3, S, S); scaled by 255 to normalise uint8 directly
            mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
            std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
            for batch in super().__iter__():
                images = (batch[0].to(torch.float32) - mean) / std  # (B, 3, S, S)
                labels = batch[1].to(torch.int64)  # (B,)
                if len(batch) > 2:
                    yield images, labels, list(batch[2])
                else:
                    yield images, labels

    return FractalLoader


def _setup_world(
    rank: int, world_size: int, local_rank: int | None, local_world_size: int | None
) -> tuple[int, int]:
    """Make streaming's env-based rank detection agree with the arguments; returns (local_rank, local_world_size)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"invalid rank {rank} for world_size {world_size}")
    env = os.environ
    for name, value in (("RANK", rank), ("WORLD_SIZE", world_size)):
        if name in env and int(env[name]) != value:
            raise DataError(f"{name}={env[name]} in the environment but {name.lower()}={value} was passed")
    if local_world_size is None:
        local_world_size = int(env.get("LOCAL_WORLD_SIZE", 1))
    if local_rank is None:
        local_rank = int(env.get("LOCAL_RANK", rank % local_world_size))
    for name, value in (("LOCAL_RANK", local_rank), ("LOCAL_WORLD_SIZE", local_world_size)):
        if name in env and int(env[name]) != value:
            raise DataError(f"{name}={env[name]} in the environment but {value} was passed")
    if world_size % local_world_size or not 0 <= local_rank < local_world_size:
        raise DataError(
            f"inconsistent layout: world_size={world_size}, local_world_size={local_world_size}, "
            f"local_rank={local_rank}"
        )
    env["RANK"] = str(rank)
    env["WORLD_SIZE"] = str(world_size)
    env["LOCAL_RANK"] = str(local_rank)
    env["LOCAL_WORLD_SIZE"] = str(local_world_size)
    return local_rank, local_world_size


def _run_token(uri: str, world_size: int, local_world_size: int) -> str:
    """A name shared by the ranks of one run, for the cache folder they share."""
    import torch.distributed as dist  # deferred: heavy import

    if local_world_size == 1:
        return uuid.uuid4().hex[:12]
    if dist.is_available() and dist.is_initialized():
        token = [uuid.uuid4().hex[:12] if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(token, src=0)
        return str(token[0])
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("FRACTALGEN_RUN_ID")
    if not run_id and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        run_id = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if not run_id:
        raise DataError(
            "several ranks per node but no torch.distributed group or run id to agree on a cache "
            "folder: pass local_cache= (the same on every rank of a node, unique per run)"
        )

    return hashlib.sha256(f"{run_id}|{uri}|{world_size}".encode()).hexdigest()[:12]


def _cache_name(uri: str) -> str:
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:10]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in storage.basename(uri))[:40]
    return f"{name}-{digest}"


def _check_dataset(uri: str, endpoint: str | None) -> dict[str, Any]:
    """Read the merged index, check every shard file exists; DataError naming the URI otherwise."""
    index_uri = storage.join(uri, "index.json")
    try:
        index = storage.read_json(index_uri, endpoint=endpoint)
    except FileNotFoundError:
        hint = ""
        if storage.exists(storage.join(uri, "_prepare", "plan.json"), endpoint=endpoint):
            hint = " (its conversion has not finished: run `fractalgen data prepare` again to resume)"
        raise DataError(f"no MDS dataset at {uri}: {index_uri} is missing{hint}") from None
    except Exception as err:
        raise DataError(f"cannot read {index_uri}: {type(err).__name__}: {err}") from err
    present = set(storage.list_files(uri, endpoint=endpoint))
    wanted = [(s.get("zip_data") or s["raw_data"])["basename"] for s in index.get("shards", [])]
    missing = [w for w in wanted if w not in present]
    if missing:
        raise DataError(
            f"dataset {uri} is missing {len(missing)} of {len(wanted)} shard files, e.g. "
            f"{storage.join(uri, missing[0])}"
        )
    if not wanted:
        raise DataError(f"dataset {uri} has no shards")
    return index


def build_loader(
    uri: str,
    *,
    micro_batch: int,
    rank: int,
    world_size: int,
    local_cache: str | None = None,
    shuffle: bool = True,
    seed: int = 0,
    flip: bool = True,
    num_workers: int = 0,
    epoch_size: int | None = None,
    drop_last: bool = True,
    local_rank: int | None = None,
    local_world_size: int | None = None,
    return_keys: bool = False,
    endpoint: str | None = None,
    clean_shared_memory: bool | None = None,
    predownload: int | None = None,
    cache_limit: int | str | None = None,
    pin_memory: bool = False,
) -> StreamingDataLoader:
    """A ``StreamingDataLoader`` over the prepared dataset at ``uri`` for this rank.

    Args:
        uri: dataset folder or ``s3://`` prefix (written by ``prepare.prepare_dataset``).
        micro_batch: samples per batch on this rank (also given to ``StreamingDataset``, which needs
            it for deterministic resumption).
        rank, world_size: this rank and the number of ranks (Ray Train: ``get_context()``).
        local_cache: shard cache root, shared by the ranks of a node and unique per run (each
            dataset gets a sub-folder, so train and eval loaders may share it); None makes a fresh
            temporary one (removed at exit).
        shuffle, seed: shuffle samples (streaming's py1e), seeded; ``seed`` also seeds the flip.
        flip: random horizontal flip (docs/model.md#training-recipe).
        num_workers: DataLoader worker processes (decoding happens there).
        epoch_size: samples per epoch over all ranks (None: the dataset size).
        drop_last: drop a last partial batch.
        local_rank, local_world_size: ranks per node; default from the environment, else 1.
        return_keys: also yield the list of source keys of each batch (debugging, tests).
        endpoint: S3 endpoint (exported as ``S3_ENDPOINT_URL`` for streaming).
        clean_shared_memory: run streaming's ``clean_stale_shared_memory()`` (once per process)
            before building. Default: only when ``local_cache`` is given, since a reused cache folder
            can collide with shared memory left by a crashed run; it also removes the shared memory
            of other live streaming runs on this node, so leave it off when runs share a node.
        predownload, cache_limit: passed to ``StreamingDataset``.
        pin_memory: passed to the DataLoader (page-locked batches for faster host-to-GPU copies).

    Returns a ``FractalLoader`` (a ``StreamingDataLoader``) yielding ``(images, labels)``:
    float32 ``(B, 3, S, S)`` normalised, int64 ``(B,)``; plus ``keys`` if ``return_keys``.
    Raises ``DataError`` if ``uri`` holds no complete dataset or the rank layout is inconsistent.
    """
    global _cleaned_shared_memory
    storage.check_scheme(uri)
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be positive, got {micro_batch}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    storage.export_streaming_endpoint(endpoint)
    index = _check_dataset(uri, endpoint)
    try:
        summary: dict[str, Any] | None = read_summary(uri, endpoint=endpoint)
    except DataError:
        summary = None
    local_rank, local_world_size = _setup_world(rank, world_size, local_rank, local_world_size)

    compressed = any(s.get("zip_data") for s in index["shards"])
    owns_cache = local_cache is None
    if local_cache is None:
        token = _run_token(uri, world_size, local_world_size)
        local_cache = os.path.join(tempfile.gettempdir(), f"fractalgen-stream-{token}")
    # One sub-folder per dataset, so a run can give its train and eval loaders the same cache root.
    dataset_cache = os.path.join(local_cache, _cache_name(uri))
    if storage.is_remote(uri):
        remote, local = uri, dataset_cache
    elif compressed:
        remote, local = os.path.abspath(storage.local_path(uri)), dataset_cache  # decompress into the cache
    else:
        remote, local = None, os.path.abspath(storage.local_path(uri))  # read the shards in place
        owns_cache = False
    if owns_cache and local_rank == 0:
        atexit.register(shutil.rmtree, local_cache, ignore_errors=True)

    if clean_shared_memory is None:
        clean_shared_memory = not owns_cache and remote is not None
    if clean_shared_memory and not _cleaned_shared_memory:
        from streaming.base.util import clean_stale_shared_memory  # deferred: heavy import

        clean_stale_shared_memory()
        _cleaned_shared_memory = True

    dataset = _dataset_class()(
        remote=remote,
        local=local,
        batch_size=micro_batch,
        shuffle=shuffle,
        shuffle_seed=seed,
        epoch_size=epoch_size,
        predownload=predownload,
        cache_limit=cache_limit,
        flip=flip,
        flip_seed=seed,
        return_keys=return_keys,
    )
    loader = _loader_class()(
        dataset,
        batch_size=micro_batch,
        num_workers=num_workers,
        drop_last=drop_last,
        persistent_workers=False,
        pin_memory=pin_memory,
    )
    loader.uri = uri
    loader.summary = summary
    loader.local_cache = local
    log.debug(
        "loader %s rank %d/%d: %d samples per rank, cache %s", uri, rank, world_size, len(dataset), local
    )
    return loader

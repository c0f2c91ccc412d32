"""The checkpoints of a running job (``Checkpointer``): which one a worker resumes from, loading it,
writing one (``report_and_checkpoint``), pruning old ones and naming the latest complete one.

The layout of a checkpoint folder ``<storage_path>/<name>/checkpoint_<step>`` (every rank adds its own
files; Ray merges them): ``deepspeed/`` (DeepSpeed's shards: model states on rank 0, or on every rank
under ZeRO-3, one optimizer partition per rank), ``latest``, ``run.yaml`` (the resolved config),
``plan.json``, ``run_state.json``, ``manifest/rank_<r>.json``, ``samples/rank_<r>.json`` (with
``data.record_samples``), ``samples.png`` (when an evaluation ran at that step), and ``state.json``
(the run state again), written by rank 0 last, once every rank's files are stored: a checkpoint folder
without it is incomplete.

*Resume*: only from ``ray.train.get_checkpoint()``: Ray hands the latest checkpoint to a worker group
restarted after a failure and to a run relaunched with the same name. A fresh run may start from
another run's checkpoint (``checkpoint.init_from``).
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import json
import os
import pickle
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fractalgen import storage
from fractalgen.config import dumps, from_dict, to_dict
from fractalgen.platform.artifacts.checkpoints import OPTIMIZER_FILE_GLOBALS
from fractalgen.platform.artifacts.run_plan import DS_TAG, STATE_FILE, WorkerPlan
from fractalgen.platform.training.metrics_logger import say

# the run state inside the files every rank uploads; STATE_FILE, the same content, is written by rank 0
# once every rank's upload has finished, so a checkpoint with STATE_FILE is complete (readers require
# it: checkpointing.resolve_checkpoint); a checkpoint Ray restores may predate it, hence this copy
UPLOADED_STATE_FILE = "run_state.json"
CONFIG_FILE = "run.yaml"
SAMPLES_PNG = "samples.png"
# manifest/rank_<r>.json: the size of every file rank r put in a checkpoint; a resume checks them
# (complete_checkpoint), so a truncated or deleted shard is named instead of failing inside DeepSpeed
MANIFEST_DIR = "manifest"


@dataclass(kw_only=True)
class RunState:
    """What a checkpoint records besides the DeepSpeed shards (``state.json``)."""

    step: int = 0
    samples_seen: int = 0  # images trained on, over all workers
    loader: dict[str, Any] | None = None  # StreamingDataLoader.state_dict() (global position)
    best_loss: float | None = None
    best_step: int | None = None
    resumed_from: list[int] = field(default_factory=list)
    # one entry per log point: step, loss (mean over workers and steps since the last one), lr
    history: list[dict[str, float]] = field(default_factory=list)


# PyTorch: when set, every torch.load is weights_only (deepspeed_loads_weights_only)
FORCE_WEIGHTS_ONLY_VAR = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:09d}"


@contextlib.contextmanager
def deepspeed_loads_weights_only() -> Iterator[None]:
    """Make DeepSpeed's own ``torch.load(weights_only=False)`` calls safe for the duration.

    ``engine.load_checkpoint`` unpickles its files fully. PyTorch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``
    turns every ``torch.load`` into a ``weights_only`` one, and the allow-list is the real DeepSpeed
    types named by ``checkpointing.OPTIMIZER_FILE_GLOBALS`` (the only globals its files hold), so a
    resumed or ``checkpoint.init_from`` checkpoint runs no code from its files either.
    """
    import torch  # deferred: heavy import

    allowed = []
    for _, name in OPTIMIZER_FILE_GLOBALS:
        module, qualname = name.rsplit(".", 1)
        allowed.append(getattr(importlib.import_module(module), qualname))
    previous = os.environ.get(FORCE_WEIGHTS_ONLY_VAR)
    os.environ[FORCE_WEIGHTS_ONLY_VAR] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY_VAR, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY_VAR] = previous


def _refused_files(folder: str, err: BaseException) -> str:
    """Which DeepSpeed files of ``folder`` safe loading refused, and why (read from the pickles'
    opcodes: nothing is executed)."""
    from fractalgen.models.checkpoint import load_failure  # deferred: heavy import (torch)

    reasons = []
    for path in sorted(glob.glob(os.path.join(folder, DS_TAG, "*.pt"))):
        reason = load_failure(path, err, OPTIMIZER_FILE_GLOBALS)
        if "refuses" in reason:
            reasons.append(f"{path}: {reason}")
    return "; ".join(reasons) or load_failure(folder, err)


class CheckpointDamaged(RuntimeError):
    """A checkpoint's files differ from what its ranks wrote (``MANIFEST_DIR``); the message names them."""


def _write_manifest(folder: str, rank: int) -> None:
    """This rank's files in the checkpoint folder ``folder`` and their sizes (``MANIFEST_DIR``)."""
    sizes = {}
    for root, _dirs, names in os.walk(folder):
        for n in names:
            path = os.path.join(root, n)
            sizes[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
    os.makedirs(os.path.join(folder, MANIFEST_DIR), exist_ok=True)
    with open(os.path.join(folder, MANIFEST_DIR, f"rank_{rank}.json"), "w") as f:
        json.dump(sizes, f, indent=0, sort_keys=True)


def checkpoint_damage(checkpoint: Any, world: int) -> list[str]:
    """What is wrong with a ``ray.train.Checkpoint``'s files against its ranks' manifests: missing
    files and files of another size, each named. [] when nothing is, and for a checkpoint written
    before manifests existed. Sizes only: a truncated or deleted file, not flipped bits."""
    import pyarrow.fs as pafs  # deferred: heavy import

    fs, root = checkpoint.filesystem, checkpoint.path.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    sizes = {i.path[len(root) + 1 :]: i.size for i in infos if i.type == pafs.FileType.File}
    if not any(p.startswith(MANIFEST_DIR + "/") for p in sizes):
        return []
    problems = []
    for r in range(world):
        name = f"{MANIFEST_DIR}/rank_{r}.json"
        try:
            with fs.open_input_stream(f"{root}/{name}") as f:
                written = json.loads(f.read())
        except (OSError, ValueError) as err:
            problems.append(f"{name} cannot be read ({type(err).__name__})")
            continue
        for rel, size in sorted(written.items()):
            if rel not in sizes:
                problems.append(f"{rel} is missing")
            elif sizes[rel] != size:
                problems.append(f"{rel} has {sizes[rel]} bytes, {size} were written")
    return problems


def complete_checkpoint(checkpoint: Any, world: int, *, rank: int, fall_back: bool) -> Any:
    """``checkpoint`` if its files are all there (``checkpoint_damage``). Otherwise, with ``fall_back``
    (a resume of this run), the newest earlier complete checkpoint of its run folder, announced with
    the damaged files; else ``CheckpointDamaged`` naming them. Every rank reads the same files and
    so picks the same checkpoint."""
    import pyarrow.fs as pafs  # deferred: heavy import
    import ray.train  # deferred: heavy import

    problems = checkpoint_damage(checkpoint, world)
    if not problems:
        return checkpoint
    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, name = path.rsplit("/", 1)
    damaged = f"checkpoint {path} is damaged: {'; '.join(problems[:5])}"
    if fall_back:
        infos = fs.get_file_info(pafs.FileSelector(parent))
        earlier = sorted(
            (i.base_name for i in infos if i.type == pafs.FileType.Directory),
            reverse=True,
        )
        for other in (n for n in earlier if n.startswith("checkpoint_") and n < name):
            candidate = ray.train.Checkpoint(path=f"{parent}/{other}", filesystem=fs)
            complete = fs.get_file_info(f"{parent}/{other}/{STATE_FILE}").type == pafs.FileType.File
            if complete and not checkpoint_damage(candidate, world):
                if rank == 0:
                    say(f"[fractalgen] WARNING: {damaged}; resuming from the previous complete one, {other}")
                return candidate
    raise CheckpointDamaged(
        f"{damaged}; "
        + ("no earlier complete checkpoint in its run folder" if fall_back else "restore these files")
    )


def load_checkpoint(engine: Any, loader: Any, checkpoint: Any, *, rank: int) -> tuple[RunState, list[Any]]:
    """Restore the engine (weights, optimizer, lr schedule), the loader position and the run state."""
    with checkpoint.as_directory() as folder:
        try:
            with deepspeed_loads_weights_only():
                engine.load_checkpoint(folder, tag=DS_TAG, load_module_strict=True)
        except pickle.UnpicklingError as err:
            raise RuntimeError(f"checkpoint {folder} refused: {_refused_files(folder, err)}") from None
        state_file = os.path.join(folder, STATE_FILE)
        if not os.path.exists(state_file):  # uploaded, but its completion not yet marked (see above)
            state_file = os.path.join(folder, UPLOADED_STATE_FILE)
        with open(state_file) as f:
            raw = json.load(f)
        state = from_dict(RunState, raw)
        samples_file = os.path.join(folder, "samples", f"rank_{rank}.json")
        ledger: list[Any] = []
        if os.path.exists(samples_file):
            with open(samples_file) as f:
                ledger = json.load(f)
    if state.loader is not None:
        loader.load_state_dict(state.loader)
    return state, ledger


def report_and_checkpoint(
    engine: Any,
    plan: WorkerPlan,
    state: RunState,
    metrics: dict[str, Any],
    *,
    rank: int,
    ledger: list[Any] | None,
    samples_png: bytes | None,
) -> str:
    """Every rank: DeepSpeed shards + run files into a temporary folder, then ``ray.train.report``;
    once every rank's upload has finished, rank 0 publishes ``STATE_FILE``.

    Returns the checkpoint's storage URI (``<run folder>/checkpoint_<step>``).
    """
    import ray.train  # deferred: heavy import
    import torch.distributed as dist  # deferred: heavy import

    name = checkpoint_dir_name(state.step)
    with tempfile.TemporaryDirectory(prefix="fractalgen-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG)
        if ledger is not None:
            os.makedirs(os.path.join(tmp, "samples"), exist_ok=True)
            with open(os.path.join(tmp, "samples", f"rank_{rank}.json"), "w") as f:
                json.dump(ledger, f)
        if rank == 0:
            with open(os.path.join(tmp, UPLOADED_STATE_FILE), "w") as f:
                json.dump(to_dict(state), f, indent=1)
            with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                f.write(dumps(plan.config))
            with open(os.path.join(tmp, "plan.json"), "w") as f:
                json.dump(to_dict(plan), f, indent=1)
            if samples_png is not None:
                with open(os.path.join(tmp, SAMPLES_PNG), "wb") as f:
                    f.write(samples_png)
        _write_manifest(tmp, rank)
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name
        )
    # A rank whose upload failed raised above and never gets here: the state stays unpublished.
    if dist.is_initialized():
        dist.barrier()
    uri = storage.join(plan.run_uri, name)
    if rank == 0:
        storage.write_json(storage.join(uri, STATE_FILE), to_dict(state), endpoint=plan.storage_endpoint)
    return uri


def prune_checkpoints(plan: WorkerPlan, state: RunState) -> list[str]:
    """Rank 0: delete checkpoints other than the latest ``keep_last`` and the best. Returns deleted names."""
    ck = plan.config.checkpoint
    names = sorted(
        n
        for n in storage.list_dirs(plan.run_uri, endpoint=plan.storage_endpoint)
        if n.startswith("checkpoint_")
    )
    keep = set(names[-ck.keep_last :])
    if ck.keep_best and state.best_step is not None:
        keep.add(checkpoint_dir_name(state.best_step))
    deleted = [n for n in names if n not in keep and int(n.split("_")[-1]) < state.step]
    for n in deleted:
        storage.delete_tree(storage.join(plan.run_uri, n), endpoint=plan.storage_endpoint)
    return deleted


def latest_checkpoint_uri(plan: WorkerPlan) -> str | None:
    """The run folder's latest complete checkpoint (one with ``STATE_FILE``), or None."""
    names = [
        n
        for n in storage.list_dirs(plan.run_uri, endpoint=plan.storage_endpoint)
        if n.startswith("checkpoint_")
    ]
    for name in sorted(names, reverse=True):  # the latest complete one (report_and_checkpoint)
        uri = storage.join(plan.run_uri, name)
        if storage.exists(storage.join(uri, STATE_FILE), endpoint=plan.storage_endpoint):
            return uri
    return None


class Checkpointer:
    """One worker's side of the run's checkpoints: what it starts from, what it writes, what it prunes.

    Every rank holds one and calls ``save`` at the same steps (``report_and_checkpoint`` is
    collective); rank 0 alone prunes.
    """

    def __init__(self, plan: WorkerPlan, *, rank: int, world: int) -> None:
        self.plan = plan
        self.rank = rank
        self.world = world
        self.last_uri: str | None = None  # the checkpoint this worker process wrote last

    def find(self) -> Any:
        """The ``ray.train.Checkpoint`` to start from (Ray's latest of this run, else
        ``checkpoint.init_from``), its files checked (``complete_checkpoint``); None for a fresh start."""
        import ray.train  # deferred: heavy import

        ck = self.plan.config.checkpoint
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and ck.init_from:
            fs, path = storage.pyarrow_filesystem(
                ck.init_from, endpoint=ck.s3_endpoint_url or self.plan.storage_endpoint
            )
            checkpoint = ray.train.Checkpoint(path=path, filesystem=fs)
            return complete_checkpoint(checkpoint, self.world, rank=self.rank, fall_back=False)
        if checkpoint is not None:
            return complete_checkpoint(checkpoint, self.world, rank=self.rank, fall_back=True)
        return None

    def resume(self, engine: Any, loader: Any, checkpoint: Any) -> tuple[RunState, list[Any]]:
        """Restore engine, loader and run state from ``checkpoint``; the current recipe's
        hyper-parameters apply from here on. Returns the run state and this rank's sample ledger."""
        from fractalgen.platform.training.engine import apply_hyperparameters  # deferred: heavy import

        state, ledger = load_checkpoint(engine, loader, checkpoint, rank=self.rank)
        apply_hyperparameters(engine, self.plan.config, step=state.step)
        state.resumed_from.append(state.step)
        if self.rank == 0:
            say(f"[fractalgen] resumed at step {state.step} ({state.samples_seen} images seen)")
        return state, ledger

    def save(
        self,
        engine: Any,
        loader: Any,
        state: RunState,
        metrics: dict[str, Any],
        *,
        ledger: list[Any] | None,
        samples_png: bytes | None,
    ) -> tuple[str, list[str]]:
        """Collective: the checkpoint of ``state.step`` (best loss and loader position updated first),
        reported to Ray with ``metrics``; then rank 0 prunes. Returns the checkpoint's URI and the
        names rank 0 deleted."""
        loss = metrics["loss"]
        if state.best_loss is None or loss < state.best_loss:
            state.best_loss, state.best_step = loss, state.step
        state.loader = loader.state_dict()
        uri = report_and_checkpoint(
            engine, self.plan, state, metrics, rank=self.rank, ledger=ledger, samples_png=samples_png
        )
        self.last_uri = uri
        return uri, prune_checkpoints(self.plan, state) if self.rank == 0 else []

    def best_uri(self, state: RunState) -> str | None:
        if state.best_step is None:
            return None
        return self.plan.run_uri.rstrip("/") + "/" + checkpoint_dir_name(state.best_step)

    def last_good_uri(self) -> str | None:
        """The checkpoint this process wrote last, else the run folder's latest complete one."""
        return self.last_uri or latest_checkpoint_uri(self.plan)

"""The training loop that Ray Train runs on every worker (``train_loop_per_worker``).

Data flow: MDS shards -> streaming loader -> model loss -> DeepSpeed engine (ZeRO) -> every
``checkpoint.every_steps``: DeepSpeed shards + run state -> ``ray.train.report`` -> storage;
rank 0 -> MLflow.

Terms:
- *plan* (``WorkerPlan``): the resolved config plus what the driver derived from it (dataset size,
  steps per epoch, MLflow run id). It is the only thing a worker receives (nothing reaches a worker
  as a module global).
- *run state* (``RunState``, ``state.json``): step, images seen, the loader position, the best
  loss, the steps this run restarted from, and the logged history.
- *checkpoint folder* ``<storage_path>/<name>/checkpoint_<step>`` (every rank adds its own files;
  Ray merges them): ``deepspeed/`` (DeepSpeed's shards: model states on rank 0, or on every rank
  under ZeRO-3, one optimizer partition per rank), ``latest``, ``run.yaml`` (the resolved config),
  ``run_state.json``, ``samples/rank_<r>.json`` (with ``data.record_samples``), ``samples.png`` (when
  an evaluation ran at that step), and ``state.json`` (the run state again), written by rank 0 last,
  once every rank's files are stored: a checkpoint folder without it is incomplete.
- *resume*: only from ``ray.train.get_checkpoint()``: Ray hands the latest checkpoint to a worker
  group restarted after a failure and to a run relaunched with the same name. A fresh run may
  start from another run's checkpoint (``checkpoint.init_from``).

Determinism: the torch RNG is re-seeded before every micro-batch from (seed, rank, step, micro-batch)
and the loader's order and flips are functions of (seed, epoch, sample), so a resumed run computes
bit for bit what the uninterrupted run would have (same loss at the next step).

Host syncs (none per step): the loss and a non-finite flag accumulate on the device; they
are reduced over workers and read on the host only every ``train.log_every_steps`` steps and before
every checkpoint, so a checkpoint never holds weights updated with a non-finite loss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fractalgen.config import dumps, from_dict, to_dict
from fractalgen.platform.artifacts.run_plan import DS_TAG, STATE_FILE, WorkerPlan, build_run_model

log = logging.getLogger(__name__)

# the run state inside the files every rank uploads; STATE_FILE, the same content, is written by rank 0
# once every rank's upload has finished, so a checkpoint with STATE_FILE is complete (readers require
# it: checkpointing.resolve_checkpoint); a checkpoint Ray restores may predate it, hence this copy
UPLOADED_STATE_FILE = "run_state.json"
CONFIG_FILE = "run.yaml"
SAMPLES_PNG = "samples.png"
STATUS_FILE = "fractalgen_status.json"  # <run folder>/..., written by rank 0 when the loop ends
# manifest/rank_<r>.json: the size of every file rank r put in a checkpoint; a resume checks them
# (complete_checkpoint), so a truncated or deleted shard is named instead of failing inside DeepSpeed
MANIFEST_DIR = "manifest"
# opt-in audit (docs/operations.md): a file every rank appends to, one JSON line when it starts or
# resumes and one per step with the keys of the samples it trained on (bench/faults/training.py)
SAMPLE_LOG_ENV = "FRACTALGEN_SAMPLE_LOG"


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


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """A 63-bit torch seed for one micro-batch, a pure function of its coordinates."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}/{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _batches(loader: Any) -> Iterator[Any]:
    """The loader as an endless stream: a new epoch starts when one is exhausted.

    An epoch resumed exactly at its end yields nothing; two empty epochs in a row mean no data.
    """
    empty_before = False
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty and empty_before:
            raise RuntimeError("the data loader yields no batches (dataset smaller than one global batch?)")
        empty_before = empty


def _append_sample_log(path: str, record: dict[str, Any]) -> None:
    """One JSON line appended to ``SAMPLE_LOG_ENV``'s file with a single ``write`` (O_APPEND), so the
    lines of concurrent ranks never interleave on a local filesystem."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def _storage_fs(uri: str, endpoint: str | None):
    from fractalgen import storage

    return storage.pyarrow_filesystem(uri, endpoint=endpoint)


@contextlib.contextmanager
def deepspeed_loads_weights_only() -> Iterator[None]:
    """Make DeepSpeed's own ``torch.load(weights_only=False)`` calls safe for the duration.

    ``engine.load_checkpoint`` unpickles its files fully. PyTorch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``
    turns every ``torch.load`` into a ``weights_only`` one, and the allow-list is the real DeepSpeed
    types named by ``checkpointing.OPTIMIZER_FILE_GLOBALS`` (the only globals its files hold), so a
    resumed or ``checkpoint.init_from`` checkpoint runs no code from its files either.
    """
    import importlib

    import torch

    from fractalgen.platform.artifacts.checkpoints import OPTIMIZER_FILE_GLOBALS

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
    import glob

    from fractalgen.models.checkpoint import load_failure
    from fractalgen.platform.artifacts.checkpoints import OPTIMIZER_FILE_GLOBALS

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
    import pyarrow.fs as pafs

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
    import pyarrow.fs as pafs
    import ray.train

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
                    _say(f"[fractalgen] WARNING: {damaged}; resuming from the previous complete one, {other}")
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
    import ray.train
    import torch.distributed as dist

    from fractalgen import storage

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
    from fractalgen import storage

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


def write_status(plan: WorkerPlan, status: dict[str, Any]) -> None:
    """Rank 0: the outcome of the loop, read by the driver after ``fit`` (``STATUS_FILE``)."""
    from fractalgen import storage

    storage.write_json(storage.join(plan.run_uri, STATUS_FILE), status, endpoint=plan.storage_endpoint)


def grid_png(images: Any, pad: int = 2) -> bytes:
    """(N, 3, S, S) in [0, 1] -> PNG bytes of a near-square grid on white (PIL; torchvision's
    import alone costs seconds of CPU per worker)."""
    import io

    import numpy as np
    from PIL import Image

    n, _, s, _ = images.shape
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    pixels = (
        (images.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    )  # (N, S, S, 3)
    canvas = np.full((rows * (s + pad) + pad, cols * (s + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        y, x = pad + (i // cols) * (s + pad), pad + (i % cols) * (s + pad)
        canvas[y : y + s, x : x + s] = pixels[i]
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


class _Evaluator:
    """Rank 0's sampling copy of the model: class-conditional grid (PNG) and bits/dim."""

    def __init__(self, plan: WorkerPlan, device: Any) -> None:
        self.plan = plan
        self.device = device
        self.model: Any = None
        self.eval_loader: Any = None

    def __call__(self, state_dict: dict[str, Any]) -> tuple[bytes, dict[str, float]]:
        import torch

        cfg = self.plan.config
        if self.model is None:
            self.model = build_run_model(self.plan).to(self.device)
        self.model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
        self.model.eval()
        e = cfg.eval
        labels = torch.arange(e.num_images, device=self.device) % self.plan.num_classes
        images = self.model.sample(
            labels,
            num_iters=e.sample_iters,
            cfg=e.cfg if self.plan.num_classes > 1 else None,  # 1 class: unconditional, no guidance
            temperature=e.temperature,
            seed=e.seed,
        )  # (N, 3, S, S) in [0, 1]
        png = grid_png(images)
        metrics: dict[str, float] = {}
        if cfg.data.eval_uri:
            metrics["eval_bpd"] = self._nll()
        return png, metrics

    def _nll(self) -> float:
        from fractalgen.pipelines.loader import build_loader

        cfg = self.plan.config
        if self.eval_loader is None:
            # rank 0 alone reads the held-out set: a one-rank loader outside the process group
            self.eval_loader = build_loader(
                cfg.data.eval_uri,  # type: ignore[arg-type]
                micro_batch=cfg.train.micro_batch_per_gpu,
                rank=0,
                world_size=1,
                shuffle=False,
                flip=False,
                num_workers=0,
                endpoint=self.plan.data_endpoint,
                local_rank=0,
                local_world_size=1,
            )
        total, n = 0.0, 0
        # 10 passes for models with a MAR level, 1 for AR (docs/model.md#loss-and-nll)
        passes = 10 if "mar" in self.model.config.generators else 1
        for images, _labels in self.eval_loader:
            total += float(self.model.nll_bpd(images.to(self.device), num_passes=passes))
            n += 1
            if n >= cfg.eval.nll_batches:
                break
        return total / max(n, 1)


def _lean_streaming_import() -> None:
    """Import mosaicml-streaming without its dataset zoo.

    ``import streaming`` also imports ``streaming.text`` / ``vision`` / ``multimodal`` (C4, ImageNet
    ... classes pulling in scikit-learn, torchvision and tokenizers): about 3 s of CPU in every
    worker of every run. Training uses ``streaming.base`` only, so those three sub-packages get empty
    placeholder modules when nothing has imported them yet.
    """
    import types

    if "streaming" in sys.modules:
        return
    for name in ("streaming.text", "streaming.vision", "streaming.multimodal"):
        sys.modules.setdefault(name, types.ModuleType(name))


def _say(line: str) -> None:
    """One progress line on stdout. Not ``print``: Ray Train patches it to also log, which doubles
    every line on the driver's console."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _memory_gib(device: Any) -> dict[str, float]:
    import torch

    if device.type == "cuda":
        return {"gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    try:
        import psutil

        return {"host_rss_gib": psutil.Process().memory_info().rss / 2**30}
    except Exception:
        return {}


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry on every worker: build model, loader and engine, resume, train, checkpoint."""
    plan = from_dict(WorkerPlan, loop_config)
    cfg = plan.config
    use_gpu = cfg.cluster.gpus_per_worker > 0
    # DeepSpeed picks its accelerator at import; CPU runs must say so before the import
    os.environ["DS_ACCELERATOR"] = "cuda" if use_gpu else "cpu"

    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    _lean_streaming_import()
    from fractalgen import storage
    from fractalgen.models.layers import set_attention_impl
    from fractalgen.pipelines.loader import build_loader
    from fractalgen.platform.training.engine import apply_hyperparameters, full_state_dict, setup_engine
    from fractalgen.platform.training.finetune import freeze_levels, load_pretrained

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)

    set_attention_impl(cfg.model.attention)  # this worker process trains this run only
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every worker
    model = build_run_model(plan)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and cfg.checkpoint.init_from:
        fs, path = _storage_fs(
            cfg.checkpoint.init_from, cfg.checkpoint.s3_endpoint_url or plan.storage_endpoint
        )
        checkpoint = ray.train.Checkpoint(path=path, filesystem=fs)
        checkpoint = complete_checkpoint(checkpoint, world, rank=rank, fall_back=False)
    elif checkpoint is not None:
        checkpoint = complete_checkpoint(checkpoint, world, rank=rank, fall_back=True)
    # fine-tuning: pretrained weights before DeepSpeed partitions the model (a resumed run has its own)
    init_report = None
    if checkpoint is None and cfg.finetune.init:
        init_report = load_pretrained(
            model,
            cfg.finetune.init,
            plan.init_class_map,
            tracking_uri=plan.tracking_uri,
            endpoint=storage.endpoint_url(cfg.checkpoint.s3_endpoint_url),
        )
    frozen = freeze_levels(model, cfg.finetune.freeze_levels)
    sample_log = os.environ.get(SAMPLE_LOG_ENV) or None
    record_keys = cfg.data.record_samples or sample_log is not None
    engine = setup_engine(model, cfg, steps_per_epoch=plan.steps_per_epoch, use_gpu=use_gpu)
    loader = build_loader(
        cfg.data.train_uri,
        micro_batch=cfg.train.micro_batch_per_gpu,
        rank=rank,
        world_size=world,
        local_cache=cfg.data.local_cache,
        shuffle=cfg.data.shuffle,
        seed=cfg.train.seed,
        flip=cfg.data.flip,
        num_workers=cfg.data.loader_workers,
        endpoint=plan.data_endpoint,
        return_keys=record_keys,
        local_rank=ctx.get_local_rank(),
        local_world_size=ctx.get_local_world_size(),
    )

    state, ledger = RunState(), []
    if checkpoint is not None:
        state, ledger = load_checkpoint(engine, loader, checkpoint, rank=rank)
        apply_hyperparameters(engine, cfg, step=state.step)
        state.resumed_from.append(state.step)
        if rank == 0:
            _say(f"[fractalgen] resumed at step {state.step} ({state.samples_seen} images seen)")
    attempt = f"{os.getpid()}-{time.time_ns()}"  # this worker process's run of the loop
    if sample_log is not None:
        _append_sample_log(sample_log, {"attempt": attempt, "rank": rank, "start_step": state.step})

    tracker = None
    if rank == 0 and plan.mlflow_run_id and plan.tracking_uri:
        from fractalgen.platform.training.tracking import RunTracker

        tracker = RunTracker(plan.tracking_uri, plan.mlflow_run_id)
    if rank == 0 and init_report is not None:
        _record_init(plan, init_report, frozen, tracker)
    evaluator = _Evaluator(plan, device) if rank == 0 else None

    t = cfg.train
    accum = cfg.grad_accum_steps
    stream = _batches(loader)
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, micro-batches, non-finite
    interval_start, interval_step = time.perf_counter(), state.step
    last_metrics: dict[str, Any] = {}
    status: dict[str, Any] = {"status": "finished"}
    last_checkpoint_uri: str | None = None
    engine.train()

    def eval_due(step: int) -> bool:
        return step == plan.stop_step or (cfg.eval.every_steps > 0 and step % cfg.eval.every_steps == 0)

    while state.step < plan.stop_step:
        step_keys: list[str] = []
        for micro in range(accum):
            batch = next(stream)
            # seed after fetching: a DataLoader draws from the torch RNG when an epoch's iterator
            # starts, which a resumed run does at another step than the uninterrupted one
            torch.manual_seed(step_seed(t.seed, rank, state.step, micro))
            images, labels = batch[0], batch[1]
            if record_keys:
                step_keys.extend(batch[2])
            images = images.to(device, non_blocking=True)  # (B, 3, S, S)
            labels = labels.to(device, non_blocking=True)  # (B,)
            loss = engine(images, labels)
            engine.backward(loss)
            engine.step()
            detached = loss.detach().to(torch.float64)
            sums[0] += detached
            sums[1] += 1.0
            sums[2] += (~torch.isfinite(detached)).to(torch.float64)
        state.step += 1
        state.samples_seen += t.global_batch_size
        if cfg.data.record_samples:
            ledger.append([state.step, step_keys])
        if sample_log is not None:
            _append_sample_log(
                sample_log,
                {
                    "attempt": attempt,
                    "rank": rank,
                    "step": state.step,
                    "keys": step_keys,
                    "time": time.time(),
                },
            )

        checkpoint_due = state.step % cfg.checkpoint.every_steps == 0 or state.step == plan.stop_step
        if not (state.step % t.log_every_steps == 0 or checkpoint_due or eval_due(state.step)):
            continue

        # ---- log point: one reduction and one host sync for the whole interval
        reduced = sums.clone()
        dist.all_reduce(reduced)
        loss_sum, count, nonfinite = reduced.tolist()
        sums.zero_()
        if nonfinite > 0:
            status = {
                "status": "nonfinite_loss",
                "step": state.step,
                "after_step": interval_step,
                "last_good_checkpoint": last_checkpoint_uri or _latest_checkpoint_uri(plan),
            }
            if rank == 0:
                _say(
                    f"[fractalgen] ERROR: non-finite loss between steps {interval_step + 1} and "
                    f"{state.step}; stopping, the last good checkpoint is kept"
                )
            break
        now = time.perf_counter()
        elapsed = max(now - interval_start, 1e-9)
        steps_done = state.step - interval_step
        mean_loss = loss_sum / max(count, 1.0)
        lr = engine.get_lr()[0]
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        images_per_s = steps_done * t.global_batch_size / elapsed
        epoch = state.samples_seen / plan.num_images
        last_metrics = {
            "step": state.step,
            "epoch": epoch,
            "loss": mean_loss,
            # training loss in bits: the released loss weights the red channel (docs/model.md#loss-and-nll),
            # so this tracks but is not the NLL; eval_bpd is
            "bpd": mean_loss / math.log(2),
            "lr": lr,
            "grad_norm": grad_norm,
            "images_per_s": images_per_s,
            **_memory_gib(device),
        }
        state.history.append({"step": state.step, "loss": mean_loss, "lr": lr})
        if rank == 0:
            eta = (plan.stop_step - state.step) * elapsed / max(steps_done, 1)
            _say(
                f"[fractalgen] step {state.step}/{plan.stop_step} | epoch {epoch:.2f} | loss {mean_loss:.4f} | "
                f"bpd {mean_loss / math.log(2):.3f} | lr {lr:.2e} | gnorm {grad_norm:.3f} | "
                f"{images_per_s:.1f} img/s | eta {_format_eta(eta)}"
            )
            if tracker is not None:
                tracker.log_metrics({k: v for k, v in last_metrics.items() if k != "step"}, state.step)

        samples_png = None
        if eval_due(state.step):
            weights = full_state_dict(engine)  # collective (ZeRO-3 gathers); weights on rank 0 only
            if evaluator is not None and weights is not None:
                samples_png, eval_metrics = evaluator(weights)
                last_metrics.update(eval_metrics)
                if tracker is not None:
                    if eval_metrics:
                        tracker.log_metrics(eval_metrics, state.step)
                    with tempfile.TemporaryDirectory() as tmp:
                        path = os.path.join(tmp, f"samples_step_{state.step:09d}.png")
                        with open(path, "wb") as f:
                            f.write(samples_png)
                        tracker.log_artifact(path, "samples")
            del weights

        if checkpoint_due:
            if state.best_loss is None or mean_loss < state.best_loss:
                state.best_loss, state.best_step = mean_loss, state.step
            state.loader = loader.state_dict()
            last_checkpoint_uri = report_and_checkpoint(
                engine,
                plan,
                state,
                last_metrics,
                rank=rank,
                ledger=ledger if cfg.data.record_samples else None,
                samples_png=samples_png,
            )
            if rank == 0:
                deleted = prune_checkpoints(plan, state)
                if tracker is not None:
                    tags = {"checkpoint.latest": last_checkpoint_uri}
                    tags[f"checkpoint.step_{state.step:09d}"] = last_checkpoint_uri
                    if state.best_step is not None:
                        tags["checkpoint.best"] = (
                            plan.run_uri.rstrip("/") + "/" + checkpoint_dir_name(state.best_step)
                        )
                    for name in deleted:
                        tags[f"checkpoint.step_{name.split('_')[-1]}"] = "(pruned)"
                    tracker.set_tags(tags)
        interval_start, interval_step = time.perf_counter(), state.step

    if rank == 0:
        status.setdefault("step", state.step)
        status.setdefault("checkpoint", last_checkpoint_uri or _latest_checkpoint_uri(plan))
        status["resumed_from"] = state.resumed_from
        status["metrics"] = {k: v for k, v in last_metrics.items() if isinstance(v, int | float)}
        write_status(plan, status)
        if tracker is not None:
            tracker.set_tags({"fractalgen.status": status["status"]})
            tracker.close(timeout_s=30.0)
    if dist.is_initialized():
        dist.barrier()


def _record_init(plan: WorkerPlan, report: Any, frozen: list[str], tracker: Any) -> None:
    """Rank 0: the fine-tuning init report to the run folder and the MLflow run, and one line."""
    from fractalgen import storage
    from fractalgen.platform.training.finetune import INIT_REPORT_FILE, report_dict

    data = report_dict(report, frozen)
    storage.write_json(storage.join(plan.run_uri, INIT_REPORT_FILE), data, endpoint=plan.storage_endpoint)
    _say(f"[fractalgen] {report.summary()}; {len(frozen)} frozen")
    if tracker is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, INIT_REPORT_FILE)
            with open(path, "w") as f:
                json.dump(data, f, indent=1)
            tracker.log_artifact(path, "finetune")
        tracker.set_tags(
            {
                "finetune.source": report.source,
                "finetune.loaded": str(len(report.loaded)),
                "finetune.reinitialised": ", ".join(report.reinitialised) or "none",
                "finetune.mapped": ", ".join(report.mapped) or "none",
                "finetune.frozen": str(len(frozen)),
            }
        )


def _latest_checkpoint_uri(plan: WorkerPlan) -> str | None:
    from fractalgen import storage

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


__all__ = [
    "RunState",
    "WorkerPlan",
    "build_run_model",
    "load_checkpoint",
    "prune_checkpoints",
    "report_and_checkpoint",
    "step_seed",
    "train_loop_per_worker",
]

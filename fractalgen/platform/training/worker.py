"""The training loop that Ray Train runs on every worker (``train_loop_per_worker``).

Data flow: MDS shards -> streaming loader -> model loss -> DeepSpeed engine (ZeRO) -> every
``checkpoint.every_steps``: DeepSpeed shards + run state -> ``ray.train.report`` -> storage;
rank 0 -> MLflow. The loop is short; its named parts live in their own modules:

- ``train_step.TrainStep``: forward, backward and step per micro-batch, the loss sums, their
  reduction over workers and the non-finite check, the per-step sample records;
- ``metrics_logger.MetricsLogger``: the metrics of a log point, progress lines, MLflow;
- ``evaluator.Evaluator``: the sample grid and bits/dim at evaluation steps;
- ``checkpointer.Checkpointer``: resume (or ``checkpoint.init_from``), write, prune.

Terms:
- *plan* (``WorkerPlan``): the resolved config plus what the driver derived from it (dataset size,
  steps per epoch, MLflow run id). It is the only thing a worker receives (nothing reaches a worker
  as a module global).
- *run state* (``RunState``, ``state.json``): step, images seen, the loader position, the best
  loss, the steps this run restarted from, and the logged history.
- *log point*: a step after which the loss is reduced and read (every ``train.log_every_steps``,
  every checkpoint and every evaluation step).
- *outcome*: how the loop ended, the function's return value, which Ray Train hands the driver as
  ``Result.return_value`` (rank 0's): ``{"status": "finished" | "nonfinite_loss", "step",
  "checkpoint", "resumed_from", "metrics"}`` plus, after a non-finite loss, ``"after_step"`` (the
  last step known finite) and ``"last_good_checkpoint"``.
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass
from typing import Any

from fractalgen import storage
from fractalgen.config import from_dict
from fractalgen.platform.artifacts.run_plan import WorkerPlan, build_run_model
from fractalgen.platform.training.checkpointer import (
    Checkpointer,
    RunState,
)
from fractalgen.platform.training.evaluator import Evaluator
from fractalgen.platform.training.metrics_logger import MetricsLogger
from fractalgen.platform.training.train_step import TrainStep


def _lean_streaming_import() -> None:
    """Import mosaicml-streaming without its dataset zoo.

    ``import streaming`` also imports ``streaming.text`` / ``vision`` / ``multimodal`` (C4, ImageNet
    ... classes pulling in scikit-learn, torchvision and tokenizers): about 3 s of CPU in every
    worker of every run. Training uses ``streaming.base`` only, so those three sub-packages get empty
    placeholder modules when nothing has imported them yet.
    """

    if "streaming" in sys.modules:
        return
    for name in ("streaming.text", "streaming.vision", "streaming.multimodal"):
        sys.modules.setdefault(name, types.ModuleType(name))


@dataclass
class _Worker:
    """One worker's parts, built by ``_start``."""

    plan: WorkerPlan
    rank: int
    state: RunState
    engine: Any
    loader: Any
    train_step: TrainStep
    metrics: MetricsLogger
    evaluator: Evaluator
    checkpointer: Checkpointer


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's entry on every worker: build the parts, resume, train, evaluate, checkpoint.
    Returns the outcome (see the module docstring)."""
    w = _start(from_dict(WorkerPlan, loop_config))
    plan, state, cfg = w.plan, w.state, w.plan.config
    outcome: dict[str, Any] = {"status": "finished"}
    w.engine.train()
    while state.step < plan.stop_step:
        w.train_step(state.step)
        state.step += 1
        state.samples_seen += cfg.train.global_batch_size
        checkpoint_due = state.step % cfg.checkpoint.every_steps == 0 or state.step == plan.stop_step
        eval_due = w.evaluator.due(state.step)
        if not (state.step % cfg.train.log_every_steps == 0 or checkpoint_due or eval_due):
            continue
        interval = w.train_step.reduce()  # the log point: one reduction, one host sync
        if interval.nonfinite > 0:
            outcome = {
                "status": "nonfinite_loss",
                "step": state.step,
                "after_step": w.metrics.interval_step,
                "last_good_checkpoint": w.checkpointer.last_good_uri(),
            }
            w.metrics.nonfinite(state.step)
            break
        metrics = w.metrics.log_point(state.step, state.samples_seen, interval, w.engine)
        state.history.append({"step": state.step, "loss": metrics["loss"], "lr": metrics["lr"]})
        evaluation = w.evaluator.run(w.engine) if eval_due else None  # collective; (png, metrics) on rank 0
        if evaluation is not None:
            w.metrics.evaluation(state.step, *evaluation)
        if checkpoint_due:
            ledger = w.train_step.ledger if cfg.data.record_samples else None
            png = evaluation[0] if evaluation is not None else None
            uri, deleted = w.checkpointer.save(
                w.engine, w.loader, state, metrics, ledger=ledger, samples_png=png
            )
            w.metrics.checkpoint_tags(
                state.step, uri, w.checkpointer.best_uri(state), deleted
            )  # rank 0's MLflow
        w.metrics.start_interval(state.step)
    return _finish(w, outcome)


def _start(plan: WorkerPlan) -> _Worker:
    """Model, checkpoint to start from, fine-tuning init, engine, loader, run state, and the parts."""
    cfg = plan.config
    use_gpu = cfg.cluster.gpus_per_worker > 0
    # DeepSpeed picks its accelerator at import; CPU runs must say so before the import
    os.environ["DS_ACCELERATOR"] = "cuda" if use_gpu else "cpu"

    import ray.train  # deferred: heavy import
    import ray.train.torch  # deferred: heavy import
    import torch  # deferred: heavy import

    _lean_streaming_import()
    from fractalgen.models.layers import set_attention_impl  # deferred: heavy import
    from fractalgen.pipelines.loader import build_loader  # deferred: heavy import
    from fractalgen.platform.training.engine import setup_engine  # deferred: heavy import
    from fractalgen.platform.training.finetune import freeze_levels, load_pretrained  # deferred: heavy import

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)

    set_attention_impl(cfg.model.attention)  # this worker process trains this run only
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every worker
    model = build_run_model(plan)
    checkpointer = Checkpointer(plan, rank=rank, world=world)
    checkpoint = checkpointer.find()
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
        return_keys=TrainStep.records_keys(plan),
        local_rank=ctx.get_local_rank(),
        local_world_size=ctx.get_local_world_size(),
    )
    state, ledger = RunState(), []
    if checkpoint is not None:
        state, ledger = checkpointer.resume(engine, loader, checkpoint)
    train_step = TrainStep(
        plan, engine, loader, rank=rank, device=device, ledger=ledger, start_step=state.step
    )
    metrics = MetricsLogger(plan, rank=rank, device=device, start_step=state.step)
    if rank == 0 and init_report is not None:
        metrics.finetune_init(init_report, frozen)
    evaluator = Evaluator(plan, device, rank=rank)
    return _Worker(plan, rank, state, engine, loader, train_step, metrics, evaluator, checkpointer)


def _finish(w: _Worker, outcome: dict[str, Any]) -> dict[str, Any]:
    """The outcome completed (every rank builds the same one; Ray Train returns rank 0's), the MLflow
    status tag, and a last barrier so no rank leaves while another still writes."""
    import torch.distributed as dist  # deferred: heavy import

    outcome.setdefault("step", w.state.step)
    outcome.setdefault("checkpoint", w.checkpointer.last_good_uri())
    outcome["resumed_from"] = list(w.state.resumed_from)
    outcome["metrics"] = {k: v for k, v in w.metrics.last.items() if isinstance(v, int | float)}
    if w.rank == 0:
        w.metrics.finish(outcome["status"])
    if dist.is_initialized():
        dist.barrier()
    return outcome

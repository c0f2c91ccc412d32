"""In-training evaluation (``Evaluator``): at an evaluation step, rank 0 samples a class-conditional
grid (PNG) with a copy of the current weights and, with ``data.eval_uri``, measures bits/dim on the
held-out set with ``evaluation.data.evaluate_nll``, the same measurement as ``fractalgen eval nll``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from fractalgen.platform.artifacts.run_plan import WorkerPlan, build_run_model
from fractalgen.platform.images import grid_png

# streaming's rank layout: the training loader sets them to this worker's (_setup_world in
# fractalgen/pipelines/loader.py); rank 0's held-out loader is a one-rank one
_WORLD_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@contextlib.contextmanager
def one_rank_world() -> Iterator[None]:
    """For the duration, this process is a one-rank world to mosaicml-streaming; then this worker's
    rank again.

    Rank 0 alone reads the held-out set, but in a worker (a) the rank layout variables say
    otherwise, and a loader checks them against its arguments (a 2-worker run's ``WORLD_SIZE=2``
    refuses a one-rank loader), and streaming reads them when an epoch starts, so the training
    loader's next epoch must find this worker's layout back; (b) building a ``StreamingDataset``
    calls ``torch.distributed.barrier()`` whenever a process group exists, which the other ranks
    never join: rank 0 would wait for them forever. So the process group is hidden as well
    (``torch.distributed.is_initialized`` answers False) on rank 0: it runs no collective during
    an evaluation, and the other ranks wait for it in their next one.
    """
    import torch.distributed as dist  # deferred: heavy import

    saved = {k: os.environ.get(k) for k in _WORLD_VARS}
    is_initialized = dist.is_initialized
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.is_initialized = lambda: False
    try:
        yield
    finally:
        dist.is_initialized = is_initialized
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Evaluator:
    """The evaluation of one worker: on rank 0 a sampling copy of the model, built at the first
    evaluation; on the other ranks only their part of the collective weight gather."""

    def __init__(self, plan: WorkerPlan, device: Any, *, rank: int = 0) -> None:
        self.plan = plan
        self.device = device
        self.rank = rank
        self.model: Any = None

    def due(self, step: int) -> bool:
        """An evaluation runs at the last step and every ``eval.every_steps`` (0: the last only)."""
        every = self.plan.config.eval.every_steps
        return step == self.plan.stop_step or (every > 0 and step % every == 0)

    def run(self, engine: Any) -> tuple[bytes, dict[str, float]] | None:
        """Collective (every rank calls it): the grid and metrics of the engine's current weights on
        rank 0, None elsewhere."""
        from fractalgen.platform.training.engine import full_state_dict  # deferred: heavy import

        weights = full_state_dict(engine)  # ZeRO-3 gathers; the weights are on rank 0 only
        if self.rank != 0 or weights is None:
            return None
        return self(weights)

    def __call__(self, state_dict: dict[str, Any]) -> tuple[bytes, dict[str, float]]:
        """The grid (PNG) and ``{"eval_bpd"}`` (with ``data.eval_uri``) of the weights ``state_dict``."""
        import torch  # deferred: heavy import

        cfg = self.plan.config
        if self.model is None:
            self.model = build_run_model(self.plan).to(self.device)
        self.model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
        self.model.eval()
        e = cfg.eval
        labels = torch.arange(e.num_images, device=self.device) % self.plan.num_classes
        settings = e.sampling(unconditional=self.plan.num_classes == 1)  # 1 class: no guidance
        images = self.model.sample(labels, seed=e.seed, **settings.sample_kwargs())  # (N, 3, S, S) in [0, 1]
        png = grid_png(images, pad=2)
        metrics: dict[str, float] = {}
        if cfg.data.eval_uri:
            metrics["eval_bpd"] = self.nll()
        return png, metrics

    def nll(self) -> float:
        """Bits/dim of the model on the first ``eval.nll_batches`` micro-batches of ``data.eval_uri``:
        ``evaluate_nll``'s image-weighted mean, its MAR masks seeded (the same number for the same
        weights), 10 passes for models with a MAR level, 1 for AR (docs/model.md#loss-and-nll)."""
        from fractalgen.platform.evaluation.data import evaluate_nll  # deferred: heavy import (torch)

        cfg = self.plan.config
        micro = cfg.train.micro_batch_per_gpu
        with one_rank_world():  # rank 0 alone reads the held-out set
            result = evaluate_nll(
                self.model,
                cfg.data.eval_uri,  # type: ignore[arg-type]
                batch_size=micro,
                max_images=cfg.eval.nll_batches * micro,
                endpoint=self.plan.data_endpoint,
                progress=False,
            )
        return result["nll_bpd"]

"""One optimizer step of a training worker (``TrainStep``): forward, backward and DeepSpeed's step
over the micro-batches of gradient accumulation, the loss and non-finite flag summed on the device,
their reduction over workers at a log point, and the record of which samples each step trained on.

Determinism: the torch RNG is re-seeded before every micro-batch from (seed, rank, step, micro-batch)
and the loader's order and flips are functions of (seed, epoch, sample), so a resumed run computes
bit for bit what the uninterrupted run would have (same loss at the next step).

Host syncs (none per step): the sums stay on the device; they are reduced over workers and read on
the host only at log points (every ``train.log_every_steps`` steps and before every checkpoint), so
a checkpoint never holds weights updated with a non-finite loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fractalgen.platform.artifacts.run_plan import WorkerPlan

# opt-in audit (docs/operations.md): a file every rank appends to, one JSON line when it starts or
# resumes and one per step with the keys of the samples it trained on (bench/faults/training.py)
SAMPLE_LOG_ENV = "FRACTALGEN_SAMPLE_LOG"


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """A 63-bit torch seed for one micro-batch, a pure function of its coordinates."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}/{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def batches(loader: Any) -> Iterator[Any]:
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


@dataclass(frozen=True)
class Interval:
    """The losses since the last log point, summed over workers."""

    loss_sum: float
    count: float  # micro-batches
    nonfinite: float  # micro-batches whose loss was NaN or inf

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.count, 1.0)


class TrainStep:
    """Trains one step at a time and keeps the device-side loss sums of the current interval.

    ``ledger`` (with ``data.record_samples``: ``[step, keys]`` per step, saved with each checkpoint)
    and the ``SAMPLE_LOG_ENV`` audit record the keys of the samples each step trained on.
    """

    def __init__(
        self,
        plan: WorkerPlan,
        engine: Any,
        loader: Any,
        *,
        rank: int,
        device: Any,
        ledger: list[Any],
        start_step: int,
    ) -> None:
        import torch  # deferred: heavy import

        self.plan, self.engine, self.rank, self.device = plan, engine, rank, device
        self.ledger = ledger
        self.stream = batches(loader)
        self.sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, micro-batches, non-finite
        self.sample_log = os.environ.get(SAMPLE_LOG_ENV) or None
        self.record_keys = self.records_keys(plan)
        self.attempt = f"{os.getpid()}-{time.time_ns()}"  # this worker process's run of the loop
        if self.sample_log is not None:
            _append_sample_log(
                self.sample_log, {"attempt": self.attempt, "rank": rank, "start_step": start_step}
            )

    @staticmethod
    def records_keys(plan: WorkerPlan) -> bool:
        """Whether the loader must yield each sample's key (the ledger or the audit needs them)."""
        return plan.config.data.record_samples or bool(os.environ.get(SAMPLE_LOG_ENV))

    def __call__(self, step: int) -> None:
        """Train step ``step + 1``: ``grad_accum_steps`` micro-batches, each forward, backward and
        DeepSpeed's step (which updates the weights at the last one)."""
        import torch  # deferred: heavy import

        cfg = self.plan.config
        keys: list[str] = []
        for micro in range(cfg.grad_accum_steps):
            batch = next(self.stream)
            # seed after fetching: a DataLoader draws from the torch RNG when an epoch's iterator
            # starts, which a resumed run does at another step than the uninterrupted one
            torch.manual_seed(step_seed(cfg.train.seed, self.rank, step, micro))
            if self.record_keys:
                keys.extend(batch[2])
            images = batch[0].to(self.device, non_blocking=True)  # (B, 3, S, S)
            labels = batch[1].to(self.device, non_blocking=True)  # (B,)
            loss = self.engine(images, labels)
            self.engine.backward(loss)
            self.engine.step()
            detached = loss.detach().to(torch.float64)
            self.sums[0] += detached
            self.sums[1] += 1.0
            self.sums[2] += (~torch.isfinite(detached)).to(torch.float64)
        self._record(step + 1, keys)

    def _record(self, step: int, keys: list[str]) -> None:
        if self.plan.config.data.record_samples:
            self.ledger.append([step, keys])
        if self.sample_log is not None:
            record = {
                "attempt": self.attempt,
                "rank": self.rank,
                "step": step,
                "keys": keys,
                "time": time.time(),
            }
            _append_sample_log(self.sample_log, record)

    def reduce(self) -> Interval:
        """Collective: the interval's sums over all workers (one host sync); a new interval starts."""
        import torch.distributed as dist  # deferred: heavy import

        reduced = self.sums.clone()
        dist.all_reduce(reduced)
        self.sums.zero_()
        loss_sum, count, nonfinite = reduced.tolist()
        return Interval(loss_sum, count, nonfinite)

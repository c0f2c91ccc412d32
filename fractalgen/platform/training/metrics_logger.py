"""What a training worker tells people (``MetricsLogger``): the metrics of each log point, rank 0's
progress lines on stdout, and rank 0's MLflow metrics, sample grids and checkpoint tags (through
``tracking.RunTracker``, which never blocks the loop)."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from typing import Any

from fractalgen import storage
from fractalgen.platform.artifacts.run_plan import WorkerPlan
from fractalgen.platform.training.train_step import Interval


def say(line: str) -> None:
    """One progress line on stdout. Not ``print``: Ray Train patches it to also log, which doubles
    every line on the driver's console."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _memory_gib(device: Any) -> dict[str, float]:
    import torch  # deferred: heavy import

    if device.type == "cuda":
        return {"gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    try:
        import psutil  # deferred: heavy import

        return {"host_rss_gib": psutil.Process().memory_info().rss / 2**30}
    except Exception:
        return {}


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """The metrics of the interval since the last log point, and where they go.

    Every rank computes the same metrics (they are reduced over workers; only the memory figure is
    per rank): they are reported with each checkpoint and end up in the run's outcome. Rank 0 also
    prints them and logs them to MLflow when the run is tracked.
    """

    def __init__(self, plan: WorkerPlan, *, rank: int, device: Any, start_step: int) -> None:
        self.plan = plan
        self.rank = rank
        self.device = device
        self.tracker: Any = None
        if rank == 0 and plan.mlflow_run_id and plan.tracking_uri:
            from fractalgen.platform.training.tracking import RunTracker  # deferred: heavy import

            self.tracker = RunTracker(plan.tracking_uri, plan.mlflow_run_id)
        self.last: dict[str, Any] = {}  # the latest log point's metrics (plus evaluation's)
        self.start_interval(start_step)

    def start_interval(self, step: int) -> None:
        """The next interval (images/s, eta) starts now, after ``step``."""
        self.interval_start, self.interval_step = time.perf_counter(), step

    def log_point(self, step: int, samples_seen: int, interval: Interval, engine: Any) -> dict[str, Any]:
        """The metrics of the interval that ends at ``step`` (its losses summed over all workers);
        printed and logged by rank 0. Returns them (also kept as ``last``)."""
        plan, t = self.plan, self.plan.config.train
        elapsed = max(time.perf_counter() - self.interval_start, 1e-9)
        steps_done = step - self.interval_step
        mean_loss = interval.mean_loss
        lr = engine.get_lr()[0]
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        images_per_s = steps_done * t.global_batch_size / elapsed
        epoch = samples_seen / plan.num_images
        self.last = {
            "step": step,
            "epoch": epoch,
            "loss": mean_loss,
            # training loss in bits: the released loss weights the red channel (docs/model.md#loss-and-nll),
            # so this tracks but is not the NLL; eval_bpd is
            "bpd": mean_loss / math.log(2),
            "lr": lr,
            "grad_norm": grad_norm,
            "images_per_s": images_per_s,
            **_memory_gib(self.device),
        }
        if self.rank == 0:
            eta = (plan.stop_step - step) * elapsed / max(steps_done, 1)
            say(
                f"[fractalgen] step {step}/{plan.stop_step} | epoch {epoch:.2f} | loss {mean_loss:.4f} | "
                f"bpd {mean_loss / math.log(2):.3f} | lr {lr:.2e} | gnorm {grad_norm:.3f} | "
                f"{images_per_s:.1f} img/s | eta {_format_eta(eta)}"
            )
            if self.tracker is not None:
                self.tracker.log_metrics({k: v for k, v in self.last.items() if k != "step"}, step)
        return self.last

    def nonfinite(self, step: int) -> None:
        """Rank 0: the loss of the current interval was not finite; the loop stops."""
        if self.rank == 0:
            say(
                f"[fractalgen] ERROR: non-finite loss between steps {self.interval_step + 1} and "
                f"{step}; stopping, the last good checkpoint is kept"
            )

    def evaluation(self, step: int, samples_png: bytes, metrics: dict[str, float]) -> None:
        """An evaluation's metrics join the log point's; rank 0 logs them and the sample grid."""
        self.last.update(metrics)
        if self.tracker is None:
            return
        if metrics:
            self.tracker.log_metrics(metrics, step)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"samples_step_{step:09d}.png")
            with open(path, "wb") as f:
                f.write(samples_png)
            self.tracker.log_artifact(path, "samples")

    def checkpoint_tags(self, step: int, uri: str, best_uri: str | None, deleted: list[str]) -> None:
        """Rank 0 (the others have no tracker): the MLflow tags naming the latest, this step's and the
        best checkpoint, and the pruned ones."""
        if self.tracker is None:
            return
        tags = {"checkpoint.latest": uri, f"checkpoint.step_{step:09d}": uri}
        if best_uri is not None:
            tags["checkpoint.best"] = best_uri
        for name in deleted:
            tags[f"checkpoint.step_{name.split('_')[-1]}"] = "(pruned)"
        self.tracker.set_tags(tags)

    def finetune_init(self, report: Any, frozen: list[str]) -> None:
        """Rank 0: the fine-tuning init report to the run folder and the MLflow run, and one line."""
        from fractalgen.platform.training.finetune import (  # deferred: heavy import
            INIT_REPORT_FILE,
            report_dict,
        )  # deferred: heavy import

        plan = self.plan
        data = report_dict(report, frozen)
        storage.write_json(storage.join(plan.run_uri, INIT_REPORT_FILE), data, endpoint=plan.storage_endpoint)
        say(f"[fractalgen] {report.summary()}; {len(frozen)} frozen")
        if self.tracker is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, INIT_REPORT_FILE)
            with open(path, "w") as f:
                json.dump(data, f, indent=1)
            self.tracker.log_artifact(path, "finetune")
        self.tracker.set_tags(
            {
                "finetune.source": report.source,
                "finetune.loaded": str(len(report.loaded)),
                "finetune.reinitialised": ", ".join(report.reinitialised) or "none",
                "finetune.mapped": ", ".join(report.mapped) or "none",
                "finetune.frozen": str(len(frozen)),
            }
        )

    def finish(self, status: str) -> None:
        """Rank 0: the run's ``fractalgen.status`` tag, then every queued record delivered (30 s at most)."""
        if self.tracker is not None:
            self.tracker.set_tags({"fractalgen.status": status})
            self.tracker.close(timeout_s=30.0)

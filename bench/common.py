"""Shared benchmark plumbing: device and timing, FLOPs and MFU, the table and JSON lines.

MFU = achieved model FLOP/s / peak: model FLOPs per image come from the configuration
(``fractalgen.models.inspect.level_costs``, the paper's Table 1 method: forward at batch 1, every
patch counted); training counts 3x forward. The default peak is 790 TFLOP/s, dense bf16 on an
H100 (docs/performance.md#the-limit); pass ``--peak-tflops`` for another GPU.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fractalgen.models import get_config
from fractalgen.models.inspect import level_costs

H100_BF16_TFLOPS = 790.0
ATTENTION_HELP = (
    "attention kernels (fractalgen.models.layers.attend): auto = SDPA, batched matmuls for short "
    "sequences past the GPU grid limit; sdpa; math; fused = the Triton kernel for self-attention over "
    "<= 16 tokens without dropout on a GPU (the pixel head), the rest as auto (on a CPU: all as auto)"
)


def forward_gflops_per_image(name: str) -> float:
    return sum(r.gflops for r in level_costs(get_config(name)))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], *, warmup: int, steps: int, device: torch.device) -> list[float]:
    """Seconds per call of ``step`` after ``warmup`` untimed calls (one device sync per call)."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def profile_steps(step: Callable[[], Any], *, steps: int, device: torch.device, label: str,
                  row_limit: int = 12) -> dict[str, Any]:  # fmt: skip
    """Profile evidence for a row: ``steps`` calls of ``step`` under ``torch.profiler``.

    Prints the operators that take the most self time (device time on a GPU, CPU time on a CPU) and
    returns a summary for the JSON line: on a GPU, ``device_busy`` (kernel time / wall time: far below
    1 means the host, launches or syncs limit the row, not the GPU) and ``kernels_per_step``; and the
    top operators (on a GPU: kernels) with their share of the profiled self time.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    # kineto gives CPU operators the device time of the kernels they launch as well: sum the device's
    # own events (kernels, copies) only, or every kernel would count twice
    own = [e for e in events if e.device_type == (DeviceType.CUDA if on_gpu else DeviceType.CPU)]
    times = {e.key: float(getattr(e, key)) for e in own}
    total = sum(times.values()) or 1.0
    summary: dict[str, Any] = {"profile_steps": steps, "wall_s": wall}
    if on_gpu:
        summary["device_busy"] = total / 1e6 / wall
        summary["kernels_per_step"] = sum(e.count for e in own) / steps
    top = sorted(times.items(), key=lambda kv: kv[1], reverse=True)[:row_limit]
    summary["top_ops"] = [{"op": name, "share": t / total} for name, t in top]
    print(f"--- profile of {label}: {steps} step(s), {wall:.3f} s wall"
          + (f", device busy {summary['device_busy']:.0%}, {summary['kernels_per_step']:.0f} kernels/step"
             if on_gpu else ""))  # fmt: skip
    print(events.table(sort_by=key, row_limit=row_limit))
    return summary


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


@dataclass
class Result:
    bench: str
    config: str
    setting: str
    batch: int
    s_per_step: float | None = None
    img_per_s: float | None = None
    s_per_img: float | None = None
    peak_gib: float | None = None
    mfu: float | None = None
    status: str = "ok"
    device: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def print_results(results: Sequence[Result]) -> None:
    """A table for people, then one JSON line per result for tools (prefixed ``JSON``)."""

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    head = f"{'bench':<8}{'config':<24}{'setting':<34}{'batch':>6}{'s/step':>9}{'img/s':>9}{'s/img':>9}{'GiB':>7}{'MFU':>7}  status"
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r.bench:<8}{r.config:<24}{r.setting[:33]:<34}{r.batch:>6}{fmt(r.s_per_step, '.3f'):>9}"
            f"{fmt(r.img_per_s, '.1f'):>9}{fmt(r.s_per_img, '.4f'):>9}{fmt(r.peak_gib, '.1f'):>7}"
            f"{fmt(None if r.mfu is None else 100 * r.mfu, '.1f'):>7}  {r.status}"
        )
    for r in results:
        print("JSON " + json.dumps(asdict(r)))

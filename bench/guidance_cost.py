"""Sampling cost per guidance schedule: unguided steps skip the unconditional half of the batch.

The schedules are timed in interleaved rounds (each round samples every schedule once, the first
round is a warm-up) so that a change of load on the machine hits them alike; median seconds per
batch. Random weights (speed does not depend on them), fp32.

    python -m bench.guidance_cost --config fractalmar_demo32 --batch 16 --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import device_name, sync
from fractalgen.models import build_model

SETTINGS = {
    "cfg=1 (no guidance)": {"cfg": 1.0},
    "linear": {"cfg_schedule": "linear"},
    "interval 0.25-0.75": {"cfg_schedule": "interval:start=0.25,end=0.75"},
    "interval 0.5-1": {"cfg_schedule": "interval:start=0.5,end=1"},
    "interval guiding no step": {"cfg_schedule": "interval:start=0.9,end=1"},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="fractalmar_demo32", help="model size (default fractalmar_demo32)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cfg", type=float, default=2.0, help="guidance scale of the guided settings")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds; the first is a warm-up")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.config).to(device).eval()
    labels = torch.arange(args.batch, device=device) % model.config.num_classes
    times: dict[str, list[float]] = {k: [] for k in SETTINGS}
    for r in range(args.rounds):
        for name, kw in SETTINGS.items():
            sync(device)
            t0 = time.perf_counter()
            model.sample(labels, seed=r, **{"cfg": args.cfg, **kw})
            sync(device)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["linear"][1:])
    print(
        f"{args.config}, batch {args.batch}, {model.config.default_iters()} iterations, {device_name(device)}"
    )
    for name, values in times.items():
        med = statistics.median(values[1:])
        print(f"{name:26s} {med:8.3f} s/batch  {med / args.batch:8.4f} s/image  {med / base:5.2f} x linear")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

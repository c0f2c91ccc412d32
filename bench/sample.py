"""Sampling speed: seconds per image for the released sampling settings at several batch sizes.

Each configuration samples with its released defaults (iterations per level, guidance scale,
temperature, linear schedule; docs/model.md#released-sampling-settings) unless overridden, random
weights (speed does not depend on them), bf16 autocast on GPUs.

    python -m bench.sample --configs fractalmar_in64 --batches 32,128
    python -m bench.sample --configs fractalmar_base_in256 --batches 32 --num-iters 64,16,16
    python -m bench.sample --configs fractalmar_in64 --batches 32 \
        --cfg-schedule linear --cfg-schedule interval:start=0.25,end=0.75   # unguided steps are cheaper
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from bench.common import ATTENTION_HELP, Result, device_name, peak_gib, print_results, profile_steps, sync
from fractalgen.models import build_model
from fractalgen.models.layers import ATTENTION_IMPLS, attention_impl


def measure(args: argparse.Namespace, name: str, batch: int, schedule: str = "linear") -> Result:
    device = torch.device(args.device)
    model = build_model(name).to(device).eval()
    c = model.config
    iters = tuple(int(x) for x in args.num_iters.split(",")) if args.num_iters else c.default_iters()
    cfg = c.sample_cfg if args.cfg is None else args.cfg
    res = Result("sample", name, f"iters={','.join(map(str, iters))} cfg={cfg} {schedule} {args.precision}"
                 + ("" if args.attention == "auto" else f" attn={args.attention}"), batch,
                 device=device_name(device))  # fmt: skip
    labels = torch.arange(batch, device=device) % c.num_classes
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else contextlib.nullcontext()
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with attention_impl(args.attention), amp:
            for _ in range(args.warmup):
                model.sample(labels[: min(batch, 4)], num_iters=iters, cfg=cfg, cfg_schedule=schedule, seed=0)
            sync(device)
            t0 = time.perf_counter()
            for r in range(args.repeats):
                model.sample(labels, num_iters=iters, cfg=cfg, cfg_schedule=schedule, seed=r)
            sync(device)
            elapsed = (time.perf_counter() - t0) / args.repeats
            if args.profile:
                res.extra["profile"] = profile_steps(
                    lambda: model.sample(labels, num_iters=iters, cfg=cfg, cfg_schedule=schedule, seed=0),
                    steps=args.profile,
                    device=device,
                    label=f"{name} sampling, batch {batch}",
                )
    except torch.OutOfMemoryError:
        res.status = "out of memory"
        return res
    res.s_per_step = elapsed
    res.s_per_img = elapsed / batch
    res.img_per_s = batch / elapsed
    res.peak_gib = peak_gib(device)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="fractalmar_in64", help="comma-separated model sizes")
    p.add_argument("--batches", default="32,128", help="comma-separated batch sizes")
    p.add_argument("--num-iters", default="", help="iterations per level (default: the released ones)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the released one)")
    p.add_argument(
        "--cfg-schedule",
        action="append",
        metavar="SPEC",
        help="guidance schedule (docs/model.md#guidance-schedules); repeat to compare (default: linear)",
    )
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--attention", default="auto", choices=ATTENTION_IMPLS, help=ATTENTION_HELP)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="then profile N batches: top operators, GPU busy share",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    results = [
        measure(args, name, int(b), schedule)
        for name in args.configs.split(",")
        for b in args.batches.split(",")
        for schedule in args.cfg_schedule or ["linear"]
    ]
    print_results(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training throughput: images/s, s/step, peak GPU memory and MFU per configuration and micro-batch.

Engines:
- ``plain``: one process, the model's own forward/backward, fused AdamW, gradient clipping 3.0;
- ``deepspeed``: one process through ``fractalgen.platform.training.engine.setup_engine`` (the training
  workers' DeepSpeed engine: ZeRO stage, AdamW groups, schedule, clipping);
- ``ray``: the same DeepSpeed loop inside a Ray Train ``TorchTrainer`` worker (one GPU), to show
  the cost of the Ray + DeepSpeed path against ``plain`` (target: within 5%, docs/performance.md#status).

A synthetic batch (random images and labels) isolates the model from data loading (``bench.data``
measures that). Precision ``bf16`` is autocast without a GradScaler; ``fp32`` is the plain path.

    python -m bench.train --configs fractalmar_in64 --micro-batch 64 --ckpt
    python -m bench.train --configs fractalmar_large_in256 --micro-batch 32 --engines deepspeed --zero 2

``--mask-buckets N`` pads each MAR level's masked-patch selection to one of N sizes (no host sync,
fixed shapes below level 0; ``FractalConfig.mask_buckets``); ``--compile`` wraps every transformer
block's forward in ``torch.compile(dynamic=False)`` (one graph per block shape, so use it with
``--mask-buckets``):

    python -m bench.train --configs fractalmar_in64 --micro-batch 64 --mask-buckets 8 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
from typing import Any

import torch

from bench.common import (
    ATTENTION_HELP,
    H100_BF16_TFLOPS,
    Result,
    device_name,
    forward_gflops_per_image,
    peak_gib,
    print_results,
    profile_steps,
    time_steps,
)
from fractalgen.models import build_model, get_config
from fractalgen.models.layers import ATTENTION_IMPLS, ARBlock, Block, attention_impl


def compile_blocks(model: torch.nn.Module, backend: str = "inductor") -> int:
    """Wrap every transformer block's forward in ``torch.compile(dynamic=False)``; returns how many.

    All blocks share one code object, so dynamo's per-code cache must hold one graph per block and
    batch shape (mask buckets: up to N shapes per level below the top)."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 512)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 4096
        )
    n = 0
    for m in model.modules():
        if isinstance(m, Block | ARBlock):
            m.forward = torch.compile(m.forward, dynamic=False, backend=backend)  # type: ignore[method-assign]
            n += 1
    return n


def _model(args: argparse.Namespace, name: str, device: torch.device) -> torch.nn.Module:
    levels = tuple(int(x) for x in args.ckpt_levels.split(",")) if args.ckpt_levels else ()
    model = build_model(
        name, grad_checkpointing=args.ckpt, checkpoint_levels=levels, mask_buckets=args.mask_buckets
    )
    model = model.to(device).train()
    if args.compile:
        compile_blocks(model, args.compile_backend)
    return model


def _batch(name: str, micro_batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = get_config(name)
    x = torch.randn(micro_batch, 3, cfg.img_size, cfg.img_size, device=device).clamp_(-2, 2)
    y = torch.randint(0, cfg.num_classes, (micro_batch,), device=device)
    return x, y


def _autocast(args: argparse.Namespace, device: torch.device) -> contextlib.AbstractContextManager:
    if args.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def plain_step_fn(args: argparse.Namespace, name: str, device: torch.device):
    model = _model(args, name, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    x, y = _batch(name, args.micro_batch, device)

    def step() -> None:
        with _autocast(args, device):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _run_config(args: argparse.Namespace, name: str):
    from fractalgen.config import TrainRunConfig, load

    return load(
        TrainRunConfig,
        None,
        [
            f"model.name={name}",
            f"train.micro_batch_per_gpu={args.micro_batch}",
            f"train.global_batch_size={args.micro_batch}",
            f"train.zero_stage={args.zero}",
            f"train.precision={args.precision}",
            "cluster.num_workers=1",
            "train.epochs=1",
            "train.warmup_epochs=0",
        ],
    )


def deepspeed_step_fn(args: argparse.Namespace, name: str, device: torch.device):
    from fractalgen.platform.training.engine import setup_engine

    engine = setup_engine(
        _model(args, name, device),
        _run_config(args, name),
        steps_per_epoch=10**6,
        use_gpu=device.type == "cuda",
    )
    x, y = _batch(name, args.micro_batch, device)

    def step() -> None:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()

    return step


def _init_single_process_group(device: torch.device) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def measure(args: argparse.Namespace, name: str, engine: str) -> Result:
    device = torch.device(args.device)
    setting = f"{engine} {args.precision} ckpt={'on' if args.ckpt else 'off'}{args.ckpt_levels and ':' + args.ckpt_levels}"
    if engine != "plain":
        setting += f" zero{args.zero}"
    if args.mask_buckets:
        setting += f" mb{args.mask_buckets}"
    if args.compile:
        setting += " compile"
    if args.attention != "auto":
        setting += f" attn={args.attention}"
    res = Result("train", name, setting, args.micro_batch, device=device_name(device))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with attention_impl(args.attention):
            if engine == "plain":
                step = plain_step_fn(args, name, device)
            else:
                _init_single_process_group(device)
                step = deepspeed_step_fn(args, name, device)
            times = time_steps(step, warmup=args.warmup, steps=args.steps, device=device)
            if args.profile:
                res.extra["profile"] = profile_steps(
                    step, steps=args.profile, device=device, label=f"{name} {setting}"
                )
    except torch.OutOfMemoryError:
        res.status = "out of memory"
        return res
    s = sorted(times)[len(times) // 2]  # median step
    res.s_per_step = s
    res.img_per_s = args.micro_batch / s
    res.peak_gib = peak_gib(device)
    flops = 3 * forward_gflops_per_image(name) * 1e9 * res.img_per_s
    res.mfu = flops / (args.peak_tflops * 1e12) if device.type == "cuda" else None
    res.extra["times"] = times
    return res


def _ray_worker(config: dict[str, Any]) -> None:
    import ray.train

    args = argparse.Namespace(**config["args"])
    res = measure(args, config["name"], "deepspeed")
    ray.train.report({"result": res.__dict__})


def measure_ray(args: argparse.Namespace, name: str) -> Result:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(ignore_reinit_error=True, include_dashboard=False)
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"args": vars(args), "name": name},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=args.device == "cuda"),
        run_config=RunConfig(storage_path=os.path.abspath(args.ray_storage), name=f"bench-{name}"),
    )
    out = trainer.fit()
    res = Result(**out.metrics["result"])
    res.setting = res.setting.replace("deepspeed", "ray+ds", 1)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="fractalmar_in64", help="comma-separated model sizes")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--engines", default="plain", help="comma-separated: plain, deepspeed, ray")
    p.add_argument("--zero", type=int, default=1, choices=(0, 1, 2, 3))
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--ckpt", action="store_true", help="activation checkpointing")
    p.add_argument("--ckpt-levels", default="", help="comma-separated levels to checkpoint (default: all)")
    p.add_argument("--attention", default="auto", choices=ATTENTION_IMPLS, help=ATTENTION_HELP)
    p.add_argument(
        "--mask-buckets",
        type=int,
        default=0,
        help="pad the MAR levels' masked-patch selection to N bucket sizes (0: off, exact)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile(dynamic=False) each transformer block"
    )
    p.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)"
    )
    p.add_argument("--steps", type=int, default=8)
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="then profile N steps: top operators, GPU busy share",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS)
    p.add_argument("--ray-storage", default="/tmp/fractalgen-bench")
    args = p.parse_args(argv)
    results = []
    for name in args.configs.split(","):
        for engine in args.engines.split(","):
            results.append(measure_ray(args, name) if engine == "ray" else measure(args, name, engine))
    print_results(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

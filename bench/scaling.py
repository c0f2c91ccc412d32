"""Scaling model: data-parallel efficiency from 8 to 64 GPUs per ZeRO stage.

Per optimizer step, each GPU computes its share of the global batch and the workers exchange
gradients (and, with ZeRO-3, parameters). Bytes sent per GPU per step, N GPUs, P parameters, b
bytes per communicated element (4 for the fp32 gradients of bf16 autocast, 2 with
``communication_data_type: bf16``):
- ZeRO 0/1/2: reduce-scatter gradients + all-gather updated parameters = one all-reduce:
  ``2 (N-1)/N P b``;
- ZeRO 3: parameters are also all-gathered in forward and again in backward (2 bytes each, bf16
  copies): ``2 (N-1)/N P b + 2 (N-1)/N 2 P``.
Ring collectives are limited by the slowest link a GPU's traffic crosses: NVLink within a
p5.48xlarge node (~450 GB/s per GPU per direction), EFA across nodes (3200 Gbit/s = 400 GB/s per
node, ~50 GB/s per GPU). Gradient traffic overlaps the backward pass (DeepSpeed ``overlap_comm``);
``--overlap`` is the fraction hidden. Efficiency = compute / (compute + exposed communication),
with compute = micro-batches per GPU x measured seconds per micro-batch.

    python -m bench.scaling --config fractalmar_large_in256 --s-per-microbatch 0.356 --micro-batch 32
"""

from __future__ import annotations

import argparse

import torch

from fractalgen.models import build_model

NVLINK_GBPS = 450.0  # per GPU, one direction (H100 SXM: 900 GB/s bidirectional)
EFA_NODE_GBPS = 400.0  # p5.48xlarge: 3200 Gbit/s EFA per node
GPUS_PER_NODE = 8


def num_params(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(name).parameters())


def step_bytes_per_gpu(params: int, gpus: int, zero: int, grad_bytes: int) -> float:
    ring = 2 * (gpus - 1) / gpus
    total = ring * params * grad_bytes
    if zero == 3:
        total += ring * params * 2  # bf16 parameter all-gathers in forward and backward
    return total


def link_gbps(gpus: int) -> float:
    return NVLINK_GBPS if gpus <= GPUS_PER_NODE else EFA_NODE_GBPS / GPUS_PER_NODE


def efficiency(
    *, params: int, gpus: int, zero: int, grad_bytes: int, global_batch: int, micro_batch: int,
    s_per_microbatch: float, overlap: float,
) -> dict[str, float]:  # fmt: skip
    per_gpu = global_batch / gpus
    micro = max(1, round(per_gpu / micro_batch))
    mb = per_gpu / micro  # the micro-batch actually used (<= requested)
    compute = micro * s_per_microbatch * mb / micro_batch  # time scales with images per micro-batch
    comm = step_bytes_per_gpu(params, gpus, zero, grad_bytes) / (link_gbps(gpus) * 1e9)
    exposed = comm * (1 - overlap)
    return {
        "gpus": gpus,
        "images_per_gpu": per_gpu,
        "compute_s": compute,
        "comm_s": comm,
        "exposed_s": exposed,
        "efficiency": compute / (compute + exposed),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="fractalmar_large_in256")
    p.add_argument("--global-batch", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--s-per-microbatch", type=float, required=True, help="measured (bench.train) s/step")
    p.add_argument("--overlap", type=float, default=0.5, help="fraction of gradient traffic hidden")
    p.add_argument("--gpus", default="8,16,32,64")
    args = p.parse_args(argv)
    params = num_params(args.config)
    print(f"{args.config}: {params / 1e6:.1f}M parameters, global batch {args.global_batch}")
    print(
        f"{'zero':>4}{'grad':>6}{'gpus':>6}{'img/gpu':>9}{'compute s':>11}{'comm s':>9}{'exposed':>9}{'eff.':>7}"
    )
    for zero in (1, 2, 3):
        for grad_bytes in (4, 2):
            base = None
            for gpus in (int(g) for g in args.gpus.split(",")):
                r = efficiency(
                    params=params, gpus=gpus, zero=zero, grad_bytes=grad_bytes, global_batch=args.global_batch,
                    micro_batch=args.micro_batch, s_per_microbatch=args.s_per_microbatch, overlap=args.overlap,
                )  # fmt: skip
                base = base or r["efficiency"]
                print(
                    f"{zero:>4}{'fp32' if grad_bytes == 4 else 'bf16':>6}{gpus:>6}{r['images_per_gpu']:>9.0f}"
                    f"{r['compute_s']:>11.3f}{r['comm_s']:>9.3f}{r['exposed_s']:>9.3f}{100 * r['efficiency']:>6.1f}%"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

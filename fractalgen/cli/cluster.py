"""``fractalgen cluster plan``: the command over ``fractalgen.platform.cluster``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from fractalgen.cli import CLIError
from fractalgen.config import ConfigError, TrainRunConfig, finite_float, load
from fractalgen.platform.cluster import (
    DEFAULT_NODE_TYPE,
    NODE_TYPES,
    PlanRefused,
    format_plan,
    make_plan,
)


def _run_plan(args: argparse.Namespace) -> int:
    try:
        cfg = load(TrainRunConfig, args.config, list(args.set or []))
    except ConfigError as err:
        raise CLIError(str(err)) from None
    node = NODE_TYPES[args.node_type]
    if args.gpus_per_node is not None or args.gpu_memory_gib is not None:
        node = dataclasses.replace(
            node,
            name=f"{node.name} (modified)",
            gpus=args.gpus_per_node or node.gpus,
            gpu_memory_gib=args.gpu_memory_gib or node.gpu_memory_gib,
        )
    try:
        plan = make_plan(
            cfg,
            recipe=args.config,
            node=node,
            nodes=args.nodes,
            num_images=args.num_images,
            step_time=args.step_time,
            efficiency=args.efficiency,
            headroom=args.headroom,
            weights=args.weights,
        )
    except PlanRefused as err:
        partial = getattr(err, "plan", None)
        if partial is not None:
            if args.json:
                print(json.dumps({**partial.to_dict(), "refused": str(err)}, indent=2))
            else:
                print(format_plan(partial))
        raise CLIError(f"refused: {err}") from None
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cluster",
        help="plan a training run on a GPU cluster (GPUs, batch, time, GPU-hours, memory per ZeRO stage)",
        description="Cluster tools. `fractalgen cluster plan --config configs/<recipe>.yaml [--nodes N]`.",
    )
    sub = p.add_subparsers(dest="cluster_command", metavar="COMMAND", required=True)
    plan = sub.add_parser(
        "plan",
        help="GPUs, global batch, steps per epoch, time and GPU-hours, memory per GPU per ZeRO stage",
        description=(
            "For a recipe and a cluster shape: GPUs, the global batch and its split, steps per epoch, expected "
            "time per epoch and GPU-hours (from --step-time or the released code's reference measurements in "
            "docs/performance.md, labelled), and "
            "memory per GPU for each ZeRO stage. Refuses shapes that cannot run: a global batch that does not "
            "split over micro-batch x GPUs, the recipe's ZeRO stage over the GPU memory, offload over host "
            "memory. The memory model is documented in fractalgen/platform/cluster/memory.py."
        ),
    )
    plan.add_argument("--config", required=True, help="YAML recipe, e.g. configs/fractalmar_large_in256.yaml")
    plan.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a recipe value (repeatable), as for train",
    )
    plan.add_argument(
        "--nodes",
        type=int,
        default=None,
        help="nodes in the cluster (default: enough for cluster.num_workers)",
    )
    plan.add_argument(
        "--node-type", choices=sorted(NODE_TYPES), default=DEFAULT_NODE_TYPE, help="default: p5.48xlarge"
    )
    plan.add_argument("--gpus-per-node", type=int, default=None, help="override the node type's GPU count")
    plan.add_argument(
        "--gpu-memory-gib", type=finite_float, default=None, help="override the GPU memory (GiB)"
    )
    plan.add_argument(
        "--num-images", type=int, default=None, help="dataset size (default: the summary at data.train_uri)"
    )
    plan.add_argument(
        "--step-time",
        type=finite_float,
        default=None,
        help="measured seconds per optimizer step on this shape (default: docs/performance.md's reference table)",
    )
    plan.add_argument(
        "--efficiency",
        type=finite_float,
        default=1.0,
        help="data-parallel scaling efficiency for the default step time",
    )
    plan.add_argument(
        "--headroom", type=finite_float, default=0.08, help="fraction of GPU memory kept free (default 0.08)"
    )
    plan.add_argument(
        "--weights",
        choices=("fp32", "bf16"),
        default="fp32",
        help="fp32: this engine (bf16 autocast over fp32 weights, 4+4+8 bytes); bf16: DeepSpeed bf16 mode (2+2+12)",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=_run_plan)


if __name__ == "__main__":  # pragma: no cover
    from fractalgen.cli import main

    sys.exit(main(["cluster", *sys.argv[1:]]))

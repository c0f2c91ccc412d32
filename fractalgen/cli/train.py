"""``fractalgen train``: load a recipe with overrides, plan it and run it (``fractalgen.platform.training``)."""

from __future__ import annotations

import argparse
import json
import sys

from fractalgen.cli import CLIError
from fractalgen.config import ConfigError, TrainRunConfig, dumps, load
from fractalgen.platform.training.driver import (
    PlanError,
    TrainError,
    describe_outcome,
    plan_run,
    run_training,
)


def load_run_config(path: str | None, overrides: list[str]) -> TrainRunConfig:
    """The recipe at ``path`` with dotted overrides; ``CLIError`` naming the key on any problem."""
    try:
        return load(TrainRunConfig, path, overrides)
    except ConfigError as err:
        raise CLIError(str(err)) from None


def _train(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if args.name:
        overrides.append(f"name={args.name}")
    if args.init:
        overrides.append(f"finetune.init={json.dumps(args.init)}")  # JSON quoting: a YAML string as is
    cfg = load_run_config(args.config, overrides)
    try:
        plan = plan_run(cfg, dry_run=args.dry_run)
        if args.dry_run:
            from fractalgen.models import get_config  # deferred: heavy import
            from fractalgen.models.inspect import format_table  # deferred: heavy import

            print(dumps(plan.config), end="")
            arch = get_config(cfg.model.name, **cfg.model.architecture(), num_classes=plan.num_classes)
            print("# " + format_table(cfg.model.name, arch).replace("\n", "\n# "))
            print(
                f"# plan: {plan.num_images} images, {plan.steps_per_epoch} steps/epoch, "
                f"{plan.total_steps} steps (stop at {plan.stop_step}), {cfg.grad_accum_steps} micro-batches "
                f"per step per worker, peak lr {cfg.lr:.3g}, run folder {plan.run_uri}"
            )
            if cfg.finetune.init:
                names = plan.class_names or tuple(map(str, range(plan.num_classes)))
                rows = ", ".join(f"{names[new]} <- {old}" for new, old in plan.init_class_map) or "none"
                print(f"# finetune: weights from {cfg.finetune.init}; class rows from the source: {rows}")
            return 0
        outcome = run_training(cfg, plan=plan)
    except PlanError as err:
        raise CLIError(str(err)) from None
    except TrainError as err:
        print(f"fractalgen train: error: {err}", file=sys.stderr)
        return 1
    print(describe_outcome(outcome, plan))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model with Ray Train + DeepSpeed from a recipe in configs/",
        description=(
            "Train a FractalAR/FractalMAR model as a Ray Train job (DeepSpeed ZeRO, checkpoints in a "
            "folder or s3://, MLflow tracking). Launching a run whose folder exists (same name and "
            "storage path) resumes it from its latest checkpoint. The recipe is checked (keys, dataset, "
            "storage, MLflow) before any Ray resources are requested."
        ),
    )
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/fractalmar_large_in256.yaml")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a recipe value by its dotted key, e.g. --set train.zero_stage=3 (repeatable)",
    )
    p.add_argument("--name", help="the run's name (same as --set name=...)")
    p.add_argument(
        "--init",
        metavar="SOURCE",
        help=(
            "fine-tune: start from pretrained weights (same as --set finetune.init=SOURCE): released:PATH "
            "(the public checkpoint-last.pth), a released-format file (local or s3://), a registered "
            "version models:/NAME/VERSION, or a training checkpoint. Tensors that fit load; a class "
            "embedding of another size is re-initialised (or mapped by finetune.class_map)"
        ),
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the recipe and print the resolved config and plan; no Ray, writes nothing",
    )
    p.set_defaults(func=_train)

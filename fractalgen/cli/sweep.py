"""``fractalgen sweep``: the command over ``fractalgen.platform.tuning.sweep``."""

from __future__ import annotations

import argparse

from fractalgen.cli import CLIError
from fractalgen.config import ConfigError, dumps
from fractalgen.platform.tuning.config import load_sweep_config
from fractalgen.platform.tuning.results import describe_result
from fractalgen.platform.tuning.sweep import run_sweep


def _run(args: argparse.Namespace) -> int:
    from fractalgen.platform.evaluation.inception import InceptionWeightsMissing  # deferred: heavy import

    try:
        cfg = load_sweep_config(args.config, args.set or [])
    except ConfigError as err:
        raise CLIError(str(err)) from None
    if args.print_config:
        print(dumps(cfg))
        return 0
    try:
        result = run_sweep(cfg)
    except (InceptionWeightsMissing, FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from None
    print(describe_result(result))
    return 0 if result.best is not None else 1


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="Ray Tune sweep of sampling settings (guidance, schedules, temperature, iterations) by FID",
        description=(
            "Search guidance scale, guidance schedules and their parameters, lower-level guidance, temperature "
            "(and its ramp), filter threshold and iterations per level with Ray Tune (grid or Optuna, one GPU "
            "per trial, ASHA early stopping over the number of images), next to the model's released setting. "
            "Every trial is an MLflow run nested under the sweep's run, with its sampling seconds per image; "
            "the best setting is written to the registered model version as tags; results go to a Parquet "
            "table, a plot of FID against guidance scale, and the Pareto front of FID against IS "
            "(precision, recall) as a table (pareto.parquet, pareto.md) and a plot (pareto.png)."
        ),
    )
    p.add_argument("--config", help="sweep recipe (configs/sweep_*.yaml)")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set eval.num_images=5000"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_run)

"""``fractalgen inspect``: the per-level cost table of a model configuration (``fractalgen.models.inspect``)."""

from __future__ import annotations

import argparse

from fractalgen.cli import CLIError
from fractalgen.models.configs import MODEL_CONFIGS, get_config
from fractalgen.models.inspect import (
    format_table,
)


def _run_inspect(args: argparse.Namespace) -> int:
    from fractalgen.config import ConfigError, parse_overrides  # deferred: heavy import

    try:
        overrides = parse_overrides(args.set)
        if args.num_classes is not None:
            overrides["num_classes"] = args.num_classes
        config = get_config(args.name, **overrides)
    except (KeyError, TypeError, ValueError, ConfigError) as err:
        raise CLIError(str(err).strip("'\"")) from None
    print(format_table(args.name, config))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="per-level sequence length, layers, width, parameters and GFLOPs of a model size",
        description="Print the paper's Table 1 for a registered model size, computed from its config.",
    )
    p.add_argument(
        "name", choices=sorted(MODEL_CONFIGS), metavar="NAME", help="model size, e.g. fractalmar_large_in256"
    )
    p.add_argument("--num-classes", type=int, default=None, help="class count (default: the size's own)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set img_sizes=[32,8,2,1] --set widths=[256,128,64,32] "
        "(any sizes that divide evenly); repeatable",
    )
    p.set_defaults(func=_run_inspect)

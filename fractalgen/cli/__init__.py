"""The ``fractalgen`` command line.

Each area owns its sub-commands: a module listed in ``COMMAND_MODULES`` defines
``add_commands(subparsers)``, which adds its parsers and sets ``func`` (a callable taking the parsed
namespace and returning an exit code). Modules import heavy libraries (torch, ray, mlflow) inside
their command functions, so ``fractalgen --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES: tuple[str, ...] = (
    "fractalgen.cli.inspect",
    "fractalgen.cli.data",
    "fractalgen.cli.train",
    "fractalgen.cli.export",
    "fractalgen.cli.demo",
    "fractalgen.cli.sample",
    "fractalgen.cli.eval",
    "fractalgen.cli.registry",
    "fractalgen.cli.sweep",
    "fractalgen.cli.cluster",
)


# third-party loggers kept at WARNING unless --verbose
QUIET_LOGGERS: tuple[str, ...] = ("streaming",)


class CLIError(Exception):
    """An error the user can fix; printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fractalgen",
        description=(
            "Train, tune, evaluate and register Fractal Generative Models (FractalAR / FractalMAR). "
            "Run `fractalgen COMMAND --help` for the options of each command."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        for name in QUIET_LOGGERS:  # their INFO lines restate defaults (streaming: predownload ...)
            logging.getLogger(name).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        print(f"fractalgen {args.command}: error: {err}", file=sys.stderr)
        return 2


def console_main(argv: list[str] | None = None) -> int:
    """The ``fractalgen`` program: ``main``, with Ctrl-C ending it quietly (exit 130).

    ``main`` itself lets ``KeyboardInterrupt`` through, so that a caller (a test run, a notebook)
    that calls it in-process is interrupted too instead of carrying on with an exit code.
    """
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

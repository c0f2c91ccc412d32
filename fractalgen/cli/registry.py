"""``fractalgen registry register|review|promote``: the parsers and commands over ``fractalgen.platform.registry``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fractalgen.cli import CLIError
from fractalgen.cli.sample import add_sampling_args, settings_from_args
from fractalgen.platform.registry import (
    CANDIDATE,
    CHAMPION,
    RegistryError,
    promote,
    register_checkpoint,
    review,
)


def _tracking(args: argparse.Namespace) -> str | None:
    return args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")


def _ask(question: str) -> bool:
    if not sys.stdin.isatty():
        return True  # a script asked for the promotion; the comparison is in its log
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def _run_register(args: argparse.Namespace) -> int:
    metrics = {}
    if args.metrics_json:
        data = json.loads(Path(args.metrics_json).read_text())
        metrics = {
            k: float(v) for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
    settings = settings_from_args(args, None)
    kind = "released" if args.command_name == "import" else None
    try:
        rv = register_checkpoint(
            args.checkpoint, args.name, tracking_uri=_tracking(args), model_name=args.model_name,
            training_run_id=getattr(args, "training_run_id", None), metrics=metrics,
            aliases=args.alias or [CANDIDATE], description=args.description, grid_images=args.grid_images,
            grid_settings=settings, grid_seed=args.seed, source_kind=kind,
        )  # fmt: skip
    except RegistryError as err:
        raise CLIError(str(err)) from None
    print(f"registered {rv.model_uri} (run {rv.run_id}); aliases: {', '.join(args.alias or [CANDIDATE])}")
    return 0


def _run_review(args: argparse.Namespace) -> int:
    versions = [v for v in (args.versions or "").split(",") if v] or None
    try:
        review(args.name, versions=versions, html_path=args.html, tracking_uri=_tracking(args),
               thumbnails=args.thumbnails if args.thumbnails is not None else sys.stdout.isatty())  # fmt: skip
    except RegistryError as err:
        raise CLIError(str(err)) from None
    return 0


def _run_promote(args: argparse.Namespace) -> int:
    try:
        promote(
            args.name,
            args.version,
            alias=args.alias,
            yes=args.yes,
            confirm=_ask,
            tracking_uri=_tracking(args),
        )
    except RegistryError as err:
        raise CLIError(str(err)) from None
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "registry", help="register, review and promote model versions (MLflow registry)"
    )
    sub = p.add_subparsers(dest="registry_command", metavar="{register,import,review,promote}", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--tracking-uri", help="MLflow tracking/registry server (default: MLFLOW_TRACKING_URI)"
        )

    for cmd, helptext in (
        ("register", "register a checkpoint (consolidated weights) as a new model version"),
        ("import", "import a released checkpoint-last.pth as a new model version"),
    ):
        r = sub.add_parser(cmd, help=helptext, description=helptext + "; it gets the alias candidate.")
        r.add_argument(
            "checkpoint", help="released-format .pth, or a training checkpoint / run folder (local or s3://)"
        )
        r.add_argument("--name", required=True, help="registered model name")
        r.add_argument("--model-name", help="architecture (e.g. fractalmar_in64) when the file does not say")
        if cmd == "register":
            r.add_argument(
                "--training-run-id", help="MLflow run of the training (default: found by the run name)"
            )
        r.add_argument("--metrics-json", help="JSON of metrics to attach (e.g. `fractalgen eval fid --out`)")
        r.add_argument("--alias", action="append", help="aliases for the new version (default: candidate)")
        r.add_argument("--description")
        r.add_argument(
            "--grid-images", type=int, default=16, help="images in the logged sample grid (0: none)"
        )
        r.add_argument("--seed", type=int, default=0, help="seed of the sample grid")
        add_sampling_args(r)
        common(r)
        r.set_defaults(func=_run_register, command_name=cmd)

    v = sub.add_parser("review", help="compare a model's versions side by side (terminal and HTML)")
    v.add_argument("name")
    v.add_argument("--versions", help="comma-separated versions (default: all)")
    v.add_argument("--html", help="also write an HTML report with the sample grids")
    v.add_argument("--thumbnails", action=argparse.BooleanOptionalAction, default=None,
                   help="colour thumbnails of the grids in the terminal (default: when a terminal)")  # fmt: skip
    common(v)
    v.set_defaults(func=_run_review)

    m = sub.add_parser("promote", help="show the comparison, then move the champion alias to VERSION")
    m.add_argument("name")
    m.add_argument("version")
    m.add_argument("--alias", default=CHAMPION, help="alias to move (default: champion)")
    m.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    common(m)
    m.set_defaults(func=_run_promote)

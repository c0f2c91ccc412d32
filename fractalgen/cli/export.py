"""``fractalgen export``: consolidate a training checkpoint into a released-format file (``fractalgen.platform.artifacts.checkpoints``)."""

from __future__ import annotations

import argparse

from fractalgen import storage
from fractalgen.cli import CLIError
from fractalgen.platform.artifacts.checkpoints import (
    CheckpointNotFound,
    export_consolidated,
)


def _export(args: argparse.Namespace) -> int:
    endpoint = storage.endpoint_for(args.checkpoint, args.s3_endpoint_url)
    try:
        path = export_consolidated(args.checkpoint, args.out, endpoint=endpoint)
    except (CheckpointNotFound, ValueError, KeyError) as err:
        raise CLIError(str(err)) from None
    print(f"wrote {path} (released checkpoint format: load with fractalgen.models.load_released)")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write consolidated fp32 weights of a training checkpoint (any ZeRO stage)",
        description=(
            "Join the DeepSpeed shards of a training checkpoint (ZeRO 0-3) into one fp32 state dict and "
            "write it in the released checkpoint format ({'model', 'args'}). CHECKPOINT is a "
            "checkpoint folder or a run folder (its latest checkpoint), local or s3://. The shards "
            "(pickles) are read with torch.load(weights_only=True), allowing only the three DeepSpeed "
            "types they hold; a shard holding anything else is refused, naming the file."
        ),
    )
    p.add_argument("checkpoint", help="<storage_path>/<name>[/checkpoint_<step>]")
    p.add_argument("--out", required=True, help="output .pth file")
    p.add_argument(
        "--s3-endpoint-url", help="S3-compatible endpoint (default: S3_ENDPOINT_URL / AWS_ENDPOINT_URL)"
    )
    p.set_defaults(func=_export)

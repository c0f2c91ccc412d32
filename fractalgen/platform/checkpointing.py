"""Training checkpoints: find them, read them, export consolidated weights (``fractalgen export``).

Terms:
- *run folder*: ``<storage_path>/<name>`` (local or ``s3://``) holding ``checkpoint_<step>`` folders.
- *checkpoint*: one such folder, as ``worker.report_and_checkpoint`` writes it: DeepSpeed's shards
  under ``deepspeed/``, the resolved config ``run.yaml``, ``state.json`` (step, loader position ...)
  and ``plan.json`` (what the driver derived: classes, steps per epoch).
- *consolidated weights*: the whole model's fp32 weights in one state dict. Under ZeRO-1/2/3 the
  fp32 master weights are partitioned over the ranks' optimizer files (and under ZeRO-3 the model
  files hold only partitions too); DeepSpeed's ``zero_to_fp32`` joins them. Without ZeRO (stage 0)
  the model file holds them whole. The result is written in the released format (``{"model":
  state_dict, "args": Namespace}``, ``fractalgen.models.save_released``), so ``load_released`` and
  anything that reads the public ``checkpoint-last.pth`` read it.

Trust: DeepSpeed's own files are full pickles (``zero_to_fp32`` loads them with
``weights_only=False``); export only checkpoints your runs wrote. The exported file loads with
``weights_only=True``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fractalgen.platform.cli import CLIError
from fractalgen.platform.worker import DS_TAG, STATE_FILE

PLAN_FILE = "plan.json"


class CheckpointNotFound(FileNotFoundError):
    """No fractalgen checkpoint at the URI."""


def resolve_checkpoint(uri: str, *, endpoint: str | None = None) -> str:
    """``uri`` itself if it is a checkpoint, or the latest checkpoint of the run folder ``uri``."""
    from fractalgen.pipelines import storage

    if storage.exists(storage.join(uri, STATE_FILE), endpoint=endpoint):
        return uri
    names = sorted(n for n in storage.list_dirs(uri, endpoint=endpoint) if n.startswith("checkpoint_"))
    for name in reversed(names):
        candidate = storage.join(uri, name)
        if storage.exists(storage.join(candidate, STATE_FILE), endpoint=endpoint):
            return candidate
    raise CheckpointNotFound(
        f"no fractalgen checkpoint at {uri} (neither a checkpoint nor a run folder with one)"
    )


def fetch_checkpoint(uri: str, dest: str, *, endpoint: str | None = None) -> str:
    """A local folder holding the checkpoint: ``uri`` itself if local, else a copy under ``dest``."""
    from fractalgen.pipelines import storage

    if not storage.is_remote(uri):
        return storage.local_path(uri)
    for rel in storage.list_files(uri, endpoint=endpoint):
        storage.download_file(storage.join(uri, rel), os.path.join(dest, rel), endpoint=endpoint)
    return dest


def read_plan(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, PLAN_FILE)) as f:
        return json.load(f)


def consolidated_state_dict(folder: str) -> dict[str, Any]:
    """The model's fp32 weights from the DeepSpeed shards in a local checkpoint folder (any ZeRO stage)."""
    import torch

    plan = read_plan(folder)
    stage = int(plan["config"]["train"]["zero_stage"])
    if stage == 0:
        path = os.path.join(folder, DS_TAG, "mp_rank_00_model_states.pt")
        states = torch.load(path, map_location="cpu", weights_only=False)  # DeepSpeed's pickle (see above)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(folder, tag=DS_TAG)
    return {k: v.float() for k, v in state.items()}


def export_consolidated(
    checkpoint_uri: str, out: str | os.PathLike[str], *, endpoint: str | None = None
) -> Path:
    """Write the consolidated fp32 weights of a checkpoint (or of a run folder's latest) to ``out``.

    The file is in the released format; ``args`` records the model name, run name, step and epoch.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # consolidation is CPU work; no GPU needed
    from fractalgen.models import save_released
    from fractalgen.platform.worker import WorkerPlan, build_run_model

    uri = resolve_checkpoint(checkpoint_uri, endpoint=endpoint)
    tmp = tempfile.mkdtemp(prefix="fractalgen-export-")
    try:
        folder = fetch_checkpoint(uri, tmp, endpoint=endpoint)
        from fractalgen.config import from_dict

        plan = from_dict(WorkerPlan, read_plan(folder))
        with open(os.path.join(folder, STATE_FILE)) as f:
            state = json.load(f)
        weights = consolidated_state_dict(folder)
        import torch

        with torch.device("meta"):
            model = build_run_model(plan)  # the architecture (shapes), checked against the weights
        expected = set(model.state_dict())
        if set(weights) != expected:
            missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
            raise ValueError(
                f"checkpoint {uri} does not fit {plan.config.model.name}: missing {missing[:5]}, extra {extra[:5]}"
            )
        args = {
            "model": plan.config.model.name,
            "run_name": plan.config.name,
            "step": state["step"],
            "epoch": state["samples_seen"] / plan.num_images,
            "checkpoint": uri,
            "num_classes": plan.num_classes,
            "class_names": list(plan.class_names),
        }
        return save_released(weights, out, args=args, config=model.config)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export(args: argparse.Namespace) -> int:
    from fractalgen.pipelines import storage

    endpoint = storage.endpoint_url(args.s3_endpoint_url) if storage.is_remote(args.checkpoint) else None
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
            "checkpoint folder or a run folder (its latest checkpoint), local or s3://. Export only "
            "checkpoints your own runs wrote: DeepSpeed's shard files are full pickles."
        ),
    )
    p.add_argument("checkpoint", help="<storage_path>/<name>[/checkpoint_<step>]")
    p.add_argument("--out", required=True, help="output .pth file")
    p.add_argument(
        "--s3-endpoint-url", help="S3-compatible endpoint (default: S3_ENDPOINT_URL / AWS_ENDPOINT_URL)"
    )
    p.set_defaults(func=_export)

"""Training checkpoints: find them, read them, export consolidated weights (``fractalgen export``).

Terms:
- *run folder*: ``<storage_path>/<name>`` (local or ``s3://``) holding ``checkpoint_<step>`` folders.
- *checkpoint*: one such folder, as ``worker.report_and_checkpoint`` writes it: DeepSpeed's shards
  under ``deepspeed/``, the resolved config ``run.yaml``, ``state.json`` (step, loader position ...)
  and ``plan.json`` (what the driver derived: classes, steps per epoch).
- *consolidated weights*: the whole model's fp32 weights in one state dict. Under ZeRO-1/2/3 the
  fp32 master weights are partitioned over the ranks' optimizer files (and under ZeRO-3 the model
  files hold only partitions too); ``zero_fp32_state_dict`` joins them as DeepSpeed's
  ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` does (same tensors, bit
  for bit: ``tests/platform/test_safe_loading.py``). Without ZeRO (stage 0) the model file holds them
  whole. The result is written in the released format (``{"model": state_dict, "args": Namespace}``,
  ``fractalgen.models.save_released``), so ``load_released`` and anything that reads the public
  ``checkpoint-last.pth`` read it.

Trust: DeepSpeed's files are pickles, and DeepSpeed's own readers unpickle them fully (any object,
so any code). Here every file is read with ``torch.load(weights_only=True)`` (``read_ds_file``):
tensors and plain Python values, plus, in optimizer files only, the three DeepSpeed types they hold
(``OPTIMIZER_FILE_GLOBALS``), each rebuilt as an inert stand-in that only keeps its fields (DeepSpeed
is not even imported). A file holding anything else is refused with ``CheckpointError`` naming the
file and the refused objects. Resuming a run (and ``checkpoint.init_from``) is another matter: it
goes through DeepSpeed's ``load_checkpoint`` (``fractalgen/platform/training/worker.py``), which unpickles
fully.
"""

from __future__ import annotations

import enum
import glob
import json
import math
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fractalgen import storage
from fractalgen.platform.artifacts.run_plan import DS_TAG, STATE_FILE

PLAN_FILE = "plan.json"


class CheckpointNotFound(FileNotFoundError):
    """No fractalgen checkpoint at the URI."""


def resolve_checkpoint(uri: str, *, endpoint: str | None = None) -> str:
    """``uri`` itself if it is a checkpoint, or the latest checkpoint of the run folder ``uri``."""

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

    if not storage.is_remote(uri):
        return storage.local_path(uri)
    for rel in storage.list_files(uri, endpoint=endpoint):
        storage.download_file(storage.join(uri, rel), os.path.join(dest, rel), endpoint=endpoint)
    return dest


def read_plan(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, PLAN_FILE)) as f:
        return json.load(f)


# ------------------------------------------------------------------------ reading DeepSpeed's files
# mp_rank_00_model_states.pt (ZeRO 0-2); zero_pp_rank_<r>_mp_rank_00_model_states.pt (ZeRO-3, per rank)
MODEL_FILE_PATTERN = "*_model_states.pt"
# zero_pp_rank_<r>_mp_rank_00_optim_states.pt (ZeRO 1-3): one per rank
OPTIMIZER_FILE_PATTERN = "*_optim_states.pt"


class _LossScaler:
    """Stand-in for DeepSpeed's ``LossScaler`` (``optimizer_state_dict.loss_scaler``): its fields only."""


class _FragmentAddress:
    """Stand-in for DeepSpeed's ``fragment_address`` (ZeRO-1/2 ``param_slice_mappings``: numel, start)."""


class _ZeroStage(enum.IntEnum):
    """Stand-in for DeepSpeed's ``ZeroStageEnum`` (``optimizer_state_dict.zero_stage``): same values."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


# The only globals beyond torch's weights_only defaults that DeepSpeed's optimizer files hold (found
# with torch.serialization.get_unsafe_globals_in_checkpoint on checkpoints of ZeRO 1-3, fp32 and
# bf16, with offloading and frozen levels; model-state files hold none). Each name is mapped to a
# stand-in above, so unpickling builds plain records and runs no DeepSpeed code.
OPTIMIZER_FILE_GLOBALS: list[tuple[type, str]] = [
    (_LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
    (_ZeroStage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
]


def read_ds_file(path: str, *, optimizer: bool = False) -> dict[str, Any]:
    """One DeepSpeed file of a checkpoint, loaded safely (module docstring, Trust).

    ``optimizer``: an optimizer-states file (``OPTIMIZER_FILE_GLOBALS`` allowed, memory-mapped).
    ``CheckpointError`` naming the file when it is missing, foreign, or holds anything else.
    """
    from fractalgen.models.checkpoint import CheckpointError, safe_load  # deferred: heavy import

    kind = "optimizer-states" if optimizer else "model-states"
    what = f"a DeepSpeed {kind} file of a fractalgen training checkpoint"
    obj = safe_load(path, what=what, allowed=OPTIMIZER_FILE_GLOBALS if optimizer else (), mmap=optimizer)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not {what}: it holds a {type(obj).__name__}, not a dict")
    return obj


def _entry(d: Any, key: str, path: str) -> Any:
    from fractalgen.models.checkpoint import CheckpointError  # deferred: heavy import

    if not isinstance(d, dict) or key not in d:
        raise CheckpointError(f"{path} is not a DeepSpeed checkpoint file as training writes it (no {key!r})")
    return d[key]


def _ds_files(ds_dir: str, pattern: str) -> list[str]:
    """The files matching ``pattern`` in rank order (``..._rank_2_...`` before ``..._rank_10_...``)."""
    from fractalgen.models.checkpoint import CheckpointError  # deferred: heavy import

    def natural(path: str) -> list[Any]:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]

    files = sorted(glob.glob(os.path.join(glob.escape(ds_dir), pattern)), key=natural)
    if not files:
        raise CheckpointError(f"no {pattern} files in {ds_dir}: not a DeepSpeed checkpoint")
    return files


def _numel(shape: Any) -> int:
    return math.prod(int(d) for d in shape)


def _cat(tensors: list[Any]) -> Any:
    import torch  # deferred: heavy import

    return torch.cat(tensors, 0)


def zero_fp32_state_dict(ds_dir: str) -> dict[str, Any]:
    """The fp32 weights of a ZeRO-1/2/3 DeepSpeed checkpoint folder (``<checkpoint>/deepspeed``).

    What ``get_fp32_state_dict_from_zero_checkpoint`` returns (buffers, frozen and trainable
    parameters, shared parameters; same order, same values), with every file read by
    ``read_ds_file``.
    """
    from fractalgen.models.checkpoint import CheckpointError  # deferred: heavy import

    model_files = _ds_files(ds_dir, MODEL_FILE_PATTERN)
    models = [read_ds_file(f) for f in model_files]
    for f, m in zip(model_files, models, strict=True):
        _entry(m, "buffer_names", f)
        _entry(m, "param_shapes", f)
    optim_files = _ds_files(ds_dir, OPTIMIZER_FILE_PATTERN)
    optims = []
    for f in optim_files:
        states = _entry(read_ds_file(f, optimizer=True), "optimizer_state_dict", f)
        states.pop("optimizer_state_dict", None)  # the Adam moments: not needed, dropped early
        optims.append(states)
    stage = int(_entry(optims[0], "zero_stage", optim_files[0]))
    world = _entry(optims[0], "partition_count", optim_files[0])
    # ZeRO-2 may record a count per parameter group (expert groups): the data-parallel size is the max
    world = max(world) if isinstance(world, list) else int(world)
    if world != len(optim_files):
        raise CheckpointError(
            f"{ds_dir}: the optimizer files say {world} ranks but {len(optim_files)} "
            f"{OPTIMIZER_FILE_PATTERN} files are there (a rank's files missing, or files of another save?)"
        )
    first = models[0]
    state: dict[str, Any] = OrderedDict(
        (k, v.float() if v.is_floating_point() else v)
        for k, v in _entry(first, "module", model_files[0]).items()
        if k in first["buffer_names"]
    )
    frozen_shapes = first.get("frozen_param_shapes") or {}
    if stage in (1, 2):
        groups = [_entry(o, "single_partition_of_fp32_groups", f) for o, f in zip(optims, optim_files)]
        for name in frozen_shapes:  # rank 0's model file holds frozen parameters whole
            state[name] = first["frozen_param_fragments"][name]
        _merge_zero2(state, first["param_shapes"], groups, optims[0].get("param_alignment_paddings"), ds_dir)
    elif stage == 3:
        groups = [_entry(o, "fp32_flat_groups", f) for o, f in zip(optims, optim_files)]
        for name, shape in frozen_shapes.items():  # every rank's model file holds a slice
            n = _numel(shape)
            parts = [m["frozen_param_fragments"][name] for m in models]
            state[name] = _cat(parts).narrow(0, 0, n).view(tuple(shape))
        _merge_zero3(state, first["param_shapes"], groups, world, ds_dir)
    else:
        raise CheckpointError(f"{optim_files[0]}: ZeRO stage {stage}, expected 1, 2 or 3")
    for alias, target in (first.get("shared_params") or {}).items():
        if target in state:
            state[alias] = state[target]
    return state


def _merge_zero2(
    state: dict[str, Any], param_shapes: list[Any], groups: list[list[Any]], paddings: Any, ds_dir: str
) -> None:
    """ZeRO-1/2: each parameter group's fp32 vector is split in rank order; parameters follow one
    another in it (each followed by its alignment padding, when recorded)."""
    from fractalgen.models.checkpoint import CheckpointError  # deferred: heavy import

    world = len(groups)
    if any(len(g) != len(param_shapes) for g in groups):
        raise CheckpointError(f"{ds_dir}: {len(param_shapes)} parameter groups in the model file, "
                              f"{[len(g) for g in groups]} in the optimizer files")  # fmt: skip
    align = 2 * world  # DeepSpeed pads each group to a multiple of 2 x world size

    def aligned(x: int) -> int:
        return align * math.ceil(x / align)

    for i, shapes in enumerate(param_shapes):
        flat = _cat([g[i] for g in groups])
        pads = paddings[i] if paddings is not None else None
        if pads is not None and len(pads) != len(shapes):
            raise CheckpointError(f"{ds_dir}: group {i} has {len(shapes)} parameters, {len(pads)} paddings")
        offset = 0
        for j, (name, shape) in enumerate(shapes.items()):
            n = _numel(shape)
            state[name] = flat.narrow(0, offset, n).view(tuple(shape))
            offset += n + (int(pads[j]) if pads is not None else 0)
        if aligned(offset) != aligned(flat.numel()):
            raise CheckpointError(f"{ds_dir}: group {i} holds {flat.numel()} values, its parameters {offset}")


def _merge_zero3(
    state: dict[str, Any], param_shapes: list[Any], groups: list[list[Any]], world: int, ds_dir: str
) -> None:
    """ZeRO-3: every parameter is split in ``world`` equal slices (the last padded); rank r's groups,
    end to end, hold its slice of every parameter in order."""
    import torch  # deferred: heavy import

    from fractalgen.models.checkpoint import CheckpointError  # deferred: heavy import

    bounds = [0]
    for t in groups[0]:
        bounds.append(bounds[-1] + t.numel())

    def span(rank_groups: list[Any], start: int, stop: int) -> list[Any]:
        out = []
        for g, t in enumerate(rank_groups):
            lo, hi = max(start, bounds[g]), min(stop, bounds[g + 1])
            if lo < hi:
                out.append(t[lo - bounds[g] : hi - bounds[g]])
        return out

    offset = 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            n = _numel(shape)
            part = math.ceil(n / world)
            chunks = [c for r in groups for c in span(r, offset, offset + part)]
            flat = torch.cat(chunks, 0) if chunks else torch.zeros(0, dtype=groups[0][0].dtype)
            state[name] = flat[:n].view(tuple(shape)).contiguous()
            offset += part
    if offset != bounds[-1]:
        raise CheckpointError(
            f"{ds_dir}: the parameters take {offset} values per rank, the files hold {bounds[-1]}"
        )


def consolidated_state_dict(folder: str) -> dict[str, Any]:
    """The model's fp32 weights from the DeepSpeed files in a local checkpoint folder (any ZeRO stage),
    every file loaded safely (module docstring, Trust). ``CheckpointError`` names the file or folder
    that is not what training writes."""
    from fractalgen.models.checkpoint import CheckpointError  # deferred: heavy import

    plan = read_plan(folder)
    stage = int(plan["config"]["train"]["zero_stage"])
    ds_dir = os.path.join(folder, DS_TAG)
    try:
        if stage == 0:
            path = os.path.join(ds_dir, "mp_rank_00_model_states.pt")
            module = _entry(read_ds_file(path), "module", path)
            return {k: v.float() for k, v in module.items()}
        return {k: v.float() for k, v in zero_fp32_state_dict(ds_dir).items()}
    except (KeyError, TypeError, AttributeError, IndexError, RuntimeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        # files that load safely but are laid out otherwise than DeepSpeed's (hand-made, damaged)
        raise CheckpointError(
            f"{ds_dir} is not a DeepSpeed checkpoint as training writes it ({type(err).__name__}: {err})"
        ) from None


def export_consolidated(
    checkpoint_uri: str, out: str | os.PathLike[str], *, endpoint: str | None = None
) -> Path:
    """Write the consolidated fp32 weights of a checkpoint (or of a run folder's latest) to ``out``.

    The file is in the released format; ``args`` records the model name, run name, step and epoch.
    """
    from fractalgen.models import save_released  # deferred: heavy import
    from fractalgen.platform.artifacts.run_plan import WorkerPlan, build_run_model  # deferred: heavy import

    uri = resolve_checkpoint(checkpoint_uri, endpoint=endpoint)
    tmp = tempfile.mkdtemp(prefix="fractalgen-export-")
    try:
        folder = fetch_checkpoint(uri, tmp, endpoint=endpoint)
        from fractalgen.config import from_dict  # deferred: heavy import

        plan = from_dict(WorkerPlan, read_plan(folder))
        with open(os.path.join(folder, STATE_FILE)) as f:
            state = json.load(f)
        weights = consolidated_state_dict(folder)
        import torch  # deferred: heavy import

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

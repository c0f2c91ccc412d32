"""Fine-tuning: a new run that starts from pretrained weights (the recipe's ``finetune`` section).

Terms:
- *source* (``finetune.init``): where the weights come from: ``released:PATH`` (the public
  ``checkpoint-last.pth``), a released-format file (local or ``s3://``, e.g. ``fractalgen export``
  output), a registered version (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``) or a training
  checkpoint / run folder (its consolidated weights).
- *class map* (``finetune.class_map``): new class -> source class, for the rows of the class
  embedding (docs/model.md#conditions). New classes are names of the dataset's classes or indices; source
  classes are indices (ImageNet: the sorted-wnid order of the released models) or names the source
  model carries. Rows without an entry keep their fresh initialisation.
- *init report* (``init_report.json`` in the run folder, and ``finetune/init_report.json`` in the
  MLflow run): which tensors loaded unchanged, which are new (re-initialised), which were mapped by
  the class map, which source tensors the model has no place for, and which were frozen.
- *frozen levels* (``finetune.freeze_levels``): every parameter of those levels keeps its loaded
  value, except the class embedding, which is new whenever the class count changes.
- *level lr scale* (``finetune.level_lr_scale``): a learning-rate multiplier per level (top first).

The driver resolves and checks the source once (``check_source``: a missing file, an unknown version
or a bad class map fails before Ray is asked for anything); each worker resolves it again into its
own temporary folder (nodes share no disk) and loads it before DeepSpeed partitions the model.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from fractalgen.models import InitReport, init_from_checkpoint, parameter_level

RELEASED_PREFIX = "released:"
INIT_REPORT_FILE = "init_report.json"
CLASS_EMBEDDING = "class_emb.weight"
# a source that fits less than this share of the model's weights is another architecture, not a start
MIN_LOADED_FRACTION = 0.5


class FinetuneError(ValueError):
    """The fine-tuning source or its class map cannot be used; the message names the key."""


def source_uri(init: str) -> str:
    """``finetune.init`` without its ``released:`` prefix."""
    return init[len(RELEASED_PREFIX) :] if init.startswith(RELEASED_PREFIX) else init


def absolute_source(init: str) -> str:
    """``init`` with a local path made absolute (Ray workers run in other folders than the driver)."""

    path = source_uri(init)
    if path.startswith("models:/") or urllib.parse.urlparse(path).scheme:
        return init
    prefix = RELEASED_PREFIX if init.startswith(RELEASED_PREFIX) else ""
    return prefix + os.path.abspath(os.path.expanduser(path))


def fetch_source(
    init: str, work_dir: str | Path, *, tracking_uri: str | None = None, endpoint: str | None = None
) -> Path:
    """The source as a local released-format file (downloaded or exported into ``work_dir``)."""
    from fractalgen.platform.generation.sources import resolve_model_source  # deferred: heavy import

    try:
        found = resolve_model_source(
            source_uri(init), work_dir=work_dir, tracking_uri=tracking_uri, endpoint=endpoint
        )
    except Exception as err:  # a missing file or version, an unreachable store ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FinetuneError(f"finetune.init: cannot use {init}: {first}") from None
    return found.path


def resolve_class_map(
    class_map: Mapping[str, int | str],
    *,
    class_names: Sequence[str],
    num_classes: int,
    source_names: Sequence[str],
    source_classes: int,
) -> tuple[tuple[int, int], ...]:
    """``finetune.class_map`` as ``((new index, source index), ...)``; ``FinetuneError`` names the entry."""
    pairs = []
    for new, old in class_map.items():
        key = f"finetune.class_map.{new}"
        if new in class_names:
            new_idx = list(class_names).index(new)
        elif new.isdigit():
            new_idx = int(new)
        else:
            names = ", ".join(class_names[:20]) + (" ..." if len(class_names) > 20 else "")
            raise FinetuneError(f"{key}: {new!r} is not a class of the dataset ({names or 'no class names'})")
        if not 0 <= new_idx < num_classes:
            raise FinetuneError(f"{key}: class {new_idx} is out of range (the run has {num_classes} classes)")
        if isinstance(old, int) or old.isdigit():
            old_idx = int(old)
        elif old in source_names:
            old_idx = list(source_names).index(old)
        else:
            hint = (
                f"its classes: {', '.join(source_names[:20])}{' ...' if len(source_names) > 20 else ''}"
                if source_names
                else "it carries no class names: give the source class as an index (ImageNet: sorted wnid order)"
            )
            raise FinetuneError(f"{key}: the source model has no class {old!r} ({hint})")
        if not 0 <= old_idx < source_classes:
            raise FinetuneError(
                f"{key}: source class {old_idx} is out of range (the source model has {source_classes} classes)"
            )
        pairs.append((new_idx, old_idx))
    return tuple(pairs)


def check_source(
    init: str,
    class_map: Mapping[str, int | str],
    model: nn.Module,
    *,
    class_names: Sequence[str],
    tracking_uri: str | None = None,
    endpoint: str | None = None,
) -> tuple[tuple[int, int], ...]:
    """Driver-side check: the source resolves, is a checkpoint, shares tensors with ``model`` (built on
    the meta device is enough) and the class map resolves. Returns the resolved class map."""
    from fractalgen.models.checkpoint import (
        _CONFIG_KEY,
        CheckpointError,
        _args_dict,
        read_checkpoint,
    )  # deferred: heavy import

    with tempfile.TemporaryDirectory(prefix="fractalgen-finetune-") as work:
        path = fetch_source(init, work, tracking_uri=tracking_uri, endpoint=endpoint)
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError as err:
            raise FinetuneError(f"finetune.init: {err}") from None
    source = ckpt["model"]
    own = model.state_dict()
    fitting = sum(
        v.numel() for k, v in own.items() if k in source and tuple(source[k].shape) == tuple(v.shape)
    )
    total = sum(v.numel() for v in own.values())
    if fitting < MIN_LOADED_FRACTION * total:
        raise FinetuneError(
            f"finetune.init: {init} holds only {fitting / total:.0%} of the run's model weights (tensors "
            f"whose name and shape fit): weights of another architecture? Its model: "
            f"{_describe_source(ckpt)}"
        )
    args = _args_dict(ckpt.get("args"))
    stored = args.get(_CONFIG_KEY) or {}
    source_names = [str(c) for c in (args.get("class_names") or stored.get("class_names") or ())]
    source_classes = int(source[CLASS_EMBEDDING].shape[0]) if CLASS_EMBEDDING in source else 0
    num_classes = int(own[CLASS_EMBEDDING].shape[0]) if CLASS_EMBEDDING in own else 1
    return resolve_class_map(
        class_map,
        class_names=class_names,
        num_classes=num_classes,
        source_names=source_names,
        source_classes=source_classes,
    )


def _describe_source(ckpt: dict[str, Any]) -> str:
    from fractalgen.models.checkpoint import CheckpointError, config_from_checkpoint  # deferred: heavy import

    try:
        name, config = config_from_checkpoint(ckpt)
    except CheckpointError:
        return "unknown"
    return f"{name} (levels {list(config.img_sizes)}, widths {list(config.widths)})"


def load_pretrained(
    model: nn.Module,
    init: str,
    class_map: Sequence[tuple[int, int]],
    *,
    tracking_uri: str | None = None,
    endpoint: str | None = None,
) -> InitReport:
    """Worker side: fetch the source into a temporary folder and load every fitting tensor."""
    with tempfile.TemporaryDirectory(prefix="fractalgen-finetune-") as work:
        path = fetch_source(init, work, tracking_uri=tracking_uri, endpoint=endpoint)
        report = init_from_checkpoint(model, path, class_map=dict(class_map) or None)  # type: ignore[arg-type]
    report.source = init
    return report


def freeze_levels(model: nn.Module, levels: Sequence[int]) -> list[str]:
    """``requires_grad=False`` for the parameters of ``levels`` (the class embedding stays trainable)."""
    frozen = []
    for name, param in model.named_parameters():
        if parameter_level(name) in levels and name != CLASS_EMBEDDING:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def level_lr_scale(name: str, scales: Sequence[float]) -> float:
    """The learning-rate multiplier of parameter ``name`` (1.0 for levels past the list)."""
    level = parameter_level(name)
    return float(scales[level]) if level < len(scales) else 1.0


def report_dict(report: InitReport, frozen: Sequence[str]) -> dict[str, Any]:
    """The init report as written to ``init_report.json``."""
    return {**dataclasses.asdict(report), "frozen": list(frozen)}

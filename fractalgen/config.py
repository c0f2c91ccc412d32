"""Typed configuration: keyword-only dataclasses per subsystem, YAML as their file form.

Terms:
- *section*: a dataclass (``TrainConfig``, ``DataConfig`` ...); nested sections are fields whose type
  is another dataclass.
- *dotted override*: ``key.sub=value`` as given to ``--set``; the value is parsed as YAML and
  checked against the field's type.

``from_dict`` rejects unknown keys and wrong types with a ``ConfigError`` naming the dotted key, so a
bad recipe fails before any Ray resources are requested.

Why our own coercion (``_convert``, ``from_dict``) and not pydantic (installed as a dependency of
Ray and MLflow), checked with pydantic 2.14 validating ``TrainRunConfig`` through ``TypeAdapter``:
pydantic's lax mode accepts what we refuse (``zero_stage: true`` passes as the literal 1, ``"2"`` as
an integer, ``"yes"`` as true), and its strict mode refuses a mapping for a dataclass section and the
string ``"5e-5"`` that PyYAML makes of an exponent without a dot. Matching our rules would take a
strictness annotation on every field plus a float validator (``to_float`` stays anyway: the float
command-line options and the served model use it), and a translation of pydantic's error types and
locations into our messages (``train.base_lr: expected a number, got 'abc'``; an unknown key listing
the valid ones). That replaces the ~90 lines of ``_convert`` and ``from_dict`` with about as many
lines of adaptation, spread over every section, and makes pydantic, whose version Ray and MLflow
choose, a direct dependency of our error messages. The ``__post_init__`` validators stay either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from fractalgen.sampling_settings import SamplingSettings

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the dotted key."""


def to_float(value: Any, key: str) -> float:
    """A finite float from a YAML or command-line value; ``ConfigError`` naming ``key`` otherwise.

    The one coercion for every float setting (config fields and float command-line options): NaN and
    +-inf are refused, and so are integers too large for a float.
    """
    if isinstance(value, str):
        # PyYAML (YAML 1.1) reads "5e-5" (no dot) as a string: accept number-like strings
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    else:
        try:
            number = float(value)
        except OverflowError:  # an int beyond the float range
            raise ConfigError(
                f"{key}: an integer of {value.bit_length()} bits is too large for a number"
            ) from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return number


def finite_float(text: str) -> float:
    """``argparse`` type for float options: a finite number (argparse names the option, exit 2)."""
    try:
        return to_float(text, "value")
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("value: ")) from None


def positive_float(text: str) -> float:
    """``argparse`` type for float options that must be finite and > 0."""
    number = finite_float(text)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return number


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert YAML forms (lists -> tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _convert(value, arm, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        # same type too: true == 1 and 2.0 == 2 in Python, but neither is the literal 1 or 2
        if not any(value == arg and type(value) is type(arg) for arg in args):
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (tuple, list, Sequence):
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            items = [_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is not list else list(items)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {str(k): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        return to_float(value, key)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a mapping; unknown keys and bad values raise ``ConfigError``."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_), key=str)  # YAML keys may be numbers, null, booleans
    if unknown:
        key = unknown[0]
        plain = isinstance(key, str) and key and key.isprintable() and key.strip() == key
        shown = key if plain else repr(key)  # '' and ' x' quoted, so the message shows them
        raise ConfigError(
            f"unknown key {prefix}{shown} (valid keys of {prefix.rstrip('.') or cls.__name__}: "
            f"{', '.join(sorted(types_))})"
        )
    kwargs = {name: _convert(value, types_[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from None
    except ValueError as err:  # __post_init__ validation
        raise ConfigError(f"{prefix}{err}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """Plain YAML-able form of a config dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


class DuplicateKeyError(yaml.YAMLError):
    """A mapping in a recipe (or an override's value) gives the same key twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error, not "the last wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # merge keys ("<<") may be overridden; complex keys: the base class checks
            key = self.construct_object(key_node, deep=False)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # unhashable: the base class reports it
                continue
            if first is not key_node:
                raise DuplicateKeyError(
                    f"duplicate key {key!r} on line {key_node.start_mark.line + 1} "
                    f"(first on line {first.start_mark.line + 1})"
                )
        return super().construct_mapping(node, deep=deep)


def _check_acyclic(obj: Any, parents: set[int], done: set[int]) -> None:
    """An alias inside its own anchor (``&a [*a]``) makes a value that contains itself: refused.

    Each list or mapping is walked once, however many aliases share it (no blow-up on nested aliases).
    """
    if not isinstance(obj, list | dict) or id(obj) in done:
        return
    if id(obj) in parents:
        raise yaml.YAMLError("a value contains itself (an alias inside its own anchor)")
    parents.add(id(obj))
    for item in obj.values() if isinstance(obj, dict) else obj:
        _check_acyclic(item, parents, done)
    parents.discard(id(obj))
    done.add(id(obj))


def parse_yaml(text: str, name: str | None = None) -> Any:
    """YAML as recipes and overrides are read: the safe loader, a duplicate key refused.

    Raises ``yaml.YAMLError`` for anything that is not a plain YAML document: a syntax error, a
    duplicate key (``DuplicateKeyError``), a value its tag cannot build (``!!int x``, the date
    2020-13-01), a value that contains itself, nesting too deep to read. ``name`` (a file name)
    appears in the error positions.
    """
    loader = _UniqueKeyLoader(text)
    if name is not None:
        loader.name = name
    try:
        data = loader.get_single_data()
        _check_acyclic(data, set(), set())
    except (ValueError, TypeError, OverflowError) as err:  # from PyYAML's scalar constructors
        raise yaml.YAMLError(f"a value cannot be read: {err}") from None
    except RecursionError:
        raise yaml.YAMLError("the nesting is too deep") from None
    finally:
        loader.dispose()
    return data


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["train.zero_stage=3", "model.name=x"]`` into a nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        parts = [part.strip() for part in key.split(".")]
        if not all(parts):
            raise ConfigError(f"override {item!r}: {key} has an empty part (key.sub=value)")
        key = ".".join(parts)
        try:
            value = parse_yaml(raw, name=f"--set {key}") if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"{key}: the value {raw!r} is not valid YAML: {err}") from None
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return nested


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``update`` wins, nested mappings merge."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML recipe file; ``ConfigError`` naming the file when it cannot be one.

    Refused: a missing or unreadable file, text that is not UTF-8 or not YAML, a key given twice in
    one mapping, an empty file (no settings at all: pass no file to mean the defaults) and a top
    level that is not a mapping.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {err.start}, line {line}): save it as UTF-8"
        ) from None
    try:
        loaded = parse_yaml(text, name=str(path))
    except DuplicateKeyError as err:
        raise ConfigError(f"config file {path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if loaded is None:
        raise ConfigError(
            f"config file {path} is empty (no settings): give a recipe with its sections, e.g. from configs/"
        )
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from a YAML file (or its defaults when ``path`` is None) plus dotted overrides."""
    data = read_recipe(path) if path is not None else {}
    data = merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def save(obj: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML (the resolved config stored with runs and checkpoints)."""
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


def dumps(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


# =====================================================================================================
# Training runs (``fractalgen train``): the recipe in configs/*.yaml. Terms:
# - *global* values count over all workers (``global_batch_size``); *per-GPU* / *per-worker* values
#   count on one Ray worker (``micro_batch_per_gpu``; one worker drives one GPU, or one CPU process).
# - *step*: one optimizer update = ``global_batch_size`` images = ``grad_accum_steps`` micro-batches
#   on every worker. *epoch*: ``num_images // global_batch_size`` steps (dataset summary).
# - *storage path*: a local folder or ``s3://`` prefix; the run's folder is ``<storage_path>/<name>``,
#   where Ray Train keeps its state and the checkpoints ``checkpoint_<step>``.
# =====================================================================================================

Precision = Literal["bf16", "fp32"]


@dataclass(kw_only=True)
class RunModelConfig:
    """The model to train: a registered size (``fractalgen.models.MODEL_CONFIGS``) and training options."""

    name: str = "fractalmar_tiny16"
    # None: the dataset's class count (its summary); released models use 1000 (ImageNet)
    num_classes: int | None = None
    # attention-probability and projection dropout (docs/model.md#mar-level: 0.1 in the released training)
    dropout: float = 0.1
    # probability of replacing the class embedding by the fake latent (docs/model.md#conditions: 0.1)
    label_drop_prob: float = 0.1
    # recompute block activations in backward (released recipe, docs/model.md#training-recipe; needed
    # at micro-batch 64 on 80 GB, docs/performance.md#reference-measurements)
    activation_checkpointing: bool = False
    # > 0: pad the masked patches each MAR level passes down to one of this many bucket sizes, so the
    # lower levels see fixed shapes and the selection needs no host sync (for torch.compile / CUDA
    # graphs; same loss as 0, see docs/performance.md); 0: exact-size selection (released behaviour)
    mask_buckets: int = 0
    # attention kernels (``fractalgen.models.layers.attend``): auto (SDPA; batched matmuls for huge
    # batches of short sequences on GPUs), sdpa, math, or fused (a Triton kernel for the pixel head's
    # 4-token sequences on GPUs, the rest as auto); all compute the same, speed: docs/performance.md
    attention: Literal["auto", "sdpa", "math", "fused"] = "auto"
    # architecture overrides of the registered size, one entry per level (pixel head last); None keeps
    # the size's own. Any sizes that divide evenly build, e.g. a 128x128 model: img_sizes [128, 16, 4, 1]
    # (``fractalgen inspect NAME --set img_sizes=...`` shows the cost first)
    img_sizes: tuple[int, ...] | None = None
    widths: tuple[int, ...] | None = None
    blocks: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    generators: tuple[str, ...] | None = None
    guiding_pixel: bool | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: must name a registered model")
        if self.mask_buckets < 0:
            raise ValueError(f"mask_buckets: must be >= 0, got {self.mask_buckets}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes: must be >= 1, got {self.num_classes}")
        for key in ("dropout", "label_drop_prob"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key}: must lie in [0, 1), got {getattr(self, key)}")

    def architecture(self) -> dict[str, Any]:
        """The architecture overrides that are set, as ``build_model`` keyword arguments."""
        keys = ("img_sizes", "widths", "blocks", "heads", "generators", "guiding_pixel")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass(kw_only=True)
class RunFinetuneConfig:
    """Start a new run from pretrained weights instead of a random initialisation (fine-tuning).

    Every tensor whose name and shape fit the model loads; the class embedding of a model with another
    class count keeps its fresh initialisation, unless ``class_map`` says which source rows to copy.
    Applies when the run starts (a relaunch resumes from the run's own checkpoints instead).
    """

    # released:PATH (the public checkpoint-last.pth), a released-format file (local or s3://, e.g.
    # ``fractalgen export`` output), a registered version models:/NAME/VERSION or models:/NAME@ALIAS,
    # or a training checkpoint / run folder (its consolidated weights); None: random initialisation
    init: str | None = None
    # new class (a name of the dataset's classes, or an index) -> source class (an index of the source
    # model, e.g. ImageNet's sorted-wnid index, or a class name the source model carries)
    class_map: dict[str, int | str] = dataclasses.field(default_factory=dict)
    # levels whose loaded weights stay fixed (0 = the top level with the class embedding's level; the
    # class embedding itself always trains, since it is new when the class count changes)
    freeze_levels: tuple[int, ...] = ()
    # learning-rate multiplier per level (top level first; missing levels: 1.0), e.g. [0.1, 0.5, 1.0]
    level_lr_scale: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.init is not None and not self.init.strip():
            raise ValueError("init: must name a checkpoint (or be null)")
        if (self.class_map or self.freeze_levels) and not self.init:
            raise ValueError("class_map / freeze_levels: need finetune.init (the weights to start from)")
        if any(level < 0 for level in self.freeze_levels):
            raise ValueError(f"freeze_levels: levels are >= 0, got {list(self.freeze_levels)}")
        if any(scale < 0 for scale in self.level_lr_scale):
            raise ValueError(f"level_lr_scale: multipliers must be >= 0, got {list(self.level_lr_scale)}")


@dataclass(kw_only=True)
class RunDataConfig:
    """Where the training images are: a prepared MDS dataset (``fractalgen data prepare``)."""

    train_uri: str = ""  # folder or s3:// prefix holding index.json and summary.json (required)
    eval_uri: str | None = None  # held-out set for bits/dim at each eval (None: no NLL at eval)
    s3_endpoint_url: str | None = None  # S3-compatible store; None: S3_ENDPOINT_URL / AWS_ENDPOINT_URL*
    local_cache: str | None = None  # shard cache per node for s3:// data; None: a fresh temporary folder
    loader_workers: int = 2  # DataLoader processes per Ray worker (decoding)
    shuffle: bool = True
    flip: bool = True  # random horizontal flip (docs/model.md#training-recipe)
    # record the source key of every sample trained on, per step and worker, in each checkpoint
    # (audits "no sample repeated or skipped" across restarts; small cost, off for production)
    record_samples: bool = False

    def __post_init__(self) -> None:
        if self.loader_workers < 0:
            raise ValueError(f"loader_workers: must be >= 0, got {self.loader_workers}")


@dataclass(kw_only=True)
class RunTrainConfig:
    """Optimisation (released recipe: docs/model.md#training-recipe) and the DeepSpeed engine."""

    # images per optimizer step over all workers (released: 2048 at 64x64, 1024 at 256x256)
    global_batch_size: int = 1024
    micro_batch_per_gpu: int = 32  # images per forward/backward on one worker
    epochs: float = 800.0  # released: 800 (Huge: 600)
    warmup_epochs: float = 40.0  # linear warm-up, then cosine to min_lr, adjusted every step
    # learning rate per 256 images: lr = base_lr * global_batch_size / 256 (released: 5e-5)
    base_lr: float = 5e-5
    min_lr: float = 0.0
    weight_decay: float = 0.05  # not applied to biases and 1-D parameters (as released)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 3.0  # global gradient-norm clipping; 0 disables
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False  # ZeRO 1-3: optimizer state and step on the CPU
    offload_params: bool = False  # ZeRO 3 only: parameters on the CPU between uses
    precision: Precision = "bf16"
    seed: int = 0
    max_steps: int | None = None  # stop after this step (smoke runs, tests); the schedule keeps `epochs`
    log_every_steps: int = 50  # progress line, MLflow metrics, non-finite check (one host sync each)

    def __post_init__(self) -> None:
        for key in ("global_batch_size", "micro_batch_per_gpu", "log_every_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.epochs <= 0:
            raise ValueError(f"epochs: must be > 0, got {self.epochs}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                f"warmup_epochs: must lie in [0, epochs] (epochs {self.epochs}), got {self.warmup_epochs}"
            )
        if self.base_lr <= 0:
            raise ValueError(f"base_lr: must be > 0, got {self.base_lr}")
        for key in ("min_lr", "weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas: must lie in [0, 1), got {self.betas}")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params: needs zero_stage 3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer: needs zero_stage 1, 2 or 3")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps: must be >= 1, got {self.max_steps}")
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")


@dataclass(kw_only=True)
class RunClusterConfig:
    """Ray resources: one Ray Train worker per GPU (or per CPU process when ``gpus_per_worker`` is 0)."""

    num_workers: int = 2
    gpus_per_worker: int = 0  # 0: CPU training with gloo; 1: one GPU per worker with NCCL
    cpus_per_worker: int = 1
    # Ray address (``auto``, ``ray://host:10001``); None: RAY_ADDRESS (set by ``ray job submit``), else
    # a local Ray started for this run
    address: str | None = None
    # worker failures (a killed process, a lost node) to recover from the latest checkpoint before
    # the run fails (Ray's own default, 0, would give up at the first one)
    max_failures: int = 3

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers: must be >= 1, got {self.num_workers}")
        if self.gpus_per_worker not in (0, 1):
            raise ValueError(
                f"gpus_per_worker: must be 0 (CPU) or 1 (one GPU per worker), got {self.gpus_per_worker}"
            )
        if self.cpus_per_worker < 1:
            raise ValueError(f"cpus_per_worker: must be >= 1, got {self.cpus_per_worker}")
        if self.max_failures < -1:
            raise ValueError(f"max_failures: must be >= 0 (or -1: no limit), got {self.max_failures}")


@dataclass(kw_only=True)
class RunCheckpointConfig:
    """Where the run's checkpoints go, how often, and which are kept."""

    storage_path: str = "runs"  # local folder or s3://bucket/prefix; the run lives in <storage_path>/<name>
    s3_endpoint_url: str | None = None  # S3-compatible store; None: S3_ENDPOINT_URL / AWS_ENDPOINT_URL*
    every_steps: int = 1000  # also at the last step
    keep_last: int = 3  # the latest N checkpoints are kept ...
    keep_best: bool = True  # ... and the one with the lowest training loss
    # start a NEW run from this checkpoint (weights, optimizer, step, loader position) when the run
    # has none of its own; resuming a run needs no setting: relaunch it with the same name
    init_from: str | None = None

    def __post_init__(self) -> None:
        if not self.storage_path:
            raise ValueError("storage_path: must be a folder or s3:// prefix")
        if self.every_steps < 1:
            raise ValueError(f"every_steps: must be >= 1, got {self.every_steps}")
        if self.keep_last < 1:
            raise ValueError(
                f"keep_last: must be >= 1 (the latest checkpoint resumes the run), got {self.keep_last}"
            )


@dataclass(kw_only=True)
class RunMlflowConfig:
    """MLflow tracking. Rank 0 logs; a server that stops answering mid-run only delays the logging."""

    enabled: bool = True
    # None: MLFLOW_TRACKING_URI, else a SQLite store <storage_path>/mlflow.db (local storage only)
    tracking_uri: str | None = None
    experiment: str = "fractalgen"
    # seconds to wait for the server at start; an unreachable server then stops the launch (before
    # any Ray resources) unless ``mlflow.required`` is false, which trains untracked with a warning
    connect_timeout_s: float = 15.0
    required: bool = True

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ValueError("experiment: must not be empty")
        if self.connect_timeout_s <= 0:
            raise ValueError(f"connect_timeout_s: must be > 0, got {self.connect_timeout_s}")


@dataclass(kw_only=True)
class RunEvalConfig:
    """Periodic evaluation on rank 0: a class-conditional sample grid (PNG to MLflow), bits/dim."""

    every_steps: int = 0  # 0: only at the end of the run
    num_images: int = 16  # images in the sample grid (classes cycle)
    # the grid's sampling settings (fractalgen/sampling_settings.py); None: the model's default
    sample_iters: tuple[int, ...] | None = None  # iterations per level (SamplingSettings.num_iters)
    cfg: float | None = None  # guidance scale
    temperature: float | None = None  # multiplies the logits (released meaning)
    nll_batches: int = 4  # micro-batches of data.eval_uri for bits/dim (when set)
    seed: int = 0
    cfg_schedule: str | None = None  # e.g. linear, power-cosine:exponent=3, interval:start=0.2,end=0.8
    lower_cfg: float | None = None  # guidance of the levels below the top (None: released)
    lower_cfg_schedule: str | None = None
    temperature_end: float | None = None  # linear temperature ramp over the top level's steps
    filter_threshold: float = 1e-4

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"every_steps: must be >= 0, got {self.every_steps}")
        for key in ("num_images", "nll_batches"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        self.sampling()  # SamplingSettings' checks, before the run starts

    def sampling(self, *, unconditional: bool = False) -> SamplingSettings:
        """The grid's sampling settings; an ``unconditional`` (1-class) model samples unguided."""
        try:
            return SamplingSettings(
                num_iters=self.sample_iters,
                cfg=None if unconditional else self.cfg,
                cfg_schedule=self.cfg_schedule,
                lower_cfg=None if unconditional else self.lower_cfg,
                lower_cfg_schedule=self.lower_cfg_schedule,
                temperature=self.temperature,
                temperature_end=self.temperature_end,
                filter_threshold=self.filter_threshold,
            )
        except ValueError as err:
            raise ValueError(str(err).replace("num_iters", "sample_iters")) from None


@dataclass(kw_only=True)
class TrainRunConfig:
    """One training run: the file form is a YAML recipe in configs/ (``fractalgen train --config``)."""

    name: str = "fractalgen"  # the run's name: Ray run folder <storage_path>/<name>, MLflow run name
    model: RunModelConfig = dataclasses.field(default_factory=RunModelConfig)
    data: RunDataConfig = dataclasses.field(default_factory=RunDataConfig)
    train: RunTrainConfig = dataclasses.field(default_factory=RunTrainConfig)
    cluster: RunClusterConfig = dataclasses.field(default_factory=RunClusterConfig)
    checkpoint: RunCheckpointConfig = dataclasses.field(default_factory=RunCheckpointConfig)
    finetune: RunFinetuneConfig = dataclasses.field(default_factory=RunFinetuneConfig)
    mlflow: RunMlflowConfig = dataclasses.field(default_factory=RunMlflowConfig)
    eval: RunEvalConfig = dataclasses.field(default_factory=RunEvalConfig)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name: must be a plain folder name, got {self.name!r}")
        if self.finetune.init and self.checkpoint.init_from:
            raise ValueError(
                "finetune.init and checkpoint.init_from: set one (finetune.init loads weights only; "
                "checkpoint.init_from continues another run with its optimizer, step and loader position)"
            )
        t, c = self.train, self.cluster
        per_step = t.micro_batch_per_gpu * c.num_workers
        if t.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size: {t.global_batch_size} is not a multiple of "
                f"train.micro_batch_per_gpu ({t.micro_batch_per_gpu}) x cluster.num_workers ({c.num_workers})"
            )

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per worker per optimizer step."""
        return self.train.global_batch_size // (self.train.micro_batch_per_gpu * self.cluster.num_workers)

    @property
    def lr(self) -> float:
        """Peak learning rate: ``base_lr`` x global batch / 256 (docs/model.md#training-recipe)."""
        return self.train.base_lr * self.train.global_batch_size / 256

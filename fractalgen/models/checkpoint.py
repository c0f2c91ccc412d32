"""Released checkpoint format: ``checkpoint-last.pth`` holding ``{"model": state_dict, "args":
argparse.Namespace, ...}`` (optimizer, epoch and scaler entries may also be present).

Loading never unpickles arbitrary objects: ``torch.load(weights_only=True)`` with ``argparse.Namespace``
as the only extra allowed global (``safe_load``, which the DeepSpeed files of training checkpoints go
through too, with their own allow-list: ``fractalgen/platform/artifacts/checkpoints.py``). A file that holds
anything else is refused, naming the file and the refused objects; it is never retried unsafely.
Weights load strictly (names and shapes must all match).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fractalgen.models.configs import MODEL_CONFIGS, RELEASED_NAMES, FractalConfig, get_config
from fractalgen.models.fractal import FractalGen

# fields of FractalConfig that may differ from the registered size when rebuilding from ``args``
_CONFIG_KEY = "fractalgen_config"


class CheckpointError(ValueError):
    """A checkpoint file (released format, or a DeepSpeed file of a training checkpoint) is missing,
    is not what it should be (foreign, corrupt, or holding objects safe loading refuses), or does
    not fit the model. The message names the file."""


# lines of torch.load's weights_only error that are advice, not the reason (the retry it suggests,
# weights_only=False, is what safe loading exists to avoid)
_TORCH_ADVICE = (
    "weights only load failed",
    "weights_only",
    "please file an issue",
    "check the documentation",
)


def _global_names(allowed: Sequence[Any]) -> set[str]:
    """The pickle names (``module.qualname``) of a ``torch.serialization.safe_globals`` list."""
    names = set()
    for entry in allowed:
        if isinstance(entry, tuple):
            names.add(entry[1])
        else:
            names.add(f"{entry.__module__}.{entry.__qualname__}")
    return names


def load_failure(path: str | os.PathLike[str], err: BaseException, allowed: Sequence[Any] = ()) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in a few words and without PyTorch's advice.

    Names the pickled globals outside torch's and ``allowed``'s allow-lists when the file has any
    (read from the pickle's opcodes: nothing is executed); else the first line of torch's reason.
    """
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip archive (a legacy or foreign file): fall back to torch's message
        found = []
    refused = sorted(set(found) - _global_names(allowed))
    if refused:
        more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
        return f"it holds pickled Python objects that safe loading refuses ({', '.join(refused[:5])}{more})"
    for line in str(err).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not any(a in line.lower() for a in _TORCH_ADVICE):
            return f"torch.load failed: {line}"
    return f"torch.load failed: {type(err).__name__}"


def safe_load(
    path: str | os.PathLike[str], *, what: str, allowed: Sequence[Any] = (), mmap: bool = False
) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU with ``allowed`` as the only extra globals
    (``torch.serialization.safe_globals`` entries). ``CheckpointError`` naming ``path`` and saying it
    is not ``what`` ("a released-format checkpoint" ...) when the file is missing or does not load."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path} does not exist (expected {what})")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # corrupt, truncated or foreign files fail in many ways inside torch.load
        raise CheckpointError(f"{path} is not {what}: {load_failure(path, err, allowed)}") from None


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint dict, loaded safely (weights_only with an allow-list of argparse.Namespace)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    obj = safe_load(path, what="a released-format checkpoint", allowed=[argparse.Namespace])
    if not isinstance(obj, dict) or "model" not in obj or not isinstance(obj["model"], dict):
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path} has no 'model' state dict entry (found: {keys})")
    return obj


def _args_dict(args: Any) -> dict[str, Any]:
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


def config_from_checkpoint(ckpt: dict[str, Any], name: str | None = None) -> tuple[str, FractalConfig]:
    """The model name and configuration a checkpoint was written for.

    Order: the explicit ``name``; else ``args.fractalgen_config`` (written by ``save_released``) or
    ``args.model``; else the registered size whose state_dict names and shapes match.
    """
    args = _args_dict(ckpt.get("args"))
    stored = args.get(_CONFIG_KEY)
    if name is None and isinstance(args.get("model"), str) and args["model"] in MODEL_CONFIGS:
        name = args["model"]
    if isinstance(stored, dict):
        fields = {f.name for f in dataclasses.fields(FractalConfig)}
        overrides = {k: v for k, v in stored.items() if k in fields}
        base = name or str(args.get("model") or "")
        if base in MODEL_CONFIGS:
            return base, get_config(base, **overrides)
        return base or "custom", FractalConfig(**overrides)
    if name is not None:
        return name, get_config(name)
    shapes = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
    for candidate in (*RELEASED_NAMES, *sorted(set(MODEL_CONFIGS) - set(RELEASED_NAMES))):
        with torch.device("meta"):
            ref = FractalGen(get_config(candidate)).state_dict()
        if {k: tuple(v.shape) for k, v in ref.items()} == shapes:
            return candidate, get_config(candidate)
    raise CheckpointError("cannot tell which model this checkpoint is for: pass name=...")


def load_released(path: str | os.PathLike[str], name: str | None = None, **overrides: Any) -> FractalGen:
    """A model holding the weights of a released-format checkpoint, loaded strictly.

    ``name``: the registered size (``fractalmar_in64`` ...); inferred from the file when omitted.
    ``overrides``: FractalConfig fields that do not change parameter shapes (dropout, checkpointing).
    """
    ckpt = read_checkpoint(path)
    name, config = config_from_checkpoint(ckpt, name)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    with torch.device("meta"):
        model = FractalGen(config)
    try:
        model.load_state_dict(ckpt["model"], strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit {name}: {str(err).splitlines()[0]} ...\n{err}") from None
    # non-persistent buffers (RoPE tables, normalisation constants) are not in the file
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers()
    model.eval()
    return model


def save_released(
    model: FractalGen | dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    args: dict[str, Any] | argparse.Namespace | None = None,
    config: FractalConfig | None = None,
    **extra: Any,
) -> Path:
    """Write ``{"model": state_dict, "args": Namespace, **extra}`` atomically (temp file + rename).

    ``args`` gains ``fractalgen_config`` (the architecture) so the file rebuilds without a name.
    """
    if isinstance(model, FractalGen):
        config = config or model.config
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    else:
        state = {k: v.detach().cpu() for k, v in model.items()}
    ns = dict(_args_dict(args) if not isinstance(args, argparse.Namespace) else vars(args))
    if config is not None:
        ns[_CONFIG_KEY] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
        }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"model": state, "args": argparse.Namespace(**ns), **extra}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@dataclasses.dataclass
class InitReport:
    """What ``init_from_checkpoint`` did, tensor by tensor (recorded with fine-tuning runs)."""

    source: str
    loaded: list[str]  # copied unchanged from the source
    reinitialised: list[str]  # kept at their fresh initialisation (shape differs or not in the source)
    mapped: list[str]  # class-embedding rows copied through a class table
    unused: list[str]  # source tensors the model has no place for

    def summary(self) -> str:
        return (
            f"initialised from {self.source}: {len(self.loaded)} tensors loaded, "
            f"{len(self.reinitialised)} re-initialised ({', '.join(self.reinitialised) or 'none'}), "
            f"{len(self.mapped)} mapped by class table, {len(self.unused)} unused"
        )


def init_from_checkpoint(
    model: FractalGen,
    path: str | os.PathLike[str],
    *,
    class_map: dict[int, int] | None = None,
) -> InitReport:
    """Load every tensor of a released-format checkpoint whose name and shape fit ``model``.

    For fine-tuning on another dataset: tensors whose shape differs (the class embedding when the
    class count differs) keep their fresh initialisation, unless ``class_map`` (new class index ->
    source class index) says which source rows to copy into the new class embedding.
    """
    ckpt = read_checkpoint(path)
    source = ckpt["model"]
    own = model.state_dict()
    loaded, reinit, mapped = [], [], []
    with torch.no_grad():
        for name, tensor in own.items():
            src = source.get(name)
            if name == "class_emb.weight" and class_map:
                for new, old in class_map.items():
                    if not 0 <= new < tensor.size(0) or src is None or not 0 <= old < src.size(0):
                        raise CheckpointError(f"class map entry {new} -> {old} is out of range")
                    tensor[new].copy_(src[old].to(tensor.dtype))
                mapped.append(name)
                if len(class_map) < tensor.size(0):
                    reinit.append(f"{name}[{tensor.size(0) - len(class_map)} unmapped rows]")
            elif src is not None and tuple(src.shape) == tuple(tensor.shape):
                tensor.copy_(src.to(tensor.dtype))
                loaded.append(name)
            else:
                reinit.append(name)
    unused = sorted(set(source) - set(own))
    return InitReport(str(path), loaded, reinit, mapped, unused)

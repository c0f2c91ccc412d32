"""Everything FractalGen does to DeepSpeed beyond its public API, in one place.

Checked against DeepSpeed ``CHECKED_VERSION``, the version pinned in ``constraints.txt`` and
``pyproject.toml``. ``tests/platform/test_deepspeed_compat.py`` runs each item below against the
installed DeepSpeed and fails when the version differs from ``CHECKED_VERSION`` or when what an
item relies on has changed. After a DeepSpeed upgrade: re-check each item against the new source,
then set ``CHECKED_VERSION`` to the new pin.

1. ``skip_cpu_shm_op`` (a patch, CPU runs only). DeepSpeed's CPU accelerator JIT-compiles a
   shared-memory all-reduce when its comm backend starts (``TorchBackend.__init__`` calls the
   module-level ``deepspeed.comm.torch.build_shm_op``): 40-60 s of C++ on a fresh 2-core machine,
   measured. It serves only ``inference_all_reduce``; training collectives go through
   torch.distributed (gloo), so the patch replaces ``build_shm_op`` with a function that returns
   None, which the backend already accepts ("no shm op"). Relies on: the backend looking
   ``build_shm_op`` up in ``deepspeed.comm.torch`` when it starts, and accepting None.

2. ``walk_dataclass_outputs`` (a patch, ZeRO-3 only). ZeRO-3 gathers a module's partitioned weights
   again for backward through autograd hooks on the tensors its forward returns, and finds them by
   walking tuples, lists and dicts only (``apply_to_tensors_only`` in
   ``deepspeed.runtime.zero.utils``). A level hands the next one a ``Conditions`` dataclass
   (``fractalgen/models/conditions.py``), so without the patch its weights are still partitioned
   (empty) when backward reaches them ("size of tensor a (0) must match ..."). The patch replaces
   the name ``apply_to_tensors_only`` in ``deepspeed.runtime.zero.parameter_offload``, where the
   backward hooks look it up: dataclasses are walked field by field and rebuilt with
   ``dataclasses.replace``; tuples and lists are walked by the patch too (DeepSpeed's own function
   recurses into its own name, which would miss dataclasses inside tuples); everything else goes to
   DeepSpeed's function unchanged. Relies on: the hooks living in ``parameter_offload`` and calling
   ``apply_to_tensors_only(function, value, warning_msg_fn=...)`` by its module-global name, and
   DeepSpeed's function leaving unknown types (dataclasses) alone. When DeepSpeed learns to walk
   dataclasses itself, the test says so and the patch can go.

3. ``zero3_full_state_dict`` (a private function, no patch). The whole model's weights under ZeRO-3,
   gathered layer by layer onto rank 0: ``DeepSpeedEngine._zero3_consolidated_16bit_state_dict``,
   the function behind DeepSpeed's public ``save_16bit_model``, which only writes a file. Relies
   on: the method existing, callable with no argument, collective on every rank, returning the
   state dict on rank 0 and None elsewhere.

``import deepspeed`` happens inside the functions (Ray workers import it, the driver never does).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch

CHECKED_VERSION = "0.19.8"  # the DeepSpeed version the items above were last checked against
_MARK = "_fractalgen_patch"  # set on our replacement functions, so each patch applies once


def _no_shm_op() -> None:
    """Stands in for ``deepspeed.comm.torch.build_shm_op``: no shared-memory op (item 1)."""
    return None


setattr(_no_shm_op, _MARK, True)


def skip_cpu_shm_op() -> None:
    """Item 1: the CPU comm backend starts without compiling its shared-memory all-reduce."""
    # ``deepspeed.comm.torch`` is the attribute ``torch`` of the package ``deepspeed.comm``, which
    # is PyTorch itself there (``import deepspeed.comm.torch as m`` binds PyTorch): take the module
    import deepspeed.comm.torch  # noqa: F401  # deferred: heavy import

    sys.modules["deepspeed.comm.torch"].build_shm_op = _no_shm_op  # type: ignore[attr-defined]


def walk_dataclass_outputs() -> None:
    """Item 2: ZeRO-3's backward hooks find the tensors inside dataclass outputs (``Conditions``)."""
    import deepspeed.runtime.zero.parameter_offload as offload  # deferred: heavy import

    original = offload.apply_to_tensors_only
    if getattr(original, _MARK, False):
        return

    def apply_to_tensors_only(function: Any, value: Any, warning_msg_fn: Any = None) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = [f.name for f in dataclasses.fields(value) if f.init]
            return dataclasses.replace(
                value,
                **{
                    name: apply_to_tensors_only(function, getattr(value, name), warning_msg_fn)
                    for name in fields
                },
            )
        if isinstance(value, tuple | list) and not hasattr(value, "_fields"):
            return value.__class__(apply_to_tensors_only(function, v, warning_msg_fn) for v in value)
        return original(function, value, warning_msg_fn)

    setattr(apply_to_tensors_only, _MARK, True)
    apply_to_tensors_only.__wrapped__ = original  # type: ignore[attr-defined]
    offload.apply_to_tensors_only = apply_to_tensors_only


def zero3_full_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """Item 3: the whole model's weights under ZeRO-3 on rank 0, None on the other ranks.

    Collective: every rank must call it.
    """
    return engine._zero3_consolidated_16bit_state_dict()

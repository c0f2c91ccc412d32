"""What ``fractalgen.platform.training.deepspeed_compat`` relies on still holds in the installed DeepSpeed.

Every check runs the real DeepSpeed (no mocks). They fail when:
- the installed DeepSpeed is not the version pinned in ``constraints.txt``, or the pin moved without
  the module's ``CHECKED_VERSION`` (the items re-checked) following it;
- item 1 (``skip_cpu_shm_op``): the comm backend no longer looks up ``build_shm_op`` by its
  module-global name, or the patch does not leave the started backend without a shared-memory op;
- item 2 (``walk_dataclass_outputs``): the ZeRO-3 backward hooks moved out of ``parameter_offload``
  or stopped calling ``apply_to_tensors_only`` by name, its signature changed, DeepSpeed started
  walking dataclasses itself (then the patch can go), or ZeRO-3 training through a module whose
  output is a dataclass no longer fails without the patch and matches plain PyTorch with it;
- item 3 (``zero3_full_state_dict``): ``_zero3_consolidated_16bit_state_dict`` disappeared, needs an
  argument, or no longer returns the whole model's weights.

The ZeRO-3 run happens in a separate process (world size 1 over gloo), so the patches never touch
the test process's DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from platform_servers import free_port
from torch import nn

from fractalgen.platform.training import deepspeed_compat

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUN_TIMEOUT_S = 300


def _pin(name: str, path: Path) -> str | None:
    match = re.search(rf"^\s*\"?{re.escape(name)}==([^\s\",;]+)", path.read_text(), re.MULTILINE)
    return match.group(1) if match else None


def _nested_code(code: types.CodeType) -> list[types.CodeType]:
    found = [code]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found += _nested_code(const)
    return found


def test_installed_deepspeed_is_the_checked_one() -> None:
    import deepspeed

    constraint = _pin("deepspeed", ROOT / "constraints.txt")
    dependency = _pin("deepspeed", ROOT / "pyproject.toml")
    assert constraint == dependency, (
        f"constraints.txt pins deepspeed=={constraint}, pyproject.toml =={dependency}"
    )
    assert deepspeed.__version__ == constraint, (
        f"installed deepspeed {deepspeed.__version__} is not the pinned {constraint}: install the pin"
    )
    assert constraint == deepspeed_compat.CHECKED_VERSION, (
        f"deepspeed is pinned at {constraint} but fractalgen/platform/training/deepspeed_compat.py was "
        f"checked against {deepspeed_compat.CHECKED_VERSION}: re-check its items, then update CHECKED_VERSION"
    )


def _comm_torch() -> types.ModuleType:
    import deepspeed.comm.torch  # noqa: F401

    return sys.modules["deepspeed.comm.torch"]  # the package's attribute ``torch`` is PyTorch


def test_comm_backend_builds_its_shm_op_through_the_patched_name() -> None:
    ds_comm_torch = _comm_torch()

    assert inspect.signature(ds_comm_torch.build_shm_op).parameters == {}
    # a module-global lookup at start-up: replacing the module attribute takes effect
    assert "build_shm_op" in ds_comm_torch.TorchBackend.__init__.__code__.co_names


def test_zero3_backward_hooks_call_apply_to_tensors_only_by_name() -> None:
    import deepspeed.runtime.zero.parameter_offload as offload
    import deepspeed.runtime.zero.utils as zero_utils

    original = getattr(offload.apply_to_tensors_only, "__wrapped__", offload.apply_to_tensors_only)
    assert original is zero_utils.apply_to_tensors_only
    assert list(inspect.signature(original).parameters) == ["function", "value", "warning_msg_fn"]
    hooks = {
        code.co_name: code
        for cls in (offload.DeepSpeedZeRoOffload,)
        for _, func in inspect.getmembers(cls, inspect.isfunction)
        for code in _nested_code(func.__code__)
    }
    for name in ("_pre_backward_module_hook", "_post_backward_module_hook"):
        assert name in hooks, f"DeepSpeedZeRoOffload has no {name} any more"
        assert "apply_to_tensors_only" in hooks[name].co_names, (
            f"{name} no longer calls apply_to_tensors_only"
        )


@dataclasses.dataclass(frozen=True)
class _Out:
    vectors: torch.Tensor
    count: int | None = None


def test_deepspeed_still_skips_tensors_inside_dataclasses() -> None:
    """The reason for item 2; when this fails, DeepSpeed walks dataclasses and the patch can go."""
    import deepspeed.runtime.zero.utils as zero_utils

    seen: list[torch.Tensor] = []

    def touch(t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return t * 2

    a, b = torch.ones(2), torch.ones(3)
    walked = zero_utils.apply_to_tensors_only(touch, (a, [b], {"c": a}))
    assert len(seen) == 3 and torch.equal(walked[1][0], b * 2)  # containers are walked
    seen.clear()
    value = _Out(a, 1)
    assert zero_utils.apply_to_tensors_only(touch, value) is value and not seen, (
        "DeepSpeed now walks dataclasses: drop walk_dataclass_outputs from deepspeed_compat"
    )


def test_consolidation_is_callable_without_arguments() -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    method = getattr(DeepSpeedEngine, "_zero3_consolidated_16bit_state_dict", None)
    assert method is not None, "DeepSpeedEngine._zero3_consolidated_16bit_state_dict is gone"
    params = list(inspect.signature(method).parameters.values())[1:]
    assert all(p.default is not inspect.Parameter.empty for p in params), f"it now requires {params}"


# ------------------------------------------------------------------------- a real ZeRO-3 run
class _Level(nn.Module):
    """Uses its own parameter and returns a dataclass, like a level handing down ``Conditions``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8) / 3)

    def forward(self, x: torch.Tensor) -> _Out:
        return _Out(x @ self.weight, x.size(0))


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.head = _Level(), _Level(), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.second(self.first(x).vectors).vectors).pow(2).mean()


def _zero3_round(out: str, port: int) -> None:
    """One process, world size 1: ZeRO-3 steps without, then with, the patches; results to ``out``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    deepspeed_compat.skip_cpu_shm_op()  # before any engine: the comm backend starts with the first
    import deepspeed

    ds_comm_torch = _comm_torch()
    config = {
        "train_batch_size": 4,
        "train_micro_batch_size_per_gpu": 4,
        # no small parameter stays whole on every rank: every weight is partitioned after forward
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 62,
    }
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))

    def step() -> tuple[Any, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = _Model()
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                               dist_init_required=False)  # fmt: skip
        engine.backward(engine(x))
        engine.step()
        return engine, start

    result: dict[str, Any] = {}
    try:
        step()
        result["unpatched"] = "trained"
    except RuntimeError as err:
        result["unpatched"] = f"RuntimeError: {err}"
    result["shm_op_is_none"] = deepspeed.comm.comm.cdb.shm_comm_op is None
    result["build_shm_op_patched"] = ds_comm_torch.build_shm_op is deepspeed_compat._no_shm_op

    deepspeed_compat.walk_dataclass_outputs()
    engine, start = step()
    full = deepspeed_compat.zero3_full_state_dict(engine)
    reference = _Model()
    reference.load_state_dict(start)
    torch.optim.SGD(reference.parameters(), lr=0.1).zero_grad()
    reference(x).backward()
    with torch.no_grad():
        expected = {k: v - 0.1 * dict(reference.named_parameters())[k].grad for k, v in start.items()}
    result["keys"] = sorted(full)
    result["max_diff"] = max(float((full[k].float() - expected[k]).abs().max()) for k in expected)
    result["moved"] = max(float((expected[k] - start[k]).abs().max()) for k in expected)
    with open(out, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def zero3_round(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("zero3")
    out = folder / "result.json"
    code = (
        f"import sys; sys.path[:0] = [{str(HERE)!r}]; import test_deepspeed_compat as t; "
        f"t._zero3_round({str(out)!r}, {free_port()})"
    )
    env = dict(
        os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, check=False)  # fmt: skip
    assert proc.returncode == 0 and out.exists(), f"the ZeRO-3 process failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text())


def test_zero3_fails_on_dataclass_outputs_without_the_patch(zero3_round: dict[str, Any]) -> None:
    assert zero3_round["unpatched"] != "trained", (
        "ZeRO-3 now trains through dataclass outputs without walk_dataclass_outputs: drop the patch"
    )


def test_zero3_with_the_patch_matches_pytorch(zero3_round: dict[str, Any]) -> None:
    assert zero3_round["keys"] == sorted(["first.weight", "second.weight", "head.weight", "head.bias"])
    assert zero3_round["moved"] > 1e-4  # the step changed the weights, so the comparison means something
    assert zero3_round["max_diff"] < 1e-6, zero3_round


def test_cpu_comm_backend_started_without_shm_op(zero3_round: dict[str, Any]) -> None:
    assert zero3_round["build_shm_op_patched"] and zero3_round["shm_op_is_none"], zero3_round

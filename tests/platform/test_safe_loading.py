"""Loading a model source never unpickles arbitrary objects.

Real DeepSpeed checkpoints (ZeRO 0-3, 2 ranks over gloo, one optimizer step of ``fractalmar_tiny16``)
are written once per module by two plain processes (no Ray). On them:
- the safe consolidation (``checkpointing.consolidated_state_dict``) equals DeepSpeed's own
  ``zero_to_fp32`` bit for bit, and the weights the ranks held when they saved;
- the allow-list is exactly what the files hold;
- a checkpoint whose model-states or optimizer-states file was replaced by a code-running pickle is
  refused by every entry point (export, the model-source resolution behind sample / eval / registry /
  sweeps, fine-tuning's ``--init``, registering), the code does not run, and the error names the file.
Released-format files (``read_checkpoint``, serving) are refused the same way, and a file that is
not a checkpoint gets an error naming it, without PyTorch's advice to load it unsafely.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from platform_servers import free_port

from fractalgen.cli import main
from fractalgen.models import CheckpointError, build_model, save_released

HERE = Path(__file__).resolve().parent
STAGES = (0, 1, 2, 3)
WORLD = 2
LIVE_FILE = "live_weights.pt"  # rank 0's full weights at save time (written by the test, not training)
PRODUCE_TIMEOUT_S = 300


# ---------------------------------------------------------------------- real DeepSpeed checkpoints
def _write_checkpoints(root: str) -> None:
    """One rank (RANK / WORLD_SIZE / MASTER_* in the environment): for each ZeRO stage, one optimizer
    step, then the checkpoint folder as ``worker.report_and_checkpoint`` lays it out."""
    import torch.distributed as dist
    from test_train_support import tiny_config

    from fractalgen.config import to_dict
    from fractalgen.platform.artifacts.run_plan import DS_TAG, STATE_FILE, WorkerPlan, build_run_model
    from fractalgen.platform.training.engine import full_state_dict, setup_engine

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for stage in STAGES:  # ZeRO-3 last: it patches DeepSpeed's output walking for the process
        folder = os.path.join(root, f"stage{stage}")
        cfg = tiny_config(name=f"s{stage}", data="unused", storage_path=root, stage=stage, steps=1, every=1)
        plan = WorkerPlan(config=cfg, run_uri=root, num_images=80, num_classes=10, steps_per_epoch=10,
                          total_steps=40, stop_step=1)  # fmt: skip
        torch.manual_seed(0)
        model = build_run_model(plan)
        engine = setup_engine(model, cfg, steps_per_epoch=plan.steps_per_epoch, use_gpu=False)
        torch.manual_seed(1 + rank)
        for _ in range(cfg.grad_accum_steps):
            loss = engine(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))
            engine.backward(loss)
            engine.step()
        engine.save_checkpoint(folder, tag=DS_TAG)
        live = full_state_dict(engine)  # collective
        if rank == 0:
            torch.save(
                {k: v.detach().float().clone() for k, v in live.items()}, os.path.join(folder, LIVE_FILE)
            )
            with open(os.path.join(folder, "plan.json"), "w") as f:
                json.dump(to_dict(plan), f)
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump({"step": 1, "samples_seen": 8}, f)
        dist.barrier()
    dist.destroy_process_group()


def _run_ranks(root: Path, call: str) -> list[str]:
    """Run ``test_safe_loading.<call>`` in WORLD plain processes over gloo (one per rank); the
    ranks' outputs, or a failed assertion with their logs."""
    code = f"import sys; sys.path[:0] = [{str(HERE)!r}]; import test_safe_loading as t; t.{call}"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(WORLD),
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")  # fmt: skip
    procs = []
    for rank in range(WORLD):
        log = open(root / f"rank{rank}.log", "w+b")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(rank),
                                "LOCAL_RANK": str(rank)}, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        procs.append((proc, log))
    failed, outputs = [], []
    for rank, (proc, log) in enumerate(procs):
        try:
            rc = proc.wait(timeout=PRODUCE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        log.seek(0)
        text = log.read().decode(errors="replace")
        outputs.append(text)
        if rc != 0:
            failed.append(f"rank {rank} exit {rc}:\n{text[-3000:]}")
        log.close()
    assert not failed, f"{call} failed:\n" + "\n".join(failed)
    return outputs


@pytest.fixture(scope="module")
def ds_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """``{stage: checkpoint folder}`` of real DeepSpeed checkpoints (2 ranks), made once per module."""
    root = tmp_path_factory.mktemp("ds-checkpoints")
    _run_ranks(root, f"_write_checkpoints({str(root)!r})")
    return {stage: root / f"stage{stage}" for stage in STAGES}


def _resume(folder: str, stage: int) -> None:
    """One rank: a fresh engine of ``stage`` restores ``folder`` the way a resumed run does
    (``checkpointer.load_checkpoint``, DeepSpeed's own loading); prints RESUMED or REFUSED <message>."""
    import torch.distributed as dist
    from ray.train import Checkpoint
    from test_train_support import tiny_config

    from fractalgen.platform.artifacts.run_plan import WorkerPlan, build_run_model
    from fractalgen.platform.training.checkpointer import load_checkpoint
    from fractalgen.platform.training.engine import setup_engine

    class _NoLoader:
        def load_state_dict(self, state: Any) -> None:
            pass

    dist.init_process_group("gloo")
    cfg = tiny_config(name=f"s{stage}", data="unused", storage_path=folder, stage=stage, steps=1, every=1)
    plan = WorkerPlan(config=cfg, run_uri=folder, num_images=80, num_classes=10, steps_per_epoch=10,
                      total_steps=40, stop_step=1)  # fmt: skip
    engine = setup_engine(build_run_model(plan), cfg, steps_per_epoch=plan.steps_per_epoch, use_gpu=False)
    try:
        state, _ = load_checkpoint(
            engine, _NoLoader(), Checkpoint.from_directory(folder), rank=dist.get_rank()
        )
        print(f"RESUMED at step {state.step}")
    except RuntimeError as err:
        print(f"REFUSED {err}")
    dist.destroy_process_group()


# -------------------------------------------------------------------------- code-running pickles
class Payload:
    """Unpickling it writes ``marker`` (through ``builtins.exec``): proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').write('code ran while loading')",))


def _plant(file: Path, marker: Path) -> None:
    """Re-save a (trusted) DeepSpeed file with the payload inside, keeping everything else, so a full
    unpickler would run the payload and then load the file as usual."""
    states = torch.load(file, map_location="cpu", weights_only=False)  # our own file, just written
    states["payload"] = Payload(marker)
    torch.save(states, file)


# (stage, file in deepspeed/): a model-states file and a ZeRO optimizer-states file
PLANTED = {
    "model-states": (0, "mp_rank_00_model_states.pt"),
    "optimizer-states": (2, "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    "zero3-model-states": (3, "zero_pp_rank_1_mp_rank_00_model_states.pt"),
}


@pytest.fixture(params=sorted(PLANTED))
def planted(
    request: pytest.FixtureRequest, ds_checkpoints: dict[int, Path], tmp_path: Path
) -> dict[str, Path]:
    """A copy of a real checkpoint with one DeepSpeed file replaced by a code-running pickle."""
    stage, name = PLANTED[request.param]
    folder = tmp_path / "checkpoint"
    shutil.copytree(ds_checkpoints[stage], folder)
    file = folder / "deepspeed" / name
    marker = tmp_path / "marker"
    _plant(file, marker)
    return {"folder": folder, "file": file, "marker": marker}


def _refused(message: str, planted: dict[str, Path]) -> None:
    assert not planted["marker"].exists(), "the planted pickle ran code"
    assert str(planted["file"]) in message, message
    assert "builtins.exec" in message, message
    assert "weights_only" not in message, message


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("stage", STAGES)
def test_consolidation_equals_deepspeeds_zero_to_fp32(ds_checkpoints: dict[int, Path], stage: int) -> None:
    from fractalgen.platform.artifacts.checkpoints import consolidated_state_dict

    folder = ds_checkpoints[stage]
    ours = consolidated_state_dict(str(folder))
    if stage == 0:  # no partitions: DeepSpeed's model file holds the weights whole
        ref = torch.load(folder / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        ref = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="deepspeed")
    ref = {k: v.float() for k, v in ref.items()}
    assert list(ours) == list(ref)
    for name, value in ref.items():
        assert ours[name].dtype == value.dtype and torch.equal(ours[name], value), name
    live = torch.load(folder / LIVE_FILE, weights_only=True)
    assert set(ours) == set(live)
    for name, value in live.items():
        assert torch.equal(ours[name], value), name


def test_allow_list_is_what_deepspeeds_files_hold(ds_checkpoints: dict[int, Path]) -> None:
    """Model-state files need nothing beyond torch's defaults; optimizer files exactly the allow-list."""
    from fractalgen.platform.artifacts.checkpoints import OPTIMIZER_FILE_GLOBALS, read_ds_file

    allowed = {name for _, name in OPTIMIZER_FILE_GLOBALS}
    seen: set[str] = set()
    for stage, folder in ds_checkpoints.items():
        files = sorted(glob.glob(str(folder / "deepspeed" / "*.pt")))
        assert files, stage
        for file in files:
            found = set(torch.serialization.get_unsafe_globals_in_checkpoint(file))
            optimizer = file.endswith("_optim_states.pt")
            assert found <= (allowed if optimizer else set()), (file, found)
            seen |= found
            assert isinstance(read_ds_file(file, optimizer=optimizer), dict)
    assert seen == allowed


def test_export_refuses_a_planted_pickle(
    planted: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = planted["folder"].parent / "out.pth"
    assert main(["export", str(planted["folder"]), "--out", str(out)]) == 2
    _refused(capsys.readouterr().err, planted)
    assert not out.exists()


def test_model_source_refuses_a_planted_pickle(planted: dict[str, Path]) -> None:
    """The resolution that ``sample``, ``eval``, ``sweep`` and ``registry register`` share."""
    from fractalgen.platform.generation.sources import resolve_model_source

    with pytest.raises(CheckpointError) as err:
        resolve_model_source(str(planted["folder"]), work_dir=planted["folder"].parent / "work")
    _refused(str(err.value), planted)


def test_sample_refuses_a_planted_pickle(
    planted: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = planted["folder"].parent / "samples"
    assert main(["sample", "--model", str(planted["folder"]), "--out", str(out), "-q"]) == 2
    _refused(capsys.readouterr().err, planted)


def test_finetune_init_refuses_a_planted_pickle(planted: dict[str, Path]) -> None:
    from fractalgen.platform.training.finetune import FinetuneError, check_source, load_pretrained

    with pytest.raises(FinetuneError) as err:
        load_pretrained(build_model("fractalmar_tiny16"), str(planted["folder"]), ())
    _refused(str(err.value), planted)
    with torch.device("meta"):
        model = build_model("fractalmar_tiny16")
    with pytest.raises(FinetuneError) as err:
        check_source(str(planted["folder"]), {}, model, class_names=[])
    _refused(str(err.value), planted)


def test_register_refuses_a_planted_pickle(planted: dict[str, Path]) -> None:
    from fractalgen.platform.registry import RegistryError, register_checkpoint

    db = planted["folder"].parent / "mlflow.db"
    with pytest.raises(RegistryError) as err:
        register_checkpoint(str(planted["folder"]), "planted", tracking_uri=f"sqlite:///{db}")
    _refused(str(err.value), planted)


def test_a_deepspeed_file_that_is_not_one_is_named(ds_checkpoints: dict[int, Path], tmp_path: Path) -> None:
    from fractalgen.platform.artifacts.checkpoints import consolidated_state_dict

    folder = tmp_path / "checkpoint"
    shutil.copytree(ds_checkpoints[2], folder)
    file = folder / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    file.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        consolidated_state_dict(str(folder))
    message = str(err.value)
    assert str(file) in message and "is not a DeepSpeed optimizer-states file" in message, message
    assert "weights_only" not in message, message


# ----------------------------------------------------------------------- released-format files
@pytest.fixture
def planted_released(tmp_path: Path) -> dict[str, Path]:
    """A released-format checkpoint carrying a code-running pickle."""
    torch.manual_seed(0)
    file = save_released(build_model("fractalmar_tiny16"), tmp_path / "checkpoint-last.pth")
    marker = tmp_path / "marker"
    states = torch.load(file, weights_only=False)  # our own file, just written
    states["payload"] = Payload(marker)
    torch.save(states, file)
    return {"file": file, "marker": marker}


def test_released_file_with_a_planted_pickle_is_refused(
    planted_released: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from fractalgen.models import load_released

    with pytest.raises(CheckpointError) as err:
        load_released(planted_released["file"])
    _refused(str(err.value), planted_released)
    out = planted_released["file"].parent / "samples"
    assert main(["sample", "--model", str(planted_released["file"]), "--out", str(out), "-q"]) == 2
    _refused(capsys.readouterr().err, planted_released)


def test_serving_refuses_a_planted_pickle(planted_released: dict[str, Path]) -> None:
    from types import SimpleNamespace

    from fractalgen.platform.generation.serving import CHECKPOINT_ARTIFACT, FractalGenPyfunc

    context = SimpleNamespace(artifacts={CHECKPOINT_ARTIFACT: str(planted_released["file"])})
    with pytest.raises(CheckpointError) as err:
        FractalGenPyfunc().load_context(context)
    _refused(str(err.value), planted_released)


def test_not_a_checkpoint_says_what_the_file_is_not(tmp_path: Path) -> None:
    from fractalgen.models.checkpoint import read_checkpoint

    file = tmp_path / "notes.pth"
    file.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(file)
    message = str(err.value)
    assert message.startswith(f"{file} is not a released-format checkpoint"), message
    assert "weights_only" not in message and "trusted source" not in message, message


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_resume_restores_a_checkpoint_with_deepspeeds_loader_made_safe(
    ds_checkpoints: dict[int, Path], stage: int, tmp_path: Path
) -> None:
    """The allow-list is enough for DeepSpeed's own loading (resume, ``checkpoint.init_from``)."""
    outputs = _run_ranks(tmp_path, f"_resume({str(ds_checkpoints[stage])!r}, {stage})")
    assert all("RESUMED at step 1" in out for out in outputs), outputs


def test_resume_refuses_a_planted_pickle(planted: dict[str, Path], tmp_path: Path) -> None:
    stage = int(json.loads((planted["folder"] / "plan.json").read_text())["config"]["train"]["zero_stage"])
    outputs = _run_ranks(tmp_path, f"_resume({str(planted['folder'])!r}, {stage})")
    assert not planted["marker"].exists(), "the planted pickle ran code"
    # the rank that reads the planted file names it and what it holds (under ZeRO-3 each rank reads
    # its own file; the other rank then loses its peer)
    assert any(str(planted["file"]) in out and "builtins.exec" in out for out in outputs), outputs

"""Ray Train + DeepSpeed runs on 2 CPU workers (gloo): ZeRO 1/2/3, checkpoints (local and moto S3),
bit-exact restores, a killed worker, relaunching a finished run, a non-finite loss, export.

One local Ray cluster serves the module. Each ZeRO stage has one uninterrupted *reference run* of
12 steps (checkpoints every 4, every step's loss logged); the other runs of that stage must
reproduce its losses and its per-step sample ledger exactly after their restore.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest
from test_train_support import local_ray, losses, read_checkpoint_files, tiny_config, tiny_dataset

from fractalgen import storage

pytestmark = pytest.mark.slow
STEPS = 12


@pytest.fixture(scope="module")
def cluster(_moto_server: str):
    # dummy credentials for moto, for every Ray process of the run (the endpoint itself travels in
    # the run's config, never in the environment)
    aws = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with local_ray(aws):
        yield


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_dataset(tmp_path_factory.mktemp("data"))


@dataclass
class Reference:
    run_uri: str
    endpoint: str | None
    state: dict[str, Any]
    ledgers: list[Any]


_references: dict[int, Reference] = {}


def reference_run(stage: int, dataset: str, storage_path: str, endpoint: str | None = None) -> Reference:
    """The uninterrupted run of ``stage`` (made once per module)."""
    from fractalgen.platform.training.driver import run_training

    if stage not in _references:
        cfg = tiny_config(
            name=f"ref{stage}",
            data=dataset,
            storage_path=storage_path,
            stage=stage,
            steps=STEPS,
            every=4,
            endpoint=endpoint,
        )
        out = run_training(cfg)
        assert out.status == "finished" and out.step == STEPS
        files = read_checkpoint_files(out.checkpoint, endpoint=endpoint)
        _references[stage] = Reference(out.run_uri, endpoint, files["state"], files["ledgers"])
    return _references[stage]


def assert_loss_goes_down(state: dict[str, Any]) -> None:
    hist = losses(state)
    assert sorted(hist) == list(range(1, STEPS + 1))
    first = sum(hist[s] for s in (1, 2, 3)) / 3
    last = sum(hist[s] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
    assert last < first - 0.05, hist


@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.s3)])
def test_zero_run_trains_and_checkpoint_restores_bit_exactly(
    stage, cluster, dataset, tmp_path, request
) -> None:
    """ZeRO-2 (local folder) and ZeRO-3 (moto S3; ZeRO-1 in the killed-worker test): the loss falls,
    and a run started from the step-4 checkpoint reproduces steps 5-12 of the uninterrupted run
    exactly (losses and samples); the consolidated weights export from the (ZeRO-3: sharded, S3)
    checkpoint and load strictly."""
    from fractalgen.models import load_released
    from fractalgen.platform.artifacts.checkpoints import export_consolidated
    from fractalgen.platform.training.driver import run_training

    endpoint = None
    storage_path = str(tmp_path / "runs")
    if stage == 3:
        s3 = request.getfixturevalue("s3_server")
        endpoint = s3.endpoint_url
        storage_path = f"s3://{s3.new_bucket('ckpt')}/runs"
    ref = reference_run(stage, dataset, storage_path, endpoint)
    assert_loss_goes_down(ref.state)
    if stage == 3:
        assert "checkpoint_000000004" in storage.list_dirs(ref.run_uri, endpoint=endpoint)

    start = storage.join(ref.run_uri, "checkpoint_000000004")
    cfg = tiny_config(
        name=f"fork{stage}",
        data=dataset,
        storage_path=storage_path,
        stage=stage,
        steps=STEPS,
        every=8,
        endpoint=endpoint,
        extra=[f"checkpoint.init_from={start}"],
    )
    out = run_training(cfg)
    files = read_checkpoint_files(out.checkpoint, endpoint=endpoint)
    assert files["state"]["step"] == STEPS and files["state"]["resumed_from"] == [4]
    ref_losses, fork_losses = losses(ref.state), losses(files["state"])
    assert fork_losses[5] == ref_losses[5]  # the next step after the restore, bit for bit
    assert {s: fork_losses[s] for s in range(5, STEPS + 1)} == {s: ref_losses[s] for s in range(5, STEPS + 1)}
    assert files["ledgers"] == ref.ledgers  # the same samples at the same steps on each worker

    weights = export_consolidated(out.checkpoint, tmp_path / "weights.pth", endpoint=endpoint)
    model = load_released(weights)  # strict: every parameter present, shapes right
    assert model.config.img_size == 16 and model.config.num_classes == 10


def test_fused_attention_run_follows_the_reference(cluster, dataset, tmp_path) -> None:
    """``model.attention=fused``: the workers' pixel heads run the Triton kernel (the interpreter on
    these CPU workers, TRITON_INTERPRET from tests/conftest.py) inside DeepSpeed's engine. From the
    reference's step-4 checkpoint the losses follow the reference within float32 tolerance, and not
    bit for bit: the kernel, not SDPA, computed them."""
    from fractalgen.platform.training.driver import run_training

    ref = reference_run(2, dataset, str(tmp_path / "runs"))
    cfg = tiny_config(
        name="fused2",
        data=dataset,
        storage_path=str(tmp_path / "fused"),
        stage=2,
        steps=8,
        every=8,
        extra=["model.attention=fused", f"checkpoint.init_from={ref.run_uri}/checkpoint_000000004"],
    )
    out = run_training(cfg)
    history = losses(read_checkpoint_files(out.checkpoint)["state"])
    reference = losses(ref.state)
    assert sorted(history) == list(range(1, 9))  # steps 1-4 come with the checkpoint
    fused = {s: history[s] for s in range(5, 9)}
    assert all(abs(fused[s] - reference[s]) < 1e-4 * abs(reference[s]) for s in fused), (fused, reference)
    assert any(fused[s] != reference[s] for s in fused)


def _train_worker_pids() -> list[int]:
    """Ray Train worker processes of this module's Ray (children of its raylet, nobody else's)."""
    import psutil
    import ray._private.worker as ray_worker

    raylet = ray_worker._global_node.all_processes["raylet"][0].process.pid
    pids = []
    for proc in psutil.Process(raylet).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()[:1]):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return sorted(pids)


def test_killed_worker_resumes_at_same_step_with_next_unseen_sample(cluster, dataset, tmp_path) -> None:
    """ZeRO-1: a worker process killed after the step-2 checkpoint; the restarted worker group goes on
    from the latest checkpoint and ends where the uninterrupted run ends: same step count, same loss
    at every step, the same samples at every step (none repeated, none skipped)."""
    from fractalgen.platform.training.driver import run_training

    ref = reference_run(1, dataset, str(tmp_path / "ref"))
    assert_loss_goes_down(ref.state)

    storage_path = str(tmp_path / "runs")
    cfg = tiny_config(name="killed", data=dataset, storage_path=storage_path, stage=1, steps=STEPS, every=2)
    # Ray Train lists a checkpoint in this file once it has registered it: kill right after the first
    snapshot = os.path.join(storage_path, "killed", "checkpoint_manager_snapshot.json")
    killed: list[int] = []
    registered_at_kill: list[str] = []

    def kill_after_checkpoint() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                with open(snapshot) as f:
                    text = f.read()
            except OSError:
                text = ""
            if "checkpoint_000000002" in text:
                break
            time.sleep(0.02)
        pids = _train_worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])
            registered_at_kill.append(text)

    killer = threading.Thread(target=kill_after_checkpoint, daemon=True)
    killer.start()
    out = run_training(cfg)
    killer.join(timeout=5)
    assert killed, "no Ray Train worker was found to kill"
    assert f"checkpoint_{STEPS:09d}" not in registered_at_kill[0], "the run ended before the kill"

    files = read_checkpoint_files(out.checkpoint)
    state = files["state"]
    assert state["step"] == STEPS and state["samples_seen"] == STEPS * 8
    assert len(state["resumed_from"]) == 1 and 2 <= state["resumed_from"][0] < STEPS, state["resumed_from"]
    assert losses(state) == losses(ref.state)
    assert files["ledgers"] == ref.ledgers
    # the first epoch (10 steps x 8 images) saw each of the 80 images exactly once
    first_epoch = [key for ledger in files["ledgers"] for step, keys in ledger if step <= 10 for key in keys]
    assert len(first_epoch) == 80 and len(set(first_epoch)) == 80


def test_relaunch_resumes_finished_run_and_nonfinite_loss_stops_keeping_last_good(
    cluster, dataset, tmp_path
) -> None:
    """Relaunching the finished ZeRO-1 reference run (same name) with 4 more steps resumes it at step 12;
    an absurd learning rate then blows the loss up at step 14: the run stops with an error naming
    the last good checkpoint (step 13), which is kept, and writes no checkpoint after it."""
    from fractalgen.platform.training.driver import TrainError, run_training

    ref = reference_run(1, dataset, str(tmp_path / "ref"))
    storage_path = os.path.dirname(ref.run_uri)
    cfg = tiny_config(
        name="ref1",
        data=dataset,
        storage_path=storage_path,
        stage=1,
        steps=STEPS + 4,
        every=1,
        extra=["train.base_lr=1.0e+35"],
    )
    with pytest.raises(TrainError, match="non-finite") as err:
        run_training(cfg)
    message = str(err.value)
    assert "checkpoint_000000013" in message and "base_lr" in message
    names = storage.list_dirs(ref.run_uri)
    assert "checkpoint_000000013" in names and "checkpoint_000000014" not in names
    state = read_checkpoint_files(storage.join(ref.run_uri, "checkpoint_000000013"))["state"]
    assert state["resumed_from"] == [STEPS] and state["step"] == STEPS + 1


def test_outcome_and_evaluation_come_back_in_ray_result(cluster, dataset, tmp_path) -> None:
    """A 2-step ZeRO-2 run with a held-out set, launched with ``build_trainer(plan).fit()`` alone (no
    driver around it): Ray's Result carries the loop's outcome as rank 0's return value (finished at
    step 2, its checkpoint, the metrics Ray also has from the last checkpoint's report); the workers
    write no status file; the ``eval_bpd`` of the last step is ``evaluate_nll``'s on the exported
    final weights, over ``eval.nll_batches`` micro-batches."""
    from fractalgen.models import load_released
    from fractalgen.platform.artifacts.checkpoints import export_consolidated
    from fractalgen.platform.evaluation.data import evaluate_nll
    from fractalgen.platform.training.driver import STATUS_FILE, build_trainer, plan_run

    cfg = tiny_config(
        name="result",
        data=dataset,
        storage_path=str(tmp_path / "runs"),
        stage=2,
        steps=2,
        every=2,
        extra=[f"data.eval_uri={dataset}", "eval.nll_batches=2", "eval.sample_iters=[2,2]"],
    )
    plan = plan_run(cfg)
    result = build_trainer(plan).fit()
    outcome = result.return_value
    checkpoint = storage.join(plan.run_uri, "checkpoint_000000002")
    assert outcome["status"] == "finished" and outcome["step"] == 2 and outcome["resumed_from"] == []
    assert outcome["checkpoint"] == checkpoint
    assert outcome["metrics"]["loss"] == result.metrics["loss"] and math.isfinite(outcome["metrics"]["loss"])
    assert outcome["metrics"]["eval_bpd"] == result.metrics["eval_bpd"]
    assert not os.path.exists(os.path.join(plan.run_uri, STATUS_FILE))

    model = load_released(export_consolidated(checkpoint, tmp_path / "weights.pth"))
    expected = evaluate_nll(model, dataset, batch_size=4, max_images=8, progress=False)
    assert outcome["metrics"]["eval_bpd"] == pytest.approx(expected["nll_bpd"], rel=1e-5)

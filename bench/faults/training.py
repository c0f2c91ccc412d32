"""Training faults (docs/reliability.md, "Training faults"): real tiny runs on this machine, each
fault injected at random points (``Settings.rng``), and what must hold checked afterwards.

Every run trains ``fractalmar_tiny16`` (16x16 images) on the embedded dataset cut to 10 classes x 8
images (80 samples), 2 Ray Train workers x micro-batch 4: 10 steps per epoch, DeepSpeed ZeRO-1 on
the CPU (gloo), as tests/platform/test_train_support.py's tiny runs do.

Samples are counted by id with the worker's opt-in audit file (``FRACTALGEN_SAMPLE_LOG``,
fractalgen/platform/training/worker.py): every rank appends a line when its loop starts (the step it starts
or resumes at) and one per step with the keys of the samples it trained on. ``audit_samples``
rolls back, per rank, the steps after each resume point (work lost with a killed worker group) and
checks the *effective* sequence: every step of the run present once, and each epoch covering each of
the 80 samples exactly once.

Scenarios (names as ``python -m bench.faults --only NAME`` takes them):
- ``train-worker-sigkill``: SIGKILL a Ray Train worker at a random step or while a checkpoint is
  being written (its folder exists, Ray has not registered it); 10 kills in one run (2 short).
- ``train-node-loss``: a ``ray.cluster_utils.Cluster`` of 1-CPU nodes; the node of a training
  worker removed mid-run (a spare node joins afterwards, as an autoscaler would add one), then a
  last removal that leaves too little for the worker group.
- ``train-driver-killed``: ``fractalgen train`` (a subprocess joined to a standing Ray cluster, as
  under ``ray job submit``) SIGKILLed mid-run, then the same command again.
- ``train-mlflow-outage``: the ``mlflow server`` SIGKILLed mid-run and restarted on the same port and
  store a few seconds later; every metric point counted on the server afterwards.
- ``train-checkpoint-damaged``: a shard of the latest checkpoint truncated or deleted, then the same
  ``fractalgen train`` command relaunched.
- ``train-nonfinite-loss``: a run resumed at a random step with an absurd learning rate (the
  injection of tests/platform/test_train.py), so its loss turns NaN/inf a step or two later.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.faults import Outcome, Settings, scenario
from bench.faults._proc import free_port

WORLD = 2  # Ray Train workers
MICRO = 4  # samples per worker per step
STEPS_PER_EPOCH = 10  # 80 samples / (2 x 4)
EVERY = 2  # checkpoint interval of train-worker-sigkill
SAMPLE_LOG_ENV = (
    "FRACTALGEN_SAMPLE_LOG"  # fractalgen.platform.training.train_step.SAMPLE_LOG_ENV (not imported: heavy)
)
# Ray Train V2 knobs for short runs (tests/platform/test_train_support.py): no preemption watcher,
# a fast worker poll; the driver hands them on to the controller and the workers
RAY_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "DS_ACCELERATOR": "cpu",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "DO_NOT_TRACK": "1",
}
MLFLOW_START_TIMEOUT_S = 120.0


class Stop(Exception):
    """The run ended (or the scenario gave up) while an injector was waiting for something."""


# ---------------------------------------------------------------------------------------------
# helpers: data, recipes, Ray, waiting


def _environment(work: Path) -> Path:
    """Environment of the scenario process (and so of every Ray process it starts); the audit file."""
    log = work / "samples.jsonl"
    os.environ.update(RAY_TRAIN_ENV)
    os.environ[SAMPLE_LOG_ENV] = str(log)
    os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("RAY_ADDRESS", None)
    return log


def _dataset(work: Path) -> tuple[str, list[str]]:
    """The tiny dataset (80 samples) and the keys of all its samples, read from its shards."""
    from fractalgen.pipelines.embedded import build_embedded_dataset
    from fractalgen.platform.training.worker import _lean_streaming_import

    out = str(work / "tiny16")
    build_embedded_dataset(out, size=16, images_per_class=8, num_classes=10)
    _lean_streaming_import()
    from streaming.base.format import reader_from_json

    index = json.loads((Path(out) / "index.json").read_text())
    keys = []
    for shard in index["shards"]:
        reader = reader_from_json(out, None, shard)
        keys.extend(reader.get_item(i)["key"] for i in range(reader.samples))
    if len(keys) != STEPS_PER_EPOCH * WORLD * MICRO or len(set(keys)) != len(keys):
        raise RuntimeError(f"the tiny dataset should hold 80 distinct samples, it holds {len(keys)}")
    return out, keys


def _overrides(
    *,
    name: str,
    data: str,
    storage_path: Path,
    steps: int,
    every: int,
    max_failures: int = 1,
    tracking_uri: str | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """A tiny run (module docstring): ``steps`` steps, a checkpoint every ``every``."""
    epochs = max(1, math.ceil(steps / STEPS_PER_EPOCH))
    out = [
        f"name={name}",
        "model.name=fractalmar_tiny16",
        f"data.train_uri={data}",
        "data.loader_workers=0",
        f"train.global_batch_size={WORLD * MICRO}",
        f"train.micro_batch_per_gpu={MICRO}",
        f"train.epochs={epochs}",
        "train.warmup_epochs=0",
        "train.base_lr=0.5",
        "train.precision=fp32",
        "train.zero_stage=1",
        f"train.max_steps={steps}",
        "train.log_every_steps=1",
        f"cluster.num_workers={WORLD}",
        "cluster.cpus_per_worker=1",
        f"cluster.max_failures={max_failures}",
        f"checkpoint.storage_path={storage_path}",
        f"checkpoint.every_steps={every}",
        "checkpoint.keep_last=100",
        "eval.num_images=2",
        "eval.sample_iters=[2,1]",
    ]
    if tracking_uri is None:
        out.append("mlflow.enabled=false")
    else:
        out += [f"mlflow.tracking_uri={tracking_uri}", "mlflow.experiment=faults"]
    return [*out, *extra]


def _config(**kw: Any):  # -> TrainRunConfig
    from fractalgen.config import TrainRunConfig, load

    return load(TrainRunConfig, None, _overrides(**kw))


def _recipe(path: Path, **kw: Any) -> Path:
    """The tiny run as a YAML recipe, for ``fractalgen train --config``."""
    from fractalgen.config import dumps

    path.write_text(dumps(_config(**kw)))
    return path


def _wait(check: Callable[[], Any], timeout_s: float, what: str, *, stop: threading.Event | None = None,
          poll_s: float = 0.02) -> Any:  # fmt: skip
    """Poll ``check`` until it returns something truthy; ``TimeoutError`` naming ``what`` after
    ``timeout_s``; ``Stop`` if ``stop`` is set first."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if stop is not None and stop.is_set():
            raise Stop(f"the run ended while waiting for {what}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(poll_s)


@contextlib.contextmanager
def _local_ray(num_cpus: int = 4) -> Iterator[None]:
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _train_worker_pids(raylet_pid: int) -> list[int]:
    """Ray Train worker processes under one raylet (their process title names the actor)."""
    import psutil

    pids = []
    try:
        children = psutil.Process(raylet_pid).children(recursive=True)
    except psutil.Error:
        return []
    for proc in children:
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()[:1]):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return sorted(pids)


def _local_raylet_pid() -> int:
    import ray._private.worker as ray_worker

    return ray_worker._global_node.all_processes["raylet"][0].process.pid


def _registered(run: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (its checkpoint_manager_snapshot.json)."""
    for _ in range(5):
        try:
            text = (run / "checkpoint_manager_snapshot.json").read_text()
            json.loads(text)
        except FileNotFoundError:
            return []
        except (OSError, ValueError):
            time.sleep(0.02)  # being rewritten
            continue
        return sorted({int(m) for m in re.findall(r"checkpoint_(\d{9})", text)})
    return []


def _folders(run: Path) -> list[int]:
    try:
        return sorted(int(p.name.split("_")[1]) for p in run.glob("checkpoint_*") if p.is_dir())
    except OSError:
        return []


def _fresh_unregistered(
    log: SampleLog, attempt_ids: set[str], run: Path, after: int, every: int
) -> int | None:
    """A checkpoint past step ``after`` that the attempt ``attempt_ids`` has begun to write (its
    folder holds a file newer than the attempt's line for that step: not a folder left by a killed
    attempt) and Ray Train has not registered yet; None if there is none now."""
    logged: dict[int, float] = {}
    for rec in log.steps_of(attempt_ids):
        logged[rec["step"]] = min(rec["time"], logged.get(rec["step"], math.inf))
    registered = set(_registered(run))
    for step in sorted(
        (s for s in logged if s > after and s % every == 0 and s not in registered), reverse=True
    ):
        try:
            files = [p.stat().st_mtime for p in (run / f"checkpoint_{step:09d}").rglob("*") if p.is_file()]
        except OSError:
            continue  # being written
        if files and max(files) >= logged[step]:
            return step
    return None


# ---------------------------------------------------------------------------------------------
# the sample audit


class SampleLog:
    """The ``FRACTALGEN_SAMPLE_LOG`` file: start lines ``{attempt, rank, start_step}`` and step lines
    ``{attempt, rank, step, keys, time}``, appended by every rank of every attempt."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a SIGKILL mid-write (never seen; the audit would miss a step)
        return out

    def starts(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if "start_step" in r]

    def group_starts(self, attempt: int) -> list[dict[str, Any]] | None:
        """The ``WORLD`` start lines of the worker group's ``attempt``-th start (0-based), once all there."""
        starts = self.starts()
        group = starts[attempt * WORLD : (attempt + 1) * WORLD]
        return group if len(group) == WORLD else None

    def steps_of(self, attempt_ids: set[str]) -> list[dict[str, Any]]:
        return [r for r in self.records() if "step" in r and r["attempt"] in attempt_ids]

    def max_step(self, attempt_ids: set[str]) -> int:
        return max((r["step"] for r in self.steps_of(attempt_ids)), default=0)

    def reached(self, attempt_ids: set[str], step: int) -> bool:
        return self.max_step(attempt_ids) >= step


@dataclass
class Audit:
    """The effective sample sequence of a run, after rolling back steps beyond each resume point."""

    final_step: int = 0
    repeated: int = 0  # samples seen twice within one epoch of the effective sequence
    skipped: int = 0  # samples of a full epoch never seen in it (including those of missing steps)
    missing_steps: int = 0  # (rank, step) pairs of the run absent from the effective sequence
    rolled_back: int = 0  # (rank, step) pairs trained and then discarded by a resume
    resumes: list[int] = field(default_factory=list)  # start steps of the worker-group attempts
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.repeated or self.skipped or self.missing_steps or self.problems)

    def summary(self) -> str:
        text = (
            f"{self.final_step} steps, {self.repeated} repeated, {self.skipped} skipped "
            f"({self.rolled_back} rank-steps rolled back over {len(self.resumes) - 1} resumes)"
        )
        return text + (f"; {'; '.join(self.problems[:3])}" if self.problems else "")


def audit_samples(log: SampleLog, all_keys: list[str], final_step: int | None) -> Audit:
    """Roll back and count (module docstring); ``final_step`` is where the run ended (None: a run
    that failed, audited up to the last step every rank kept)."""
    audit = Audit(final_step=final_step or 0)
    effective: dict[int, dict[int, list[str]]] = {r: {} for r in range(WORLD)}
    current: dict[int, tuple[str, int]] = {}
    for rec in log.records():
        rank = int(rec["rank"])
        if "start_step" in rec:
            start = int(rec["start_step"])
            later = [s for s in effective[rank] if s > start]
            audit.rolled_back += len(later)
            for s in later:
                del effective[rank][s]
            gaps = [s for s in range(1, start + 1) if s not in effective[rank]]
            if gaps:
                audit.problems.append(
                    f"rank {rank} resumed at step {start} but never trained steps {gaps[:5]}"
                )
            current[rank] = (rec["attempt"], start)
            if rank == 0:
                audit.resumes.append(start)
            continue
        attempt, start = current.get(rank, ("", 0))
        step = int(rec["step"])
        if rec["attempt"] != attempt:
            audit.problems.append(f"rank {rank} step {step} from an attempt that never logged its start")
        expected = max((s for s in effective[rank] if s > start), default=start) + 1
        if step != expected:
            audit.problems.append(f"rank {rank} went from step {expected - 1} to {step}")
        if len(rec["keys"]) != MICRO:
            audit.problems.append(
                f"rank {rank} step {step} trained on {len(rec['keys'])} samples, not {MICRO}"
            )
        effective[rank][step] = list(rec["keys"])
    if final_step is None:
        final_step = min(max(effective[rank], default=0) for rank in range(WORLD))
        audit.final_step = final_step
    for rank in range(WORLD):
        have = set(effective[rank])
        audit.missing_steps += len(set(range(1, final_step + 1)) - have)
        extra = sorted(have - set(range(1, final_step + 1)))
        if extra:
            audit.problems.append(f"rank {rank} has steps beyond the end of the run: {extra[:5]}")
    universe = set(all_keys)
    for epoch in range(math.ceil(final_step / STEPS_PER_EPOCH)):
        steps = range(epoch * STEPS_PER_EPOCH + 1, min((epoch + 1) * STEPS_PER_EPOCH, final_step) + 1)
        keys = [k for rank in range(WORLD) for s in steps for k in effective[rank].get(s, [])]
        audit.repeated += len(keys) - len(set(keys))
        foreign = set(keys) - universe
        if foreign:
            audit.problems.append(f"epoch {epoch + 1} holds unknown keys {sorted(foreign)[:3]}")
        if len(steps) == STEPS_PER_EPOCH:
            audit.skipped += len(universe - set(keys))
    return audit


def _seconds(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"mean": round(statistics.fmean(values), 1), "max": round(max(values), 1), "n": len(values)}


# ---------------------------------------------------------------------------------------------
# 1. a Ray Train worker SIGKILLed


@scenario("train-worker-sigkill", budget_s=900, in_short=False)
def train_worker_sigkill(settings: Settings) -> Outcome:
    """One run of 80 steps (short: 30), a checkpoint every 2; 10 (short: 2) SIGKILLs of a random
    worker at random steps spread over the run, each either during the step after it or while the
    current attempt's checkpoint folder for a step exists and Ray has not registered it yet. Each kill
    must resume at the latest registered checkpoint; over the whole run the effective sample
    sequence must have no repeat and no gap."""
    from fractalgen.platform.training.driver import TrainError, run_training

    name = "train-worker-sigkill"
    outcome = Outcome(
        fault="a Ray Train worker SIGKILLed at a random step",
        injected="during a step, during a checkpoint write",
        must_hold="resumes at the last checkpoint's step; samples counted by id: 0 repeated, 0 skipped over the run",
    )
    rng = settings.rng(name)
    kills = 2 if settings.short else 10
    modes = ["step", "checkpoint"] + [rng.choice(["step", "checkpoint"]) for _ in range(kills - 2)]
    rng.shuffle(modes)
    work = Path(settings.work_dir)
    log = SampleLog(_environment(work))
    data, keys = _dataset(work)
    stop_step = (3 if settings.short else 8) * STEPS_PER_EPOCH
    # the steps the kills aim at, spread over the run (a restarted attempt redoes steps up to there)
    points = sorted(rng.sample(range(2, stop_step - 6), kills))
    storage_path = work / "runs"
    run = storage_path / "killed"
    cfg = _config(name="killed", data=data, storage_path=storage_path, steps=stop_step, every=EVERY,
                  max_failures=kills + 1)  # fmt: skip

    done = threading.Event()
    records: list[dict[str, Any]] = []
    errors: list[str] = []

    def inject() -> None:
        try:
            for i, mode in enumerate(modes):
                group = _wait(
                    lambda i=i: log.group_starts(i), 300, f"worker group attempt {i + 1} to start", stop=done
                )
                ids = {g["attempt"] for g in group}
                start = int(group[0]["start_step"])
                target = max(points[i], start + 1)
                if mode == "step":
                    _wait(functools.partial(log.reached, ids, target), 300, f"step {target}", stop=done)
                    time.sleep(rng.uniform(0.0, 0.05))  # into the next step (~0.05-0.1 s here)
                    seen = None
                else:
                    after = max(start, target - 1)
                    seen = _wait(functools.partial(_fresh_unregistered, log, ids, run, after, EVERY), 300,
                                 f"a checkpoint past step {after} written, not registered", stop=done,
                                 poll_s=0.003)  # fmt: skip
                before = _registered(run)
                on_disk = _folders(run)
                progress = log.max_step(ids)
                pids = _train_worker_pids(_local_raylet_pid())
                if len(pids) != WORLD:
                    raise RuntimeError(f"found {len(pids)} Ray Train worker processes, expected {WORLD}")
                victim = rng.choice(pids)
                os.kill(victim, signal.SIGKILL)
                t_kill = time.monotonic()
                registered_after_kill = _registered(run)
                new = _wait(
                    lambda i=i: log.group_starts(i + 1),
                    300,
                    f"the worker group to restart after kill {i + 1}",
                )
                t_start = time.monotonic()
                resumed_at = int(new[0]["start_step"])
                at_resume = _registered(run)
                new_ids = {g["attempt"] for g in new}
                _wait(
                    functools.partial(log.steps_of, new_ids),
                    300,
                    f"the first step after kill {i + 1}",
                    stop=done,
                )
                records.append(
                    {
                        "mode": mode,
                        "progress": progress,
                        "folder_seen": seen,
                        "registered_before": max(before, default=0),
                        "newest_folder": max(on_disk, default=0),
                        "write_registered_by_kill": seen is not None and seen in registered_after_kill,
                        "resumed_at": resumed_at,
                        "ranks_agree": len({g["start_step"] for g in new}) == 1,
                        "latest_at_resume": max(at_resume, default=0),
                        "restart_s": t_start - t_kill,
                        "first_step_s": time.monotonic() - t_kill,
                    }
                )
        except Stop as err:
            errors.append(str(err))
        except Exception as err:
            errors.append(f"{type(err).__name__}: {err}")

    t0 = time.monotonic()
    with _local_ray():
        thread = threading.Thread(target=inject, name="injector", daemon=True)
        thread.start()
        result: Any = None
        try:
            result = run_training(cfg)
        except TrainError as err:
            errors.append(f"the run failed: {str(err).splitlines()[0]}")
        finally:
            done.set()
            thread.join(timeout=30)
    final_step = result.step if result is not None else 0
    audit = audit_samples(log, keys, final_step)
    finished = result is not None and result.status == "finished" and final_step == stop_step
    for n, rec in enumerate(records, 1):
        resumed_right = (
            rec["ranks_agree"]
            and rec["resumed_at"] == rec["latest_at_resume"]
            and rec["resumed_at"] >= rec["registered_before"]
        )
        where = (
            f"step {rec['progress'] + 1} in progress"
            if rec["mode"] == "step"
            else f"checkpoint_{rec['folder_seen']} being written by this attempt, not registered"
            + (" (registered meanwhile)" if rec["write_registered_by_kill"] else "")
        )
        detail = (
            f"kill {n} ({where}): latest registered checkpoint {rec['registered_before']} (newest folder "
            f"{rec['newest_folder']}) -> resumed at "
            f"step {rec['resumed_at']} (latest at resume {rec['latest_at_resume']}), "
            f"{rec['progress'] - rec['resumed_at']} steps redone, first step {rec['first_step_s']:.1f} s after the kill"
        )
        held = resumed_right and audit.clean and finished
        if not finished:
            detail += f"; the run did not finish ({final_step}/{stop_step} steps)"
        if not audit.clean:
            detail += f"; samples: {audit.summary()}"
        outcome.record(held, detail)
    for err in errors:
        outcome.details.append(f"injector: {err}")
    if len(records) < kills:
        outcome.record(
            False, f"only {len(records)} of {kills} kills injected ({'; '.join(errors) or 'no error'})"
        )
    outcome.figures = {
        "kills": len(records),
        "during_step": sum(r["mode"] == "step" for r in records),
        "during_checkpoint_write": sum(r["mode"] == "checkpoint" for r in records),
        "run_steps": final_step,
        "samples_repeated": audit.repeated,
        "samples_skipped": audit.skipped,
        "rank_steps_rolled_back": audit.rolled_back,
        "seconds_kill_to_restart": _seconds([r["restart_s"] for r in records]),
        "seconds_kill_to_first_step": _seconds([r["first_step_s"] for r in records]),
        "run_seconds": round(time.monotonic() - t0, 1),
        "audit": audit.summary(),
    }
    return outcome


# ---------------------------------------------------------------------------------------------
# 2. a Ray node lost


def _raylet_pid(node: Any) -> int:
    return node.all_processes["raylet"][0].process.pid


@contextlib.contextmanager
def _cluster(head_cpus: int, worker_nodes: int = 0) -> Iterator[Any]:
    """A ``ray.cluster_utils.Cluster`` on this machine (head with ``head_cpus`` CPUs, plus 1-CPU
    worker nodes), this process connected to it; everything stopped afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False}
    )
    try:
        for _ in range(worker_nodes):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes(timeout=120)
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@scenario("train-node-loss", budget_s=900, in_short=False)  # CI: test_train.py kills a worker
def train_node_loss(settings: Settings) -> Outcome:
    """Training on 1-CPU Ray nodes, one worker per node and one spare node. The node of a random
    worker is removed at a random step (1 time short, 3 times full; a spare joins after each restart
    but the last, as an autoscaler would add one): the worker group must restart on the nodes left,
    at the latest registered checkpoint, and train on. Then one more node is removed with no spare left: the run
    must fail, within a bounded time, with a message that says what the worker group needs and what
    the cluster has."""
    from fractalgen.platform.training.driver import TrainError, run_training

    name = "train-node-loss"
    outcome = Outcome(
        fault="a Ray node lost (`ray.cluster_utils.Cluster`, `remove_node`)",
        injected="mid-run",
        must_hold="the worker group restarts on what is left and continues, or fails with a clear message when too little is left",
    )
    rng = settings.rng(name)
    survivable = 1 if settings.short else 3
    work = Path(settings.work_dir)
    log = SampleLog(_environment(work))
    data, keys = _dataset(work)
    start_timeout_s = 5 if settings.short else 10  # Ray Train's wait for a worker group's resources (60 s)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(start_timeout_s)
    max_failures = survivable + 1
    # how long the run may take to give up once too little is left: each restart attempt waits
    # start_timeout_s for resources, max_failures + 1 attempts, plus slack for a loaded machine
    give_up_bound_s = (max_failures + 1) * (start_timeout_s + 10) + 60
    storage_path = work / "runs"
    run = storage_path / "nodes"
    # far more steps than the injections need (each at most 8 steps past a restart): the run
    # must still be training when the last node goes
    cfg = _config(name="nodes", data=data, storage_path=storage_path, steps=200, every=2,
                  max_failures=max_failures)  # fmt: skip
    done = threading.Event()
    records: list[dict[str, Any]] = []
    errors: list[str] = []

    with _cluster(head_cpus=0, worker_nodes=WORLD + 1) as cluster:

        def inject() -> None:
            try:
                for i in range(survivable + 1):
                    group = _wait(
                        lambda i=i: log.group_starts(i), 300, f"worker group attempt {i + 1}", stop=done
                    )
                    ids = {g["attempt"] for g in group}
                    target = int(group[0]["start_step"]) + rng.randint(2, 8)
                    _wait(functools.partial(log.reached, ids, target), 300, f"step {target}", stop=done)
                    hosts = sorted(
                        (n for n in cluster.worker_nodes if _train_worker_pids(_raylet_pid(n))),
                        key=_raylet_pid,
                    )
                    if len(hosts) != WORLD:
                        raise RuntimeError(f"{len(hosts)} nodes host a training worker, expected {WORLD}")
                    before, progress = _registered(run), log.max_step(ids)
                    t_loss = time.monotonic()
                    cluster.remove_node(rng.choice(hosts), allow_graceful=False)
                    rec: dict[str, Any] = {
                        "progress": progress,
                        "registered_before": max(before, default=0),
                        "nodes_left": len(cluster.worker_nodes),
                        "last": i == survivable,
                    }
                    records.append(rec)
                    if rec["last"]:
                        if not done.wait(give_up_bound_s):
                            rec["gave_up"] = False
                            cluster.add_node(num_cpus=1)  # let the run end; the scenario has failed
                        rec["end_s"] = time.monotonic() - t_loss
                        return
                    new = _wait(
                        lambda i=i: log.group_starts(i + 1), 300, f"a restart after node loss {i + 1}"
                    )
                    resumed = int(new[0]["start_step"])
                    new_ids = {g["attempt"] for g in new}
                    _wait(
                        functools.partial(log.reached, new_ids, resumed + 1),
                        300,
                        f"a step after node loss {i + 1}",
                        stop=done,
                    )
                    rec.update(
                        resumed_at=resumed,
                        ranks_agree=len({g["start_step"] for g in new}) == 1,
                        latest_at_resume=max(_registered(run), default=0),
                        first_step_s=time.monotonic() - t_loss,
                    )
                    if i < survivable - 1:
                        cluster.add_node(num_cpus=1)  # the spare for the next survivable loss
            except Stop as err:
                errors.append(str(err))
            except Exception as err:
                errors.append(f"{type(err).__name__}: {err}")

        ended: dict[str, str] = {}

        def train() -> None:
            try:
                ended["message"] = f"the run finished at step {run_training(cfg).step}"
            except TrainError as err:
                ended["message"] = str(err)
            except Exception as err:
                ended["message"] = f"{type(err).__name__}: {err}"
            finally:
                done.set()

        # nodes join and leave from the main thread (a Ray node installs signal handlers)
        t0 = time.monotonic()
        trainer = threading.Thread(target=train, name="train", daemon=True)
        trainer.start()
        inject()
        if not done.wait(600):
            errors.append("the run did not end within 600 s of the last injection")
        message = ended.get("message", "")
    audit = audit_samples(log, keys, None)
    for n, rec in enumerate(records, 1):
        if not rec["last"]:
            held = (
                rec.get("ranks_agree", False)
                and rec.get("resumed_at") == rec.get("latest_at_resume")
                and rec.get("resumed_at", -1) >= rec["registered_before"]
                and audit.clean
            )
            detail = (
                f"node loss {n} at step {rec['progress'] + 1} ({rec['nodes_left']} worker nodes left): "
                + (
                    f"restarted at step {rec['resumed_at']} (latest registered {rec['latest_at_resume']}), "
                    f"trained on {rec['first_step_s']:.1f} s after the loss"
                    if "resumed_at" in rec
                    else "no restart"
                )
            )
        else:
            first = message.splitlines()[0] if message else "(no message)"
            clear = f"{WORLD} workers" in message and "CPU" in message and "has" in message
            held = rec.get("gave_up", True) and "end_s" in rec and clear and audit.clean
            detail = (
                f"node loss {n} at step {rec['progress'] + 1} ({rec['nodes_left']} worker node left, "
                f"{WORLD} needed): "
                + (
                    f"failed after {rec['end_s']:.0f} s: {first[:300]}"
                    if rec.get("gave_up", True) and "end_s" in rec
                    else f"still waiting after {give_up_bound_s:.0f} s (a node was added back to end it)"
                )
            )
            if not clear:
                detail += " [the message does not say what the worker group needs and the cluster has]"
        if not audit.clean:
            detail += f"; samples: {audit.summary()}"
        outcome.record(held, detail)
    for err in errors:
        outcome.details.append(f"injector: {err}")
    if len(records) < survivable + 1:
        outcome.record(False, f"only {len(records)} of {survivable + 1} node losses injected")
    outcome.figures = {
        "node_losses": len(records),
        "seconds_loss_to_first_step": _seconds([r["first_step_s"] for r in records if "first_step_s" in r]),
        "seconds_last_loss_to_failure": round(records[-1].get("end_s", float("nan")), 1) if records else None,
        "samples_repeated": audit.repeated,
        "samples_skipped": audit.skipped,
        "audit": audit.summary(),
        "run_seconds": round(time.monotonic() - t0, 1),
    }
    return outcome


# ---------------------------------------------------------------------------------------------
# 3. the driver killed, then the same command again


def _launch(cmd: list[str], env: dict[str, str], out: Path, cwd: Path) -> subprocess.Popen:
    """``fractalgen train`` as its own process group (the driver of a ``ray job submit``)."""
    with open(out, "ab") as f:
        return subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _alive_or_raise(proc: subprocess.Popen, log_file: Path) -> bool:
    if proc.poll() is not None:
        tail = log_file.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"fractalgen train exited with {proc.returncode} early:\n{tail}")
    return False


def _mlflow_runs(tracking_uri: str, run_name: str, experiment: str = "faults") -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`fractalgen.run_name` = '{run_name}'")


def _metric_steps(tracking_uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return [m.step for m in MlflowClient(tracking_uri).get_metric_history(run_id, key)]


def _train_cmd(recipe: Path, *sets: str) -> list[str]:
    cmd = [sys.executable, "-m", "fractalgen", "train", "--config", str(recipe)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


@scenario("train-driver-killed", budget_s=900, in_short=False)
def train_driver_killed(settings: Settings) -> Outcome:
    """``fractalgen train`` joined to a standing Ray cluster (``RAY_ADDRESS``, as ``ray job submit``
    runs it) is SIGKILLed with its process group at a random step, then the same command is run
    again; 1 kill short, 3 full. Each relaunch must resume at the latest checkpoint Ray registered
    before the kill and log into the same MLflow run; the last one finishes, and the effective
    sample sequence of the whole run has no repeat and no gap."""
    name = "train-driver-killed"
    outcome = Outcome(
        fault="the driver killed, then the same launch again (`fractalgen train` / `ray job submit` equivalent)",
        injected="mid-run",
        must_hold="continues in the same MLflow run from the latest checkpoint",
    )
    rng = settings.rng(name)
    kills = 1 if settings.short else 3
    work = Path(settings.work_dir)
    log = SampleLog(_environment(work))
    data, keys = _dataset(work)
    storage_path = work / "runs"
    run = storage_path / "driver"
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    stop_step = 80
    recipe = _recipe(work / "recipe.yaml", name="driver", data=data, storage_path=storage_path, steps=stop_step,
                     every=2, tracking_uri=tracking_uri)  # fmt: skip
    cmd = _train_cmd(recipe)
    points = sorted(rng.sample(range(3, stop_step - 8), kills))  # the steps the kills aim at
    records: list[dict[str, Any]] = []
    errors: list[str] = []
    final_rc: int | None = None
    t0 = time.monotonic()
    with _cluster(head_cpus=WORLD + 2) as cluster:
        env = dict(os.environ, RAY_ADDRESS=cluster.address)
        try:
            for launch in range(kills + 1):
                out = work / f"launch{launch}.log"
                t_launch = time.monotonic()
                proc = _launch(cmd, env, out, work)
                group = _wait(
                    lambda launch=launch, proc=proc, out=out: (
                        log.group_starts(launch) or _alive_or_raise(proc, out)
                    ),
                    300,
                    f"launch {launch + 1}'s worker group to start",
                )
                if records:
                    records[-1]["resumed_at"] = int(group[0]["start_step"])
                    records[-1]["ranks_agree"] = len({g["start_step"] for g in group}) == 1
                    records[-1]["relaunch_s"] = time.monotonic() - t_launch
                if launch == kills:
                    final_rc = proc.wait(timeout=600)
                    break
                ids = {g["attempt"] for g in group}
                target = max(points[launch], int(group[0]["start_step"]) + 1)
                _wait(functools.partial(log.reached, ids, target), 300, f"step {target}")
                time.sleep(rng.uniform(0.0, 0.3))
                progress = log.max_step(ids)
                _kill_group(proc)
                # the controller and the workers belong to the killed driver's job: Ray ends them,
                # after which the registered checkpoints can no longer change
                pids = functools.partial(_train_worker_pids, _raylet_pid(cluster.head_node))
                _wait(lambda pids=pids: not pids(), 120, "the killed job's training workers to exit")
                records.append(
                    {
                        "progress": log.max_step(ids),
                        "killed_at": progress,
                        "latest": max(_registered(run), default=0),
                    }
                )
        except Exception as err:
            errors.append(f"{type(err).__name__}: {err}")
            with contextlib.suppress(Exception):
                _kill_group(proc)
    runs = _mlflow_runs(tracking_uri, "driver")
    run_ids = [r.info.run_id for r in runs]
    steps = _metric_steps(tracking_uri, run_ids[0], "loss") if len(run_ids) == 1 else []
    final_text = (
        (work / f"launch{kills}.log").read_text(errors="replace")
        if (work / f"launch{kills}.log").exists()
        else ""
    )
    same_run = len(run_ids) == 1 and f"run {run_ids[0]}" in final_text
    finished = final_rc == 0 and len(runs) == 1 and runs[0].info.status == "FINISHED"
    audit = audit_samples(log, keys, stop_step if finished else None)
    for n, rec in enumerate(records, 1):
        resumed = rec.get("resumed_at")
        logged_after = resumed is not None and any(s > resumed for s in steps)
        held = (
            resumed is not None
            and rec.get("ranks_agree", False)
            and resumed == rec["latest"]
            and same_run
            and logged_after
            and finished
            and audit.clean
        )
        detail = (
            f"kill {n} at step {rec['killed_at'] + 1}: latest registered checkpoint {rec['latest']}; the same "
            f"command resumed at step {resumed} "
            + (f"({rec['relaunch_s']:.0f} s from launch to its worker group)" if "relaunch_s" in rec else "")
            + f"; MLflow runs named 'driver': {len(run_ids)}"
            + ("" if same_run else " [the last launch did not report that run]")
            + ("" if logged_after else " [no metric after the resume in that run]")
        )
        if not finished:
            detail += f"; the last launch ended with exit {final_rc}"
        if not audit.clean:
            detail += f"; samples: {audit.summary()}"
        outcome.record(held, detail)
    for err in errors:
        outcome.details.append(f"injector: {err}")
    if len(records) < kills:
        outcome.record(False, f"only {len(records)} of {kills} driver kills injected")
    outcome.figures = {
        "driver_kills": len(records),
        "mlflow_runs": len(run_ids),
        "loss_points_in_run": len(steps),
        "distinct_loss_steps": len(set(steps)),
        "seconds_relaunch_to_worker_group": _seconds([r["relaunch_s"] for r in records if "relaunch_s" in r]),
        "steps_redone": sum(r["progress"] - r.get("resumed_at", r["progress"]) for r in records),
        "samples_repeated": audit.repeated,
        "samples_skipped": audit.skipped,
        "audit": audit.summary(),
        "run_seconds": round(time.monotonic() - t0, 1),
    }
    return outcome


# ---------------------------------------------------------------------------------------------
# 4. the MLflow server killed and restarted

METRIC_KEYS = ("loss", "bpd", "lr", "epoch", "images_per_s")  # logged at every log point, always finite


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite store in ``root``; kill and start it again on
    the same port and store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = root / "mlflow-server.log"

    def start(self, timeout_s: float = MLFLOW_START_TIMEOUT_S) -> float:
        """Start it and wait for ``/health``; returns the seconds it took."""
        t = time.monotonic()
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
        ]  # fmt: skip
        self.proc = _launch(cmd, env, self.log, self.root)
        _wait(
            functools.partial(self._healthy),
            timeout_s,
            f"the MLflow server at {self.uri} to answer",
            poll_s=0.25,
        )
        return time.monotonic() - t

    def _healthy(self) -> bool:
        import urllib.request

        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited with {self.proc.returncode}: {self.log.read_text()[-1500:]}"
            )
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2.0) as resp:
                return resp.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc = None


@scenario("train-mlflow-outage", budget_s=900, in_short=False)
def train_mlflow_outage(settings: Settings) -> Outcome:
    """A run logging every step to a real ``mlflow server``; the server is SIGKILLed at a random
    step and started again on the same port and store after a random pause (1 outage short, 3 full).
    Training must go on meanwhile and finish, and every metric point logged during an outage must be
    on the server afterwards (counted per key and step)."""
    from fractalgen.platform.training.driver import TrainError, run_training

    name = "train-mlflow-outage"
    outcome = Outcome(
        fault="the MLflow server killed and restarted",
        injected="mid-run",
        must_hold="training goes on; every metric point logged meanwhile reaches the server (count them)",
    )
    rng = settings.rng(name)
    outages = 1 if settings.short else 3
    work = Path(settings.work_dir)
    log = SampleLog(_environment(work))
    data, _keys = _dataset(work)
    server = MlflowServer(work)
    stop_step = 500 if settings.short else 1500
    done = threading.Event()
    windows: list[dict[str, Any]] = []
    errors: list[str] = []
    t0 = time.monotonic()
    first_start_s = server.start()
    try:
        cfg = _config(name="outage", data=data, storage_path=work / "runs", steps=stop_step, every=100,
                      tracking_uri=server.uri)  # fmt: skip

        def inject() -> None:
            try:
                group = _wait(
                    functools.partial(log.group_starts, 0), 300, "the worker group to start", stop=done
                )
                ids = {g["attempt"] for g in group}
                for i in range(outages):
                    target = log.max_step(ids) + rng.randint(10, 60)
                    _wait(functools.partial(log.reached, ids, target), 300, f"step {target}", stop=done)
                    t_down = time.time()
                    server.kill()
                    time.sleep(rng.uniform(1.0, 5.0))
                    if done.is_set():
                        raise Stop(f"the run ended during outage {i + 1}")
                    restart_s = server.start()
                    windows.append({"down": t_down, "up": time.time(), "restart_s": restart_s})
            except Stop as err:
                errors.append(str(err))
            except Exception as err:
                errors.append(f"{type(err).__name__}: {err}")
            finally:
                if server.proc is None:  # the run must be able to deliver what it kept
                    try:
                        server.start()
                    except Exception as err:
                        errors.append(f"the MLflow server did not start again: {err}")

        thread = threading.Thread(target=inject, name="injector", daemon=True)
        thread.start()
        result: Any = None
        try:
            result = run_training(cfg)
        except TrainError as err:
            errors.append(f"the run failed: {str(err).splitlines()[0]}")
        finally:
            done.set()
            thread.join(timeout=MLFLOW_START_TIMEOUT_S + 30)
        finished = result is not None and result.status == "finished" and result.step == stop_step
        run_id = result.mlflow_run_id if result is not None else None
        on_server: dict[str, list[int]] = {}
        if run_id:
            on_server = {k: _metric_steps(server.uri, run_id, k) for k in METRIC_KEYS}
    finally:
        server.kill()
    step_times = {r["step"]: r["time"] for r in log.records() if "step" in r and r["rank"] == 0}
    for n, w in enumerate(windows, 1):
        logged = sorted(s for s, t in step_times.items() if w["down"] <= t <= w["up"])
        expected = len(logged) * len(METRIC_KEYS)
        reached = sum(1 for k in METRIC_KEYS for s in logged if s in set(on_server.get(k, [])))
        held = finished and len(logged) > 0 and reached == expected
        outcome.record(
            held,
            f"outage {n}: server down {w['up'] - w['down']:.1f} s (restart took {w['restart_s']:.1f} s), "
            f"{len(logged)} steps trained meanwhile (steps {logged[0] if logged else '-'}-{logged[-1] if logged else '-'}), "
            f"{reached}/{expected} of their metric points on the server"
            + (
                ""
                if finished
                else f"; the run did not finish ({result.step if result else 0}/{stop_step} steps)"
            ),
        )
    for err in errors:
        outcome.details.append(f"injector: {err}")
    if len(windows) < outages:
        outcome.record(False, f"only {len(windows)} of {outages} outages injected")
    points = sum(len(v) for v in on_server.values())
    distinct = sum(len(set(v)) for v in on_server.values())
    outcome.figures = {
        "outages": len(windows),
        "seconds_down": _seconds([w["up"] - w["down"] for w in windows]),
        "seconds_server_start": round(first_start_s, 1),
        "steps_during_outages": sum(
            1 for w in windows for t in step_times.values() if w["down"] <= t <= w["up"]
        ),
        "metric_points_expected": stop_step * len(METRIC_KEYS),
        "metric_points_on_server": points,
        "metric_points_duplicated": points - distinct,
        "metric_points_missing": stop_step * len(METRIC_KEYS) - distinct,
        "run_seconds": round(time.monotonic() - t0, 1),
    }
    return outcome


# ---------------------------------------------------------------------------------------------
# 5. a checkpoint shard truncated or deleted before a resume


def checkpoint_damage_left(run: Path, step: int) -> list[str]:
    """What is still wrong with the run's checkpoint at ``step`` (its files against the manifests
    every rank wrote, fractalgen/platform/training/worker.py): [] once the relaunch has written it again."""
    import pyarrow.fs as pafs
    import ray.train

    from fractalgen.platform.training.checkpointer import checkpoint_damage

    folder = run / f"checkpoint_{step:09d}"
    return checkpoint_damage(ray.train.Checkpoint(path=str(folder), filesystem=pafs.LocalFileSystem()), WORLD)


@scenario("train-checkpoint-damaged", budget_s=900)
def train_checkpoint_damaged(settings: Settings) -> Outcome:
    """A run trained to step 6 (a checkpoint every 2 steps); then, each time, one DeepSpeed shard of
    its latest checkpoint is truncated to a random fraction or deleted, and the same ``fractalgen
    train`` command is run again with 4 more steps (1 time short, 3 full). The relaunch must resume
    from the previous, complete checkpoint and say which file was damaged, or fail with a message
    naming that file."""
    name = "train-checkpoint-damaged"
    outcome = Outcome(
        fault="a checkpoint shard truncated or deleted",
        injected="before resume",
        must_hold="the previous complete checkpoint is used, or a message names the file",
    )
    rng = settings.rng(name)
    injections = 1 if settings.short else 3
    work = Path(settings.work_dir)
    log = SampleLog(_environment(work))
    data, keys = _dataset(work)
    storage_path = work / "runs"
    run = storage_path / "damaged"
    recipe = _recipe(
        # epochs for every launch's steps; each launch sets train.max_steps
        work / "recipe.yaml",
        name="damaged",
        data=data,
        storage_path=storage_path,
        steps=6 + 4 * injections,
        every=2,
    )
    errors: list[str] = []
    steps = 6
    t0 = time.monotonic()
    resume_s: list[float] = []
    with _cluster(head_cpus=WORLD + 2) as cluster:
        env = dict(os.environ, RAY_ADDRESS=cluster.address)
        first = _launch(_train_cmd(recipe, f"train.max_steps={steps}"), env, work / "launch0.log", work)
        if first.wait(timeout=600) != 0:
            errors.append(f"the first launch failed: {(work / 'launch0.log').read_text()[-1500:]}")
        for i in range(injections if not errors else 0):
            folders = _folders(run)
            latest, previous = folders[-1], folders[-2]
            ckpt = run / f"checkpoint_{latest:09d}"
            shards = sorted(p for p in (ckpt / "deepspeed").rglob("*") if p.is_file() and p.name != "latest")
            target = rng.choice(shards)
            size = target.stat().st_size
            if rng.random() < 0.5:
                keep = int(size * rng.uniform(0.05, 0.95))
                os.truncate(target, keep)
                what = f"{target.relative_to(run)} truncated to {keep} of {size} bytes"
            else:
                target.unlink()
                what = f"{target.relative_to(run)} deleted"
            steps += 4
            starts_before = len(log.starts())
            out = work / f"launch{i + 1}.log"
            t_launch = time.monotonic()
            proc = _launch(_train_cmd(recipe, f"train.max_steps={steps}"), env, out, work)
            try:
                rc = proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rc = None
            text = out.read_text(errors="replace")
            new = log.starts()[starts_before : starts_before + WORLD]
            resumed = int(new[0]["start_step"]) if len(new) == WORLD else None
            if resumed is not None:
                resume_s.append(time.monotonic() - t_launch)
            named = target.name in text and ckpt.name in text
            if rc == 0:
                ended = json.loads((run / "fractalgen_status.json").read_text()).get("step")
                held = (
                    resumed == previous
                    and named
                    and all(g["start_step"] == previous for g in new)
                    and ended == steps
                    and not checkpoint_damage_left(run, latest)
                )
                how = f"resumed at step {resumed} (previous checkpoint {previous}), finished at step {ended}"
            else:
                held = named
                how = f"exit {rc}"
            outcome.record(
                held,
                f"{what}; relaunch: {how}; "
                + ("the output names the file" if named else "[the output does not name the file]"),
            )
            if rc != 0:
                break  # the run cannot go on from here
    for err in errors:
        outcome.details.append(f"injector: {err}")
    if outcome.injections < injections:
        outcome.record(False, f"only {outcome.injections} of {injections} damaged checkpoints injected")
    audit = audit_samples(log, keys, steps if outcome.ok else None)
    if not audit.clean:
        outcome.details.append(f"samples: {audit.summary()}")
    outcome.figures = {
        "damaged": outcome.injections,
        "seconds_relaunch_to_exit": _seconds(resume_s),
        "samples_repeated": audit.repeated,
        "samples_skipped": audit.skipped,
        "run_seconds": round(time.monotonic() - t0, 1),
    }
    return outcome


# ---------------------------------------------------------------------------------------------
# 6. a NaN / inf loss


@scenario("train-nonfinite-loss", budget_s=600, in_short=False)
def train_nonfinite_loss(settings: Settings) -> Outcome:
    """A run trained to a random step k (checkpoints every 1-3 steps), then relaunched with 6 more
    steps and ``train.base_lr=1e35``, which makes the loss non-finite a step or two later (1 time
    short, 3 full, each a new run). The run must stop with an error that names the last good
    checkpoint (the latest whose steps all had finite losses); that checkpoint is kept, its losses
    are finite, and no checkpoint was written after the blow-up."""
    from fractalgen.platform.training.driver import TrainError, run_training

    name = "train-nonfinite-loss"
    outcome = Outcome(
        fault="NaN / inf loss at a random step",
        injected="a random step",
        must_hold="stops; the last good checkpoint is kept and named",
    )
    rng = settings.rng(name)
    injections = 1 if settings.short else 3
    work = Path(settings.work_dir)
    _environment(work)
    data, _keys = _dataset(work)
    storage_path = work / "runs"
    t0 = time.monotonic()
    stops: list[float] = []
    with _local_ray():
        for i in range(injections):
            k, every = rng.randint(2, 9), rng.choice([1, 2, 3])
            run = storage_path / f"nan{i}"
            common = {"name": f"nan{i}", "data": data, "storage_path": storage_path, "every": every}
            first = run_training(_config(steps=k, **common))
            if first.status != "finished" or first.step != k:
                outcome.record(
                    False, f"run nan{i}: the run before the injection ended {first.status} at {first.step}"
                )
                continue
            message = None
            t = time.monotonic()
            try:
                run_training(_config(steps=k + 6, extra=("train.base_lr=1.0e+35",), **common))
            except TrainError as err:
                message = str(err)
            stops.append(time.monotonic() - t)
            status = json.loads((run / "fractalgen_status.json").read_text())
            folders = _folders(run)
            after, bad = int(status.get("after_step", -1)), int(status.get("step", -1))
            good = max((f for f in folders if f <= after), default=None)
            named = sorted({int(m) for m in re.findall(r"checkpoint_(\d{9})", message or "")})
            history_ok = False
            if good is not None:
                state = json.loads((run / f"checkpoint_{good:09d}" / "state.json").read_text())
                losses = [h["loss"] for h in state["history"]]
                history_ok = state["step"] == good and all(math.isfinite(x) for x in losses)
            held = (
                message is not None
                and "non-finite" in message
                and status.get("status") == "nonfinite_loss"
                and bad < k + 6
                and good is not None
                and named == [good]
                and history_ok
                and not [f for f in folders if f > after]
            )
            parts = [
                f"run nan{i}: resumed at step {k} with base_lr 1e35 (checkpoints every {every}): loss "
                f"non-finite in steps {after + 1}-{bad}",
                f"stopped naming {[f'checkpoint_{n:09d}' for n in named]}" if message else "did not stop",
                f"last good on disk: checkpoint_{good:09d}"
                if good is not None
                else "no good checkpoint on disk",
            ]
            if not history_ok:
                parts.append("[its losses are not all finite]")
            if [f for f in folders if f > after]:
                parts.append("[checkpoints written after the blow-up]")
            outcome.record(held, "; ".join(parts))
    outcome.figures = {
        "runs": injections,
        "seconds_relaunch_to_stop": _seconds(stops),
        "run_seconds": round(time.monotonic() - t0, 1),
    }
    return outcome

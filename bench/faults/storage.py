"""Storage faults: S3 errors and outages while converting, checkpointing and streaming; a full disk.

Every S3 scenario runs moto's S3 server behind the fault proxy of ``bench/faults/_s3proxy.py`` (both
on 127.0.0.1) and points the platform at the proxy. An injection arms one fault at a random request
(``Settings.rng``) of the operation under test:

- *transient*: 500 InternalError, 503 ServiceUnavailable, 503 SlowDown, 400 ThrottlingException, a
  dropped connection, an answer cut in half, or the server stopped for 1-4 s and restarted, for 1-3
  requests. The operation must retry with backoff (the proxy sees the same request again, later)
  and finish as if nothing happened: a complete dataset, complete checkpoints, the same samples.
- *persistent*: the fault stays (or the server stays down) past every retry. The command must exit
  with a clear error naming the object it was reading or writing, within bounded time, and leave
  nothing half-published: no ``index.json`` (readers refuse the dataset), no checkpoint that
  ``resolve_checkpoint`` would pick without all its files. Persistent runs use the command line as
  a user would, with ``AWS_MAX_ATTEMPTS=3`` so that giving up takes seconds, not minutes.

Disk full: a small tmpfs mounted for the scenario (root and ``mount`` available), else a file-size
limit (``RLIMIT_FSIZE``, ``SIGXFSZ`` ignored, so writes past it fail with ``EFBIG``) on the command.

Scenarios: ``s3-prepare``, ``s3-checkpoint``, ``s3-streaming``, ``disk-full``
(``python -m bench.faults --only NAME``; docs/reliability.md holds the measured table).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.faults import Outcome, Settings, scenario
from bench.faults._proc import end_session
from bench.faults._s3proxy import FaultProxy, Injection, S3Fixture, matcher

REPO = Path(__file__).resolve().parents[2]
TRANSIENT_MODES = ("500", "503", "slowdown", "throttle", "reset", "cut", "stop")
PERSISTENT_MODES = ("503", "slowdown", "reset", "stop")
PERSISTENT_ATTEMPTS = "3"  # AWS_MAX_ATTEMPTS of the persistent-fault commands
CLI_TIMEOUT_S = 300.0  # one command under a persistent fault (it must give up well before)
PREPARE_CLASSES, PREPARE_PER_CLASS, PREPARE_PART = 4, 16, 16  # 64 images in 4 parts
IMAGE_SIZE = 16
TRAIN_STEPS, TRAIN_EVERY = 12, 4  # checkpoints at steps 4, 8 and 12
RAY_TEST_ENV = {  # Ray Train knobs for short runs (as tests/platform/test_train_support.py)
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "DS_ACCELERATOR": "cpu",
}


# ----------------------------------------------------------------------------------------- helpers
def _quiet() -> None:
    for name in ("werkzeug", "botocore", "urllib3", "streaming", "ray", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _source_images(root: Path, seed: int) -> str:
    """A class-per-folder source of random 24x24 PNGs (``PREPARE_CLASSES`` x ``PREPARE_PER_CLASS``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(PREPARE_CLASSES):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(PREPARE_PER_CLASS):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return str(root)


def _prepare(src: str, out: str, endpoint: str | None, workers: int = 2) -> dict[str, Any]:
    from fractalgen.pipelines.prepare import prepare_dataset

    return prepare_dataset(
        src, out, size=IMAGE_SIZE, workers=workers, part_size=PREPARE_PART, progress=False, endpoint=endpoint
    )


def _dataset_problem(fx: S3Fixture, uri: str) -> str | None:
    """None if ``uri`` holds the complete dataset of ``_source_images`` (read past the proxy)."""
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    keys = set(fx.keys(bucket, prefix + "/"))
    if f"{prefix}/index.json" not in keys:
        return f"no index.json at {uri}"
    s3 = fx.client()
    index = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/index.json")["Body"].read())
    shards = [(s.get("zip_data") or s["raw_data"])["basename"] for s in index["shards"]]
    missing = [b for b in shards if f"{prefix}/{b}" not in keys]
    if missing:
        return f"index.json published with {len(missing)} shard(s) missing, e.g. {missing[0]}"
    samples = sum(int(s["samples"]) for s in index["shards"])
    summary = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/summary.json")["Body"].read())
    want = PREPARE_CLASSES * PREPARE_PER_CLASS
    if samples != want or summary["num_images"] != want:
        return f"{samples} samples in the shards, {summary['num_images']} in the summary, expected {want}"
    return None


def _attempts(proxy: FaultProxy, inj: Injection) -> tuple[int, float]:
    """(attempts of the first faulted request, seconds from its first to its last attempt)."""
    if not inj.hits:
        return 0, 0.0
    key = inj.hits[0].key
    times = [r.t for r in proxy.requests if r.key == key and r.t >= inj.hits[0].t]
    return len(times), (times[-1] - times[0]) if times else 0.0


def _retried(proxy: FaultProxy, inj: Injection) -> bool:
    """The faulted request came again after the fault (a retry), or the server was restarted and
    the client went on (a stop refuses connections: those attempts never reach the proxy)."""
    if not inj.hits:
        return False
    if inj.mode == "stop":
        return any(r.t > inj.hits[0].t + inj.down_s * 0.5 for r in proxy.requests)
    attempts, _ = _attempts(proxy, inj)
    return attempts > len([h for h in inj.hits if h.key == inj.hits[0].key])


def _arm_transient(proxy: FaultProxy, rng: Any, pattern: str, after_max: int) -> Injection:
    mode = rng.choice(TRANSIENT_MODES)
    after = rng.randrange(max(after_max, 1))
    if mode == "stop":
        return proxy.inject(mode, match=matcher(pattern=pattern), after=after, down_s=rng.uniform(1.0, 4.0))
    methods = ("PUT", "POST", "GET") if mode == "throttle" else ()  # S3 answers HEAD without a body
    return proxy.inject(mode, match=matcher(methods, pattern), after=after, count=rng.randint(1, 3))


def _describe(inj: Injection, proxy: FaultProxy) -> str:
    if not inj.hits:
        return f"{inj.mode}: never hit"
    first = inj.hits[0]
    attempts, span = _attempts(proxy, inj)
    what = f"{inj.mode} x{len(inj.hits)}" if inj.mode != "stop" else f"server down {inj.down_s:.1f} s"
    return f"{what} at {first.method} {first.path.split('/', 2)[-1]} ({attempts} attempts over {span:.2f} s)"


def _cli(args: list[str], env: dict[str, str], timeout_s: float = CLI_TIMEOUT_S) -> tuple[int, str, float]:
    """Run ``fractalgen ARGS`` in a new session; (exit code, output tail, seconds). Past
    ``timeout_s`` the whole session (the command and the Ray processes it started) is killed and
    the exit code is -1."""
    import tempfile

    cmd = [sys.executable, "-m", "fractalgen", *args]
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
            timed_out = ""
        except subprocess.TimeoutExpired:
            code, timed_out = -1, f"did not exit within {timeout_s:.0f} s\n"
        end_session(proc)
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    return code, timed_out + stdout[-2000:] + "\n" + stderr[-12000:], seconds


def _error_line(text: str, width: int = 700) -> str:
    """The command's error (from its ``fractalgen ...: error:`` line on), on one line, shortened."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if ": error: " in line:
            rest = [x.strip() for x in lines[i:] if x.strip()]
            joined = " | ".join(rest)
            if len(joined) <= width:
                return joined
            return f"{rest[0][:200]} ... {' | '.join(rest[-3:])}"[: width + 200]
    return lines[-1][:width] if lines else "(no output)"


def _env(fx: S3Fixture | None, **extra: str) -> dict[str, str]:
    env = dict(os.environ, **RAY_TEST_ENV, **(fx.env if fx else {}), **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("RAY_ADDRESS", None)
    return env


# ------------------------------------------------------------------------------------ s3-prepare
@scenario("s3-prepare", budget_s=600)
def s3_prepare(settings: Settings) -> Outcome:
    """``data prepare --out s3://``: transient faults at random requests must be retried and the
    dataset complete; a persistent fault must end the command with a clear error, no index.json,
    and the same command must then resume and complete the dataset."""
    _quiet()
    outcome = Outcome(
        fault="S3 answers 500 / 503 / SlowDown / throttling, drops or cuts connections, stops and restarts",
        injected="converting shards (`data prepare --out s3://`)",
        must_hold="retried with backoff, dataset complete; past the retries a clear error naming the "
        "object, no index.json, a rerun completes it",
    )
    rng = settings.rng("s3-prepare")
    work = Path(settings.work_dir)
    src = _source_images(work / "src", settings.seed)
    transient, persistent = (2, 1) if settings.short else (6, 2)
    with S3Fixture() as fx:
        fx.apply_env()
        bucket = fx.new_bucket("fault-prepare")
        proxy = fx.proxy
        base = f"s3://{bucket}/baseline"
        _prepare(src, base, fx.endpoint_url)  # also imports streaming & co. before any timing
        n_requests = proxy.count(matcher(pattern="/baseline/"))
        problem = _dataset_problem(fx, base)
        if problem:
            outcome.error = f"the fault-free baseline conversion is incomplete: {problem}"
            return outcome
        outcome.figures["requests_per_conversion"] = n_requests
        attempts_seen: list[int] = []
        for i in range(transient):
            name = f"transient{i}"
            inj = _arm_transient(proxy, rng, f"/{name}/", n_requests - 2)
            uri = f"s3://{bucket}/{name}"
            try:
                _prepare(src, uri, fx.endpoint_url)
                problem = _dataset_problem(fx, uri)
            except Exception as err:
                problem = f"the conversion failed: {type(err).__name__}: {err}"
            proxy.clear()
            proxy.start()
            attempts_seen.append(_attempts(proxy, inj)[0])
            held = problem is None and bool(inj.hits) and _retried(proxy, inj)
            outcome.record(held, f"{_describe(inj, proxy)} -> {problem or 'dataset complete'}")
        for i in range(persistent):
            name = f"persistent{i}"
            uri = f"s3://{bucket}/{name}"
            mode = rng.choice(PERSISTENT_MODES)
            after = rng.randrange(max(n_requests - 4, 1))
            if mode == "stop":
                inj = proxy.inject(mode, match=matcher(pattern=f"/{name}/"), after=after, down_s=3600)
            else:
                inj = proxy.inject(mode, match=matcher(pattern=f"/{name}/"), after=after)
            args = ["data", "prepare", "--source", src, "--out", uri, "--size", str(IMAGE_SIZE),
                    "--workers", "2", "--part-size", str(PREPARE_PART), "--no-progress",
                    "--endpoint-url", fx.endpoint_url]  # fmt: skip
            code, text, seconds = _cli(args, _env(fx, AWS_MAX_ATTEMPTS=PERSISTENT_ATTEMPTS))
            proxy.clear()
            proxy.start()
            line = _error_line(text)
            published = f"{name}/index.json" in fx.keys(bucket, name + "/")
            clear = code == 2 and "Traceback" not in text and f"s3://{bucket}/{name}" in line
            try:
                _prepare(src, uri, fx.endpoint_url)  # the same command again, the store back
                resumed = _dataset_problem(fx, uri)
            except Exception as err:
                resumed = f"{type(err).__name__}: {err}"
            held = bool(inj.hits) and clear and not published and resumed is None
            outcome.record(
                held,
                f"{mode} from request {after + 1} on: exit {code} after {seconds:.0f} s, "
                f"{'index.json PUBLISHED, ' if published else 'no index.json, '}"
                f"rerun: {resumed or 'complete'}; {line}",
            )
            outcome.figures.setdefault("persistent_error_s", []).append(round(seconds, 1))
        outcome.figures["attempts_of_faulted_request"] = attempts_seen
    return outcome


# ------------------------------------------------------------------------------- training helpers
def _train_overrides(
    name: str,
    data: str,
    storage_path: str,
    *,
    data_endpoint: str | None = None,
    storage_endpoint: str | None = None,
    max_failures: int = 1,
) -> list[str]:
    """A tiny run: ``fractalmar_tiny16`` on 2 CPU workers (ZeRO-2), global batch 8, every step's
    samples recorded, checkpoints at steps 4, 8 and 12."""
    out = [
        f"name={name}",
        "model.name=fractalmar_tiny16",
        f"data.train_uri={data}",
        "data.loader_workers=0",
        "data.record_samples=true",
        "train.global_batch_size=8",
        "train.micro_batch_per_gpu=4",
        "train.epochs=4",
        "train.warmup_epochs=0",
        "train.precision=fp32",
        "train.zero_stage=2",
        f"train.max_steps={TRAIN_STEPS}",
        f"train.log_every_steps={TRAIN_EVERY}",
        "cluster.num_workers=2",
        f"cluster.max_failures={max_failures}",
        f"checkpoint.storage_path={storage_path}",
        f"checkpoint.every_steps={TRAIN_EVERY}",
        "checkpoint.keep_last=10",
        "mlflow.enabled=false",
        "eval.num_images=4",
    ]
    if data_endpoint:
        out.append(f"data.s3_endpoint_url={data_endpoint}")
    if storage_endpoint:
        out.append(f"checkpoint.s3_endpoint_url={storage_endpoint}")
    return out


def _recipe(path: Path, overrides: list[str]) -> str:
    """Write the recipe of ``overrides`` to ``path`` (for ``fractalgen train --config``)."""
    from fractalgen.config import TrainRunConfig, dumps, load

    path.write_text(dumps(load(TrainRunConfig, None, overrides)))
    return str(path)


@contextlib.contextmanager
def _own_ray_dir() -> Iterator[None]:
    """This scenario's Ray runs (in-process and the commands it starts; also a decorator) keep their
    files in a temp folder of their own (``RAY_TMPDIR``): with the default one, a cluster someone started on this
    machine with ``ray start`` is the one ``ray.init()`` joins instead of starting a local Ray."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="fgray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = folder
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _local_ray() -> Iterator[None]:
    import ray

    os.environ.update(RAY_TEST_ENV)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _train(overrides: list[str]) -> tuple[Any, str | None]:
    """Run the recipe in this process (Ray already up): (outcome or None, error text or None)."""
    from fractalgen.config import TrainRunConfig, load
    from fractalgen.platform.training.driver import run_training

    try:
        return run_training(load(TrainRunConfig, None, overrides)), None
    except Exception as err:
        return None, f"{type(err).__name__}: {str(err)[:600]}"


CKPT_FILES = (  # ZeRO-2 on 2 workers with recorded samples (fractalgen/platform/training/worker.py)
    "deepspeed/mp_rank_00_model_states.pt",
    "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "state.json",
    "plan.json",
    "run.yaml",
    "samples/rank_0.json",
    "samples/rank_1.json",
)


def _checkpoint_problems(run_uri: str, endpoint: str | None) -> tuple[list[str], str | None]:
    """(problems, the checkpoint ``resolve_checkpoint`` picks). A problem: the picked checkpoint
    lacks files, or a checkpoint that readers would accept (it has ``state.json``) lacks files."""
    from fractalgen import storage
    from fractalgen.platform.artifacts.checkpoints import CheckpointNotFound, resolve_checkpoint

    problems = []
    try:
        picked: str | None = resolve_checkpoint(run_uri, endpoint=endpoint)
    except CheckpointNotFound:
        picked = None
    for name in storage.list_dirs(run_uri, endpoint=endpoint):
        if not name.startswith("checkpoint_"):
            continue
        uri = storage.join(run_uri, name)
        files = set(storage.list_files(uri, endpoint=endpoint))
        missing = [f for f in CKPT_FILES if f not in files]
        if not missing:
            continue
        if uri == picked:
            problems.append(f"resolve_checkpoint picks {name}, which lacks {', '.join(missing)}")
        elif _is_accepted(uri, endpoint):
            problems.append(f"{name} looks published (readers accept it) but lacks {', '.join(missing)}")
    return problems, picked


def _is_accepted(checkpoint_uri: str, endpoint: str | None) -> bool:
    """Whether fractalgen's readers take ``checkpoint_uri`` for a finished checkpoint."""
    from fractalgen import storage
    from fractalgen.platform.artifacts import checkpoints as checkpointing

    accept = getattr(checkpointing, "is_complete", None)
    if accept is not None:
        return bool(accept(checkpoint_uri, endpoint=endpoint))
    return storage.exists(storage.join(checkpoint_uri, "state.json"), endpoint=endpoint)


def _ledger_problem(checkpoint_uri: str, endpoint: str | None, num_images: int) -> str | None:
    """None if every step 1..TRAIN_STEPS trained 8 samples and each epoch saw every image once."""
    from fractalgen import storage

    steps: dict[int, list[str]] = {}
    for rank in (0, 1):
        for step, keys in storage.read_json(
            storage.join(checkpoint_uri, "samples", f"rank_{rank}.json"), endpoint=endpoint
        ):
            steps.setdefault(int(step), []).extend(keys)
    if sorted(steps) != list(range(1, TRAIN_STEPS + 1)):
        return f"steps recorded: {sorted(steps)}"
    short = [s for s, keys in steps.items() if len(keys) != 8]
    if short:
        return f"steps without 8 samples: {short}"
    per_epoch = num_images // 8
    for first in range(1, TRAIN_STEPS + 1, per_epoch):
        keys = [k for s in range(first, min(first + per_epoch, TRAIN_STEPS + 1)) for k in steps[s]]
        if len(keys) != len(set(keys)):
            return f"samples repeated in the epoch from step {first}"
    return None


def _local_dataset(work: Path, seed: int) -> str:
    out = str(work / "data" / "tiny16")
    _prepare(_source_images(work / "src", seed), out, None, workers=0)
    return out


# --------------------------------------------------------------------------------- s3-checkpoint
@scenario("s3-checkpoint", budget_s=600, in_short=False)  # CI: test_train.py checkpoints to S3 (ZeRO-3)
@_own_ray_dir()
def s3_checkpoint(settings: Settings) -> Outcome:
    """Training with ``checkpoint.storage_path=s3://``: a transient fault in each checkpoint's
    upload (pyarrow's S3FileSystem, Ray Train) must be retried and the run finish with complete
    checkpoints; a persistent one must fail the run with a clear error naming the checkpoint and
    leave every checkpoint readers accept complete."""
    _quiet()
    outcome = Outcome(
        fault="S3 answers 500 / 503 / SlowDown / throttling, drops or cuts connections, stops and restarts",
        injected="writing checkpoints (training with an s3:// storage_path)",
        must_hold="retried with backoff, the run finishes, checkpoints complete; past the retries a "
        "clear error naming the checkpoint, no half-published checkpoint",
    )
    rng = settings.rng("s3-checkpoint")
    work = Path(settings.work_dir)
    data = _local_dataset(work, settings.seed)
    with S3Fixture() as fx:
        fx.apply_env()
        bucket = fx.new_bucket("fault-ckpt")
        proxy = fx.proxy
        storage_path = f"s3://{bucket}/runs"
        steps = (
            (TRAIN_EVERY * 2,) if settings.short else tuple(range(TRAIN_EVERY, TRAIN_STEPS + 1, TRAIN_EVERY))
        )
        with _local_ray():
            injections = {
                step: _arm_transient(proxy, rng, f"/transient/checkpoint_{step:09d}/", 20) for step in steps
            }
            result, error = _train(
                _train_overrides("transient", data, storage_path, storage_endpoint=fx.endpoint_url)
            )
            proxy.clear()
            proxy.start()
        run_uri = f"{storage_path}/transient"
        problems, picked = _checkpoint_problems(run_uri, fx.endpoint_url)
        ledger = None
        if result is not None and picked:
            ledger = _ledger_problem(picked, fx.endpoint_url, PREPARE_CLASSES * PREPARE_PER_CLASS)
        for step, inj in injections.items():
            ok = error is None and not problems and ledger is None and bool(inj.hits) and _retried(proxy, inj)
            outcome.record(
                ok,
                f"checkpoint {step}: {_describe(inj, proxy)} -> "
                + (
                    error
                    or "; ".join(problems)
                    or ledger
                    or f"finished, checkpoints complete ({picked.rsplit('/', 1)[-1]})"
                ),
            )
        if settings.short:  # the CI variant: the retried upload only (the CLI run takes minutes)
            return outcome
        # persistent: the CLI, as a user runs it, with few attempts so that it gives up quickly
        step = TRAIN_EVERY * 2
        pattern = rng.choice(
            (f"/persistent/checkpoint_{step:09d}/", f"/persistent/checkpoint_{step:09d}/.*rank_1")
        )
        mode = rng.choice(PERSISTENT_MODES)
        after = rng.randrange(4)
        inj = proxy.inject(mode, match=matcher(pattern=pattern), after=after, down_s=3600)
        recipe = _recipe(
            work / "persistent.yaml",
            _train_overrides("persistent", data, storage_path, storage_endpoint=fx.endpoint_url),
        )
        code, text, seconds = _cli(
            ["train", "--config", recipe], _env(fx, AWS_MAX_ATTEMPTS=PERSISTENT_ATTEMPTS)
        )
        proxy.clear()
        proxy.start()
        line = _error_line(text)
        problems, picked = _checkpoint_problems(f"{storage_path}/persistent", fx.endpoint_url)
        clear = code == 1 and f"checkpoint_{step:09d}" in line
        held = bool(inj.hits) and clear and not problems
        outcome.record(
            held,
            f"{mode} on {pattern.split('/', 2)[-1]} from request {after + 1}: exit {code} after {seconds:.0f} s; "
            f"readers pick {(picked or 'none').rsplit('/', 1)[-1]}; {'; '.join(problems) or 'no half-published checkpoint'}; {line}",
        )
        outcome.figures["persistent_error_s"] = round(seconds, 1)
    return outcome


# ---------------------------------------------------------------------------------- s3-streaming
@scenario("s3-streaming", budget_s=600, in_short=False)
@_own_ray_dir()
def s3_streaming(settings: Settings) -> Outcome:
    """Training reading ``s3://`` data (mosaicml-streaming's downloads): transient faults on shard
    downloads must be retried and every epoch still see every image once; a persistent one must
    fail the run with a clear error naming the shard, not end epochs early in silence."""
    _quiet()
    outcome = Outcome(
        fault="S3 answers 500 / 503 / SlowDown / throttling, drops or cuts connections, stops and restarts",
        injected="streaming shards (training reading s3:// data)",
        must_hold="retried with backoff, every epoch sees every image once; past the retries a clear "
        "error naming the shard, no half-published checkpoint",
    )
    rng = settings.rng("s3-streaming")
    work = Path(settings.work_dir)
    src = _source_images(work / "src", settings.seed)
    with S3Fixture() as fx:
        fx.apply_env()
        bucket = fx.new_bucket("fault-stream")
        proxy = fx.proxy
        data = f"s3://{bucket}/tiny16"
        _prepare(src, data, fx.moto_url)  # written past the proxy: only the reads get faults
        parts = [f"part-{i:05d}" for i in range(PREPARE_CLASSES * PREPARE_PER_CLASS // PREPARE_PART)]
        chosen = rng.sample(parts, 1 if settings.short else 3)
        with _local_ray():
            injections = {}
            for part in chosen:
                mode = rng.choice(TRANSIENT_MODES)
                pattern = f"/tiny16/{part}/.*\\.mds$"
                if mode == "stop":
                    inj = proxy.inject(mode, match=matcher(pattern=pattern), down_s=rng.uniform(1.0, 4.0))
                else:
                    inj = proxy.inject(mode, match=matcher(("GET",), pattern), count=rng.randint(1, 3))
                injections[part] = inj
            storage_path = str(work / "runs")
            overrides = _train_overrides("transient", data, storage_path, data_endpoint=fx.endpoint_url)
            result, error = _train(overrides)
            proxy.clear()
            proxy.start()
        problems, picked = _checkpoint_problems(f"{storage_path}/transient", None)
        ledger = None
        if result is not None and picked:
            ledger = _ledger_problem(picked, None, PREPARE_CLASSES * PREPARE_PER_CLASS)
        for part, inj in injections.items():
            ok = error is None and not problems and ledger is None and bool(inj.hits) and _retried(proxy, inj)
            outcome.record(
                ok,
                f"{part}: {_describe(inj, proxy)} -> "
                + (error or "; ".join(problems) or ledger or "finished, every epoch saw every image once"),
            )
        # persistent: one shard's downloads keep failing, through the CLI
        part = rng.choice(parts)
        mode = rng.choice(("503", "slowdown", "reset"))
        inj = proxy.inject(mode, match=matcher(("GET",), f"/tiny16/{part}/.*\\.mds$"))
        recipe = _recipe(
            work / "persistent.yaml",
            _train_overrides("persistent", data, storage_path, data_endpoint=fx.endpoint_url),
        )
        code, text, seconds = _cli(
            ["train", "--config", recipe], _env(fx, AWS_MAX_ATTEMPTS=PERSISTENT_ATTEMPTS)
        )
        proxy.clear()
        line = _error_line(text)
        problems, picked = _checkpoint_problems(f"{storage_path}/persistent", None)
        clear = code == 1 and f"{data}/{part}/shard" in line
        held = bool(inj.hits) and clear and not problems
        outcome.record(
            held,
            f"{mode} on every download of {part}'s shard: exit {code} after {seconds:.0f} s; readers pick "
            f"{(picked or 'none').rsplit('/', 1)[-1]}; {'; '.join(problems) or 'no half-published checkpoint'}; "
            f"{line}",
        )
        outcome.figures["persistent_error_s"] = round(seconds, 1)
    return outcome


# ------------------------------------------------------------------------------------- disk-full
def _mount_tmpfs(path: Path, size_bytes: int) -> bool:
    """Mount a tmpfs of ``size_bytes`` at ``path`` (or resize the one there); False if not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    remount = os.path.ismount(path)
    options = f"{'remount,' if remount else ''}size={size_bytes},mode=0755"
    cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _unmount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@contextlib.contextmanager
def _tmpfs(path: Path, size_bytes: int) -> Iterator[bool]:
    """A small tmpfs at ``path`` for the duration (yields False, mounting nothing, if not allowed)."""
    mounted = _mount_tmpfs(path, size_bytes)
    try:
        yield mounted
    finally:
        if mounted:
            _unmount(path)


def _limit_file_size(limit: int) -> Any:
    """A ``preexec_fn``: files the command writes may not grow past ``limit`` bytes (EFBIG)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _cli_limited(args: list[str], env: dict[str, str], limit: int) -> tuple[int, str, float]:
    """``fractalgen ARGS`` under ``RLIMIT_FSIZE`` (output through pipes, which the limit spares)."""
    cmd = [sys.executable, "-m", "fractalgen", *args]
    start = time.monotonic()
    try:
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
            preexec_fn=_limit_file_size(limit), start_new_session=True,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return -1, f"did not exit within {CLI_TIMEOUT_S:.0f} s", time.monotonic() - start
    return done.returncode, done.stdout[-2000:] + "\n" + done.stderr[-12000:], time.monotonic() - start


def _local_dataset_problem(out: Path) -> str | None:
    """None if ``out`` holds the complete dataset of ``_source_images``."""
    index = out / "index.json"
    if not index.exists():
        return f"no index.json at {out}"
    shards = [
        (s.get("zip_data") or s["raw_data"])["basename"] for s in json.loads(index.read_text())["shards"]
    ]
    missing = [b for b in shards if not (out / b).exists()]
    if missing:
        return f"index.json published with {len(missing)} shard(s) missing, e.g. {missing[0]}"
    summary = json.loads((out / "summary.json").read_text())
    if summary["num_images"] != PREPARE_CLASSES * PREPARE_PER_CLASS:
        return f"{summary['num_images']} images in the summary"
    return None


DISK_FULL_WORDS = ("no space left on device", "file too large", "errno 28", "errno 27")


@scenario("disk-full", budget_s=600)
@_own_ray_dir()
def disk_full(settings: Settings) -> Outcome:
    """A full disk under ``data prepare`` (output folder) and under training (``storage_path``): the
    command stops with a clear error, publishes nothing half-written, and after space is freed the
    same command completes the dataset / the last complete checkpoint is the one readers pick."""
    _quiet()
    outcome = Outcome(
        fault="disk full (a small tmpfs; else a file-size limit)",
        injected="`data prepare` output folder; training `storage_path` (checkpoints)",
        must_hold="a clear error naming the full disk; no index.json / no checkpoint readers accept "
        "without all its files; a rerun with space completes",
    )
    rng = settings.rng("disk-full")
    work = Path(settings.work_dir)
    src = _source_images(work / "src", settings.seed)
    env = _env(None)
    with _tmpfs(work / "probe", 1 << 20) as can_mount:
        pass
    outcome.figures["method"] = "tmpfs" if can_mount else "RLIMIT_FSIZE (no mount allowed)"
    for i in range(1 if settings.short else 3):
        disk = work / f"disk{i}"
        out = disk / "dataset"
        args = ["data", "prepare", "--source", src, "--out", str(out), "--size", str(IMAGE_SIZE),
                "--workers", "2", "--part-size", str(PREPARE_PART), "--no-progress"]  # fmt: skip
        if can_mount:
            size = 4096 * rng.randint(6, 20)  # the whole dataset needs about 30 pages
            with _tmpfs(disk, size):
                code, text, seconds = _cli(args, env)
                problem = _local_dataset_problem(out)
                published = (out / "index.json").exists()
                _mount_tmpfs(disk, 64 << 20)  # space freed
                rerun, rerun_text, _ = _cli(args, env)
                resumed = _local_dataset_problem(out) if rerun == 0 else _error_line(rerun_text)
            where = f"a {size // 1024} KiB tmpfs"
        else:
            size = rng.randint(2048, 12000)  # a shard is about 14 KB
            disk.mkdir(parents=True, exist_ok=True)
            code, text, seconds = _cli_limited(args, env, size)
            problem = _local_dataset_problem(out)
            published = (out / "index.json").exists()
            rerun, rerun_text, _ = _cli(args, env)
            resumed = _local_dataset_problem(out) if rerun == 0 else _error_line(rerun_text)
            where = f"files limited to {size} bytes"
        line = _error_line(text)
        if code == 0 and problem is None:  # everything fitted: no fault happened
            outcome.details.append(f"prepare on {where}: the dataset fitted, no injection")
            continue
        clear = code == 2 and any(w in line.lower() for w in DISK_FULL_WORDS) and "Traceback" not in text
        held = clear and not published and resumed is None
        outcome.record(
            held,
            f"prepare on {where}: exit {code} after {seconds:.0f} s, "
            f"{'index.json PUBLISHED' if published else 'no index.json'}, rerun with space: "
            f"{resumed or 'complete'}; {line}",
        )
    if not can_mount:
        outcome.details.append(
            "training: skipped (a full storage_path needs a tmpfs; mount is not allowed here)"
        )
        return outcome
    data = _local_dataset(work / "train", settings.seed)
    for i in range(0 if settings.short else 2):
        disk = work / f"ckpt{i}"
        size = 1024 * rng.randint(2500, 7000)  # a checkpoint takes about 2.5 MB: fail at the 1st-3rd
        recipe = _recipe(work / f"ckpt{i}.yaml", _train_overrides(f"full{i}", data, str(disk / "runs")))
        with _tmpfs(disk, size):
            code, text, seconds = _cli(["train", "--config", recipe], env)
            problems, picked = _checkpoint_problems(str(disk / "runs" / f"full{i}"), None)
            kept = sorted(p.name for p in (disk / "runs" / f"full{i}").glob("checkpoint_*"))
        line = _error_line(text)
        if code == 0:
            outcome.details.append(f"training on a {size // 1024} KiB tmpfs: everything fitted, no injection")
            continue
        clear = code == 1 and any(w in line.lower() for w in DISK_FULL_WORDS)
        outcome.record(
            clear and not problems,
            f"training on a {size // 1024} KiB tmpfs: exit {code} after {seconds:.0f} s; folders {kept}, "
            f"readers pick {(picked or 'none').rsplit('/', 1)[-1]}; "
            f"{'; '.join(problems) or 'no half-published checkpoint'}; {line}",
        )
    return outcome

"""Serving faults: bad requests and load against ``mlflow models serve`` of a registered model.

The served model is the cheapest real one: ``fractalmar_tiny16`` (random weights, 10 classes),
registered with ``fractalgen.platform.registry.register_checkpoint`` in a SQLite MLflow store in the
scenario's folder and served by ``mlflow models serve --env-manager local`` on 127.0.0.1
(``served_model``), as tests/platform/test_registry.py serves one.

- ``serving-bad-inputs``: every request of ``BAD_INPUTS`` (labels out of range or not numbers, huge
  or negative batch sizes, non-numeric, NaN or infinite settings, bad iteration counts, too many or
  no rows, a body that is not JSON) must be answered with a 4xx and a message naming what is wrong, within
  ``REQUEST_TIMEOUT_S``, never a 500 or a hang; a good request afterwards must still be answered.
  The injection points are the order of the requests (``Settings.rng``).
- ``serving-load``: ``LOAD_REQUESTS`` requests (short variant: 20), ``LOAD_CONCURRENCY`` at a time,
  each for 1-4 images with random labels and seeds; none may fail; p50/p90/p99 latency go into the
  figures (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.faults import Outcome, Settings, scenario
from bench.faults._proc import end_session, free_port

SERVE_START_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 60.0
NUM_CLASSES = 10  # fractalmar_tiny16
LOAD_REQUESTS, LOAD_CONCURRENCY, LOAD_SHORT_REQUESTS = 200, 8, 20
GOOD_PARAMS = {"num_iters": [2, 2], "cfg": 1.5, "temperature": 1.0, "cfg_schedule": "linear", "seed": 0}


def _good(**params: Any) -> dict[str, Any]:
    return {"dataframe_records": [{"label": 1}, {"label": 2}], "params": {**GOOD_PARAMS, **params}}


def _labels(labels: list[Any], **params: Any) -> dict[str, Any]:
    return {"dataframe_records": [{"label": v} for v in labels], "params": {**GOOD_PARAMS, **params}}


# (case, request body (a dict sent as JSON, or raw bytes), text the error message must contain)
BAD_INPUTS: list[tuple[str, Any, str]] = [
    ("label above the classes", _labels([3, NUM_CLASSES]), "label"),
    ("negative label", _labels([-1, 2]), "label"),
    ("huge label", _labels([2**62]), "label"),
    ("non-numeric label", _labels(["cat"]), "label"),
    ("huge batch_size", _good(batch_size=10**9), "batch_size"),
    ("negative batch_size", _good(batch_size=-4), "batch_size"),
    ("NaN cfg", _good(cfg=float("nan")), "cfg"),
    ("infinite cfg", _good(cfg=float("inf")), "cfg"),
    ("cfg below 1", _good(cfg=0.5), "cfg"),
    ("non-numeric cfg", _good(cfg="strong"), "cfg"),
    ("NaN temperature", _good(temperature=float("nan")), "temperature"),
    ("zero temperature", _good(temperature=0.0), "temperature"),
    ("non-numeric temperature", _good(temperature="warm"), "temperature"),
    ("NaN filter_threshold", _good(filter_threshold=float("nan")), "filter_threshold"),
    ("unknown cfg_schedule", _good(cfg_schedule="cubic"), "cfg_schedule"),
    ("backwards interval", _good(cfg_schedule="interval:start=0.9,end=0.1"), "start < end"),
    ("unknown lower_cfg_schedule", _good(lower_cfg_schedule="wobbly"), "lower_cfg_schedule"),
    ("lower_cfg below 1", _good(lower_cfg=0.5), "lower_cfg"),
    ("NaN temperature_end", _good(temperature_end=float("nan")), "temperature_end"),
    ("zero num_iters", _good(num_iters=[0, 2]), "num_iters"),
    ("huge num_iters", _good(num_iters=[10**9, 2]), "num_iters"),
    ("num_iters of another depth", _good(num_iters=[2, 2, 2]), "num_iters"),
    ("negative seed", _good(seed=-1), "seed"),
    ("too many rows", _labels([1] * 5000), "at most"),
    ("no rows", {"dataframe_records": [], "params": GOOD_PARAMS}, "label"),
    ("body is not JSON", b'{"dataframe_records": [{"label": 1}', "json"),
]


def post(url: str, body: Any, timeout_s: float = REQUEST_TIMEOUT_S) -> tuple[int, str]:
    """POST ``body`` (a dict as JSON, or raw bytes) to ``url``/invocations: (status, response text).
    A status of 0 means no answer within ``timeout_s`` (or the connection failed)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as err:
        return 0, f"no answer within {timeout_s:.0f} s: {type(err).__name__}: {err}"


def error_message(text: str) -> str:
    """The ``message`` of an MLflow error answer (the whole text if it is not one)."""
    try:
        return str(json.loads(text).get("message", text))
    except (ValueError, AttributeError):
        return text


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(
        f"mlflow models serve did not answer {url}/ping within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}"
    )


@contextlib.contextmanager
def served_model(work: Path, name: str = "fractalgen-serving-faults") -> Iterator[str]:
    """A tiny registered model served by ``mlflow models serve`` on 127.0.0.1; yields its base URL.

    The MLflow store is SQLite under ``work``; the server is stopped (its whole process group) on exit.
    """
    import torch

    from fractalgen.models import build_model, save_released
    from fractalgen.platform.registry import register_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    torch.manual_seed(0)
    weights = save_released(build_model("fractalmar_tiny16"), work / "tiny16.pth")
    version = register_checkpoint(str(weights), name, tracking_uri=tracking, grid_images=0)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "serve.log"
    # the scoring server is started as `uvicorn ...` from PATH: the venv's bin folder must be on it
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=tracking,
        MLFLOW_REGISTRY_URI=tracking,
        MLFLOW_ENABLE_TELEMETRY="false",
        DO_NOT_TRACK="1",
        FRACTALGEN_SERVE_DEVICE="cpu",
        PATH=path,
    )
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", version.model_uri,
           "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_ready(url, proc, log, SERVE_START_TIMEOUT_S)
        yield url
    finally:
        end_session(proc)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, nearest rank."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


# ---------------------------------------------------------------------------- serving-bad-inputs
@scenario("serving-bad-inputs", budget_s=300, in_short=False)  # CI: tests/platform/test_serving_inputs.py
def serving_bad_inputs(settings: Settings) -> Outcome:
    """Every bad request gets a 4xx with a message naming the problem, in bounded time; the server
    answers a good request afterwards."""
    outcome = Outcome(
        fault="bad requests: labels out of range, huge or negative batch sizes, non-numeric / NaN / "
        "infinite settings, bad iteration counts, too many rows, broken JSON",
        injected="`mlflow models serve` of a registered model (POST /invocations)",
        must_hold="a 4xx with a message naming the problem, never a 500 or a hang; the server "
        "still answers good requests",
    )
    rng = settings.rng("serving-bad-inputs")
    cases = list(BAD_INPUTS)
    rng.shuffle(cases)
    if settings.short:
        cases = cases[:8]
    with served_model(Path(settings.work_dir)) as url:
        status, text = post(url, _good())
        if status != 200:
            outcome.error = f"a good request was answered {status}: {text[:300]}"
            return outcome
        slowest = 0.0
        for case, body, expected in cases:
            start = time.monotonic()
            status, text = post(url, body)
            seconds = time.monotonic() - start
            slowest = max(slowest, seconds)
            message = error_message(text)
            held = 400 <= status < 500 and expected.lower() in message.lower()
            outcome.record(held, f"{case}: {status or 'no answer'} in {seconds:.2f} s: {message[:200]}")
        status, text = post(url, _good())
        outcome.record(status == 200, f"a good request afterwards: {status}")
        outcome.figures["slowest_bad_request_s"] = round(slowest, 2)
    return outcome


# --------------------------------------------------------------------------------- serving-load
@scenario("serving-load", budget_s=600, in_short=False)  # CI: test_serving_inputs.py, test_registry.py serve
def serving_load(settings: Settings) -> Outcome:
    """``LOAD_REQUESTS`` requests, ``LOAD_CONCURRENCY`` in flight: none fails; latency percentiles."""
    n = LOAD_SHORT_REQUESTS if settings.short else LOAD_REQUESTS
    outcome = Outcome(
        fault=f"load: {n} requests, {LOAD_CONCURRENCY} concurrent (1-4 images each)",
        injected="`mlflow models serve` of a registered model (POST /invocations)",
        must_hold="no failed request; p50/p90/p99 latency recorded",
    )
    rng = settings.rng("serving-load")
    bodies = [
        _labels([rng.randrange(NUM_CLASSES) for _ in range(rng.randint(1, 4))], seed=rng.randrange(10**6))
        for _ in range(n)
    ]
    with served_model(Path(settings.work_dir)) as url:
        post(url, _good())  # warm-up (first call compiles nothing, but loads lazily)

        def one(body: dict[str, Any]) -> tuple[bool, int, float, str]:
            start = time.monotonic()
            status, text = post(url, body)
            seconds = time.monotonic() - start
            try:
                images = len(json.loads(text)["predictions"]) if status == 200 else -1
            except (ValueError, KeyError, TypeError):
                images = -1
            return images == len(body["dataframe_records"]), status, seconds, text[:200]

        start = time.monotonic()
        with ThreadPoolExecutor(LOAD_CONCURRENCY) as pool:
            results = list(pool.map(one, bodies))
        wall = time.monotonic() - start
    latencies = [seconds for _, _, seconds, _ in results]
    failed = [i for i, (ok, _, _, _) in enumerate(results) if not ok]
    outcome.figures.update(
        requests=n,
        concurrency=LOAD_CONCURRENCY,
        failed=len(failed),
        p50_s=round(percentile(latencies, 50), 3),
        p90_s=round(percentile(latencies, 90), 3),
        p99_s=round(percentile(latencies, 99), 3),
        max_s=round(max(latencies), 3),
        requests_per_s=round(n / wall, 2),
    )
    # one injection per request: a request held if it was answered with one image per label
    outcome.injections, outcome.held = n, n - len(failed)
    outcome.details.append(
        f"{n - len(failed)}/{n} answered with images; p50 {outcome.figures['p50_s']} s, "
        f"p90 {outcome.figures['p90_s']} s, p99 {outcome.figures['p99_s']} s, max {outcome.figures['max_s']} s, "
        f"{outcome.figures['requests_per_s']} requests/s"
    )
    for i in failed:
        _, status, seconds, text = results[i]
        outcome.details.append(
            f"FAILED: request {i}: status {status or 'no answer'} after {seconds:.2f} s: {text}"
        )
    return outcome

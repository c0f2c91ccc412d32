"""Shared fixtures for the platform tests.

- ``mlflow_server``: a real ``mlflow server`` process on 127.0.0.1 (free port, SQLite backend store,
  artifacts served by the server from a temporary folder), one per test session, started with a
  bounded wait and stopped at the end. The fixture value is the tracking URI ``http://127.0.0.1:PORT``.
  Tests that use it should name their own experiments / registered models (the store is shared).
- ``inception_weights``: a randomly initialised FID Inception weights file (session-wide).
- ``mlflow_env``: ``mlflow_server`` plus ``MLFLOW_TRACKING_URI`` (and the registry URI) set for the
  test's duration, restored afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from platform_servers import free_port, stop_process, wait_http

MLFLOW_START_TIMEOUT_S = 90.0


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking + registry server; yields ``http://127.0.0.1:PORT``."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = root / "server.log"
    # no job-execution workers (huey consumers): the tests never run server-side jobs, and on a 2-core
    # machine they triple the start-up time
    env = dict(
        os.environ,
        MLFLOW_ENABLE_TELEMETRY="false",
        DO_NOT_TRACK="1",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", MLFLOW_START_TIMEOUT_S, proc, log)
        yield uri
    finally:
        stop_process(proc)


@pytest.fixture
def mlflow_env(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``mlflow_server`` as MLflow's tracking and registry URI (and ``MLFLOW_TRACKING_URI`` /
    ``MLFLOW_REGISTRY_URI``) for this test; everything as before afterwards."""
    from fractalgen.platform.artifacts.model_store import use_tracking_uri

    monkeypatch.setenv("MLFLOW_ENABLE_TELEMETRY", "false")
    with use_tracking_uri(mlflow_server, registry=True):
        yield mlflow_server


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised FID Inception v3 weights file (the real one is never downloaded in tests)."""
    from fractalgen.platform.evaluation.inception import FID_WEIGHTS_NAME, write_random_weights

    return write_random_weights(tmp_path_factory.mktemp("inception") / FID_WEIGHTS_NAME)

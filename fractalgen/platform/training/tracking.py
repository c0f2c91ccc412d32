"""MLflow tracking for training runs: the driver opens the run, rank 0 logs without stalling training.

Terms:
- *tracking URI*: ``mlflow.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite store
  ``<storage_path>/mlflow.db`` (local storage only; artifacts beside it in ``mlartifacts/``).
- *MLflow run*: one per training run, found again by the tag ``fractalgen.run_name`` (the training
  run's ``name``), so a relaunched or restarted run keeps logging into the same MLflow run.
- *pending records*: metrics, tags and artifacts that rank 0 queued and a background thread has not
  yet delivered. The training loop never waits for the server.

Documented behaviour when the server cannot be reached:
- at launch (driver, before any Ray resources): ``check_reachable`` waits up to
  ``mlflow.connect_timeout_s``; then ``TrackingUnavailable`` stops the launch with a message naming
  ``mlflow.tracking_uri``, unless ``mlflow.required`` is false, which trains untracked with a warning
  (a typo in the URI would otherwise silently lose a long run's record);
- during the run (rank 0): a failed delivery logs one warning (then at most one a minute), keeps the
  records and retries with back-off; training continues. Records wait in memory (bounded by
  ``max_pending``, oldest metrics dropped first); at the end ``close`` waits a bounded time and
  reports what could not be sent.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from fractalgen import storage
from fractalgen.config import TrainRunConfig, to_dict
from fractalgen.platform.artifacts.model_store import ensure_experiment, flatten_params

log = logging.getLogger(__name__)

RUN_NAME_TAG = "fractalgen.run_name"


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server could not be reached at launch."""


def resolve_tracking_uri(cfg: TrainRunConfig) -> str:
    """The tracking URI for the run (see module docstring); ``ValueError`` if none can be chosen."""
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if storage.is_remote(cfg.checkpoint.storage_path):
        raise ValueError(
            "mlflow.tracking_uri: needed when checkpoint.storage_path is remote "
            "(or set mlflow.enabled=false to train untracked)"
        )
    folder = os.path.abspath(storage.local_path(cfg.checkpoint.storage_path))
    return f"sqlite:///{os.path.join(folder, 'mlflow.db')}"


def _is_http(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def check_reachable(uri: str, timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for the tracking store at ``uri``; ``TrackingUnavailable`` if it never answers.

    HTTP servers are asked for ``/health``; a SQLite store needs its folder to be writable.
    """
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme == "sqlite":
        path = uri.split(":///", 1)[-1]
        folder = os.path.dirname(os.path.abspath(path)) or "."
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise TrackingUnavailable(f"cannot create the MLflow store folder {folder}: {err}") from None
        return
    if not _is_http(uri):
        return  # databricks, file stores ...: the first call will tell
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=min(5.0, timeout_s)) as resp:
                if resp.status < 500:
                    return
        except urllib.error.HTTPError as err:
            if err.code < 500:
                return  # the server answers (an auth proxy, an older server without /health)
            last = err
        except (urllib.error.URLError, OSError) as err:
            last = err
        if time.monotonic() >= deadline:
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} did not answer within {timeout_s:.0f} s ({last}); "
                "check mlflow.tracking_uri, or set mlflow.required=false to train untracked"
            )
        time.sleep(0.5)


def open_run(cfg: TrainRunConfig, tracking_uri: str, *, extra_params: Mapping[str, Any] = ()) -> str:
    """Create (or find again, by run name) the MLflow run; log params and the resolved config.

    Returns the run id. Called on the driver, before any Ray resources are requested.
    """
    from mlflow.entities import Param, RunTag  # deferred: heavy import
    from mlflow.tracking import MlflowClient  # deferred: heavy import

    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, cfg.mlflow.experiment, tracking_uri)
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.name}'", max_results=1
    )
    config_text = _config_yaml(cfg)
    if found:
        run_id = found[0].info.run_id
        client.set_tag(run_id, "fractalgen.relaunched", time.strftime("%Y-%m-%dT%H:%M:%S"))
        client.update_run(run_id, status="RUNNING")
        log.info("MLflow: resuming run %s (%s)", run_id, cfg.name)
    else:
        run = client.create_run(experiment_id, run_name=cfg.name, tags={RUN_NAME_TAG: cfg.name})
        run_id = run.info.run_id
        params = flatten_params("", to_dict(cfg), {})
        params.update({k: str(v) for k, v in dict(extra_params).items()})
        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    client.log_text(run_id, config_text, f"config/run-{stamp}.yaml")
    client.log_batch(run_id, tags=[RunTag("fractalgen.config", config_text[:5000])])
    return run_id


def _config_yaml(cfg: TrainRunConfig) -> str:
    from fractalgen.config import dumps  # deferred: heavy import

    return dumps(cfg)


def finish_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Mark the MLflow run FINISHED / FAILED / KILLED (driver; a failure only warns)."""
    try:
        from mlflow.tracking import MlflowClient  # deferred: heavy import

        MlflowClient(tracking_uri).set_terminated(run_id, status=status)
    except Exception as err:  # the run's outcome must not depend on the tracking server
        log.warning("MLflow: could not mark run %s %s: %s", run_id, status, err)


class RunTracker:
    """Rank 0's MLflow logger: calls queue records and return at once; a thread delivers them.

    ``log_metrics``, ``set_tags`` and ``log_artifact`` never raise for server trouble and never block
    on the network; see the module docstring for what happens when the server is away.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        max_pending: int = 10_000,
        retry_s: float = 2.0,
        client: Any = None,
    ) -> None:
        # short HTTP attempts: the thread retries itself, and MLflow's own retries would hold a
        # record for minutes (7 retries with doubling back-off by default)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.entities import (
            Metric,
            RunTag,
        )  # deferred: heavy import # imported here: not on the training loop's clock

        self._metric, self._tag = Metric, RunTag
        if client is None:
            from mlflow.tracking import MlflowClient  # deferred: heavy import

            client = MlflowClient(tracking_uri)
        self.client = client
        self.run_id = run_id
        self.max_pending = max_pending
        self.retry_s = retry_s
        self._pending: collections.deque[tuple[str, Callable[[], None]]] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._deadline = math.inf
        self._failures = 0
        self._last_warning = -math.inf
        self.dropped = 0
        self.sent = 0
        self._files = tempfile.mkdtemp(prefix="fractalgen-mlflow-")
        self._thread = threading.Thread(target=self._deliver, name="mlflow-tracker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ queueing (training thread)
    def _put(self, kind: str, call: Callable[[], None]) -> None:
        with self._cond:
            if self._closed:
                return
            while len(self._pending) >= self.max_pending:
                # drop the oldest metric record; tags and artifacts are few and kept
                for i, (k, _) in enumerate(self._pending):
                    if k == "metrics":
                        del self._pending[i]
                        self.dropped += 1
                        break
                else:
                    break
            self._pending.append((kind, call))
            self._cond.notify()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [self._metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        if batch:
            self._put("metrics", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        batch = [self._tag(k, str(v)) for k, v in tags.items()]
        self._put("tags", lambda: self.client.log_batch(self.run_id, tags=batch))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Queue a copy of ``local_path`` (the caller may delete its file at once)."""
        folder = tempfile.mkdtemp(dir=self._files)
        copy = os.path.join(folder, os.path.basename(local_path))
        shutil.copyfile(local_path, copy)

        def call() -> None:
            self.client.log_artifact(self.run_id, copy, artifact_path)
            shutil.rmtree(folder, ignore_errors=True)

        self._put("artifact", call)

    # ------------------------------------------------------------------ delivery (background thread)
    def _deliver(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                kind, call = self._pending[0]
            try:
                call()
            except Exception as err:
                self._failures += 1
                now = time.monotonic()
                if now - self._last_warning >= 60.0:
                    self._last_warning = now
                    log.warning(
                        "MLflow: could not log %s (%s: %s); training goes on, %d record(s) kept for retry",
                        kind,
                        type(err).__name__,
                        str(err).splitlines()[0][:200] if str(err) else "",
                        len(self._pending),
                    )
                with self._cond:
                    if self._closed and time.monotonic() >= self._deadline:
                        return
                    self._cond.wait(timeout=min(30.0, self.retry_s * min(self._failures, 8)))
                continue
            with self._cond:
                if self._pending and self._pending[0][1] is call:
                    self._pending.popleft()
                self.sent += 1
                if self._failures:
                    log.warning(
                        "MLflow: reachable again; delivering %d pending record(s)", len(self._pending)
                    )
                    self._failures = 0

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait up to ``timeout_s`` for the queue to empty; True if everything was delivered."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.pending:
                return True
            time.sleep(0.05)
        return not self.pending

    def close(self, timeout_s: float = 30.0) -> None:
        """Deliver what is pending (waiting at most ``timeout_s``), then stop the thread."""
        with self._cond:
            self._deadline = time.monotonic() + timeout_s
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout_s + 1.0)
        left = self.pending
        if left:
            log.warning("MLflow: %d record(s) could not be delivered (server unreachable)", left)
        if self.dropped:
            log.warning("MLflow: %d metric record(s) were dropped while the server was away", self.dropped)
        shutil.rmtree(self._files, ignore_errors=True)

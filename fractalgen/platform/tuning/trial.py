"""One sweep trial (a Tune function trainable): generate, score at each rung, report to Tune and to a
nested MLflow run."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from fractalgen.platform.tuning.config import SweepEvalConfig, schedule_family
from fractalgen.platform.tuning.space import trial_settings

log = logging.getLogger(__name__)


# =============================================================================== the trial
_WORKERS: dict[str, Any] = {}  # per trial process: model + Inception loaded once when Tune reuses it


def payload_digest(data: Any) -> str:
    import numpy as np  # deferred: heavy import

    arr = np.asarray(data)
    return hashlib.sha1(arr[: 1 << 20].tobytes() + str(arr.size).encode()).hexdigest()


def run_trial(config: dict[str, Any], *, payload: dict[str, Any]) -> None:
    """Tune function trainable: generate, score at each rung, report to Tune and to a nested MLflow run.

    ``payload`` (shared by all trials, through the object store): model and Inception file bytes,
    reference statistics, the eval config, MLflow ids.

    Why our own MlflowClient code and not Ray's MLflow integration (issue 13; checked against the
    source of the pinned ray 2.60, ``ray.air.integrations.mlflow``):
    - ``MLflowLoggerCallback.log_trial_end`` ends every run that did not fail as ``FINISHED``: a
      trial ASHA stopped looks like a completed one, and the callback has no hook to end it as
      ``KILLED`` with ``fractalgen.early_stopped=true``; the driver would have to rewrite every run
      after ``fit`` anyway (``run_sweep`` does so for ours).
    - The callback takes one ``tags`` dict for all runs (nesting via ``mlflow.parentRunId`` would
      work), but logs ``trial.config`` as params, i.e. the raw Tune config (Optuna's ``schedule``,
      ``power-cosine.exponent``, ``num_iters="default"``), not the resolved setting that the registry
      tags and ``fractalgen sample`` use; and it logs every numeric key of every result
      (``time_this_iter_s``, ``pid``, ``training_iteration`` ...), one ``log_metric`` call per key,
      each batch preceded by a ``get_run`` (``_run_exists``). Step is ``timesteps_total`` or the
      iteration: it would need a second, duplicated image count in each report.
    - The callback runs in the driver, so a trial never learns its run id; ours returns it in the
      report (``mlflow_run_id``), which ties results rows, Pareto rows and registry tags to runs.
    - ``setup_mlflow`` (in the trial) starts the run through the fluent API but never ends it: an
      early-stopped trial's run stays RUNNING, the same closing pass is needed; and it also logs the
      raw config as params.
    So: one ``create_run`` with the parent's id, one ``log_batch`` per rung (step = images), and
    the driver closes early-stopped runs as KILLED (``run_sweep``).
    """
    import numpy as np  # deferred: heavy import
    from mlflow.entities import Metric, Param, RunTag  # deferred: heavy import
    from mlflow.tracking import MlflowClient  # deferred: heavy import
    from ray import tune  # deferred: heavy import

    from fractalgen.platform.evaluation.metrics import compute_metrics  # deferred: heavy import
    from fractalgen.platform.generation.sampling import (  # deferred: heavy import
        GenerationJob,
        GenerationWorker,
        balanced_labels,
    )

    ev: SweepEvalConfig = payload["eval"]
    settings = trial_settings(config)
    key = payload["cache_key"]
    if key not in _WORKERS:
        _WORKERS.clear()
        _WORKERS[key] = GenerationWorker(payload["model"], payload["inception"])
    worker = _WORKERS[key]
    resolved = settings.resolved(worker.model.config)

    ctx = tune.get_context()
    client = MlflowClient(payload["tracking_uri"])
    tags = {
        "mlflow.parentRunId": payload["parent_run_id"],
        "fractalgen.sweep": payload["sweep_name"],
        "fractalgen.trial_id": ctx.get_trial_id(),
        "fractalgen.released": str(bool(config.get("released"))).lower(),
        "fractalgen.schedule_family": schedule_family(str(resolved.cfg_schedule)),
    }
    run = client.create_run(payload["experiment_id"], run_name=ctx.get_trial_name(), tags=tags)
    run_id = run.info.run_id
    params = {k.split(".", 1)[1]: v for k, v in resolved.to_tags().items()}
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])

    labels = balanced_labels(ev.num_images, worker.model.config.num_classes)
    job = GenerationJob(labels=labels, settings=settings, batch_size=ev.batch_size, seed=ev.seed)
    feats: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    rungs = ev.rungs()
    done = 0
    sample_seconds = 0.0  # generation only, without the Inception network
    reference = payload["reference"]
    for batch in job.batches():
        res = worker.run(job, batch)
        feats.append(res["features"])
        logits.append(res["logits"])
        sample_seconds += res["sample_seconds"]
        done = batch[2]
        while rungs and done >= rungs[0]:
            n = rungs.pop(0)
            f, lg = np.concatenate(feats)[:n], np.concatenate(logits)[:n]
            m = compute_metrics(f, lg, reference, precision_recall_images=None if ev.precision_recall else 0)
            metrics = {k: v for k, v in m.as_dict().items() if k != "num_images"}
            metrics["sample_seconds_per_image"] = sample_seconds / done
            stamp = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, n) for k, v in metrics.items()])
            final = not rungs
            if final:
                client.log_batch(run_id, tags=[RunTag("fractalgen.completed", "true")])
                client.set_terminated(run_id, "FINISHED")
            tune.report({**metrics, "num_images": n, "mlflow_run_id": run_id, "completed": final})

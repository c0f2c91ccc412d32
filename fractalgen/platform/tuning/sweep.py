"""``fractalgen sweep``: Ray Tune over sampling settings, scored by FID, tracked in MLflow.

A *sweep* searches the fields of ``SamplingSettings`` (fractalgen/sampling_settings.py) for one model:
guidance scale (``cfg``), ``temperature`` (multiplies the logits) and its ramp (``temperature_end``),
guidance schedule (``cfg_schedule``: any schedule spec, and families whose parameters are searched),
guidance of the lower levels (``lower_cfg``, ``lower_cfg_schedule``), ``filter_threshold`` and
iterations per level. Terms:
- *space* (``space`` of the recipe): a list of values per field (``null`` = unset: the released
  behaviour). ``cfg_schedule`` lists schedule specs (``linear``, ``power-cosine:exponent=3``); a bare
  family name listed in ``schedule_params`` (``power-cosine: {exponent: [1, 2, 3]}``) stands for
  every combination of its parameter values (grid), or for its parameters sampled only when that
  family is chosen (Optuna: *conditional* parameters). Every value is checked by building a
  ``SamplingSettings`` before anything runs; a bad one names its key (``space.cfg_schedule[1]: ...``).
- *trial*: one setting. It runs on one GPU (``resources.gpus_per_trial``; CPU when the Ray cluster
  has none), generates ``eval.num_images`` images with balanced classes (batch i with seed
  ``eval.seed + i``: every trial sees the same labels and seeds, so differences come from the
  settings) and scores them against the reference statistics. It records the generation time per
  image (``sample_seconds_per_image``, without the Inception network): the setting's cost.
- *released baseline*: the model's released setting (``SamplingSettings().resolved(model config)``)
  is one more trial (``search.include_released``, default on), marked ``released`` in every output
  and never stopped early, so it is always comparable with the completed trials.
- *rungs* (early stopping): ASHA over the number of images. A trial reports FID at
  ``min_images``, ``min_images * reduction_factor``, ... and ``num_images``; at each rung ASHA stops
  trials whose FID is not in the best ``1 / reduction_factor`` of the trials seen there. FID at a
  small count is biased upwards but comparable between trials at the same count.
- *search*: ``grid`` (every combination of the lists in ``space``) or ``optuna`` (``num_samples``
  trials from Optuna's TPE over the same lists, or over ``*_range`` intervals when given; a
  define-by-run space, so only the chosen schedule family's parameters are sampled).
- *MLflow*: one parent run per sweep (experiment ``mlflow.experiment``); every trial is a run
  nested under it (tag ``mlflow.parentRunId``) with its settings as params and FID/IS/cost per rung
  (step = images). Early-stopped trial runs end as KILLED with ``fractalgen.early_stopped=true``.
- *Pareto front*: the completed trials that no other completed trial beats on both FID (lower) and
  IS (higher); with ``eval.precision_recall`` also for (FID, precision) and (FID, recall).
- *best setting*: the lowest FID among trials that reached ``num_images``. The whole setting
  (schedule spec, ``lower_*``, ``temperature_end``, ``filter_threshold``) is written to the
  registered model version as ``sampling.*`` tags (``fractalgen sample --model models:/NAME@ALIAS``
  then samples with it) with ``sweep.fid``, ``sweep.run_id`` ..., and logged on the parent run.
- *outputs* (``<output>``, default ``<storage_path>/<name>``, and the parent run's ``sweep/``
  artifacts): ``results.parquet`` (one row per trial), ``fid_vs_cfg.png`` (FID against guidance
  scale per temperature), ``pareto.parquet`` and ``pareto.md`` (the Pareto-optimal trials of each
  pair) and ``pareto.png`` (FID against IS, precision, recall; the front drawn, one marker and
  colour per schedule family, the released setting starred).

The recipe is a YAML file (``configs/sweep_*.yaml``) of ``SweepConfig`` (``fractalgen.platform.tuning.config``);
the parts: ``space``, ``trial``, ``results`` beside this module (the driver, ``run_sweep``).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from fractalgen import storage
from fractalgen.config import dumps, to_dict
from fractalgen.platform import registry
from fractalgen.platform.artifacts.model_store import ensure_experiment, flatten_params
from fractalgen.platform.ray_connect import connect_ray
from fractalgen.platform.tuning.config import SweepConfig
from fractalgen.platform.tuning.results import (
    PARETO_COLUMNS,
    SweepResult,
    pareto_rows,
    plot_fid_vs_cfg,
    plot_pareto,
    result_rows,
    write_pareto_markdown,
    write_table,
)
from fractalgen.platform.tuning.space import (
    make_scheduler,
    optuna_space,
    param_space,
    released_config,
    released_first,
    trial_settings,
)
from fractalgen.platform.tuning.trial import payload_digest, run_trial

log = logging.getLogger(__name__)


# =============================================================================== the driver
def _tracking_uri(cfg: SweepConfig) -> str:
    import mlflow  # deferred: heavy import

    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])  # trials run in other folders
    return uri


def _reference(cfg: SweepConfig, inception_path: Path, device: Any):
    from fractalgen.platform.evaluation.inception import (  # deferred: heavy import
        extract_features,
        load_inception,
    )
    from fractalgen.platform.evaluation.metrics import load_statistics  # deferred: heavy import

    inception = None

    def net():
        nonlocal inception
        inception = inception or load_inception(inception_path, device=device)
        return inception

    if cfg.eval.reference.endswith(".npz"):
        return load_statistics(
            cfg.eval.reference, extractor=lambda imgs: extract_features(net(), imgs)[0],
            max_images=10_000 if cfg.eval.precision_recall else 0,
        )  # fmt: skip
    from fractalgen.platform.evaluation.data import reference_statistics  # deferred: heavy import

    return reference_statistics(
        cfg.eval.reference, net(), max_images=cfg.eval.reference_images, batch_size=cfg.eval.batch_size,
        keep_features=10_000 if cfg.eval.precision_recall else 0,
    )  # fmt: skip


def run_sweep(cfg: SweepConfig, *, progress: bool = True) -> SweepResult:
    """Run the sweep (module docstring) and return the results; see ``SweepResult``."""
    import numpy as np  # deferred: heavy import
    from mlflow.tracking import MlflowClient  # deferred: heavy import
    from ray import tune  # deferred: heavy import

    from fractalgen.platform.evaluation.inception import resolve_weights  # deferred: heavy import
    from fractalgen.platform.generation.sampling import pick_device  # deferred: heavy import
    from fractalgen.platform.generation.sources import (  # deferred: heavy import
        download_version,
        resolve_model_source,
    )

    tracking_uri = _tracking_uri(cfg)
    client = MlflowClient(tracking_uri)
    out_dir = cfg.output_dir().absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fractalgen-sweep-") as work:
        if cfg.model.startswith("models:/"):
            source = download_version(cfg.model, work, tracking_uri=tracking_uri)
        else:
            source = resolve_model_source(cfg.model, work_dir=work)
        inception_path = resolve_weights(cfg.eval.inception)
        reference = _reference(cfg, inception_path, pick_device())
        model_bytes = np.fromfile(source.path, dtype=np.uint8)
        inception_bytes = np.fromfile(inception_path, dtype=np.uint8)
        experiment_id, parent_id = _open_parent_run(client, cfg, source, tracking_uri)
        payload = {
            "model": model_bytes,
            "inception": inception_bytes,
            "cache_key": payload_digest(model_bytes) + payload_digest(inception_bytes),
            "reference": reference,
            "eval": cfg.eval,
            "tracking_uri": tracking_uri,
            "experiment_id": experiment_id,
            "parent_run_id": parent_id,
            "sweep_name": cfg.name,
        }
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, payload=payload),
            {"cpu": cfg.resources.cpus_per_trial, "gpu": _gpus_per_trial(cfg)},
        )
        model_config = _model_config(source.path)
        search_alg, space, num_samples = _search(cfg, model_config)
        storage_fs, storage_path = storage.ray_storage(cfg.storage_path)  # docs/storage.md
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="fid",
                mode="min",
                scheduler=make_scheduler(cfg),
                search_alg=search_alg,
                num_samples=num_samples,
                max_concurrent_trials=cfg.search.max_concurrent or None,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=cfg.name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                verbose=1 if progress else 0,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        t0 = time.monotonic()
        rows = result_rows(tuner.fit(), cfg)
        _close_unfinished_trial_runs(client, rows)
        outputs = _write_outputs(client, cfg, rows, parent_id, out_dir)
        best, registered = _record_best(client, cfg, rows, outputs["pareto"], source, model_config,
                                        parent_id, tracking_uri, time.monotonic() - t0)  # fmt: skip
    return SweepResult(best=best, parent_run_id=parent_id, rows=rows, registered=registered, **outputs)


def _open_parent_run(client: Any, cfg: SweepConfig, source: Any, tracking_uri: str) -> tuple[str, str]:
    """(experiment id, parent run id): the sweep's MLflow run, its recipe as params and YAML."""
    from mlflow.entities import Param  # deferred: heavy import

    experiment_id = ensure_experiment(client, cfg.mlflow.experiment, tracking_uri)
    tags = {"fractalgen.sweep": cfg.name, "fractalgen.model_source": cfg.model}
    if source.registered_name:
        tags.update({"fractalgen.registered_model": source.registered_name,
                     "fractalgen.model_version": str(source.version)})  # fmt: skip
    parent_id = client.create_run(experiment_id, run_name=f"sweep-{cfg.name}", tags=tags).info.run_id
    flat = flatten_params("", to_dict(cfg), {})
    client.log_batch(parent_id, params=[Param(k, v) for k, v in sorted(flat.items())])
    client.log_text(parent_id, dumps(cfg), "sweep/config.yaml")
    return experiment_id, parent_id


def _gpus_per_trial(cfg: SweepConfig) -> float:
    """``resources.gpus_per_trial`` on a Ray cluster (joined or started) that has them, else 0."""
    connect_ray(cfg.resources.address)
    import ray  # deferred: heavy import

    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    gpus = cfg.resources.gpus_per_trial if cluster_gpus >= cfg.resources.gpus_per_trial > 0 else 0
    if cfg.resources.gpus_per_trial > 0 and not gpus:
        log.warning("the Ray cluster has no GPU: sweep trials run on CPUs (slow for real models)")
    return gpus


def _search(cfg: SweepConfig, model_config: Any) -> tuple[Any, dict[str, Any], int]:
    """(search algorithm, param space, Tune's num_samples), the released baseline first when included."""
    released = [released_config(model_config)] if cfg.search.include_released else []
    num_samples = cfg.search.trials()
    search_alg: Any = None
    space: dict[str, Any] = {}
    if cfg.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # deferred: heavy import

        search_alg = OptunaSearch(space=optuna_space(cfg), metric="fid", mode="min", seed=cfg.search.seed)
        if released:
            search_alg = released_first(search_alg, released[0])
    else:
        from ray.tune.search import BasicVariantGenerator  # deferred: heavy import

        space = param_space(cfg)
        if num_samples > 1:
            log.info("grid search: repeating the grid %d times (search.num_samples)", num_samples)
        # a point replaces one repeat of the grid (BasicVariantGenerator's docstring): one more repeat
        search_alg = BasicVariantGenerator(points_to_evaluate=released) if released else None
    if released:
        log.info("evaluating the released setting too: %s", trial_settings(released[0]).describe())
    return search_alg, space, num_samples + len(released)


def _close_unfinished_trial_runs(client: Any, rows: list[dict[str, Any]]) -> None:
    """Trial runs that early stopping (or an error) ended are still open in MLflow: KILLED / FAILED."""
    for row in rows:
        if row["mlflow_run_id"] and row["status"] != "completed":
            client.set_tag(
                row["mlflow_run_id"],
                "fractalgen.early_stopped",
                str(row["status"] == "early-stopped").lower(),
            )
            client.set_terminated(
                row["mlflow_run_id"], "KILLED" if row["status"] == "early-stopped" else "FAILED"
            )


def _write_outputs(
    client: Any, cfg: SweepConfig, rows: list[dict[str, Any]], parent_id: str, out_dir: Path
) -> dict[str, Any]:
    """The table, FID-against-cfg plot, Pareto table / markdown / plot in ``out_dir``, logged on the parent run."""
    table = write_table(rows, out_dir / "results.parquet")
    plot = plot_fid_vs_cfg(rows, out_dir / "fid_vs_cfg.png", title=f"{cfg.name}: FID against guidance scale")
    pareto = pareto_rows(rows)
    pareto_table = write_table(pareto, out_dir / "pareto.parquet", PARETO_COLUMNS)
    pareto_md = write_pareto_markdown(
        pareto, out_dir / "pareto.md", title=f"{cfg.name}: Pareto-optimal settings"
    )
    pareto_plot = plot_pareto(
        rows, out_dir / "pareto.png", title=f"{cfg.name}: FID against IS / precision / recall"
    )
    for path in (table, plot, pareto_table, pareto_md, pareto_plot):
        if path:
            client.log_artifact(parent_id, str(path), "sweep")
    return {
        "table": table,
        "plot": plot,
        "pareto": pareto,
        "pareto_table": pareto_table,
        "pareto_plot": pareto_plot,
    }


def _record_best(
    client: Any,
    cfg: SweepConfig,
    rows: list[dict[str, Any]],
    pareto: list[dict[str, Any]],
    source: Any,
    model_config: Any,
    parent_id: str,
    tracking_uri: str,
    seconds: float,
) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    """The summary, released and best metrics on the parent run, the best setting as its ``best.*``
    tags and on the registered version; the parent run ends. Returns (best row, (name, version))."""
    from mlflow.entities import Metric, RunTag  # deferred: heavy import

    completed = [r for r in rows if r["status"] == "completed" and r["fid"] == r["fid"]]
    best = min(completed, key=lambda r: r["fid"]) if completed else None
    summary = {"trials": len(rows), "completed": len(completed),
               "early_stopped": sum(r["status"] == "early-stopped" for r in rows),
               "errors": sum(r["status"] == "error" for r in rows), "seconds": seconds,
               "pareto_fid_is": sum(r["front"] == "fid-inception_score" for r in pareto)}  # fmt: skip
    stamp = int(time.time() * 1000)
    metrics = [Metric(f"sweep_{k}", float(v), stamp, 0) for k, v in summary.items()]
    scored = ("fid", "inception_score", "precision", "recall", "sample_seconds_per_image")
    rel = next((r for r in rows if r["released"] and r["status"] == "completed"), None)
    if rel is not None:
        metrics += [Metric(f"released_{k}", rel[k], stamp, 0) for k in scored if math.isfinite(rel[k])]
    registered = None
    if best is None:
        client.log_batch(parent_id, metrics=metrics)
        client.set_terminated(parent_id, "FAILED")
        return None, None
    resolved = trial_settings(best).resolved(model_config)
    metrics += [Metric(f"best_{k}", best[k], stamp, 0) for k in scored if math.isfinite(best[k])]
    client.log_batch(parent_id, metrics=metrics,
                     tags=[RunTag(k, v) for k, v in resolved.to_tags("best.").items()]
                     + [RunTag("best.released", str(best["released"]).lower())])  # fmt: skip
    if cfg.tag_version and source.registered_name:
        registry.set_best_settings(
            source.registered_name, source.version, resolved,
            {"fid": best["fid"], "inception_score": best["inception_score"], "num_images": best["num_images"],
             "sample_seconds_per_image": best["sample_seconds_per_image"], "released": best["released"],
             "run_id": parent_id, "trial_run_id": best["mlflow_run_id"], "name": cfg.name},
            tracking_uri=tracking_uri,
        )  # fmt: skip
        registered = (source.registered_name, str(source.version))
    client.set_terminated(parent_id, "FINISHED")
    return best, registered


def _model_config(path: Path):
    from fractalgen.models.checkpoint import config_from_checkpoint, read_checkpoint  # deferred: heavy import

    return config_from_checkpoint(read_checkpoint(path))[1]

"""``fractalgen sweep``: Ray Tune over sampling settings, scored by FID, tracked in MLflow.

A *sweep* searches guidance scale (``cfg``), ``temperature`` (multiplies the logits), guidance
schedule (``linear``/``constant``) and iterations per level for one model. Terms:
- *trial*: one setting. It runs on one GPU (``resources.gpus_per_trial``; CPU when the Ray cluster
  has none), generates ``eval.num_images`` images with balanced classes (batch i with seed
  ``eval.seed + i``: every trial sees the same labels and seeds, so differences come from the
  settings) and scores them against the reference statistics.
- *rungs* (early stopping): ASHA over the number of images. A trial reports FID at
  ``min_images``, ``min_images * reduction_factor``, ... and ``num_images``; at each rung ASHA stops
  trials whose FID is not in the best ``1 / reduction_factor`` of the trials seen there. FID at a
  small count is biased upwards but comparable between trials at the same count.
- *search*: ``grid`` (every combination of the lists in ``space``) or ``optuna`` (``num_samples``
  trials from Optuna's TPE over the same lists, or over ``*_range`` intervals when given).
- *MLflow*: one parent run per sweep (experiment ``mlflow.experiment``); every trial is a run
  nested under it (tag ``mlflow.parentRunId``) with its settings as params and FID/IS per rung
  (step = images). Early-stopped trial runs end as KILLED with ``fractalgen.early_stopped=true``.
- *best setting*: the lowest FID among trials that reached ``num_images``. It is written to the
  registered model version as tags (``sampling.*``, ``sweep.fid``, ``sweep.run_id`` ...), logged on
  the parent run, and the results table is exported as Parquet plus a plot of FID against guidance
  scale per temperature (``<output>/results.parquet``, ``<output>/fid_vs_cfg.png``).

The recipe is a YAML file (``configs/sweep_*.yaml``) of ``SweepConfig`` (``fractalgen.config``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fractalgen.config import ConfigError, dumps, load, to_dict
from fractalgen.platform.artifacts.model_store import flatten_params as _flatten
from fractalgen.platform.ray_connect import connect_ray

if TYPE_CHECKING:
    from fractalgen.sampling_settings import SamplingSettings

log = logging.getLogger(__name__)

Schedule = Literal["linear", "constant"]


# =============================================================================== configuration
@dataclass(kw_only=True)
class SweepSpaceConfig:
    """The settings searched. Lists: grid values (Optuna: categorical choices)."""

    cfg: tuple[float, ...] = (1.0, 2.0, 4.0)
    temperature: tuple[float, ...] = (1.0,)  # multiplies the logits (released meaning)
    cfg_schedule: tuple[Schedule, ...] = ("linear",)
    num_iters: tuple[tuple[int, ...], ...] = ()  # iterations per level; empty: the model's default
    # Optuna only: sample uniformly from an interval instead of the list
    cfg_range: tuple[float, float] | None = None
    temperature_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not self.cfg or not self.temperature or not self.cfg_schedule:
            raise ValueError("cfg, temperature, cfg_schedule: need at least one value each")
        if any(c < 1.0 for c in self.cfg):
            raise ValueError(f"cfg: guidance scales must be >= 1.0, got {self.cfg}")
        if any(t <= 0 for t in self.temperature):
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        for iters in self.num_iters:
            if not iters or any(i < 1 for i in iters):
                raise ValueError(f"num_iters: each entry needs iterations >= 1 per level, got {iters}")
        for key in ("cfg_range", "temperature_range"):
            rng = getattr(self, key)
            if rng is not None and not 0 < rng[0] < rng[1]:
                raise ValueError(f"{key}: needs 0 < low < high, got {rng}")

    def grid_size(self) -> int:
        return len(self.cfg) * len(self.temperature) * len(self.cfg_schedule) * max(1, len(self.num_iters))


@dataclass(kw_only=True)
class SweepSearchConfig:
    algorithm: Literal["grid", "optuna"] = "grid"
    # Optuna: trials (None: 16); grid: repeats of the whole grid (None: 1, each combination once)
    num_samples: int | None = None
    max_concurrent: int = 0  # 0: as many as the resources allow
    seed: int = 0  # Optuna's sampler seed

    def __post_init__(self) -> None:
        if (self.num_samples is not None and self.num_samples < 1) or self.max_concurrent < 0:
            raise ValueError("num_samples must be >= 1 and max_concurrent >= 0")

    def trials(self) -> int:
        """Tune's ``num_samples``."""
        return self.num_samples or (16 if self.algorithm == "optuna" else 1)


@dataclass(kw_only=True)
class SweepEvalConfig:
    """How each trial is scored (see ``fractalgen eval fid``)."""

    reference: str = ""  # reference .npz (mu, sigma[, features | arr_0]) or a shard set URI (required)
    reference_images: int | None = None  # with a shard set: at most this many images
    inception: str | None = None  # Inception weights path/URI; None: FRACTALGEN_INCEPTION_WEIGHTS / caches
    num_images: int = 10_000  # images of a trial that runs to the end
    min_images: int = 1_000  # first rung: the image count at which early stopping first decides
    reduction_factor: float = 2.0  # ASHA: keep the best 1/reduction_factor at each rung
    early_stopping: bool = True  # False: every trial runs to num_images
    batch_size: int = 64
    seed: int = 0
    precision_recall: bool = False  # also precision/recall (needs reference features)

    def __post_init__(self) -> None:
        if self.num_images < 2 or self.min_images < 2:
            raise ValueError("num_images and min_images: FID needs at least 2 images")
        if self.min_images > self.num_images:
            raise ValueError(f"min_images ({self.min_images}) must not exceed num_images ({self.num_images})")
        if self.reduction_factor <= 1:
            raise ValueError(f"reduction_factor: must be > 1, got {self.reduction_factor}")
        if self.batch_size < 1:
            raise ValueError("batch_size: must be >= 1")

    def rungs(self) -> list[int]:
        """Image counts at which a trial reports: min_images * rf^k below num_images, then num_images."""
        if not self.early_stopping:
            return [self.num_images]
        out, n = [], float(self.min_images)
        while round(n) < self.num_images:
            out.append(round(n))
            n *= self.reduction_factor
        return [*out, self.num_images]


@dataclass(kw_only=True)
class SweepResourcesConfig:
    gpus_per_trial: float = 1.0  # one GPU per trial; 0 (or a cluster without GPUs) runs on CPUs
    cpus_per_trial: float = 1.0
    address: str | None = None  # Ray address; None: RAY_ADDRESS, else a local Ray

    def __post_init__(self) -> None:
        if self.gpus_per_trial < 0 or self.cpus_per_trial <= 0:
            raise ValueError("gpus_per_trial must be >= 0 and cpus_per_trial > 0")


@dataclass(kw_only=True)
class SweepMlflowConfig:
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI
    experiment: str = "fractalgen-sweeps"


@dataclass(kw_only=True)
class SweepConfig:
    """One sweep (``fractalgen sweep --config configs/sweep_*.yaml``)."""

    name: str = "sweep"
    # models:/NAME@candidate, models:/NAME/VERSION, a released-format .pth or a checkpoint folder
    model: str = ""
    tag_version: bool = True  # write the best setting to the registered version as tags
    storage_path: str = "runs/sweeps"  # Ray Tune's folder; results go to <storage_path>/<name>
    output: str | None = None  # Parquet table + plot folder (None: <storage_path>/<name>)
    space: SweepSpaceConfig = field(default_factory=SweepSpaceConfig)
    search: SweepSearchConfig = field(default_factory=SweepSearchConfig)
    eval: SweepEvalConfig = field(default_factory=SweepEvalConfig)
    resources: SweepResourcesConfig = field(default_factory=SweepResourcesConfig)
    mlflow: SweepMlflowConfig = field(default_factory=SweepMlflowConfig)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name: must be a plain folder name, got {self.name!r}")

    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path(self.storage_path) / self.name


def load_sweep_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    cfg = load(SweepConfig, path, overrides)
    if not cfg.model:
        raise ConfigError("model: required (models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint)")
    if not cfg.eval.reference:
        raise ConfigError("eval.reference: required (a reference .npz or a shard set URI)")
    return cfg


# =============================================================================== search space
def _iters_key(iters: tuple[int, ...] | list[int] | None) -> str:
    return ",".join(map(str, iters)) if iters else "default"


def param_space(cfg: SweepConfig) -> dict[str, Any]:
    """Tune's param space: ``grid_search`` lists (grid) or choices / uniform ranges (Optuna).

    ``num_iters`` travels as a string (``"64,16"`` or ``"default"``): Optuna's categorical
    distributions take scalars only.
    """
    from ray import tune

    s = cfg.space
    iters = [_iters_key(i) for i in s.num_iters] or ["default"]
    if cfg.search.algorithm == "grid":
        return {
            "cfg": tune.grid_search(list(s.cfg)),
            "temperature": tune.grid_search(list(s.temperature)),
            "cfg_schedule": tune.grid_search(list(s.cfg_schedule)),
            "num_iters": tune.grid_search(iters),
        }
    return {
        "cfg": tune.uniform(*s.cfg_range) if s.cfg_range else tune.choice(list(s.cfg)),
        "temperature": tune.uniform(*s.temperature_range)
        if s.temperature_range
        else tune.choice(list(s.temperature)),
        "cfg_schedule": tune.choice(list(s.cfg_schedule)),
        "num_iters": tune.choice(iters),
    }


def trial_settings(config: dict[str, Any]) -> SamplingSettings:
    """The SamplingSettings of a trial's config."""
    from fractalgen.sampling_settings import SamplingSettings, parse_iters

    iters = config.get("num_iters", "default")
    return SamplingSettings(
        cfg=float(config["cfg"]),
        temperature=float(config["temperature"]),
        cfg_schedule=config["cfg_schedule"],
        num_iters=None if iters in (None, "default") else parse_iters(iters),
    )


# =============================================================================== the trial
_WORKERS: dict[str, Any] = {}  # per trial process: model + Inception loaded once when Tune reuses it


def _digest(data: Any) -> str:
    import numpy as np

    arr = np.asarray(data)
    return hashlib.sha1(arr[: 1 << 20].tobytes() + str(arr.size).encode()).hexdigest()


def run_trial(config: dict[str, Any], *, payload: dict[str, Any]) -> None:
    """Tune function trainable: generate, score at each rung, report to Tune and to a nested MLflow run.

    ``payload`` (shared by all trials, through the object store): model and Inception file bytes,
    reference statistics, the eval config, MLflow ids.
    """
    import numpy as np
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient
    from ray import tune

    from fractalgen.platform.evaluation.metrics import compute_metrics
    from fractalgen.platform.generation.sampling import GenerationJob, GenerationWorker, balanced_labels

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
    reference = payload["reference"]
    for batch in job.batches():
        res = worker.run(job, batch)
        feats.append(res["features"])
        logits.append(res["logits"])
        done = batch[2]
        while rungs and done >= rungs[0]:
            n = rungs.pop(0)
            f, lg = np.concatenate(feats)[:n], np.concatenate(logits)[:n]
            m = compute_metrics(f, lg, reference, precision_recall_images=None if ev.precision_recall else 0)
            metrics = {k: v for k, v in m.as_dict().items() if k != "num_images"}
            stamp = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, n) for k, v in metrics.items()])
            final = not rungs
            if final:
                client.log_batch(run_id, tags=[RunTag("fractalgen.completed", "true")])
                client.set_terminated(run_id, "FINISHED")
            tune.report({**metrics, "num_images": n, "mlflow_run_id": run_id, "completed": final})


# =============================================================================== the driver
@dataclass
class SweepResult:
    best: dict[str, Any] | None  # the best completed trial's row (settings + metrics), None if none
    table: Path  # Parquet
    plot: Path | None
    parent_run_id: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    registered: tuple[str, str] | None = None  # (name, version) tagged with the best setting

    @property
    def best_settings(self) -> SamplingSettings | None:
        return trial_settings(self.best) if self.best else None


def _tracking_uri(cfg: SweepConfig) -> str:
    import mlflow

    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])  # trials run in other folders
    return uri


def _reference(cfg: SweepConfig, inception_path: Path, device: Any):
    from fractalgen.platform.evaluation.inception import extract_features, load_inception
    from fractalgen.platform.evaluation.metrics import load_statistics

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
    from fractalgen.platform.evaluation.data import reference_statistics

    return reference_statistics(
        cfg.eval.reference, net(), max_images=cfg.eval.reference_images, batch_size=cfg.eval.batch_size,
        keep_features=10_000 if cfg.eval.precision_recall else 0,
    )  # fmt: skip


def _rows(results: Any, cfg: SweepConfig) -> list[dict[str, Any]]:
    rows = []
    for res in results:
        conf = res.config or {}
        m = res.metrics or {}
        if not conf:
            continue
        row = {
            "trial_id": m.get("trial_id") or (res.path or "").rsplit("/", 1)[-1],
            "cfg": float(conf["cfg"]),
            "temperature": float(conf["temperature"]),
            "cfg_schedule": str(conf["cfg_schedule"]),
            "num_iters": str(conf.get("num_iters", "default")),
            "num_images": int(m.get("num_images", 0) or 0),
            "fid": float(m["fid"]) if m.get("fid") is not None else float("nan"),
            "inception_score": float(m["inception_score"])
            if m.get("inception_score") is not None
            else float("nan"),
            "precision": float(m["precision"]) if m.get("precision") is not None else float("nan"),
            "recall": float(m["recall"]) if m.get("recall") is not None else float("nan"),
            "completed": bool(m.get("completed", False))
            and int(m.get("num_images", 0) or 0) >= cfg.eval.num_images,
            "error": str(res.error).splitlines()[0][:300] if res.error else "",
            "mlflow_run_id": str(m.get("mlflow_run_id", "")),
        }
        row["status"] = "completed" if row["completed"] else ("error" if row["error"] else "early-stopped")
        rows.append(row)
    return rows


def write_table(rows: list[dict[str, Any]], path: Path) -> Path:
    """The results table as Parquet (one row per trial)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["trial_id", "cfg", "temperature", "cfg_schedule", "num_iters", "num_images", "fid",
               "inception_score", "precision", "recall", "status", "mlflow_run_id", "error"]  # fmt: skip
    table = pa.table({c: [r.get(c) for r in rows] for c in columns})
    pq.write_table(table, path)
    return path


def plot_fid_vs_cfg(rows: list[dict[str, Any]], path: Path, *, title: str = "") -> Path | None:
    """FID against guidance scale, one line per temperature (and per schedule / iterations when
    several were searched); completed trials as lines, early-stopped ones as faint crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "completed"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    multi = len({(r["cfg_schedule"], r["num_iters"]) for r in rows}) > 1
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in done:
        groups.setdefault((r["temperature"], r["cfg_schedule"], r["num_iters"]), []).append(r)
    for (temp, sched, iters), items in sorted(groups.items()):
        items.sort(key=lambda r: r["cfg"])
        label = f"t={temp:g}" + (f", {sched}, iters {iters}" if multi else "")
        ax.plot([r["cfg"] for r in items], [r["fid"] for r in items], marker="o", label=label)
    stopped = [r for r in rows if r["status"] == "early-stopped" and r["fid"] == r["fid"]]
    if stopped:
        ax.scatter([r["cfg"] for r in stopped], [r["fid"] for r in stopped], marker="x", alpha=0.4,
                   color="grey", label="early-stopped (FID at fewer images)")  # fmt: skip
    ax.set_xlabel("guidance scale (cfg)")
    ax.set_ylabel(f"FID ({max((r['num_images'] for r in done), default=0)} images)")
    ax.set_title(title or "FID against guidance scale per temperature")
    ax.grid(alpha=0.3)
    if groups or stopped:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_sweep(cfg: SweepConfig, *, progress: bool = True) -> SweepResult:
    """Run the sweep (module docstring) and return the results; see ``SweepResult``."""
    import numpy as np
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from fractalgen.platform import registry
    from fractalgen.platform.evaluation.inception import resolve_weights
    from fractalgen.platform.generation.sampling import pick_device
    from fractalgen.platform.generation.sources import download_version, resolve_model_source

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

        experiment_id = registry.ensure_experiment(client, cfg.mlflow.experiment, tracking_uri)
        parent_tags = {"fractalgen.sweep": cfg.name, "fractalgen.model_source": cfg.model}
        if source.registered_name:
            parent_tags.update({"fractalgen.registered_model": source.registered_name,
                                "fractalgen.model_version": str(source.version)})  # fmt: skip
        parent = client.create_run(experiment_id, run_name=f"sweep-{cfg.name}", tags=parent_tags)
        parent_id = parent.info.run_id
        flat: dict[str, str] = {}
        _flatten("", to_dict(cfg), flat)
        from mlflow.entities import Param

        client.log_batch(parent_id, params=[Param(k, v[:6000]) for k, v in sorted(flat.items())])
        client.log_text(parent_id, dumps(cfg), "sweep/config.yaml")

        connect_ray(cfg.resources.address)
        import ray

        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        gpus = cfg.resources.gpus_per_trial if cluster_gpus >= cfg.resources.gpus_per_trial > 0 else 0
        if cfg.resources.gpus_per_trial > 0 and not gpus:
            log.warning("the Ray cluster has no GPU: sweep trials run on CPUs (slow for real models)")
        payload = {
            "model": model_bytes,
            "inception": inception_bytes,
            "cache_key": _digest(model_bytes) + _digest(inception_bytes),
            "reference": reference,
            "eval": cfg.eval,
            "tracking_uri": tracking_uri,
            "experiment_id": experiment_id,
            "parent_run_id": parent_id,
            "sweep_name": cfg.name,
        }
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, payload=payload),
            {"cpu": cfg.resources.cpus_per_trial, "gpu": gpus},
        )
        rungs = cfg.eval.rungs()
        if len(rungs) > 1:
            scheduler: Any = ASHAScheduler(
                time_attr="num_images", max_t=cfg.eval.num_images, grace_period=rungs[0],
                reduction_factor=cfg.eval.reduction_factor,
            )  # fmt: skip
        else:
            scheduler = FIFOScheduler()
        search_alg = None
        num_samples = cfg.search.trials()
        if cfg.search.algorithm == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(seed=cfg.search.seed)
        elif num_samples > 1:
            log.info("grid search: repeating the grid %d times (search.num_samples)", num_samples)
        from fractalgen import storage

        # S3-compatible storage: pass the endpoint explicitly (pyarrow may ignore AWS_ENDPOINT_URL_S3)
        storage_fs, storage_path = (
            storage.pyarrow_filesystem(cfg.storage_path)
            if storage.is_remote(cfg.storage_path)
            else (None, str(Path(cfg.storage_path).absolute()))
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                metric="fid",
                mode="min",
                scheduler=scheduler,
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
        results = tuner.fit()
        rows = _rows(results, cfg)

        # trial runs that early stopping (or an error) ended are still open in MLflow: close them
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

        completed = [r for r in rows if r["status"] == "completed" and r["fid"] == r["fid"]]
        best = min(completed, key=lambda r: r["fid"]) if completed else None
        table = write_table(rows, out_dir / "results.parquet")
        plot = plot_fid_vs_cfg(
            rows, out_dir / "fid_vs_cfg.png", title=f"{cfg.name}: FID against guidance scale"
        )
        client.log_artifact(parent_id, str(table), "sweep")
        if plot:
            client.log_artifact(parent_id, str(plot), "sweep")
        summary = {"trials": len(rows), "completed": len(completed),
                   "early_stopped": sum(r["status"] == "early-stopped" for r in rows),
                   "errors": sum(r["status"] == "error" for r in rows), "seconds": time.monotonic() - t0}  # fmt: skip
        from mlflow.entities import Metric, RunTag

        stamp = int(time.time() * 1000)
        metrics = [Metric(f"sweep_{k}", float(v), stamp, 0) for k, v in summary.items()]
        registered = None
        if best is not None:
            settings = trial_settings(best)
            resolved = settings.resolved(_model_config(source.path))
            metrics += [
                Metric(f"best_{k}", best[k], stamp, 0)
                for k in ("fid", "inception_score")
                if best[k] == best[k]
            ]
            client.log_batch(parent_id, metrics=metrics,
                             tags=[RunTag(k, v) for k, v in resolved.to_tags("best.").items()])  # fmt: skip
            if cfg.tag_version and source.registered_name:
                registry.set_best_settings(
                    source.registered_name, source.version, resolved,
                    {"fid": best["fid"], "inception_score": best["inception_score"], "num_images": best["num_images"],
                     "run_id": parent_id, "trial_run_id": best["mlflow_run_id"], "name": cfg.name},
                    tracking_uri=tracking_uri,
                )  # fmt: skip
                registered = (source.registered_name, str(source.version))
        else:
            client.log_batch(parent_id, metrics=metrics)
        client.set_terminated(parent_id, "FINISHED" if best is not None else "FAILED")
    return SweepResult(
        best=best, table=table, plot=plot, parent_run_id=parent_id, rows=rows, registered=registered
    )


def _model_config(path: Path):
    from fractalgen.models.checkpoint import config_from_checkpoint, read_checkpoint

    return config_from_checkpoint(read_checkpoint(path))[1]


def describe_result(result: SweepResult) -> str:
    lines = [f"{len(result.rows)} trials ({sum(r['status'] == 'completed' for r in result.rows)} completed, "
             f"{sum(r['status'] == 'early-stopped' for r in result.rows)} early-stopped)"]  # fmt: skip
    header = (
        f"{'cfg':>6} {'temp':>6} {'schedule':>9} {'iters':>9} {'images':>7} {'FID':>10} {'IS':>7}  status"
    )
    lines.append(header)
    for r in sorted(result.rows, key=lambda r: (r["status"] != "completed", r["fid"])):
        lines.append(f"{r['cfg']:>6g} {r['temperature']:>6g} {r['cfg_schedule']:>9} {r['num_iters']:>9} "
                     f"{r['num_images']:>7} {r['fid']:>10.3f} {r['inception_score']:>7.3f}  {r['status']}")  # fmt: skip
    if result.best:
        lines.append(f"best: {result.best_settings.describe()} -> FID {result.best['fid']:.4f}")
    if result.registered:
        lines.append(f"tagged {result.registered[0]} version {result.registered[1]} with the best setting")
    lines.append(f"table: {result.table}" + (f"   plot: {result.plot}" if result.plot else ""))
    lines.append(f"MLflow parent run: {result.parent_run_id}")
    return "\n".join(lines)

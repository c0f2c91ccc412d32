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

The recipe is a YAML file (``configs/sweep_*.yaml``) of ``SweepConfig`` (``fractalgen.config``).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fractalgen import storage
from fractalgen.config import ConfigError, dumps, load, to_dict
from fractalgen.platform import registry
from fractalgen.platform.artifacts.model_store import ensure_experiment, flatten_params
from fractalgen.platform.ray_connect import connect_ray
from fractalgen.sampling_settings import SCHEDULES, SamplingSettings, parse_iters, parse_schedule

log = logging.getLogger(__name__)

# the SamplingSettings fields a space lists besides cfg / temperature / cfg_schedule / num_iters
OPTIONAL_FIELDS = ("lower_cfg", "lower_cfg_schedule", "temperature_end", "filter_threshold")


def _settings_error(key: str, **kw: Any) -> str | None:
    """The message of building ``SamplingSettings(**kw)`` (the one validation path), or None."""
    try:
        SamplingSettings(**kw)
    except (TypeError, ValueError) as err:
        return f"{key}: {err}"
    return None


def _family(spec: str) -> str:
    return spec.strip().partition(":")[0].strip()


def _family_params(family: str) -> list[str]:
    return list(SCHEDULES[family]().params()) if family in SCHEDULES else []


# =============================================================================== configuration
@dataclass(kw_only=True)
class SweepSpaceConfig:
    """The settings searched. Lists: grid values (Optuna: categorical choices); ``null`` = unset."""

    cfg: tuple[float, ...] = (1.0, 2.0, 4.0)
    temperature: tuple[float, ...] = (1.0,)  # multiplies the logits (released meaning)
    # guidance schedule specs (fractalgen/sampling_settings.py): linear, constant, cosine,
    # power-cosine:exponent=k, interval:start=a,end=b; a bare family listed in schedule_params expands
    cfg_schedule: tuple[str, ...] = ("linear",)
    # per family, per parameter: the values searched (grid: every combination; Optuna: conditional)
    schedule_params: dict[str, dict[str, tuple[float, ...]]] = field(default_factory=dict)
    # Optuna only: a family's parameter sampled uniformly from [low, high] instead of a list
    schedule_ranges: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    num_iters: tuple[tuple[int, ...], ...] = ()  # iterations per level; empty: the model's default
    lower_cfg: tuple[float | None, ...] = (None,)  # guidance of the lower levels; null: released
    lower_cfg_schedule: tuple[str | None, ...] = (None,)  # their schedule over their own steps
    temperature_end: tuple[float | None, ...] = (None,)  # temperature ramp's end; null: no ramp
    filter_threshold: tuple[float, ...] = (1e-4,)  # the released guidance filter
    # Optuna only: sample uniformly from an interval instead of the list
    cfg_range: tuple[float, float] | None = None
    temperature_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for key in ("cfg", "temperature", "cfg_schedule", *OPTIONAL_FIELDS):
            if not getattr(self, key):
                raise ValueError(f"{key}: needs at least one value (null: unset)")
        for key in ("cfg", "temperature", *OPTIONAL_FIELDS):
            for i, value in enumerate(getattr(self, key)):
                if value is not None and (err := _settings_error(f"{key}[{i}]", **{key: value})):
                    raise ValueError(err)
        for i, spec in enumerate(self.cfg_schedule):
            if err := _settings_error(f"cfg_schedule[{i}]", cfg_schedule=spec):
                raise ValueError(err)
        for iters in self.num_iters:
            if not iters or any(i < 1 for i in iters):
                raise ValueError(f"num_iters: each entry needs iterations >= 1 per level, got {iters}")
        for key, setting in (("cfg_range", "cfg"), ("temperature_range", "temperature")):
            rng = getattr(self, key)
            if rng is not None:
                if not 0 < rng[0] < rng[1]:
                    raise ValueError(f"{key}: needs 0 < low < high, got {rng}")
                for end in rng:
                    if err := _settings_error(key, **{setting: end}):
                        raise ValueError(err)
        bare = {spec.strip() for spec in self.cfg_schedule if ":" not in spec}
        for key in ("schedule_params", "schedule_ranges"):
            for family, params in getattr(self, key).items():
                if family not in SCHEDULES:
                    raise ValueError(
                        f"{key}.{family}: unknown guidance schedule; choose from {', '.join(SCHEDULES)}"
                    )
                if family not in bare:
                    raise ValueError(
                        f"{key}.{family}: list the bare family {family!r} in cfg_schedule to search it"
                    )
                for name, values in params.items():
                    if name not in _family_params(family):
                        allowed = ", ".join(_family_params(family)) or "none"
                        raise ValueError(
                            f"{key}.{family}.{name}: not a parameter of {family} (parameters: {allowed})"
                        )
                    if not values:
                        raise ValueError(f"{key}.{family}.{name}: needs at least one value")
                    if key == "schedule_ranges" and not values[0] < values[1]:
                        raise ValueError(f"{key}.{family}.{name}: needs low < high, got {values}")
                # every combination (every corner of the ranges) must be a valid schedule
                names = sorted(params)
                for combo in itertools.product(*(params[n] for n in names)):
                    spec = _spec(family, dict(zip(names, combo)))
                    if err := _settings_error(f"{key}.{family}", cfg_schedule=spec):
                        raise ValueError(err)

    def schedule_specs(self) -> list[str]:
        """``cfg_schedule`` with every bare family of ``schedule_params`` expanded into the specs of
        all combinations of its parameter values (the grid's schedules), duplicates removed."""
        out: list[str] = []
        for spec in self.cfg_schedule:
            params = self.schedule_params.get(spec.strip()) if ":" not in spec else None
            if params:
                names = sorted(params)
                combos = itertools.product(*(params[n] for n in names))
                specs = [canonical_spec(_spec(spec.strip(), dict(zip(names, c)))) for c in combos]
            else:
                specs = [canonical_spec(spec)]
            out += [s for s in specs if s not in out]
        return out

    def grid_size(self) -> int:
        n = len(self.cfg) * len(self.temperature) * len(self.schedule_specs()) * max(1, len(self.num_iters))
        for key in OPTIONAL_FIELDS:
            n *= len(getattr(self, key))
        return n


def _spec(family: str, params: dict[str, float]) -> str:
    """The spec of ``family`` with ``params`` (``power-cosine:exponent=3.0``), not yet checked."""
    args = ",".join(f"{k}={float(v)!r}" for k, v in sorted(params.items()))
    return f"{family}:{args}" if args else family


def canonical_spec(spec: str) -> str:
    """A schedule spec as the schedule writes it (``power-cosine:exponent=3``): how trials, tables
    and tags name it."""
    return str(parse_schedule(spec))


@dataclass(kw_only=True)
class SweepSearchConfig:
    algorithm: Literal["grid", "optuna"] = "grid"
    # Optuna: trials (None: 16); grid: repeats of the whole grid (None: 1, each combination once)
    num_samples: int | None = None
    max_concurrent: int = 0  # 0: as many as the resources allow
    seed: int = 0  # Optuna's sampler seed
    include_released: bool = True  # also evaluate the model's released setting (one more trial)

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
    """Tune's param space as a dict: ``grid_search`` lists (grid), or for Optuna the same lists as
    choices / uniform ranges without conditions (each expanded schedule spec one choice).

    ``run_sweep`` gives Optuna ``optuna_space`` instead (define-by-run: a family's parameters are
    sampled only when the family is chosen, and ``schedule_ranges`` apply). ``num_iters`` travels as
    a string (``"64,16"`` or ``"default"``): Optuna's categorical distributions take scalars only.
    """
    from ray import tune  # deferred: heavy import

    s = cfg.space
    iters = [_iters_key(i) for i in s.num_iters] or ["default"]
    lists: dict[str, list[Any]] = {
        "cfg": list(s.cfg), "temperature": list(s.temperature), "cfg_schedule": s.schedule_specs(),
        "num_iters": iters, **{key: list(getattr(s, key)) for key in OPTIONAL_FIELDS},
    }  # fmt: skip
    if cfg.search.algorithm == "grid":
        return {"released": False, **{k: tune.grid_search(v) for k, v in lists.items()}}
    space: dict[str, Any] = {k: tune.choice(v) for k, v in lists.items()}
    if s.cfg_range:
        space["cfg"] = tune.uniform(*s.cfg_range)
    if s.temperature_range:
        space["temperature"] = tune.uniform(*s.temperature_range)
    return space


class OptunaSpace:
    """Optuna's define-by-run space (``optuna_space``); a module-level class so that OptunaSearch's
    checkpoint (plain ``pickle``) can store it."""

    def __init__(self, space: SweepSpaceConfig) -> None:
        self.space = space
        self.iters = [_iters_key(i) for i in space.num_iters] or ["default"]
        self.conditional = set(space.schedule_params) | set(space.schedule_ranges)
        self.choices: list[str] = []
        for spec in space.cfg_schedule:
            choice = spec.strip() if spec.strip() in self.conditional else canonical_spec(spec)
            if choice not in self.choices:
                self.choices.append(choice)

    def __call__(self, trial: Any) -> dict[str, Any]:
        s = self.space
        if s.cfg_range:
            trial.suggest_float("cfg", *s.cfg_range)
        else:
            trial.suggest_categorical("cfg", list(s.cfg))
        if s.temperature_range:
            trial.suggest_float("temperature", *s.temperature_range)
        else:
            trial.suggest_categorical("temperature", list(s.temperature))
        choice = trial.suggest_categorical("schedule", self.choices)
        spec = choice
        if choice in self.conditional:  # only the chosen family's parameters are sampled
            params: dict[str, float] = {}
            for name in _family_params(choice):
                rng = s.schedule_ranges.get(choice, {}).get(name)
                values = s.schedule_params.get(choice, {}).get(name)
                if rng is not None:
                    params[name] = trial.suggest_float(f"{choice}.{name}", *rng)
                elif values is not None:
                    params[name] = trial.suggest_categorical(f"{choice}.{name}", list(values))
            spec = canonical_spec(_spec(choice, params))
        trial.suggest_categorical("num_iters", self.iters)
        for key in OPTIONAL_FIELDS:
            trial.suggest_categorical(key, list(getattr(s, key)))
        return {"cfg_schedule": spec, "released": False}


def optuna_space(cfg: SweepConfig) -> OptunaSpace:
    """Optuna's define-by-run space: the schedule (``schedule``: a spec, or a bare family of
    ``schedule_params`` / ``schedule_ranges``) is chosen first, then only that family's parameters
    are sampled (``<family>.<param>``); the call returns the trial's ``cfg_schedule`` spec."""
    return OptunaSpace(cfg.space)


def released_config(model_config: Any) -> dict[str, Any]:
    """The trial config of the model's released setting (``SamplingSettings().resolved``)."""
    r = SamplingSettings().resolved(model_config)
    return {
        "released": True, "cfg": r.cfg, "temperature": r.temperature, "cfg_schedule": str(r.cfg_schedule),
        "num_iters": _iters_key(r.num_iters), "lower_cfg": r.lower_cfg,
        "lower_cfg_schedule": None if r.lower_cfg_schedule is None else str(r.lower_cfg_schedule),
        "temperature_end": r.temperature_end, "filter_threshold": r.filter_threshold,
    }  # fmt: skip


def trial_settings(config: dict[str, Any]) -> SamplingSettings:
    """The SamplingSettings of a trial's config (or of a results row)."""
    iters = config.get("num_iters", "default")
    optional = {
        k: config.get(k)
        for k in OPTIONAL_FIELDS
        if config.get(k) is not None and config.get(k) == config.get(k)
    }
    return SamplingSettings(
        cfg=float(config["cfg"]),
        temperature=float(config["temperature"]),
        cfg_schedule=config["cfg_schedule"],
        num_iters=None if iters in (None, "default") else parse_iters(iters),
        **optional,
    )


def _released_first(searcher: Any, point: dict[str, Any]) -> Any:
    """``searcher`` (OptunaSearch) that suggests ``point`` first and is not told its results.

    Not OptunaSearch's own ``points_to_evaluate``: it enqueues the point as fixed Optuna params, and
    a fixed value outside a categorical's choices (the released cfg when ``space.cfg`` does not list
    it) makes ``suggest_categorical`` raise ``ValueError: '6.5' not in (...)`` in Optuna 5.
    """
    from ray.tune.search import Searcher  # deferred: heavy import

    class ReleasedFirst(Searcher):
        def __init__(self) -> None:
            super().__init__(metric=searcher.metric, mode=searcher.mode)
            self.searcher, self.pending, self.own = searcher, [dict(point)], set()

        def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
            ok = self.searcher.set_search_properties(metric, mode, config, **spec)
            self._metric, self._mode = self.searcher.metric, self.searcher.mode
            return ok

        def set_max_concurrency(self, max_concurrent: int) -> bool:
            return self.searcher.set_max_concurrency(max_concurrent)

        def suggest(self, trial_id: str) -> dict[str, Any] | None:
            if self.pending:
                self.own.add(trial_id)
                return self.pending.pop(0)
            return self.searcher.suggest(trial_id)

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if trial_id not in self.own:
                self.searcher.on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id not in self.own:
                self.searcher.on_trial_complete(trial_id, result=result, error=error)

        # a wrapper's own state (Tune's SearchGenerator.save_to_dir saves the wrapped searcher itself)
        def get_state(self) -> dict:
            return {"pending": self.pending, "own": self.own}

        def set_state(self, state: dict) -> None:
            self.pending, self.own = state["pending"], state["own"]

    return ReleasedFirst()


def _scheduler(cfg: SweepConfig) -> Any:
    """ASHA over the image count (FIFO with a single rung); the released trial is never stopped early."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler  # deferred: heavy import

    rungs = cfg.eval.rungs()
    if len(rungs) == 1:
        return FIFOScheduler()

    class KeepReleased(ASHAScheduler):
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            action = super().on_trial_result(tune_controller, trial, result)  # records the rung either way
            if action == TrialScheduler.STOP and (trial.config or {}).get("released"):
                return TrialScheduler.CONTINUE
            return action

    return KeepReleased(
        time_attr="num_images", max_t=cfg.eval.num_images, grace_period=rungs[0],
        reduction_factor=cfg.eval.reduction_factor,
    )  # fmt: skip


# =============================================================================== the trial
_WORKERS: dict[str, Any] = {}  # per trial process: model + Inception loaded once when Tune reuses it


def _digest(data: Any) -> str:
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
        "fractalgen.schedule_family": _family(str(resolved.cfg_schedule)),
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


# =============================================================================== the driver
@dataclass
class SweepResult:
    best: dict[str, Any] | None  # the best completed trial's row (settings + metrics), None if none
    table: Path  # Parquet
    plot: Path | None
    parent_run_id: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    registered: tuple[str, str] | None = None  # (name, version) tagged with the best setting
    pareto: list[dict[str, Any]] = field(default_factory=list)  # rows of pareto_rows (with "front")
    pareto_table: Path | None = None  # Parquet; pareto.md beside it
    pareto_plot: Path | None = None

    @property
    def best_settings(self) -> SamplingSettings | None:
        return trial_settings(self.best) if self.best else None

    @property
    def released(self) -> dict[str, Any] | None:
        """The released setting's row, None when it was not evaluated."""
        return next((r for r in self.rows if r.get("released")), None)


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


def _float(value: Any) -> float:
    return float(value) if value is not None else float("nan")


def _rows(results: Any, cfg: SweepConfig) -> list[dict[str, Any]]:
    rows = []
    for res in results:
        conf = res.config or {}
        m = res.metrics or {}
        if not conf:
            continue
        settings = trial_settings(conf)
        row = {
            "trial_id": m.get("trial_id") or (res.path or "").rsplit("/", 1)[-1],
            "released": bool(conf.get("released", False)),
            "cfg": float(conf["cfg"]),
            "temperature": float(conf["temperature"]),
            "cfg_schedule": str(settings.cfg_schedule),
            "schedule_family": _family(str(settings.cfg_schedule)),
            "num_iters": str(conf.get("num_iters", "default")),
            "lower_cfg": settings.lower_cfg,
            "lower_cfg_schedule": None
            if settings.lower_cfg_schedule is None
            else str(settings.lower_cfg_schedule),
            "temperature_end": settings.temperature_end,
            "filter_threshold": settings.filter_threshold,
            "num_images": int(m.get("num_images", 0) or 0),
            "fid": _float(m.get("fid")),
            "inception_score": _float(m.get("inception_score")),
            "precision": _float(m.get("precision")),
            "recall": _float(m.get("recall")),
            "sample_seconds_per_image": _float(m.get("sample_seconds_per_image")),
            "completed": bool(m.get("completed", False))
            and int(m.get("num_images", 0) or 0) >= cfg.eval.num_images,
            "error": str(res.error).splitlines()[0][:300] if res.error else "",
            "mlflow_run_id": str(m.get("mlflow_run_id", "")),
        }
        row["status"] = "completed" if row["completed"] else ("error" if row["error"] else "early-stopped")
        rows.append(row)
    return rows


TABLE_COLUMNS = [
    "trial_id", "released", "cfg", "temperature", "cfg_schedule", "schedule_family", "num_iters", "lower_cfg",
    "lower_cfg_schedule", "temperature_end", "filter_threshold", "num_images", "fid", "inception_score",
    "precision", "recall", "sample_seconds_per_image", "status", "mlflow_run_id", "error",
]  # fmt: skip


def write_table(rows: list[dict[str, Any]], path: Path, columns: Sequence[str] = ()) -> Path:
    """The results table as Parquet (one row per trial; ``columns`` default: ``TABLE_COLUMNS``)."""
    import pyarrow as pa  # deferred: heavy import
    import pyarrow.parquet as pq  # deferred: heavy import

    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns or TABLE_COLUMNS)
    table = pa.table({c: [r.get(c) for r in rows] for c in columns})
    pq.write_table(table, path)
    return path


# =============================================================================== Pareto front
# (objective column, its label); FID is always the other objective (lower is better), these higher
PARETO_PAIRS = (("inception_score", "IS"), ("precision", "precision"), ("recall", "recall"))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the points no other point dominates, the first coordinate minimised
    and the second maximised: ``q`` dominates ``p`` when ``q0 <= p0`` and ``q1 >= p1`` with one
    strict. Equal points are all kept. Non-finite points are left out. O(n log n)."""
    finite = [i for i, (a, b) in enumerate(points) if math.isfinite(a) and math.isfinite(b)]
    order = sorted(finite, key=lambda i: (points[i][0], -points[i][1]))
    keep: list[int] = []
    best_b, best_a = -math.inf, math.inf  # the highest second coordinate so far, and its lowest first
    for i in order:
        a, b = points[i]
        if b > best_b:
            keep.append(i)
            best_b, best_a = b, a
        elif b == best_b and a == best_a:  # a duplicate of a kept point
            keep.append(i)
    return sorted(keep)


def pareto_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The completed trials on the Pareto front of FID (lower) against IS, precision and recall
    (higher; a pair only when some trial has the metric), one row per (front, trial) with ``front``
    (``fid-inception_score`` ...), sorted by front, then FID."""
    done = [r for r in rows if r["status"] == "completed"]
    out: list[dict[str, Any]] = []
    for metric, _ in PARETO_PAIRS:
        if not any(math.isfinite(r.get(metric, math.nan)) for r in done):
            continue
        front = pareto_front([(r["fid"], r.get(metric, math.nan)) for r in done])
        out += sorted(({**done[i], "front": f"fid-{metric}"} for i in front), key=lambda r: r["fid"])
    return out


PARETO_COLUMNS = [
    "front", "trial_id", "released", "cfg_schedule", "cfg", "temperature", "num_iters", "lower_cfg",
    "lower_cfg_schedule", "temperature_end", "filter_threshold", "fid", "inception_score", "precision",
    "recall", "sample_seconds_per_image", "num_images", "mlflow_run_id",
]  # fmt: skip


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_pareto_markdown(pareto: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """``pareto_rows`` as markdown: one table per front."""
    cols = [c for c in PARETO_COLUMNS if c not in ("front", "mlflow_run_id")]
    lines = [f"# {title or 'Pareto-optimal sampling settings'}", ""]
    if not pareto:
        lines.append("No completed trial: no Pareto front.")
    for front in dict.fromkeys(r["front"] for r in pareto):
        metric = front.split("-", 1)[1]
        lines += [f"## FID (lower) against {dict(PARETO_PAIRS)[metric]} (higher)", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]  # fmt: skip
        lines += [
            "| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in pareto if r["front"] == front
        ]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


# one marker and colour per schedule family (fractalgen/sampling_settings.py SCHEDULES)
FAMILY_STYLE = {
    "linear": ("o", "tab:blue"), "constant": ("s", "tab:orange"), "cosine": ("^", "tab:green"),
    "power-cosine": ("D", "tab:purple"), "interval": ("v", "tab:red"),
}  # fmt: skip


def plot_pareto(rows: list[dict[str, Any]], path: Path, *, title: str = "") -> Path | None:
    """FID against IS (and precision, recall when computed) of the completed trials: one marker and
    colour per schedule family, the Pareto front as a dashed line, the released setting starred."""
    import matplotlib  # deferred: heavy import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: heavy import

    done = [r for r in rows if r["status"] == "completed" and math.isfinite(r["fid"])]
    pairs = [(m, label) for m, label in PARETO_PAIRS if any(math.isfinite(r.get(m, math.nan)) for r in done)]
    if not pairs:
        return None
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.4), squeeze=False)
    for ax, (metric, label) in zip(axes[0], pairs):
        pts = [r for r in done if math.isfinite(r.get(metric, math.nan))]
        for family in dict.fromkeys(r["schedule_family"] for r in pts):
            marker, colour = FAMILY_STYLE.get(family, ("x", "tab:grey"))
            mine = [r for r in pts if r["schedule_family"] == family]
            ax.scatter([r[metric] for r in mine], [r["fid"] for r in mine], marker=marker, color=colour,
                       label=family, alpha=0.85, zorder=3)  # fmt: skip
        front = sorted(
            (pts[i] for i in pareto_front([(r["fid"], r[metric]) for r in pts])), key=lambda r: r[metric]
        )
        ax.plot(
            [r[metric] for r in front], [r["fid"] for r in front], "k--", lw=1, label="Pareto front", zorder=2
        )
        for r in (r for r in pts if r.get("released")):
            ax.scatter([r[metric]], [r["fid"]], marker="*", s=260, facecolors="none", edgecolors="black",
                       linewidths=1.4, label="released setting", zorder=4)  # fmt: skip
            ax.annotate(
                "released", (r[metric], r["fid"]), textcoords="offset points", xytext=(8, 6), fontsize=8
            )
        ax.set_xlabel(f"{label} (higher is better)")
        ax.set_ylabel(f"FID ({max(r['num_images'] for r in pts)} images, lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "Pareto front of the completed trials")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_fid_vs_cfg(rows: list[dict[str, Any]], path: Path, *, title: str = "") -> Path | None:
    """FID against guidance scale, one line per temperature (and per schedule / iterations when
    several were searched); completed trials as lines, early-stopped ones as faint crosses."""
    import matplotlib  # deferred: heavy import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: heavy import

    done = [r for r in rows if r["status"] == "completed"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    multi = len({(r["cfg_schedule"], r["num_iters"], _extras(r)) for r in rows}) > 1
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in done:  # one line per setting other than cfg (the released trial's row too)
        groups.setdefault((r["temperature"], r["cfg_schedule"], r["num_iters"], _extras(r)), []).append(r)
    for (temp, sched, iters, extras), items in sorted(groups.items()):
        items.sort(key=lambda r: r["cfg"])
        label = (
            f"t={temp:g}" + (f", {sched}, iters {iters}" if multi else "") + (f", {extras}" if extras else "")
        )
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

        experiment_id = ensure_experiment(client, cfg.mlflow.experiment, tracking_uri)
        parent_tags = {"fractalgen.sweep": cfg.name, "fractalgen.model_source": cfg.model}
        if source.registered_name:
            parent_tags.update({"fractalgen.registered_model": source.registered_name,
                                "fractalgen.model_version": str(source.version)})  # fmt: skip
        parent = client.create_run(experiment_id, run_name=f"sweep-{cfg.name}", tags=parent_tags)
        parent_id = parent.info.run_id
        flat = flatten_params("", to_dict(cfg), {})
        from mlflow.entities import Param  # deferred: heavy import

        client.log_batch(parent_id, params=[Param(k, v) for k, v in sorted(flat.items())])
        client.log_text(parent_id, dumps(cfg), "sweep/config.yaml")

        connect_ray(cfg.resources.address)
        import ray  # deferred: heavy import

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
        model_config = _model_config(source.path)
        released = [released_config(model_config)] if cfg.search.include_released else []
        num_samples = cfg.search.trials()
        search_alg: Any = None
        space: dict[str, Any] = {}
        if cfg.search.algorithm == "optuna":
            from ray.tune.search.optuna import OptunaSearch  # deferred: heavy import

            search_alg = OptunaSearch(space=optuna_space(cfg), metric="fid", mode="min", seed=cfg.search.seed)
            if released:
                search_alg = _released_first(search_alg, released[0])
        else:
            from ray.tune.search import BasicVariantGenerator  # deferred: heavy import

            space = param_space(cfg)
            if num_samples > 1:
                log.info("grid search: repeating the grid %d times (search.num_samples)", num_samples)
            # a point replaces one repeat of the grid (BasicVariantGenerator's docstring): one more repeat
            search_alg = BasicVariantGenerator(points_to_evaluate=released) if released else None
        num_samples += len(released)
        if released:
            log.info("evaluating the released setting too: %s", trial_settings(released[0]).describe())

        storage_fs, storage_path = storage.ray_storage(cfg.storage_path)  # docs/storage.md
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="fid",
                mode="min",
                scheduler=_scheduler(cfg),
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
        summary = {"trials": len(rows), "completed": len(completed),
                   "early_stopped": sum(r["status"] == "early-stopped" for r in rows),
                   "errors": sum(r["status"] == "error" for r in rows), "seconds": time.monotonic() - t0,
                   "pareto_fid_is": sum(r["front"] == "fid-inception_score" for r in pareto)}  # fmt: skip
        from mlflow.entities import Metric, RunTag  # deferred: heavy import

        stamp = int(time.time() * 1000)
        metrics = [Metric(f"sweep_{k}", float(v), stamp, 0) for k, v in summary.items()]
        scored = ("fid", "inception_score", "precision", "recall", "sample_seconds_per_image")
        rel = next((r for r in rows if r["released"] and r["status"] == "completed"), None)
        if rel is not None:
            metrics += [Metric(f"released_{k}", rel[k], stamp, 0) for k in scored if math.isfinite(rel[k])]
        registered = None
        if best is not None:
            settings = trial_settings(best)
            resolved = settings.resolved(model_config)
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
        else:
            client.log_batch(parent_id, metrics=metrics)
        client.set_terminated(parent_id, "FINISHED" if best is not None else "FAILED")
    return SweepResult(
        best=best, table=table, plot=plot, parent_run_id=parent_id, rows=rows, registered=registered,
        pareto=pareto, pareto_table=pareto_table, pareto_plot=pareto_plot,
    )  # fmt: skip


def _model_config(path: Path):
    from fractalgen.models.checkpoint import config_from_checkpoint, read_checkpoint  # deferred: heavy import

    return config_from_checkpoint(read_checkpoint(path))[1]


def _extras(r: dict[str, Any]) -> str:
    """The row's optional settings that are set, compactly (``lower_cfg=2, t_end=1.2``)."""
    out = []
    for key, short in (("lower_cfg", "lower_cfg"), ("lower_cfg_schedule", "lower_sched"),
                       ("temperature_end", "t_end"), ("filter_threshold", "filter")):  # fmt: skip
        value = r.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if key == "filter_threshold" and value == SamplingSettings.filter_threshold:
            continue
        out.append(f"{short}={value:g}" if isinstance(value, float) else f"{short}={value}")
    return ", ".join(out)


def describe_result(result: SweepResult) -> str:
    rows = result.rows
    lines = [f"{len(rows)} trials ({sum(r['status'] == 'completed' for r in rows)} completed, "
             f"{sum(r['status'] == 'early-stopped' for r in rows)} early-stopped); * = the released setting"]  # fmt: skip
    width = max([len("schedule"), *(len(r["cfg_schedule"]) for r in rows)])
    header = (f"  {'cfg':>6} {'temp':>6} {'schedule':<{width}} {'iters':>9} {'images':>7} {'FID':>10} {'IS':>7} "
              f"{'s/img':>8}  status")  # fmt: skip
    lines.append(header)
    for r in sorted(rows, key=lambda r: (r["status"] != "completed", r["fid"])):
        extras = _extras(r)
        lines.append(f"{'*' if r.get('released') else ' '} {r['cfg']:>6g} {r['temperature']:>6g} "
                     f"{r['cfg_schedule']:<{width}} {r['num_iters']:>9} {r['num_images']:>7} {r['fid']:>10.3f} "
                     f"{r['inception_score']:>7.3f} {r.get('sample_seconds_per_image', math.nan):>8.4f}  "
                     f"{r['status']}" + (f"  ({extras})" if extras else ""))  # fmt: skip
    for front in dict.fromkeys(r["front"] for r in result.pareto):
        metric = front.split("-", 1)[1]
        lines.append(f"Pareto front, FID (lower) against {dict(PARETO_PAIRS)[metric]} (higher):")
        for r in (r for r in result.pareto if r["front"] == front):
            extras = _extras(r)
            lines.append(f"  {'*' if r.get('released') else ' '} FID {r['fid']:.4f}  {metric} {r[metric]:.4f}  "
                         f"{r['sample_seconds_per_image']:.4f} s/img  cfg {r['cfg']:g}, t {r['temperature']:g}, "
                         f"{r['cfg_schedule']}, iters {r['num_iters']}" + (f", {extras}" if extras else ""))  # fmt: skip
    released = result.released
    if released is not None and released["status"] == "completed":
        lines.append(f"released setting: FID {released['fid']:.4f}, IS {released['inception_score']:.4f}")
    if result.best:
        lines.append(f"best: {result.best_settings.describe()} -> FID {result.best['fid']:.4f}"
                     + (" (the released setting)" if result.best.get("released") else ""))  # fmt: skip
    if result.registered:
        lines.append(f"tagged {result.registered[0]} version {result.registered[1]} with the best setting")
    lines.append(f"table: {result.table}" + (f"   plot: {result.plot}" if result.plot else ""))
    if result.pareto_table:
        lines.append(f"Pareto: {result.pareto_table}, {result.pareto_table.with_suffix('.md')}"
                     + (f", {result.pareto_plot}" if result.pareto_plot else ""))  # fmt: skip
    lines.append(f"MLflow parent run: {result.parent_run_id}")
    return "\n".join(lines)

"""The sweep recipe (``SweepConfig``: space, search, eval, resources, mlflow) and its checks: every
value of the space is validated by building a ``SamplingSettings`` (the terms: ``fractalgen.platform.tuning.sweep``)."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fractalgen.config import ConfigError, load
from fractalgen.sampling_settings import SCHEDULES, SamplingSettings, parse_schedule

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


def schedule_family(spec: str) -> str:
    return spec.strip().partition(":")[0].strip()


def family_params(family: str) -> list[str]:
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
                    if name not in family_params(family):
                        allowed = ", ".join(family_params(family)) or "none"
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
                    spec = schedule_spec(family, dict(zip(names, combo)))
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
                specs = [canonical_spec(schedule_spec(spec.strip(), dict(zip(names, c)))) for c in combos]
            else:
                specs = [canonical_spec(spec)]
            out += [s for s in specs if s not in out]
        return out

    def grid_size(self) -> int:
        n = len(self.cfg) * len(self.temperature) * len(self.schedule_specs()) * max(1, len(self.num_iters))
        for key in OPTIONAL_FIELDS:
            n *= len(getattr(self, key))
        return n


def schedule_spec(family: str, params: dict[str, float]) -> str:
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

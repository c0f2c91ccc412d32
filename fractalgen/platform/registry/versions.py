"""Registering versions: checkpoints into the MLflow registry, their tags (metrics, best sampling settings).

Terms:
- *registered model*: a name in the MLflow registry (e.g. ``fractalmar-in64``); its *versions* are
  checkpoints, each logged as an ``mlflow.pyfunc`` model (``serving.FractalGenPyfunc``) whose
  ``checkpoint`` artifact holds the consolidated weights in the released format.
- *aliases* (MLflow 3, instead of stages): ``candidate`` marks a newly registered version,
  ``champion`` the one in use (``models:/NAME@champion``). ``promote`` moves ``champion``.
- *registration run*: the MLflow run a version is logged from, in experiment ``fractalgen-registry``
  (or the training run's experiment, nested under the training run when that run is known: given,
  or found by the checkpoint's ``run_name``). Metrics and the sample grid are logged there.
- *version tags*, what ``review`` shows side by side:
  ``metrics.<name>`` (``fid``, ``inception_score``, ``precision``, ``recall``, ``nll_bpd``) from
  ``fractalgen eval ... --record`` or registration; ``sampling.<field>`` the best sampling settings
  of a sweep and ``sweep.<name>`` its result (``sweep.fid``, ``sweep.run_id``); ``fractalgen.model``
  (architecture), ``fractalgen.source`` (where the weights came from), ``fractalgen.grid`` (the grid's
  path in the registration run), ``fractalgen.training_run_id``.
- *released import*: a public ``checkpoint-last.pth`` registered as a version (weights only; the
  optimizer state in the file is dropped).
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fractalgen.platform.artifacts.model_store import (
    RegistryError,
    client,
    ensure_experiment,
    get_version,
    use_tracking_uri,
)
from fractalgen.platform.images import auto_scale, grid_png
from fractalgen.sampling_settings import TAG_PREFIX as SAMPLING_PREFIX
from fractalgen.sampling_settings import SamplingSettings

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"
MODEL_NAME_IN_RUN = "model"
REGISTRY_EXPERIMENT = "fractalgen-registry"
TAG_ARCH = "fractalgen.model"
TAG_SOURCE = "fractalgen.source"
TAG_SOURCE_KIND = "fractalgen.source_kind"
TAG_TRAINING_RUN = "fractalgen.training_run_id"
TAG_GRID = "fractalgen.grid"
TAG_PROMOTED = "fractalgen.promoted_at"
METRIC_PREFIX = "metrics."
SWEEP_PREFIX = "sweep."
RUN_NAME_TAG = "fractalgen.run_name"  # the training run's name (fractalgen.platform.training.tracking)
REVIEW_METRICS = ("fid", "inception_score", "precision", "recall", "nll_bpd")
LOWER_IS_BETTER = {
    "fid": True,
    "nll_bpd": True,
    "inception_score": False,
    "precision": False,
    "recall": False,
}


@dataclass
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    model_uri: str  # models:/NAME/VERSION


def _find_training_run(c: Any, run_name: str | None) -> str | None:
    if not run_name:
        return None
    try:
        experiments = [e.experiment_id for e in c.search_experiments(max_results=200)]
        runs = c.search_runs(
            experiments, filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
        )
    except Exception as err:  # a store without search support: no link, not a failure
        log.debug("training run lookup failed: %s", err)
        return None
    return runs[0].info.run_id if runs else None


def register_checkpoint(
    checkpoint: str,
    name: str,
    *,
    tracking_uri: str | None = None,
    experiment: str = REGISTRY_EXPERIMENT,
    model_name: str | None = None,
    training_run_id: str | None = None,
    metrics: Mapping[str, float] | None = None,
    aliases: Sequence[str] = (CANDIDATE,),
    description: str | None = None,
    grid_images: int = 16,
    grid_settings: Any = None,
    grid_seed: int = 0,
    source_kind: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> RegisteredVersion:
    """Register ``checkpoint`` (a released-format file, a training checkpoint / run folder, local or
    ``s3://``) as a new version of ``name`` with a pyfunc model, a sample grid and ``metrics``.

    ``model_name`` names the architecture when the file cannot tell (old released files do). The new
    version gets ``aliases`` (default ``candidate``). Returns the version.
    """
    import mlflow  # deferred: heavy import

    from fractalgen.models import CheckpointError, load_released, save_released  # deferred: heavy import
    from fractalgen.models.checkpoint import read_checkpoint  # deferred: heavy import
    from fractalgen.platform.generation.sampling import (  # deferred: heavy import
        balanced_labels,
        generate_images,
    )
    from fractalgen.platform.generation.serving import (  # deferred: heavy import
        CHECKPOINT_ARTIFACT,
        FractalGenPyfunc,
        default_params,
    )
    from fractalgen.platform.generation.sources import resolve_model_source  # deferred: heavy import

    c = client(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="fractalgen-register-") as work:
        try:
            source = resolve_model_source(checkpoint, work_dir=work)
            ckpt_args = read_checkpoint(source.path).get("args")
            model = load_released(source.path, model_name)
        except (FileNotFoundError, CheckpointError) as err:
            raise RegistryError(str(err)) from None
        args = dict(vars(ckpt_args)) if ckpt_args is not None and hasattr(ckpt_args, "__dict__") else {}
        # weights only (a released file's optimizer state is dropped); the architecture travels along
        weights = save_released(model, Path(work) / "checkpoint.pth", args=args)
        arch = model_name or architecture_name(model.config, args)
        run_name = args.get("run_name") if isinstance(args.get("run_name"), str) else None
        training_run_id = training_run_id or _find_training_run(c, run_name)

        if training_run_id:
            parent = c.get_run(training_run_id)
            experiment_id = parent.info.experiment_id
        else:
            experiment_id = ensure_experiment(c, experiment, tracking_uri)
        run_tags = {"fractalgen.registered_model": name, TAG_SOURCE: checkpoint}
        if training_run_id:
            run_tags["mlflow.parentRunId"] = training_run_id
        # MLflow's own calls below (start_run, log_model, and the registry store's look-up of the
        # logged model inside create_model_version) use the process-wide tracking URI, not ``c``'s
        with use_tracking_uri(tracking_uri):
            with mlflow.start_run(
                experiment_id=experiment_id, run_name=f"register-{name}", tags=run_tags
            ) as run:
                import pandas as pd  # deferred: heavy import
                from mlflow.models import infer_signature  # deferred: heavy import

                params = default_params(model.config)
                with warnings.catch_warnings():
                    # MLflow's hints for generic models (type-hinted predict, input example, integer
                    # columns): the signature below is explicit, so they only add noise
                    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\.")
                    signature = infer_signature(
                        pd.DataFrame({"label": [0]}),
                        pd.DataFrame({"label": [0], "image": [""]}),
                        params=params,
                    )
                    info = mlflow.pyfunc.log_model(
                        name=MODEL_NAME_IN_RUN,
                        python_model=FractalGenPyfunc(),
                        artifacts={CHECKPOINT_ARTIFACT: str(weights)},
                        signature=signature,
                        pip_requirements=_requirements(),
                        metadata={
                            "fractalgen_model": arch,
                            "img_size": model.config.img_size,
                            "num_classes": model.config.num_classes,
                        },
                    )
                mlflow.log_params({"checkpoint": checkpoint[:500], "architecture": arch,
                                   "img_size": model.config.img_size, "num_classes": model.config.num_classes})  # fmt: skip
                if metrics:
                    mlflow.log_metrics(dict(metrics), model_id=info.model_id)
                grid_path = None
                if grid_images > 0:
                    settings = grid_settings or SamplingSettings()
                    labels = balanced_labels(grid_images, model.config.num_classes)
                    images = generate_images(model, labels, settings, batch_size=grid_images, seed=grid_seed)
                    grid_path = "registry/grid.png"
                    grid_file = Path(work) / "grid.png"
                    grid_file.write_bytes(grid_png(images, scale=auto_scale(images.size(-1))))
                    mlflow.log_artifact(str(grid_file), "registry")
                    mlflow.log_dict(
                        {"labels": labels.tolist(), "seed": grid_seed,
                         "settings": settings.resolved(model.config).to_tags()}, "registry/grid.json",
                    )  # fmt: skip
                run_id = run.info.run_id
            version_tags = {
                TAG_ARCH: arch,
                TAG_SOURCE: checkpoint,
                TAG_SOURCE_KIND: source_kind or source.kind,
                **({TAG_TRAINING_RUN: training_run_id} if training_run_id else {}),
                **({TAG_GRID: grid_path} if grid_path else {}),
                **{f"{METRIC_PREFIX}{k}": _fmt(v) for k, v in (metrics or {}).items()},
                **dict(tags or {}),
            }
            try:
                c.get_registered_model(name)
            except Exception:
                c.create_registered_model(
                    name, description="FractalGen image generator (fractalgen registry)"
                )
            mv = c.create_model_version(
                name,
                info.model_uri,
                run_id=run_id,
                tags=version_tags,
                description=description,
                model_id=info.model_id,
            )
            mv = _wait_ready(c, name, mv.version)
            for alias in aliases:
                c.set_registered_model_alias(name, alias, mv.version)
    log.info("registered %s version %s from %s", name, mv.version, checkpoint)
    return RegisteredVersion(name, str(mv.version), run_id, f"models:/{name}/{mv.version}")


def architecture_name(config: Any, args: Mapping[str, Any] | None = None) -> str:
    """The registered size a model config is (``args["model"]`` of a released file first), else ``custom``."""
    from fractalgen.models import MODEL_CONFIGS  # deferred: heavy import

    if args and isinstance(args.get("model"), str) and args["model"] in MODEL_CONFIGS:
        return args["model"]
    keys = ("img_sizes", "widths", "blocks", "heads", "generators", "num_conds", "guiding_pixel")
    for name, ref in MODEL_CONFIGS.items():
        if all(getattr(ref, k) == getattr(config, k) for k in keys):
            return name
    return "custom"


def _wait_ready(c: Any, name: str, version: str, timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        mv = c.get_model_version(name, version)
        if mv.status == "READY" or time.monotonic() > deadline:
            return mv
        if mv.status == "FAILED_REGISTRATION":
            raise RegistryError(f"registering {name} version {version} failed: {mv.status_message}")
        time.sleep(0.5)


def _requirements() -> list[str]:
    """Pinned requirements of the serving environment (fractalgen itself comes from the project image)."""

    out = []
    for pkg in ("torch", "torchvision", "numpy", "pillow", "pyyaml", "pandas", "mlflow"):
        try:
            out.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def record_metrics(
    name: str, version: str | int, metrics: Mapping[str, float], *, prefix: str = "", settings: Any = None,
    tracking_uri: str | None = None,
) -> None:  # fmt: skip
    """Log ``metrics`` on the version's run and tag the version ``metrics.<prefix><key>``."""
    c = client(tracking_uri)
    mv = get_version(name, version, c=c)
    stamp = int(time.time() * 1000)
    for key, value in metrics.items():
        if mv.run_id:
            try:
                c.log_metric(mv.run_id, f"{prefix}{key}", float(value), timestamp=stamp)
            except Exception as err:  # a deleted run: the tags still carry the value
                log.warning("could not log %s on run %s: %s", key, mv.run_id, err)
        c.set_model_version_tag(name, mv.version, f"{METRIC_PREFIX}{prefix}{key}", _fmt(float(value)))
    if settings is not None:
        c.set_model_version_tag(name, mv.version, f"{METRIC_PREFIX}settings", settings.describe())


def set_best_settings(
    name: str,
    version: str | int,
    settings: Any,
    results: Mapping[str, Any],
    *,
    tracking_uri: str | None = None,
) -> None:
    """Write a sweep's best sampling settings (``sampling.*``, every set field: the schedule's spec,
    ``lower_*``, ``temperature_end``, ``filter_threshold`` ...) and its results (``sweep.*``) as tags.
    ``sampling.*`` tags of an earlier sweep that this setting leaves unset are removed, so the
    version's tags always read back (``SamplingSettings.from_tags``) as exactly this setting."""
    c = client(tracking_uri)
    mv = get_version(name, version, c=c)
    new = settings.to_tags()
    for key in sorted(set(mv.tags or {}) - set(new)):
        if key.startswith(SAMPLING_PREFIX):
            c.delete_model_version_tag(name, mv.version, key)
    for key, value in new.items():
        c.set_model_version_tag(name, mv.version, key, value)
    for key, value in results.items():
        c.set_model_version_tag(name, mv.version, f"{SWEEP_PREFIX}{key}", _fmt(value))


# ------------------------------------------------------------------------------ review

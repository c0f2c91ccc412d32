"""``fractalgen train``: check a recipe, then run it as a Ray Train job (TorchTrainer + DeepSpeed).

Terms:
- *driver*: the process running ``fractalgen train`` (a shell, or the entrypoint of ``ray job
  submit``, which sets ``RAY_ADDRESS``). It checks, plans, opens the MLflow run and waits on ``fit``.
- *run folder*: ``<checkpoint.storage_path>/<name>``: Ray Train's state, the checkpoints
  ``checkpoint_<step>`` and ``fractalgen_status.json`` (how the last launch ended).
- *resume*: launching a run whose folder exists (same ``name`` and ``storage_path``) continues from
  its latest checkpoint: after a crash, after Ctrl-C, or after it finished (raise ``train.epochs``
  or ``train.max_steps`` to extend it).

A launch, in order; everything that can fail cheaply fails before Ray is asked for resources:
1. the recipe (YAML + ``--set`` overrides) becomes a ``TrainRunConfig``: unknown keys and bad values
   raise ``ConfigError`` naming the dotted key;
2. ``plan_run``: the model name is registered, the dataset at ``data.train_uri`` is complete and fits
   the model, the storage path and ``checkpoint.init_from`` can be reached (``PlanError`` names the key);
3. MLflow: the tracking store answers (see ``tracking``) and the run is opened;
4. Ray: connect (``cluster.address`` / ``RAY_ADDRESS``) or start a local Ray; ``TorchTrainer.fit``
   with NCCL on GPUs and gloo on CPUs, ``FailureConfig(max_failures)`` from the config;
5. the outcome the loop returned (``Result.return_value``, rank 0's): finished, or stopped on a
   non-finite loss (``TrainError``, the last good checkpoint kept); the driver records it in the run
   folder (``STATUS_FILE``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from fractalgen import storage
from fractalgen.config import TrainRunConfig, to_dict
from fractalgen.pipelines import DataError
from fractalgen.pipelines.summary import read_summary
from fractalgen.platform.artifacts.run_plan import STATE_FILE, WorkerPlan
from fractalgen.platform.ray_connect import connect_ray
from fractalgen.platform.training.worker import train_loop_per_worker

log = logging.getLogger(__name__)

# <run folder>/fractalgen_status.json: the outcome of the last launch whose loop ended, as the driver
# received it (worker.py's module docstring lists the keys); deleted when a launch starts
STATUS_FILE = "fractalgen_status.json"


class PlanError(ValueError):
    """The recipe is well-formed but cannot run (dataset, model, storage); the message names the key."""


class TrainError(RuntimeError):
    """The run started but did not finish (non-finite loss, failures beyond ``cluster.max_failures``)."""


@dataclass(kw_only=True)
class TrainOutcome:
    """How a launch ended: the run folder, the last checkpoint, the final metrics and the MLflow run."""

    run_uri: str
    status: str
    step: int
    checkpoint: str | None
    metrics: dict[str, Any]
    resumed_from: list[int]
    tracking_uri: str | None
    mlflow_run_id: str | None


def _abs_storage(path: str) -> str:
    return path if storage.is_remote(path) else os.path.abspath(storage.local_path(path))


def _check_local_folder(path: str) -> None:
    """``path`` is a folder, or one that could be created there (a dry run creates nothing)."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise NotADirectoryError(f"{path} is not a folder")
        target = path
    else:
        target = os.path.dirname(path)
        while target and not os.path.exists(target):
            target = os.path.dirname(target)
        if not os.path.isdir(target):
            raise NotADirectoryError(f"{target} is not a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise PermissionError(f"{target} is not writable")


def plan_run(cfg: TrainRunConfig, *, dry_run: bool = False) -> WorkerPlan:
    """Check everything the workers will need and derive the schedule; ``PlanError`` names the key.

    Does not start Ray or MLflow. Creates the local storage folder, unless ``dry_run``: then it only
    checks that the folder could be created, and writes nothing.
    """
    from fractalgen.models import MODEL_CONFIGS, get_config  # deferred: heavy import

    if cfg.model.name not in MODEL_CONFIGS:
        raise PlanError(
            f"model.name: unknown model {cfg.model.name!r}; registered: {', '.join(sorted(MODEL_CONFIGS))}"
        )
    try:
        model_cfg = get_config(cfg.model.name, **cfg.model.architecture())
    except (ValueError, TypeError) as err:
        raise PlanError(
            f"model: {cfg.model.name} with {cfg.model.architecture()} does not build: {err}"
        ) from None
    num_levels = len(model_cfg.img_sizes)
    levels = f"the model has {num_levels} levels (0..{num_levels - 1}, the pixel head last)"
    if len(cfg.finetune.level_lr_scale) > num_levels:
        raise PlanError(f"finetune.level_lr_scale: {len(cfg.finetune.level_lr_scale)} entries, but {levels}")
    if any(level >= num_levels for level in cfg.finetune.freeze_levels):
        raise PlanError(f"finetune.freeze_levels: {list(cfg.finetune.freeze_levels)}, but {levels}")
    if not cfg.data.train_uri:
        raise PlanError("data.train_uri: required (a prepared dataset: folder or s3:// prefix)")
    data_endpoint = storage.endpoint_for(cfg.data.train_uri, cfg.data.s3_endpoint_url)
    try:
        storage.check_scheme(cfg.data.train_uri)
        summary = read_summary(cfg.data.train_uri, endpoint=data_endpoint)
        if not storage.exists(storage.join(cfg.data.train_uri, "index.json"), endpoint=data_endpoint):
            raise DataError(f"{cfg.data.train_uri} has no index.json: its conversion has not finished")
        if cfg.data.eval_uri:
            eval_summary = read_summary(cfg.data.eval_uri, endpoint=data_endpoint)
            if eval_summary["image_size"] != summary["image_size"]:
                raise PlanError(
                    f"data.eval_uri: {eval_summary['image_size']}px images, train set has {summary['image_size']}px"
                )
    except (DataError, ValueError) as err:
        if isinstance(err, PlanError):
            raise
        raise PlanError(f"data.train_uri: {err}") from None
    except Exception as err:  # unreachable endpoint, missing credentials ...
        raise PlanError(
            f"data.train_uri: cannot read {cfg.data.train_uri}: {type(err).__name__}: {err}"
        ) from None

    if summary["image_size"] != model_cfg.img_size:
        raise PlanError(
            f"data.train_uri: the dataset holds {summary['image_size']}x{summary['image_size']} images but "
            f"model.name={cfg.model.name} takes {model_cfg.img_size}x{model_cfg.img_size}"
        )
    num_classes = cfg.model.num_classes or int(summary["num_classes"])
    if num_classes < int(summary["num_classes"]):
        raise PlanError(
            f"model.num_classes: {num_classes} but the dataset has {summary['num_classes']} classes"
        )
    num_images = int(summary["num_images"])
    steps_per_epoch = num_images // cfg.train.global_batch_size
    if steps_per_epoch < 1:
        raise PlanError(
            f"train.global_batch_size: {cfg.train.global_batch_size} is larger than the dataset ({num_images} images)"
        )
    if not math.isfinite(cfg.train.epochs * steps_per_epoch):
        raise PlanError(f"train.epochs: {cfg.train.epochs} epochs is too many steps to count")
    total_steps = max(1, round(cfg.train.epochs * steps_per_epoch))
    stop_step = min(total_steps, cfg.train.max_steps or total_steps)
    class_names = tuple(str(c) for c in summary.get("class_names", ()))
    if len(class_names) != num_classes:
        class_names = ()

    storage_path = _abs_storage(cfg.checkpoint.storage_path)
    storage_endpoint = None
    try:
        storage.check_scheme(storage_path)
        if storage.is_remote(storage_path):
            storage_endpoint = storage.endpoint_url(cfg.checkpoint.s3_endpoint_url)
            storage.list_dirs(storage_path, endpoint=storage_endpoint)  # bucket exists, credentials work
        elif dry_run:
            _check_local_folder(storage_path)
        else:
            os.makedirs(storage_path, exist_ok=True)
    except Exception as err:
        raise PlanError(
            f"checkpoint.storage_path: cannot use {storage_path}: {type(err).__name__}: {err}"
        ) from None
    if cfg.checkpoint.init_from:
        endpoint = storage.endpoint_url(cfg.checkpoint.s3_endpoint_url)
        if not storage.exists(storage.join(cfg.checkpoint.init_from, STATE_FILE), endpoint=endpoint):
            raise PlanError(
                f"checkpoint.init_from: {cfg.checkpoint.init_from} is not a fractalgen checkpoint (no {STATE_FILE})"
            )
    init_class_map: tuple[tuple[int, int], ...] = ()
    if cfg.finetune.init:
        init_class_map = _check_finetune(cfg, model_cfg, num_classes, class_names)

    # local paths absolute: Ray workers run in other folders than the driver
    resolved = copy.deepcopy(cfg)
    resolved.checkpoint.storage_path = storage_path
    resolved.data.train_uri = _abs_storage(cfg.data.train_uri)
    if cfg.data.eval_uri:
        resolved.data.eval_uri = _abs_storage(cfg.data.eval_uri)
    if cfg.checkpoint.init_from:
        resolved.checkpoint.init_from = _abs_storage(cfg.checkpoint.init_from)
    resolved.data.s3_endpoint_url = data_endpoint
    resolved.checkpoint.s3_endpoint_url = storage_endpoint
    if cfg.finetune.init:
        from fractalgen.platform.training.finetune import absolute_source  # deferred: heavy import

        resolved.finetune.init = absolute_source(cfg.finetune.init)
    return WorkerPlan(
        config=resolved,
        run_uri=storage.join(storage_path, cfg.name),
        storage_endpoint=storage_endpoint,
        data_endpoint=data_endpoint,
        num_images=num_images,
        num_classes=num_classes,
        class_names=class_names,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        stop_step=stop_step,
        init_class_map=init_class_map,
    )


def _check_finetune(
    cfg: TrainRunConfig, model_cfg: Any, num_classes: int, class_names: tuple[str, ...]
) -> tuple[tuple[int, int], ...]:
    """``finetune.init`` resolves to weights that fit the model; returns the resolved class map."""

    import torch  # deferred: heavy import

    from fractalgen.models import FractalGen  # deferred: heavy import
    from fractalgen.platform.training import tracking  # deferred: heavy import
    from fractalgen.platform.training.finetune import FinetuneError, check_source  # deferred: heavy import

    try:
        tracking_uri = tracking.resolve_tracking_uri(cfg)
    except ValueError:
        tracking_uri = None  # only registry sources need it; their lookup then names the problem
    with torch.device("meta"):
        model = FractalGen(dataclasses.replace(model_cfg, num_classes=num_classes))
    try:
        return check_source(
            cfg.finetune.init,  # type: ignore[arg-type]
            cfg.finetune.class_map,
            model,
            class_names=class_names,
            tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
            endpoint=storage.endpoint_url(cfg.checkpoint.s3_endpoint_url),
        )
    except FinetuneError as err:
        raise PlanError(str(err)) from None


def open_tracking(plan: WorkerPlan) -> WorkerPlan:
    """Resolve, check and open the MLflow run (driver); returns the plan with its run id.

    Unreachable store: ``PlanError`` naming ``mlflow.tracking_uri``, or (``mlflow.required=false``) a
    warning and an untracked run.
    """
    from fractalgen.platform.training import tracking  # deferred: heavy import

    cfg = plan.config
    if not cfg.mlflow.enabled:
        return plan
    try:
        uri = tracking.resolve_tracking_uri(cfg)
    except ValueError as err:
        raise PlanError(str(err)) from None
    try:
        tracking.check_reachable(uri, cfg.mlflow.connect_timeout_s)
        run_id = tracking.open_run(
            cfg,
            uri,
            extra_params={
                "plan.num_images": plan.num_images,
                "plan.steps_per_epoch": plan.steps_per_epoch,
                "plan.total_steps": plan.total_steps,
                "plan.grad_accum_steps": cfg.grad_accum_steps,
                "plan.peak_lr": cfg.lr,
            },
        )
    except Exception as err:
        msg = (
            f"mlflow.tracking_uri: {err}"
            if isinstance(err, tracking.TrackingUnavailable)
            else (
                f"mlflow.tracking_uri: cannot open a run at {uri}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            )
        )
        if cfg.mlflow.required:
            raise PlanError(msg) from None
        log.warning("%s; training without MLflow tracking (mlflow.required=false)", msg)
        return plan
    plan.tracking_uri, plan.mlflow_run_id = uri, run_id
    cfg.mlflow.tracking_uri = uri
    return plan


def build_trainer(plan: WorkerPlan) -> Any:
    """The Ray ``TorchTrainer`` for the plan (NCCL on GPUs, gloo on CPUs; failure and storage config)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # deferred: heavy import
    from ray.train.torch import TorchConfig, TorchTrainer  # deferred: heavy import

    cfg = plan.config
    c = cfg.cluster
    use_gpu = c.gpus_per_worker > 0
    filesystem, storage_path = storage.ray_storage(
        cfg.checkpoint.storage_path, endpoint=plan.storage_endpoint
    )
    resources = {"CPU": float(c.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(c.gpus_per_worker)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=to_dict(plan),
        scaling_config=ScalingConfig(
            num_workers=c.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            # a worker group that cannot be placed (a lost node, nothing to replace it) times out
            # after RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) and is retried: max_failures times
            # too, not forever (Ray's default), so the run ends with ``_placement_shortfall``'s message
            failure_config=FailureConfig(
                max_failures=c.max_failures, controller_failure_limit=c.max_failures
            ),
            # the worker keeps the latest N and the best itself (Ray keeps either, not both)
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )


def root_cause(error: BaseException) -> str:
    """The last ``SomeError: message`` line of an error's text: for Ray's errors, which quote the
    workers' tracebacks, the worker's own exception (a storage error names the file it was writing)."""

    for line in reversed(str(error).splitlines()):
        line = line.strip()
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b.*: \S", line):
            return line
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _placement_shortfall(error: BaseException, plan: WorkerPlan) -> str | None:
    """For a run that ended because Ray Train could not place its worker group (its start timed out
    on every retry): what the group needs and what the cluster has now. None for other errors."""
    cause = getattr(error, "controller_failure", None)
    if type(cause).__name__ != "WorkerGroupStartupTimeoutError":
        return None
    c = plan.config.cluster
    need = {"CPU": float(c.cpus_per_worker)} | (
        {"GPU": float(c.gpus_per_worker)} if c.gpus_per_worker else {}
    )
    try:
        import ray  # deferred: heavy import

        total = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        has = ", ".join(f"{total.get(k, 0.0):g} {k}" for k in need) + f" on {nodes} alive node(s)"
    except Exception as err:  # the cluster itself is gone
        has = f"unknown ({type(err).__name__}: {err})"
    wants = ", ".join(f"{v * c.num_workers:g} {k}" for k, v in need.items())
    return (
        f"the cluster cannot hold the worker group any more: {c.num_workers} workers need {wants}, the "
        f"cluster has {has}; Ray Train gave up after {c.max_failures + 1} attempts to place it "
        "(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S each). A run resumes on the number of workers it started "
        "with (cluster.num_workers): add nodes"
    )


def run_training(cfg: TrainRunConfig, *, plan: WorkerPlan | None = None) -> TrainOutcome:
    """Check, plan and run ``cfg`` on Ray; returns the outcome or raises ``PlanError`` / ``TrainError``."""
    from fractalgen.platform.training import tracking  # deferred: heavy import

    plan = plan or plan_run(cfg)
    plan = open_tracking(plan)
    storage.delete_file(storage.join(plan.run_uri, STATUS_FILE), endpoint=plan.storage_endpoint)
    connect_ray(plan.config.cluster.address, dashboard=True)
    trainer = build_trainer(plan)
    error: Exception | None = None
    status: dict[str, Any] = {"status": "failed"}
    try:
        result = trainer.fit()
    except Exception as err:  # TrainingFailedError after max_failures, a lost controller ...
        error = err
    else:
        # The outcome travels in Ray's Result: the loop's return value on rank 0 (Ray Train keeps the
        # one of the attempt that finished, so it covers restarts; ``resumed_from`` lists them). Not in
        # ``result.metrics``: Ray Train builds those from the latest report that carried a checkpoint,
        # and a loop stopped by a non-finite loss must not write one. When ``fit`` raises, no outcome
        # comes back and none is needed: the run failed, and the error says how.
        if isinstance(result.return_value, dict):
            status = result.return_value
            storage.write_json(
                storage.join(plan.run_uri, STATUS_FILE), status, endpoint=plan.storage_endpoint
            )
    outcome = TrainOutcome(
        run_uri=plan.run_uri,
        status=str(status.get("status")),
        step=int(status.get("step", 0)),
        checkpoint=status.get("checkpoint") or status.get("last_good_checkpoint"),
        metrics=dict(status.get("metrics", {})),
        resumed_from=list(status.get("resumed_from", [])),
        tracking_uri=plan.tracking_uri,
        mlflow_run_id=plan.mlflow_run_id,
    )
    if plan.mlflow_run_id and plan.tracking_uri:
        tracking.finish_run(
            plan.tracking_uri, plan.mlflow_run_id, "FINISHED" if outcome.status == "finished" else "FAILED"
        )
    shortfall = _placement_shortfall(error, plan) if error is not None else None
    if shortfall is not None:
        raise TrainError(
            f"training failed: {shortfall}, then launch again with the same name: the run folder "
            f"{plan.run_uri} keeps the last complete checkpoint"
        ) from error
    if error is not None:
        raise TrainError(
            f"training failed: {type(error).__name__}: {error}\n\ntraining failed: {root_cause(error)}\n"
            f"the run folder {plan.run_uri} keeps the last complete checkpoint: launch again with the same "
            "name to resume"
        ) from error
    if outcome.status == "nonfinite_loss":
        raise TrainError(
            f"the loss became non-finite (NaN/inf) between steps {status.get('after_step', 0) + 1} and "
            f"{status.get('step')}; training stopped. The last good checkpoint is kept: "
            f"{status.get('last_good_checkpoint') or '(none yet)'}. Lower train.base_lr or raise "
            "train.warmup_epochs, then launch again with the same name to resume from it"
        )
    if outcome.status != "finished":
        raise TrainError(f"training ended without a status ({plan.run_uri}); see the worker logs above")
    return outcome


def describe_outcome(outcome: TrainOutcome, plan: WorkerPlan) -> str:
    """Where everything is, and how to resume, export and look at the run."""
    lines = [
        f"run {plan.config.name}: finished at step {outcome.step}/{plan.total_steps}"
        + (f" (loss {outcome.metrics['loss']:.4f})" if "loss" in outcome.metrics else ""),
        f"  run folder:  {outcome.run_uri}",
        f"  checkpoint:  {outcome.checkpoint}",
        f"  export:      fractalgen export {outcome.checkpoint} --out model.pth",
        "  resume/extend: launch the same command again (same name; raise train.epochs or train.max_steps)",
    ]
    if outcome.mlflow_run_id:
        lines.append(f"  MLflow:      {outcome.tracking_uri} run {outcome.mlflow_run_id}")
        if outcome.tracking_uri and outcome.tracking_uri.startswith("sqlite:"):
            lines.append(
                f"  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {outcome.tracking_uri} --port 5000"
            )
    return "\n".join(lines)

"""What a training run's driver hands its workers and what its checkpoints are made of: ``WorkerPlan``
(resolved once on the driver, saved with each checkpoint), ``build_run_model`` (the model a plan trains,
also what an export rebuilds) and the checkpoint folder's fixed names."""

from __future__ import annotations

from dataclasses import dataclass

from fractalgen.config import TrainRunConfig

DS_TAG = "deepspeed"  # DeepSpeed's checkpoint tag: the sub-folder holding its shards
STATE_FILE = "state.json"


@dataclass(kw_only=True)
class WorkerPlan:
    """Everything a worker needs, resolved once on the driver."""

    config: TrainRunConfig
    run_uri: str  # <storage_path>/<name> (absolute for local storage)
    storage_endpoint: str | None = None  # S3 endpoint of the storage path (None: local or AWS)
    data_endpoint: str | None = None  # S3 endpoint of the dataset
    num_images: int
    num_classes: int
    class_names: tuple[str, ...] = ()
    steps_per_epoch: int
    total_steps: int  # epochs * steps_per_epoch: the length of the lr schedule
    stop_step: int  # min(total_steps, train.max_steps)
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    # finetune.class_map resolved to (new class index, source class index) pairs (``finetune``)
    init_class_map: tuple[tuple[int, int], ...] = ()


def build_run_model(plan: WorkerPlan):
    """The model the run trains: the registered size with the run's classes and training options."""
    from fractalgen.models import build_model  # deferred: heavy import

    m = plan.config.model
    return build_model(
        m.name,
        **m.architecture(),
        num_classes=plan.num_classes,
        attn_dropout=m.dropout,
        proj_dropout=m.dropout,
        label_drop_prob=m.label_drop_prob,
        grad_checkpointing=m.activation_checkpointing,
        mask_buckets=m.mask_buckets,
        class_names=tuple(plan.class_names),
    )

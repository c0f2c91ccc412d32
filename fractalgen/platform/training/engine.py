"""The DeepSpeed engine of one training worker: ZeRO config, AdamW groups, per-step lr schedule.

Terms:
- *step*: one optimizer update (``global_batch_size`` images over all workers); DeepSpeed counts
  micro-batches and steps the optimizer and the schedule at each gradient-accumulation boundary.
- *peak lr*: ``base_lr * global_batch_size / 256`` (docs/model.md#training-recipe).
- *schedule*: the released ``adjust_learning_rate``: linear warm-up from 0 over ``warmup_epochs``,
  then half a cosine down to ``min_lr`` at ``epochs``, evaluated every step at the fractional epoch
  ``step / steps_per_epoch`` (the released code adjusts the lr every iteration, not every epoch).
- *precision*: ``bf16`` is torch autocast to bfloat16 with fp32 weights and fp32 master state
  (DeepSpeed ``torch_autocast``), not DeepSpeed's ``bf16`` mode, which casts the weights and so the
  inputs: the pixel head rounds de-normalised input pixels to integer targets
  (docs/model.md#pixel-head), and bfloat16 inputs would shift those targets by up to a level. The
  run-time patches measured on the reference (docs/performance.md#reference-measurements) made the
  same choice (bf16 autocast, no GradScaler).

``import deepspeed`` happens inside the functions: Ray workers import it, the driver never does.
What this module does to DeepSpeed beyond its public API (patches, a private function) lives in
``deepspeed_compat``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fractalgen.config import TrainRunConfig
from fractalgen.platform.training import deepspeed_compat


def deepspeed_config(cfg: TrainRunConfig, *, use_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for the run (ZeRO stage, offload, precision, batch, clipping)."""
    t = cfg.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage > 0:
        zero.update(
            contiguous_gradients=True,
            overlap_comm=use_gpu,  # overlap needs CUDA streams; on CPU it only adds copies
            reduce_bucket_size=50_000_000,
        )
    if t.zero_stage == 3:
        # ZeRO-3 checkpoints are shards: gather whole 16-bit weights on save so sampling / export
        # need no shard surgery
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    config: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_per_gpu,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 1 << 62,  # our own progress line; DeepSpeed's would sync every print
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        # a torch AdamW with offload is allowed on CPU-only runs (DeepSpeedCPUAdam is used on GPUs)
        "zero_force_ds_cpu_optimizer": False,
    }
    if t.precision == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config


def param_groups(
    model: nn.Module, weight_decay: float, level_lr_scale: Sequence[float] = ()
) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay for biases and 1-D parameters (norm weights), as released.

    Frozen parameters (``requires_grad=False``) are left out. With per-level lr multipliers
    (``finetune.level_lr_scale``) each multiplier gets its own pair of groups; every group records
    its multiplier (``lr_scale``) and whether it decays (``decays``), which the schedule reads.
    """
    from fractalgen.platform.training.finetune import level_lr_scale as scale_of  # deferred: heavy import

    found: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.ndim <= 1 or name.endswith(".bias"))
        scale = scale_of(name, level_lr_scale) if level_lr_scale else 1.0
        found.setdefault((decays, scale), []).append(param)
    keys = sorted(found, key=lambda k: (not k[0], -k[1]))  # decaying groups first
    return [
        {"params": found[k], "weight_decay": weight_decay if k[0] else 0.0, "lr_scale": k[1], "decays": k[0]}
        for k in keys
    ]


def learning_rate(step: int, *, cfg: TrainRunConfig, steps_per_epoch: int) -> float:
    """The lr used for optimizer step ``step`` (0-based): warm-up, then cosine (released schedule)."""
    t = cfg.train
    peak = cfg.lr
    epoch = step / steps_per_epoch
    if epoch < t.warmup_epochs:
        return peak * epoch / t.warmup_epochs
    span = t.epochs - t.warmup_epochs
    progress = min(1.0, (epoch - t.warmup_epochs) / span) if span > 0 else 1.0
    return t.min_lr + (peak - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainRunConfig, *, use_gpu: bool) -> torch.optim.Optimizer:
    """AdamW with the recipe's betas and weight-decay groups at the peak lr (the schedule scales it)."""
    t = cfg.train
    groups = param_groups(model, t.weight_decay, cfg.finetune.level_lr_scale)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_scale"]
    if t.offload_optimizer and use_gpu:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # deferred: heavy import

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=t.betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=t.betas, fused=use_gpu)


def setup_engine(model: nn.Module, cfg: TrainRunConfig, *, steps_per_epoch: int, use_gpu: bool) -> Any:
    """``deepspeed.initialize`` with the run's ZeRO config, AdamW and the per-step schedule.

    The process group must already exist (Ray Train's torch backend creates it). Returns the engine.
    """
    import deepspeed  # deferred: heavy import

    if not use_gpu:
        deepspeed_compat.skip_cpu_shm_op()
    if cfg.train.zero_stage == 3:
        deepspeed_compat.walk_dataclass_outputs()
    optimizer = build_optimizer(model, cfg, use_gpu=use_gpu)
    peak = cfg.lr
    # LambdaLR multiplies the peak lr; DeepSpeed steps it after every optimizer step, so the lr of
    # step s is learning_rate(s) (checkpointed with the engine)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate(s, cfg=cfg, steps_per_epoch=steps_per_epoch) / peak
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=deepspeed_config(cfg, use_gpu=use_gpu),
        dist_init_required=False,
    )
    return engine


def apply_hyperparameters(engine: Any, cfg: TrainRunConfig, *, step: int) -> None:
    """After a restore, let the current recipe's lr schedule, betas and weight decay apply.

    DeepSpeed restores the optimizer's and the schedule's saved hyper-parameters with their state;
    a run relaunched with a lower ``train.base_lr`` (the advice after a non-finite loss) must train
    with the new one. Values are computed exactly as ``LambdaLR`` does, so an unchanged recipe
    resumes bit for bit.
    """
    t = cfg.train
    schedule = engine.lr_scheduler
    groups = schedule.optimizer.param_groups
    # groups saved before param_groups recorded ``lr_scale`` / ``decays``: scale 1, decay where set
    schedule.base_lrs = [cfg.lr * group.get("lr_scale", 1.0) for group in groups]
    schedule.last_epoch = step
    for i, group in enumerate(groups):
        group["initial_lr"] = schedule.base_lrs[i]
        group["betas"] = tuple(t.betas)
        group["weight_decay"] = t.weight_decay if group.get("decays", group["weight_decay"] > 0) else 0.0
        group["lr"] = schedule.base_lrs[i] * schedule.lr_lambdas[i](step)
    schedule._last_lr = [group["lr"] for group in groups]


def full_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (None elsewhere). Collective: every rank must call it.

    ZeRO-3 gathers the partitioned parameters; stages 0-2 hold full weights on every rank.
    """
    import torch.distributed as dist  # deferred: heavy import

    if engine.zero_optimization_stage() == 3:
        state = deepspeed_compat.zero3_full_state_dict(engine)
        return state if dist.get_rank() == 0 else None
    if dist.get_rank() != 0:
        return None
    return {k: v.detach() for k, v in engine.module.state_dict().items()}

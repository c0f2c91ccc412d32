"""``fractalgen cluster plan``: what a training recipe needs from a GPU cluster, before renting one.

For a recipe (``configs/*.yaml``, the same ``TrainRunConfig`` that ``fractalgen train`` runs) and a
cluster shape (nodes x GPUs per node), it prints the GPU count, the global batch and its split,
steps per epoch, the expected time per epoch and GPU-hours, and the memory per GPU for each ZeRO
stage; it refuses shapes that cannot run (the batch does not split, the recipe's stage does not fit
in GPU memory, offloaded state does not fit in host memory).

Terms:
- *node*: one machine of the cluster (``p5.48xlarge``: 8 x H100 80 GB, 192 vCPUs, 2 TiB RAM). One
  Ray Train worker drives one GPU, so GPUs = workers = ``cluster.num_workers``.
- *micro-step*: one forward + backward of ``micro_batch_per_gpu`` images on one GPU. *step*: one
  optimizer update = ``global_batch_size`` images = ``accum`` micro-steps on every GPU, with
  ``accum = global_batch_size / (micro_batch_per_gpu x GPUs)``.
- *epoch*: ``num_images // global_batch_size`` steps (as ``fractalgen train`` counts them); the
  dataset size comes from ``--num-images``, else the dataset summary at ``data.train_uri``.
- *step time*: seconds per step on the cluster: ``--step-time``, else ``accum`` x the seconds per
  micro-step on one GPU from ``REFERENCE_STEPS`` (the *reference* measurements of the released
  code on one H100 in docs/performance.md#reference-measurements, clearly not this platform's own
  speed), scaled when the exact setting
  was not measured (the source is printed), divided by ``--efficiency`` (data-parallel scaling;
  communication is not modelled, default 1.0).
- *GPU-hours*: GPUs x wall-clock hours.

The memory per GPU comes from ``fractalgen.platform.cluster.memory`` (its docstring is the model).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from fractalgen import __version__, storage
from fractalgen.config import TrainRunConfig, from_dict, to_dict
from fractalgen.pipelines.summary import read_summary
from fractalgen.platform.cluster.memory import GiB, MemoryEstimate, Weights, activation_bytes, memory_per_gpu

# The platform's container image: one name for ray_cluster.yaml, the KubeRay manifests, the
# Dockerfile's build command and the docs (tests check that they all use it).
IMAGE_REPOSITORY = "ghcr.io/fractalgen/fractalgen"
IMAGE = f"{IMAGE_REPOSITORY}:{__version__}"
# The training entrypoint of a cluster job; the recipe path follows (configs/<recipe>.yaml).
ENTRYPOINT = "fractalgen train --config"
H100_DENSE_BF16_TFLOPS = 790.0  # dense bf16 matrix work of one H100 (docs/performance.md#the-limit)


@dataclass(frozen=True)
class NodeType:
    """A kind of cluster node: its GPUs, their memory, and the host's memory and CPUs."""

    name: str
    gpus: int
    gpu: str
    gpu_memory_gib: float  # what the CUDA driver reports as total memory
    host_memory_gib: float
    cpus: int


NODE_TYPES: dict[str, NodeType] = {
    "p5.48xlarge": NodeType("p5.48xlarge", 8, "H100 80GB", 79.1, 2048.0, 192),
    "p5e.48xlarge": NodeType("p5e.48xlarge", 8, "H200 141GB", 139.8, 2048.0, 192),
}
DEFAULT_NODE_TYPE = "p5.48xlarge"


@dataclass(frozen=True)
class MeasuredStep:
    """Seconds per micro-step (forward + backward + optimizer step) on one GPU at a setting."""

    model: str
    micro_batch: int
    activation_checkpointing: bool
    seconds: float


# docs/performance.md#reference-measurements (one H100 80GB HBM3): the public release's code (fp16 autocast +
# GradScaler, AdamW), NOT this platform's speed; defaults until `bench/` measures ours (--step-time).
REFERENCE_STEPS: tuple[MeasuredStep, ...] = (
    MeasuredStep("fractalmar_in64", 8, False, 0.244),
    MeasuredStep("fractalar_in64", 8, False, 0.276),
    MeasuredStep("fractalmar_in64", 64, True, 0.945),
    MeasuredStep("fractalmar_base_in256", 32, True, 0.996),
    MeasuredStep("fractalmar_large_in256", 32, True, 1.477),
)
REFERENCE_SOURCE = "docs/performance.md reference (released code, fp16, one H100)"
# full recomputation repeats the forward: about 4/3 of the work of forward + backward
_RECOMPUTE_FACTOR = 4.0 / 3.0
# the ImageNet-1k training set, used when the dataset summary cannot be read and the model has 1000 classes
IMAGENET_TRAIN_IMAGES = 1_281_167


class PlanRefused(ValueError):
    """The shape cannot run this recipe; the message says which constraint and what to change."""


# ----------------------------------------------------------------------------------------------------
# step time
# ----------------------------------------------------------------------------------------------------


def reference_micro_step(
    model: str, micro_batch: int, checkpointing: bool, gflops: dict[str, float]
) -> tuple[float, str] | None:
    """Seconds per micro-step on one GPU from ``REFERENCE_STEPS``, and where the number comes from.

    In order: the exact setting; the same model and checkpointing at another micro-batch (scaled by
    images); another model with the same checkpointing (nearest micro-batch, scaled by images and by
    training FLOPs per image); the same model with the other checkpointing setting (x or / 4/3).
    ``gflops`` maps model names to forward GFLOPs per image. None when nothing applies.
    """
    rows = REFERENCE_STEPS
    for r in rows:
        if (r.model, r.micro_batch, r.activation_checkpointing) == (model, micro_batch, checkpointing):
            return r.seconds, f"{REFERENCE_SOURCE}: measured at this setting"

    def nearest(cands: list[MeasuredStep]) -> MeasuredStep:
        # closest micro-batch, then the model closest in FLOPs per image
        def flops_gap(r: MeasuredStep) -> float:
            if model in gflops and r.model in gflops:
                return abs(math.log(gflops[model] / gflops[r.model]))
            return 0.0

        return min(cands, key=lambda r: (abs(math.log(micro_batch / r.micro_batch)), flops_gap(r), r.model))

    same = [r for r in rows if r.model == model and r.activation_checkpointing == checkpointing]
    if same:
        r = nearest(same)
        return (
            r.seconds * micro_batch / r.micro_batch,
            f"{REFERENCE_SOURCE}: micro-batch {r.micro_batch} measured, scaled by images",
        )
    others = [r for r in rows if r.activation_checkpointing == checkpointing and r.model in gflops]
    if others and model in gflops:
        r = nearest(others)
        t = r.seconds * (micro_batch / r.micro_batch) * (gflops[model] / gflops[r.model])
        return t, (
            f"{REFERENCE_SOURCE}: {r.model} micro-batch {r.micro_batch} measured, scaled by images and "
            "training FLOPs per image"
        )
    flipped = [r for r in rows if r.model == model]
    if flipped:
        r = nearest(flipped)
        factor = _RECOMPUTE_FACTOR if checkpointing else 1.0 / _RECOMPUTE_FACTOR
        on = "with" if r.activation_checkpointing else "without"
        return r.seconds * micro_batch / r.micro_batch * factor, (
            f"{REFERENCE_SOURCE}: micro-batch {r.micro_batch} {on} checkpointing measured, scaled by images "
            "and the recomputation (4/3)"
        )
    return None


# ----------------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterPlan:
    """Everything ``cluster plan`` prints (``--json`` prints ``to_dict()``)."""

    recipe: str
    model: str
    params: int
    node_type: str
    gpu: str
    nodes: int
    gpus_per_node: int
    gpus: int
    gpu_memory_gib: float
    usable_gib: float
    global_batch_size: int
    micro_batch_per_gpu: int
    grad_accum_steps: int
    num_images: int
    num_images_source: str
    steps_per_epoch: int
    epochs: float
    total_steps: int
    step_time_s: float
    step_time_source: str
    images_per_s: float
    epoch_hours: float
    epoch_gpu_hours: float
    total_hours: float
    total_gpu_hours: float
    mfu: float  # training FLOPs done / (GPUs x H100 dense bf16 peak)
    zero_stage: int
    weights: str
    activation_checkpointing: bool
    memory: tuple[MemoryEstimate, ...]
    host_memory_per_node_gib: float
    host_memory_gib: float
    notes: tuple[str, ...]

    @property
    def recipe_memory(self) -> MemoryEstimate:
        return self.memory[self.zero_stage]

    def fits(self, stage: int) -> bool:
        return self.memory[stage].total <= self.usable_gib * GiB

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["memory"] = [
            {
                **{k: (v / GiB if k not in ("stage",) else v) for k, v in dataclasses.asdict(m).items()},
                "total": m.total / GiB,
                "fits": self.fits(m.stage),
            }
            for m in self.memory
        ]
        d["notes"] = list(self.notes)
        return d


def _num_images(cfg: TrainRunConfig, explicit: int | None, num_classes: int) -> tuple[int, str]:
    if explicit is not None:
        return explicit, "--num-images"

    uri = cfg.data.train_uri
    reason = "data.train_uri is empty"
    if uri:
        try:
            endpoint = storage.endpoint_for(uri, cfg.data.s3_endpoint_url)
            summary = read_summary(uri, endpoint=endpoint)
            return int(summary["num_images"]), f"dataset summary at {uri}"
        except Exception as err:  # no dataset yet, no credentials, no network: say so and go on
            reason = f"cannot read the dataset summary at {uri} ({type(err).__name__})"
    if num_classes == 1000:
        return IMAGENET_TRAIN_IMAGES, f"assumed ImageNet-1k train; {reason}; pass --num-images"
    raise PlanRefused(f"{reason}; pass --num-images N")


def make_plan(
    cfg: TrainRunConfig,
    *,
    recipe: str,
    node: NodeType,
    nodes: int | None = None,
    num_images: int | None = None,
    step_time: float | None = None,
    efficiency: float = 1.0,
    headroom: float = 0.08,
    weights: Weights = "fp32",
) -> ClusterPlan:
    """The plan for ``cfg`` on ``nodes`` nodes of ``node`` (None: enough for ``cluster.num_workers``).

    Raises ``PlanRefused`` when the shape cannot run the recipe (the plan is attached as ``.plan``
    when it got that far, so the caller can still show the memory table).
    """
    from fractalgen.models import get_config  # deferred: heavy import
    from fractalgen.models.inspect import level_costs  # deferred: heavy import

    t = cfg.train
    _check_inputs(cfg, efficiency, headroom)
    notes: list[str] = []
    nodes, gpus, accum = _shape(cfg, node, nodes, notes)
    final = from_dict(
        TrainRunConfig, {**to_dict(cfg), "cluster": {**to_dict(cfg.cluster), "num_workers": gpus}}
    )
    model_cfg = get_config(cfg.model.name, **cfg.model.architecture())
    rows = level_costs(model_cfg)
    params = sum(r.params for r in rows)
    gflops_fwd = sum(r.gflops for r in rows)
    images, images_source = _num_images(cfg, num_images, cfg.model.num_classes or model_cfg.num_classes)
    steps_per_epoch = images // t.global_batch_size
    if steps_per_epoch < 1:
        raise PlanRefused(
            f"train.global_batch_size {t.global_batch_size} is larger than the dataset ({images} images)"
        )
    total_steps = max(1, round(t.epochs * steps_per_epoch))
    step_s, step_source = _step_time(cfg, accum, efficiency, gflops_fwd, step_time, notes)
    memory = _memory_table(
        final, model_cfg, params, max(r.block_params // max(1, r.layers) for r in rows), weights
    )
    epoch_h, total_h = steps_per_epoch * step_s / 3600.0, total_steps * step_s / 3600.0
    plan = ClusterPlan(
        recipe=recipe, model=cfg.model.name, params=params, node_type=node.name, gpu=node.gpu, nodes=nodes,
        gpus_per_node=node.gpus, gpus=gpus, gpu_memory_gib=node.gpu_memory_gib,
        usable_gib=node.gpu_memory_gib * (1 - headroom), global_batch_size=t.global_batch_size,
        micro_batch_per_gpu=t.micro_batch_per_gpu, grad_accum_steps=accum, num_images=images,
        num_images_source=images_source, steps_per_epoch=steps_per_epoch, epochs=t.epochs, total_steps=total_steps,
        step_time_s=step_s, step_time_source=step_source, images_per_s=t.global_batch_size / step_s,
        epoch_hours=epoch_h, epoch_gpu_hours=epoch_h * gpus, total_hours=total_h, total_gpu_hours=total_h * gpus,
        mfu=t.global_batch_size / step_s * 3 * gflops_fwd * 1e9 / (gpus * H100_DENSE_BF16_TFLOPS * 1e12),
        zero_stage=t.zero_stage, weights=weights, activation_checkpointing=cfg.model.activation_checkpointing,
        memory=memory, host_memory_per_node_gib=memory[t.zero_stage].host_bytes * node.gpus / GiB,
        host_memory_gib=node.host_memory_gib, notes=tuple(notes),
    )  # fmt: skip
    _refuse_unless_it_fits(plan, cfg, node, headroom)
    return plan


def _check_inputs(cfg: TrainRunConfig, efficiency: float, headroom: float) -> None:
    from fractalgen.models import MODEL_CONFIGS  # deferred: heavy import

    if cfg.cluster.gpus_per_worker < 1:
        raise PlanRefused(
            "cluster.gpus_per_worker is 0: this recipe trains on CPUs; plan a GPU run with "
            "--set cluster.gpus_per_worker=1"
        )
    if cfg.model.name not in MODEL_CONFIGS:
        raise PlanRefused(
            f"model.name: unknown model {cfg.model.name!r}; registered: {', '.join(sorted(MODEL_CONFIGS))}"
        )
    if not 0 < efficiency <= 1:
        raise PlanRefused(f"--efficiency must lie in (0, 1], got {efficiency}")
    if not 0 <= headroom < 1:
        raise PlanRefused(f"--headroom must lie in [0, 1), got {headroom}")


def _shape(cfg: TrainRunConfig, node: NodeType, nodes: int | None, notes: list[str]) -> tuple[int, int, int]:
    """(nodes, GPUs, accumulation steps): the recipe's worker count, or ``nodes`` full nodes."""
    t, c = cfg.train, cfg.cluster
    if nodes is None:
        gpus = c.num_workers
        nodes = math.ceil(gpus / node.gpus)
        if gpus % node.gpus:
            notes.append(f"{gpus} workers leave {nodes * node.gpus - gpus} GPU(s) of the last node idle")
    else:
        if nodes < 1:
            raise PlanRefused(f"--nodes must be >= 1, got {nodes}")
        gpus = nodes * node.gpus
        if gpus != c.num_workers:
            notes.append(
                f"the recipe's cluster.num_workers={c.num_workers} becomes {gpus}: "
                f"submit with --set cluster.num_workers={gpus}"
            )
    per_step = t.micro_batch_per_gpu * gpus
    if t.global_batch_size % per_step:
        divisors = [
            n * node.gpus
            for n in range(1, 65)
            if t.global_batch_size % (t.micro_batch_per_gpu * n * node.gpus) == 0
        ]
        raise PlanRefused(
            f"train.global_batch_size {t.global_batch_size} does not split over {gpus} GPUs x "
            f"micro-batch {t.micro_batch_per_gpu} (= {per_step} images per micro-step): it must be a "
            f"multiple of micro_batch_per_gpu x GPUs. GPU counts that work at this micro-batch: "
            f"{', '.join(map(str, divisors[:8])) or 'none'}; or change train.micro_batch_per_gpu"
        )
    return nodes, gpus, t.global_batch_size // per_step


def _step_time(
    cfg: TrainRunConfig,
    accum: int,
    efficiency: float,
    gflops_fwd: float,
    step_time: float | None,
    notes: list[str],
) -> tuple[float, str]:
    """Seconds per step and where the number comes from: ``--step-time``, else the reference."""
    from fractalgen.models import get_config  # deferred: heavy import
    from fractalgen.models.inspect import level_costs  # deferred: heavy import

    if step_time is not None:
        if step_time <= 0:
            raise PlanRefused(f"--step-time must be > 0, got {step_time}")
        return step_time, "--step-time"
    gflops = {}
    for name in {r.model for r in REFERENCE_STEPS} | {cfg.model.name}:
        gflops[name] = (
            sum(r.gflops for r in level_costs(get_config(name))) if name != cfg.model.name else gflops_fwd
        )
    found = reference_micro_step(
        cfg.model.name, cfg.train.micro_batch_per_gpu, cfg.model.activation_checkpointing, gflops
    )
    if found is None:
        raise PlanRefused(f"no measured step time for {cfg.model.name}; pass --step-time SECONDS")
    micro_s, source = found
    source += f"; x {accum} micro-steps" + (f" / efficiency {efficiency:g}" if efficiency != 1 else "")
    notes.append(
        "step time from the released code's reference measurements (docs/performance.md), not this platform's"
    )
    return accum * micro_s / efficiency, source


def _memory_table(
    final: TrainRunConfig, model_cfg: Any, params: int, largest_block: int, weights: Weights
) -> tuple[MemoryEstimate, ...]:
    """Memory per GPU at ZeRO stages 0..3 for the recipe ``final`` (its worker count set)."""
    from fractalgen.platform.training.engine import deepspeed_config  # deferred: heavy import

    t = final.train
    bucket = int(
        deepspeed_config(final, use_gpu=True)["zero_optimization"].get("reduce_bucket_size", 50_000_000)
    )
    acts = activation_bytes(
        model_cfg,
        t.micro_batch_per_gpu,
        checkpointing=final.model.activation_checkpointing,
        precision=t.precision,
    )
    return tuple(
        memory_per_gpu(
            params=params,
            largest_block_params=largest_block,
            gpus=final.cluster.num_workers,
            stage=stage,
            activations=acts,
            weights=weights,
            precision=t.precision,
            offload_optimizer=t.offload_optimizer,
            offload_params=t.offload_params,
            reduce_bucket_size=bucket,
        )
        for stage in range(4)
    )


def _refuse_unless_it_fits(plan: ClusterPlan, cfg: TrainRunConfig, node: NodeType, headroom: float) -> None:
    """``PlanRefused`` (with ``.plan``) when the recipe's stage does not fit GPU or host memory."""
    t = cfg.train
    err = None
    if not plan.fits(t.zero_stage):
        fitting = [s for s in range(4) if plan.fits(s)]
        hints = []
        if fitting:
            hints.append(f"ZeRO stage(s) that fit: {', '.join(map(str, fitting))} (--set train.zero_stage=N)")
        if not cfg.model.activation_checkpointing:
            hints.append("turn on activation checkpointing (--set model.activation_checkpointing=true)")
        hints.append("lower train.micro_batch_per_gpu (more accumulation steps, same global batch)")
        err = PlanRefused(
            f"does not fit: ZeRO stage {t.zero_stage} needs about {plan.recipe_memory.total / GiB:.1f} GiB per GPU, "
            f"more than the {plan.usable_gib:.1f} GiB usable of {node.gpu} ({node.gpu_memory_gib:g} GiB less "
            f"{headroom:.0%} headroom). Options: " + "; ".join(hints)
        )
    elif plan.host_memory_per_node_gib > 0.9 * node.host_memory_gib:
        err = PlanRefused(
            f"does not fit: offloaded state needs about {plan.host_memory_per_node_gib:.0f} GiB of host memory per "
            f"node, more than 90% of {node.name}'s {node.host_memory_gib:g} GiB"
        )
    if err is not None:
        err.plan = plan  # type: ignore[attr-defined]
        raise err


# ----------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------


def _duration(hours: float) -> str:
    if hours >= 48:
        return f"{hours / 24:.1f} days"
    if hours >= 1:
        return f"{int(hours)}h {round((hours % 1) * 60):02d}m"
    return f"{hours * 60:.1f} min"


def format_plan(plan: ClusterPlan) -> str:
    """The human-readable plan: the run's numbers, then memory per GPU for each ZeRO stage."""
    p = plan
    lines = [
        f"plan for {p.recipe}: {p.model} ({p.params / 1e6:.1f}M parameters) on {p.nodes} x {p.node_type}",
        f"  GPUs               {p.gpus} ({p.nodes} node(s) x {p.gpus_per_node} {p.gpu}; one Ray Train worker per GPU)",
        f"  global batch       {p.global_batch_size} = {p.micro_batch_per_gpu} per GPU x {p.gpus} GPUs x "
        f"{p.grad_accum_steps} accumulation step(s)",
        f"  dataset            {p.num_images:,} images ({p.num_images_source})",
        f"  steps per epoch    {p.steps_per_epoch:,}; {p.epochs:g} epochs = {p.total_steps:,} steps",
        f"  step time          {p.step_time_s:.3f} s ({p.step_time_source})",
        f"  throughput         {p.images_per_s:,.0f} img/s ({p.images_per_s / p.gpus:.1f} per GPU; "
        f"MFU {p.mfu:.1%} of {H100_DENSE_BF16_TFLOPS:g} TFLOP/s)",
        f"  time per epoch     {_duration(p.epoch_hours)}  ({p.epoch_gpu_hours:,.1f} GPU-hours)",
        f"  whole run          {_duration(p.total_hours)}  ({p.total_gpu_hours:,.0f} GPU-hours)",
        "",
        f"memory per GPU, GiB (estimated peak; fits when <= {p.usable_gib:.1f} GiB usable of {p.gpu_memory_gib:g}); "
        f"weights {p.weights}, activation checkpointing {'on' if p.activation_checkpointing else 'off'}:",
        f"  {'ZeRO':<6}{'weights':>9}{'grads':>8}{'optim.':>8}{'autocast':>9}{'buffers':>9}{'activ.':>8}"
        f"{'other':>7}{'total':>8}{'host/node':>11}  fits",
    ]
    for m in p.memory:
        mark = "*" if m.stage == p.zero_stage else " "
        lines.append(
            f"  {m.stage}{mark:<5}{m.weights / GiB:>9.1f}{m.gradients / GiB:>8.1f}{m.optimizer / GiB:>8.1f}"
            f"{m.autocast_copy / GiB:>9.1f}{m.zero_buffers / GiB:>9.1f}{m.activations / GiB:>8.1f}"
            f"{m.constant / GiB:>7.1f}{m.total / GiB:>8.1f}{m.host_bytes * p.gpus_per_node / GiB:>11.1f}  "
            f"{'yes' if p.fits(m.stage) else 'NO'}"
        )
    lines.append("  * the recipe's train.zero_stage (offload settings apply where the stage allows them)")
    for note in p.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)

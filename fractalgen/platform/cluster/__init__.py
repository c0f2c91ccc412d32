"""Cluster planning (``fractalgen cluster plan``): what a training recipe needs from a GPU cluster
before renting one. ``plan`` turns a recipe and a node type into GPUs, batch split, step and epoch
times, GPU-hours and the fit per ZeRO stage (``make_plan``, ``format_plan``), and holds the names
the infrastructure files share (``IMAGE``, ``ENTRYPOINT``, ``NODE_TYPES``); ``memory`` is the
model of peak memory per GPU it uses (model states, ZeRO buffers, activations per level)."""

from fractalgen.platform.cluster.memory import (
    GiB,
    MemoryEstimate,
    activation_bytes,
    level_loads,
    mar_down_fraction,
    memory_per_gpu,
    state_bytes_per_param,
)
from fractalgen.platform.cluster.plan import (
    DEFAULT_NODE_TYPE,
    ENTRYPOINT,
    IMAGE,
    IMAGE_REPOSITORY,
    NODE_TYPES,
    REFERENCE_STEPS,
    ClusterPlan,
    NodeType,
    PlanRefused,
    format_plan,
    make_plan,
    reference_micro_step,
)

__all__ = [
    "DEFAULT_NODE_TYPE", "ENTRYPOINT", "IMAGE", "IMAGE_REPOSITORY", "NODE_TYPES", "REFERENCE_STEPS", "ClusterPlan",
    "GiB", "MemoryEstimate", "NodeType", "PlanRefused", "activation_bytes", "format_plan", "level_loads",
    "make_plan", "mar_down_fraction", "memory_per_gpu", "reference_micro_step", "state_bytes_per_param",
]  # fmt: skip

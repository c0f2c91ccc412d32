"""The memory model of a cluster plan: the peak memory per GPU of a training recipe, per ZeRO stage.

Memory per GPU (GiB = 2^30 bytes), an estimate of the peak PyTorch allocates on one GPU:
``model states + ZeRO buffers + activations + 1 GiB`` (cuBLAS workspaces, pinned batches, misc.).

Model states for Psi parameters over N data-parallel GPUs (the ZeRO paper's accounting, Rajbhandari
et al. 2020, section 3, with the bytes of this platform's engine):
- ``--weights fp32`` (default; what ``fractalgen.platform.training.engine`` runs: bf16 *autocast* over fp32
  weights, the weights being Adam's master copy): weights 4 Psi, gradients 4 Psi, Adam m and v 8 Psi,
  plus the bf16 copies autocast makes of the weights for the matmuls, 2 Psi.
- ``--weights bf16`` (DeepSpeed's bf16 mode, the ZeRO paper's mixed precision): weights 2 Psi,
  gradients 2 Psi, optimizer 12 Psi (fp32 master, m, v).
- ZeRO stage 1 divides the optimizer term by N, stage 2 also the gradients, stage 3 also the weights
  (and the autocast copies), plus the gathered working set of the two largest blocks in fp32;
  stages 1-3 add DeepSpeed's reduce buckets (``reduce_bucket_size`` of the engine, 2 buffers, fp32).
- ``train.offload_optimizer`` moves the optimizer term to host memory, ``train.offload_params``
  (stage 3) the weights; host memory per node = GPUs per node x that.

Activations per micro-batch of b images, derived from the level configs (``fractalgen.models``):
- level l (the transformer levels, then the pixel head) runs s_l sequences of T_l tokens per image,
  width D, B blocks, a heads: s_0 = 1, s_{l+1} = s_l x L_l x rho_l, where L_l is the level's patch
  count and rho_l the expected fraction passed down: E[ceil(L r)] / L for MAR levels with the mask
  rate r ~ TN(1, 0.25) on [0, 1] (0.80 at L = 256, 0.83 at L = 16), 1 for AR levels. T_l = L_l + 5
  conditions (+1 guiding pixel) for MAR, L_l for AR, 4 for the pixel head. n_l = s_l T_l tokens.
- one block's activations per token, in bytes: ``F = 38 D + 9 a T`` (Korthikanti et al. 2022's
  34 D for a 16-bit transformer block, + 4 D for the fp32 residual stream the norms keep under
  autocast; attention 9 bytes per score: 16-bit scores, fp32 softmax, dropout mask, dropped probs).
- saved for backward by level l per image: ``n_l B F`` without activation checkpointing, ``n_l B 4 D``
  with it (each block keeps only its fp32 input); plus ``26 D n_l`` outside the blocks (embeddings,
  norms, the five neighbour conditions passed down) and, for the pixel head, two fp32 copies of the
  3 x 256 logits per pixel.
- backward runs from the pixel head up, freeing each level's tensors, and with checkpointing
  recomputes one block at a time, so the peak is ``b x max_l (sum of saved_k for k <= l, top
  level first, + (n_l F when checkpointing))``. ``precision: fp32`` doubles it (rough).

Calibration: with these constants the formula reproduces the measured peaks of the released code
(docs/performance.md#reference-measurements: fp16 autocast + GradScaler, AdamW, one H100; model
states 16 Psi + 2 Psi autocast copies, as
``--weights fp32`` at stage 0) to within 6%: fractalmar_in64 b=8 no checkpointing 20.5 GiB
(measured 19.6), b=64 checkpointing 25.8 (27.2); fractalar_in64 b=8 21.0 (21.9);
fractalmar_base_in256 b=32 checkpointing 46.6 (47.1); fractalmar_large_in256 b=32 checkpointing
58.9 (57.4); and it puts fractalmar_huge_in256 b=32 (75.3) and fractalmar_in64 b=64 without
checkpointing (106) over the limit, where the reference ran out of memory. This platform's kernels
(SDPA/flash at the top level, bf16) need less, so the estimate is conservative for it. A shape fits
when the estimate is at most ``(1 - headroom)`` x GPU memory (default headroom 8%: CUDA context,
allocator fragmentation, the calibration's error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

GiB = float(1 << 30)

# Bytes per activation element are fitted for the 16-bit regime (see the module docstring).
_BLOCK_BYTES_PER_DIM = 38  # F = 38 D + 9 a T per token per block
_ATTN_BYTES_PER_SCORE = 9
_CKPT_BYTES_PER_DIM = 4  # fp32 block input kept per token per block under checkpointing
_OUTSIDE_BLOCKS_BYTES_PER_DIM = 26
_LOGIT_COPIES = 2  # fp32 pixel-head logits kept for the cross-entropy backward
_CONSTANT_GIB = 1.0
_MASK_MEAN, _MASK_STD, _MASK_LO_STD = 1.0, 0.25, -4.0  # fractalgen.models.mar: r ~ TN(1, .25) on [0, 1]

Weights = Literal["fp32", "bf16"]


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def mar_down_fraction(seq_len: int) -> float:
    """rho = E[max(1, ceil(L r))] / L for r ~ TN(1, 0.25) truncated to [0, 1] (MAR training masks).

    Exact: E[ceil(L r)] = sum_k P(L r > k - 1) for k = 1..L, and P(r > x) has a closed form.
    """
    z_lo = _MASK_LO_STD
    mass = _phi(0.0) - _phi(z_lo)
    expected = 0.0
    for k in range(1, seq_len + 1):
        x = (k - 1) / seq_len  # P(r > x), x in [0, 1)
        z = max(z_lo, (x - _MASK_MEAN) / _MASK_STD)
        expected += (_phi(0.0) - _phi(z)) / mass
    return max(1.0, expected) / seq_len


@dataclass(frozen=True)
class LevelLoad:
    """What one level runs per image during training (expected values under MAR masking)."""

    name: str  # g1, g2, ... as in ``fractalgen inspect``; the pixel head last
    sequences: float  # s_l
    tokens_per_sequence: int  # T_l
    width: int
    blocks: int
    heads: int

    @property
    def tokens(self) -> float:
        return self.sequences * self.tokens_per_sequence

    def block_bytes_per_token(self) -> float:
        return (
            _BLOCK_BYTES_PER_DIM * self.width + _ATTN_BYTES_PER_SCORE * self.heads * self.tokens_per_sequence
        )


def level_loads(model_cfg: Any) -> list[LevelLoad]:
    """Per level: sequences per image, tokens per sequence, width, blocks, heads."""
    loads: list[LevelLoad] = []
    sequences = 1.0
    for lvl in range(model_cfg.num_levels):
        L = model_cfg.seq_len(lvl)
        if model_cfg.generators[lvl] == "mar":
            T = L + model_cfg.num_conds + (1 if model_cfg.guiding_pixel else 0)
            rho = mar_down_fraction(L)
        else:
            T, rho = L, 1.0  # AR: condition + the first L - 1 patches; every patch goes down
        loads.append(
            LevelLoad(
                f"g{lvl + 1}",
                sequences,
                T,
                model_cfg.widths[lvl],
                model_cfg.blocks[lvl],
                model_cfg.heads[lvl],
            )
        )
        sequences *= L * rho
    loads.append(
        LevelLoad(
            f"g{model_cfg.num_levels + 1}",
            sequences,
            4,
            model_cfg.widths[-1],
            model_cfg.blocks[-1],
            model_cfg.heads[-1],
        )
    )
    return loads


def activation_bytes(
    model_cfg: Any, micro_batch: int, *, checkpointing: bool, precision: str = "bf16"
) -> float:
    """Peak activation bytes of one micro-batch (module docstring: the formula and its calibration)."""
    loads = level_loads(model_cfg)
    peak = saved = 0.0
    for i, lv in enumerate(loads):
        F = lv.block_bytes_per_token()
        if checkpointing:
            level_saved = lv.tokens * lv.blocks * _CKPT_BYTES_PER_DIM * lv.width
            recompute = lv.tokens * F
        else:
            level_saved = lv.tokens * lv.blocks * F
            recompute = 0.0
        level_saved += _OUTSIDE_BLOCKS_BYTES_PER_DIM * lv.width * lv.tokens
        if i == len(loads) - 1:  # pixel head: fp32 logits, 3 channels x 256 values per pixel
            level_saved += _LOGIT_COPIES * lv.sequences * 3 * 256 * 4
        saved += level_saved
        peak = max(peak, saved + recompute)
    scale = 2.0 if precision == "fp32" else 1.0
    return scale * micro_batch * peak


# ----------------------------------------------------------------------------------------------------
# model states
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU at one ZeRO stage; ``host_bytes`` is what offload puts in host memory per GPU."""

    stage: int
    weights: float
    gradients: float
    optimizer: float
    autocast_copy: float
    zero_buffers: float
    activations: float
    constant: float
    host_bytes: float

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.autocast_copy
            + self.zero_buffers
            + self.activations
            + self.constant
        )


def state_bytes_per_param(weights: Weights, precision: str) -> tuple[int, int, int, int]:
    """(weights, gradients, optimizer, autocast copy) bytes per parameter."""
    if precision == "fp32":
        return 4, 4, 8, 0
    if weights == "bf16":
        return 2, 2, 12, 0  # DeepSpeed bf16 mode: the ZeRO paper's 2 + 2 + K=12
    return 4, 4, 8, 2  # this engine: fp32 weights (Adam's master copy), bf16 autocast copies


def memory_per_gpu(
    *,
    params: int,
    largest_block_params: int,
    gpus: int,
    stage: int,
    activations: float,
    weights: Weights = "fp32",
    precision: str = "bf16",
    offload_optimizer: bool = False,
    offload_params: bool = False,
    reduce_bucket_size: int = 50_000_000,
) -> MemoryEstimate:
    """The ZeRO accounting of the module docstring for one stage (offload only where it applies)."""
    w, g, k, a = state_bytes_per_param(weights, precision)
    n = max(1, gpus)
    weight_b, grad_b, opt_b, copy_b = w * params, g * params, k * params, a * params
    if stage >= 1:
        opt_b /= n
    if stage >= 2:
        grad_b /= n
    buffers = 0.0
    if stage >= 1:
        buffers += 2 * reduce_bucket_size * 4
    if stage == 3:
        weight_b /= n
        copy_b /= n
        buffers += 2 * largest_block_params * 4  # gathered blocks (current + prefetched), fp32
    host = 0.0
    if offload_optimizer and stage >= 1:
        host += opt_b
        opt_b = 0.0
    if offload_params and stage == 3:
        host += weight_b
        weight_b = 0.0
    return MemoryEstimate(
        stage=stage,
        weights=weight_b,
        gradients=grad_b,
        optimizer=opt_b,
        autocast_copy=copy_b,
        zero_buffers=buffers,
        activations=activations,
        constant=_CONSTANT_GIB * GiB,
        host_bytes=host,
    )

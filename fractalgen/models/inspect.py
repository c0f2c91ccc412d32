"""Per-level cost of a configuration: the paper's Table 1, computed from the config.

FLOPs are forward FLOPs during training at batch size 1, counting every patch at every level (no
masking), 2 FLOPs per multiply-add, as the paper's Table 1 does:
- a transformer level with N sequences of T = seq_len tokens, width D, depth B and MLP hidden H:
  ``2*N*T*B*(4*D^2 + M) + 4*N*B*T^2*D`` (projections + attention scores and weighted sum), with
  M = 2*D*4D for the ViT MLP and 3*D*H for the SwiGLU of AR levels,
- plus the patch embedding ``2*N*T*(3p^2)*D`` and condition embedding ``2*N*C*D_prev*D``,
- the pixel head counts T = 3 (the R, G, B outputs) and its condition projection.
Guiding-pixel heads are small and not counted (as in the paper). The table reproduces Table 1
for fractalmar_large_in256 (215 / 208 / 419 / 22 GFLOPs) within 1% for the three transformer levels
and the total, and the pixel-head row (21.6 against 22) within 2%.

``fractalgen inspect NAME`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fractalgen.models.configs import FractalConfig
from fractalgen.models.layers import swiglu_hidden


@dataclass(frozen=True)
class LevelCost:
    name: str  # g1, g2, ... as in the paper
    kind: str  # mar / ar / pixel
    seq_len: str  # "16x16", "4x4" or "3"
    sequences: int  # sequences of this level per image
    layers: int
    width: int
    params: int  # every parameter of the level (embeddings, guiding-pixel head included)
    block_params: int  # transformer blocks only: the paper's Table 1 "#params" column
    gflops: float


def _count(module: torch.nn.Module, exclude: torch.nn.Module | None = None) -> int:
    skip = {id(p) for p in exclude.parameters()} if exclude is not None else set()
    return sum(p.numel() for p in module.parameters() if id(p) not in skip)


def level_costs(config: FractalConfig) -> list[LevelCost]:
    """One row per level (the pixel head last); params from a meta-device build of the model."""
    from fractalgen.models.fractal import FractalGen  # deferred: heavy import

    with torch.device("meta"):
        model = FractalGen(config)
    rows: list[LevelCost] = []
    node: torch.nn.Module = model
    sequences = 1
    for lvl in range(config.num_levels):
        D, B, T = config.widths[lvl], config.blocks[lvl], config.seq_len(lvl)
        p = config.img_sizes[lvl + 1]
        d_prev = config.widths[lvl - 1] if lvl > 0 else config.widths[0]
        kind = config.generators[lvl]
        # MLP matrices: SwiGLU has three (w1, w3: D->H, w2: H->D), the ViT MLP two (D->4D->D)
        mlp = 3 * D * swiglu_hidden(D) if kind == "ar" else 2 * D * 4 * D
        conds = 1 if kind == "ar" else config.num_conds
        flops = 2 * sequences * T * B * (4 * D * D + mlp)  # projections
        flops += 4 * sequences * B * T * T * D  # attention
        flops += 2 * sequences * T * 3 * p * p * D + 2 * sequences * conds * d_prev * D  # embeddings
        params = _count(node, exclude=node.next_fractal)  # type: ignore[arg-type]
        block_params = _count(node.generator.blocks)  # type: ignore[union-attr, arg-type]
        grid = int(round(T**0.5))
        rows.append(
            LevelCost(
                f"g{lvl + 1}", kind, f"{grid}x{grid}", sequences, B, D, params, block_params, flops / 1e9
            )
        )
        sequences *= T
        node = node.next_fractal  # type: ignore[assignment]
    # pixel head: T = 3 outputs, MLP ratio 4, plus the condition projection
    W, B = config.widths[-1], config.blocks[-1]
    flops = 2 * sequences * 3 * B * 12 * W * W + 4 * sequences * B * 9 * W
    flops += 2 * sequences * config.widths[-2] * W
    rows.append(
        LevelCost(
            f"g{config.num_levels + 1}", "pixel", "3", sequences, B, W, _count(node),
            _count(node.blocks), flops / 1e9,  # type: ignore[arg-type]
        )
    )  # fmt: skip
    return rows


def format_table(name: str, config: FractalConfig) -> str:
    rows = level_costs(config)
    total_params = sum(r.params for r in rows)
    total_flops = sum(r.gflops for r in rows)
    lines = [
        f"{name}: {config.img_size}x{config.img_size}x3, levels {list(config.img_sizes)}, "
        f"generators {list(config.generators)}, classes {config.num_classes}",
        f"{'level':<6}{'type':<7}{'seq. len.':>10}{'seqs/img':>10}{'#layers':>9}{'hidden':>8}"
        f"{'#params':>12}{'(blocks)':>11}{'GFLOPs':>10}",
    ]
    for r in rows:
        lines.append(
            f"{r.name:<6}{r.kind:<7}{r.seq_len:>10}{r.sequences:>10}{r.layers:>9}{r.width:>8}"
            f"{_fmt_params(r.params):>12}{_fmt_params(r.block_params):>11}{_fmt_gflops(r.gflops):>10}"
        )
    total_blocks = sum(r.block_params for r in rows)
    lines.append(
        f"{'total':<50}{_fmt_params(total_params):>12}{_fmt_params(total_blocks):>11}{_fmt_gflops(total_flops):>10}"
    )
    lines.append(
        "#params: all parameters of the level; (blocks): transformer blocks only, as the paper's Table 1 "
        "counts them.\nGFLOPs: forward pass during training at batch size 1 (Table 1); training is ~3x."
    )
    return "\n".join(lines)


def _fmt_gflops(g: float) -> str:
    return f"{g:.1f}" if g >= 1 else f"{g:.3g}"


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e6:.2f}M"

"""Draws docs/images/guidance_schedules.png: the guidance weight of each schedule over the top
level's steps (docs/model.md#guidance-schedules). Run: ``python docs/plot_guidance_schedules.py``."""

from __future__ import annotations

import math
from pathlib import Path

from fractalgen.sampling_settings import parse_schedule

SPECS = ["constant", "linear", "cosine", "power-cosine:exponent=3", "interval:start=0.25,end=0.75"]


def mar_done(seq_len: int, steps: int) -> list[int]:
    """Patches generated after each step of a MAR level (the released cosine masking schedule)."""
    done, masked = [], seq_len
    for step in range(steps):
        scheduled = math.floor(seq_len * math.cos(math.pi / 2.0 * (step + 1) / steps))
        count = max(min(masked - 1, scheduled), 1)  # as fractalgen/models/mar.py counts it
        done.append(seq_len - count)
        masked = 0 if step == steps - 1 else count
    return done


def main(out: Path = Path(__file__).parent / "images" / "guidance_schedules.png") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, seq_len, steps = 4.0, 256, 64  # a 64x64 model's top level: 256 patches in 64 steps
    done = mar_done(seq_len, steps)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for spec in SPECS:
        schedule = parse_schedule(spec)
        weights = [schedule.weight(cfg, d, seq_len, i, steps) for i, d in enumerate(done)]
        ax.step(range(1, steps + 1), weights, where="post", label=spec)
    ax.set_xlabel(f"top-level step (of {steps}; {seq_len} patches, cosine masking)")
    ax.set_ylabel(f"guidance weight (cfg = {cfg:g})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(main())

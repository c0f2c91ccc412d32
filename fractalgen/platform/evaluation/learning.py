"""Evidence that a training run learned: do class-conditional samples carry their class's colours,
and did bits/dim fall? Plus the two pictures that show it (``fractalgen demo`` writes and logs them).

Terms:
- *colour histogram*: the joint RGB histogram of an image with ``bins`` levels per channel
  (``bins**3`` cells), normalised to sum 1.
- *class profile*: the mean colour histogram of a class's reference (training) images.
- *nearest class* of an image: the class whose profile is at the smallest L1 distance from the
  image's histogram.
- *own-class share*: the fraction of generated images whose nearest class is the class they were
  sampled for. Samples that ignore their label score about chance, ``1 / num_classes``.
- *learned*: the own-class share is at least ``min_share(num_classes)`` (3x chance, or halfway from
  chance to 1 when that is lower) and bits/dim fell from the start of training to its end.

The check is NumPy on (N, 3, S, S) images in [0, 1] (what ``FractalGen.sample`` returns and
``evaluation.data.read_labelled_images`` reads); the figures use PIL and matplotlib.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fractalgen.platform.images import auto_scale, make_grid

DEFAULT_BINS = 4


def colour_histograms(images: torch.Tensor | np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """(N, 3, S, S) RGB in [0, 1] -> (N, bins**3) joint colour histograms, each summing to 1."""
    x = images.detach().cpu().float().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, S, S), got shape {x.shape}")
    levels = np.clip((x * bins).astype(np.int64), 0, bins - 1)  # (N, 3, S, S)
    cells = (levels[:, 0] * bins + levels[:, 1]) * bins + levels[:, 2]  # (N, S, S)
    flat = cells.reshape(len(x), -1)
    counts = np.zeros((len(x), bins**3), dtype=np.float64)
    np.add.at(counts, (np.arange(len(x))[:, None], flat), 1.0)
    return counts / max(flat.shape[1], 1)


def class_profiles(
    references: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    num_classes: int,
    bins: int = DEFAULT_BINS,
) -> np.ndarray:
    """(num_classes, bins**3): the mean colour histogram of each class's reference images."""
    hist = colour_histograms(references, bins)
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    missing = [c for c in range(num_classes) if not np.any(y == c)]
    if missing:
        raise ValueError(f"no reference images for classes {missing}")
    return np.stack([hist[y == c].mean(axis=0) for c in range(num_classes)])


def nearest_classes(images: torch.Tensor | np.ndarray, profiles: np.ndarray) -> np.ndarray:
    """(N,) the class whose profile is nearest (L1) to each image's colour histogram."""
    bins = round(profiles.shape[1] ** (1 / 3))
    hist = colour_histograms(images, bins)
    return np.abs(hist[:, None, :] - profiles[None, :, :]).sum(axis=-1).argmin(axis=1)


def own_class_share(
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    profiles: np.ndarray,
) -> float:
    """Fraction of ``images`` (sampled for ``labels``) whose nearest class is their own."""
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    if len(y) != len(images) or len(y) == 0:
        raise ValueError(f"need one label per image and at least one image, got {len(y)} for {len(images)}")
    return float(np.mean(nearest_classes(images, profiles) == y))


def min_share(num_classes: int) -> float:
    """The own-class share that counts as learned: 3x chance (1/num_classes), or halfway from chance
    to 1 when that is lower (few classes). With 8 classes and 48 samples, label-blind samples reach
    3x chance (18 of 48) with probability about 1e-5 (binomial)."""
    chance = 1.0 / num_classes
    return min(3.0 * chance, chance + 0.5 * (1.0 - chance))


@dataclass(frozen=True)
class LearningCheck:
    """Own-class share of the samples before and after training, and bits/dim at both ends."""

    num_classes: int
    num_images: int  # generated images per check (the same labels and seed before and after)
    share_before: float
    share_after: float
    bpd_before: float
    bpd_after: float

    @property
    def chance(self) -> float:
        return 1.0 / self.num_classes

    @property
    def learned(self) -> bool:
        """Samples name their class (share >= ``min_share``) and bits/dim fell."""
        return self.share_after >= min_share(self.num_classes) and self.bpd_after < self.bpd_before

    def metrics(self) -> dict[str, float]:
        """For MLflow: ``learning.*`` keys."""
        return {
            "learning.own_class_share_before": self.share_before,
            "learning.own_class_share": self.share_after,
            "learning.chance": self.chance,
            "learning.nll_bpd_before": self.bpd_before,
            "learning.nll_bpd": self.bpd_after,
            "learning.learned": float(self.learned),
        }

    def describe(self) -> str:
        """One line: the share against chance, bits/dim start -> end, the verdict."""
        n = self.num_images
        verdict = "learned" if self.learned else "NOT learned yet"
        return (
            f"{round(self.share_after * n)}/{n} samples nearest their own class by colour "
            f"({self.share_after:.0%}, {self.share_before:.0%} before training, chance {self.chance:.0%}); "
            f"bits/dim {self.bpd_before:.2f} -> {self.bpd_after:.2f}: {verdict}"
        )


# ------------------------------------------------------------------------------------ figures
def labelled_grid(
    images: torch.Tensor,
    class_names: Sequence[str],
    *,
    per_class: int,
    title: str,
    scale: int | None = None,
) -> Any:
    """PIL image: one row per class (``images`` class-major, ``per_class`` each), scaled up
    (nearest neighbour, ``auto_scale`` by default), the class name under each row, a title on top."""
    from PIL import Image, ImageDraw, ImageFont  # deferred: heavy import

    size = images.size(-1)
    scale = scale or auto_scale(size)
    font = ImageFont.load_default()
    text_h = 14
    rows = []
    for c, name in enumerate(class_names):
        row = make_grid(images[c * per_class : (c + 1) * per_class], ncols=per_class, pad=1)
        arr = (row.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        tile = Image.fromarray(arr)
        rows.append((tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST), name))
    width = max(t.width for t, _ in rows)
    canvas = Image.new("RGB", (width, text_h + 4 + sum(t.height + text_h for t, _ in rows)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill="black", font=font)
    y = text_h + 4
    for tile, name in rows:
        canvas.paste(tile, (0, y))
        y += tile.height
        draw.text((4, y), name, fill="black", font=font)
        y += text_h
    return canvas


def side_by_side(panels: Sequence[Any], gap: int = 16) -> Any:
    """PIL images next to each other on white, top-aligned."""
    from PIL import Image  # deferred: heavy import

    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + gap
    return canvas


def learning_curve_png(
    steps: Sequence[int],
    bpd: Sequence[float],
    *,
    evaluated: Sequence[tuple[int, float]] = (),
    title: str = "training",
) -> bytes:
    """PNG of the training loss in bits/dim over the steps (the worker's ``bpd`` metric) and, as
    markers, ``evaluated`` (step, bits/dim) points: the NLL of the weights at those steps."""
    from matplotlib.figure import (
        Figure,
    )  # deferred: heavy import # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    ax = fig.add_subplot()
    ax.plot(list(steps), list(bpd), marker=".", label="training loss (mean since the previous point)")
    if evaluated:
        xs, ys = zip(*evaluated, strict=True)
        ax.plot(xs, ys, "o", color="tab:red", label="NLL of the weights (fractalgen eval nll)")
        for x, y in evaluated:
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(6, 2), color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("bits/dim (all levels' terms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()

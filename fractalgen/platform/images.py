"""Images for people: PNG files and grids (nearest-neighbour upscaled for small sizes)."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


def save_png(image01: Tensor, path: str | os.PathLike[str], scale: int = 1) -> None:
    """(3, S, S) in [0, 1] -> PNG (nearest-neighbour upscaled by ``scale``)."""
    from PIL import Image

    arr = (image01.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def make_grid(images01: Tensor, ncols: int | None = None, pad: int = 1) -> Tensor:
    """(N, 3, S, S) -> (3, H, W) grid with ``pad`` white pixels between images."""
    import torchvision.utils as vutils

    n = images01.size(0)
    ncols = ncols or max(1, math.ceil(math.sqrt(n)))
    return vutils.make_grid(images01, nrow=ncols, padding=pad, pad_value=1.0)


def auto_scale(size: int) -> int:
    """Upscale factor for viewing small images (16 px -> 8, 32 -> 4, 64 -> 2, 128+ -> 1)."""
    return max(1, 128 // size)

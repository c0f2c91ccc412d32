"""Images for people: PNG files and grids (nearest-neighbour upscaled for small sizes).

The one grid layout of the platform (``make_grid``: torchvision's, written in torch so that a
training worker does not pay torchvision's import) and the one 8-bit conversion (``to_uint8_hwc``);
the sample grids of training runs, registered versions, ``fractalgen sample`` and the demo use them.
"""

from __future__ import annotations

import io
import math
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor


def to_uint8_hwc(image01: Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8, rounded to the nearest of the 256 levels."""
    return (image01.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def png_bytes(image01: Tensor, scale: int = 1) -> bytes:
    """(3, H, W) in [0, 1] -> PNG bytes (nearest-neighbour upscaled by ``scale``)."""
    from PIL import Image  # deferred: heavy import

    img = Image.fromarray(to_uint8_hwc(image01))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_png(image01: Tensor, path: str | os.PathLike[str], scale: int = 1) -> None:
    """(3, S, S) in [0, 1] -> PNG (nearest-neighbour upscaled by ``scale``)."""
    with open(path, "wb") as f:
        f.write(png_bytes(image01, scale))


def make_grid(images01: Tensor, ncols: int | None = None, pad: int = 1) -> Tensor:
    """(N, 3, S, S) -> (3, H, W) grid, ``pad`` white pixels between and around the images, ``ncols``
    per row (default: near-square); one image comes back as it is (torchvision's ``make_grid``)."""
    import torch  # deferred: heavy import

    n, c, h, w = images01.shape
    if n == 1:
        return images01[0]
    cols = min(n, ncols or max(1, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad, dtype=images01.dtype)
    for i in range(n):
        y, x = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        grid[:, y : y + h, x : x + w] = images01[i].to(grid.device)
    return grid


def grid_png(images01: Tensor, ncols: int | None = None, pad: int = 1, scale: int = 1) -> bytes:
    """PNG bytes of ``make_grid(images01, ncols, pad)`` upscaled by ``scale``."""
    return png_bytes(make_grid(images01.float().cpu(), ncols, pad), scale)


def auto_scale(size: int) -> int:
    """Upscale factor for viewing small images (16 px -> 8, 32 -> 4, 64 -> 2, 128+ -> 1)."""
    return max(1, 128 // size)

"""Patch bookkeeping shared by the levels.

A patch is flattened channel-first (docs/model.md#notation): vector index = c*p*p + y*p + x; grid positions
are raster order. Known-pixel masks (inpainting) are (B, S, S) booleans, True where a pixel is given.
"""

from __future__ import annotations

import torch
from torch import Tensor


def patchify(imgs: Tensor, p: int) -> Tensor:
    """(B, 3, S, S) -> (B, L, 3*p*p) with L = (S/p)**2."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
    return x.reshape(B, h * w, C * p * p)


def unpatchify(x: Tensor, p: int, channels: int = 3) -> Tensor:
    """(B, L, C*p*p) -> (B, C, S, S); inverse of ``patchify``."""
    B, L, _ = x.shape
    h = w = int(round(L**0.5))
    x = x.reshape(B, h, w, channels, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
    return x.reshape(B, channels, h * p, w * p)


def patchify_mask(mask: Tensor, p: int) -> Tensor:
    """Known-pixel mask (B, S, S) -> (B, L, p*p)."""
    return patchify(mask.unsqueeze(1), p)


def neighbour_conditions(middle: Tensor) -> Tensor:
    """Five conditions per position from the middle outputs (B, L, D) on a square grid.

    Returns (B, L, 5, D): [middle, top, right, bottom, left], each neighbour being the middle output
    of the adjacent grid position in that direction, zeros beyond the border (docs/model.md#conditions).
    """
    B, L, D = middle.shape
    g = int(round(L**0.5))
    grid = middle.reshape(B, g, g, D)  # (B, row, col, D)
    zrow = grid.new_zeros(B, 1, g, D)
    zcol = grid.new_zeros(B, g, 1, D)
    top = torch.cat([zrow, grid[:, :-1]], dim=1)  # row r sees row r-1
    bottom = torch.cat([grid[:, 1:], zrow], dim=1)  # row r sees row r+1
    right = torch.cat([grid[:, :, 1:], zcol], dim=2)  # col c sees col c+1
    left = torch.cat([zcol, grid[:, :, :-1]], dim=2)  # col c sees col c-1
    return torch.stack([grid, top, right, bottom, left], dim=3).reshape(B, L, 5, D)

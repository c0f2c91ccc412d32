"""The ADM centre crop (SPEC, "Released training recipe"), done once at preparation time.

``center_crop_arr`` is guided-diffusion's function of the same name, which the released FractalGen
training code applies to every ImageNet image: while the short side is at least twice the target,
halve the image with a BOX filter; then resize so the short side equals the target with BICUBIC;
then take the centre square. The result is a uint8 array of shape (size, size, 3).

``decode_and_crop`` decodes encoded image bytes (JPEG, PNG, ...), converts to RGB as the released
loader does (``ImageFolder`` -> ``convert("RGB")``), and crops. It raises on corrupt or truncated
data; callers skip and count such images.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM centre crop of an RGB PIL image to an (image_size, image_size, 3) uint8 array."""
    # Halving with BOX first keeps the bicubic step anti-aliased for large reductions (ADM).
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def decode_and_crop(data: bytes, image_size: int) -> np.ndarray:
    """Decode ``data``, convert to RGB and ADM-crop: (image_size, image_size, 3) uint8.

    Raises ``PIL.UnidentifiedImageError`` / ``OSError`` / ``ValueError`` for unreadable data; a
    truncated JPEG raises instead of being padded with grey (PIL's default).
    """
    with warnings.catch_warnings():
        # EXIF/ICC oddities are common in ImageNet and harmless; decompression bombs are errors.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = image.convert("RGB")
    arr = center_crop_arr(rgb, image_size)
    if arr.shape != (image_size, image_size, 3):
        raise ValueError(f"crop produced shape {arr.shape}, expected ({image_size}, {image_size}, 3)")
    return np.ascontiguousarray(arr)

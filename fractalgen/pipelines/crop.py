"""The ADM centre crop (docs/model.md#training-recipe), done once at preparation time.

``center_crop_arr`` is guided-diffusion's function of the same name, which the released FractalGen
training code applies to every ImageNet image: while the short side is at least twice the target,
halve the image with a BOX filter; then resize so the short side equals the target with BICUBIC;
then take the centre square. The result is a uint8 array of shape (size, size, 3).

``decode_and_crop`` decodes encoded image bytes (JPEG, PNG, ...), converts to 8-bit RGB
(``to_rgb8``) and crops. It raises on corrupt or truncated data, and ``UnsupportedImage`` for pixels
with no defined 8-bit meaning; callers skip and count such images.

``to_rgb8`` follows the released loader (``ImageFolder`` -> ``convert("RGB")``) for 8-bit modes
(L, P, RGBA, CMYK, YCbCr, ...; an alpha channel is dropped, as there) and scales what
``convert("RGB")`` would clip to white instead:
- 16-bit grey (``I;16``, ``I;16B``, ...; 16-bit PNG and TIFF) keeps the high byte, ``value >> 8``.
  That is what Pillow's own decoders do for 16-bit RGB, RGBA and grey+alpha PNGs (they open as
  8-bit ``RGB``/``RGBA`` holding the high bytes), so a 16-bit picture gives the same pixels whether
  it was saved as grey or as colour. (``round(value / 257)`` would differ from it by at most 1.)
- 32-bit integer (``I``) with values in 0..65535 is taken as 16-bit and scaled the same way; other
  values have no defined scale: ``UnsupportedImage``.
- 32-bit float (``F``) with finite values in 0..1 becomes ``round(value * 255)``; other values:
  ``UnsupportedImage``.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image


class UnsupportedImage(ValueError):
    """The image decodes, but its pixels have no defined 8-bit RGB meaning (the message says why)."""


SIXTEEN_BIT_MODES: tuple[str, ...] = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb8(image: Image.Image) -> Image.Image:
    """``image`` as an 8-bit RGB image (see the module docstring for each mode)."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 0xFFFF):
            raise UnsupportedImage(
                f"32-bit integer pixels in {values.min()}..{values.max()}, outside the 16-bit range "
                "0..65535: no defined 8-bit scale"
            )
        grey = (values.astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        values = np.asarray(image)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise UnsupportedImage(
                f"32-bit float pixels in {values.min()}..{values.max()}, not in 0..1: no defined 8-bit scale"
            )
        grey = np.rint(values.astype(np.float64) * 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:  # a mode Pillow cannot convert (e.g. La)
        raise UnsupportedImage(f"image mode {mode}: {err}") from None


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
    """Decode ``data``, convert to 8-bit RGB (``to_rgb8``) and ADM-crop: (image_size, image_size, 3) uint8.

    Raises ``PIL.UnidentifiedImageError`` / ``OSError`` / ``ValueError`` for unreadable data (a
    truncated JPEG raises instead of being padded with grey, PIL's default) and ``UnsupportedImage``
    for pixels without an 8-bit meaning.
    """
    with warnings.catch_warnings():
        # EXIF/ICC oddities are common in ImageNet and harmless; decompression bombs are errors.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = to_rgb8(image)
    arr = center_crop_arr(rgb, image_size)
    if arr.shape != (image_size, image_size, 3):
        raise ValueError(f"crop produced shape {arr.shape}, expected ({image_size}, {image_size}, 3)")
    return np.ascontiguousarray(arr)

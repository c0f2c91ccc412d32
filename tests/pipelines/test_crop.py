"""The ADM centre crop against an independent PIL re-computation, and decoding edge cases."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pipelines_helpers import jpeg_bytes, random_photo, reference_crop

from fractalgen.pipelines.crop import center_crop_arr, decode_and_crop


@pytest.mark.parametrize(
    ("width", "height", "size"),
    [
        (500, 375, 64),
        (375, 500, 64),
        (129, 64, 64),
        (127, 300, 64),
        (64, 64, 64),
        (40, 90, 64),
        (700, 520, 256),
        (33, 17, 16),
    ],
)
def test_center_crop_matches_reference(width: int, height: int, size: int) -> None:
    rng = np.random.default_rng(width * 1000 + height)
    data = jpeg_bytes(random_photo(rng, width, height))
    expected = reference_crop(data, size)
    got = decode_and_crop(data, size)
    assert got.shape == (size, size, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    # the halving loop matters: a direct bicubic resize gives different pixels for big reductions
    if min(width, height) >= 4 * size:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        s = size / min(img.size)
        direct = np.asarray(img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC))
        top, left = (direct.shape[0] - size) // 2, (direct.shape[1] - size) // 2
        assert not np.array_equal(direct[top : top + size, left : left + size], got)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P"])
def test_other_modes_become_rgb(mode: str) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(random_photo(rng, 50, 40)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode in ("L", "CMYK") else "PNG")
    data = buf.getvalue()
    np.testing.assert_array_equal(decode_and_crop(data, 16), reference_crop(data, 16))
    assert center_crop_arr(Image.open(io.BytesIO(data)).convert("RGB"), 16).shape == (16, 16, 3)


def test_corrupt_and_truncated_raise() -> None:
    data = jpeg_bytes(random_photo(np.random.default_rng(1), 60, 60))
    with pytest.raises(Exception):  # noqa: B017 - PIL raises UnidentifiedImageError / OSError
        decode_and_crop(b"definitely not an image", 16)
    with pytest.raises(OSError):
        decode_and_crop(data[: len(data) // 2], 16)

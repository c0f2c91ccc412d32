"""The contract between levels.

A level hands the next one, for every patch it passes down, a set of condition vectors:
- MAR levels: five, ``[middle, top, right, bottom, left]`` (docs/model.md#conditions): the transformer
  output at the patch's own position and the middle outputs of its four neighbours (zeros at the
  border);
- AR levels: one, the output that predicts the patch (teacher forcing);
- with the guiding pixel (levels > 0 of the 256 models), the patch's mean colour (normalised RGB),
  ground truth in training and the sample in generation.

``Conditions`` keeps them as one tensor ``vectors`` of shape (N, C, D) with C = 5 or 1 (index 0 is
always the middle condition) plus the optional ``pixel`` (N, 3). Selecting rows keeps the two together.

Training with mask buckets (``FractalConfig.mask_buckets``) pads each level's selection of masked
patches to a bucket size; ``valid`` (N,) bool then marks the real rows (the first ``num_valid``, a
host-side count so the next level needs no device sync) and every loss below averages over them only.

``SampleSettings`` is the state of one sampling call that travels down the recursion: whether the
batch carries the unconditional half, the temperature of the current top-level step, the filter and
the random generator. It is derived from the user-facing ``fractalgen.sampling_settings.SamplingSettings``
by ``FractalGen.sample``; it is not a second way to describe a setting.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fractalgen.sampling_settings import temperature_at


@dataclass(frozen=True)
class Conditions:
    vectors: Tensor  # (N, C, D): [middle, top, right, bottom, left] or [middle]
    pixel: Tensor | None = None  # (N, 3) guiding pixel, normalised
    valid: Tensor | None = None  # (N,) bool, mask buckets only: False for padding rows
    num_valid: int | None = None  # mask buckets only: valid rows are the first num_valid (host int)

    @property
    def middle(self) -> Tensor:
        return self.vectors[:, 0]  # (N, D)

    def __len__(self) -> int:
        return self.vectors.size(0)

    def select(self, index: Tensor) -> Conditions:
        """Rows ``index`` (a bool mask or integer index over N)."""
        return Conditions(self.vectors[index], None if self.pixel is None else self.pixel[index])

    def mean(self, values: Tensor) -> Tensor:
        """Mean of per-row values (N,) over the valid rows (all rows when there is no padding)."""
        if self.valid is None:
            return values.mean()
        weights = self.valid.to(values.dtype)
        return (values * weights).sum() / weights.sum()

    def with_pixel(self, pixel: Tensor) -> Conditions:
        return replace(self, pixel=pixel)

    @staticmethod
    def cat(parts: list[Conditions]) -> Conditions:
        pixels = [p.pixel for p in parts]
        return Conditions(
            torch.cat([p.vectors for p in parts]),
            None if any(p is None for p in pixels) else torch.cat(pixels),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class SampleSettings:
    """Sampling knobs shared by every level (docs/model.md#sampling).

    ``guided``: the batch is doubled, conditional half first and unconditional half second.
    ``temperature`` multiplies the logits (released meaning: t > 1 sharpens); ``temperature_end``
    (top level only): it ramps linearly to this over the top level's steps.
    """

    guided: bool
    temperature: float = 1.0
    filter_threshold: float = 1e-4
    generator: torch.Generator | None = None
    temperature_end: float | None = None

    def at_step(self, step: int, steps: int, *, unguided: bool = False) -> SampleSettings:
        """The settings of one step of a level: its temperature (fixed from then on, for the levels
        below) and, with ``unguided``, without the unconditional half."""
        if self.temperature_end is None and not (unguided and self.guided):
            return self
        return replace(
            self,
            temperature=temperature_at(self.temperature, self.temperature_end, step, steps),
            temperature_end=None,
            guided=self.guided and not unguided,
        )

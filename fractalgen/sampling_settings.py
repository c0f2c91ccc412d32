"""Sampling settings: the one type that says how to sample, and the schedules it holds.

Every user of sampling describes a setting with ``SamplingSettings``: ``FractalGen.sample``
(fractalgen/models/fractal.py) takes its ``sample_kwargs()``, and ``fractalgen sample``, the served
model's params, a recipe's ``eval`` section, the sweep's trials and the registry's ``sampling.*`` tags
all build or store one. What each knob computes is in docs/model.md#guidance-schedules.

*Guidance schedules* say how the guidance scale ``w`` changes over a level's steps. A step's
weight is ``1 + (w - 1) * f`` where ``f`` depends on the schedule:

- ``constant``: ``f = 1``;
- ``linear`` (released): ``f = p``, the share of the level's patches generated after the step
  (the released count: on MAR's last step it is ``(L - 1) / L``);
- ``cosine``: ``f = (1 - cos(pi p)) / 2``;
- ``power-cosine:exponent=k``: ``f = (1 - cos(pi p^k)) / 2`` (MDT's scale schedule);
- ``interval:start=a,end=b``: ``f = 1`` on the steps ``i`` of ``T`` with ``a <= i / T < b``, else
  ``0`` (guidance in a limited interval); an unguided step of the top level skips the unconditional
  half of the batch.

A schedule is written as its name with optional ``key=value`` parameters after a colon
(``power-cosine:exponent=3``), which is also how it travels in tags, params and YAML.

This module is below ``fractalgen.config`` (a recipe's ``eval`` section holds these settings) and
imports nothing from the package; it works on floats and on torch tensors alike without importing torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

TAG_PREFIX = "sampling."


def _cos(x: Any) -> Any:
    """cos of a float or of a tensor (elementwise)."""
    return x.cos() if hasattr(x, "cos") else math.cos(x)


@dataclass(frozen=True)
class GuidanceSchedule:
    """How the guidance scale changes over one level's steps (module docstring)."""

    name: ClassVar[str] = ""

    def factor(self, done: Any, total: int, step: int, steps: int) -> Any:
        """``f`` of a step: ``done`` of ``total`` patches generated after step ``step`` of ``steps``
        (``done`` an int, or a tensor with one count per image)."""
        raise NotImplementedError

    def weight(self, cfg: Any, done: Any, total: int, step: int, steps: int) -> Any:
        """The step's guidance scale ``1 + (cfg - 1) * f`` (``cfg`` a float or a tensor per image)."""
        return 1 + (cfg - 1) * self.factor(done, total, step, steps)

    def active(self, step: int, steps: int) -> bool:
        """False when the step's weight is 1 whatever ``cfg`` (the unconditional half can be skipped)."""
        return True

    def params(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __str__(self) -> str:
        args = ",".join(f"{k}={v:g}" for k, v in self.params().items())
        return f"{self.name}:{args}" if args else self.name


@dataclass(frozen=True)
class Constant(GuidanceSchedule):
    name: ClassVar[str] = "constant"

    def factor(self, done: Any, total: int, step: int, steps: int) -> Any:
        return 1.0

    def weight(self, cfg: Any, done: Any, total: int, step: int, steps: int) -> Any:
        return cfg


@dataclass(frozen=True)
class Linear(GuidanceSchedule):
    """The released schedule; its arithmetic is kept as released (same rounding, same images)."""

    name: ClassVar[str] = "linear"

    def factor(self, done: Any, total: int, step: int, steps: int) -> Any:
        return done / total

    def weight(self, cfg: Any, done: Any, total: int, step: int, steps: int) -> Any:
        return 1 + (cfg - 1) * done / total


@dataclass(frozen=True)
class PowerCosine(GuidanceSchedule):
    name: ClassVar[str] = "power-cosine"
    exponent: float = 2.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.exponent) and self.exponent > 0):
            raise ValueError(f"power-cosine: exponent must be > 0, got {self.exponent}")

    def factor(self, done: Any, total: int, step: int, steps: int) -> Any:
        return (1 - _cos(math.pi * (done / total) ** self.exponent)) / 2


@dataclass(frozen=True)
class Cosine(PowerCosine):
    """``power-cosine`` with exponent 1."""

    name: ClassVar[str] = "cosine"
    exponent: float = 1.0

    def params(self) -> dict[str, float]:
        return {}


@dataclass(frozen=True)
class Interval(GuidanceSchedule):
    name: ClassVar[str] = "interval"
    start: float = 0.25
    end: float = 0.75

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= 1:
            raise ValueError(f"interval: needs 0 <= start < end <= 1, got start={self.start}, end={self.end}")

    def active(self, step: int, steps: int) -> bool:
        return self.start <= step / steps < self.end

    def factor(self, done: Any, total: int, step: int, steps: int) -> Any:
        return 1.0 if self.active(step, steps) else 0.0

    def weight(self, cfg: Any, done: Any, total: int, step: int, steps: int) -> Any:
        return cfg if self.active(step, steps) else cfg * 0 + 1


SCHEDULES: dict[str, type[GuidanceSchedule]] = {
    s.name: s for s in (Constant, Linear, Cosine, PowerCosine, Interval)
}


def parse_schedule(spec: str | GuidanceSchedule) -> GuidanceSchedule:
    """``"linear"``, ``"power-cosine:exponent=3"``, ``"interval:start=0.2,end=0.8"`` -> a schedule."""
    if isinstance(spec, GuidanceSchedule):
        return spec
    text = str(spec).strip()
    name, _, rest = text.partition(":")
    kind = SCHEDULES.get(name.strip())
    if kind is None:
        raise ValueError(f"unknown guidance schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    allowed = [f.name for f in dataclasses.fields(kind)] if kind is not Cosine else []
    kw: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in allowed:
            raise ValueError(
                f"guidance schedule {text!r}: {part!r} is not a parameter of {kind.name} "
                f"(parameters: {', '.join(allowed) or 'none'})"
            )
        try:
            kw[key] = float(value)
        except ValueError:
            raise ValueError(f"guidance schedule {text!r}: {key} must be a number, got {value!r}") from None
    return kind(**kw)


def temperature_at(start: float, end: float | None, step: int, steps: int) -> float:
    """The temperature of top-level step ``step`` of ``steps``: ``start`` when ``end`` is None
    (released), else a linear ramp from ``start`` at the first step to ``end`` at the last."""
    if end is None or steps <= 1:
        return start
    return start + (end - start) * step / (steps - 1)


def _positive_finite(key: str, value: float | None, low: float, *, inclusive: bool) -> None:
    if value is None:
        return
    ok = math.isfinite(value) and (value >= low if inclusive else value > low)
    if not ok:
        raise ValueError(f"{key} must be {'>=' if inclusive else '>'} {low:g}, got {value}")


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """How to sample; ``None`` means the model's released default (docs/model.md#guidance-schedules).

    ``cfg`` and ``cfg_schedule`` drive the top level. The levels below receive the top step's
    weight as a constant (released) unless ``lower_cfg`` or ``lower_cfg_schedule`` is set: then each
    lower level guides with ``lower_cfg`` (default: the weight it receives) under
    ``lower_cfg_schedule`` (default ``constant``) over its own steps. ``temperature`` MULTIPLIES the
    logits (released meaning: > 1 sharpens); with ``temperature_end`` it ramps linearly over the
    top level's steps. ``filter_threshold``: the released guidance filter (pixel_head.guided_logits).
    """

    num_iters: tuple[int, ...] | None = None
    cfg: float | None = None
    cfg_schedule: GuidanceSchedule | None = None
    lower_cfg: float | None = None
    lower_cfg_schedule: GuidanceSchedule | None = None
    temperature: float | None = None
    temperature_end: float | None = None
    filter_threshold: float = 1e-4

    def __post_init__(self) -> None:
        if self.num_iters is not None:
            object.__setattr__(self, "num_iters", parse_iters(self.num_iters))
            if not self.num_iters:
                raise ValueError("num_iters needs one entry per level, got none")
            if any(i < 1 for i in self.num_iters):
                raise ValueError(f"num_iters must be >= 1, got {self.num_iters}")
        for key in ("cfg_schedule", "lower_cfg_schedule"):
            value = getattr(self, key)
            if value is not None:
                try:
                    object.__setattr__(self, key, parse_schedule(value))
                except ValueError as err:
                    raise ValueError(f"{key}: {err}") from None
        for key in ("cfg", "lower_cfg", "temperature", "temperature_end", "filter_threshold"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, float(value))
        _positive_finite("cfg", self.cfg, 1.0, inclusive=True)
        _positive_finite("lower_cfg", self.lower_cfg, 1.0, inclusive=True)
        _positive_finite("temperature", self.temperature, 0.0, inclusive=False)
        _positive_finite("temperature_end", self.temperature_end, 0.0, inclusive=False)
        if not (math.isfinite(self.filter_threshold) and 0 <= self.filter_threshold < 1):
            raise ValueError(f"filter_threshold must be in [0, 1), got {self.filter_threshold}")

    def sample_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``FractalGen.sample``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def resolved(self, config: Any) -> SamplingSettings:
        """Every ``None`` that has a model default replaced by the model config's default (what
        sampling actually uses); ``lower_*`` and ``temperature_end`` stay None (released behaviour)."""
        return dataclasses.replace(
            self,
            num_iters=self.num_iters or tuple(config.default_iters()),
            # an unconditional (1-class) model samples without guidance whatever its size's default
            cfg=(1.0 if config.num_classes == 1 else config.sample_cfg) if self.cfg is None else self.cfg,
            cfg_schedule=self.cfg_schedule or parse_schedule(config.sample_cfg_schedule),
            temperature=config.sample_temperature if self.temperature is None else self.temperature,
        )

    def merged(self, other: SamplingSettings) -> SamplingSettings:
        """``other``'s set fields override this one's."""
        changes = {
            f.name: getattr(other, f.name)
            for f in dataclasses.fields(other)
            if getattr(other, f.name) is not None
        }
        if other.filter_threshold == SamplingSettings.filter_threshold:
            changes.pop("filter_threshold", None)
        return dataclasses.replace(self, **changes)

    def to_tags(self, prefix: str = TAG_PREFIX) -> dict[str, str]:
        """String tags (``sampling.cfg`` ...) for the set fields; ``num_iters`` as ``64,16``,
        schedules as their spec (``power-cosine:exponent=3``)."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[prefix + f.name] = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        return out

    @classmethod
    def from_tags(cls, tags: Mapping[str, str], prefix: str = TAG_PREFIX) -> SamplingSettings:
        """Inverse of ``to_tags``; other tags are ignored, a malformed value is a ValueError naming it."""
        kw = {f.name: tags[prefix + f.name] for f in dataclasses.fields(cls) if tags.get(prefix + f.name)}
        try:
            return cls(**kw)
        except (TypeError, ValueError) as err:
            raise ValueError(f"tags {prefix}*: {err}") from None

    def describe(self) -> str:
        return ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in self.to_tags().items()) or "model defaults"


def parse_iters(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"64,16"`` or ``[64, 16]`` -> ``(64, 16)``."""
    if isinstance(text, str):
        parts = [p for p in text.replace(" ", "").split(",") if p]
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"iterations must be integers separated by commas, got {text!r}") from None
    return tuple(int(i) for i in text)

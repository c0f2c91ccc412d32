"""Sampling settings: the one type every command, the sweep, the registry and the server use.

*Sampling settings*: ``num_iters`` per level, guidance scale ``cfg``, guidance schedule
(``linear``/``constant``), ``temperature`` (MULTIPLIES the logits, released meaning), filter threshold.
``None`` fields take the model's released defaults. Registered versions carry them as ``sampling.*`` tags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    pass


TAG_PREFIX = "sampling."


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """Settings for ``FractalGen.sample``; ``None`` means the model's released default
    (docs/model.md#released-sampling-settings)."""

    num_iters: tuple[int, ...] | None = None
    cfg: float | None = None
    cfg_schedule: Literal["linear", "constant"] | None = None
    temperature: float | None = None  # multiplies the logits: > 1 sharpens (released meaning)
    filter_threshold: float = 1e-4

    def __post_init__(self) -> None:
        if self.num_iters is not None:
            object.__setattr__(self, "num_iters", tuple(int(i) for i in self.num_iters))
            if any(i < 1 for i in self.num_iters):
                raise ValueError(f"num_iters must be >= 1, got {self.num_iters}")
        if self.cfg is not None and self.cfg < 1.0:
            raise ValueError(f"cfg must be >= 1.0, got {self.cfg}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.cfg_schedule not in (None, "linear", "constant"):
            raise ValueError(f"cfg_schedule must be linear or constant, got {self.cfg_schedule!r}")

    def sample_kwargs(self) -> dict[str, Any]:
        return {"num_iters": self.num_iters, "cfg": self.cfg, "cfg_schedule": self.cfg_schedule,
                "temperature": self.temperature, "filter_threshold": self.filter_threshold}  # fmt: skip

    def resolved(self, config: Any) -> SamplingSettings:
        """Every ``None`` replaced by the model config's default (what sampling actually uses)."""
        return SamplingSettings(
            num_iters=self.num_iters or tuple(config.default_iters()),
            # an unconditional (1-class) model samples without guidance whatever its size's default
            cfg=(1.0 if config.num_classes == 1 else config.sample_cfg) if self.cfg is None else self.cfg,
            cfg_schedule=self.cfg_schedule or config.sample_cfg_schedule,
            temperature=config.sample_temperature if self.temperature is None else self.temperature,
            filter_threshold=self.filter_threshold,
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
        """String tags (``sampling.cfg`` ...) for the set fields; ``num_iters`` as ``64,16``."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[prefix + f.name] = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        return out

    @classmethod
    def from_tags(cls, tags: Mapping[str, str], prefix: str = TAG_PREFIX) -> SamplingSettings:
        """Inverse of ``to_tags``; unknown or missing tags are ignored."""
        kw: dict[str, Any] = {}
        get = lambda k: tags.get(prefix + k)  # noqa: E731
        if get("num_iters"):
            kw["num_iters"] = parse_iters(get("num_iters"))
        for key in ("cfg", "temperature", "filter_threshold"):
            if get(key):
                kw[key] = float(get(key))
        if get("cfg_schedule") in ("linear", "constant"):
            kw["cfg_schedule"] = get("cfg_schedule")
        return cls(**kw)

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

"""Model sizes: the released configurations and tiny ones that run on a CPU in seconds.

Terms (docs/model.md#notation): a *level* i splits its input of side ``img_sizes[i]`` into a raster grid of
``(img_sizes[i] / img_sizes[i+1])**2`` patches of side ``img_sizes[i+1]``; the last entry of the
width/blocks/heads lists belongs to the *pixel head*, an AR model over the 3 channels of one pixel.
``generators[i]`` is ``"mar"`` or ``"ar"`` for every level but the pixel head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

# ImageNet normalisation (docs/model.md#notation); the pixel head de-normalises with the same numbers.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

GeneratorType = Literal["mar", "ar"]


@dataclass(frozen=True, kw_only=True)
class FractalConfig:
    """Everything that fixes a model's architecture (and so its state_dict)."""

    img_sizes: tuple[int, ...]
    widths: tuple[int, ...]
    blocks: tuple[int, ...]
    heads: tuple[int, ...]
    generators: tuple[GeneratorType, ...]
    num_classes: int = 1000
    guiding_pixel: bool = False  # levels > 0 predict and condition on the patch's mean colour
    # the guiding-pixel head: a small pixel head (released: width 128, 3 blocks, 4 heads)
    guiding_pixel_head: tuple[int, int, int] = (128, 3, 4)
    num_conds: int = 5  # MAR: middle, top, right, bottom, left; AR levels use the middle only
    label_drop_prob: float = 0.1
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    r_weight: float = 5.0
    grad_checkpointing: bool = False
    # levels whose blocks recompute activations in backward when grad_checkpointing is on (selective
    # checkpointing: the lower levels hold most activations, docs/performance.md#where-the-cost-is);
    # empty = every level
    checkpoint_levels: tuple[int, ...] = ()
    # training only, no effect on the state_dict: pad each MAR level's selection of masked patches to
    # one of ``mask_buckets`` sizes (multiples of ceil(B*L / mask_buckets)) so the lower levels see a
    # fixed set of batch shapes and the selection needs no host sync (docs/performance.md); 0 = off
    # (exact rows)
    mask_buckets: int = 0
    # released sampling defaults (docs/model.md#released-sampling-settings); used when sample() is
    # called without them
    sample_iters: tuple[int, ...] = ()
    sample_cfg: float = 1.0
    sample_temperature: float = 1.0
    sample_cfg_schedule: Literal["linear", "constant"] = "linear"
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # YAML / JSON give lists: store tuples (hashable, frozen)
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        n = len(self.img_sizes)
        if n < 2:
            raise ValueError("img_sizes needs at least two entries (image side, ..., 1)")
        if self.img_sizes[-1] != 1:
            raise ValueError(f"img_sizes must end with 1 (the pixel head), got {self.img_sizes}")
        for name in ("widths", "blocks", "heads"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} needs {n} entries (one per level incl. the pixel head)")
        if len(self.generators) != n - 1:
            raise ValueError(f"generators needs {n - 1} entries (one per level above the pixel head)")
        for g in self.generators:
            if g not in ("mar", "ar"):
                raise ValueError(f"generator type {g!r} is not 'mar' or 'ar'")
        for i in range(n - 1):
            big, small = self.img_sizes[i], self.img_sizes[i + 1]
            if small <= 0 or big % small or big <= small:
                raise ValueError(f"img_sizes[{i}]={big} is not a multiple > 1 of img_sizes[{i + 1}]={small}")
        for i, (w, h) in enumerate(zip(self.widths, self.heads)):
            if w % h:
                raise ValueError(f"widths[{i}]={w} is not divisible by heads[{i}]={h}")
            if self.generators[i : i + 1] == ("ar",) and (w // h) % 4:
                raise ValueError(f"AR level {i}: head dim {w // h} must be a multiple of 4 for 2-D RoPE")
        if self.num_conds not in (1, 5):
            raise ValueError(
                f"num_conds must be 1 (middle only) or 5 (middle + 4 neighbours), got {self.num_conds}"
            )
        for i in range(1, n - 1):
            if self.generators[i - 1] == "ar" and self.generators[i] == "mar" and self.num_conds > 1:
                raise ValueError(
                    f"level {i} (mar) needs {self.num_conds} conditions but level {i - 1} (ar) gives 1"
                )
        if self.num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        if any(not 0 <= lvl < n - 1 for lvl in self.checkpoint_levels):
            raise ValueError(f"checkpoint_levels must lie in 0..{n - 2}, got {self.checkpoint_levels}")
        if self.mask_buckets < 0:
            raise ValueError(f"mask_buckets must be >= 0 (0 = off), got {self.mask_buckets}")
        if self.sample_iters and len(self.sample_iters) != n - 1:
            raise ValueError(f"sample_iters needs {n - 1} entries")

    @property
    def img_size(self) -> int:
        return self.img_sizes[0]

    @property
    def num_levels(self) -> int:
        """Number of generator levels above the pixel head."""
        return len(self.generators)

    def seq_len(self, level: int) -> int:
        return (self.img_sizes[level] // self.img_sizes[level + 1]) ** 2

    def default_iters(self) -> tuple[int, ...]:
        if self.sample_iters:
            return self.sample_iters
        return tuple(self.seq_len(i) for i in range(self.num_levels))

    def replace(self, **changes: object) -> FractalConfig:
        return dataclasses.replace(self, **changes)


def _released(**kw: object) -> FractalConfig:
    return FractalConfig(**kw)  # type: ignore[arg-type]


MODEL_CONFIGS: dict[str, FractalConfig] = {
    # --- released (docs/model.md#configurations) ---
    "fractalar_in64": _released(
        img_sizes=(64, 4, 1), widths=(1024, 512, 128), blocks=(32, 8, 3), heads=(16, 8, 4),
        generators=("ar", "ar"), num_conds=1, guiding_pixel=False,
        sample_iters=(64, 16), sample_cfg=11.0, sample_temperature=1.03,
    ),
    "fractalmar_in64": _released(
        img_sizes=(64, 4, 1), widths=(1024, 512, 128), blocks=(32, 8, 3), heads=(16, 8, 4),
        generators=("mar", "mar"), num_conds=5, guiding_pixel=False,
        sample_iters=(64, 16), sample_cfg=6.5, sample_temperature=1.02,
    ),
    "fractalmar_base_in256": _released(
        img_sizes=(256, 16, 4, 1), widths=(768, 384, 192, 64), blocks=(24, 6, 3, 1), heads=(12, 6, 3, 4),
        generators=("mar", "mar", "mar"), num_conds=5, guiding_pixel=True,
        sample_iters=(64, 16, 16), sample_cfg=29.0, sample_temperature=1.1,
    ),
    "fractalmar_large_in256": _released(
        img_sizes=(256, 16, 4, 1), widths=(1024, 512, 256, 64), blocks=(32, 8, 4, 1), heads=(16, 8, 4, 4),
        generators=("mar", "mar", "mar"), num_conds=5, guiding_pixel=True,
        sample_iters=(64, 16, 16), sample_cfg=21.0, sample_temperature=1.1,
    ),
    "fractalmar_huge_in256": _released(
        img_sizes=(256, 16, 4, 1), widths=(1280, 640, 320, 64), blocks=(40, 10, 5, 1), heads=(16, 8, 4, 4),
        generators=("mar", "mar", "mar"), num_conds=5, guiding_pixel=True,
        sample_iters=(64, 16, 16), sample_cfg=19.0, sample_temperature=1.1,
    ),
    # --- tiny: tests, the demo, CPU experiments (seconds per step on a laptop) ---
    "fractalmar_tiny16": _released(
        img_sizes=(16, 4, 1), widths=(64, 32, 16), blocks=(2, 1, 1), heads=(4, 2, 2),
        generators=("mar", "mar"), num_classes=10, sample_iters=(4, 4), sample_cfg=2.0,
    ),
    "fractalar_tiny16": _released(
        img_sizes=(16, 4, 1), widths=(64, 32, 16), blocks=(2, 1, 1), heads=(4, 2, 2),
        generators=("ar", "ar"), num_conds=1, num_classes=10, sample_cfg=2.0,
    ),
    "fractalmar_tiny32": _released(
        img_sizes=(32, 8, 2, 1), widths=(64, 32, 16, 16), blocks=(2, 1, 1, 1), heads=(4, 2, 2, 2),
        generators=("mar", "mar", "mar"), guiding_pixel=True, guiding_pixel_head=(16, 1, 2), num_classes=10,
        sample_iters=(4, 4, 2), sample_cfg=2.0,
    ),
    "fractalmar_demo32": _released(
        img_sizes=(32, 8, 2, 1), widths=(128, 64, 32, 32), blocks=(3, 2, 1, 1), heads=(4, 4, 2, 2),
        generators=("mar", "mar", "mar"), guiding_pixel=True, guiding_pixel_head=(32, 1, 2), num_classes=16,
        attn_dropout=0.0, proj_dropout=0.0, sample_iters=(8, 4, 4), sample_cfg=2.0,
    ),
}  # fmt: skip

RELEASED_NAMES: tuple[str, ...] = (
    "fractalar_in64",
    "fractalmar_in64",
    "fractalmar_base_in256",
    "fractalmar_large_in256",
    "fractalmar_huge_in256",
)


def get_config(name: str, **overrides: object) -> FractalConfig:
    """The registered configuration ``name`` with field overrides (e.g. ``num_classes=3``)."""
    try:
        cfg = MODEL_CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(MODEL_CONFIGS))}") from None
    if overrides:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(FractalConfig)}
        if unknown:
            raise TypeError(f"unknown model option(s) {sorted(unknown)}")
        if "sample_iters" not in overrides and len(tuple(overrides.get("img_sizes", cfg.img_sizes))) != len(
            cfg.img_sizes
        ):
            overrides["sample_iters"] = ()  # the size's iterations do not fit another level count
        cfg = dataclasses.replace(cfg, **overrides)
    return cfg

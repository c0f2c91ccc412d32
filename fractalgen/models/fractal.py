"""FractalGen: the recursion of levels (docs/model.md#levels; the paper's section 4).

``FractalGen(config, level)`` holds ``generator`` (a MAR or AR level) and ``next_fractal`` (the next
``FractalGen``, or the pixel head after the last level), so parameter names match the released
checkpoints (``generator.*``, ``next_fractal.generator.*``, ..., ``next_fractal...r_codebook``).
Level 0 also owns the class embedding and ``fake_latent`` (the unconditional / dropped-label latent).

Losses: the training loss is the pixel-head loss plus every guiding-pixel loss (docs/model.md#loss-and-nll).
In evaluation mode each term is the mean of the three channel cross-entropies, so
``nll_bpd = sum(terms) / ln 2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from fractalgen.models.ar import ARLevel
from fractalgen.models.conditions import Conditions, SampleSettings
from fractalgen.models.configs import IMAGENET_MEAN, IMAGENET_STD, FractalConfig, get_config
from fractalgen.models.mar import MARLevel
from fractalgen.models.pixel_head import PixelHead
from fractalgen.sampling_settings import Constant, GuidanceSchedule, SamplingSettings


class FractalGen(nn.Module):
    def __init__(self, config: FractalConfig, level: int = 0) -> None:
        super().__init__()
        self.config = config
        self.level = level
        c = config
        if level == 0:
            self.class_emb = nn.Embedding(c.num_classes, c.widths[0])
            self.fake_latent = nn.Parameter(torch.zeros(1, c.widths[0]))
            nn.init.normal_(self.class_emb.weight, std=0.02)
            nn.init.normal_(self.fake_latent, std=0.02)
            self.init_buffers()

        common = dict(
            seq_len=c.seq_len(level),
            patch_size=c.img_sizes[level + 1],
            cond_dim=c.widths[level - 1] if level > 0 else c.widths[0],
            dim=c.widths[level],
            depth=c.blocks[level],
            num_heads=c.heads[level],
            grad_checkpointing=c.grad_checkpointing
            and (not c.checkpoint_levels or level in c.checkpoint_levels),
        )
        if c.generators[level] == "mar":
            self.generator: MARLevel | ARLevel = MARLevel(
                **common,
                num_conds=c.num_conds,
                guiding_pixel=c.guiding_pixel and level > 0,
                guiding_pixel_head=c.guiding_pixel_head,
                attn_dropout=c.attn_dropout,
                proj_dropout=c.proj_dropout,
                mask_buckets=c.mask_buckets,
            )
        else:
            self.generator = ARLevel(**common, dropout=c.proj_dropout)

        if level < c.num_levels - 1:
            self.next_fractal: FractalGen | PixelHead = FractalGen(c, level + 1)
        else:
            self.next_fractal = PixelHead(
                c.widths[level],
                width=c.widths[-1],
                depth=c.blocks[-1],
                num_heads=c.heads[-1],
                r_weight=c.r_weight,
            )

    def init_buffers(self) -> None:
        """Normalisation constants (not in checkpoints); rebuilt after loading on the meta device."""
        if self.level == 0:
            self.register_buffer("pix_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("pix_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ conditioning (level 0)
    def label_conditions(self, labels: Tensor) -> Conditions:
        """Class embedding repeated ``num_conds`` times (B, C, D). Training drops the label with
        probability ``label_drop_prob``; evaluation (NLL) is unconditional: always ``fake_latent``."""
        B = labels.size(0)
        if self.training:
            emb = self.class_emb(labels)  # (B, D)
            drop = torch.rand(B, device=labels.device) < self.config.label_drop_prob
            emb = torch.where(drop.unsqueeze(1), self.fake_latent.to(emb.dtype), emb)
        else:
            emb = self.fake_latent.expand(B, -1)
        return Conditions(emb.unsqueeze(1).expand(-1, self.config.num_conds, -1))

    # ------------------------------------------------------------------ training / NLL
    def _terms(self, imgs: Tensor, conds: Conditions, out: dict[str, Tensor]) -> None:
        patches, conds_next, gp_loss = self.generator(imgs, conds)
        if gp_loss is not None:
            out[f"guiding_pixel_{self.level}"] = gp_loss
        if isinstance(self.next_fractal, PixelHead):
            pixels = patches.reshape(patches.size(0), 3)  # (M, 3): patches of side 1
            out["pixel"] = self.next_fractal(pixels, conds_next)
        else:
            self.next_fractal._terms(patches, conds_next, out)

    def loss_terms(self, imgs: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The loss terms: ``pixel`` and ``guiding_pixel_<level>`` for each guiding-pixel level."""
        out: dict[str, Tensor] = {}
        self._terms(imgs, self.label_conditions(labels), out)
        return out

    def forward(self, imgs: Tensor, labels: Tensor) -> Tensor:
        """Loss: pixel-head loss + guiding-pixel losses. imgs (B, 3, S, S) normalised, labels (B,)."""
        return sum(self.loss_terms(imgs, labels).values())  # type: ignore[return-value]

    @torch.no_grad()
    def nll_bpd(self, imgs: Tensor, num_passes: int = 1) -> Tensor:
        """Unconditional NLL in bits/dim, the mean over ``num_passes`` forward passes (the released
        evaluation uses 10 for MAR models and 1 for AR models); runs in evaluation mode."""
        with evaluation(self):
            labels = torch.zeros(imgs.size(0), dtype=torch.long, device=imgs.device)
            total = sum(self(imgs, labels) for _ in range(num_passes))
        return total / num_passes / math.log(2)  # type: ignore[operator]

    # ------------------------------------------------------------------ generation
    def _sample_level(
        self,
        conds: Conditions,
        cfg: Tensor,
        known: Tensor | None,
        known_mask: Tensor | None,
        settings: SampleSettings,
        *,
        num_iters: tuple[int, ...],
        cfg_schedule: GuidanceSchedule,
        lower_cfg: float | None = None,
        lower_cfg_schedule: GuidanceSchedule | None = None,
        on_step: Callable[[Tensor, Tensor], None] | None = None,
    ) -> Tensor:
        """One level's generation; the levels below get the step's weight (released: as a constant),
        or ``lower_cfg`` under ``lower_cfg_schedule`` when set (docs/model.md#guidance-schedules)."""
        head = self.next_fractal
        if self.level > 0 and lower_cfg is not None:
            # the steps use lower_cfg; the level's guiding pixel still gets the weight handed down
            cfg_schedule = _OwnScale(cfg_schedule, lower_cfg)
        if isinstance(head, PixelHead):

            def next_level(
                c: Conditions, w: Tensor, k: Tensor | None, m: Tensor | None, s: SampleSettings
            ) -> Tensor:
                kk = None if k is None else k.reshape(-1, 3)
                mm = None if m is None else m.reshape(-1)
                return head.sample(c, w, s, kk, mm).view(-1, 3, 1, 1)
        else:
            next_level = partial(
                head._sample_level,
                num_iters=num_iters,
                cfg_schedule=lower_cfg_schedule or Constant(),
                lower_cfg=lower_cfg,
                lower_cfg_schedule=lower_cfg_schedule,
            )
        return self.generator.sample(
            conds,
            num_iter=num_iters[self.level],
            cfg=cfg,
            cfg_schedule=cfg_schedule,
            settings=settings,
            next_level=next_level,
            known=known,
            known_mask=known_mask,
            on_step=on_step,
            # an unguided step may drop the unconditional half when the levels below follow its weight
            skip_unguided=lower_cfg is None or isinstance(head, PixelHead),
        )

    @torch.no_grad()
    def sample(
        self,
        labels: Tensor,
        *,
        num_iters: tuple[int, ...] | None = None,
        cfg: float | None = None,
        cfg_schedule: GuidanceSchedule | str | None = None,
        lower_cfg: float | None = None,
        lower_cfg_schedule: GuidanceSchedule | str | None = None,
        temperature: float | None = None,
        temperature_end: float | None = None,
        filter_threshold: float = 1e-4,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        known: Tensor | None = None,
        known_mask: Tensor | None = None,
        on_step: Callable[[Tensor, Tensor], None] | None = None,
    ) -> Tensor:
        """Class-conditional images (B, 3, S, S) with values k/255 in [0, 1].

        labels (B,) class indices. ``num_iters`` per level (AR levels always take seq_len steps),
        ``cfg`` the guidance scale (1.0: no guidance) and ``cfg_schedule`` its schedule over the top
        level's steps (a ``GuidanceSchedule`` or its spec such as ``"power-cosine:exponent=3"``);
        ``lower_cfg`` / ``lower_cfg_schedule`` the guidance of the levels below (unset: the top step's
        weight as a constant, released); ``temperature`` MULTIPLIES the logits (released meaning: > 1
        sharpens), ramping linearly to ``temperature_end`` over the top level's steps when that is
        set. The settings are those of ``fractalgen.sampling_settings.SamplingSettings``
        (docs/model.md#guidance-schedules). Unset values take the configuration's released defaults.
        ``seed`` (or a ``generator`` on the labels' device) makes the result reproducible.

        Conditional prediction (inpainting, outpainting, uncropping, editing): ``known`` (B, 3, S, S)
        in [0, 1] and ``known_mask`` (B, S, S) bool, True where a pixel is given; only the other
        pixels are generated and the given ones come back unchanged.

        ``on_step(images, done)``: called after every top-level step with the canvas so far
        (B, 3, S, S) in [0, 1] and a (B, S, S) bool mask of the pixels generated or given so far
        (for animations of the generation process, paper Figure 3).
        """
        c = self.config
        for key, value in (("cfg", cfg), ("lower_cfg", lower_cfg)):
            if c.num_classes == 1 and value not in (None, 1.0):
                raise ValueError(
                    f"this model is unconditional (1 class): classifier-free guidance needs a class to "
                    f"guide towards, so {key} must be 1.0, got {value}"
                )
        if c.num_classes == 1:
            cfg = 1.0
        s = SamplingSettings(
            num_iters=num_iters, cfg=cfg, cfg_schedule=cfg_schedule, lower_cfg=lower_cfg,
            lower_cfg_schedule=lower_cfg_schedule, temperature=temperature, temperature_end=temperature_end,
            filter_threshold=filter_threshold,
        ).resolved(c)  # fmt: skip
        num_iters = s.num_iters
        assert (
            num_iters is not None
            and s.cfg is not None
            and s.cfg_schedule is not None
            and s.temperature is not None
        )
        if len(num_iters) != c.num_levels:
            raise ValueError(f"num_iters needs {c.num_levels} entries, got {num_iters}")
        if labels.dim() != 1:
            raise ValueError("labels must be a 1-D tensor of class indices")
        values = labels.tolist()  # for labels already on the host: no aten op, so no sync later on
        if values and (min(values) < 0 or max(values) >= c.num_classes):
            raise ValueError(f"labels must lie in 0..{c.num_classes - 1}")
        device = self.fake_latent.device
        labels = labels.to(device, non_blocking=True)  # no stream sync for host labels
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)

        n = labels.size(0)
        S = c.img_size
        known_norm = None
        if known is not None or known_mask is not None:
            if known is None or known_mask is None:
                raise ValueError("inpainting needs both known and known_mask")
            if known.shape != (n, 3, S, S) or known_mask.shape != (n, S, S):
                raise ValueError(f"known must be ({n}, 3, {S}, {S}) and known_mask ({n}, {S}, {S})")
            known = known.to(device=device, dtype=torch.float32)
            known_mask = known_mask.to(device=device, dtype=torch.bool)
            known_norm = (known - self.pix_mean) / self.pix_std

        guided = s.cfg != 1.0 or (c.num_levels > 1 and s.lower_cfg not in (None, 1.0))
        emb = self.class_emb(labels)  # (n, D)
        if guided:
            emb = torch.cat([emb, self.fake_latent.expand(n, -1).to(emb.dtype)])  # (2n, D)
        conds = Conditions(emb.unsqueeze(1).expand(-1, c.num_conds, -1))
        settings = SampleSettings(
            guided=guided, temperature=s.temperature, filter_threshold=s.filter_threshold,
            generator=generator, temperature_end=s.temperature_end,
        )  # fmt: skip

        def to_images(out: Tensor) -> Tensor:
            images = ((out.float() * self.pix_std + self.pix_mean) * 255).round().clamp(0, 255) / 255
            if known is not None and known_mask is not None:
                images = torch.where(known_mask.unsqueeze(1), known, images)
            return images

        hook = None
        if on_step is not None:
            p = c.img_sizes[1]

            def hook(canvas: Tensor, done_patches: Tensor) -> None:
                g = S // p
                done = done_patches.view(n, g, 1, g, 1).expand(n, g, p, g, p).reshape(n, S, S)
                if known_mask is not None:
                    done = done | known_mask
                on_step(to_images(canvas), done)

        with evaluation(self):
            out = self._sample_level(
                conds,
                torch.full((n,), s.cfg, device=device),
                known_norm,
                known_mask,
                settings,
                num_iters=num_iters,
                cfg_schedule=s.cfg_schedule,
                lower_cfg=s.lower_cfg,
                lower_cfg_schedule=s.lower_cfg_schedule,
                on_step=hook,
            )
        return to_images(out)


@dataclass(frozen=True)
class _OwnScale(GuidanceSchedule):
    """A lower level's ``schedule`` over its own ``scale`` (``lower_cfg``), whatever weight it receives."""

    schedule: GuidanceSchedule
    scale: float

    def weight(self, cfg: Tensor, done: Tensor | int, total: int, step: int, steps: int) -> Tensor:
        return self.schedule.weight(cfg * 0 + self.scale, done, total, step, steps)

    def active(self, step: int, steps: int) -> bool:
        return self.schedule.active(step, steps)


def parameter_level(name: str) -> int:
    """The level a parameter belongs to: 0 for ``class_emb``, ``fake_latent`` and ``generator.*``,
    i for i ``next_fractal.`` prefixes; the pixel head (and each level's guiding-pixel head) counts as
    its own level index (for per-level learning rates and freezing)."""
    return name.count("next_fractal.")


@contextmanager
def evaluation(model: nn.Module):
    """Evaluation mode for the duration, restoring the previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def build_model(name: str, **overrides: object) -> FractalGen:
    """A FractalGen of the registered size ``name`` (see ``MODEL_CONFIGS``) with config overrides,
    e.g. ``build_model("fractalmar_in64", num_classes=10, grad_checkpointing=True)``."""
    return FractalGen(get_config(name, **overrides))

"""The pixel head: the last level, an AR transformer over the R, G, B values of one pixel.

Sequence ``[cond, R, G, B]`` (docs/model.md#pixel-head): output 0 predicts R, output 1 predicts G, output 2
predicts B, each a 256-way distribution; logits = h @ codebook^T + bias. The same module (width 128,
3 blocks) predicts the *guiding pixel*, a patch's mean colour, at levels > 0 of the 256 models.

Terms: *pixels* are normalised RGB values (N, 3); *ids* are their 8-bit values (N, 3) in 0..255.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fractalgen.models.conditions import Conditions, SampleSettings
from fractalgen.models.configs import IMAGENET_MEAN, IMAGENET_STD
from fractalgen.models.layers import Block, KVCache, at_least_float32, init_weights


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row of ``probs`` (n, K): argmax(p / E) with E ~ Exp(1), the method (and the random
    draws) of ``torch.multinomial(probs, 1)``, so the same generator gives the same ids, without
    multinomial's input checks, which read two values back from the GPU on every call."""
    e = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / e).argmax(dim=-1)


class MlmLayer(nn.Module):
    """Output layer tied to a codebook: logits = x @ codebook^T + bias (released name ``*_mlm``)."""

    def __init__(self, vocab_size: int = 256) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, vocab_size))

    def forward(self, x: Tensor, codebook: Tensor) -> Tensor:
        return x @ codebook.t() + self.bias


def guided_logits(cond: Tensor, uncond: Tensor, cfg: Tensor | float, filter_threshold: float) -> Tensor:
    """Classifier-free guidance with the released filter (docs/model.md#temperature-and-filter).

    Where the conditional probability of a value is below ``filter_threshold``, the unconditional
    logit is raised to ``max(l_u, l_c - max(l_c) + max(l_u))`` first; then ``l_u + cfg * (l_c - l_u)``.
    ``cfg`` is a number or a per-row tensor (n,).
    """
    low = torch.softmax(cond, dim=-1) < filter_threshold
    lifted = torch.maximum(
        uncond, cond - cond.max(dim=-1, keepdim=True).values + uncond.max(dim=-1, keepdim=True).values
    )
    uncond = torch.where(low, lifted, uncond)
    if isinstance(cfg, Tensor):
        cfg = cfg.to(cond.dtype).unsqueeze(-1)  # (n, 1)
    return uncond + cfg * (cond - uncond)


class PixelHead(nn.Module):
    """AR model over the 3 channels of a pixel, conditioned on the middle condition (released ``PixelLoss``)."""

    def __init__(self, cond_dim: int, width: int, depth: int, num_heads: int, r_weight: float = 1.0) -> None:
        super().__init__()
        self.r_weight = r_weight
        self.cond_proj = nn.Linear(cond_dim, width)
        self.r_codebook = nn.Embedding(256, width)
        self.g_codebook = nn.Embedding(256, width)
        self.b_codebook = nn.Embedding(256, width)
        self.ln = nn.LayerNorm(width, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio=4.0, causal=True) for _ in range(depth)
        )  # no dropout in the pixel head
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.r_mlm = MlmLayer(256)
        self.g_mlm = MlmLayer(256)
        self.b_mlm = MlmLayer(256)
        self.init_buffers()
        for emb in (self.r_codebook, self.g_codebook, self.b_codebook):
            nn.init.normal_(emb.weight, std=0.02)
        self.apply(init_weights)

    def init_buffers(self) -> None:
        """Non-persistent constants (not in checkpoints); rebuilt after loading on the meta device."""
        self.register_buffer("pix_mean", torch.tensor(IMAGENET_MEAN), persistent=False)
        self.register_buffer("pix_std", torch.tensor(IMAGENET_STD), persistent=False)

    # -- value conversions
    def pixels_to_ids(self, pixels: Tensor, noise: bool) -> Tensor:
        """Normalised (N, 3) -> 8-bit ids. Training adds N(0, 0.01) noise before rounding (released
        code: avoids the bias of round-half-to-even on exact .5 values)."""
        values = (pixels.float() * self.pix_std + self.pix_mean) * 255
        if noise:
            values = values + 1e-2 * torch.randn_like(values)
        return values.round().clamp_(0, 255).long()

    def ids_to_pixels(self, ids: Tensor) -> Tensor:
        return (ids.float() / 255 - self.pix_mean) / self.pix_std

    # -- model
    def predict(self, ids: Tensor, cond: Tensor) -> Tensor:
        """Logits (N, 3, 256) for R, G, B given the ids (N, 3) and the middle condition (N, D_prev)."""
        x = torch.stack(
            [
                self.cond_proj(cond),
                self.r_codebook(ids[:, 0]),
                self.g_codebook(ids[:, 1]),
                self.b_codebook(ids[:, 2]),
            ],
            dim=1,
        )  # (N, 4, W)
        x = self.ln(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        # output layers in at least float32 (the released code disables autocast here); a float64
        # model stays float64, so its gradients do not carry float32 rounding
        x = at_least_float32(x)
        logits = [
            mlm(x[:, i], at_least_float32(book.weight))
            for i, (mlm, book) in enumerate(
                ((self.r_mlm, self.r_codebook), (self.g_mlm, self.g_codebook), (self.b_mlm, self.b_codebook))
            )
        ]
        return torch.stack(logits, dim=1)  # (N, 3, 256)

    def channel_logits(self, cond: Tensor, ids: Tensor, c: int, caches: list[KVCache] | None) -> Tensor:
        """Logits (N, 256) of channel ``c`` given the ids of channels < c, for sampling.

        With ``caches`` (from ``new_caches``, used for c = 0, 1, 2 in turn) only token c (the
        condition, then the value of channel c - 1) runs through the blocks; without, the whole
        sequence is recomputed.
        """
        if caches is None:
            return self.predict(ids, cond)[:, c]
        books = (self.r_codebook, self.g_codebook, self.b_codebook)
        tok = self.cond_proj(cond) if c == 0 else books[c - 1](ids[:, c - 1])
        x = self.ln(tok).unsqueeze(1)  # (N, 1, W); LayerNorm acts per token
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache)
        h = at_least_float32(self.norm(x[:, 0]))
        return (self.r_mlm, self.g_mlm, self.b_mlm)[c](h, at_least_float32(books[c].weight))

    def new_caches(self, cond: Tensor) -> list[KVCache]:
        heads = self.blocks[0].attn.num_heads
        hd = self.cond_proj.out_features // heads
        return [KVCache(cond.size(0), heads, 4, hd, cond.new_empty(0)) for _ in self.blocks]

    def loss_terms(self, pixels: Tensor, conds: Conditions) -> Tensor:
        """Per-pixel cross-entropies (N, 3) for R, G, B."""
        ids = self.pixels_to_ids(pixels, noise=True)
        logits = self.predict(ids, conds.middle)
        return F.cross_entropy(logits.reshape(-1, 256), ids.reshape(-1), reduction="none").view(-1, 3)

    def combine(self, ce: Tensor, conds: Conditions | None = None) -> Tensor:
        """Training: (r_weight*CE_R + CE_G + CE_B)/(r_weight+2); evaluation: mean of the three CEs.
        With ``conds.valid`` (mask buckets) the mean is over the valid rows only."""
        if self.training:
            per_row = (self.r_weight * ce[:, 0] + ce[:, 1] + ce[:, 2]) / (self.r_weight + 2)
            return per_row.mean() if conds is None else conds.mean(per_row)
        return ce.mean()

    def forward(self, pixels: Tensor, conds: Conditions) -> Tensor:
        """Loss for normalised pixels (N, 3) given their conditions (mean over N, or over the valid
        rows when ``conds.valid`` is set)."""
        return self.combine(self.loss_terms(pixels, conds), conds)

    @torch.no_grad()
    def sample(
        self,
        conds: Conditions,
        cfg: Tensor | float,
        settings: SampleSettings,
        known: Tensor | None = None,
        known_mask: Tensor | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Sample normalised pixels (n, 3); ``conds`` has 2n rows when guided (conditional half first).

        ``known`` (n, 3) normalised with ``known_mask`` (n,) bool: those pixels come back unchanged.
        """
        guided = settings.guided
        n = len(conds) // 2 if guided else len(conds)
        cond = conds.middle
        ids = torch.zeros(n, 3, dtype=torch.long, device=cond.device)
        caches = self.new_caches(cond) if use_cache else None
        for c in range(3):
            logits = self.channel_logits(cond, torch.cat([ids, ids]) if guided else ids, c, caches)
            logits = logits * settings.temperature  # released meaning: t multiplies the logits
            if guided:
                logits = guided_logits(logits[:n], logits[n:], cfg, settings.filter_threshold)
            ids[:, c] = sample_categorical(torch.softmax(logits, dim=-1), settings.generator)
        pixels = self.ids_to_pixels(ids)
        if known is not None and known_mask is not None:
            pixels = torch.where(known_mask[:, None], known.to(pixels.dtype), pixels)
        return pixels


def nats_to_bits(x: Tensor) -> Tensor:
    return x / math.log(2)

"""AR level: a causal transformer over the patches of its input in raster order (docs/model.md#ar-level).

LlamaGen-style blocks with 2-D RoPE. Sequence ``[cond, patch_0, ..., patch_{L-1}]``; the output at
position s conditions patch s (teacher forcing), so every patch goes down to the next level.
Generation is sequential; with ``use_cache`` each step feeds one new token through a key/value cache.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fractalgen.models.conditions import Conditions, SampleSettings
from fractalgen.models.layers import ARBlock, KVCache, init_weights, rope_2d_table
from fractalgen.models.mar import NextLevel, StepHook
from fractalgen.models.patches import patchify, patchify_mask, unpatchify
from fractalgen.sampling_settings import GuidanceSchedule, parse_schedule


class ARLevel(nn.Module):
    def __init__(
        self,
        *,
        seq_len: int,
        patch_size: int,
        cond_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        dropout: float = 0.1,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.grad_checkpointing = grad_checkpointing
        self.patch_emb = nn.Linear(3 * patch_size**2, dim)
        self.patch_emb_ln = nn.LayerNorm(dim, eps=1e-6)
        self.pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len + 1, dim))
        self.cond_emb = nn.Linear(cond_dim, dim)
        self.blocks = nn.ModuleList(ARBlock(dim, num_heads, dropout=dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.init_buffers()
        nn.init.normal_(self.pos_embed_learned, std=0.02)
        self.apply(init_weights)

    def init_buffers(self) -> None:
        """The 2-D RoPE table (not in checkpoints); rebuilt after loading on the meta device."""
        grid = int(round(self.seq_len**0.5))
        hd = self.patch_emb.out_features // self.num_heads
        self.register_buffer("rope", rope_2d_table(grid, hd), persistent=False)

    def _embed(self, patches: Tensor, conds: Conditions) -> Tensor:
        """Input tokens (B, 1 + L', D) for ``[cond, patches...]`` with position embedding and LN."""
        x = torch.cat([self.cond_emb(conds.middle).unsqueeze(1), self.patch_emb(patches)], dim=1)
        x = x + self.pos_embed_learned[:, : x.size(1)]
        return self.patch_emb_ln(x)

    def predict(self, patches: Tensor, conds: Conditions) -> Tensor:
        """Teacher forcing: the middle condition of every patch (B, L, D) from patches (B, L, 3p^2)."""
        x = self._embed(patches[:, :-1], conds)  # (B, L, D): cond + first L-1 patches
        rope = self.rope[: x.size(1)]
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        return self.norm(x)

    def forward(self, imgs: Tensor, conds: Conditions) -> tuple[Tensor, Conditions, Tensor | None]:
        """imgs (B, 3, S, S) -> (all patches (B*L, 3, p, p), their conditions (B*L, 1, D), None)."""
        p = self.patch_size
        patches = patchify(imgs, p)  # (B, L, 3p^2)
        middle = self.predict(patches, conds)  # (B, L, D)
        cond_next = Conditions(middle.reshape(-1, 1, middle.size(-1)))  # (B*L, 1, D)
        if conds.valid is not None:  # mask buckets above: every patch of a padding row is padding
            cond_next = replace(
                cond_next,
                valid=conds.valid.repeat_interleave(self.seq_len),
                num_valid=None if conds.num_valid is None else conds.num_valid * self.seq_len,
            )
        return patches.reshape(-1, 3, p, p), cond_next, None

    def _known_step(
        self,
        h: Tensor,
        step: int,
        full: Tensor,
        kp: Tensor,
        km: Tensor,
        cfg_step: Tensor,
        settings: SampleSettings,
        next_level: NextLevel,
    ) -> Tensor:
        """Patch ``step`` of every image (n, 3p^2) when some are known: known ones are copied, the
        others (partly known ones included) are generated from their rows of ``h``."""
        p = self.patch_size
        new = torch.where(full[:, step, None], kp[:, step], torch.zeros_like(kp[:, step]))
        todo = ~full[:, step]  # (n,)
        if bool(todo.any()):
            sel = torch.cat([todo, todo]) if settings.guided else todo
            sub_known = kp[todo, step].reshape(-1, 3, p, p)
            sub_mask = km[todo, step].reshape(-1, p, p)
            out = next_level(Conditions(h[sel].unsqueeze(1)), cfg_step[todo], sub_known, sub_mask, settings)
            new[todo] = out.reshape(out.size(0), -1).to(new.dtype)
        return new

    @torch.no_grad()
    def sample(
        self,
        conds: Conditions,
        *,
        num_iter: int,
        cfg: Tensor,
        cfg_schedule: GuidanceSchedule | str,
        settings: SampleSettings,
        next_level: NextLevel,
        known: Tensor | None = None,
        known_mask: Tensor | None = None,
        use_cache: bool = True,
        on_step: StepHook | None = None,
        skip_unguided: bool = True,
    ) -> Tensor:
        """Generate n images (n, 3, S, S), normalised, one patch per step in raster order.

        ``num_iter`` is ignored: an AR level always takes ``seq_len`` steps. ``use_cache=False``
        recomputes the whole prefix each step (the reference the cached path must equal).
        ``cfg_schedule`` and ``skip_unguided`` as in ``MARLevel.sample``; a step left unguided still
        feeds both halves through the transformer (the cache needs every step of both), but the
        levels below it sample the conditional half only.
        """
        del num_iter
        schedule = parse_schedule(cfg_schedule)
        guided = settings.guided
        n = len(conds) // 2 if guided else len(conds)
        L, p = self.seq_len, self.patch_size
        device, dtype = conds.vectors.device, conds.vectors.dtype
        rows_all = n * 2 if guided else n
        patches = torch.zeros(n, L, 3 * p * p, device=device, dtype=dtype)
        full = torch.zeros(n, L, dtype=torch.bool, device=device)
        kp = km = None
        if known is not None and known_mask is not None:
            kp = patchify(known.to(dtype), p)
            km = patchify_mask(known_mask, p)
            full = km.all(dim=-1)

        caches = None
        if use_cache:
            hd = self.patch_emb.out_features // self.num_heads
            caches = [KVCache(rows_all, self.num_heads, L, hd, conds.vectors) for _ in self.blocks]
        for step in range(L):
            inp = torch.cat([patches, patches]) if guided else patches
            if use_cache:
                # one new token: the condition at step 0, else the patch sampled at step - 1
                if step == 0:
                    tok = self.cond_emb(conds.middle)
                else:
                    tok = self.patch_emb(inp[:, step - 1])
                x = self.patch_emb_ln(tok.unsqueeze(1) + self.pos_embed_learned[:, step : step + 1])
                rope = self.rope[step : step + 1]
                for block, cache in zip(self.blocks, caches or []):
                    x = block(x, rope, cache)
                h = self.norm(x)[:, 0]  # (rows, D)
            else:
                x = self._embed(inp[:, :step], conds)
                rope = self.rope[: step + 1]
                for block in self.blocks:
                    x = block(x, rope)
                h = self.norm(x)[:, -1]
            cfg_step = schedule.weight(cfg, step + 1, L, step, L)
            step_settings = settings.at_step(step, L, unguided=skip_unguided and not schedule.active(step, L))
            if step_settings.guided != guided:
                h = h[:n]  # the conditional half
            if kp is None:  # nothing known: every row gets a patch (no selection, no device sync)
                out = next_level(Conditions(h.unsqueeze(1)), cfg_step, None, None, step_settings)
                patches[:, step] = out.reshape(n, -1).to(dtype)
            else:
                patches[:, step] = self._known_step(
                    h, step, full, kp, km, cfg_step, step_settings, next_level
                )
            if on_step is not None:
                done = torch.zeros(n, L, dtype=torch.bool, device=device)
                done[:, : step + 1] = True
                on_step(unpatchify(patches, p), done)
        return unpatchify(patches, p)

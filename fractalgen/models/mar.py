"""MAR level: a bidirectional transformer over its input's patches in random order (docs/model.md#mar-level).

Token sequence: ``[guiding pixel (if used), cond_4, ..., cond_0, patch_0 ... patch_{L-1}]``; masked
patches are replaced by ``mask_token``. Training masks a truncated-normal fraction of each image's
patches (rate r ~ TN(1, 0.25) on [0, 1]); only masked patches and their conditions go down.
Generation unmasks patches over ``num_iter`` steps on a cosine schedule (MAR, Li et al. 2024).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fractalgen.models.conditions import Conditions, SampleSettings
from fractalgen.models.layers import Block, init_weights
from fractalgen.models.patches import neighbour_conditions, patchify, patchify_mask, unpatchify
from fractalgen.models.pixel_head import PixelHead
from fractalgen.sampling_settings import GuidanceSchedule, parse_schedule

# (conds, cfg per row, known sub-images (M,3,p,p) | None, known masks (M,p,p) | None, the step's
# settings) -> (M,3,p,p); conds has 2M rows when the step's settings are guided
NextLevel = Callable[[Conditions, Tensor, Tensor | None, Tensor | None, SampleSettings], Tensor]

# called after each generation step with the canvas so far (n, 3, S, S) and the done patches (n, L)
StepHook = Callable[[Tensor, Tensor], None]

# masking-rate distribution: truncated normal, mean 1.0, std 0.25, bounds -4 and 0 std (docs/model.md#masking)
_MASK_MEAN, _MASK_STD, _MASK_LO, _MASK_HI = 1.0, 0.25, -4.0, 0.0


def sample_mask_rates(n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """Mask rates r ~ TN(1.0, 0.25) truncated to [0, 1], by inverse-CDF sampling (n,)."""
    lo = torch.special.ndtr(torch.tensor(_MASK_LO, dtype=torch.float64))
    hi = torch.special.ndtr(torch.tensor(_MASK_HI, dtype=torch.float64))
    u = torch.rand(n, dtype=torch.float64, device=device, generator=generator)
    z = torch.special.ndtri(lo.to(device) + u * (hi - lo).to(device))
    return (_MASK_MEAN + _MASK_STD * z).clamp(0.0, 1.0)


def random_ranks(
    n: int, seq_len: int, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """rank[b, pos] = place of ``pos`` in image b's random order (n, L); masking the first k of the
    order is ``rank < k``."""
    order = torch.rand(n, seq_len, device=device, generator=generator).argsort(dim=1)
    return order.argsort(dim=1)


class MARLevel(nn.Module):
    def __init__(
        self,
        *,
        seq_len: int,
        patch_size: int,
        cond_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        num_conds: int = 5,
        guiding_pixel: bool = False,
        guiding_pixel_head: tuple[int, int, int] = (128, 3, 4),
        attn_dropout: float = 0.1,
        proj_dropout: float = 0.1,
        grad_checkpointing: bool = False,
        mask_buckets: int = 0,
    ) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.mask_buckets = mask_buckets
        self.patch_size = patch_size
        self.num_conds = num_conds
        self.guiding_pixel = guiding_pixel
        self.grad_checkpointing = grad_checkpointing
        self.num_prefix = num_conds + int(guiding_pixel)

        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_emb = nn.Linear(3 * patch_size**2, dim)
        self.patch_emb_ln = nn.LayerNorm(dim, eps=1e-6)
        self.cond_emb = nn.Linear(cond_dim, dim)
        if guiding_pixel:
            self.pix_proj = nn.Linear(3, dim)
        self.pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len + self.num_prefix, dim))
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, attn_dropout=attn_dropout, proj_dropout=proj_dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.pos_embed_learned, std=0.02)
        self.apply(init_weights)
        if guiding_pixel:
            # released: width 128, 3 blocks, 4 heads, red weight 5, conditioned on the incoming middle
            width, depth, heads = guiding_pixel_head
            self.guiding_pixel_loss = PixelHead(
                cond_dim, width=width, depth=depth, num_heads=heads, r_weight=5.0
            )

    # ------------------------------------------------------------------ transformer
    def predict(self, patches: Tensor, mask: Tensor, conds: Conditions) -> Tensor:
        """Five next-level conditions for every position: (B, L, 5, D).

        patches (B, L, 3p^2); mask (B, L) bool, True = masked; conds with B rows.
        """
        x = self.patch_emb(patches)  # (B, L, D)
        x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        # conditions are prepended one by one in the released code, so cond_0 ends nearest the patches
        prefix = [self.cond_emb(conds.vectors[:, : self.num_conds]).flip(1)]  # (B, C, D): c4..c0
        if self.guiding_pixel:
            assert conds.pixel is not None, "guiding-pixel level needs the guiding pixel"
            prefix.insert(0, self.pix_proj(conds.pixel.to(x.dtype)).unsqueeze(1))  # (B, 1, D)
        x = torch.cat([*prefix, x], dim=1) + self.pos_embed_learned  # (B, P+L, D)
        x = self.patch_emb_ln(x)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x)
        return neighbour_conditions(x[:, self.num_prefix :])  # (B, L, 5, D)

    # ------------------------------------------------------------------ training / NLL
    def draw_training_mask(self, batch: int, device: torch.device, *, on_host: bool) -> tuple[Tensor, Tensor]:
        """Training masking: ranks (B, L) on ``device`` and per-image masked counts (B,) (float, >= 1)
        on ``device``, or on the CPU when ``on_host`` (mask buckets: the total is then known without a
        device sync). Tests replace this to give both selection paths the same draws."""
        ranks = random_ranks(batch, self.seq_len, device)
        rates = sample_mask_rates(batch, torch.device("cpu") if on_host else device)
        return ranks, torch.ceil(self.seq_len * rates).clamp_(min=1)

    def bucket_size(self, batch: int, num_masked: int) -> int:
        """Rows passed down for ``num_masked`` masked patches of ``batch`` images: the next multiple of
        ceil(B*L / mask_buckets), at most B*L."""
        total = batch * self.seq_len
        step = -(-total // self.mask_buckets)
        return min(-(-num_masked // step) * step, total)

    def forward(self, imgs: Tensor, conds: Conditions) -> tuple[Tensor, Conditions, Tensor | None]:
        """imgs (B, 3, S, S) -> (masked patches (M, 3, p, p), their conditions, guiding-pixel loss).

        With ``mask_buckets`` in training, M is padded to a bucket size and the conditions carry
        ``valid`` (see ``_forward_bucketed``).
        """
        if self.training and self.mask_buckets > 0:
            return self._forward_bucketed(imgs, conds)
        B = imgs.size(0)
        p = self.patch_size
        patches = patchify(imgs, p)  # (B, L, 3p^2)
        if self.training:
            ranks, counts = self.draw_training_mask(B, imgs.device, on_host=False)
        else:
            ranks = random_ranks(B, self.seq_len, imgs.device)
            # NLL evaluation: one count m ~ U{1..L} for the batch (released ``random_masking_uniform``)
            m = torch.randint(1, self.seq_len + 1, (1,), device=imgs.device)
            counts = m.expand(B)
        mask = ranks < counts.unsqueeze(1)  # (B, L)

        gp_loss = None
        if self.guiding_pixel:
            pixel = imgs.mean(dim=(-2, -1))  # (B, 3) mean colour of this level's input
            gp_loss = self.guiding_pixel_loss(pixel, conds)
            conds = conds.with_pixel(pixel)

        cond_next = self.predict(patches, mask, conds)[mask]  # (M, 5, D)
        patches = patches[mask].reshape(-1, 3, p, p)  # (M, 3, p, p)
        return patches, Conditions(cond_next), gp_loss

    def _forward_bucketed(self, imgs: Tensor, conds: Conditions) -> tuple[Tensor, Conditions, Tensor | None]:
        """Training with mask buckets: the same masking as ``forward``, but the counts are drawn on
        the host, the masked rows are gathered by index (masked rows first, in boolean-indexing
        order) and padded with unmasked ones to ``bucket_size`` rows; ``valid`` marks the first M.

        Rows of ``conds`` past ``conds.num_valid`` (padding from the level above) mask nothing, so
        every masked row comes from a valid one and the valid rows stay a prefix at every level.
        """
        B = imgs.size(0)
        p = self.patch_size
        patches = patchify(imgs, p)  # (B, L, 3p^2)
        ranks, counts = self.draw_training_mask(B, imgs.device, on_host=True)
        counts = counts.cpu()  # the draw is on the host already: no device sync
        if conds.num_valid is not None and conds.num_valid < B:
            counts[conds.num_valid :] = 0
        # a host-side total (``tolist`` reads the CPU tensor directly: no device sync, no aten op)
        num_masked = int(sum(counts.tolist()))
        rows = self.bucket_size(B, num_masked)
        mask = ranks < counts.to(imgs.device, non_blocking=True).unsqueeze(1)  # (B, L)
        # stable sort: masked positions first, each group in row-major order, as ``x[mask]`` gives
        idx = torch.argsort((~mask).flatten().to(torch.int8), stable=True)[:rows]  # (rows,)

        gp_loss = None
        if self.guiding_pixel:
            pixel = imgs.mean(dim=(-2, -1))  # (B, 3)
            gp_loss = self.guiding_pixel_loss(pixel, conds)  # mean over conds.valid rows
            conds = conds.with_pixel(pixel)

        cond_all = self.predict(patches, mask, conds)  # (B, L, 5, D)
        cond_next = cond_all.flatten(0, 1).index_select(0, idx)  # (rows, 5, D)
        patches = patches.flatten(0, 1).index_select(0, idx).reshape(-1, 3, p, p)  # (rows, 3, p, p)
        valid = torch.arange(rows, device=imgs.device) < num_masked
        return patches, Conditions(cond_next, valid=valid, num_valid=num_masked), gp_loss

    # ------------------------------------------------------------------ generation
    def _scheduled(self, step: int, num_iter: int) -> int:
        """Cosine schedule: patches still masked after ``step`` (before the per-image clamps)."""
        return math.floor(self.seq_len * math.cos(math.pi / 2.0 * (step + 1) / num_iter))

    def _sample_uniform(
        self,
        patches: Tensor,
        order: Tensor,
        conds: Conditions,
        num_iter: int,
        cfg: Tensor,
        schedule: GuidanceSchedule,
        settings: SampleSettings,
        skip_unguided: bool,
        next_level: NextLevel,
        on_step: StepHook | None,
    ) -> Tensor:
        """Generation when no patch is known: the same steps as the general loop in ``sample`` (same
        random draws, same row order, same images) without a device sync.

        All images have the same masked count at every step, so the counts live on the host and the
        patches of a step are gathered by index: ``order`` (n, L) lists each image's positions in
        its random order; a step predicts ``order[:, next:now]``, sorted so that rows come out image by
        image in position order, as boolean indexing gives them. The next level then gets a row
        count known in advance (fixed shapes per step: no ``nonzero``, ``item`` or boolean indexing).
        """
        n, L, width = patches.shape
        p = self.patch_size
        ranks = order.argsort(dim=1)
        masked_now = L
        for step in range(num_iter):
            if masked_now == 0:
                break
            # the released schedule: the guidance of the last step uses the clamped count too
            scheduled_count = max(min(masked_now - 1, self._scheduled(step, num_iter)), 1)
            next_count = 0 if step == num_iter - 1 else scheduled_count
            cfg_step = schedule.weight(cfg, L - scheduled_count, L, step, num_iter)
            step_settings = settings.at_step(
                step, num_iter, unguided=skip_unguided and not schedule.active(step, num_iter)
            )
            guided = step_settings.guided
            k = masked_now - next_count
            if k > 0:
                mask = ranks < masked_now  # (n, L)
                inp_patches = torch.cat([patches, patches]) if guided else patches
                inp_mask = torch.cat([mask, mask]) if guided else mask
                step_conds = conds if guided or not settings.guided else conds.select(slice(0, n))
                cond_all = self.predict(inp_patches, inp_mask, step_conds)  # (n or 2n, L, 5, D)
                pos = order[:, next_count:masked_now].sort(dim=1).values  # (n, k)
                pos_all = torch.cat([pos, pos]) if guided else pos
                C, D = cond_all.shape[-2:]
                picked = cond_all.gather(1, pos_all[:, :, None, None].expand(-1, -1, C, D))  # (R, k, C, D)
                new = next_level(
                    Conditions(picked.flatten(0, 1)),
                    cfg_step[:, None].expand(n, k).reshape(-1),
                    None,
                    None,
                    step_settings,
                )
                patches = patches.scatter(
                    1, pos[:, :, None].expand(-1, -1, width), new.reshape(n, k, width).to(patches.dtype)
                )
            masked_now = next_count
            if on_step is not None:
                on_step(unpatchify(patches, p), ranks >= masked_now)
        return patches

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
        on_step: StepHook | None = None,
        skip_unguided: bool = True,
    ) -> Tensor:
        """Generate n images (n, 3, S, S), normalised; ``conds`` has 2n rows when guided.

        ``cfg`` (n,) is the guidance scale per image; ``cfg_schedule`` its schedule over the steps
        (fractalgen/sampling_settings.py). With ``skip_unguided``, a step the schedule leaves unguided
        runs only the conditional half (the caller sets it when the levels below then guide neither).
        ``on_step`` sees the canvas after each step.
        ``known`` (n, 3, S, S) / ``known_mask`` (n, S, S):
        fully known patches are fixed from the start, partly known ones are passed down.
        """
        schedule = parse_schedule(cfg_schedule)
        guided = settings.guided
        n = len(conds) // 2 if guided else len(conds)
        L, p = self.seq_len, self.patch_size
        device = conds.vectors.device
        gen = settings.generator
        dtype = conds.vectors.dtype

        patches = torch.zeros(n, L, 3 * p * p, device=device, dtype=dtype)
        full = torch.zeros(n, L, dtype=torch.bool, device=device)  # patches given entirely
        kp = km = None
        if known is not None and known_mask is not None:
            kp = patchify(known.to(dtype), p)  # (n, L, 3p^2)
            km = patchify_mask(known_mask, p)  # (n, L, p^2)
            full = km.all(dim=-1)
            patches = torch.where(full.unsqueeze(-1), kp, patches)

        if self.guiding_pixel:
            pixel = self.guiding_pixel_loss.sample(conds, cfg, settings)  # (n, 3)
            conds = conds.with_pixel(torch.cat([pixel, pixel]) if guided else pixel)

        # known patches go last in the order so that the masked set is always a prefix of it
        keys = torch.rand(n, L, device=device, generator=gen).masked_fill(full, 2.0)
        num_iter = min(L, num_iter)
        if kp is None:
            # nothing known: every image has the same counts, so they are computed on the host
            patches = self._sample_uniform(
                patches, keys.argsort(dim=1), conds, num_iter, cfg, schedule, settings, skip_unguided,
                next_level, on_step,
            )  # fmt: skip
            return unpatchify(patches, p)
        ranks = keys.argsort(dim=1).argsort(dim=1)
        mask = ~full  # (n, L): still to generate
        for step in range(num_iter):
            masked_now = mask.sum(dim=1)  # (n,)
            if not bool(masked_now.any()):
                break
            scheduled = self._scheduled(step, num_iter)
            # at least one stays masked for the next step, at most all but one of the current ones
            next_count = torch.clamp(torch.clamp(masked_now - 1, max=scheduled), min=1)
            if step == num_iter - 1:
                to_pred, mask_next = mask, torch.zeros_like(mask)
            else:
                mask_next = ranks < next_count.unsqueeze(1)
                to_pred = mask & ~mask_next
            cfg_step = schedule.weight(cfg, L - next_count.to(cfg.dtype), L, step, num_iter)
            step_settings = settings.at_step(
                step, num_iter, unguided=skip_unguided and not schedule.active(step, num_iter)
            )
            step_guided = step_settings.guided
            if bool(to_pred.any()):
                inp_patches = torch.cat([patches, patches]) if step_guided else patches
                inp_mask = torch.cat([mask, mask]) if step_guided else mask
                step_conds = conds if step_guided or not guided else conds.select(slice(0, n))
                cond_all = self.predict(inp_patches, inp_mask, step_conds)  # (n or 2n, L, 5, D)
                sel = torch.cat([to_pred, to_pred]) if step_guided else to_pred
                rows = to_pred.nonzero(as_tuple=True)[0]  # image index of each predicted patch
                sub_known = kp[to_pred].reshape(-1, 3, p, p)
                sub_mask = km[to_pred].reshape(-1, p, p) if km is not None else None
                new = next_level(
                    Conditions(cond_all[sel]), cfg_step[rows], sub_known, sub_mask, step_settings
                )
                patches[to_pred] = new.reshape(new.size(0), -1).to(dtype)
            mask = mask_next
            if on_step is not None:
                on_step(unpatchify(patches, p), ~mask)
        return unpatchify(patches, p)

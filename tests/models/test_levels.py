"""Level mechanics checked against independent computations (NumPy / float64 / explicit loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fractalgen.models import build_model
from fractalgen.models.ar import ARLevel
from fractalgen.models.conditions import Conditions, SampleSettings
from fractalgen.models.layers import Attention, apply_rope, rope_2d_table
from fractalgen.models.mar import MARLevel, sample_mask_rates
from fractalgen.models.patches import neighbour_conditions, patchify, unpatchify
from fractalgen.models.pixel_head import PixelHead


def test_patchify_layout_is_channel_first_raster() -> None:
    imgs = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    p = 4
    out = patchify(imgs, p)
    assert out.shape == (2, 4, 48)
    for b in range(2):
        for gy in range(2):
            for gx in range(2):
                for c in range(3):
                    for y in range(p):
                        for x in range(p):
                            v = out[b, gy * 2 + gx, c * p * p + y * p + x]
                            assert v == imgs[b, c, gy * p + y, gx * p + x]
    assert torch.equal(unpatchify(out, p), imgs)


def test_neighbour_conditions_are_shifted_middles_with_zero_border() -> None:
    B, g, D = 2, 3, 5
    middle = torch.randn(B, g * g, D)
    out = neighbour_conditions(middle).numpy()
    m = middle.numpy().reshape(B, g, g, D)
    for r in range(g):
        for c in range(g):
            pos = r * g + c
            expect = [
                m[:, r, c],
                m[:, r - 1, c] if r > 0 else np.zeros((B, D)),  # top
                m[:, r, c + 1] if c < g - 1 else np.zeros((B, D)),  # right
                m[:, r + 1, c] if r < g - 1 else np.zeros((B, D)),  # bottom
                m[:, r, c - 1] if c > 0 else np.zeros((B, D)),  # left
            ]
            for k in range(5):
                np.testing.assert_array_equal(out[:, pos, k], expect[k])


def test_sdpa_attention_equals_explicit_softmax() -> None:
    torch.manual_seed(0)
    for causal in (False, True):
        attn = Attention(32, 4, causal=causal).double().eval()
        x = torch.randn(3, 7, 32, dtype=torch.float64)
        qkv = attn.qkv(x).reshape(3, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = q @ k.transpose(-1, -2) / math.sqrt(8)
        if causal:
            scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
        ref = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(3, 7, 32))
        torch.testing.assert_close(attn(x), ref, rtol=1e-10, atol=1e-10)


def test_rope_rows_then_columns_and_zero_prefix() -> None:
    table = rope_2d_table(grid_size=4, head_dim=8, num_prefix=1)
    assert table.shape == (17, 4, 2)
    assert torch.equal(table[0], torch.zeros(4, 2))  # condition token: zero rotation
    # grid cell (row 2, col 3) = index 1 + 2*4 + 3; pairs 0-1 rotate with the row, 2-3 with the column
    cell = table[1 + 2 * 4 + 3].double()
    freqs = 1.0 / (10000 ** (np.arange(0, 4, 2) / 4))
    angles = np.concatenate([2 * freqs, 3 * freqs])
    np.testing.assert_allclose(cell[:, 0], np.cos(angles), atol=1e-6)
    np.testing.assert_allclose(cell[:, 1], np.sin(angles), atol=1e-6)
    x = torch.randn(1, 17, 2, 8)
    assert torch.count_nonzero(apply_rope(x, table)[:, 0]) == 0  # zeroed query/key of the condition


def _ar_level(**kw: object) -> ARLevel:
    torch.manual_seed(0)
    return ARLevel(seq_len=16, patch_size=2, cond_dim=8, dim=32, depth=2, num_heads=2, **kw).eval()  # type: ignore[arg-type]


def test_ar_level_is_causal() -> None:
    level = _ar_level()
    patches = torch.randn(2, 16, 12)
    conds = Conditions(torch.randn(2, 1, 8))
    out = level.predict(patches, conds)  # output s predicts patch s from patches < s
    j = 9
    changed = patches.clone()
    changed[:, j] += 1.0
    out2 = level.predict(changed, conds)
    torch.testing.assert_close(out2[:, : j + 1], out[:, : j + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(out2[:, j + 1 :], out[:, j + 1 :])


def _deterministic_next_level(p: int):
    """A stand-in for the lower levels: a fixed function of the middle condition."""
    proj = torch.randn(32, 3 * p * p, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def next_level(conds: Conditions, cfg: torch.Tensor, known, known_mask, settings) -> torch.Tensor:
        mid = conds.middle
        n = mid.size(0) // 2 if mid.size(0) != cfg.size(0) else mid.size(0)
        out = torch.tanh(mid[:n] @ proj) * cfg[:, None]
        return out.view(n, 3, p, p)

    return next_level


@pytest.mark.parametrize("guided", [False, True])
def test_cached_ar_sampling_equals_uncached_recomputation(guided: bool) -> None:
    level = _ar_level().double()  # float64: the comparison is exact up to rounding
    n = 3
    conds = Conditions(torch.randn(2 * n if guided else n, 1, 8, dtype=torch.float64))
    settings = SampleSettings(guided=guided)
    cfg = torch.full((n,), 2.0, dtype=torch.float64)
    kw = dict(num_iter=16, cfg=cfg, cfg_schedule="linear", settings=settings)
    nl = _deterministic_next_level(2)
    cached = level.sample(conds, next_level=nl, use_cache=True, **kw)  # type: ignore[arg-type]
    plain = level.sample(conds, next_level=nl, use_cache=False, **kw)  # type: ignore[arg-type]
    assert cached.shape == (n, 3, 8, 8)
    torch.testing.assert_close(cached, plain, rtol=1e-9, atol=1e-9)


def test_cached_ar_sampling_equals_uncached_in_full_model() -> None:
    model = build_model("fractalar_tiny16").eval()
    level = model.generator
    original = level.sample
    labels = torch.tensor([0, 3])
    a = model.sample(labels, seed=5, cfg=1.5)
    level.sample = lambda *args, **kw: original(*args, **kw, use_cache=False)  # type: ignore[method-assign]
    b = model.sample(labels, seed=5, cfg=1.5)
    assert torch.equal(a, b)


def test_mar_training_masks_only_masked_patches_go_down() -> None:
    torch.manual_seed(0)
    level = MARLevel(seq_len=16, patch_size=2, cond_dim=8, dim=16, depth=1, num_heads=2).train()
    imgs = torch.randn(64, 3, 8, 8)
    patches, conds, gp = level(imgs, Conditions(torch.randn(64, 5, 8)))
    assert gp is None
    assert patches.shape[1:] == (3, 2, 2) and conds.vectors.shape == (patches.size(0), 5, 16)
    # every patch that goes down is one of the image's patches
    flat = patchify(imgs, 2).reshape(-1, 12)
    same = (patches.reshape(-1, 1, 12) == flat.unsqueeze(0)).all(dim=-1)  # (M, B*L)
    assert torch.all(same.sum(dim=1) == 1)
    # masking rate ~ TN(1, 0.25) on [0, 1]: mean 1 - 0.25*sqrt(2/pi) ~ 0.80
    frac = patches.size(0) / (64 * 16)
    assert 0.7 < frac < 0.9


def test_mask_rates_follow_truncated_normal() -> None:
    from scipy import stats

    r = sample_mask_rates(200_000, torch.device("cpu"), torch.Generator().manual_seed(0)).numpy()
    ref = stats.truncnorm(-4, 0, loc=1.0, scale=0.25)
    assert r.min() >= 0 and r.max() <= 1
    assert abs(r.mean() - ref.mean()) < 2e-3 and abs(r.std() - ref.std()) < 2e-3
    assert stats.kstest(r, ref.cdf).pvalue > 1e-3


def test_pixel_head_loss_equals_hand_computed_weighted_cross_entropy() -> None:
    torch.manual_seed(0)
    head = PixelHead(cond_dim=8, width=16, depth=2, num_heads=2, r_weight=5.0)
    ids = torch.randint(0, 256, (40, 3))
    pixels = head.ids_to_pixels(ids)  # exactly on the 8-bit grid: the N(0, 0.01) noise cannot move them
    conds = Conditions(torch.randn(40, 5, 8))
    logits = head.predict(ids, conds.middle).double().detach().numpy()  # (N, 3, 256)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, ids.numpy()[..., None], axis=-1)[..., 0]  # (N, 3)
    head.train()
    expect_train = ((5.0 * ce[:, 0] + ce[:, 1] + ce[:, 2]) / 7.0).mean()
    assert head(pixels, conds).item() == pytest.approx(expect_train, rel=1e-5)
    head.eval()
    assert head(pixels, conds).item() == pytest.approx(ce.mean(), rel=1e-5)


def test_pixel_head_targets_round_denormalised_values() -> None:
    head = PixelHead(cond_dim=4, width=8, depth=1, num_heads=2)
    ids = torch.tensor([[0, 128, 255], [17, 3, 250]])
    assert torch.equal(head.pixels_to_ids(head.ids_to_pixels(ids), noise=True), ids)


@pytest.mark.parametrize("name", ["fractalmar_tiny32", "fractalar_tiny16", "fractalmar_tiny16"])
def test_nll_is_the_sum_of_its_parts(name: str) -> None:
    """bits/dim = (pixel-head CE + guiding-pixel CEs) / ln 2, each term the mean of the 3 CEs."""
    model = build_model(name).eval()
    x = torch.rand(4, 3, model.config.img_size, model.config.img_size) * 2 - 1
    torch.manual_seed(11)
    nll = model.nll_bpd(x, num_passes=1).item()
    torch.manual_seed(11)
    terms = model.loss_terms(x, torch.zeros(4, dtype=torch.long))
    expect = {"pixel"}
    if model.config.guiding_pixel:
        expect |= {f"guiding_pixel_{i}" for i in range(1, model.config.num_levels)}
    assert set(terms) == expect
    assert nll == pytest.approx(sum(t.item() for t in terms.values()) / math.log(2), rel=1e-6)
    # walk the levels by hand with the same random draws: every level's term adds up to the NLL
    torch.manual_seed(11)
    conds = Conditions(model.fake_latent.expand(4, -1).unsqueeze(1).expand(-1, model.config.num_conds, -1))
    node, imgs, parts = model, x, []
    while not isinstance(node, PixelHead):
        imgs, conds, gp = node.generator(imgs, conds)
        if gp is not None:
            parts.append(gp.item())
        node = node.next_fractal
    parts.append(node(imgs.reshape(-1, 3), conds).item())
    assert nll == pytest.approx(sum(parts) / math.log(2), rel=1e-6)
    # averaging passes: the mean of per-pass values
    vals = []
    torch.manual_seed(3)
    for _ in range(3):
        vals.append(model.nll_bpd(x, num_passes=1).item())
    torch.manual_seed(3)
    assert model.nll_bpd(x, num_passes=3).item() == pytest.approx(np.mean(vals), rel=1e-6)


def test_evaluation_is_unconditional_and_training_drops_labels() -> None:
    model = build_model("fractalmar_tiny16", label_drop_prob=0.5)
    model.eval()
    c = model.label_conditions(torch.tensor([1, 2, 3]))
    assert torch.equal(c.vectors[:, 0], model.fake_latent.expand(3, -1))
    model.train()
    torch.manual_seed(0)
    c = model.label_conditions(torch.full((4000,), 2))
    dropped = (c.vectors[:, 0] == model.fake_latent).all(dim=1).float().mean().item()
    assert 0.45 < dropped < 0.55
    assert c.vectors.shape == (4000, 5, 64)


def _hand_mar_sequence(level: MARLevel, patches: torch.Tensor, mask: torch.Tensor, conds: Conditions):
    """docs/model.md#mar-level, by hand in float64: [guiding pixel, cond_4, ..., cond_0, patches] with
    masked patches replaced by mask_token, + pos_embed, LayerNorm, pre-norm ViT blocks, final norm."""

    def lin(x: torch.Tensor, m: torch.nn.Linear) -> torch.Tensor:
        return x @ m.weight.T + m.bias

    def ln(x: torch.Tensor, m: torch.nn.LayerNorm) -> torch.Tensor:
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-6) * m.weight + m.bias

    B, L, _ = patches.shape
    tokens = []
    for b in range(B):
        seq = []
        if level.guiding_pixel:
            seq.append(lin(conds.pixel[b], level.pix_proj))
        for k in (4, 3, 2, 1, 0):
            seq.append(lin(conds.vectors[b, k], level.cond_emb))
        for i in range(L):
            seq.append(level.mask_token[0, 0] if mask[b, i] else lin(patches[b, i], level.patch_emb))
        tokens.append(torch.stack(seq))
    x = ln(torch.stack(tokens) + level.pos_embed_learned, level.patch_emb_ln)
    for blk in level.blocks:
        h = ln(x, blk.norm1)
        H = blk.attn.num_heads
        hd = x.size(-1) // H
        q, k, v = lin(h, blk.attn.qkv).reshape(B, -1, 3, H, hd).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        x = x + lin(att.transpose(1, 2).reshape(B, -1, H * hd), blk.attn.proj)
        h = lin(ln(x, blk.norm2), blk.mlp.fc1)
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        x = x + lin(h, blk.mlp.fc2)
    return ln(x, level.norm)[:, level.num_prefix :]  # (B, L, D): the patch positions


@pytest.mark.parametrize("name", ["fractalmar_tiny16", "fractalmar_tiny32"])  # tiny32: guiding pixel
def test_mar_predict_matches_hand_built_sequence(name: str) -> None:
    torch.manual_seed(0)
    level = build_model(name).next_fractal.generator.double().eval()
    assert isinstance(level, MARLevel) and level.guiding_pixel == (name == "fractalmar_tiny32")
    with torch.no_grad():  # move every parameter off its init (zero biases, unit norms hide mistakes)
        for prm in level.parameters():
            prm.add_(0.1 * torch.randn_like(prm))
    B, L, p = 3, level.seq_len, level.patch_size
    patches = torch.randn(B, L, 3 * p * p, dtype=torch.float64)
    mask = torch.rand(B, L) < 0.5
    cond_dim = level.cond_emb.in_features
    # five different conditions, so their order in the sequence matters
    conds = Conditions(
        torch.randn(B, 5, cond_dim, dtype=torch.float64), torch.randn(B, 3, dtype=torch.float64)
    )
    with torch.no_grad():
        out = level.predict(patches, mask, conds)
        ref = _hand_mar_sequence(level, patches, mask, conds)
    assert out.shape == (B, L, 5, ref.size(-1))
    torch.testing.assert_close(out, neighbour_conditions(ref), rtol=1e-10, atol=1e-10)


def test_nll_mask_is_one_uniform_count_per_batch() -> None:
    """docs/model.md#masking: NLL evaluation masks one count m ~ U{1..L} for the whole batch, the
    first m positions of each image's own random order (training draws a count per image)."""
    model = build_model("fractalmar_tiny16")
    top, low = model.generator, model.next_fractal.generator
    seen: dict[str, list[torch.Tensor]] = {"top": [], "low": []}
    for key, level in (("top", top), ("low", low)):
        original = level.predict

        def spy(patches, mask, conds, _original=original, _key=key):  # type: ignore[no-untyped-def]
            seen[_key].append(mask.clone())
            return _original(patches, mask, conds)

        level.predict = spy  # type: ignore[method-assign]
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    passes = 160
    model.nll_bpd(x, num_passes=passes)
    assert len(seen["top"]) == len(seen["low"]) == passes
    counts = []
    for mask_top, mask_low in zip(seen["top"], seen["low"]):
        per_image = mask_top.sum(dim=1)
        assert torch.all(per_image == per_image[0])  # one count for the batch
        assert mask_low.size(0) == 4 * int(per_image[0])  # the masked patches go down
        assert torch.all(mask_low.sum(dim=1) == mask_low.sum(dim=1)[0])  # the lower level too
        counts.append(int(per_image[0]))
    L = top.seq_len
    assert set(counts) == set(range(1, L + 1))  # every count 1..L occurs (P(miss) ~ 16 * e^-10)
    freq = np.bincount(counts, minlength=L + 1)[1:] / passes
    assert np.abs(freq - 1 / L).max() < 0.08  # roughly uniform
    # the positions are each image's own random order, not one shared set
    assert any(not torch.equal(m[0], m[1]) for m in seen["top"] if 0 < int(m[0].sum()) < L)
    # training draws a count per image
    seen["top"].clear()
    model.train()
    for _ in range(10):
        model(x, torch.zeros(4, dtype=torch.long))
    assert any(len(set(m.sum(dim=1).tolist())) > 1 for m in seen["top"])

"""Sampling: CFG with the filter, temperature, schedules, seeds, conditional prediction."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from fractalgen.models import IMAGENET_MEAN, IMAGENET_STD, build_model
from fractalgen.models.conditions import Conditions, SampleSettings
from fractalgen.models.mar import MARLevel
from fractalgen.models.pixel_head import PixelHead, guided_logits


def numpy_cfg(lc: np.ndarray, lu: np.ndarray, w: float, thr: float) -> np.ndarray:
    """docs/model.md#temperature-and-filter: raise l_u where p_c < thr, then l_u + w (l_c - l_u); float64."""
    pc = np.exp(lc - lc.max(-1, keepdims=True))
    pc /= pc.sum(-1, keepdims=True)
    lifted = np.maximum(lu, lc - lc.max(-1, keepdims=True) + lu.max(-1, keepdims=True))
    lu2 = np.where(pc < thr, lifted, lu)
    return lu2 + w * (lc - lu2)


@pytest.mark.parametrize("w, thr", [(1.0, 1e-4), (4.0, 1e-4), (29.0, 1e-2), (2.5, 0.0)])
def test_cfg_with_filter_matches_numpy(w: float, thr: float) -> None:
    rng = np.random.default_rng(0)
    lc = rng.normal(0, 4, (16, 256))
    lu = rng.normal(0, 4, (16, 256))
    out = guided_logits(torch.from_numpy(lc), torch.from_numpy(lu), w, thr).numpy()
    np.testing.assert_allclose(out, numpy_cfg(lc, lu, w, thr), rtol=1e-12, atol=1e-12)
    # a per-row guidance scale gives each row its own formula
    ws = rng.uniform(1, 5, 16)
    out = guided_logits(torch.from_numpy(lc), torch.from_numpy(lu), torch.from_numpy(ws), thr).numpy()
    ref = np.stack([numpy_cfg(lc[i : i + 1], lu[i : i + 1], ws[i], thr)[0] for i in range(16)])
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_pixel_head_sampling_distribution_uses_temperature_then_cfg() -> None:
    """Empirical frequencies of the R channel match softmax(cfg(t * l_c, t * l_u))."""
    torch.manual_seed(0)
    head = PixelHead(cond_dim=8, width=16, depth=1, num_heads=2).eval()
    with torch.no_grad():  # make the distributions peaky enough for the filter to matter
        head.r_mlm.bias.copy_(torch.randn(1, 256) * 3)
    c_cond, c_unc = torch.randn(1, 8), torch.randn(1, 8)
    n = 20_000
    conds = Conditions(torch.cat([c_cond.expand(n, -1), c_unc.expand(n, -1)]).unsqueeze(1))
    t, w, thr = 1.3, 3.0, 1e-3
    settings = SampleSettings(
        guided=True, temperature=t, filter_threshold=thr, generator=torch.Generator().manual_seed(1)
    )
    pixels = head.sample(conds, w, settings)
    ids = head.pixels_to_ids(pixels, noise=False)[:, 0].numpy()
    freq = np.bincount(ids, minlength=256) / n
    logits = (
        head.predict(torch.zeros(2, 3, dtype=torch.long), torch.cat([c_cond, c_unc])).detach().double()[:, 0]
    )
    lg = numpy_cfg(t * logits[0:1].numpy(), t * logits[1:2].numpy(), w, thr)[0]
    p = np.exp(lg - lg.max())
    p /= p.sum()
    assert 0.5 * np.abs(freq - p).sum() < 0.03  # total variation


@pytest.mark.parametrize("name", ["fractalmar_tiny16", "fractalar_tiny16", "fractalmar_tiny32"])
def test_samples_valid_shape_range_and_seeded(name: str) -> None:
    model = build_model(name)
    labels = torch.tensor([0, 5, 9])
    kw = dict(num_iters=(3,) * model.config.num_levels, cfg=2.0, temperature=1.1)
    a = model.sample(labels, seed=1, **kw)
    b = model.sample(labels, seed=1, **kw)
    c = model.sample(labels, seed=2, **kw)
    S = model.config.img_size
    assert a.shape == (3, 3, S, S) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a * 255, (a * 255).round())  # 8-bit values
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert model.training  # sampling restores the caller's mode


def test_sampling_rejects_bad_settings() -> None:
    model = build_model("fractalmar_tiny16")
    with pytest.raises(ValueError, match="num_iters"):
        model.sample(torch.tensor([0]), num_iters=(4,))
    with pytest.raises(ValueError, match="labels"):
        model.sample(torch.tensor([10]))
    with pytest.raises(ValueError, match="cfg_schedule"):
        model.sample(torch.tensor([0]), cfg_schedule="cubic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        model.sample(torch.tensor([0]), temperature=0.0)


def test_mar_schedule_and_linear_guidance() -> None:
    """Step s of n: next masked = floor(L cos(pi/2 (s+1)/n)) clamped to [1, masked-1]; guidance
    1 + (w-1)(L - next)/L; every position predicted exactly once."""
    torch.manual_seed(0)
    L, n_iter, w = 16, 5, 7.0
    level = MARLevel(seq_len=L, patch_size=1, cond_dim=4, dim=8, depth=1, num_heads=2).eval()
    calls: list[tuple[int, float]] = []

    def next_level(conds: Conditions, cfg: torch.Tensor, known, known_mask, settings) -> torch.Tensor:
        m = len(conds) // 2
        calls.append((m, float(cfg[0])))
        assert torch.all(cfg == cfg[0])
        return torch.full((m, 3, 1, 1), float(len(calls)))

    out = level.sample(
        Conditions(torch.randn(4, 5, 4)),
        num_iter=n_iter,
        cfg=torch.full((2,), w),
        cfg_schedule="linear",
        settings=SampleSettings(guided=True),
        next_level=next_level,
    )
    masked, expect = L, []
    for s in range(n_iter):
        nxt = max(1, min(masked - 1, math.floor(L * math.cos(math.pi / 2 * (s + 1) / n_iter))))
        pred = masked if s == n_iter - 1 else masked - nxt
        expect.append((2 * pred, 1 + (w - 1) * (L - nxt) / L))  # 2 images per call
        masked = nxt
    assert [c[0] for c in calls] == [e[0] for e in expect]
    assert [c[1] for c in calls] == pytest.approx([e[1] for e in expect])
    # each image got every step's value at as many positions as predicted then
    vals = out[:, 0].reshape(2, L)
    for step, (count, _) in enumerate(expect, start=1):
        assert int((vals == step).sum()) == count


def _masks(S: int) -> dict[str, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    centre = (yy >= S // 4) & (yy < 3 * S // 4) & (xx >= S // 4) & (xx < 3 * S // 4)
    return {
        "inpaint": ~centre,  # known everywhere but a centre hole
        "outpaint": centre,  # known centre, generate the border
        "uncrop": xx < 3,  # a thin known strip, generate the rest
        "scattered": torch.rand(S, S, generator=torch.Generator().manual_seed(0)) < 0.3,
    }


@pytest.mark.parametrize("name", ["fractalmar_tiny16", "fractalar_tiny16", "fractalmar_tiny32"])
def test_conditional_prediction_keeps_known_pixels(name: str) -> None:
    model = build_model(name)
    S = model.config.img_size
    g = torch.Generator().manual_seed(0)
    for kind, m in _masks(S).items():
        known = torch.rand(2, 3, S, S, generator=g)
        known_mask = m.expand(2, S, S).clone()
        # class-conditional editing: the same image and mask with another label
        for labels in (torch.tensor([1, 2]), torch.tensor([7, 7])):
            out = model.sample(labels, seed=3, cfg=1.5, num_iters=(2,) * model.config.num_levels,
                               known=known, known_mask=known_mask)  # fmt: skip
            km = known_mask.unsqueeze(1).expand_as(out)
            assert torch.equal(out[km], known[km]), kind
            assert out.min() >= 0 and out.max() <= 1
            unknown = out[~km]
            assert torch.equal(unknown * 255, (unknown * 255).round())


def test_fully_known_image_is_returned_as_is() -> None:
    model = build_model("fractalmar_tiny32")
    known = torch.rand(1, 3, 32, 32)
    out = model.sample(
        torch.tensor([0]), seed=0, known=known, known_mask=torch.ones(1, 32, 32, dtype=torch.bool)
    )
    assert torch.equal(out, known)


@pytest.mark.parametrize("name, iters", [("fractalmar_tiny32", (3, 2, 2)), ("fractalar_tiny16", (2, 2))])
def test_on_step_shows_the_generation_process(name: str, iters: tuple[int, ...]) -> None:
    model = build_model(name)
    frames: list[tuple[torch.Tensor, torch.Tensor]] = []
    out = model.sample(torch.tensor([0, 1]), seed=0, num_iters=iters,
                       on_step=lambda im, done: frames.append((im.clone(), done.clone())))  # fmt: skip
    steps = iters[0] if model.config.generators[0] == "mar" else model.config.seq_len(0)
    assert len(frames) == steps
    fractions = [done.float().mean().item() for _, done in frames]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] < 1.0
    assert torch.equal(frames[-1][0], out)
    # pixels marked done keep their value in every later frame
    for (a, da), (b, _) in itertools.pairwise(frames):
        m = da.unsqueeze(1).expand_as(a)
        assert torch.equal(a[m], b[m])


@pytest.mark.parametrize(
    "name, overrides",
    [("fractalmar_tiny16", {}), ("fractalar_tiny16", {"img_sizes": (8, 2, 1)}), ("fractalmar_tiny32", {})],
)
@pytest.mark.parametrize("kind", ["left_half", "scattered"])
def test_generation_conditions_on_known_pixels(name: str, overrides: dict, kind: str) -> None:
    """The levels see the known pixels: with the same seed and labels, other known pixels give other
    generated pixels; and the known pixels are in place before ``sample`` overwrites them at the end."""
    model = build_model(name, **overrides)
    S = model.config.img_size
    raw: list[torch.Tensor] = []
    original = model._sample_level

    def spy(*args, **kw):  # type: ignore[no-untyped-def]
        out = original(*args, **kw)
        raw.append(out.clone())
        return out

    model._sample_level = spy  # type: ignore[method-assign]
    if kind == "left_half":  # whole patches known at every level
        m = (torch.arange(S) < S // 2).expand(S, S)
    else:  # partly known patches: the known pixels go down to the lower levels
        m = torch.rand(S, S, generator=torch.Generator().manual_seed(0)) < 0.5
    known_mask = m.expand(2, S, S).clone()
    g = torch.Generator().manual_seed(1)
    knowns = [torch.randint(0, 256, (2, 3, S, S), generator=g) / 255 for _ in range(2)]  # 8-bit values
    # temperature 30 sharpens the untrained pixel head's near-uniform distributions (logits ~0.1),
    # which otherwise barely react to their conditions under the same random draws
    kw = dict(seed=3, cfg=1.5, temperature=30.0, num_iters=(2,) * model.config.num_levels)
    outs = [model.sample(torch.tensor([1, 2]), known=k, known_mask=known_mask, **kw) for k in knowns]  # type: ignore[arg-type]
    km = known_mask.unsqueeze(1).expand(2, 3, S, S)
    assert not torch.equal(outs[0][~km], outs[1][~km])  # the generated pixels depend on the known ones
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert len(raw) == 2
    for out, k in zip(raw, knowns):
        ids = ((out.double() * std + mean) * 255).round()  # the levels' own (normalised) result
        assert torch.equal(ids[km], (k * 255).round().double()[km])


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_ar_guidance_schedule_and_constant_lower_levels(schedule: str) -> None:
    """docs/model.md#guidance: AR step s of L gets w_s = 1 + (w - 1)(s + 1)/L under "linear" (w under
    "constant"); the lower levels receive w_s as a constant."""
    model = build_model("fractalar_tiny16", img_sizes=(8, 2, 1))  # top L = 16, level 1 L = 4
    L, L1, w = model.config.seq_len(0), model.config.seq_len(1), 3.5
    level1, head = model.next_fractal.generator, model.next_fractal.next_fractal
    got1: list[tuple[torch.Tensor, str]] = []
    got_head: list[torch.Tensor] = []
    sample1, sample_head = level1.sample, head.sample

    def spy1(conds, *, cfg, cfg_schedule, **kw):  # type: ignore[no-untyped-def]
        got1.append((cfg.clone(), cfg_schedule))
        return sample1(conds, cfg=cfg, cfg_schedule=cfg_schedule, **kw)

    def spy_head(conds, cfg, *args, **kw):  # type: ignore[no-untyped-def]
        got_head.append(cfg.clone())
        return sample_head(conds, cfg, *args, **kw)

    level1.sample = spy1  # type: ignore[method-assign]
    head.sample = spy_head  # type: ignore[method-assign]
    model.sample(torch.tensor([0, 4, 9]), seed=0, cfg=w, cfg_schedule=schedule)  # type: ignore[arg-type]
    assert len(got1) == L and len(got_head) == L * L1
    for s, (cfg, sched) in enumerate(got1):
        expect = 1 + (w - 1) * (s + 1) / L if schedule == "linear" else w
        assert str(sched) == "constant"
        assert cfg.shape == (3,)
        assert cfg.tolist() == pytest.approx([expect] * 3, abs=1e-6)
        for h in got_head[s * L1 : (s + 1) * L1]:  # every step of level 1 passes w_s on unchanged
            assert h.tolist() == pytest.approx([expect] * 3, abs=1e-6)

"""Guidance and temperature schedules (fractalgen/sampling_settings.py, docs/model.md#guidance-schedules):
values at known steps against hand computations, the released ``linear`` arithmetic, skipping the
unconditional half on unguided steps, per-level guidance and the temperature ramp inside sampling."""

from __future__ import annotations

import math

import pytest
import torch

from fractalgen.models import build_model
from fractalgen.models.pixel_head import PixelHead
from fractalgen.sampling_settings import (
    Constant,
    Cosine,
    Interval,
    Linear,
    PowerCosine,
    SamplingSettings,
    parse_schedule,
    temperature_at,
)

W, L = 3.0, 16  # scale and patch count of the hand computations


@pytest.mark.parametrize(
    ("schedule", "done", "step", "steps", "expect"),
    [
        (Constant(), 4, 0, 8, 3.0),
        (Linear(), 4, 0, 8, 1 + 2 * 4 / 16),  # 1.5
        (Linear(), 16, 7, 8, 3.0),
        (Cosine(), 8, 3, 8, 1 + 2 * (1 - math.cos(math.pi / 2)) / 2),  # half done: 2.0
        (Cosine(), 4, 1, 8, 1 + (1 - math.cos(math.pi / 4))),
        (PowerCosine(exponent=2), 8, 3, 8, 1 + (1 - math.cos(math.pi / 4))),  # p^2 = 1/4
        (PowerCosine(exponent=0.5), 4, 1, 8, 1 + (1 - math.cos(math.pi / 2))),  # sqrt(1/4) = 1/2
        (Interval(start=0.25, end=0.75), 1, 1, 8, 1.0),  # 1/8 < 0.25
        (Interval(start=0.25, end=0.75), 3, 2, 8, 3.0),  # 2/8 = 0.25: first guided step
        (Interval(start=0.25, end=0.75), 12, 5, 8, 3.0),  # 5/8 < 0.75
        (Interval(start=0.25, end=0.75), 13, 6, 8, 1.0),  # 6/8 = 0.75: the window is half-open
    ],
)
def test_schedule_values_by_hand(schedule, done: int, step: int, steps: int, expect: float) -> None:  # type: ignore[no-untyped-def]
    assert schedule.weight(W, done, L, step, steps) == pytest.approx(expect, abs=1e-12)
    # the same on a tensor of per-image scales and counts (the inpainting path), in float64
    cfg = torch.full((3,), W, dtype=torch.float64)
    got = schedule.weight(cfg, torch.full((3,), float(done), dtype=torch.float64), L, step, steps)
    torch.testing.assert_close(
        torch.as_tensor(got, dtype=torch.float64).expand(3), torch.full((3,), expect, dtype=torch.float64)
    )


def test_linear_keeps_the_released_arithmetic_bit_for_bit() -> None:
    """The released code computes ``1 + (w - 1) * (L - n) / L`` in that order; ``linear`` must round alike."""
    cfg = torch.tensor([1.7, 2.3, 6.5, 13.0], dtype=torch.float32)
    for remaining in range(0, L + 1):
        released = 1 + (cfg - 1) * (L - torch.full((4,), float(remaining))) / L
        ours = Linear().weight(cfg, L - torch.full((4,), float(remaining)), L, 0, 1)
        assert torch.equal(ours, released)
        assert torch.equal(Linear().weight(cfg, L - remaining, L, 0, 1), 1 + (cfg - 1) * (L - remaining) / L)
    assert Constant().weight(cfg, 3, L, 0, 1) is cfg  # constant hands the scale on untouched


@pytest.mark.parametrize(
    "spec",
    ["constant", "linear", "cosine", "power-cosine:exponent=3", "interval:start=0.1,end=0.6", "power-cosine"],
)
def test_specs_round_trip(spec: str) -> None:
    s = parse_schedule(spec)
    assert parse_schedule(str(s)) == s
    assert str(s).split(":")[0] == spec.split(":")[0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cubic", "unknown guidance schedule 'cubic'"),
        ("power-cosine:exponent=0", "exponent must be > 0"),
        ("power-cosine:power=2", "not a parameter of power-cosine"),
        ("interval:start=0.8,end=0.2", "0 <= start < end <= 1"),
        ("interval:start=abc", "start must be a number"),
        ("cosine:exponent=2", "not a parameter of cosine"),
    ],
)
def test_bad_specs_name_the_problem(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_schedule(spec)
    with pytest.raises(ValueError, match="cfg_schedule"):
        SamplingSettings(cfg_schedule=spec)


def test_settings_round_trip_through_tags() -> None:
    s = SamplingSettings(
        num_iters=(8, 4), cfg=4.0, cfg_schedule="interval:start=0.2,end=0.8", lower_cfg=1.5,
        lower_cfg_schedule="linear", temperature=1.1, temperature_end=0.9, filter_threshold=1e-3,
    )  # fmt: skip
    tags = s.to_tags()
    assert tags["sampling.cfg_schedule"] == "interval:start=0.2,end=0.8"
    assert SamplingSettings.from_tags(tags) == s
    with pytest.raises(ValueError, match="sampling"):
        SamplingSettings.from_tags({"sampling.cfg_schedule": "wobbly"})


def test_temperature_ramp_by_hand() -> None:
    assert [temperature_at(1.0, 0.5, i, 6) for i in range(6)] == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    assert temperature_at(1.2, None, 3, 6) == 1.2


def _spy_pixel_head(model):  # type: ignore[no-untyped-def]
    """Record (rows, cfg, temperature, guided) of every pixel-head call, and the top level's predict rows."""
    head = model
    while not isinstance(head.next_fractal, PixelHead):
        head = head.next_fractal
    head = head.next_fractal
    calls: list[tuple[int, torch.Tensor, float, bool]] = []
    top_rows: list[int] = []
    sample_head, predict_top = head.sample, model.generator.predict

    def spy_head(conds, cfg, settings, *args, **kw):  # type: ignore[no-untyped-def]
        calls.append((len(conds), cfg.clone(), settings.temperature, settings.guided))
        return sample_head(conds, cfg, settings, *args, **kw)

    def spy_predict(*args, **kw):  # type: ignore[no-untyped-def]
        top_rows.append(args[0].size(0))
        return predict_top(*args, **kw)

    head.sample = spy_head  # type: ignore[method-assign]
    model.generator.predict = spy_predict  # type: ignore[method-assign]
    return calls, top_rows


@pytest.mark.parametrize("known", [False, True])
def test_interval_skips_the_unconditional_forward_on_unguided_steps(known: bool) -> None:
    torch.manual_seed(0)
    model = build_model("fractalmar_tiny16").eval()
    n, steps = 3, 8
    calls, top_rows = _spy_pixel_head(model)
    kw: dict = {}
    if known:  # the inpainting path (per-image counts) skips the same way
        S = model.config.img_size
        mask = torch.zeros(n, S, S, dtype=torch.bool)
        mask[:, :2] = True
        kw = {"known": torch.rand(n, 3, S, S), "known_mask": mask}
    model.sample(torch.tensor([0, 1, 2]), seed=0, cfg=3.0, cfg_schedule="interval:start=0.25,end=0.75",
                 num_iters=(steps, 2), **kw)  # fmt: skip
    guided_steps = [i for i in range(steps) if 0.25 <= i / steps < 0.75]
    assert guided_steps == [2, 3, 4, 5]
    # the top level's transformer ran 2n rows on guided steps only, n on the others
    assert top_rows == [2 * n if i in guided_steps else n for i in range(len(top_rows))]
    assert len(top_rows) == steps
    # the pixel head guided exactly where its rows carry the unconditional half, with weight 3 or 1
    assert any(g for *_, g in calls) and not all(g for *_, g in calls)
    for rows, cfg, _, guided in calls:
        assert rows == (2 * len(cfg) if guided else len(cfg))
        assert torch.all(cfg == (3.0 if guided else 1.0))


def test_interval_that_guides_no_step_equals_unguided_sampling() -> None:
    """Every step skipped: the same computation as cfg = 1 (same rows, same draws), so the same images."""
    torch.manual_seed(1)
    model = build_model("fractalmar_tiny16").eval()
    labels = torch.tensor([0, 5, 9])
    never = model.sample(labels, seed=3, cfg=4.0, cfg_schedule="interval:start=0.9,end=1", num_iters=(4, 2))
    unguided = model.sample(labels, seed=3, cfg=1.0, num_iters=(4, 2))
    assert torch.equal(never, unguided)


@pytest.mark.parametrize("name", ["fractalmar_tiny16", "fractalar_tiny16"])
@pytest.mark.parametrize("spec", ["cosine", "power-cosine:exponent=3", "interval:start=0.2,end=0.6"])
def test_every_schedule_is_reproducible_by_seed(name: str, spec: str) -> None:
    torch.manual_seed(2)
    model = build_model(name).eval()
    labels = torch.tensor([1, 4])
    kw = {"cfg": 2.5, "cfg_schedule": spec, "num_iters": (3,) * model.config.num_levels,
          "lower_cfg": 1.5, "temperature_end": 0.8}  # fmt: skip
    a = model.sample(labels, seed=7, **kw)
    assert torch.equal(a, model.sample(labels, seed=7, **kw))
    assert not torch.equal(a, model.sample(labels, seed=8, **kw))
    assert not torch.equal(a, model.sample(labels, seed=7, cfg=2.5, num_iters=kw["num_iters"]))


def test_lower_levels_take_their_own_scale_and_schedule() -> None:
    """lower_cfg w' under linear over level 1's L1 steps: the pixel head of level-1 step s sees
    1 + (w' - 1)(s + 1)/L1 (AR level 1), whatever the top's weight."""
    torch.manual_seed(0)
    model = build_model("fractalar_tiny16", img_sizes=(8, 2, 1))  # top L = 16, level 1 L1 = 4
    L0, L1 = model.config.seq_len(0), model.config.seq_len(1)
    calls, _ = _spy_pixel_head(model)
    model.sample(torch.tensor([0, 4]), seed=0, cfg=5.0, lower_cfg=2.0, lower_cfg_schedule="linear")
    assert len(calls) == L0 * L1
    for i, (_, cfg, _, guided) in enumerate(calls):
        assert guided
        assert cfg.tolist() == pytest.approx([1 + (2.0 - 1) * (i % L1 + 1) / L1] * 2, abs=1e-6)


def test_lower_schedule_alone_shapes_the_received_weight() -> None:
    """Without lower_cfg, the levels below apply their schedule to the weight they receive."""
    torch.manual_seed(0)
    model = build_model("fractalar_tiny16", img_sizes=(8, 2, 1))
    L0, L1 = model.config.seq_len(0), model.config.seq_len(1)
    calls, _ = _spy_pixel_head(model)
    model.sample(torch.tensor([3]), seed=0, cfg=5.0, cfg_schedule="constant", lower_cfg_schedule="cosine")
    for i, (_, cfg, _, _) in enumerate(calls):
        p = (i % L1 + 1) / L1
        assert cfg.item() == pytest.approx(1 + 4 * (1 - math.cos(math.pi * p)) / 2, abs=1e-6)
    assert len(calls) == L0 * L1


def test_temperature_ramps_over_the_top_level_steps() -> None:
    torch.manual_seed(0)
    model = build_model("fractalmar_tiny16").eval()
    calls, _ = _spy_pixel_head(model)
    steps = 5
    model.sample(torch.tensor([2]), seed=0, num_iters=(steps, 3), temperature=1.2, temperature_end=0.8)
    temps = sorted({round(t, 9) for _, _, t, _ in calls}, reverse=True)
    assert temps == pytest.approx([1.2 - 0.1 * i for i in range(steps)])


def test_unconditional_models_refuse_lower_guidance() -> None:
    model = build_model("fractalmar_tiny16", num_classes=1)
    with pytest.raises(ValueError, match=r"lower_cfg must be 1\.0"):
        model.sample(torch.tensor([0]), lower_cfg=2.0)


def test_with_lower_cfg_the_guiding_pixel_of_level_one_keeps_the_top_weight() -> None:
    """fractalmar_tiny32 has guiding pixels: level 1's is sampled with the top step's weight, while the
    levels below guide with lower_cfg (here constant 1.25) down to the pixel head."""
    torch.manual_seed(0)
    model = build_model("fractalmar_tiny32").eval()
    level1 = model.next_fractal.generator
    seen: list[torch.Tensor] = []
    orig = level1.guiding_pixel_loss.sample

    def spy(conds, cfg, settings):  # type: ignore[no-untyped-def]
        seen.append(cfg.clone())
        return orig(conds, cfg, settings)

    level1.guiding_pixel_loss.sample = spy  # type: ignore[method-assign]
    calls, _ = _spy_pixel_head(model)
    steps, w = 4, 3.0
    model.sample(
        torch.tensor([1, 2]), seed=0, cfg=w, cfg_schedule="constant", lower_cfg=1.25, num_iters=(steps, 2, 2)
    )
    assert seen and all(torch.all(c == w) for c in seen)
    assert calls and all(torch.all(cfg == 1.25) for _, cfg, _, _ in calls)

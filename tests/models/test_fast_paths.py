"""The fast paths compute what the plain paths compute (docs/performance.md levers, issue 7).

- short-sequence ``math`` attention (the GPU path for huge batches of tiny sequences) vs SDPA;
- bf16 autocast vs float32 (within bf16 tolerance), same masks;
- selective activation checkpointing: same loss and gradients;
- cached pixel-head sampling vs full recomputation: same images with the same seed;
- bucketed masked-patch selection (``mask_buckets``) vs exact boolean selection: same loss and
  gradients with the same draws, fixed row counts below level 0, no host-syncing ops;
- sampling without known pixels (host-side counts, index gathers) vs the general loop that handles
  known pixels: same images with the same seed, and no host-syncing op.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fractalgen.models import build_model
from fractalgen.models.conditions import Conditions, SampleSettings
from fractalgen.models.layers import attend, attention_impl
from fractalgen.models.mar import MARLevel, sample_mask_rates
from fractalgen.models.pixel_head import PixelHead, sample_categorical


@pytest.mark.parametrize("causal", [False, True])
def test_math_attention_equals_sdpa(causal: bool) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(300, 4, 5, 16, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(
        attend(q, k, v, causal=causal, impl="math"),
        attend(q, k, v, causal=causal, impl="sdpa"),
        rtol=1e-12,
        atol=1e-12,
    )


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)  # same masks, orders and label drops on every path
    return model(x, y)


@pytest.mark.parametrize("name", ["fractalmar_tiny32", "fractalar_tiny16", "fractalmar_tiny16"])
def test_fast_path_loss_matches_plain_path(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, attn_dropout=0.0, proj_dropout=0.0)
    S = model.config.img_size
    x, y = torch.randn(6, 3, S, S), torch.randint(0, 10, (6,))
    with attention_impl("sdpa"):
        plain = _loss(model, x, y)
    with attention_impl("math"):
        math_loss = _loss(model, x, y)
    torch.testing.assert_close(math_loss, plain, rtol=1e-5, atol=1e-5)
    with attention_impl("math"), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = _loss(model, x, y)
    assert fast.dtype == torch.float32  # the output layers run in float32
    assert abs(fast.item() - plain.item()) / plain.item() < 2e-2  # bf16 tolerance


@pytest.mark.parametrize("levels", [(), (1,), (0, 1)])
def test_selective_checkpointing_keeps_loss_and_gradients(levels: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    base = build_model("fractalmar_tiny32", attn_dropout=0.0, proj_dropout=0.0)
    ckpt = build_model("fractalmar_tiny32", attn_dropout=0.0, proj_dropout=0.0, grad_checkpointing=True,
                       checkpoint_levels=levels)  # fmt: skip
    ckpt.load_state_dict(base.state_dict())
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    la, lb = _loss(base, x, y), _loss(ckpt, x, y)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb)
    for (n, pa), pb in zip(base.named_parameters(), ckpt.parameters()):
        if pa.grad is None:
            assert pb.grad is None, n
        else:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_cached_pixel_head_logits_equal_full_recompute() -> None:
    torch.manual_seed(0)
    head = PixelHead(cond_dim=8, width=32, depth=3, num_heads=4).double().eval()
    cond = torch.randn(50, 8, dtype=torch.float64)
    ids = torch.randint(0, 256, (50, 3))
    caches = head.new_caches(cond)
    for c in range(3):
        torch.testing.assert_close(
            head.channel_logits(cond, ids, c, caches),
            head.channel_logits(cond, ids, c, None),
            rtol=1e-10,
            atol=1e-10,
        )


@pytest.mark.parametrize("guided", [False, True])
def test_cached_pixel_head_sampling_gives_the_same_pixels(guided: bool) -> None:
    torch.manual_seed(0)
    head = PixelHead(cond_dim=8, width=32, depth=2, num_heads=4).double().eval()
    n = 200
    conds = Conditions(torch.randn(2 * n if guided else n, 1, 8, dtype=torch.float64))

    def run(use_cache: bool) -> torch.Tensor:
        settings = SampleSettings(guided=guided, temperature=1.1, generator=torch.Generator().manual_seed(5))
        return head.sample(conds, 3.0, settings, use_cache=use_cache)

    assert torch.equal(run(True), run(False))


def test_model_sampling_same_images_on_both_attention_paths() -> None:
    model = build_model("fractalmar_tiny32").double()
    labels = torch.tensor([1, 4])
    with attention_impl("sdpa"):
        a = model.sample(labels, seed=9, num_iters=(3, 2, 2), cfg=2.0)
    with attention_impl("math"):
        b = model.sample(labels, seed=9, num_iters=(3, 2, 2), cfg=2.0)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- mask buckets (opt-in, training)
class _FixedDraws:
    """Masking draws from a fixed table per level (row b always gets table row b), so the bucketed and
    the exact selection see the same ranks and counts for every real row."""

    def __init__(self) -> None:
        self.tables: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(
        self, level: MARLevel, batch: int, device: torch.device, *, on_host: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        L = level.seq_len
        key = (L, level.patch_size)
        if key not in self.tables:
            g = torch.Generator().manual_seed(1000 * L + level.patch_size)
            ranks = torch.rand(4096, L, generator=g).argsort(dim=1).argsort(dim=1)
            counts = torch.ceil(L * sample_mask_rates(4096, torch.device("cpu"), generator=g)).clamp_(min=1)
            self.tables[key] = (ranks, counts)
        ranks, counts = self.tables[key]
        return ranks[:batch].to(device), counts[:batch].clone().to("cpu" if on_host else device)


@pytest.fixture
def fixed_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = _FixedDraws()
    monkeypatch.setattr(
        MARLevel, "draw_training_mask", lambda self, b, d, *, on_host: draws(self, b, d, on_host=on_host)
    )
    # the pixel heads' rounding noise is drawn per row: the padded batch would draw other numbers
    original = PixelHead.pixels_to_ids
    monkeypatch.setattr(PixelHead, "pixels_to_ids", lambda self, pixels, noise: original(self, pixels, False))


# a MAR level above an AR level: the AR level passes the validity of its rows down
_MAR_AR = {"generators": ("mar", "ar"), "num_conds": 1}


def _pair(name: str, buckets: int, **overrides: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    base = build_model(name, attn_dropout=0.0, proj_dropout=0.0, **overrides).double()
    bucketed = build_model(
        name, attn_dropout=0.0, proj_dropout=0.0, mask_buckets=buckets, **overrides
    ).double()
    bucketed.load_state_dict(base.state_dict(), strict=True)  # same parameters: the state_dict is unchanged
    return base, bucketed


def _record_levels(model: torch.nn.Module) -> list[tuple[int, int, int | None, int]]:
    """(level seq_len, rows in, rows out, valid rows out) for every MAR level forward."""
    seen: list[tuple[int, int, int | None, int]] = []
    for m in model.modules():
        if isinstance(m, MARLevel):

            def hook(mod: MARLevel, args: tuple, out: tuple, seen=seen) -> None:
                seen.append((mod.seq_len, args[0].size(0), out[1].num_valid, out[0].size(0)))

            m.register_forward_hook(hook)
    return seen


@pytest.mark.parametrize("buckets", [1, 3, 8])
@pytest.mark.parametrize(
    ("name", "overrides"),
    [("fractalmar_tiny16", {}), ("fractalmar_tiny32", {}), ("fractalmar_tiny16", _MAR_AR)],
    ids=["tiny16", "tiny32", "tiny16-mar-ar"],
)
def test_bucketed_selection_keeps_loss_and_gradients(
    name: str, overrides: dict, buckets: int, fixed_draws: None
) -> None:
    base, bucketed = _pair(name, buckets, **overrides)
    S = base.config.img_size
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, S, S, dtype=torch.float64), torch.randint(0, 10, (4,))
    seen = _record_levels(bucketed)
    torch.manual_seed(2)
    ta = base.loss_terms(x, y)
    torch.manual_seed(2)
    tb = bucketed.loss_terms(x, y)
    assert any(valid < rows for _, _, valid, rows in seen)  # some level really was padded
    assert ta.keys() == tb.keys()
    # both models compute in float64 throughout (test_float64_model_computes_in_float64): the paths
    # differ only in summation order (padded rows), a few float64 ulps of values below 10
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=1e-12, msg=k)
    sum(ta.values()).backward()
    sum(tb.values()).backward()
    for (n, pa), pb in zip(base.named_parameters(), bucketed.parameters()):
        if pa.grad is None:
            assert pb.grad is None or not pb.grad.any(), n
        else:
            torch.testing.assert_close(pb.grad, pa.grad, rtol=0, atol=1e-12, msg=n)


class _Float32Ops(TorchDispatchMode):
    """Records every op that reads or writes a float32 tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if any(t.dtype == torch.float32 for t in tensors):
            self.ops.add(func.overloadpacket.__name__)
        return out


# what may stay float32 in a float64 model: the random draws of masks, orders and label drops (and
# comparisons of them), and the elementwise conversion of pixel values to 8-bit ids; no reduction or
# matrix product, whose summation order would depend on the CPU
_FLOAT32_ALLOWED = {"rand", "lt", "sort", "_to_copy", "mul", "add"}


@pytest.mark.parametrize("name", ["fractalmar_tiny16", "fractalar_tiny16", "fractalmar_tiny32"])
def test_float64_model_computes_in_float64(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, attn_dropout=0.0, proj_dropout=0.0, mask_buckets=3).double()
    S = model.config.img_size
    x, y = torch.randn(4, 3, S, S, dtype=torch.float64), torch.randint(0, 10, (4,))
    rec = _Float32Ops()
    with rec:
        sum(model.loss_terms(x, y).values()).backward()
    assert rec.ops <= _FLOAT32_ALLOWED, sorted(rec.ops - _FLOAT32_ALLOWED)


@pytest.mark.parametrize("name", ["fractalmar_tiny16", "fractalmar_tiny32"])
def test_bucketed_lower_levels_see_bucket_sizes_only(name: str) -> None:
    k = 4
    torch.manual_seed(0)
    model = build_model(name, mask_buckets=k).train()
    seen = _record_levels(model)
    heads: list[int] = []
    for m in model.modules():
        if isinstance(m, PixelHead):
            m.register_forward_pre_hook(lambda mod, args: heads.append(args[0].size(0)))
    S = model.config.img_size
    B = 3
    for seed in range(6):
        torch.manual_seed(seed)
        model(torch.randn(B, 3, S, S), torch.randint(0, 10, (B,))).backward()
    levels = model.config.num_levels
    assert len(seen) == 6 * levels
    outs = set()
    for i, (L, rows_in, valid, rows_out) in enumerate(seen):
        step = -(-rows_in * L // k)
        assert rows_out == rows_in * L or rows_out % step == 0, (rows_in, L, rows_out)
        assert valid is not None and 0 < valid <= rows_out < valid + step
        if i % levels == 0:
            assert rows_in == B
            outs.add(rows_out)
        else:
            assert rows_in == seen[i - 1][3]  # a level gets exactly the rows the level above passed down
    assert len(outs) <= k
    # the pixel head and the guiding-pixel heads only ever get a level's padded row counts
    assert set(heads) <= {r for _, _, _, r in seen} | {B}


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.syncing: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in (torch.ops.aten.nonzero.default, torch.ops.aten._local_scalar_dense.default):
            self.syncing.append(str(func))
        if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        ):
            self.syncing.append(f"boolean {func}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", ["fractalmar_tiny16", "fractalmar_tiny32"])
def test_bucketed_training_step_has_no_host_sync_ops(name: str) -> None:
    def run(buckets: int) -> list[str]:
        torch.manual_seed(0)
        model = build_model(name, mask_buckets=buckets).train()
        S = model.config.img_size
        x, y = torch.randn(2, 3, S, S), torch.tensor([1, 2])
        with _OpRecorder() as rec:
            model(x, y).backward()
        return rec.syncing

    assert run(0)  # the recorder does see the exact selection's syncs
    assert run(4) == []


def test_bucketed_model_evaluates_like_the_exact_one() -> None:
    base, bucketed = _pair("fractalmar_tiny32", 4)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.manual_seed(3)
    a = base.nll_bpd(x)
    torch.manual_seed(3)
    assert torch.equal(bucketed.nll_bpd(x), a)


# ---------------------------------------------------------------- sampling without device syncs
def _nothing_known(model: torch.nn.Module, n: int) -> dict[str, torch.Tensor]:
    S = model.config.img_size
    return {"known": torch.zeros(n, 3, S, S), "known_mask": torch.zeros(n, S, S, dtype=torch.bool)}


@pytest.mark.parametrize(
    ("name", "cfg", "schedule"),
    [
        ("fractalmar_tiny32", 2.5, "linear"),  # guiding pixels, guided
        ("fractalmar_tiny16", 1.0, "constant"),
        ("fractalar_tiny16", 3.0, "linear"),
    ],
)
def test_sync_free_sampling_gives_the_images_of_the_general_loop(
    name: str, cfg: float, schedule: str
) -> None:
    """With nothing known, ``sample`` takes the sync-free path; an all-False known mask sends the same
    request through the general loop (per-image counts, boolean selection). Same seed, same images."""
    torch.manual_seed(0)
    model = build_model(name).double()
    labels = torch.tensor([1, 4, 3])
    kw = {"seed": 9, "cfg": cfg, "cfg_schedule": schedule, "num_iters": (4, 3, 2)[: model.config.num_levels]}
    fast = model.sample(labels, **kw)
    general = model.sample(labels, **kw, **_nothing_known(model, 3))
    assert torch.equal(fast, general)
    assert not torch.equal(fast, model.sample(labels, **{**kw, "seed": 10}))  # the seed matters


@pytest.mark.parametrize("name", ["fractalmar_tiny32", "fractalar_tiny16"])
def test_sampling_without_known_pixels_has_no_host_sync_ops(name: str) -> None:
    model = build_model(name)
    labels = torch.tensor([1, 2])

    def syncing(**known: torch.Tensor) -> list[str]:
        with _OpRecorder() as rec:
            model.sample(labels, seed=0, cfg=2.0, **known)
        return rec.syncing

    assert syncing(**_nothing_known(model, 2))  # the recorder does see the general loop's syncs
    assert syncing() == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_categorical_draws_are_multinomials_draws(dtype: torch.dtype) -> None:
    """``sample_categorical`` skips ``torch.multinomial``'s device-syncing input checks but must draw
    the same ids from the same generator state (so seeds keep their images)."""
    probs = torch.rand(2000, 256, dtype=dtype).pow(6).softmax(-1)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3)).squeeze(1)
    assert torch.equal(sample_categorical(probs, torch.Generator().manual_seed(3)), expected)
    # and the distribution: frequencies of a 4-way law over many draws
    law = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=dtype)
    ids = sample_categorical(law.expand(200_000, 4), torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).to(dtype) / ids.numel()
    torch.testing.assert_close(freq, law, atol=5e-3, rtol=0)

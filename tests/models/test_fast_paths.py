"""The fast paths compute what the plain paths compute (PERF.md levers, issue 7).

- short-sequence ``math`` attention (the GPU path for huge batches of tiny sequences) vs SDPA;
- bf16 autocast vs float32 (within bf16 tolerance), same masks;
- selective activation checkpointing: same loss and gradients;
- cached pixel-head sampling vs full recomputation: same images with the same seed.
"""

from __future__ import annotations

import pytest
import torch

from fractalgen.models import build_model
from fractalgen.models.conditions import Conditions, SampleSettings
from fractalgen.models.layers import attend, attention_impl
from fractalgen.models.pixel_head import PixelHead


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

"""GPU checks of the fast paths, on the real device (skipped where there is no CUDA GPU, as in CI).

The CPU tests check the same properties with Triton's interpreter and an op recorder; these check
them where they matter: the Triton kernel compiled for the GPU at the pixel head's training scale,
SDPA's grid limit, and, with ``torch.cuda.set_sync_debug_mode("error")``, that sampling and the
bucketed training step really never wait for the GPU. Run them on a GPU machine with

    TRITON_INTERPRET=0 python -m pytest -q tests/models/test_cuda.py

(``bench/gpu_session.sh`` does, before the benchmarks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from fractalgen.models import build_model, tiny_attention
from fractalgen.models.layers import attend, attention_impl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextmanager
def no_device_sync() -> Iterator[None]:
    """Any operation that waits for the GPU raises inside the block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return attend(q.double(), k.double(), v.double(), causal=causal, impl="math")


@pytest.mark.parametrize(("D", "dtype"), [(16, torch.bfloat16), (32, torch.float32)])
def test_fused_kernel_at_pixel_head_training_scale(D: int, dtype: torch.dtype) -> None:
    """170,000 sequences of 4 tokens x 4 heads (a 64x64 micro-batch of 64,
    docs/performance.md#where-the-cost-is): 680,000 (sequence, head) pairs, ten times SDPA's grid limit.
    Output and gradients against float64."""
    assert not tiny_attention.available(torch.empty(0)), "run with TRITON_INTERPRET=0"
    torch.manual_seed(0)
    B, H, N = 170_000, 4, 4
    qkv = torch.randn(B, N, 3, H, D, device="cuda").to(dtype).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = attend(q, k, v, causal=True, impl="fused")
    ref_in = qkv.detach().double().requires_grad_()
    rq, rk, rv = ref_in.permute(2, 0, 3, 1, 4).unbind(0)
    ref = _reference(rq, rk, rv, True)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    grad = torch.randn_like(ref)
    (g,) = torch.autograd.grad((out.double() * grad).sum(), qkv)
    (rg,) = torch.autograd.grad((ref * grad).sum(), ref_in)
    torch.testing.assert_close(g.double(), rg, rtol=5 * tol, atol=5 * tol)


@pytest.mark.parametrize("N", [4, 80])
def test_auto_attention_past_the_grid_limit(N: int) -> None:
    """Batch x heads above 65,535: short sequences take batched matmuls, long ones SDPA in chunks."""
    torch.manual_seed(0)
    B = 70_000 if N == 4 else 17_000
    q, k, v = (torch.randn(B, 4, N, 16, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    torch.testing.assert_close(attend(q, k, v).double(), _reference(q, k, v, False), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", ["fractalmar_tiny32", "fractalar_tiny16"])
def test_sampling_never_waits_for_the_gpu_and_keeps_its_images(name: str) -> None:
    model = build_model(name).cuda()
    S = model.config.img_size
    labels = torch.tensor([1, 4, 3])
    model.sample(labels, cfg=2.0, seed=0)  # warm-up: library handles, allocations
    with no_device_sync():
        fast = model.sample(labels, cfg=2.0, generator=torch.Generator("cuda").manual_seed(9))
    known = {"known": torch.zeros(3, 3, S, S), "known_mask": torch.zeros(3, S, S, dtype=torch.bool)}
    general = model.sample(labels, cfg=2.0, generator=torch.Generator("cuda").manual_seed(9), **known)
    assert torch.equal(fast, general)
    with pytest.raises(RuntimeError), no_device_sync():  # the check does catch the general loop
        model.sample(labels, cfg=2.0, seed=1, **known)


def test_bucketed_training_step_never_waits_for_the_gpu() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    y = torch.randint(0, 1000, (4,), device="cuda")
    for buckets in (8, 0):
        model = build_model("fractalmar_in64", mask_buckets=buckets).cuda().train()
        with torch.autocast("cuda", dtype=torch.bfloat16), attention_impl("fused"):
            model(x, y).backward()  # warm-up: kernel compilation, library handles, allocations
            if buckets:
                with no_device_sync():
                    model(x, y).backward()
            else:  # the exact selection reads the masked count back: the check does catch it
                with pytest.raises(RuntimeError), no_device_sync():
                    model(x, y).backward()


def test_fused_training_loss_matches_sdpa_in_bf16() -> None:
    torch.manual_seed(0)
    model = build_model("fractalmar_in64", attn_dropout=0.0, proj_dropout=0.0).cuda().train()
    x = torch.randn(8, 3, 64, 64, device="cuda")
    y = torch.randint(0, 1000, (8,), device="cuda")
    losses = []
    for impl in ("fused", "sdpa"):
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16), attention_impl(impl):
            losses.append(model(x, y).item())
    assert abs(losses[0] - losses[1]) < 2e-2 * abs(losses[1]), losses

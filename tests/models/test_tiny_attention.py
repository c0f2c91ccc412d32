"""The fused tiny-sequence attention kernel (Triton) computes what the math path computes.

CI has no GPU, so the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py``), which executes the same kernel source on the CPU with Triton's language
rules (block shapes, masks, strides). The reference is a float64 computation of softmax(q k^T / sqrt(hd)) v and its gradients.
"""

from __future__ import annotations

import pytest
import torch

from fractalgen.models import build_model, tiny_attention
from fractalgen.models.conditions import Conditions
from fractalgen.models.layers import attend, attention_impl
from fractalgen.models.pixel_head import PixelHead

pytestmark = pytest.mark.skipif(
    not tiny_attention.available(torch.empty(0)), reason="needs Triton and TRITON_INTERPRET=1"
)


def _qkv(B: int, H: int, N: int, D: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q, k, v as the strided slices of a fused qkv projection (B, N, 3, H, D), like ``Attention``."""
    qkv = torch.randn(B, N, 3, H, D, dtype=torch.float64).to(dtype).requires_grad_()
    return (qkv, *qkv.permute(2, 0, 3, 1, 4).unbind(0))


@pytest.mark.parametrize(
    ("B", "H", "N", "D", "causal"),
    [
        (70, 4, 4, 16, True),  # the pixel head; 280 pairs = several programs and a partial one
        (9, 2, 3, 32, False),  # N not a power of two
        (5, 3, 16, 8, True),  # the longest sequence the kernel takes
        (4, 1, 5, 24, False),
    ],
)
def test_fused_attention_matches_float64_reference(B: int, H: int, N: int, D: int, causal: bool) -> None:
    torch.manual_seed(0)
    qkv, q, k, v = _qkv(B, H, N, D, torch.float32)
    out = tiny_attention.tiny_attention(q, k, v, causal)
    assert out.shape == (B, H, N, D) and out.dtype == torch.float32
    # the output is a view of the (B, N, H, D) layout, so the projection's reshape copies nothing
    assert out.transpose(1, 2).is_contiguous()
    ref_in = qkv.detach().double().requires_grad_()
    rq, rk, rv = ref_in.permute(2, 0, 3, 1, 4).unbind(0)
    scores = rq @ rk.transpose(-1, -2) / D**0.5
    if causal:
        scores = scores.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    ref = scores.softmax(-1) @ rv
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(ref)
    (g,) = torch.autograd.grad((out * grad_out.float()).sum(), qkv)
    (rg,) = torch.autograd.grad((ref * grad_out).sum(), ref_in)
    torch.testing.assert_close(g.double(), rg, rtol=1e-4, atol=1e-5)


def test_fused_attention_in_bf16_stays_within_bf16_tolerance() -> None:
    torch.manual_seed(1)
    _, q, k, v = _qkv(40, 4, 4, 32, torch.bfloat16)
    out = tiny_attention.tiny_attention(q, k, v, True)
    assert out.dtype == torch.bfloat16
    ref = attend(q.double(), k.double(), v.double(), causal=True, impl="math")
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_attend_takes_the_kernel_only_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    real = tiny_attention.tiny_attention

    def counted(q: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(tuple(q.shape))
        return real(q, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(tiny_attention, "tiny_attention", counted)
    x = torch.randn(3, 2, 4, 8)
    long = torch.randn(3, 2, 17, 8)
    attend(x, x, x, impl="fused")
    attend(x, x, x, impl="fused", dropout_p=0.1)  # dropout: math / SDPA
    attend(long, long, long, impl="fused")  # too long
    attend(x[:, :, :1], x, x, impl="fused")  # a cached sampling step (1 query, 4 keys)
    assert calls == [(3, 2, 4, 8)]
    monkeypatch.delenv("TRITON_INTERPRET")
    attend(x, x, x, impl="fused")  # a CPU tensor without the interpreter: the usual path
    assert len(calls) == 1


def test_pixel_head_loss_and_gradients_same_with_the_fused_kernel() -> None:
    torch.manual_seed(0)
    head = PixelHead(cond_dim=32, width=32, depth=2, num_heads=4).train()
    pixels, cond = torch.randn(300, 3), torch.randn(300, 1, 32)

    def loss_and_grads(impl: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(5)  # the same id noise on both paths
        with attention_impl(impl):
            loss = head(pixels, Conditions(cond))
        grads = torch.autograd.grad(loss, list(head.parameters()))
        return loss, list(grads)

    fused, fused_grads = loss_and_grads("fused")
    plain, plain_grads = loss_and_grads("math")
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_model_training_loss_same_with_the_fused_kernel() -> None:
    torch.manual_seed(0)
    model = build_model("fractalmar_tiny16", attn_dropout=0.0, proj_dropout=0.0).train()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 3])
    losses = []
    for impl in ("fused", "sdpa"):
        torch.manual_seed(2)
        with attention_impl(impl):
            losses.append(model(x, y))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)

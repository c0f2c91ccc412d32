"""Fused attention for huge batches of tiny sequences (Triton): the pixel head's 4 tokens.

A 64x64 training micro-batch of 64 images sends about 170,000 sequences of 4 tokens through each
pixel-head block (docs/performance.md#where-the-cost-is). The batched-matmul ``math`` path runs
five kernels per attention and writes the score and probability matrices to memory; this kernel
reads q, k and v once per (sequence, head), keeps scores and softmax in registers (float32) and
writes the output in the (B, N, H, hd) layout the output projection reads, so the transpose back is
free. The backward
kernel recomputes the probabilities from the saved log-sum-exp (as flash attention does).

Each program handles ``GB`` (sequence, head) pairs; the key loop is unrolled over the N <= 16
tokens, so everything is a 3-D register tile (no ``tl.dot``, which needs 16-wide tiles). Inputs may
be strided views (the q, k, v slices of the fused qkv projection) with a contiguous last dimension.

Used through ``layers.attend(impl="fused")`` (or ``attention_impl("fused")``) on CUDA; tests run
the same kernels on the CPU with Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is
imported, as ``tests/conftest.py`` does).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - every torch wheel with CUDA ships Triton
    triton = None

MAX_TOKENS = 16  # sequences longer than this take SDPA / the math path


def available(q: Tensor) -> bool:
    """Whether the fused kernels can run on ``q``'s device (CUDA, or the CPU under the interpreter)."""
    return triton is not None and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _fwd(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
         sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
         total, heads, scale,
         N: tl.constexpr, NP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, GB: tl.constexpr,
         CAUSAL: tl.constexpr):  # fmt: skip
    g = tl.program_id(0) * GB + tl.arange(0, GB)  # (sequence, head) pairs of this program
    b = g // heads
    h = g % heads
    i = tl.arange(0, NP)
    d = tl.arange(0, DP)
    gm = g < total
    m3 = gm[:, None, None] & (i < N)[None, :, None] & (d < D)[None, None, :]
    m2 = gm[:, None] & (d < D)[None, :]
    q_off = (b * sqb + h * sqh)[:, None, None] + i[None, :, None] * sqn + d[None, None, :]
    q = tl.load(q_ptr + q_off, mask=m3, other=0.0).to(tl.float32) * scale  # (GB, NP, DP)
    m_i = tl.full((GB, NP), float("-inf"), tl.float32)
    l_i = tl.zeros((GB, NP), tl.float32)
    acc = tl.zeros((GB, NP, DP), tl.float32)
    for j in tl.static_range(N):  # online softmax over the keys, one key per unrolled step
        kj = tl.load(k_ptr + (b * skb + h * skh + j * skn)[:, None] + d[None, :], mask=m2, other=0.0)
        vj = tl.load(v_ptr + (b * svb + h * svh + j * svn)[:, None] + d[None, :], mask=m2, other=0.0)
        s = tl.sum(q * kj.to(tl.float32)[:, None, :], axis=2)  # (GB, NP)
        if CAUSAL:
            s = tl.where(i[None, :] >= j, s, float("-inf"))
        m_new = tl.maximum(m_i, s)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, :, None] + p[:, :, None] * vj.to(tl.float32)[:, None, :]
        m_i = m_new
    o = acc / l_i[:, :, None]
    o_off = (b * sob + h * soh)[:, None, None] + i[None, :, None] * son + d[None, None, :]
    tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=m3)
    lse_off = g[:, None] * N + i[None, :]
    tl.store(lse_ptr + lse_off, m_i + tl.log(l_i), mask=gm[:, None] & (i < N)[None, :])


def _bwd(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
         sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdb, sdh, sdn, sgb, sgh, sgn,
         total, heads, scale,
         N: tl.constexpr, NP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, GB: tl.constexpr,
         CAUSAL: tl.constexpr):  # fmt: skip
    # dq, dk and dv share the layout (strides sg*) of a fresh (B, N, H, hd) buffer
    g = tl.program_id(0) * GB + tl.arange(0, GB)
    b = g // heads
    h = g % heads
    i = tl.arange(0, NP)
    d = tl.arange(0, DP)
    gm = g < total
    im = i < N
    m3 = gm[:, None, None] & im[None, :, None] & (d < D)[None, None, :]
    m2 = gm[:, None] & (d < D)[None, :]
    row = i[None, :, None]
    col = d[None, None, :]
    q = tl.load(q_ptr + (b * sqb + h * sqh)[:, None, None] + row * sqn + col, mask=m3, other=0.0)
    q = q.to(tl.float32) * scale
    o = tl.load(o_ptr + (b * sob + h * soh)[:, None, None] + row * son + col, mask=m3, other=0.0)
    do = tl.load(do_ptr + (b * sdb + h * sdh)[:, None, None] + row * sdn + col, mask=m3, other=0.0)
    do = do.to(tl.float32)
    delta = tl.sum(do * o.to(tl.float32), axis=2)  # (GB, NP): rowsum(dO * O)
    lse = tl.load(lse_ptr + g[:, None] * N + i[None, :], mask=gm[:, None] & im[None, :], other=0.0)
    dq = tl.zeros((GB, NP, DP), tl.float32)
    for j in tl.static_range(N):
        kj = tl.load(k_ptr + (b * skb + h * skh + j * skn)[:, None] + d[None, :], mask=m2, other=0.0)
        vj = tl.load(v_ptr + (b * svb + h * svh + j * svn)[:, None] + d[None, :], mask=m2, other=0.0)
        kj = kj.to(tl.float32)
        s = tl.sum(q * kj[:, None, :], axis=2)
        p = tl.exp(s - lse)  # (GB, NP): probabilities of key j for every query
        keep = im[None, :]
        if CAUSAL:
            keep = keep & (i[None, :] >= j)
        p = tl.where(keep, p, 0.0)
        dp = tl.sum(do * vj.to(tl.float32)[:, None, :], axis=2)
        ds = p * (dp - delta)
        dq += ds[:, :, None] * kj[:, None, :]
        out_j = (b * sgb + h * sgh + j * sgn)[:, None] + d[None, :]
        tl.store(dk_ptr + out_j, tl.sum(ds[:, :, None] * q, axis=1).to(dk_ptr.dtype.element_ty), mask=m2)
        tl.store(dv_ptr + out_j, tl.sum(p[:, :, None] * do, axis=1).to(dv_ptr.dtype.element_ty), mask=m2)
    dq_off = (b * sgb + h * sgh)[:, None, None] + row * sgn + col
    tl.store(dq_ptr + dq_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=m3)


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """The jitted kernels (compiled per shape and dtype on first launch)."""
    return triton.jit(_fwd), triton.jit(_bwd)


def _geometry(q: Tensor) -> dict[str, int]:
    N, D = q.shape[2:]
    NP = max(2, triton.next_power_of_2(N))
    DP = max(2, triton.next_power_of_2(D))
    GB = max(1, min(128, 4096 // (NP * DP)))  # about 4096 float32 values per register tile
    return {"N": N, "NP": NP, "D": D, "DP": DP, "GB": GB}


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _TinyAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        B, H, N, D = q.shape
        geo = _geometry(q)
        o = q.new_empty(B, N, H, D).transpose(1, 2)  # (B, H, N, D) view of the projection's layout
        lse = q.new_empty(B * H, N, dtype=torch.float32)
        fwd, _ = _kernels()
        grid = (triton.cdiv(B * H, geo["GB"]),)
        fwd[grid](q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                  B * H, H, D**-0.5, CAUSAL=causal, **geo)  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        return o

    @staticmethod
    def backward(ctx: Any, do: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q, k, v, o, lse = ctx.saved_tensors
        do = _last_dim_contiguous(do)
        B, H, N, D = q.shape
        geo = _geometry(q)
        dq, dk, dv = (q.new_empty(B, N, H, D).transpose(1, 2) for _ in range(3))
        _, bwd = _kernels()
        grid = (triton.cdiv(B * H, geo["GB"]),)
        bwd[grid](q, k, v, o, do, lse, dq, dk, dv,
                  *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(do), *_strides(dq),
                  B * H, H, D**-0.5, CAUSAL=ctx.causal, **geo)  # fmt: skip
        return dq, dk, dv, None


def tiny_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(hd)) v for (B, H, N, hd) tensors with N <= ``MAX_TOKENS`` (no dropout),
    scores and softmax in float32, output in the input dtype; differentiable."""
    if q.shape != k.shape or q.shape != v.shape or q.size(2) > MAX_TOKENS:
        raise ValueError(f"tiny_attention takes equal (B, H, N<={MAX_TOKENS}, hd) shapes, got {q.shape}")
    return _TinyAttention.apply(q, k, v, causal)

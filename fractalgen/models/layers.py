"""Transformer building blocks shared by the levels.

- ``Block``: the pre-norm ViT block of the MAR levels (timm naming: norm1/attn/norm2/mlp), with the
  bidirectional attention of MAR or, with ``causal=True``, the causal attention of the pixel head.
- ``ARBlock``: the LlamaGen-style block of the AR levels (RMSNorm, fused wqkv without bias, 2-D
  rotary embedding, SwiGLU), with an optional key/value cache for sequential sampling.

All attention goes through ``attend``: ``torch.nn.functional.scaled_dot_product_attention`` by
default, batched matmuls or the fused Triton kernel of ``tiny_attention`` for huge batches of tiny
sequences; with ``attn_dropout`` the dropout acts on the attention probabilities, as in the released
code.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fractalgen.models.tiny_attention as tiny_attention


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 if it is in a lower precision (bf16, fp16), else unchanged (float64 stays)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def init_weights(module: nn.Module) -> None:
    """Released initialisation: Linear xavier-uniform / bias 0, LayerNorm weight 1 / bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class KVCache:
    """Keys and values of the positions seen so far, for one AR block during sampling."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, like: Tensor) -> None:
        self.k = like.new_zeros(batch, heads, max_len, head_dim)
        self.v = like.new_zeros(batch, heads, max_len, head_dim)
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        n = k.size(2)
        self.k[:, :, self.length : self.length + n] = k
        self.v[:, :, self.length : self.length + n] = v
        self.length += n
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


# CUDA's flash / memory-efficient SDPA kernels fail once batch x heads passes the grid limit (torch 2.11,
# H100: docs/performance.md#where-the-cost-is),
# which the lower levels reach at training batch sizes (~170,000 pixel-head sequences per 64 images).
_SDPA_MAX_BATCH_HEADS = 65535
_DEFAULT_IMPL = ["auto"]
ATTENTION_IMPLS = ("auto", "sdpa", "math", "fused")


def set_attention_impl(impl: str) -> str:
    """Make ``impl`` (one of ``ATTENTION_IMPLS``) the default of every later ``attend`` call that does
    not name one, in this process (training workers: ``model.attention``); returns the previous one."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}")
    before = _DEFAULT_IMPL[0]
    _DEFAULT_IMPL[0] = impl
    return before


@contextmanager
def attention_impl(impl: str) -> Iterator[None]:
    """``set_attention_impl(impl)`` for the duration of the block."""
    before = set_attention_impl(impl)
    try:
        yield
    finally:
        _DEFAULT_IMPL[0] = before


def attend(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, dropout_p: float = 0.0,
           impl: str | None = None) -> Tensor:  # fmt: skip
    """Scaled dot-product attention of (B, H, N, hd) tensors.

    ``impl``: ``"sdpa"`` (``F.scaled_dot_product_attention``), ``"math"`` (explicit batched matmuls in
    the input dtype: the path for many short sequences, e.g. the pixel head's 4 tokens), ``"fused"``
    (the Triton kernel of ``tiny_attention`` for self-attention over at most 16 tokens without
    dropout on a GPU, e.g. the pixel head in training; anything else as ``"auto"``) or ``"auto"``
    (the default, changed with ``attention_impl``):
    SDPA unless the tensors are on a GPU with batch x heads above the kernels' grid limit, where
    sequences of up to 64 tokens take the math path and longer ones run SDPA in chunks.
    """
    B, H, N, hd = q.shape
    impl = impl or _DEFAULT_IMPL[0]
    if impl == "fused":
        if (
            dropout_p == 0
            and N <= tiny_attention.MAX_TOKENS
            and q.shape == k.shape == v.shape
            and tiny_attention.available(q)
        ):
            return tiny_attention.tiny_attention(q, k, v, causal)
        impl = "auto"
    if impl == "auto":
        impl = "sdpa"
        if q.is_cuda and B * H > _SDPA_MAX_BATCH_HEADS:
            if N <= 64:
                impl = "math"
            else:
                step = max(1, _SDPA_MAX_BATCH_HEADS // H)
                return torch.cat(
                    [attend(q[i : i + step], k[i : i + step], v[i : i + step], causal=causal,
                            dropout_p=dropout_p, impl="sdpa") for i in range(0, B, step)]
                )  # fmt: skip
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
    scores = (q * hd**-0.5) @ k.transpose(-1, -2)  # (B, H, N, N)
    if causal:
        scores = scores.masked_fill(
            torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1), float("-inf")
        )
    probs = torch.softmax(at_least_float32(scores), dim=-1).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv Linear (bias) and an output projection."""

    def __init__(
        self, dim: int, num_heads: int, *, attn_dropout: float = 0.0, proj_dropout: float = 0.0, causal: bool
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.causal = causal
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, hd)
        if cache is not None:
            # incremental decoding of a causal sequence: the new tokens come last, so they see all
            assert N == 1 or not self.causal, "cached causal attention takes one new token at a time"
            k, v = cache.append(k, v)
            x = attend(q, k, v)
        else:
            x = attend(q, k, v, causal=self.causal, dropout_p=self.attn_dropout if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout (timm Mlp naming: fc1, fc2)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x)). LayerNorm eps 1e-6."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(
            dim, num_heads, attn_dropout=attn_dropout, proj_dropout=proj_dropout, causal=causal
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout=proj_dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------- AR (LlamaGen) blocks


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (LlamaGen), weight initialised to 1."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = at_least_float32(x)
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def rope_2d_table(grid_size: int, head_dim: int, base: float = 10000.0, num_prefix: int = 1) -> Tensor:
    """2-D RoPE table (LlamaGen ``precompute_freqs_cis_2d``): (num_prefix + grid**2, head_dim/2, 2).

    The first half of each head's adjacent-element pairs rotates with the row index, the second half
    with the column index. Prefix (condition) tokens get an all-zero table, which zeroes their query
    and key (as in the released code).
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].double() / half))  # (hd/4,)
    t = torch.arange(grid_size, dtype=torch.float64)
    freqs = torch.outer(t, freqs)  # (G, hd/4)
    grid = torch.cat(
        [freqs[:, None, :].expand(-1, grid_size, -1), freqs[None, :, :].expand(grid_size, -1, -1)], dim=-1
    )  # (G, G, hd/2): row frequencies, then column frequencies
    table = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)  # (G*G, hd/2, 2)
    return torch.cat([torch.zeros(num_prefix, half, 2, dtype=table.dtype), table]).float()


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate adjacent pairs of ``x`` (B, N, H, hd) by ``table`` (N, hd/2, 2); at least float32."""
    xs = at_least_float32(x).reshape(*x.shape[:-1], -1, 2)  # (B, N, H, hd/2, 2)
    t = table.to(xs.dtype).view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack(
        [xs[..., 0] * t[..., 0] - xs[..., 1] * t[..., 1], xs[..., 1] * t[..., 0] + xs[..., 0] * t[..., 1]],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


class ARAttention(nn.Module):
    """Causal attention with fused wqkv (no bias), 2-D RoPE, output wo (no bias), residual dropout."""

    def __init__(self, dim: int, num_heads: int, resid_dropout: float = 0.1) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(self, x: Tensor, rope: Tensor, cache: KVCache | None = None) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.wqkv(x).split(C, dim=-1)
        q = apply_rope(q.view(B, N, self.num_heads, self.head_dim), rope)  # (B, N, H, hd)
        k = apply_rope(k.view(B, N, self.num_heads, self.head_dim), rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v.view(B, N, self.num_heads, self.head_dim)))
        if cache is not None:
            # new positions attend to every cached one and causally among themselves
            past = cache.length
            k, v = cache.append(k, v)
            if N == 1:  # the usual sampling step: the new token sees everything cached
                out = attend(q, k, v)
            else:
                mask = torch.ones(N, past + N, dtype=torch.bool, device=x.device).tril(diagonal=past)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = attend(q, k, v, causal=True)  # (B, H, N, hd)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.resid_dropout(self.wo(out))


def swiglu_hidden(dim: int, multiple_of: int = 256) -> int:
    """LlamaGen FFN width: 2/3 * 4 * dim rounded up to a multiple of 256."""
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases, dropout after w2."""

    def __init__(self, dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        hidden = swiglu_hidden(dim)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class ARBlock(nn.Module):
    """LlamaGen TransformerBlock: h = x + attn(RMSNorm(x)); out = h + ffn(RMSNorm(h))."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.attention = ARAttention(dim, num_heads, resid_dropout=dropout)
        self.feed_forward = FeedForward(dim, dropout=dropout)
        self.attention_norm = RMSNorm(dim, eps=1e-5)
        self.ffn_norm = RMSNorm(dim, eps=1e-5)

    def forward(self, x: Tensor, rope: Tensor, cache: KVCache | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, cache)
        return h + self.feed_forward(self.ffn_norm(h))

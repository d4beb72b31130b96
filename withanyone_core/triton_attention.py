"""Fused Triton kernel for region-restricted identity attention (inference fast path).

One program handles a block of query tokens for one (batch, head): it streams the
identity keys/values in blocks with an online softmax, and masks each key by looking up
whether the query may attend to the key's person (``allowed[b, query, key // t]``). The
``[S, n * t]`` boolean mask that SDPA needs is never built, and no NaN arises for
queries that attend to nobody (they get zeros).

Used by :func:`withanyone_core.attention.region_attention` for CUDA tensors without
gradients (the backward pass stays on SDPA). Runs on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the tests check it on machines without a GPU.
"""

from __future__ import annotations

import torch

try:  # triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None
    tl = None


if triton is not None:

    @triton.jit
    def _region_attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        allowed_ptr,
        out_ptr,
        S,
        N,
        P,
        tokens_per_person,
        heads,
        scale,
        stride_qb,
        stride_qh,
        stride_qs,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_ab,
        stride_as,
        stride_ob,
        stride_oh,
        stride_os,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        block_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // heads
        h = bh % heads
        offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < S

        q = tl.load(
            q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < N
            k = tl.load(
                k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=col_ok[:, None],
                other=0.0,
            )
            scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            person = offs_n // tokens_per_person
            allowed = tl.load(
                allowed_ptr + b * stride_ab + offs_m[:, None] * stride_as + person[None, :],
                mask=row_ok[:, None] & col_ok[None, :],
                other=0,
            )
            keep = (allowed != 0) & row_ok[:, None] & col_ok[None, :]
            scores = tl.where(keep, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(
                v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=col_ok[:, None],
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m_i = m_new

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None],
        )


def supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the kernel handles these inputs (head size a power of two from 16 to 128)."""
    d = q.shape[-1]
    return triton is not None and d in (16, 32, 64, 128) and q.dtype == k.dtype


def region_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    tokens_per_person: int,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    """Same contract as :func:`withanyone_core.attention.region_attention` (``allowed`` required)."""
    if triton is None:
        raise RuntimeError("Triton is not installed; use the SDPA path (region_attention)")
    b, h, s, d = q.shape
    n = k.shape[2]
    if allowed.shape != (b, s, n // tokens_per_person):
        raise ValueError(
            f"allowed must be [B, S, persons] = {(b, s, n // tokens_per_person)}, got {tuple(allowed.shape)}"
        )
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    allowed = allowed.to(torch.int8).contiguous()
    out = torch.empty_like(q)
    grid = (triton.cdiv(s, block_m), b * h)
    _region_attention_kernel[grid](
        q,
        k,
        v,
        allowed,
        out,
        s,
        n,
        allowed.shape[-1],
        tokens_per_person,
        h,
        d**-0.5,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        allowed.stride(0),
        allowed.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        HEAD_DIM=d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return out

"""Dense attention plus per-group column sums of its probabilities, as one Triton kernel.

Each program owns BLOCK_M query rows, which lie inside one query group (BLOCK_M divides the
group). It sweeps the keys twice: first for the row max and sum of the softmax, then for the
exact probabilities, which give the output (no rescaling needed) and the column sums of its
rows. Programs write their column sums as per-block partials; a group with several blocks is
summed afterwards, which keeps the result deterministic (no atomics). Only the tiles that may
hold keys past kv_len are masked: the first (peeled, see below) and the last.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparvar.attention.triton_sparse import LOG2E, _load_rows, row_descriptor, tma_ready
from sparvar.errors import SparvarError


@triton.jit
def _stats_tile(q, k, m_i, l_i, qk_scale, key_ok, MASKED: tl.constexpr):
    """Sweep 1: running row max and row sum of exp2 (log2 units; qk_scale > 0)."""
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(qk * qk_scale - m_new[:, None]), 1)
    return m_new, l_i


@triton.jit
def _probs_tile(q, k, v, acc, part_ptrs, qk_scale, shift, key_ok, MASKED: tl.constexpr,
                COLSUM: tl.constexpr):
    """Sweep 2: exact probabilities of one key tile, their column sums (stored), acc + P @ V."""
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
    p = tl.math.exp2(qk * qk_scale - shift[:, None])
    if COLSUM:
        if MASKED:
            tl.store(part_ptrs, tl.sum(p, 0), mask=key_ok)
        else:
            tl.store(part_ptrs, tl.sum(p, 0))
    return tl.dot(p.to(v.dtype), v, acc)


@triton.jit
def _attention_colsum_kernel(
    Q, K, V, O, PART,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_pb, stride_ph, stride_pm,
    H, q_len, kv_len, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    USE_TMA: tl.constexpr, COLSUM: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if USE_TMA:  # descriptors address by (b, h, row) themselves
        k_base, v_base = K, V
    else:
        k_base = K + b64 * stride_kb + h64 * stride_kh + offs_d[None, :]
        v_base = V + b64 * stride_vb + h64 * stride_vh + offs_d[None, :]
    n_full = kv_len // BLOCK_N * BLOCK_N  # tiles below n_full hold no key past kv_len

    # sweep 1: row max and row sum, in log2 units
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, n_full, BLOCK_N):
        k = _load_rows(K, k_base, b, h, n0, stride_kn, kv_len, BLOCK_N, HEAD_DIM, USE_TMA)
        m_i, l_i = _stats_tile(q, k, m_i, l_i, qk_scale, None, False)
    if n_full < kv_len:
        k = _load_rows(K, k_base, b, h, n_full, stride_kn, kv_len, BLOCK_N, HEAD_DIM, USE_TMA)
        m_i, l_i = _stats_tile(q, k, m_i, l_i, qk_scale, n_full + offs_n < kv_len, True)

    # sweep 2: exact probabilities; rows past q_len get shift +inf so they add nothing.
    # The first tile is peeled so the accumulator starts as a wgmma result: a zero-filled one
    # makes ptxas serialise every wgmma of the kernel (warning C7515).
    shift = tl.where(row_ok, m_i + tl.math.log2(l_i), float("inf"))
    part_row = PART + b64 * stride_pb + h64 * stride_ph + pid * stride_pm
    k = _load_rows(K, k_base, b, h, 0, stride_kn, kv_len, BLOCK_N, HEAD_DIM, USE_TMA)
    v = _load_rows(V, v_base, b, h, 0, stride_vn, kv_len, BLOCK_N, HEAD_DIM, USE_TMA)
    acc = _probs_tile(q, k, v, None, part_row + offs_n, qk_scale, shift, offs_n < kv_len, True, COLSUM)
    for n0 in range(BLOCK_N, n_full, BLOCK_N):
        k = _load_rows(K, k_base, b, h, n0, stride_kn, kv_len, BLOCK_N, HEAD_DIM, USE_TMA)
        v = _load_rows(V, v_base, b, h, n0, stride_vn, kv_len, BLOCK_N, HEAD_DIM, USE_TMA)
        acc = _probs_tile(q, k, v, acc, part_row + n0 + offs_n, qk_scale, shift, None, False, COLSUM)
    if BLOCK_N <= n_full and n_full < kv_len:
        k = _load_rows(K, k_base, b, h, n_full, stride_kn, kv_len, BLOCK_N, HEAD_DIM, USE_TMA)
        v = _load_rows(V, v_base, b, h, n_full, stride_vn, kv_len, BLOCK_N, HEAD_DIM, USE_TMA)
        acc = _probs_tile(q, k, v, acc, part_row + n_full + offs_n, qk_scale, shift, n_full + offs_n < kv_len,
                          True, COLSUM)

    tl.store(O + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])


def triton_attention_colsum(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: int,
    scale: float,
    *,
    block_n: int | None = None,
    num_stages: int | None = None,
    maxnreg: int | None = None,
    tma: bool = True,
    colsum: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of q (B, H, Lq, D) over k, v (B, H, Lk, D) and column sums per group.

    Returns (out (B, H, Lq, D) in q's dtype, colsum (B, H, ceil(Lq / group), Lk) float32), where
    colsum[..., g, j] sums softmax probabilities of key j over queries g*group .. g*group+group-1.
    group must be a multiple of 16. k, v may be strided views with a contiguous last dim.
    block_n, num_stages, maxnreg and tma are tuning knobs; colsum=False skips the column sums
    (returned as zeros) to measure what they cost.
    """
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise SparvarError(f"triton attention needs fp16 or bf16 q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (b, h) or k.shape[3] != d or d not in (64, 128):
        raise SparvarError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need one head dim of 64 or 128")
    if q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        raise SparvarError("triton attention needs the head dim of q, k and v to be contiguous")
    if not scale > 0:
        raise SparvarError(f"softmax scale must be positive, got {scale}")
    block_m = min(group & -group, 128)
    if block_m < 16:
        raise SparvarError(f"query group must be a multiple of 16, got {group}")
    block_n = block_n or block_m
    num_stages = num_stages or (2 if block_m * block_n > 64 * 64 else 3)  # shared memory bound
    subs = group // block_m  # program blocks per group
    groups = -(-lq // group)
    use_tma = tma and tma_ready(k) and tma_ready(v)

    out = torch.empty_like(q)
    # blocks past the last query stay zero in the partials
    alloc = torch.zeros if not colsum or groups * subs * block_m - lq >= block_m else torch.empty
    part = alloc((b, h, groups * subs, lk), device=q.device, dtype=torch.float32)
    kk, vv = (row_descriptor(k, block_n), row_descriptor(v, block_n)) if use_tma else (k, v)
    grid = (-(-lq // block_m), b * h)
    _attention_colsum_kernel[grid](
        q, kk, vv, out, part,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        part.stride(0), part.stride(1), part.stride(2),
        h, lq, lk, float(scale) * LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d, USE_TMA=use_tma, COLSUM=colsum,
        num_warps=8 if block_m == 128 else 4, num_stages=num_stages, maxnreg=maxnreg,
    )
    colsum_out = part if subs == 1 else part.view(b, h, groups, subs, lk).sum(dim=3)
    return out, colsum_out

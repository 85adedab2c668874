"""Dense attention plus per-group column sums of its probabilities, in one call of two kernels.

First the block kernel of sparse_attention.py runs dense attention (a table listing every key block)
and returns the row log-sum-exp. Then a column-sum kernel recomputes the scores once with the
keys as rows: each program holds one key tile and streams the query tiles past it, so
exp(s - lse) are the exact probabilities and their sums over queries stay inside a warp (no
cross-warp reduction, no output accumulator). Each query tile's sums are written as partials;
a group of several tiles is summed afterwards, which keeps the result deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparvar.attention.tables import BlockTable
from sparvar.errors import SparvarError
from sparvar.kernels.fp8 import FP8
from sparvar.kernels.sparse_attention import (
    LOG2E, _load_rows, _row_scales, row_descriptor, tma_ready, triton_sparse_attention,
)


@triton.jit
def _colsum_kernel(
    Q, K, LSE, PART, QS, KS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_pb, stride_ph, stride_pm,
    stride_qsb, stride_qsh, stride_ksb, stride_ksh,
    H, q_len, kv_len, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr,
    FP8_QK: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    if USE_TMA:  # descriptors address by (b, h, row) themselves
        q_base, k_base = Q, K
    else:
        q_base = Q + b64 * stride_qb + h64 * stride_qh + offs_d[None, :]
        k_base = K + b64 * stride_kb + h64 * stride_kh + offs_d[None, :]
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    key_ok = offs_n < kv_len  # keys past kv_len read as zeros; their sums are not stored
    k = _load_rows(K, k_base, b, h, n0, stride_kn, kv_len, BLOCK_N, HEAD_DIM, USE_TMA)
    k_scale = _row_scales(KS, b64, h64, stride_ksb, stride_ksh, offs_n, key_ok, FP8_QK)
    lse_row = LSE + bh.to(tl.int64) * q_len
    part = PART + b64 * stride_pb + h64 * stride_ph + offs_n
    for t in range(0, tl.cdiv(q_len, BLOCK_M)):
        m0 = t * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q = _load_rows(Q, q_base, b, h, m0, stride_qm, q_len, BLOCK_M, HEAD_DIM, USE_TMA)
        # queries past q_len get lse +inf, so probability 0
        lse2 = tl.load(lse_row + offs_m, mask=offs_m < q_len, other=float("inf")) * 1.4426950408889634
        scores = tl.dot(k, tl.trans(q))  # keys x queries
        if FP8_QK:
            q_scale = _row_scales(QS, b64, h64, stride_qsb, stride_qsh, offs_m, offs_m < q_len, FP8_QK)
            scores = scores * (k_scale[:, None] * q_scale[None, :])
        p = tl.math.exp2(scores * qk_scale - lse2[None, :])
        tl.store(part + t * stride_pm, tl.sum(p, 1), mask=key_ok)


def dense_table(q_len: int, kv_len: int, block: int, device) -> BlockTable:
    """A table listing every key block for every query block (no host sync, no copies)."""
    nq, nk = -(-q_len // block), -(-kv_len // block)
    counts = torch.full((1, 1, nq), nk, dtype=torch.int32, device=device)
    indices = torch.arange(nk, dtype=torch.int32, device=device).expand(1, 1, nq, nk)
    return BlockTable(counts, indices, block, block, q_len, kv_len)


def triton_attention_colsum(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: int,
    scale: float,
    *,
    key_tile: int = 128,
    num_warps: int | None = None,
    num_stages: int | None = None,
    tma: bool = True,
    q_scale: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of q (B, H, Lq, D) over k, v (B, H, Lk, D) and column sums per group.

    Returns (out (B, H, Lq, D) in v's dtype (bf16 for FP8 v), colsum (B, H, ceil(Lq / group), Lk) float32), where
    colsum[..., g, j] sums softmax probabilities of key j over queries g*group .. g*group+group-1.
    group must be a multiple of 16. k, v may be strided views with a contiguous last dim.
    key_tile, num_warps, num_stages and tma tune the column-sum kernel. FP8 q, k (and v) with
    their row scales as for triton_sparse_attention: both kernels then multiply in FP8.
    """
    block_m = min(group & -group, 128)  # query tile: divides the group
    if block_m < 16:
        raise SparvarError(f"query group must be a multiple of 16, got {group}")
    b, h, lq, d = q.shape
    lk = k.shape[2]
    # validates the inputs too
    out, lse = triton_sparse_attention(q, k, v, dense_table(lq, lk, 64, q.device), scale, return_lse=True, tma=tma,
                                       q_scale=q_scale, k_scale=k_scale, v_scale=v_scale)

    wide = block_m == 128  # 128-query tiles measured best with two warpgroups, two stages
    num_warps, num_stages = num_warps or (8 if wide else 4), num_stages or (2 if wide else 3)
    subs, groups = group // block_m, -(-lq // group)
    q_tiles = -(-lq // block_m)
    # query tiles past the last query stay zero in the partials
    alloc = torch.zeros if groups * subs > q_tiles else torch.empty
    part = alloc((b, h, groups * subs, lk), device=q.device, dtype=torch.float32)
    use_tma = tma and tma_ready(q) and tma_ready(k)
    qq, kk = (row_descriptor(q, block_m), row_descriptor(k, key_tile)) if use_tma else (q, k)
    _colsum_kernel[(-(-lk // key_tile), b * h)](
        qq, kk, lse, part, lse if q_scale is None else q_scale, lse if k_scale is None else k_scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        part.stride(0), part.stride(1), part.stride(2),
        *(0 if t is None else t.stride(i) for t in (q_scale, k_scale) for i in (0, 1)),
        h, lq, lk, float(scale) * LOG2E,
        BLOCK_N=key_tile, BLOCK_M=block_m, HEAD_DIM=d, USE_TMA=use_tma, FP8_QK=q.dtype == FP8,
        num_warps=num_warps, num_stages=num_stages,
    )
    colsum = part if subs == 1 else part.view(b, h, groups, subs, lk).sum(dim=3)
    return out, colsum

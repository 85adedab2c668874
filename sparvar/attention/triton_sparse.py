"""Sparse attention over a BlockTable as one Triton kernel, tuned for Hopper.

One program computes BLOCK_M query rows of one (batch, head) with an online softmax over the
key tiles its table row lists. A tile is BLOCK_N keys: a slice of one key block when
key_block >= BLOCK_N (block mode), or several listed key blocks / key tokens gathered side by
side when key_block < BLOCK_N (gather mode; key_block == 1 is the column-sparse form). Keys past
kv_len are masked, so k and v may be views of a larger, uninitialised cache.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparvar.attention.tables import BlockTable
from sparvar.errors import SparvarError

LOG2E = 1.4426950408889634


@triton.jit
def _sparse_attention_kernel(
    Q, K, V, O, LSE, COUNTS, INDICES, ORDER,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_cb, stride_ch,
    stride_ib, stride_ih, stride_iq,
    stride_rb, stride_rh,
    H, q_len, kv_len, qk_scale,
    Q_BLOCK: tl.constexpr, KEY_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    BALANCED: tl.constexpr, RETURN_LSE: tl.constexpr,
):
    SUBS: tl.constexpr = Q_BLOCK // BLOCK_M  # programs per table row
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if BALANCED:  # rank -> table row, heaviest rows first
        row = tl.load(ORDER + b * stride_rb + h * stride_rh + pid // SUBS)
    else:
        row = pid // SUBS
    m0 = row * Q_BLOCK + (pid % SUBS) * BLOCK_M
    if m0 >= q_len:
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh + offs_d[None, :]
    v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :]
    count = tl.load(COUNTS + b * stride_cb + h * stride_ch + row)
    idx_row = INDICES + b * stride_ib + h * stride_ih + row * stride_iq

    if KEY_BLOCK >= BLOCK_N:
        TILES: tl.constexpr = KEY_BLOCK // BLOCK_N  # tiles per listed key block
        n_tiles = count * TILES
    else:
        PER_TILE: tl.constexpr = BLOCK_N // KEY_BLOCK  # listed entries per tile
        n_tiles = (count + PER_TILE - 1) // PER_TILE

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for t in range(0, n_tiles):
        if KEY_BLOCK >= BLOCK_N:
            unit = tl.load(idx_row + t // TILES)
            offs_n = unit * KEY_BLOCK + (t % TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
            key_ok = offs_n < kv_len
        else:
            entry = t * PER_TILE + tl.arange(0, BLOCK_N) // KEY_BLOCK
            listed = entry < count
            unit = tl.load(idx_row + entry, mask=listed, other=0)
            offs_n = unit * KEY_BLOCK + tl.arange(0, BLOCK_N) % KEY_BLOCK
            key_ok = listed & (offs_n < kv_len)
        k = tl.load(k_base + offs_n[:, None] * stride_kn, mask=key_ok[:, None], other=0.0)
        # scores in log2 units; masked keys get -inf through the same FMA
        s = tl.dot(q, tl.trans(k)) * qk_scale + tl.where(key_ok, 0.0, float("-inf"))[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn, mask=key_ok[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    empty = l_i == 0.0
    l_div = tl.where(empty, 1.0, l_i)
    out = acc / l_div[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    if RETURN_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_div)) * 0.6931471805599453)
        tl.store(LSE + bh.to(tl.int64) * q_len + offs_m, lse, mask=row_ok)


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides n, at most cap."""
    return min(n & -n, cap)


def _check_inputs(q, k, v, table: BlockTable) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise SparvarError(f"triton attention needs fp16 or bf16 q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, lq, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, h) or k.shape[3] != d:
        raise SparvarError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if d not in (64, 128):
        raise SparvarError(f"triton attention supports head dims 64 and 128, got {d}")
    if q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        raise SparvarError("triton attention needs the head dim of q, k and v to be contiguous")
    if table.q_len != lq or table.kv_len != k.shape[2]:
        raise SparvarError(f"table is for {table.q_len} queries x {table.kv_len} keys, got {lq} x {k.shape[2]}")
    tb, th = table.counts.shape[:2]
    if tb not in (1, b) or th not in (1, h):
        raise SparvarError(f"table leading dims {(tb, th)} do not broadcast to {(b, h)}")


def _stride0(t: torch.Tensor, dim: int) -> int:
    """Stride of dim, 0 where the dim has size 1 (broadcast)."""
    return 0 if t.shape[dim] == 1 else t.stride(dim)


def triton_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: BlockTable,
    scale: float,
    return_lse: bool = False,
    *,
    balance: bool = True,
    block_n: int | None = None,
    num_stages: int = 3,
):
    """Attention of q (B, H, Lq, D) over the keys `table` lists per query block; no host sync.

    k, v: (B, H, Lk, D), any strides with a contiguous last dim. Returns out (B, H, Lq, D) in
    q's dtype and, with return_lse, lse (B, H, Lq) float32 (-inf on rows that see no key).
    `balance` launches table rows in order of descending count (sorted on the device);
    block_n and num_stages are tuning knobs for the benchmark.
    """
    _check_inputs(q, k, v, table)
    b, h, lq, d = q.shape
    block_m = _pow2_divisor(table.q_block, 128)
    if block_m < 16:
        raise SparvarError(f"q_block must be a multiple of 16, got {table.q_block}")
    block_n = block_n or block_m  # 128x128 tiles, or 64x64 with one warpgroup
    kb = table.key_block
    if max(kb, block_n) % min(kb, block_n):  # tiles must split key blocks, or blocks tiles
        block_n = _pow2_divisor(kb, block_n)
        if block_n < 16:
            raise SparvarError(f"key_block must be a power of two or a multiple of 16, got {kb}")

    out = torch.empty_like(q)
    lse = torch.empty((b, h, lq), device=q.device, dtype=torch.float32) if return_lse else out
    counts = table.counts.to(device=q.device, dtype=torch.int32)
    indices = table.indices.to(device=q.device, dtype=torch.int32)
    if indices.stride(-1) != 1:
        indices = indices.contiguous()
    order = torch.argsort(counts, dim=-1, descending=True, stable=True).to(torch.int32) if balance else counts

    grid = (table.num_q_blocks * (table.q_block // block_m), b * h)
    _sparse_attention_kernel[grid](
        q, k, v, out, lse, counts, indices, order,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        _stride0(counts, 0), _stride0(counts, 1),
        _stride0(indices, 0), _stride0(indices, 1), indices.stride(2),
        _stride0(order, 0), _stride0(order, 1),
        h, lq, k.shape[2], float(scale) * LOG2E,
        Q_BLOCK=table.q_block, KEY_BLOCK=kb,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d,
        BALANCED=balance, RETURN_LSE=return_lse,
        num_warps=8 if block_m == 128 else 4, num_stages=num_stages,
    )
    return (out, lse) if return_lse else out

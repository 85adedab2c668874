"""Sparse attention over a BlockTable as Triton kernels, tuned for Hopper.

One program computes BLOCK_M query rows of one (batch, head) with an online softmax over the
key tiles its table row lists. A tile is BLOCK_N keys: a slice of one key block when
key_block >= BLOCK_N (block mode), or several listed key blocks / key tokens gathered side by
side when key_block < BLOCK_N (gather mode; key_block == 1 is the column-sparse form). Keys past
kv_len are masked, so k and v may be views of a larger, uninitialised cache.

Block mode reads K and V tiles with the tensor-memory accelerator (TMA descriptors over the
strided views; rows past kv_len arrive as zeros). Gather mode, and block mode where TMA is off,
use pointer loads. Every tile is masked (one select per score): a branch for the one tile that
holds kv_len would stop Triton's pipeliner from prefetching.

Options, for measurement (benchmarks/kernels_notes.md): q and k in FP8 (e4m3) with one scale
per row (`quantize_heads`), so QK^T runs at the FP8 tensor-core rate and K tiles move half the
bytes; v in FP8 too (dequantised per key in registers, PV in bf16); and Triton's automatic warp
specialisation of the key loop (`warp_specialize`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparvar.attention.tables import BlockTable
from sparvar.errors import SparvarError
from sparvar.kernels.fp8 import FP8, quantize_rows

LOG2E = 1.4426950408889634

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton without host-side TMA descriptors
    TensorDescriptor = None


@triton.jit
def _attend_tile(q, k, v, m_i, l_i, acc, qk_scale, key_ok, q_scale, k_scale, v_scale,
                 FP8_QK: tl.constexpr, FP8_V: tl.constexpr, PV_DTYPE: tl.constexpr):
    """Online-softmax update of (m_i, l_i, acc) with one key tile; m_i is in log2 units.

    qk_scale > 0 (and FP8 row scales too), so the row max can be taken before scaling; keys not
    ok get -inf scores and a row that has seen no key yet keeps max -inf without producing NaN.
    """
    qk = tl.dot(q, tl.trans(k))
    if FP8_QK:
        qk = qk * (q_scale[:, None] * k_scale[None, :])
    if FP8_V:
        v = (v.to(tl.float32) * v_scale[:, None]).to(PV_DTYPE)
    qk = tl.where(key_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(PV_DTYPE), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _store_rows(O, LSE, bh, o_rows, offs_m, offs_d, q_len, m_i, l_i, acc, RETURN_LSE: tl.constexpr):
    """Normalise and store BLOCK_M output rows (zeros where no key was seen) and their lse."""
    row_ok = offs_m < q_len
    empty = l_i == 0.0
    l_div = tl.where(empty, 1.0, l_i)
    out = acc / l_div[:, None]
    tl.store(o_rows + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    if RETURN_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_div)) * 0.6931471805599453)
        tl.store(LSE + bh.to(tl.int64) * q_len + offs_m, lse, mask=row_ok)


@triton.jit
def _load_rows(X, x_base, b, h, n0, stride_n, kv_len, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               USE_TMA: tl.constexpr):
    """Rows n0 .. n0+BLOCK_N of one (batch, head) of K or V; rows past kv_len read as zeros.

    With USE_TMA, X is a 4D descriptor over the (B, H, kv_len, D) view; else x_base points at the
    (b, h) slice plus the head-dim offsets.
    """
    if USE_TMA:
        return X.load([b, h, n0, 0]).reshape(BLOCK_N, HEAD_DIM)
    else:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        return tl.load(x_base + offs_n[:, None] * stride_n, mask=(offs_n < kv_len)[:, None], other=0.0)


@triton.jit
def _row_scales(SCALE, b64, h64, stride_b, stride_h, rows, ok, FP8: tl.constexpr):
    """The FP8 scales (B, H, L) of some rows of one (batch, head); 1 where FP8 is off or rows are not ok."""
    scale = tl.full(rows.shape, 1.0, tl.float32)
    if FP8:
        scale = tl.load(SCALE + b64 * stride_b + h64 * stride_h + rows, mask=ok, other=1.0)
    return scale


@triton.jit
def _block_tile(t, K, V, KS, VS, k_base, v_base, idx_row, b, h, b64, h64, stride_kn, stride_vn, stride_ksb,
                stride_ksh, stride_vsb, stride_vsh, kv_len, q, q_scale, m_i, l_i, acc, qk_scale,
                KEY_BLOCK: tl.constexpr, TILES: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                USE_TMA: tl.constexpr, FP8_QK: tl.constexpr, FP8_V: tl.constexpr, PV_DTYPE: tl.constexpr):
    """Block mode's tile t: a BLOCK_N slice of the (t // TILES)-th listed key block."""
    n0 = tl.load(idx_row + t // TILES) * KEY_BLOCK + (t % TILES) * BLOCK_N
    k = _load_rows(K, k_base, b, h, n0, stride_kn, kv_len, BLOCK_N, HEAD_DIM, USE_TMA)
    v = _load_rows(V, v_base, b, h, n0, stride_vn, kv_len, BLOCK_N, HEAD_DIM, USE_TMA)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    key_ok = offs_n < kv_len
    k_scale = _row_scales(KS, b64, h64, stride_ksb, stride_ksh, offs_n, key_ok, FP8_QK)
    v_scale = _row_scales(VS, b64, h64, stride_vsb, stride_vsh, offs_n, key_ok, FP8_V)
    return _attend_tile(q, k, v, m_i, l_i, acc, qk_scale, key_ok, q_scale, k_scale, v_scale, FP8_QK, FP8_V, PV_DTYPE)


@triton.jit
def _sparse_attention_kernel(
    Q, K, V, O, LSE, COUNTS, INDICES, QS, KS, VS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_cb, stride_ch,
    stride_ib, stride_ih, stride_iq,
    stride_qsb, stride_qsh, stride_ksb, stride_ksh, stride_vsb, stride_vsh,
    H, q_len, kv_len, qk_scale,
    Q_BLOCK: tl.constexpr, KEY_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    USE_TMA: tl.constexpr, RETURN_LSE: tl.constexpr,
    FP8_QK: tl.constexpr = False, FP8_V: tl.constexpr = False, WARP_SPECIALIZE: tl.constexpr = False,
):
    SUBS: tl.constexpr = Q_BLOCK // BLOCK_M  # programs per table row
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    row = pid // SUBS
    m0 = row * Q_BLOCK + (pid % SUBS) * BLOCK_M
    if m0 >= q_len:
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=(offs_m < q_len)[:, None], other=0.0)
    q_scale = _row_scales(QS, b64, h64, stride_qsb, stride_qsh, offs_m, offs_m < q_len, FP8_QK)
    PV_DTYPE: tl.constexpr = O.dtype.element_ty
    count = tl.load(COUNTS + b64 * stride_cb + h64 * stride_ch + row)
    idx_row = INDICES + b64 * stride_ib + h64 * stride_ih + row * stride_iq
    if USE_TMA:  # descriptors address by (b, h, row) themselves
        k_base, v_base = K, V
    else:
        k_base = K + b64 * stride_kb + h64 * stride_kh + offs_d[None, :]
        v_base = V + b64 * stride_vb + h64 * stride_vh + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if KEY_BLOCK >= BLOCK_N:  # block mode: each tile is a slice of one listed key block
        TILES: tl.constexpr = KEY_BLOCK // BLOCK_N
        # two loops, as any tl.range keyword makes Triton 3.9 run its warp-specialisation pass
        if WARP_SPECIALIZE:
            for t in tl.range(0, count * TILES, warp_specialize=True):
                m_i, l_i, acc = _block_tile(
                    t, K, V, KS, VS, k_base, v_base, idx_row, b, h, b64, h64, stride_kn, stride_vn, stride_ksb,
                    stride_ksh, stride_vsb, stride_vsh, kv_len, q, q_scale, m_i, l_i, acc, qk_scale,
                    KEY_BLOCK, TILES, BLOCK_N, HEAD_DIM, USE_TMA, FP8_QK, FP8_V, PV_DTYPE)
        else:
            for t in range(0, count * TILES):
                m_i, l_i, acc = _block_tile(
                    t, K, V, KS, VS, k_base, v_base, idx_row, b, h, b64, h64, stride_kn, stride_vn, stride_ksb,
                    stride_ksh, stride_vsb, stride_vsh, kv_len, q, q_scale, m_i, l_i, acc, qk_scale,
                    KEY_BLOCK, TILES, BLOCK_N, HEAD_DIM, USE_TMA, FP8_QK, FP8_V, PV_DTYPE)
    else:  # gather mode: each tile is PER_TILE listed key blocks (or tokens) side by side
        PER_TILE: tl.constexpr = BLOCK_N // KEY_BLOCK
        for t in range(0, (count + PER_TILE - 1) // PER_TILE):
            entry = t * PER_TILE + tl.arange(0, BLOCK_N) // KEY_BLOCK
            listed = entry < count
            unit = tl.load(idx_row + entry, mask=listed, other=0)
            offs_n = unit * KEY_BLOCK + tl.arange(0, BLOCK_N) % KEY_BLOCK
            key_ok = listed & (offs_n < kv_len)
            k = tl.load(k_base + offs_n[:, None] * stride_kn, mask=key_ok[:, None], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vn, mask=key_ok[:, None], other=0.0)
            k_scale = _row_scales(KS, b64, h64, stride_ksb, stride_ksh, offs_n, key_ok, FP8_QK)
            v_scale = _row_scales(VS, b64, h64, stride_vsb, stride_vsh, offs_n, key_ok, FP8_V)
            m_i, l_i, acc = _attend_tile(q, k, v, m_i, l_i, acc, qk_scale, key_ok, q_scale, k_scale, v_scale,
                                         FP8_QK, FP8_V, PV_DTYPE)

    o_rows = O + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_om
    _store_rows(O, LSE, bh, o_rows, offs_m, offs_d, q_len, m_i, l_i, acc, RETURN_LSE)


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides n, at most cap."""
    return min(n & -n, cap)


def quantize_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, L, D) -> FP8 values and their scales (B, H, L) float32, one per row (token and head)."""
    rows = quantize_rows(x)
    return rows.data, rows.scale.squeeze(-1)


def _check_fp8(name: str, x: torch.Tensor, scale: torch.Tensor | None) -> None:
    if (x.dtype == FP8) != (scale is not None):
        raise SparvarError(f"FP8 {name} comes with its row scales ({name}_scale), and only FP8 {name} does")
    if scale is not None and (scale.shape != x.shape[:3] or scale.dtype != torch.float32 or scale.stride(2) != 1):
        raise SparvarError(f"{name}_scale must be float32 {tuple(x.shape[:3])} with contiguous rows")


def _check_inputs(q, k, v, table: BlockTable, scale: float, scales=(None, None, None)) -> None:
    for name, x, s in zip("qkv", (q, k, v), scales):
        _check_fp8(name, x, s)
    if (q.dtype == FP8) != (k.dtype == FP8):
        raise SparvarError("q and k are FP8 together or not at all")
    half = {q.dtype, k.dtype, v.dtype} - {FP8}
    if not half <= {torch.float16, torch.bfloat16} or len(half) > 1:
        raise SparvarError(f"triton attention needs fp16 or bf16 q, k, v of one dtype (or FP8 ones with scales), "
                           f"got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, _, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, h) or k.shape[3] != d:
        raise SparvarError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if d not in (64, 128):
        raise SparvarError(f"triton attention supports head dims 64 and 128, got {d}")
    if q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        raise SparvarError("triton attention needs the head dim of q, k and v to be contiguous")
    table.check_fits(q, k)
    tb, th = table.counts.shape[:2]
    if tb not in (1, b) or th not in (1, h):
        raise SparvarError(f"table leading dims {(tb, th)} do not broadcast to {(b, h)}")
    if not scale > 0:
        raise SparvarError(f"softmax scale must be positive, got {scale}")


def _stride0(t: torch.Tensor, dim: int) -> int:
    """Stride of dim, 0 where the dim has size 1 (broadcast)."""
    return 0 if t.shape[dim] == 1 else t.stride(dim)


def tma_ready(t: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base and 16-byte multiples for every stride but the last."""
    return (TensorDescriptor is not None and t.data_ptr() % 16 == 0
            and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]))


def row_descriptor(t: torch.Tensor, rows: int):
    """TMA descriptor over a (B, H, L, D) view that loads `rows` x D tiles of one (batch, head)."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[3]])


def triton_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: BlockTable,
    scale: float,
    return_lse: bool = False,
    *,
    block_m: int = 64,
    block_n: int = 64,
    num_stages: int = 3,
    tma: bool = True,
    maxnreg: int | None = None,
    q_scale: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    warp_specialize: bool = False,
):
    """Attention of q (B, H, Lq, D) over the keys `table` lists per query block; no host sync.

    k, v: (B, H, Lk, D), any strides with a contiguous last dim. Returns out (B, H, Lq, D) in
    q's dtype, in (B, Lq, H, D) memory (so the out projection reads out.transpose(1, 2) as
    (B, Lq, H * D) rows without a copy, as it reads SDPA's), and with return_lse, lse (B, H, Lq)
    float32 (-inf on rows that see no key).
    block_m x block_n is the tile (clipped to what the table's blocks allow; 64 x 64 with one
    warpgroup measured fastest on H200, benchmarks/kernels_notes.md); num_stages, maxnreg and tma
    (block mode through TMA where the views allow) are tuning knobs too.
    FP8 q and k (and optionally v) come with their scales (B, H, L) from `quantize_heads`; the
    output is in v's dtype, bf16 for an FP8 v. warp_specialize: Triton's automatic warp
    specialisation of block mode's key loop, with 128 x 128 tiles only (Triton 3.6's pass fails
    on 64 x 64; measured slower: benchmarks/kernels_notes.md).
    """
    _check_inputs(q, k, v, table, scale, (q_scale, k_scale, v_scale))
    fp8_qk, fp8_v = q.dtype == FP8, v.dtype == FP8
    out_dtype = torch.bfloat16 if fp8_v else v.dtype
    b, h, lq, d = q.shape
    block_m = _pow2_divisor(table.q_block, block_m)  # programs split a query block, never span two
    if block_m < 16:
        raise SparvarError(f"q_block must be a multiple of 16, got {table.q_block}")
    kb = table.key_block
    if max(kb, block_n) % min(kb, block_n):  # tiles must split key blocks, or blocks tiles
        block_n = _pow2_divisor(kb, block_n)
        if block_n < 16:
            raise SparvarError(f"key_block must be a power of two or a multiple of 16, got {kb}")
    if warp_specialize and (block_m, block_n) != (128, 128):
        raise SparvarError(f"warp_specialize needs 128 x 128 tiles (Triton's pass fails on smaller ones), "
                           f"got {block_m} x {block_n} for q_block {table.q_block}, key_block {kb}")
    use_tma = tma and kb >= block_n and tma_ready(k) and tma_ready(v)

    out = torch.empty((b, lq, h, d), device=q.device, dtype=out_dtype).transpose(1, 2)
    lse = torch.empty((b, h, lq), device=q.device, dtype=torch.float32) if return_lse else out
    qs, ks, vs = (t if t is not None else lse for t in (q_scale, k_scale, v_scale))  # unread when not FP8
    counts = table.counts.to(device=q.device, dtype=torch.int32)
    indices = table.indices.to(device=q.device, dtype=torch.int32)
    if indices.stride(-1) != 1:
        indices = indices.contiguous()
    kk, vv = (row_descriptor(k, block_n), row_descriptor(v, block_n)) if use_tma else (k, v)

    grid = (table.num_q_blocks * (table.q_block // block_m), b * h)
    _sparse_attention_kernel[grid](
        q, kk, vv, out, lse, counts, indices, qs, ks, vs,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        _stride0(counts, 0), _stride0(counts, 1),
        _stride0(indices, 0), _stride0(indices, 1), indices.stride(2),
        *(t.stride(i) if t.dim() == 3 else 0 for t in (qs, ks, vs) for i in (0, 1)),
        h, lq, k.shape[2], float(scale) * LOG2E,
        Q_BLOCK=table.q_block, KEY_BLOCK=kb,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d,
        USE_TMA=use_tma, RETURN_LSE=return_lse, FP8_QK=fp8_qk, FP8_V=fp8_v, WARP_SPECIALIZE=warp_specialize,
        num_warps=8 if block_m == 128 else 4, num_stages=num_stages, maxnreg=maxnreg,
    )
    return (out, lse) if return_lse else out

"""FP8 (e4m3) rows: activations and attention inputs quantised with one float32 scale per row.

The FP8 matmuls (models/fp8.py), the FP8 KV cache (kv_cache.py) and the FP8 attention options
(kernels/sparse_attention.py) all keep values as `Fp8Rows`: x ~ data * scale, the scale of a row
being amax(|row|) / 448. `quantize_rows` makes them in one kernel (the FFN's GELU first, where
asked), `dequantize_rows` reads the FP8 KV cache back; `_fp8_row` is the in-kernel step that
kernels/fused.py's add/norm kernel also ends with, so a norm's output never exists in bf16.

The FP8 matmuls themselves run torch's `_scaled_mm` (models/fp8.py); `fp8_matmul_reference`
(float32 of the same quantised numbers) defines what it computes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from sparvar.kernels import use_kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs may lack triton; the reference path needs none
    triton = None

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
AMAX_FLOOR = 1e-12  # an all-zero row gets this amax, so its scale stays finite and positive
# quantize_rows_triton's launch: the least total time over the four shapes of kernel-variants'
# "quantise" sweep (one H100, benchmarks/kernel_variants_quantise.jsonl; at most 3% off the best
# at 8,192 rows, 5-10% at 288)
QUANTIZE_CHUNK, QUANTIZE_WARPS = 2048, 4


class Fp8Rows(NamedTuple):
    """Activations quantised per row for an FP8 matmul: x ~ data * scale."""

    data: torch.Tensor  # (..., K) float8_e4m3fn
    scale: torch.Tensor  # (..., 1) float32

    @property
    def shape(self) -> torch.Size:
        return self.data.shape


def quantize_rows_reference(x: torch.Tensor, gelu: bool = False) -> Fp8Rows:
    x = x.float()
    if gelu:
        x = F.gelu(x, approximate="tanh")
    scale = x.abs().amax(-1, keepdim=True).clamp_min(AMAX_FLOOR) / FP8_MAX
    return Fp8Rows((x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale)


def quantize_rows(x: torch.Tensor, gelu: bool = False) -> Fp8Rows:
    """x (..., K) -> FP8 rows with scale amax(|row|) / 448 each (tanh-GELU first, with `gelu`):
    one kernel where kernels run."""
    if use_kernels(x):
        return quantize_rows_triton(x, gelu)
    return quantize_rows_reference(x, gelu)


def quantize_rows_triton(x: torch.Tensor, gelu: bool = False, chunk: int = QUANTIZE_CHUNK,
                         num_warps: int | None = None) -> Fp8Rows:
    """`chunk` elements of a row at a time, twice (amax, then the FP8 values): a program holds one
    chunk, not the row, so many rows are in flight per SM (an FFN row of 14,336 held whole ran at
    a third of the card's bandwidth, benchmarks/kernels_notes.md). num_warps: QUANTIZE_WARPS, fewer
    for short rows (the FP8 KV cache's heads of 128)."""
    x = x.contiguous()
    k = x.shape[-1]
    data = torch.empty(x.shape, device=x.device, dtype=FP8)
    scale = torch.empty((*x.shape[:-1], 1), device=x.device, dtype=torch.float32)
    chunk = min(chunk, triton.next_power_of_2(k))
    num_warps = num_warps or min(QUANTIZE_WARPS, max(chunk // 256, 1))
    _quantize_rows_kernel[(x.numel() // k,)](x, data, scale, k, GELU=gelu, CHUNK=chunk, num_warps=num_warps)
    return Fp8Rows(data, scale)


def fp8_matmul_reference(rows: Fp8Rows, weight, scale, bias, out_dtype) -> torch.Tensor:
    """rows (..., K) x FP8 weight (N, K)^T with its scale (N,) per output channel, + bias, in
    float32 from the dequantised operands -> (..., N) in out_dtype."""
    out = (rows.data.float() * rows.scale) @ (weight.float() * scale[:, None]).t()
    return (out if bias is None else out + bias.float()).to(out_dtype)


def dequantize_rows(data: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """out = data * scale, for FP8 rows `data` (P, L, D) with `scale` (P, L, 1): the FP8 KV
    cache's prefix into its staging buffer (any leading dims; the last two may be strided
    slices of larger buffers whose rows are contiguous)."""
    if use_kernels(out):
        p, length, d = data.numel() // (data.shape[-2] * data.shape[-1]), data.shape[-2], data.shape[-1]
        planes = lambda t: t.view(-1, *t.shape[-2:])  # a view: the kernel writes into `out` itself  # noqa: E731
        src, src_scale, dst = planes(data), planes(scale), planes(out)
        block = max(1, 4096 // d)
        _dequantize_rows_kernel[(triton.cdiv(length, block), p)](
            src, src_scale, dst, length, src.stride(0), src.stride(1), src_scale.stride(0), dst.stride(0), dst.stride(1),
            D=d, BLOCK=block)
    else:
        out.copy_(data.float() * scale)


if triton is not None:
    _FP8_MAX = tl.constexpr(FP8_MAX)  # globals a kernel may read
    _AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)

    @triton.jit
    def _fp8_values(y, scale):
        return tl.clamp(y / scale, -_FP8_MAX, _FP8_MAX)

    @triton.jit
    def _fp8_row(y, SCALE):
        """y (float32, zeros past the row's end) divided by its scale amax / 448, which goes to SCALE."""
        scale = tl.maximum(tl.max(tl.abs(y), axis=0), _AMAX_FLOOR) / _FP8_MAX
        tl.store(SCALE, scale)
        return _fp8_values(y, scale)

    @triton.jit
    def _maybe_gelu(y, GELU: tl.constexpr):
        if GELU:  # tanh(u) = 1 - 2 / (1 + exp(2u)), which saturates cleanly at both ends
            u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
            y = 0.5 * y * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * u)))
        return y

    @triton.jit
    def _quantize_rows_kernel(X, Q, SCALE, K, GELU: tl.constexpr, CHUNK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        X += row * K
        Q += row * K
        cols = tl.arange(0, CHUNK)
        amax = tl.zeros([CHUNK], tl.float32)
        for start in range(0, K, CHUNK):  # GELU(0) = 0: lanes past K add nothing
            y = _maybe_gelu(tl.load(X + start + cols, mask=start + cols < K, other=0.0).to(tl.float32), GELU)
            amax = tl.maximum(amax, tl.abs(y))
        scale = tl.maximum(tl.max(amax, axis=0), _AMAX_FLOOR) / _FP8_MAX
        tl.store(SCALE + row, scale)
        for start in range(0, K, CHUNK):  # the row again, from L2 now
            ok = start + cols < K
            y = _maybe_gelu(tl.load(X + start + cols, mask=ok, other=0.0).to(tl.float32), GELU)
            tl.store(Q + start + cols, _fp8_values(y, scale).to(Q.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=["length"])
    def _dequantize_rows_kernel(SRC, SCALE, DST, length, src_sp, src_sl, scale_sp, dst_sp, dst_sl,
                                D: tl.constexpr, BLOCK: tl.constexpr):
        plane = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)[:, None]
        dims = tl.arange(0, D)[None, :]
        ok = rows < length
        scale = tl.load(SCALE + plane * scale_sp + rows, mask=ok, other=0.0)
        values = tl.load(SRC + plane * src_sp + rows * src_sl + dims, mask=ok, other=0.0).to(tl.float32) * scale
        tl.store(DST + plane * dst_sp + rows * dst_sl + dims, values.to(DST.dtype.element_ty), mask=ok)

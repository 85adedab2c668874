"""FP8 (e4m3) matrix products for the transformer blocks' linear layers (`precision="fp8"`).

Matrix products are most of an Infinity-8B generation's GPU time (benchmarks/profile.json), and
the weights most of its memory. Here each block's attention and FFN projections keep their
weights in FP8 with one scale per output channel, quantised once at load time; activations are
quantised per row (token) as they arrive, by the kernel that makes them where one can
(`fused.add_norm` with an FP8 output, the FFN's GELU in `fused.quantize_rows`), else by one
quantising pass. The product is `torch._scaled_mm` with rowwise scales (torch's CUTLASS kernel
on Hopper, a CPU kernel in recent torch: 2.13 here), with fast accumulation on the GPU as
torchao's float8 inference has it, at every row count: a Triton kernel for the early scales' few
rows never beat it on an H100 (benchmarks/kernels_notes.md) and was removed. torchao's float8
inference would run the same `_scaled_mm`, but refuses to run on a CPU and would not fuse the
quantisation with our norms; `sparvar bench fp8` times it beside ours on the GPU.
`fp8_matmul_reference` (float32 of the same quantised numbers) is the oracle of the tests.

Only the blocks are quantised, the layers their family lists (`Family.fp8_layers`): embeddings,
adaLN, the head and the text projections stay in the model dtype (they are small or run once per
generation).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparvar.errors import SparvarError
from sparvar.kernels.fp8 import (
    AMAX_FLOOR,
    FP8,
    FP8_MAX,
    Fp8Rows,
    fp8_matmul_reference,
    quantize_rows,
)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) weight -> (FP8 weight (N, K), float32 scale (N,)): one scale per output channel."""
    w = weight.float()
    scale = w.abs().amax(1).clamp_min(AMAX_FLOOR) / FP8_MAX
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@functools.cache
def cpu_takes_rowwise_scales() -> bool:
    """Whether this torch's CPU `_scaled_mm` takes rowwise scales (2.13 does; 2.11 takes one scale)."""
    rows, weight = torch.ones(2, 16, dtype=FP8), torch.ones(1, 16, dtype=FP8)
    try:
        torch._scaled_mm(rows, weight.t(), scale_a=torch.ones(2, 1), scale_b=torch.ones(1, 1), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


# Products (rows, K, N, device) whose bias cuBLASLt refused to fuse: their bias is added after.
_BIAS_REFUSED: set[tuple] = set()


def _refused(err: RuntimeError) -> bool:
    return "CUBLAS_STATUS_NOT_SUPPORTED" in str(err)


def fp8_matmul(rows: Fp8Rows, weight, scale, bias, out_dtype, fast_accum: bool = True) -> torch.Tensor:
    """rows (..., K) x FP8 weight (N, K)^T with rowwise scales on both sides, + bias -> (..., N).
    Always `_scaled_mm` (fast_accum: its FP8 fast accumulation, on the GPU); a CPU torch without
    rowwise `_scaled_mm` computes the same numbers in float32. Where cuBLASLt refuses a product
    with its bias fused (one H100: 2 to 32 rows by 14,336 x 3,584), the bias is added after; the first
    such refusal, in the eager warm-up before any capture, is remembered per shape."""
    k = rows.data.shape[-1]
    if rows.data.device.type == "cpu" and not cpu_takes_rowwise_scales():
        return fp8_matmul_reference(rows, weight, scale, bias, out_dtype)
    data = rows.data.reshape(-1, k)
    shape = (data.shape[0], k, weight.shape[0], data.device)

    def product(fused_bias):
        return torch._scaled_mm(data, weight.t(), scale_a=rows.scale.reshape(-1, 1), scale_b=scale.view(1, -1),
                                bias=fused_bias, out_dtype=out_dtype, use_fast_accum=fast_accum)

    out = None
    if bias is not None and shape not in _BIAS_REFUSED:
        try:
            out = product(bias)
        except RuntimeError as err:
            if not _refused(err):
                raise
            _BIAS_REFUSED.add(shape)
    if out is None:
        try:
            out = product(None)
        except RuntimeError as err:  # seen on an H100 (benchmarks/kernels_notes.md): one line, not a traceback
            if not _refused(err):
                raise
            raise SparvarError(f"cuBLASLt has no FP8 kernel here for a {shape[0]} x {k} by {k} x {shape[2]} "
                               "product with rowwise scales (CUBLAS_STATUS_NOT_SUPPORTED); run without "
                               "--precision fp8") from None
        if bias is not None:
            out += bias
    return out.view(*rows.data.shape[:-1], -1)


class Fp8Linear(nn.Module):
    """A linear layer with an FP8 weight; takes activations in the model dtype or as Fp8Rows."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight)  # FP8 (N, K): `weight.dtype` tells a block to make FP8 rows
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.out_dtype = out_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, device=None) -> "Fp8Linear":
        """The layer's weight quantised on `device` (default: where it is)."""
        weight = linear.weight.detach().to(device)
        bias = None if linear.bias is None else linear.bias.detach().to(device)
        return cls(*quantize_weight(weight), bias, weight.dtype)

    def forward(self, x: torch.Tensor | Fp8Rows, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., K) -> (..., N) in the model dtype; `bias` replaces the layer's own."""
        rows = x if isinstance(x, Fp8Rows) else quantize_rows(x)
        bias = self.bias if bias is None else bias
        return fp8_matmul(rows, self.weight, self.scale, None if bias is None else bias.to(self.out_dtype),
                          self.out_dtype)

    def gelu_rows(self, x: torch.Tensor | Fp8Rows) -> Fp8Rows:
        """gelu_tanh(self(x)) as FP8 rows, for the next FP8 layer (the FFN's second)."""
        return quantize_rows(self(x), gelu=True)


def project(x: torch.Tensor | Fp8Rows, layer: nn.Module, bias: torch.Tensor | None = None) -> torch.Tensor:
    """layer(x) with `bias` in place of the layer's own, for an nn.Linear or an Fp8Linear."""
    if isinstance(layer, Fp8Linear):
        return layer(x, bias)
    return F.linear(x, layer.weight, layer.bias if bias is None else bias)


def quantize_blocks(model: nn.Module, layers: tuple[str, ...], device=None) -> int:
    """Replace the linear layers `layers` (paths within a block) of every block of `model` with
    Fp8Linear layers, each quantised on `device` (default: where its weight is) as it goes, so the
    full-precision weights never all sit there at once. Returns the number of layers quantised."""
    count = 0
    for block in model.blocks:
        for path, child in list(block.named_modules()):
            if path in layers and isinstance(child, nn.Linear):
                k, n = child.in_features, child.out_features
                if k % 16 or n % 16:
                    raise SparvarError(f"FP8 matmuls need layer sizes that are multiples of 16, not {n}x{k}")
                parent, _, name = path.rpartition(".")
                setattr(block.get_submodule(parent), name, Fp8Linear.from_linear(child, device))
                count += 1
    return count

"""Triton kernels and their dispatch, each beside its PyTorch reference or checked against one.

- `sparse_attention`: attention over a BlockTable (attention/tables.py holds its reference);
- `decision`: CS4A's decision pass, dense attention plus column sums of its probabilities
  (attention/decision.py holds its reference and the backend choice);
- `fused`: the blocks' and decoders' elementwise work in few passes (add/norm, q/k heads, GroupNorm,
  CS4A's residual resize and add);
- `fp8`: FP8 rows, the one `FP8` dtype, for FP8 matmuls, the FP8 KV cache and FP8 attention.

The elementwise kernels run on CUDA tensors outside autograd; elsewhere, and inside
`reference_only()` (the benchmark's official-style baseline), their PyTorch references run.
This floor imports nothing from the models or the attention seam above it.
"""

from __future__ import annotations

import contextlib

import torch

try:
    import triton
except ImportError:  # CPU-only installs may lack triton; the references need none
    triton = None

_REFERENCE_ONLY = False


@contextlib.contextmanager
def reference_only():
    """Run the PyTorch reference even where the kernels could run (for comparisons)."""
    global _REFERENCE_ONLY
    old, _REFERENCE_ONLY = _REFERENCE_ONLY, True
    try:
        yield
    finally:
        _REFERENCE_ONLY = old


def use_kernels(x: torch.Tensor) -> bool:
    """Whether the Triton kernels run for x: a CUDA tensor, no autograd, not reference_only()."""
    return triton is not None and x.is_cuda and not torch.is_grad_enabled() and not _REFERENCE_ONLY

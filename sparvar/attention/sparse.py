"""One entry for sparse attention over a BlockTable; picks a backend by device and table form.

Backends: "triton" (our kernels, CUDA), "flex" (FlexAttention for block tables, CUDA; gathered
key lists go to "gather"), "cpu" (SDPA over key slices or copied key rows, reading the table on
the host; cpu.py), "gather" (per query block, SDPA over gathered keys; any device, no host sync,
so it runs inside CUDA graphs), "reference" (masked float32 attention; the definition, for
tests). "auto" takes triton for fp16/bf16 on CUDA, the reference where the log-sum-exp is asked
for, and otherwise cpu on the CPU and gather elsewhere.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from sparvar.attention.tables import BlockTable, reference_sparse_attention
from sparvar.errors import SparvarError

BACKENDS = ("auto", "reference", "triton", "flex", "cpu", "gather")


@lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, q: torch.Tensor, table: BlockTable | None = None, lse: bool = False) -> str:
    """The backend that will run for q and `table` (module docstring); `lse`: the log-sum-exp is asked for."""
    if backend not in BACKENDS:
        raise SparvarError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and triton_available():
            return "triton"
        if lse:
            return "reference"
        return "cpu" if q.device.type == "cpu" else "gather"
    if backend == "flex" and table is not None and table.key_block == 1:
        return "gather"
    return backend


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: BlockTable,
    scale: float,
    backend: str = "auto",
    return_lse: bool = False,
):
    """Attention of q (B, H, Lq, D) over the keys `table` lists for each query block.

    Returns out, or (out, lse (B, H, Lq) float32) with return_lse (triton and reference only).
    """
    backend = resolve_backend(backend, q, table, return_lse)
    if backend == "triton":
        from sparvar.kernels.sparse_attention import triton_sparse_attention

        return triton_sparse_attention(q, k, v, table, scale, return_lse)
    if return_lse and backend != "reference":
        raise SparvarError(f"the {backend} backend does not return the log-sum-exp; use triton or reference")
    if backend == "flex":
        from sparvar.attention.flex import flex_attention

        return flex_attention(q, k, v, table, scale)
    if backend == "cpu":
        from sparvar.attention.cpu import cpu_sparse_attention

        return cpu_sparse_attention(q, k, v, table, scale)
    if backend == "gather":
        from sparvar.attention.gather import gather_attention

        return gather_attention(q, k, v, table, scale)
    return reference_sparse_attention(q, k, v, table, scale, return_lse)

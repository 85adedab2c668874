"""One entry for block-sparse attention over a BlockTable; picks a backend by device."""

from __future__ import annotations

from functools import lru_cache

import torch

from sparvar.attention.tables import BlockTable, reference_sparse_attention
from sparvar.errors import SparvarError

BACKENDS = ("auto", "reference", "triton")


@lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """'auto' means triton for CUDA tensors when triton imports, else the float32 reference."""
    if backend not in BACKENDS:
        raise SparvarError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if q.is_cuda and triton_available() else "reference"
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

    Returns out, or (out, lse (B, H, Lq) float32) with return_lse.
    """
    if resolve_backend(backend, q) == "triton":
        from sparvar.attention.triton_sparse import triton_sparse_attention

        return triton_sparse_attention(q, k, v, table, scale, return_lse)
    return reference_sparse_attention(q, k, v, table, scale, return_lse)

"""One entry for block-sparse attention over a BlockTable; picks a backend by device."""

from __future__ import annotations

import torch

from sparvar.attention.tables import BlockTable, reference_sparse_attention
from sparvar.errors import SparvarError

BACKENDS = ("auto", "reference", "flex", "gather")


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: BlockTable, scale: float, backend: str = "auto"
) -> torch.Tensor:
    """Attention of q (B, H, Lq, D) over the keys `table` lists for each query block."""
    if backend not in BACKENDS:
        raise SparvarError(f"unknown sparse attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":  # blocks on CUDA: flex; gathered lists anywhere, and blocks on the CPU: gather
        backend = "flex" if q.is_cuda and table.key_block > 1 else "gather"
    if backend == "flex":
        from sparvar.attention.flex import flex_attention

        return flex_attention(q, k, v, table, scale)
    if backend == "gather":
        from sparvar.attention.gather import gather_attention

        return gather_attention(q, k, v, table, scale)
    return reference_sparse_attention(q, k, v, table, scale)

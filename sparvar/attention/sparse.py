"""One entry for block-sparse attention over a BlockTable; picks a backend by device."""

from __future__ import annotations

import torch

from sparvar.attention.tables import BlockTable, reference_sparse_attention
from sparvar.errors import SparvarError

BACKENDS = ("auto", "reference")


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: BlockTable, scale: float, backend: str = "auto"
) -> torch.Tensor:
    """Attention of q (B, H, Lq, D) over the keys `table` lists for each query block."""
    if backend not in BACKENDS:
        raise SparvarError(f"unknown sparse attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return reference_sparse_attention(q, k, v, table, scale)

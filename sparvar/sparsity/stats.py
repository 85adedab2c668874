"""How much of dense attention a plan computes: densities of block tables, attention FLOPs."""

from __future__ import annotations

import torch

from sparvar import layout
from sparvar.attention.tables import BlockTable


def table_pairs(table: BlockTable) -> torch.Tensor:
    """(query, key) pairs a kernel computes for `table`, whole blocks clipped to the lengths.

    Float64 of shape (B|1, H|1); works from counts and indices, never builds the token mask.
    """
    dev = table.counts.device
    rows = layout.block_sizes(table.q_len, table.q_block, dev).double()
    valid = torch.arange(table.indices.shape[-1], device=dev) < table.counts[..., None]
    if table.key_block == 1:
        per_block = valid.sum(dim=-1).double()
    else:
        cols = layout.block_sizes(table.kv_len, table.key_block, dev).double()
        per_block = torch.where(valid, cols[table.indices.long()], 0.0).sum(dim=-1)
    return (per_block * rows).sum(dim=-1)


def table_density(table: BlockTable) -> torch.Tensor:
    """Fraction of the q_len x kv_len pairs computed, per (B|1, H|1)."""
    return table_pairs(table) / (table.q_len * table.kv_len)


def attention_flops(q_len: int, kv_len: int, head_dim: int, density: float = 1.0) -> float:
    """FLOPs of one (sample, head): q.k and p.v, two flops per multiply-add, times the density."""
    return 4.0 * q_len * kv_len * head_dim * density

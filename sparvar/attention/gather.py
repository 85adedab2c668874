"""Attention over gathered key lists (BlockTable with key_block == 1), in plain PyTorch.

CS4A gives every group of queries its own list of keys. Gathering those keys and values per
group and running SDPA over the (batch, head, group) batch keeps memory at
O(groups x list length) instead of the O(q_len x kv_len) of a masked dense reference, so it
runs on any device at full model sizes. The result is exact for the table (rows with an empty
list give zeros).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparvar.attention.tables import BlockTable
from sparvar.errors import SparvarError


def gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: BlockTable, scale: float) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D) attending to the keys `table` lists."""
    if table.key_block != 1:
        raise SparvarError(f"gather attention needs a gathered table (key_block 1), got key_block {table.key_block}")
    b, h, lq, d = q.shape
    g, m, qb = table.num_q_blocks, table.indices.shape[-1], table.q_block
    idx = table.indices.expand(b, h, g, m).reshape(b, h, g * m, 1).long()
    keys = torch.gather(k, 2, idx.expand(b, h, g * m, d)).view(b, h * g, m, d)
    values = torch.gather(v, 2, idx.expand(b, h, g * m, v.shape[-1])).view(b, h * g, m, v.shape[-1])
    counts = table.counts.expand(b, h, g).reshape(b, h * g, 1, 1)
    mask = torch.arange(m, device=q.device) < counts
    queries = F.pad(q, (0, 0, 0, g * qb - lq)).reshape(b, h * g, qb, d)  # q may be a strided view
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
    out = torch.where(counts > 0, out, 0.0)
    return out.reshape(b, h, g * qb, -1)[:, :, :lq]  # SDPA may return a transposed layout

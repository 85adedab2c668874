"""Attention over gathered key lists (BlockTable with key_block == 1), in plain PyTorch.

CS4A gives every group of queries its own list of keys. Gathering those keys and values per
group and running SDPA over the (batch, head, group) batch keeps memory at
O(groups x list length) instead of the O(q_len x kv_len) of a masked dense reference, and it
never reads the table on the host, so it runs inside CUDA graphs: the GPU path for float32 and
for FlexAttention's key lists. The result is exact for the table (rows with an empty list give
zeros). Block tables (CSLA's) are first expanded into their key tokens; on the CPU, cpu.py runs
them several times faster (benchmarks/demo_cpu_attention.md) and sends key lists here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparvar.attention.tables import BlockTable


def expand_blocks(table: BlockTable) -> BlockTable:
    """The same sparsity as a gathered table: every token of each kept key block, in order."""
    kb, (b, h, g, m) = table.key_block, table.indices.shape
    dev = table.indices.device
    tokens = (table.indices.long()[..., None] * kb + torch.arange(kb, device=dev)).flatten(-2)
    kept = (torch.arange(m, device=dev) < table.counts[..., None])[..., None].expand(b, h, g, m, kb).flatten(-2)
    kept = kept & (tokens < table.kv_len)  # the last block may be short
    order = torch.argsort((~kept).to(torch.int8), dim=-1, stable=True)  # kept tokens first
    tokens = torch.gather(torch.where(kept, tokens, 0), -1, order)
    # width from the shapes, not the counts: no host sync, so it also runs inside CUDA graphs
    return BlockTable(kept.sum(dim=-1).int(), tokens.int().contiguous(), table.q_block, 1, table.q_len, table.kv_len)


def gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: BlockTable, scale: float) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D) attending to the keys `table` lists."""
    if table.key_block != 1:
        table = expand_blocks(table)
    b, h, lq, d = q.shape
    g, m, qb = table.num_q_blocks, table.indices.shape[-1], table.q_block
    # indexing copies whole rows; torch.gather, which indexes every element, was 1.3x slower on a CPU
    idx = table.indices.expand(b, h, g, m).reshape(b, h, g * m)
    bi = torch.arange(b, device=q.device)[:, None, None]
    hi = torch.arange(h, device=q.device)[None, :, None]
    keys = k[bi, hi, idx].view(b, h * g, m, d)
    values = v[bi, hi, idx].view(b, h * g, m, v.shape[-1])
    counts = table.counts.expand(b, h, g).reshape(b, h * g, 1, 1)
    mask = torch.arange(m, device=q.device) < counts
    queries = F.pad(q, (0, 0, 0, g * qb - lq)).reshape(b, h * g, qb, d)  # q may be a strided view
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
    out = torch.where(counts > 0, out, 0.0)
    return out.reshape(b, h, g * qb, -1)[:, :, :lq]  # SDPA may return a transposed layout

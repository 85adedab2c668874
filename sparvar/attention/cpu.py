"""Sparse attention on the CPU: torch's flash SDPA over the listed keys, in a few large calls.

Two things measured on a 2-core CPU shape it (benchmarks/demo_cpu_attention.md). Torch's CPU
flash kernel is fast unmasked, or masked with at least 192 queries per call (below that it works
in 32-query tiles, where a mask costs several times the unmasked run). And on a loaded machine
every parallel region may wait for a descheduled thread, so one SDPA call per query block ran
slower than dense attention there. Hence:
- block tables (key_block > 1, CSLA): query blocks whose listed key blocks hold the same number
  of tokens share one unmasked SDPA call; their keys are copied side by side by index_select
  (CSLA's 32 query blocks at the last scale make 7 calls). The table is read on the host.
- key lists (key_block == 1, CS4A's groups of 192 queries): gather.py, one masked SDPA call
  over every (batch, head, group).
Both are exact for the table; query blocks with no key give zeros.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from sparvar.attention.gather import gather_attention
from sparvar.attention.tables import BlockTable


def _batches(counts: list[int], indices: list[list[int]], table: BlockTable) -> dict:
    """(query rows, key tokens) -> [(row indices, key token indices)] of the blocks of that shape."""
    kb, qb, offsets = table.key_block, table.q_block, torch.arange(table.key_block)
    batches = defaultdict(list)
    for r, count in enumerate(counts):
        if count == 0:
            continue
        tokens = (torch.tensor(indices[r][:count])[:, None] * kb + offsets).flatten()
        tokens = tokens[tokens < table.kv_len]  # the last key block may be short
        rows = torch.arange(r * qb, min(table.q_len, (r + 1) * qb))
        batches[len(rows), len(tokens)].append((rows, tokens))
    return batches


def _block_attention(q, k, v, table: BlockTable, scale: float) -> torch.Tensor:
    b, h, lq, _ = q.shape
    out = q.new_zeros(b, h, lq, v.shape[-1])
    tb, th = table.counts.shape[:2]
    counts, indices = table.counts.tolist(), table.indices.tolist()
    for bi in range(tb):
        bs = slice(None) if tb == 1 else slice(bi, bi + 1)  # a size-1 table dim serves every sample
        for hi in range(th):
            hs = slice(None) if th == 1 else slice(hi, hi + 1)
            qs, ks, vs, outs = q[bs, hs], k[bs, hs], v[bs, hs], out[bs, hs]
            for (n_rows, n_keys), members in _batches(counts[bi][hi], indices[bi][hi], table).items():
                n = len(members)
                rows, keys = torch.cat([m[0] for m in members]), torch.cat([m[1] for m in members])

                def side_by_side(x, idx, length):  # (B', H', n * length, D) -> (B', H' * n, length, D)
                    return x.index_select(2, idx).unflatten(2, (n, length)).flatten(1, 2)

                o = F.scaled_dot_product_attention(
                    side_by_side(qs, rows, n_rows), side_by_side(ks, keys, n_keys), side_by_side(vs, keys, n_keys),
                    scale=scale,
                )
                outs.index_copy_(2, rows, o.reshape(*qs.shape[:2], n * n_rows, -1))
    return out


def cpu_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: BlockTable, scale: float) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D) attending to the keys `table` lists."""
    if table.key_block == 1:
        return gather_attention(q, k, v, table, scale)
    return _block_attention(q, k, v, table, scale)

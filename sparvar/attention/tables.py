"""Sparse attention plans as small tables, and the float32 reference that defines their meaning.

A `BlockTable` says, for every block of `q_block` consecutive queries, which keys it visits:
a count and a list of indices, like FlexAttention's BlockMask. With `key_block > 1` an index
names a block of `key_block` consecutive keys; with `key_block == 1` it names one key token
(the gathered, column-sparse form CS4A uses). Leading dims are (B or 1, H or 1): size 1
broadcasts over batch or heads. Entries past the count are ignored; duplicates must not occur.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparvar.errors import SparvarError


@dataclass(frozen=True)
class BlockTable:
    counts: torch.Tensor  # int32 (B|1, H|1, num_q_blocks)
    indices: torch.Tensor  # int32 (B|1, H|1, num_q_blocks, max_entries)
    q_block: int
    key_block: int
    q_len: int
    kv_len: int

    def __post_init__(self):
        nq = -(-self.q_len // self.q_block)
        if self.counts.shape[-1] != nq or self.indices.shape[:3] != self.counts.shape:
            raise ValueError(
                f"table shapes {tuple(self.counts.shape)} / {tuple(self.indices.shape)} do not fit "
                f"{nq} query blocks of {self.q_block}"
            )

    def check_fits(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Refuse q (B, H, Lq, D) and k (B, H, Lk, D) of other lengths than planned: a table for
        fewer keys would read them shifted."""
        if (self.q_len, self.kv_len) != (q.shape[2], k.shape[2]):
            raise SparvarError(f"table is for {self.q_len} queries x {self.kv_len} keys, got {q.shape[2]} x {k.shape[2]}")

    def check_spans(self, batch: int, heads: int) -> None:
        """Refuse a table whose (B|1, H|1) leading dims neither match nor broadcast over `batch` x
        `heads`, for libraries that take it expanded."""
        b, h = self.counts.shape[:2]
        if b not in (1, batch) or h not in (1, heads):
            raise SparvarError(f"a table for {b} x {h} (batch x heads) does not fit {batch} x {heads}")

    @property
    def num_q_blocks(self) -> int:
        return self.counts.shape[-1]

    @property
    def num_kv_units(self) -> int:
        return -(-self.kv_len // self.key_block)

    def unit_mask(self) -> torch.Tensor:
        """Block mask (B|1, H|1, num_q_blocks, num_kv_units), True where a query block lists a key unit."""
        b, h, nq, m = self.indices.shape
        valid = torch.arange(m, device=self.indices.device) < self.counts[..., None].to(torch.long)
        units = torch.zeros(b, h, nq, self.num_kv_units + 1, dtype=torch.bool, device=self.indices.device)
        # invalid entries are routed to a spare column that is dropped afterwards
        idx = torch.where(valid, self.indices.to(torch.long), self.num_kv_units)
        units.scatter_(-1, idx, True)
        return units[..., : self.num_kv_units]

    def to_mask(self) -> torch.Tensor:
        """Token mask (B|1, H|1, q_len, kv_len), True where a query may see a key."""
        mask = self.unit_mask().repeat_interleave(self.key_block, dim=-1)[..., : self.kv_len]
        return mask.repeat_interleave(self.q_block, dim=-2)[..., : self.q_len, :]

    def density(self) -> torch.Tensor:
        """Fraction of (query, key) pairs computed, per (B|1, H|1), counting whole blocks."""
        return self.to_mask().float().mean(dim=(-2, -1))


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention in float32; rows that see no key give zeros.

    Returns (out (B, H, Lq, D) in q's dtype, lse (B, H, Lq) float32; -inf on empty rows).
    """
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bhqk,bhkd->bhqd", p, v.float())
    return out.to(q.dtype), lse


def reference_sparse_attention(q, k, v, table: BlockTable, scale: float, return_lse: bool = False):
    """What every sparse backend must compute for `table`, in float32, on any device."""
    out, lse = reference_attention(q, k, v, table.to_mask(), scale)
    return (out, lse) if return_lse else out

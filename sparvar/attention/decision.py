"""Decision-scale attention: dense output plus column sums of the softmax per query group.

CS4A picks, for each group of consecutive queries, the keys that drew the most attention mass;
the column sums sum_q softmax(q.K)[key] over the group's queries are what it ranks.
"""

from __future__ import annotations

import torch

from sparvar.attention.sparse import resolve_backend
from sparvar.attention.tables import reference_attention


def reference_attention_colsum(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 reference: (out (B, H, Lq, D), colsum (B, H, ceil(Lq / group), Lk) float32)."""
    out, lse = reference_attention(q, k, v, None, scale)
    p = torch.exp(torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale - lse[..., None])
    b, h, lq, lk = p.shape
    pad = -lq % group
    p = torch.nn.functional.pad(p, (0, 0, 0, pad))
    return out, p.view(b, h, -1, group, lk).sum(dim=3)


def grouped_attention_colsum(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's result, one query group at a time in float32 (any device, no host sync).

    Each group's probabilities serve both its output and its column sums, so scores are computed
    once, and the group's (B, H, group, Lk) block stays small enough for the cache; on a CPU
    this is 5x faster than the reference (benchmarks/demo_cpu_attention.md).
    """
    b, h, lq, _ = q.shape
    q32, kt, v32 = q.float() * scale, k.float().transpose(-1, -2), v.float()
    out = q.new_empty(b, h, lq, v.shape[-1], dtype=torch.float32)
    colsum = q.new_empty(b, h, -(-lq // group), k.shape[2], dtype=torch.float32)
    for i in range(colsum.shape[2]):
        rows = slice(i * group, (i + 1) * group)
        p = torch.matmul(q32[:, :, rows], kt).softmax(dim=-1)
        torch.sum(p, dim=2, out=colsum[:, :, i])
        torch.matmul(p, v32, out=out[:, :, rows])
    return out.to(q.dtype), colsum


def attention_with_colsum(q, k, v, group: int, scale: float, backend: str = "auto"):
    """Dense attention and per-group column sums of its probabilities in one call."""
    chosen = resolve_backend(backend, q)
    if chosen == "triton":
        from sparvar.kernels.decision import triton_attention_colsum

        return triton_attention_colsum(q, k, v, group, scale)
    if chosen == "reference":
        return reference_attention_colsum(q, k, v, group, scale)
    return grouped_attention_colsum(q, k, v, group, scale)

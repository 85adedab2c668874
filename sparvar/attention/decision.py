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


def attention_with_colsum(q, k, v, group: int, scale: float, backend: str = "auto"):
    """Dense attention and per-group column sums of its probabilities in one call."""
    if resolve_backend(backend, q) == "triton":
        from sparvar.attention.triton_decision import triton_attention_colsum

        return triton_attention_colsum(q, k, v, group, scale)
    return reference_attention_colsum(q, k, v, group, scale)

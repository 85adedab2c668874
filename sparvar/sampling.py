"""Top-k / top-p sampling from logits with per-item generators (seeds honoured per image)."""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set to -inf what top-k (keep the k largest) and top-p (keep the smallest set of mass >= p) drop."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop_sorted[..., -1] = False  # never drop the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def sample(logits: torch.Tensor, generators: list[torch.Generator], top_k: int = 0, top_p: float = 0.0):
    """One token per row of logits (B, ..., V); item b draws from generators[b]. Returns (B, ...) int64."""
    u = torch.stack([torch.rand(logits.shape[1:-1], generator=g, device=logits.device) for g in generators])
    if logits.shape[-1] == 2:
        return _sample_bits(logits.float(), u, top_k, top_p)
    probs = filter_logits(logits.float(), top_k, top_p).softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    # inverse CDF: the first token whose cumulative mass exceeds u; `<=` skips zero-mass tokens at u = 0
    return (cdf <= u[..., None] * cdf[..., -1:]).sum(dim=-1).clamp_max(logits.shape[-1] - 1)


def _sample_bits(logits: torch.Tensor, u: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The same draw for a two-token vocabulary (Infinity's bits) without sort and cumsum, whose
    kernels handle rows of two badly (12 ms of an 8B generation on an H200): top-p keeps the
    less likely token only if its probability exceeds 1 - top_p, top-k 1 never keeps it, and the
    token is 1 where p(0) <= u."""
    diff = logits[..., 1] - logits[..., 0]
    p1 = torch.sigmoid(diff)
    keep_both = torch.ones_like(diff, dtype=torch.bool)
    if 0.0 < top_p < 1.0:
        keep_both &= torch.minimum(p1, 1 - p1) > 1 - top_p
    if top_k == 1:
        keep_both &= diff == 0
    p1 = torch.where(keep_both, p1, (diff > 0).float())
    return (1 - p1 <= u).long()

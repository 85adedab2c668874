"""Sampling tokens from logits: our per-item sampler, and the official samplers' way of drawing.

`sample` gives every item of a batch its own generator, so an image depends on its seed alone.
`OfficialDraws` draws as the official Infinity and VAR samplers do: one generator for the whole
batch, seeded once per generation, one `torch.multinomial` per scale over every row in
(item, token[, bit]) order; the same seed then gives the official scripts' images on the same
device and software.
"""

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


class OfficialDraws:
    """The official samplers' random draws, in their order, from one seeded generator."""

    def __init__(self, seed: int, device: torch.device):
        self.generator = torch.Generator(device).manual_seed(seed)

    def labels(self, num_classes: int, batch: int) -> torch.Tensor:
        """Random classes for a batch (VAR with label_B None), drawn before any token."""
        uniform = torch.full((1, num_classes), 1.0 / num_classes, device=self.generator.device)
        return torch.multinomial(uniform, batch, replacement=True, generator=self.generator).reshape(batch)

    def tokens(self, logits: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, ...) drawn from guided logits (B, ..., V), and the filtered logits they were
        drawn from (VAR's more_smooth mixes codewords by them)."""
        vocab = logits.shape[-1]
        filtered = filter_logits(logits.float(), top_k, top_p)
        rows = filtered.softmax(dim=-1).reshape(-1, vocab)
        drawn = torch.multinomial(rows, 1, replacement=True, generator=self.generator)
        return drawn.view(logits.shape[:-1]), filtered

    def gumbel(self, like: torch.Tensor) -> torch.Tensor:
        """Gumbel noise shaped like `like`, drawn after the scale's tokens (VAR's more_smooth)."""
        return -torch.empty_like(like).exponential_(generator=self.generator).log()


def item_gumbel(like: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Gumbel noise shaped like `like` (B, ...), item b's from generators[b]."""
    return torch.stack([-torch.empty_like(x).exponential_(generator=g).log() for x, g in zip(like, generators)])


def smooth_probs(filtered: torch.Tensor, noise: torch.Tensor, ratio: float) -> torch.Tensor:
    """VAR's more_smooth: a Gumbel-softmax over the filtered logits sharpened by the scale's
    progress `ratio` (k / (K - 1)), at a temperature that falls from 0.27 to 0.005 (MaskGIT's)."""
    temperature = max(0.27 * (1 - ratio * 0.95), 0.005)
    return ((filtered * (1 + ratio) + noise) / temperature).softmax(dim=-1)

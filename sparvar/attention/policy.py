"""The attention seam: every self-attention call of a generation goes through a policy.

At step k of next-scale prediction the queries are the n_k tokens of scale k and the keys and
values are views of the static KV cache holding scales 0..k. A policy decides how to attend
(dense, or a sparse plan) and may keep state across the scales of one generation; the pipeline
calls `reset()` before each generation.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparvar.attention.fa4 import fa4_attention, fa4_runs_here
from sparvar.errors import SparvarError
from sparvar.schedules import Schedule


@dataclass(frozen=True)
class AttentionCall:
    """What a policy is told about one self-attention call besides the tensors."""

    layer: int
    scale: int
    num_layers: int
    schedule: Schedule
    softmax_scale: float  # 1.0 for cosine attention, where q is pre-scaled
    # token pruning (pruning.py): positions (B, m) within the scale of the queries, which are then
    # only those m tokens; keys keep their layout (pruned slots hold stand-ins). None: all n_k queries
    query_index: torch.Tensor | None = None

    @property
    def q_offset(self) -> int:
        """Sequence index of the first query token (the first token of this scale)."""
        return self.schedule.offsets[self.scale]

    @property
    def kv_length(self) -> int:
        return self.schedule.kv_length(self.scale)


class AttentionPolicy:
    """Base of all policies. q: (B, H, n_k, D); k, v: (B, H, N_k, D); returns (B, H, n_k, D)."""

    name = "base"

    def reset(self) -> None:
        """Forget per-generation state; called once before every generation."""

    def stats(self) -> dict | None:
        """What the last generation computed, per (layer, scale) and in total, for policies that
        count it (SparVARPolicy: FLOPs against dense); None for the others."""
        return None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        raise NotImplementedError


_SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math", "fa4")


def _sdpa_context(backend: str):
    """Prefer one SDPA kernel; the others stay allowed, in torch's order, for inputs it refuses."""
    if backend == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    preferred = kernels[backend]
    return sdpa_kernel([preferred] + [k for k in kernels.values() if k != preferred], set_priority=True)


class DenseAttention(AttentionPolicy):
    """Full attention through torch's scaled_dot_product_attention, or FlashAttention-4.

    `backend` puts one SDPA kernel first ("cudnn", "flash", ...); "auto" keeps torch's choice;
    "fa4" runs FlashAttention-4 where it was measured (attention/fa4.py's `fa4_runs_here`: on an
    H100 its dense kernel took 1.92 ms where cuDNN's took 2.24, 8B's last scale) and SDPA's cuDNN
    kernel elsewhere.
    """

    name = "dense"

    def __init__(self, backend: str = "auto"):
        if backend not in _SDPA_BACKENDS:
            raise SparvarError(f"unknown SDPA backend {backend!r}; choose one of {', '.join(_SDPA_BACKENDS)}")
        self.backend = backend

    def __call__(self, q, k, v, call):
        if self.backend == "fa4" and fa4_runs_here(q):
            return fa4_attention(q, k, v, None, call.softmax_scale)
        with _sdpa_context("cudnn" if self.backend == "fa4" else self.backend):
            return F.scaled_dot_product_attention(q, k, v, scale=call.softmax_scale)

"""Attention: the policy seam, dense SDPA, the block tables of sparse plans and the choice of a
sparse backend (the Triton kernels themselves live in sparvar/kernels/)."""

from sparvar.attention.policy import AttentionCall, AttentionPolicy, DenseAttention

__all__ = ["AttentionCall", "AttentionPolicy", "DenseAttention"]

"""Attention: the policy seam, dense SDPA and (later) sparse kernels."""

from sparvar.attention.policy import AttentionCall, AttentionPolicy, DenseAttention

__all__ = ["AttentionCall", "AttentionPolicy", "DenseAttention"]

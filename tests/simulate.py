"""A generation without a model: random q/k/v per (layer, scale) through a static KV cache.

The cache and the calls are laid out exactly as the pipeline does it: cache (B, H, N_total, D),
scale k writes [offset_k, offset_k + n_k), the policy sees the views [:, :, :kv_length(k)].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparvar.attention.policy import AttentionCall


def simulate(
    policy, schedule, num_layers=3, batch=2, heads=2, dim=16, seed=0, dtype=torch.float32, sharpness=8.0, device="cpu"
):
    """Run one generation; returns {(layer, scale): (q, k_view, v_view, out)}.

    Queries and keys are unit vectors and queries are scaled by `sharpness` (cosine attention,
    softmax scale 1), so attention is peaked as in real models rather than uniform.
    """
    gen = torch.Generator().manual_seed(seed)
    total = schedule.total
    cache_k = torch.zeros(num_layers, batch, heads, total, dim, dtype=dtype, device=device)
    cache_v = torch.zeros_like(cache_k)
    policy.reset()
    seen = {}
    for scale, n in enumerate(schedule.lengths):
        start = schedule.offsets[scale]
        end = start + n
        for layer in range(num_layers):
            q = (F.normalize(torch.randn(batch, heads, n, dim, generator=gen), dim=-1) * sharpness).to(device, dtype)
            cache_k[layer, :, :, start:end] = F.normalize(torch.randn(batch, heads, n, dim, generator=gen), dim=-1)
            cache_v[layer, :, :, start:end] = torch.randn(batch, heads, n, dim, generator=gen)
            k, v = cache_k[layer, :, :, :end], cache_v[layer, :, :, :end]
            call = AttentionCall(layer, scale, num_layers, schedule, 1.0)
            seen[layer, scale] = (q, k, v, policy(q, k, v, call))
    return seen

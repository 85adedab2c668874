"""FLOPs accounting: what a generation computes against a full dense one (`sparvar eval`,
`sparvar calibrate-skip`, the CLI's lines and comparison captions, the web page).

Estimates from the model's config, the schedule, the token pruning plan and the share of dense
attention each (layer, scale) computed (the policy's stats); nothing is timed here.
"""

from __future__ import annotations

from sparvar.attention.policy import AttentionPolicy
from sparvar.pruning import PrunePlan, prune_plan, resolve_pruning
from sparvar.schedules import Schedule


def transformer_flops(cfg, schedule: Schedule, num_scales: int, prune: PrunePlan | None = None,
                      density: dict | None = None) -> float:
    """FLOPs of the transformer blocks for one row of the batch over the first `num_scales` scales.

    Matrix products count 2 FLOPs per multiply-add (self-attention projections, the image side of
    cross-attention, FFN); self-attention counts q.k and p.v over the visible keys, times
    `density[(layer, scale)]` (share of dense attention computed; 1 where absent). Pruned layers
    count their kept tokens. The head, the embeddings and the attention to text are left out.
    """
    c, f = cfg.width, cfg.ffn_hidden
    per_token = 2 * (4 * c * c + (2 * c * c if cfg.cross_attention else 0) + 2 * c * f)
    total = 0.0
    for k in range(num_scales):
        for layer in range(cfg.depth):
            n = schedule.lengths[k]
            if prune is not None and k in prune.kept and prune.first <= layer < prune.last:
                n = prune.kept[k]
            attention = 4.0 * n * schedule.kv_length(k) * c * (density or {}).get((layer, k), 1.0)
            total += n * per_token + attention
    return total


def attention_densities(policy) -> dict:
    """(layer, scale) -> share of dense attention FLOPs the policy's last generation computed."""
    stats = policy.stats()
    if stats is None:
        return {}
    return {(e["layer"], e["scale"]): e["flops"] / e["flops_dense"] for e in stats["entries"]}


def attention_density(policy: AttentionPolicy) -> float:
    """Share of dense attention FLOPs the last generation computed (1.0 for policies without stats)."""
    stats = policy.stats()
    if stats is None:
        return 1.0
    total = stats["total"]
    return total["flops"] / total["flops_dense"] if total["flops_dense"] else 1.0


def attention_share(out, depth: int) -> float:
    """Attention a generation computed as a share of a full dense generation of its schedule, in
    (query, key) pairs over every layer and scale: scales it skipped count nothing, so skipping
    lowers it (attention_density is of the calls that ran). A (layer, scale) that ran counts its
    density, 1 for policies without stats (a pruned one: of the tokens that ran)."""
    schedule = out.schedule
    pairs = [n * schedule.kv_length(k) for k, n in enumerate(schedule.lengths)]
    ran = max(out.scales_used, default=len(schedule))
    density = attention_densities(out.policy) if out.policy is not None else {}
    done = sum(density.get((layer, k), 1.0) * pairs[k] for layer in range(depth) for k in range(ran))
    return done / (depth * sum(pairs))


def flops_shares(spec, out, schedule: Schedule, prune: str | None) -> list[float]:
    """Per image of a generation's output: transformer FLOPs of the scales it used (kept tokens
    where pruned; attention at the density its policy computed) over those of a full generation
    with dense attention."""
    cfg = spec.transformer
    plan = prune_plan(resolve_pruning(prune).config, cfg.depth, schedule) if prune else None
    density = attention_densities(out.policy)
    full = transformer_flops(cfg, schedule, len(schedule))
    return [transformer_flops(cfg, schedule, n, plan, density) / full for n in out.scales_used]

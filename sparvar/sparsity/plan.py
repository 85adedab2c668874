"""The plan of a preset for a model depth and schedule, as plain data (no weights needed)."""

from __future__ import annotations

from dataclasses import asdict

from sparvar.schedules import Schedule
from sparvar.sparsity import cs4a
from sparvar.sparsity.presets import PRESETS, SparVARConfig, get_config, make_plan

_NOTES = {
    "dense": "full attention",
    "decision": "dense attention + column sums per query group; plus a sparse pass for the residual",
    "cs4a": "data-dependent: block_density is the budget (sinks + source window + top-k + own-scale window, "
    "duplicates not removed), an upper bound of what runs",
    "csla": "exact: the cached block table",
}


def plan_report(
    num_layers: int,
    schedule: Schedule,
    preset: str | SparVARConfig,
    q_block: int | None = None,
    key_block: int | None = None,
    pooled_layers: tuple[int, ...] = (),
) -> dict:
    """For each layer and scale, the mode and its block density; plus the pairs computed overall.

    `pairs` counts (query, key) pairs per sample and head summed over layers and scales, so
    `saved_fraction` is the share of attention FLOPs the plan saves (CS4A at its budget). In
    `pooled_layers` the queries see a source slot pooled to their own scale's grid
    (Schedule.pooled: VAREdit's first layer), and are counted so.
    """
    overrides = {k: v for k, v in (("q_block", q_block), ("key_block", key_block)) if v is not None}
    config = get_config(preset, **overrides)
    plan = make_plan(config, num_layers, schedule)
    sink_tokens = schedule.offsets[plan.sink_scales] if plan.sink_scales < len(schedule) else schedule.total
    sink_tokens -= schedule.source_length
    layers, dense_pairs, planned_pairs = [], 0, 0.0
    for layer in range(num_layers):
        scales = []
        for k in range(len(schedule)):
            keys = schedule.pooled(k) if layer in pooled_layers and schedule.source else schedule
            seen = make_plan(config, num_layers, keys)
            mode = seen.modes[layer][k]
            density = seen.density.get((mode, k), 1.0)
            pairs = schedule.lengths[k] * keys.kv_length(k)
            dense_pairs += pairs
            planned_pairs += pairs * density
            if mode == "decision" and config.residual:  # the residual's pass over sinks, source window and top-k
                source = cs4a.source_keys(keys, k, config.group, seen.source_window)[1]
                kept = sink_tokens + plan.topk + (float(source.sum(-1).float().mean()) if source.numel() else 0.0)
                planned_pairs += schedule.lengths[k] * min(keys.kv_length(k), kept)
            scales.append({"scale": k, "mode": mode, "block_density": density, "exact": mode != "cs4a"})
        layers.append({"layer": layer, "scales": scales})
    return {
        "preset": preset if isinstance(preset, str) else "custom",
        "description": PRESETS[preset].description if isinstance(preset, str) else "",
        "schedule": {"sizes": [list(s) for s in schedule.sizes], "tokens": schedule.total,
                     "source": list(schedule.source) if schedule.source else None},
        "num_layers": num_layers,
        "settings": asdict(config),
        "cs4a_layers": plan.cs4a_layers,
        "sink_scales": plan.sink_scales,
        "sink_tokens": sink_tokens,
        "source_window": plan.source_window if schedule.source else None,
        "pooled_source_layers": list(pooled_layers) if schedule.source else [],
        "decision_scale": plan.decision_scale,
        "topk_keys": plan.topk,
        "csla_windows": list(plan.csla_windows),
        "notes": _NOTES,
        "layers": layers,
        "pairs": {
            "dense": dense_pairs,
            "planned": planned_pairs,
            "saved_fraction": 1.0 - planned_pairs / dense_pairs,
        },
    }

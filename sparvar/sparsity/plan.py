"""The plan of a preset for a model depth and schedule, as plain data (no weights needed)."""

from __future__ import annotations

from dataclasses import asdict

from sparvar.schedules import Schedule
from sparvar.sparsity.presets import PRESETS, SparVARConfig, get_config, make_plan

_NOTES = {
    "dense": "full attention",
    "decision": "dense attention + column sums per query group; plus a sparse pass for the residual",
    "cs4a": "data-dependent: block_density is the budget (sinks + top-k + own-scale window, "
    "duplicates not removed), an upper bound of what runs",
    "csla": "exact: the cached block table",
}


def plan_report(
    num_layers: int,
    schedule: Schedule,
    preset: str | SparVARConfig,
    q_block: int | None = None,
    key_block: int | None = None,
) -> dict:
    """For each layer and scale, the mode and its block density; plus the pairs computed overall.

    `pairs` counts (query, key) pairs per sample and head summed over layers and scales, so
    `saved_fraction` is the share of attention FLOPs the plan saves (CS4A at its budget).
    """
    overrides = {k: v for k, v in (("q_block", q_block), ("key_block", key_block)) if v is not None}
    config = get_config(preset, **overrides)
    plan = make_plan(config, num_layers, schedule)
    sink_tokens = schedule.offsets[plan.sink_scales] if plan.sink_scales < len(schedule) else schedule.total
    layers, dense_pairs, planned_pairs = [], 0, 0.0
    for layer, modes in enumerate(plan.modes):
        scales = []
        for k, mode in enumerate(modes):
            density = plan.density.get((mode, k), 1.0)
            pairs = schedule.lengths[k] * schedule.kv_length(k)
            dense_pairs += pairs
            planned_pairs += pairs * density
            if mode == "decision" and config.residual:  # the residual's pass over sinks + top-k
                planned_pairs += schedule.lengths[k] * min(schedule.kv_length(k), sink_tokens + plan.topk)
            scales.append({"scale": k, "mode": mode, "block_density": density, "exact": mode != "cs4a"})
        layers.append({"layer": layer, "scales": scales})
    return {
        "preset": preset if isinstance(preset, str) else "custom",
        "description": PRESETS[preset].description if isinstance(preset, str) else "",
        "schedule": {"sizes": [list(s) for s in schedule.sizes], "tokens": schedule.total},
        "num_layers": num_layers,
        "settings": asdict(config),
        "cs4a_layers": plan.cs4a_layers,
        "sink_scales": plan.sink_scales,
        "sink_tokens": sink_tokens,
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

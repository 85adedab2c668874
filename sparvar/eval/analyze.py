"""`sparvar analyze`: the three attention properties SparVAR relies on, measured on a model.

One dense generation; at every query scale from --from-scale on, each layer's attention
probabilities (the conditional sample, mean over heads) give:
- sink mass: the share of attention on the sink scales (SparVAR keeps them whole);
- cross-scale similarity: for each key scale i >= 1 (>= 2 after a text prefix), the cosine similarity between the map of
  query scale k onto key scale i and the map of scale k-1 onto i-1 resized to it (bilinear on
  both grids); averaged over i (CS4A reuses the coarser scale's choice);
- locality: the share of the attention on non-sink key scales that lies within Chebyshev radius
  r of the query's projected position on each key scale (what CSLA's windows keep);
- for an edit (a source slot before scale 0, VAREdit): the source's share of the attention, and
  the share of that within radius r of the query's projection onto the source grid (what the
  plan's source window keeps; in the first layer the source is seen pooled to the query scale).
Then a generation with the chosen preset records its block tables and draws them. On random
weights the numbers only exercise the code: what a model attends to is learned.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparvar import layout
from sparvar.attention.policy import DenseAttention
from sparvar.bench.common import command_line, header, provenance, write
from sparvar.errors import SparvarError
from sparvar.eval.draw import heatmap, mask_picture
from sparvar.files import save_image
from sparvar.generation import GenerationConfig
from sparvar.options import ArgumentParser, HelpFormatter, add_model_options, device_of, output_folder
from sparvar.schedules import Schedule


def head_mean_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax probabilities of one sample (H, n, D) x (H, N, D), averaged over heads: (n, N) float32."""
    out = torch.zeros(q.shape[1], k.shape[1], device=q.device)
    for h in range(q.shape[0]):  # one head at a time keeps memory at one n x N map
        out += torch.softmax(q[h].float() @ k[h].float().T * scale, dim=-1)
    return out / q.shape[0]


def resize_map(m: torch.Tensor, src_q: tuple, src_k: tuple, dst_q: tuple, dst_k: tuple) -> torch.Tensor:
    """An attention map (n_q, n_k) between two grids, resized bilinearly on both to (dst_q, dst_k)."""
    x = m.reshape(-1, 1, *src_k)
    x = F.interpolate(x, size=dst_k, mode="bilinear") if tuple(src_k) != tuple(dst_k) else x
    x = x.reshape(*src_q, -1).permute(2, 0, 1)[:, None]  # (n_k', 1, hq, wq)
    x = F.interpolate(x, size=dst_q, mode="bilinear") if tuple(src_q) != tuple(dst_q) else x
    return x.reshape(x.shape[0], -1).T  # (n_q', n_k')


def source_locality(p: torch.Tensor, schedule: Schedule, scale: int, radius: int) -> float:
    """Share of the attention on the source slot within `radius` of the query's projection onto it."""
    block = p[:, : schedule.source_length]
    window = layout.source_window_mask(schedule, scale, 2 * radius + 1, p.device)
    total = float(block.sum())
    return float((block * window).sum()) / total if total > 0 else float("nan")


def locality(p: torch.Tensor, schedule: Schedule, scale: int, sinks: int, radius: int) -> float:
    """Share of the attention on key scales sinks..scale within `radius` of the projected position."""
    near = total = 0.0
    for i in range(sinks, scale + 1):
        start, n = schedule.offsets[i], schedule.lengths[i]
        block = p[:, start : start + n]
        window = layout.window_mask(schedule, scale, i, 2 * radius + 1, p.device)
        near += float((block * window).sum())
        total += float(block.sum())
    return near / total if total > 0 else float("nan")


class PropertyProbe(DenseAttention):
    """Dense attention that measures the properties on sample 0 at query scales >= from_scale."""

    name = "dense+probe"

    def __init__(self, from_scale: int, radii: list[int], sinks: int):
        super().__init__()
        self.from_scale, self.radii, self.sinks = from_scale, radii, sinks
        self.sink_mass, self.cross, self.local = {}, {}, defaultdict(dict)
        self.source_mass, self.source_local = {}, defaultdict(dict)  # edits only
        # layer -> head-mean map of the previous scale, and its keys' layout (the pooled layer's changes)
        self._previous: dict[int, tuple[torch.Tensor, Schedule]] = {}

    def __call__(self, q, k, v, call):
        out = super().__call__(q, k, v, call)
        s, k_scale, layer = call.schedule, call.scale, call.layer
        if k_scale >= self.from_scale - 1:
            p = head_mean_probs(q[0], k[0], call.softmax_scale)
            key = (layer, k_scale)
            if k_scale >= self.from_scale:
                self.sink_mass[key] = float(p[:, s.source_length : s.offsets[self.sinks]].sum(1).mean())
                for r in self.radii:
                    self.local[r][key] = locality(p, s, k_scale, self.sinks, r)
                if s.source is not None:
                    self.source_mass[key] = float(p[:, : s.source_length].sum(1).mean())
                    for r in self.radii:
                        self.source_local[r][key] = source_locality(p, s, k_scale, r)
                self.cross[key] = self._cross_similarity(p, s, *self._previous[layer], k_scale)
            self._previous[layer] = p, s
        return out

    @staticmethod
    def _cross_similarity(p, s: Schedule, prev, prev_s: Schedule, k: int) -> float:
        sims = []
        for i in range(1 if s.prefix is None else 2, k + 1):  # a text prefix in scale 0's slot has no grid
            now = p[:, s.offsets[i] : s.offsets[i] + s.lengths[i]]
            before = prev[:, prev_s.offsets[i - 1] : prev_s.offsets[i - 1] + s.lengths[i - 1]]
            before = resize_map(before, s.sizes[k - 1], s.sizes[i - 1], s.sizes[k], s.sizes[i])
            sims.append(float(F.cosine_similarity(now.flatten(), before.flatten(), dim=0)))
        return sum(sims) / len(sims)


def _grid(values: dict, layers: int, scales: list[int]) -> np.ndarray:
    return np.array([[values.get((layer, k), np.nan) for k in scales] for layer in range(layers)])


class TableRecorder:
    """Wraps a SparVAR policy's sparse step to keep the last table of every (layer, scale)."""

    def __init__(self, policy):
        self.policy, self.tables = policy, {}  # (layer, scale) -> (table, the keys' layout)
        inner = policy._sparse

        def record(q, k, v, table, call):
            self.tables.setdefault((call.layer, call.scale), (table, call.schedule))
            return inner(q, k, v, table, call)

        policy._sparse = record


def draw_tables(tables: dict, modes, out: Path) -> list[str]:
    """One picture per sparse (layer, scale) (TableRecorder's tables and their keys' layouts):
    token mask of sample 0, head 0; red lines where the source ends and scales start. A table
    shared by several layers (CSLA's are cached per scale) is drawn once."""
    files, drawn = [], set()
    for (layer, scale), (table, schedule) in sorted(tables.items(), key=lambda item: item[0]):
        if id(table) in drawn:
            continue
        drawn.add(id(table))
        mask = table.to_mask()[0, 0]
        mode = modes[layer][scale]
        title = f"layer {layer}, scale {scale} ({mode}): {mask.float().mean():.1%} of pairs"
        name = f"table_layer{layer}_scale{scale}_{mode}.png"
        starts = [start for start in schedule.offsets[: scale + 1] if start > 0]
        save_image(mask_picture(mask.cpu(), starts, title), out / name)
        files.append(name)
    return files


def parse_args(argv) -> argparse.Namespace:
    p = ArgumentParser(prog="sparvar analyze", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    add_model_options(p)
    p.add_argument("--condition", help="class index, or a prompt (default: the model's example prompt or "
                   "class 0, or 'a photo of a cat' for text models without one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generations")
    p.add_argument("--resolution", type=int, help="pixel budget of the schedule (default: the model's)")
    p.add_argument("--from-scale", type=int, help="first query scale measured (default: the first after the sinks)")
    p.add_argument("--radii", default="1,2,4", help="locality radii in cells of each key scale")
    p.add_argument("--attention", default="default", help="preset whose block tables are drawn")
    p.add_argument("--image", help="the source picture, for models that edit one (VAREdit)")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights for every part, no files needed (the measurements then only exercise the code)")
    p.add_argument("--out", default="out/analyze", help="folder for analyze.json and the pictures")
    p.add_argument("--quiet", action="store_true", help="no progress")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Every option is checked, and the output folder made, before the model loads."""
    from sparvar.loading import load_pipeline
    from sparvar.models.registry import get_spec
    from sparvar.sparsity import make_policy
    from sparvar.validation import default_dtype, validate

    args = parse_args(argv)
    spec = get_spec(args.model)
    condition = args.condition or spec.default_condition
    if condition is None:  # a text model without an example prompt
        condition = "a photo of a cat"
    device = device_of(args, spec)
    config = validate(spec, [condition], GenerationConfig(seed=args.seed, resolution=args.resolution,
                                                          attention=args.attention, image=args.image),
                      device, default_dtype(device), args.precision, args.offload)
    random = args.random_weights or not (args.weights or spec.files or spec.bundled)
    schedule = config.schedule
    sinks = layout.default_sink_scales(schedule)
    from_scale = args.from_scale if args.from_scale is not None else sinks
    if not 0 <= from_scale < len(schedule):
        raise SparvarError(f"--from-scale must be in 0..{len(schedule) - 1} ({len(schedule)} scales), got {from_scale}")
    try:
        radii = [int(r) for r in args.radii.split(",")]
    except ValueError:
        raise SparvarError(f"--radii takes integers separated by commas, not {args.radii!r}") from None
    if min(radii) < 0:
        raise SparvarError(f"--radii must be 0 or more, got {args.radii}")
    out = output_folder(args.out)
    say = (lambda text: None) if args.quiet else (lambda text: print(text, flush=True))  # noqa: E731

    pipe = load_pipeline(spec.name, args.weights, args.vae, args.text_encoder, device=device,
                         random_weights=args.random_weights, precision=args.precision, offload=args.offload)
    probe = PropertyProbe(max(from_scale, 1), radii, sinks)
    say(f"1/3 dense generation, measuring attention at query scales {probe.from_scale}-{len(schedule) - 1}")
    pipe.generate([condition], GenerationConfig.build(config, attention=probe), progress=not args.quiet)
    say(f"2/3 {args.attention} generation, recording its block tables")
    policy = make_policy(args.attention)
    recorder = TableRecorder(policy)
    pipe.generate([condition], GenerationConfig.build(config, attention=policy), progress=not args.quiet)
    say(f"3/3 drawing into {out}")
    layers, scales = spec.transformer.depth, list(range(probe.from_scale, len(schedule)))
    rows, cols = [f"layer {i}" for i in range(layers)], [str(k) for k in scales]
    grids = {
        "sink_mass": _grid(probe.sink_mass, layers, scales),
        "cross_scale_similarity": _grid(probe.cross, layers, scales),
        **{f"locality_r{r}": _grid(probe.local[r], layers, scales) for r in radii},
    }
    titles = {
        "sink_mass": f"attention mass on the sink scales 0-{sinks - 1}, by layer and query scale",
        "cross_scale_similarity": "cosine similarity of scale k's maps to scale k-1's (resized)",
        **{f"locality_r{r}": f"share of non-sink attention within radius {r} of the projected position" for r in radii},
    }
    if schedule.source is not None:
        grids["source_mass"] = _grid(probe.source_mass, layers, scales)
        titles["source_mass"] = "attention mass on the source picture's tokens, by layer and query scale"
        for r in radii:
            grids[f"source_locality_r{r}"] = _grid(probe.source_local[r], layers, scales)
            titles[f"source_locality_r{r}"] = f"share of the source's attention within radius {r} of the projection"
    for name, grid in grids.items():
        save_image(heatmap(grid, rows, cols, titles[name]), out / f"{name}.png")
    table_files = draw_tables(recorder.tables, policy.plan(layers, schedule).modes, out)
    report = {
        **provenance(command_line("sparvar analyze", argv), pipe.device),
        "model": spec.name,
        "condition": str(condition),
        "seed": config.seed,
        "schedule": schedule.describe(),
        "sink_scales": sinks,
        "query_scales": scales,
        "preset": args.attention,
        "random_weights": random,
        "layers": {name: [[float(v) for v in row] for row in grid] for name, grid in grids.items()},
        "means_per_scale": {name: [float(grid[:, j].mean()) for j in range(len(scales))] for name, grid in grids.items()},
        "pictures": [f"{name}.png" for name in grids] + table_files,
    }
    files = write(out, "analyze", report, to_markdown(report))
    print(f"wrote {files[0]}, {files[1]} and {len(report['pictures'])} pictures")
    return report


def to_markdown(report: dict) -> str:
    """The measurements' means per query scale, and the pictures beside them."""
    scales = report["query_scales"]
    lines = [*header(f"Attention properties: {report['model']}", report),
             f"Condition {report['condition']!r}, seed {report['seed']}, schedule {report['schedule']}; sinks: scales "
             f"0-{report['sink_scales'] - 1}; tables of the `{report['preset']}` preset. Means over the layers:", "",
             *(["Random weights: these numbers exercise the code and say nothing about a trained model.", ""]
               if report["random_weights"] else []),
             "| measurement | " + " | ".join(f"scale {k}" for k in scales) + " |", "|---" * (len(scales) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{m:.2f}" for m in means) + " |"
              for name, means in report["means_per_scale"].items()]
    return "\n".join(lines + ["", "Pictures: " + ", ".join(report["pictures"]), ""])

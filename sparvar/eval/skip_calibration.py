"""`sparvar calibrate-skip`: thresholds of the adaptive skip rule (skipping.AdaptiveSkip) for a model.

Every item is generated in full once; at each decision scale (after K-3 and K-2 for two skippable
scales) its detail energy is recorded, and its estimate there is decoded and compared with the
full image. A threshold pair then says, per item, where it would stop: after K-3 if its energy
there is below the first threshold, else after K-2 if below the second, else never. Chosen: the
pair that saves the most transformer FLOPs while the mean squared error against the full images
stays at or below that of skipping the last scale for every item (static `skip_last=1`). So the
adaptive rule must beat the static one at its own quality. Results go to JSON and markdown.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from sparvar.bench.common import command_line, header, provenance, write
from sparvar.errors import SparvarError
from sparvar.eval.flops import transformer_flops
from sparvar.eval.metrics import to_tensor
from sparvar.options import ArgumentParser, HelpFormatter, add_model_options, device_of, output_folder
from sparvar.skipping import AdaptiveSkip


def measure(pipe, conditions: list, seeds: list[int], attention: str = "dense", batch: int = 10,
            max_skip: int = 2, schedule=None, progress: bool = True) -> dict:
    """Per item: detail energy after scale K-1-r and the MSE of stopping there, for r = 1..max_skip."""
    from tqdm.auto import tqdm

    from sparvar.pipeline import to_pil

    schedule = schedule or pipe.schedule()
    K = len(schedule)
    items = [(c, s) for c in conditions for s in seeds]
    scores, errors = {r: [] for r in range(1, max_skip + 1)}, {r: [] for r in range(1, max_skip + 1)}
    for i in tqdm(range(0, len(items), batch), desc="calibrate", disable=not progress):
        chunk = items[i : i + batch]
        out = pipe([c for c, _ in chunk], seed=[s for _, s in chunk], schedule=schedule, attention=attention,
                   progress=False)
        full = to_tensor(out.images)
        summed = None
        with torch.inference_mode():
            for k, drawn in enumerate(out.tokens):
                codes = pipe.codes.to_codes(drawn, k, schedule)
                summed = pipe.codes.accumulate(summed, codes, k, schedule)
                r = K - 1 - k
                if r in scores:
                    scores[r] += AdaptiveSkip.score(summed).tolist()
                    early = to_tensor(to_pil(pipe.vae.decode(summed)))
                    errors[r] += ((early - full) ** 2).flatten(1).mean(1).tolist()
    full_flops = transformer_flops(pipe.spec.transformer, schedule, K)
    return {
        "items": [[str(c), s] for c, s in items],
        "scores": {r: v for r, v in scores.items()},
        "mse": {r: v for r, v in errors.items()},
        # share of the full generation's transformer FLOPs (dense attention) when stopping after K-1-r
        "flops_share": {r: transformer_flops(pipe.spec.transformer, schedule, K - r) / full_flops for r in scores},
    }


def outcome(measured: dict, thresholds: tuple[float, ...]) -> dict:
    """Where each item stops under `thresholds` (thresholds[r-1] decides skipping the last r), and
    the mean MSE against the full images, mean FLOPs share and how many stop where."""
    max_skip = len(thresholds)
    n = len(measured["items"])
    mse, flops, stops = np.zeros(n), np.ones(n), {r: 0 for r in range(max_skip + 1)}
    for i in range(n):
        skipped = next((r for r in range(max_skip, 0, -1) if measured["scores"][r][i] < thresholds[r - 1]), 0)
        stops[skipped] += 1
        if skipped:
            mse[i], flops[i] = measured["mse"][skipped][i], measured["flops_share"][skipped]
    return {"mean_mse": float(mse.mean()), "flops_share": float(flops.mean()), "stopped": stops,
            "psnr_pooled": _db(mse.mean())}


def _db(mse: float) -> float | None:
    """PSNR of a mean squared error of images in [0, 1]; None for identical images."""
    return 10 * math.log10(1 / mse) if mse > 0 else None


def choose(measured: dict) -> dict:
    """The threshold pair saving the most FLOPs at a mean MSE no worse than static skip-1's."""
    max_skip = len(measured["scores"])
    budget = float(np.mean(measured["mse"][1]))
    candidates = {}
    for r in range(1, max_skip + 1):
        values = np.unique(measured["scores"][r])
        candidates[r] = [0.0] + ((values[1:] + values[:-1]) / 2).tolist() + [float(values[-1]) * 2]
    best = None
    for t in np.array(np.meshgrid(*[candidates[r] for r in range(1, max_skip + 1)])).reshape(max_skip, -1).T:
        result = outcome(measured, tuple(t))
        key = (result["flops_share"], result["mean_mse"])
        if result["mean_mse"] <= budget and (best is None or key < best[0]):
            best = (key, tuple(float(x) for x in t), result)
    return {"thresholds": best[1], "outcome": best[2], "mse_budget": budget}


def report(measured: dict, chosen: dict) -> dict:
    """Static skips and the chosen adaptive rule side by side."""
    n = len(measured["items"])
    rows = {"full": {"mean_mse": 0.0, "flops_share": 1.0, "psnr_pooled": None}}
    for r in sorted(measured["mse"]):
        mse = np.array(measured["mse"][r])
        rows[f"skip{r}"] = {"mean_mse": float(mse.mean()), "flops_share": measured["flops_share"][r],
                            "psnr_pooled": _db(mse.mean())}
    rows["adaptive"] = {k: chosen["outcome"][k] for k in ("mean_mse", "flops_share", "psnr_pooled", "stopped")}
    return {"samples": n, "rows": rows}


def to_markdown(result: dict) -> str:
    lines = [
        *header(f"Adaptive skip calibration: {result['model']}", result),
        f"{result['samples']} samples ({result['conditions']} conditions x {len(result['seeds'])} seeds {result['seeds'][0]}"
        f"-{result['seeds'][-1]}), `{result['attention']}` attention, on {result['device']}. Each item generated in full;"
        " errors are against its full image (uint8 RGB in [0, 1]). Pooled PSNR = 10 log10(1 / mean MSE);"
        " transformer FLOPs against the full generation (eval/flops.py).",
        "",
        f"Chosen thresholds (skip the last r scales when the detail energy after scale K-1-r is below "
        f"thresholds[r-1]): `{tuple(round(t, 5) for t in result['thresholds'])}`; mean MSE budget "
        f"{result['mse_budget']:.3g} (static skip 1).",
        "",
        "| rule | mean MSE | pooled PSNR (dB) | transformer FLOPs | items stopping (full / skip 1 / skip 2) |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        stops = " / ".join(str(row["stopped"][r]) for r in sorted(row["stopped"])) if "stopped" in row else "-"
        db = "-" if row["psnr_pooled"] is None else f"{row['psnr_pooled']:.2f}"
        lines.append(f"| {name} | {row['mean_mse']:.3g} | {db} | {row['flops_share']:.1%} | {stops} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="sparvar calibrate-skip", description=__doc__.splitlines()[0],
                       formatter_class=HelpFormatter)
    add_model_options(p)
    p.add_argument("--prompts", help="file with one prompt per line (text models; default: the model's example "
                   "prompt, see `sparvar models`)")
    p.add_argument("--seeds", type=int, default=8, help="seeds per condition")
    p.add_argument("--first-seed", type=int, default=1000, help="away from the seeds `sparvar eval` uses")
    p.add_argument("--attention", default="dense", help="attention preset of the generations")
    p.add_argument("--batch", type=int, default=10, help="images per forward pass")
    p.add_argument("--out", default="out/adaptive_skip", help="folder for calibrate-skip.json and calibrate-skip.md")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from sparvar.eval.quality import conditions_of
    from sparvar.loading import load_pipeline
    from sparvar.models.registry import get_spec

    args = parse_args(argv)
    if args.seeds < 1 or args.batch < 1:
        raise SparvarError(f"--seeds and --batch must be at least 1, got {args.seeds} and {args.batch}")
    device = device_of(args, get_spec(args.model))
    out = output_folder(args.out)
    pipe = load_pipeline(args.model, args.weights, args.vae, args.text_encoder, device=device,
                         precision=args.precision, offload=args.offload)
    conditions = conditions_of(pipe.spec, args.prompts)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    measured = measure(pipe, conditions, seeds, args.attention, args.batch, progress=not args.quiet)
    chosen = choose(measured)
    result = {**provenance(command_line("sparvar calibrate-skip", argv), pipe.device),
              "model": pipe.spec.name, "device": str(pipe.device), "attention": args.attention,
              "conditions": len(conditions), "seeds": seeds, **report(measured, chosen),
              "thresholds": chosen["thresholds"], "mse_budget": chosen["mse_budget"], "measured": measured}
    files = write(out, "calibrate-skip", result, to_markdown(result))
    print(f"wrote {files[0]} and {files[1]}")
    return result

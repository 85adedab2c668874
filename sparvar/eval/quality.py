"""`sparvar eval`: what sparse attention costs in quality, against dense, with the same seeds.

For N seeds x conditions (class labels, or prompts for text models) every preset generates the
same items as dense attention. A preset is an attention preset, optionally combined with scale
skipping and token pruning (sparsity.combination: "default+skip2", "fastvar+skip2", "adaptive").
Per preset: PSNR and SSIM of its images against the dense ones (LPIPS when its weights are on
disk), the relative error of every attention output against dense attention on the same inputs,
per (layer, scale) (on the first batch, where a dense pass runs beside the preset), the share of
attention FLOPs computed (density), the estimated transformer FLOPs against a full dense
generation, the scales used per image, and the time per image (the other batches). Results go to
JSON and markdown.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import torch

from sparvar.attention.policy import AttentionPolicy, DenseAttention
from sparvar.bench.common import command_line, header, provenance, write
from sparvar.errors import SparvarError
from sparvar.eval.flops import attention_density, flops_shares
from sparvar.eval.metrics import lpips_distance, lpips_model, psnr, ssim, to_tensor
from sparvar.generation import GenerationConfig
from sparvar.options import (ArgumentParser, HelpFormatter, add_model_options, device_of, output_folder, preset_list,
                             read_conditions)
from sparvar.validation import default_dtype, validate
from sparvar.sparsity import combination


class ErrorProbe(AttentionPolicy):
    """Runs `inner` and returns its output; also runs dense attention on the same q, k, v and
    keeps ||out - dense|| / ||dense|| per (layer, scale), summed over generations."""

    def __init__(self, inner: AttentionPolicy):
        self.inner, self.dense = inner, DenseAttention()
        self.sums: dict[tuple[int, int], float] = defaultdict(float)
        self.counts: dict[tuple[int, int], int] = defaultdict(int)
        self.name = getattr(inner, "name", type(inner).__name__)

    def reset(self) -> None:
        self.inner.reset()

    def stats(self) -> dict:
        return self.inner.stats()

    def __call__(self, q, k, v, call):
        out = self.inner(q, k, v, call)
        ref = self.dense(q, k, v, call).float()
        key = (call.layer, call.scale)
        self.sums[key] += float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))
        self.counts[key] += 1
        return out

    def errors(self, num_layers: int, num_scales: int) -> list[list[float | None]]:
        """Mean relative error as [layer][scale]; None where nothing ran (skipped scales)."""
        mean = lambda i, k: self.sums[i, k] / self.counts[i, k] if self.counts[i, k] else None  # noqa: E731
        return [[mean(i, k) for k in range(num_scales)] for i in range(num_layers)]


def preset_configs(spec, conditions: list, presets: list[str], config: GenerationConfig, device, dtype,
                   precision: str = "auto", offload: str | None = None, batch: int | None = None) -> dict:
    """Preset name -> `config` with that preset's attention and accelerators, checked for the
    generation of `conditions` (validation.validate): what `evaluate` runs."""
    runs = {}
    for name in presets:
        combo = combination(name)
        settings = GenerationConfig.build(config, attention=combo.attention, **combo.options())
        runs[name] = validate(spec, conditions, settings, device, dtype, precision, offload, batch)
    return runs


def evaluate(pipe, conditions: list, seeds: list[int], runs: dict, batch: int = 10, progress: bool = True) -> dict:
    """Run every preset's checked config (`preset_configs`) on the same (condition, seed) items;
    metrics against the first preset."""
    from tqdm.auto import tqdm

    from sparvar.sparsity import make_policy

    items = [(c, s) for c in conditions for s in seeds]
    batches = [items[i : i + batch] for i in range(0, len(items), batch)]
    presets, base = list(runs), next(iter(runs.values()))
    schedule = base.schedule
    depth = pipe.spec.transformer.depth
    lpips, lpips_note = lpips_model(pipe.device)
    images, rows = {}, {}
    for name, settings in runs.items():
        policy = make_policy(settings.attention)
        probe, out_images, densities, timed, flops, used = ErrorProbe(policy), [], [], [], [], []
        run = lambda chunk, attention: pipe.generate(  # noqa: E731
            [c for c, _ in chunk], GenerationConfig.build(settings, seed=[s for _, s in chunk], attention=attention),
            progress=False)
        for i, chunk in enumerate(tqdm(batches, desc=name, disable=not progress)):
            # attention errors on the first batch (the probe adds a dense pass); the others are timed
            out = run(chunk, probe if i == 0 else policy)
            out_images += out.images
            densities.append(attention_density(out.policy))
            flops += flops_shares(pipe.spec, out, schedule, settings.prune)
            used += out.scales_used
            if i > 0:
                timed.append(out.stage_seconds["total"] / len(chunk))
        if not timed:  # one batch only: time it again without the probe
            out = run(batches[0], policy)
            timed.append(out.stage_seconds["total"] / len(batches[0]))
        images[name] = to_tensor(out_images)
        rows[name] = {
            "description": _description(name),
            "density": sum(densities) / len(densities),
            "flops_share": sum(flops) / len(flops),
            "scales_used_mean": sum(used) / len(used),
            "seconds_per_image": sum(timed) / len(timed),
            "attention_rel_error": probe.errors(depth, len(schedule)),
            "attention_rel_error_samples": len(batches[0]),
        }
    reference = presets[0]
    for name, row in rows.items():
        row["speedup"] = rows[reference]["seconds_per_image"] / row["seconds_per_image"]
        errors = [e for layer in row["attention_rel_error"] for e in layer if e is not None]
        row["attention_rel_error_mean"] = sum(errors) / len(errors)
        row["attention_rel_error_max"] = max(errors)
        if name == reference:
            continue
        p = psnr(images[name], images[reference])
        row["identical_images"] = int(torch.isinf(p).sum())
        row["psnr"] = float(p.clamp(max=100).mean())  # an identical image counts as 100 dB
        mse = float(((images[name] - images[reference]) ** 2).mean())
        row["psnr_pooled"] = 10 * math.log10(1 / mse) if mse > 0 else 100.0  # of the mean squared error
        row["ssim"] = float(ssim(images[name], images[reference]).mean())
        if lpips is not None:
            row["lpips"] = float(lpips_distance(lpips, images[name], images[reference]).mean())
    return {
        "model": pipe.spec.name,
        "device": str(pipe.device),
        "schedule": schedule.describe(),
        "samples": len(items),
        "conditions": [str(c) for c in conditions],
        "seeds": seeds,
        "cfg": base.cfg,
        "tau": base.tau,
        "reference": reference,
        "lpips": lpips_note,
        "presets": rows,
    }


def _description(name: str) -> str:
    from sparvar.sparsity import PRESETS

    return PRESETS[name].description if name in PRESETS else combination(name).describe()


def summary(results: dict) -> dict:
    """The headline numbers: the samples, PSNR and density of `default` and `paper` and the PSNR
    `default` gains over `paper`, PSNR and FLOPs of the paper's skip-2 comparison (where evaluated)."""
    out = {"samples": results["samples"]}
    for name in ("default", "paper"):
        if name in results["presets"]:
            row = results["presets"][name]
            out[f"{name}_psnr"] = row.get("psnr")
            out[f"{name}_ssim"] = row.get("ssim")
            out[f"{name}_density"] = row["density"]
    if out.get("default_psnr") is not None and out.get("paper_psnr") is not None:
        out["default_minus_paper_psnr_db"] = out["default_psnr"] - out["paper_psnr"]
    for name in ("default+skip2", "fastvar+skip2"):
        if name in results["presets"]:
            row = results["presets"][name]
            out[f"{name}_psnr"] = row.get("psnr")
            out[f"{name}_flops"] = row["flops_share"]
    return out


def to_markdown(results: dict) -> str:
    cols = ["preset", "PSNR (dB)", "pooled PSNR", "SSIM", "LPIPS", "attn rel. error (mean / max)", "density",
            "FLOPs", "scales", "s / image", "speed-up"]
    lines = [
        *header(f"Quality of sparse attention: {results['model']}", results),
        f"{results['samples']} samples ({len(results['conditions'])} conditions x {len(results['seeds'])} seeds), "
        f"cfg {results['cfg']}, tau {results['tau']}, on {results['device']}; schedule {results['schedule']}. "
        f"Images are compared with `{results['reference']}` on the same seeds; attention outputs with "
        "dense attention on the same inputs (first batch); density = share of dense attention FLOPs computed "
        "(of the calls that ran); FLOPs = estimated transformer FLOPs against a full dense generation; scales = "
        "mean scales used per image; pooled PSNR = of the mean squared error over all images (identical images "
        "count 0, not 100 dB); time per image from the other batches. " + results["lpips"] + ".",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for name, row in results["presets"].items():
        fmt = lambda key, spec: format(row[key], spec) if key in row else "-"  # noqa: E731
        lines.append(
            f"| {name} | {fmt('psnr', '.2f')} | {fmt('psnr_pooled', '.2f')} | {fmt('ssim', '.4f')} | "
            f"{fmt('lpips', '.4f')} | {row['attention_rel_error_mean']:.4f} / {row['attention_rel_error_max']:.4f} | "
            f"{row['density']:.1%} | {row['flops_share']:.1%} | {row['scales_used_mean']:.2f} | "
            f"{row['seconds_per_image']:.3f} | {row['speedup']:.2f}x |"
        )
    lines += ["", "Presets:", ""] + [f"- `{n}`: {r['description']}" for n, r in results["presets"].items()]
    if "summary" in results:
        lines += ["", "Summary: " + ", ".join(f"{k} {v:.4g}" for k, v in results["summary"].items() if v is not None)]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="sparvar eval", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    add_model_options(p)
    p.add_argument("--presets", default="dense,paper,default",
                   help="comma-separated; the first is the reference. An attention preset may add accelerators: "
                   "default+skip2, fastvar (dense attention with FastVAR pruning), fastvar+skip2, default+adaptive")
    p.add_argument("--seeds", type=int, default=7, help="seeds per condition: 0..N-1")
    p.add_argument("--labels", help="comma-separated class indices (class-conditional models)")
    p.add_argument("--prompts", help="file with one prompt per line (text models; default: the model's example "
                   "prompt, see `sparvar models`)")
    p.add_argument("--batch", type=int, default=10, help="images per forward pass")
    p.add_argument("--resolution", type=int, help="pixel budget of the schedule (default: the model's)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance (default: the model's)")
    p.add_argument("--tau", type=float, help="sampling temperature (default: the model's)")
    p.add_argument("--out", default="out/quality", help="folder for eval.json and eval.md")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def conditions_of(spec, prompts: str | None, labels: str | None = None) -> list:
    """What to generate: the lines of a prompts file (text models; without one, the model's example
    prompt), or the given labels."""
    if spec.text_conditioned:
        if prompts:
            return read_conditions(prompts)
        if spec.example is None:
            raise SparvarError(f"{spec.name} is text-conditioned: give --prompts FILE (one prompt a line)")
        return [spec.example]
    if labels:
        return [c.strip() for c in labels.split(",") if c.strip()]
    raise SparvarError(f"{spec.name} is class-conditional: pick some of its {spec.num_classes} classes, --labels 1,2,3")


def main(argv=None) -> dict:
    """Every option, preset and condition is checked, and the output folder made, before the model loads."""
    from sparvar.loading import load_pipeline
    from sparvar.models.registry import get_spec

    args = parse_args(argv)
    if args.seeds < 1 or args.batch < 1:
        raise SparvarError(f"--seeds and --batch must be at least 1, got {args.seeds} and {args.batch}")
    spec = get_spec(args.model)
    presets = preset_list(args.presets, "--presets")
    config = GenerationConfig(cfg=args.cfg, tau=args.tau, resolution=args.resolution)
    device = device_of(args, spec)
    conditions = conditions_of(spec, args.prompts, args.labels)
    runs = preset_configs(spec, conditions, presets, config, device, default_dtype(device), args.precision,
                          args.offload, args.batch)
    out = output_folder(args.out)
    pipe = load_pipeline(spec.name, args.weights, args.vae, args.text_encoder, device=device,
                         precision=args.precision, offload=args.offload)
    results = evaluate(pipe, conditions, list(range(args.seeds)), runs, args.batch, progress=not args.quiet)
    results = {**provenance(command_line("sparvar eval", argv), pipe.device), **results, "summary": summary(results)}
    files = write(out, "eval", results, to_markdown(results))
    print(f"wrote {files[0]} and {files[1]}")
    return results

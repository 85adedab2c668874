r"""Choose `default`'s SparVAR rules on calibration prompts: for candidate settings, the PSNR and
SSIM of their images against dense attention (same prompts and seeds, as `sparvar eval`
measures them) and their attention density (share of dense attention FLOPs computed), with the
density each plans on the Infinity models. Results go to NAME.json and NAME.md through
sparvar.bench.common.write, after each candidate, so that a sweep resumes where it stopped.

Candidates are JSON: {"name": {"preset": "paper", "topk": 0.25, "local_windows": [9, 11]}, ...},
SparVARConfig's fields over a preset (default: paper). Dense images are generated once and kept
in --cache.

    python -m tools.calibrate_default --model infinity-demo --prompts benchmarks/default_calibration_prompts.txt \
        --candidates tools/default_candidates.json --device cuda --batch 32 --name default_calibration
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from sparvar.bench.common import command_line, header, provenance, write
from sparvar.errors import SparvarError, run_module
from sparvar.eval.flops import attention_density
from sparvar.eval.metrics import psnr, ssim, to_tensor
from sparvar.generation import GenerationConfig
from sparvar.models.registry import get_spec
from sparvar.options import ArgumentParser, read_conditions
from sparvar.sparsity import SparVARConfig, SparVARPolicy, get_config, plan_report

PLANNED_ON = ("infinity-2b", "infinity-8b")  # the models `default` runs at 1024 in the speed numbers


def read_candidates(path: str | Path) -> dict[str, SparVARConfig]:
    """Name -> settings of a candidates file (module docstring); lists become tuples."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SparvarError(f"cannot read candidates file {path}: {e}") from None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise SparvarError(f"{path} must hold {{name: {{setting: value}}}}")
    tuples = {f.name for f in fields(SparVARConfig) if "tuple" in str(f.type)}
    out = {}
    for name, entry in entries.items():
        try:
            overrides = {k: tuple(v) if k in tuples else v for k, v in entry.items() if k != "preset"}
            out[name] = get_config(entry.get("preset", "paper"), **overrides)
        except TypeError as e:  # a value of the wrong kind: a number for a list, text for a number
            raise SparvarError(f"candidate {name!r} in {path}: {e}") from None
    return out


def planned_density(model: str, config: SparVARConfig) -> float:
    """Share of a dense generation's attention pairs the plan computes (CS4A at its budget)."""
    spec = get_spec(model)
    schedule = GenerationConfig().resolved(spec).schedule
    return 1.0 - plan_report(spec.transformer.depth, schedule, config)["pairs"]["saved_fraction"]


def generate(pipe, items: list, attention, batch: int) -> tuple[torch.Tensor, float, float]:
    """Images (N, 3, H, W) in [0, 1], mean attention density and seconds per image."""
    images, densities, start = [], [], time.perf_counter()
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        out = pipe([c for c, _ in chunk], seed=[s for _, s in chunk], attention=attention, progress=False)
        images += out.images
        densities.append(attention_density(out.policy))
    return to_tensor(images), sum(densities) / len(densities), (time.perf_counter() - start) / len(items)


def dense_images(pipe, items: list, batch: int, cache: Path) -> torch.Tensor:
    """The dense images of `items`, from `cache` when it holds these items made on this kind of device
    (a GPU's bf16 images are not the CPU's)."""
    key = {"model": pipe.spec.name, "device": pipe.device.type, "items": [list(item) for item in items]}
    if cache.is_file():
        saved = torch.load(cache)
        if saved["key"] == key:
            return saved["images"].double() / 255
    images = generate(pipe, items, None, batch)[0]
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "images": (images * 255).round().to(torch.uint8)}, cache)
    return images


def settings(config: SparVARConfig) -> dict:
    """The settings that differ from the paper's, as JSON holds them."""
    paper = asdict(SparVARConfig())
    return json.loads(json.dumps({k: v for k, v in asdict(config).items() if v != paper[k]}))


def row(config: SparVARConfig, images: torch.Tensor, dense: torch.Tensor, density: float, seconds: float,
        model: str) -> dict:
    p = psnr(images, dense).clamp(max=100)  # an identical image counts as 100 dB, as in `sparvar eval`
    mse = float(((images - dense) ** 2).mean())
    return {
        "settings": settings(config),
        "density": density,
        "psnr": float(p.mean()),
        "psnr_per_image": [round(float(x), 3) for x in p],
        "psnr_pooled": 10 * math.log10(1 / mse) if mse > 0 else 100.0,
        "ssim": float(ssim(images, dense).mean()),
        "seconds_per_image": seconds,
        "planned_density": {m: planned_density(m, config) for m in (model, *PLANNED_ON)},
    }


def choice(candidates: dict[str, dict]) -> str | None:
    """The rule `default` is chosen by, fixed before the numbers: the highest PSNR among candidates
    whose measured density and planned density on every model are at most the paper's (the
    issue's "at no more attention density"); None without a `paper` row."""
    paper = candidates.get("paper")
    if paper is None:
        return None
    within = [name for name, r in candidates.items()
              if r["density"] <= paper["density"]
              and all(d <= paper["planned_density"][m] for m, d in r["planned_density"].items())]
    return max(within, key=lambda name: candidates[name]["psnr"])


def to_markdown(result: dict) -> str:
    paper = result["candidates"].get("paper")
    lines = [*header(f"Calibration of default's SparVAR rules: {result['model']}", result),
             f"{result['samples']} images ({len(result['conditions'])} calibration prompts x "
             f"{len(result['seeds'])} seeds), PSNR and SSIM against dense attention on the same seeds; density = "
             "share of dense attention FLOPs computed over the whole generation (as `sparvar eval`); planned = "
             "the plan's share of attention pairs (CS4A at its budget). Settings are the paper's but those listed.",
             "Runs: " + "; ".join(f"`{c}`" for c in result["commands"]), "",
             "| candidate | settings besides the paper's | density | PSNR (dB) | vs paper (dB) | SSIM | planned "
             + " / ".join(result["candidates"][next(iter(result["candidates"]))]["planned_density"]) + " |",
             "|---|---|---|---|---|---|---|"]
    for name, r in result["candidates"].items():
        gain = f"{r['psnr'] - paper['psnr']:+.2f}" if paper else "-"
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "-"
        planned = " / ".join(f"{d:.1%}" for d in r["planned_density"].values())
        lines.append(f"| {name} | {settings} | {r['density']:.2%} | {r['psnr']:.2f} | {gain} | {r['ssim']:.4f} | "
                     f"{planned} |")
    chosen = choice(result["candidates"])
    if chosen:
        lines += ["", f"Chosen by the rule (highest PSNR at no more measured or planned density than the paper's): "
                      f"`{chosen}`, {result['candidates'][chosen]['psnr'] - paper['psnr']:+.2f} dB over the paper."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m tools.calibrate_default", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="infinity-demo")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--prompts", required=True, help="calibration prompts, one a line (never the held-out ones)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt: 0..N-1")
    p.add_argument("--candidates", required=True, help="JSON file of candidate settings (module docstring)")
    p.add_argument("--batch", type=int, default=8, help="images per forward pass")
    p.add_argument("--cache", default="runs/calibration/dense.pt", help="the dense images, kept between runs")
    p.add_argument("--out", default="benchmarks")
    p.add_argument("--name", default="default_calibration")
    return p.parse_args(argv)


def calibrate(pipe, conditions: list, seeds: int, candidates: dict[str, SparVARConfig], batch: int, cache: Path,
              out: str | Path, name: str, command: str) -> dict:
    """Measure the candidates not yet in out/NAME.json on (condition, seed) items and add them,
    writing the files after each one; a candidate recorded under its name is kept, if its settings agree."""
    items = [(c, s) for c in conditions for s in range(seeds)]
    previous = Path(out) / f"{name}.json"
    result = json.loads(previous.read_text()) if previous.is_file() else {}
    if result and (result["model"], result["conditions"], result["seeds"]) != (pipe.spec.name, conditions,
                                                                              list(range(seeds))):
        raise SparvarError(f"{previous} holds another model, other prompts or seeds: give another --name")
    for label, config in candidates.items():
        if label in result.get("candidates", {}) and result["candidates"][label]["settings"] != settings(config):
            raise SparvarError(f"candidate {label!r} is already recorded with other settings: rename it")
    dense = dense_images(pipe, items, batch, cache)
    result = {**provenance(command, pipe.device), "model": pipe.spec.name, "samples": len(items),
              "conditions": conditions, "seeds": list(range(seeds)),
              "commands": result.get("commands", []) + [command], "candidates": result.get("candidates", {})}
    for label, config in candidates.items():
        if label not in result["candidates"]:
            images, density, seconds = generate(pipe, items, SparVARPolicy(config, label), batch)
            result["candidates"][label] = row(config, images, dense, density, seconds, pipe.spec.name)
            write(out, name, result, to_markdown(result))
    return result


def main(argv=None) -> dict:
    from sparvar.loading import load_pipeline

    args = parse_args(argv)
    candidates = read_candidates(args.candidates)
    conditions = read_conditions(args.prompts)
    if args.seeds < 1 or args.batch < 1:
        raise SparvarError(f"--seeds and --batch must be at least 1, got {args.seeds} and {args.batch}")
    pipe = load_pipeline(args.model, device=args.device)
    return calibrate(pipe, conditions, args.seeds, candidates, args.batch, Path(args.cache), args.out, args.name,
                     command_line("python -m tools.calibrate_default", argv))


if __name__ == "__main__":
    run_module(main)

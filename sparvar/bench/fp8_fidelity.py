"""What FP8 costs in fidelity: logits on random weights, images on the trained demo model.

1. Random Infinity-2B and 8B weights (the FP8 pipeline holds the quantised weights of the same
   seeded bf16 one), and the trained demo model's: a greedy bf16 generation (every bit its
   likelier value) fixes the tokens, then each variant runs the scale loop on those same tokens
   (teacher forcing through its own KV cache). Per scale: the relative error of its guided logits against bf16's, and the share
   of greedy choices (bits, or VAR token indices) it agrees with.
2. The demo model: the PSNR of each variant's images against the bf16 dense images of the same
   prompts and seeds (mean of per-image PSNR, and pooled over all pixels), and the first scale
   where its drawn tokens part from bf16's (median over the images). Target of issue 18: FP8
   alone costs less PSNR than the `default` preset does.
Variants: FP8 matmuls, FP8 KV cache, both; on the demo also `default` and FP8 with `default`.
Run: sparvar bench fp8-fidelity [--models infinity-2b infinity-8b] [--samples 60] [--prompts FILE] [--out benchmarks]
"""

from __future__ import annotations


import torch

from sparvar.bench.common import PROMPT, command_line, header, provenance, write
from sparvar.eval.metrics import psnr
from sparvar.options import ArgumentParser, HelpFormatter, read_conditions

VARIANTS = {"fp8": ("fp8", "static"), "fp8-kv": ("auto", "fp8"), "fp8 + fp8-kv": ("fp8", "fp8")}  # precision, cache
DEMO_VARIANTS = {"default": ("auto", "static", "default"), "fp8": ("fp8", "static", None),
                 "fp8-kv": ("auto", "fp8", None), "fp8 + fp8-kv": ("fp8", "fp8", None),
                 "fp8 + default": ("fp8", "static", "default")}  # precision, cache, attention


def scale_loop(pipe, conditions: list, schedule, kv_cache: str, tokens: list | None = None):
    """Guided logits of every scale of one generation and its tokens: greedy (top-k 1, every bit
    or token its likeliest value) without `tokens`, else forced to `tokens` at every scale
    (init_tokens: teacher forcing through the variant's own KV cache). Dense attention."""
    logits = []
    options = dict(top_k=1) if tokens is None else dict(init_tokens=tokens, init_scales=len(tokens))
    out = pipe(conditions, seed=0, schedule=schedule, kv_cache=kv_cache, progress=False,
               on_scale=lambda k, guided, drawn: logits.append(guided.float()), **options)
    return logits, out.tokens


def logit_rows(model: str, device: str, resolution: int | None, seed: int = 0, prompt: str | None = None) -> list[dict]:
    """Per-scale logit error and greedy agreement of every variant on one model: its random
    weights, or with `prompt` its shipped ones (the trained demo, set beside random 2B and 8B:
    a trained model's logits may take FP8's rounding worse)."""
    from sparvar.loading import load_pipeline

    pipes = {}
    for precision in ("auto", "fp8"):
        pipes[precision] = load_pipeline(model, device=device, random_weights=prompt is None, seed=seed,
                                         precision=precision)
    base = pipes["auto"]
    schedule = base.schedule("1:1", resolution)
    conditions = [prompt or PROMPT] if base.spec.text_conditioned else [0]
    ref_logits, tokens = scale_loop(base, conditions, schedule, "static")
    rows = []
    for name, (precision, kv_cache) in VARIANTS.items():
        logits, _ = scale_loop(pipes[precision], conditions, schedule, kv_cache, tokens)
        for k, (a, b) in enumerate(zip(logits, ref_logits)):
            rows.append({"model": model, "variant": name, "scale": k, "size": list(schedule.sizes[k]),
                         "logit_rel_err": float((a - b).norm() / b.norm()),
                         "greedy_agreement": float((a.argmax(-1) == tokens[k]).float().mean())})
    return rows


def demo_rows(device: str, samples: int, prompts: list[str]) -> list[dict]:
    """PSNR against bf16 dense images of `samples` demo images (`prompts` cycled, one seed each)."""
    from sparvar.loading import load_pipeline

    pipes = {p: load_pipeline("infinity-demo", device=device, precision=p) for p in ("auto", "fp8")}
    conditions = [prompts[i % len(prompts)] for i in range(samples)]
    seeds = list(range(samples))

    def images(precision, kv_cache, attention):
        outs = [pipes[precision](conditions[i:i + 10], seed=seeds[i:i + 10], kv_cache=kv_cache, attention=attention,
                                 progress=False) for i in range(0, samples, 10)]
        tokens = [torch.cat([out.tokens[k] for out in outs]) for k in range(len(outs[0].tokens))]
        return (torch.cat([out.pixels for out in outs]) + 1) / 2, tokens

    ref, ref_tokens = images("auto", "static", None)
    rows = []
    for name, (precision, kv_cache, attention) in DEMO_VARIANTS.items():
        got, tokens = images(precision, kv_cache, attention)
        per_image = psnr(got, ref)
        pooled = 10 * torch.log10(1 / ((got.double() - ref.double()) ** 2).mean())
        parted = first_different_scale(tokens, ref_tokens)
        rows.append({"variant": name, "samples": samples, "psnr_mean_db": float(per_image[per_image.isfinite()].mean())
                     if per_image.isfinite().any() else float("inf"),
                     "psnr_pooled_db": float(pooled), "identical_images": int((~per_image.isfinite()).sum()),
                     "first_different_scale_median": float(parted.float().median())})
    return rows


def first_different_scale(tokens: list[torch.Tensor], reference: list[torch.Tensor]) -> torch.Tensor:
    """Per sample, the first scale whose drawn tokens differ from the reference's (the number of
    scales where none does): where a variant's images start to go their own way."""
    differs = torch.stack([(a != b).flatten(1).any(1) for a, b in zip(tokens, reference)], dim=1)
    return torch.where(differs.any(1), differs.float().argmax(1), torch.tensor(len(tokens)))


def summarize(logits: list[dict], demo: list[dict]) -> dict:
    summary = {}
    for row in logits:  # the worst scale of each (model, variant)
        key = f"{row['model'].replace('infinity-', '')}_{row['variant'].replace(' + ', '_').replace('-', '_')}"
        summary[f"{key}_max_logit_rel_err"] = max(summary.get(f"{key}_max_logit_rel_err", 0.0), row["logit_rel_err"])
        summary[f"{key}_min_greedy_agreement"] = min(summary.get(f"{key}_min_greedy_agreement", 1.0),
                                                     row["greedy_agreement"])
    by = {r["variant"]: r for r in demo}
    for name, r in by.items():
        summary[f"demo_{name.replace(' + ', '_').replace('-', '_')}_psnr_db"] = r["psnr_pooled_db"]
    if "fp8" in by and "default" in by:
        summary["demo_fp8_costs_less_than_default"] = by["fp8"]["psnr_pooled_db"] > by["default"]["psnr_pooled_db"]
    return summary


def to_markdown(result: dict) -> str:
    lines = [*header("FP8 fidelity", result), "Random weights (infinity-demo: its trained ones), teacher-forced on "
             "bf16's greedy tokens, dense attention; per scale: relative error of the guided logits against bf16, "
             "and greedy agreement.", ""]
    models = sorted({r["model"] for r in result["logits"]})
    for model in models:
        rows = [r for r in result["logits"] if r["model"] == model]
        sizes = {r["scale"]: r["size"] for r in rows}
        lines += [f"## {model}", "", "| variant | " + " | ".join(f"{h}x{w}" for h, w in sizes.values()) + " |",
                  "|---" * (len(sizes) + 1) + "|"]
        for variant in VARIANTS:
            mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["scale"])
            lines.append(f"| {variant} rel err | " + " | ".join(f"{r['logit_rel_err']:.4f}" for r in mine) + " |")
            lines.append(f"| {variant} agreement | " + " | ".join(f"{r['greedy_agreement']:.4f}" for r in mine) + " |")
        lines.append("")
    if result["demo"]:
        lines += ["## Demo model, PSNR against bf16 dense images", "",
                  "| variant | samples | PSNR mean (dB) | PSNR pooled (dB) | identical images | tokens part at scale "
                  "(median) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['samples']} | {r['psnr_mean_db']:.2f} | {r['psnr_pooled_db']:.2f} | "
                  f"{r['identical_images']} | {r['first_different_scale_median']:g} |" for r in result["demo"]]
    lines += ["", "## Summary", ""] + [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}"
                                       for k, v in result["summary"].items()]
    return "\n".join(lines) + "\n"


def run(models: list[str], device: str, resolution: int | None, samples: int, prompts: list[str], out_dir: str,
        command: str) -> dict:
    from sparvar.validation import resolve_device

    device = str(resolve_device(device))
    logits = [row for model in models for row in logit_rows(model, device, resolution)]
    logits += logit_rows("infinity-demo", device, None, prompt=prompts[0]) if samples else []
    demo = demo_rows(device, samples, prompts) if samples else []
    result = {**provenance(command, device), "logits": logits, "demo": demo, "summary": summarize(logits, demo)}
    write(out_dir, "fp8_fidelity", result, to_markdown(result))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="sparvar bench fp8-fidelity", description=__doc__.splitlines()[0],
                            formatter_class=HelpFormatter)
    parser.add_argument("--models", nargs="+", default=["infinity-2b", "infinity-8b"],
                        help="models whose random weights are compared")
    parser.add_argument("--resolution", type=int, help="pixel budget of the Infinity models (default: theirs)")
    parser.add_argument("--samples", type=int, default=60, help="demo images per variant (0: none)")
    parser.add_argument("--prompts", default="benchmarks/demo_held_out_prompts.txt",
                        help="the demo's prompts, one a line, cycled over the samples")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", default="benchmarks", help="folder for fp8_fidelity.json and .md")
    args = parser.parse_args(argv)
    prompts = read_conditions(args.prompts) if args.samples else []
    run(args.models, args.device, args.resolution, args.samples, prompts, args.out,
        command_line("sparvar bench fp8-fidelity", argv))


if __name__ == "__main__":
    main()

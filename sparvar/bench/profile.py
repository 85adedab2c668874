"""Where a generation's GPU time goes: kernel time by category, one generation under torch.profiler.

Categories come from kernel names: convolutions (the VAE's; cuDNN's, whose names would otherwise
read as attention), attention kernels (SDPA, Triton sparse, flex, FA4), matrix products (gemm),
normalisation, and the rest (elementwise, copies, sampling). Run after a warm-up, with the
same settings as `sparvar bench e2e` mode d (or b with --attention dense).
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from sparvar.bench.common import command_line, generation_inputs, header, provenance, write
from sparvar.errors import SparvarError
from sparvar.options import ArgumentParser, HelpFormatter

CATEGORIES = (  # first match wins
    ("conv", r"implicit_gemm|conv"),
    ("attention", r"flash|fmha|attention|cudnn|_attn|sparse_attention|colsum|flex"),
    ("gemm", r"gemm|cutlass|sm90_xmma|nvjet|matmul|wgmma"),
    ("fp8 quantise", r"quantize_rows"),
    ("norm", r"layer_norm|norm|reduce"),
    ("copy", r"copy|cat|memcpy|memset|fill"),
)


def category(name: str) -> str:
    low = name.lower()
    return next((c for c, pattern in CATEGORIES if re.search(pattern, low)), "elementwise/other")


def profile(model: str, attention: str, precision: str = "auto", sdpa_backend: str = "fa4") -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from sparvar.loading import load_pipeline
    from sparvar.sparsity import make_policy

    pipe = load_pipeline(model, device="cuda", random_weights=True, precision=precision)
    prompt, inputs = generation_inputs(pipe.spec)  # as bench e2e: an editing model gets its picture
    policy = make_policy(attention, sdpa_backend=sdpa_backend)
    run = lambda: pipe([prompt], schedule=pipe.schedule(), attention=policy, progress=False, **inputs)  # noqa: E731
    run()  # warm-up: compile, tables
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = run()
        torch.cuda.synchronize()
    totals, kernels = defaultdict(float), defaultdict(float)
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if us and event.key:
            totals[category(event.key)] += us / 1e6
            kernels[event.key] += us / 1e6
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    return {
        "model": model,
        "attention": attention,
        "precision": precision,
        "stages_s": out.stage_seconds,
        "gpu_seconds_by_category": dict(sorted(totals.items(), key=lambda kv: -kv[1])),
        "top_kernels_s": [{"kernel": k[:160], "category": category(k), "seconds": s} for k, s in top],
    }


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="sparvar bench profile", description=__doc__.splitlines()[0],
                            formatter_class=HelpFormatter)
    parser.add_argument("--models", nargs="+", default=["infinity-8b"], help="models to profile")
    parser.add_argument("--attention", nargs="+", default=["dense", "default"], help="attention presets to profile")
    parser.add_argument("--precision", nargs="+", default=["auto"], help="precisions to profile (auto, fp8)")
    parser.add_argument("--out", default="benchmarks", help="folder for profile.json and profile.md")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SparvarError("profiling needs a CUDA GPU")
    result = {**provenance(command_line("sparvar bench profile", argv)),
              "rows": [profile(m, a, p) for m in args.models for a in args.attention for p in args.precision]}
    write(args.out, "profile", result, to_markdown(result))


def to_markdown(result: dict) -> str:
    """Per model and preset: the transformer's time, GPU time by kind, the longest kernels."""
    lines = header("Where the GPU time goes", result)
    for row in result["rows"]:
        lines += [f"## {row['model']}, {row['attention']}, precision {row.get('precision', 'auto')}", "",
                  f"Transformer {row['stages_s']['transformer']:.3f} s; GPU time by kind: "
                  + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in row["gpu_seconds_by_category"].items()) + ".", "",
                  "| ms | kind | kernel |", "|---|---|---|"]
        lines += [f"| {k['seconds'] * 1000:.1f} | {k['category']} | `{k['kernel'][:90]}` |"
                  for k in row["top_kernels_s"][:8]]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

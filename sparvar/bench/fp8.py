"""FP8 matmuls on the GPU: each linear layer of an Infinity block at each scale's row count, and
the model's scales in bf16 and FP8, in one run on one card.

Layers (1024x1024, batch 1 with CFG: a scale's rows are twice its tokens), each a median of
triton.testing.do_bench, in ms:
  bf16        the bf16 blocks' matmul (cuBLAS; fc1 with its GELU in the epilogue, `linear_gelu`)
  quantise    the FP8 blocks' separate pass over the layer's input where they have one: the
              attention outputs into sa.proj and ca.proj, fc1's output into fc2 (with its GELU).
              The norms quantise inside their own kernel and are not counted.
  scaled_mm   `models.fp8.fp8_matmul` (torch._scaled_mm with rowwise scales, the bias fused where
              cuBLASLt takes it), fast accumulation off ("slow") and on ("fast": what the
              blocks run at every row count)
  torchao     torchao's float8 inference (Float8DynamicActivationFloat8WeightConfig, PerRow) on a
              linear layer of the same shape, its own activation quantisation included, eager;
              without torchao one line says so and the column stays empty
  rel err     `fp8_matmul`'s output against the float32 product of the bf16 operands
Per scale, each way's sum over a block's layers times the depth: the matmul time of that scale
(the cross-attention's text projection runs once per generation and is left out).
Scales: `sparvar bench memory`'s bf16 and fp8 settings of the model (random weights, `default`
attention, CUDA graphs): latency and the median time of each scale.
Run: sparvar bench fp8 [--model infinity-8b] [--no-scales] [--out benchmarks]
"""

from __future__ import annotations

import traceback

import torch
import torch.nn.functional as F

from sparvar.bench.common import command_line, header, provenance, write
from sparvar.errors import SparvarError
from sparvar.options import ArgumentParser, HelpFormatter

def layer_shapes(width: int, hidden: int) -> dict[str, tuple[int, int, str | None]]:
    """Each FP8 layer of an Infinity block run at every scale: (K, N, the separate quantising pass
    of its input: None, "plain" or "gelu")."""
    return {"sa.mat_qkv": (width, 3 * width, None), "sa.proj": (width, width, "plain"),
            "ca.mat_q": (width, width, None), "ca.proj": (width, width, "plain"),
            "ffn.fc1": (width, hidden, None), "ffn.fc2": (hidden, width, "gelu")}


def load_torchao():
    """(torchao's float8 inference as a function of an nn.Linear, its version), or (None,
    "missing") with one line said."""
    try:
        import torchao
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )
    except ImportError as err:
        print(f"torchao is missing ({err}): no torchao column (torchao>=0.18 runs on torch 2.11)", flush=True)
        return None, "missing"

    def quantized(linear: torch.nn.Linear) -> torch.nn.Module:
        module = torch.nn.Sequential(linear)
        quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        return module

    return quantized, torchao.__version__


def _timed(fn) -> float | None:
    from sparvar.bench.kernels import time_ms

    try:
        return time_ms(fn)
    except Exception:  # one refusing variant must not lose the others' numbers
        traceback.print_exc()
        return None


def bench_layer(name: str, k: int, n: int, quantise: str | None, rows: int, device="cuda") -> dict:
    """One layer kind at one row count: each of our ways of running it (None where one failed)."""
    from sparvar.kernels.fp8 import quantize_rows
    from sparvar.kernels.fused import linear_gelu
    from sparvar.models.fp8 import fp8_matmul, quantize_weight

    linear = torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16)
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
    fp8_rows = quantize_rows(x)
    weight, scale = quantize_weight(linear.weight)
    bias = linear.bias.detach()
    row = {"layer": name, "rows": rows, "k": k, "n": n, "quantise_pass": quantise}
    with torch.no_grad():
        row["bf16_ms"] = _timed(lambda: linear_gelu(x, linear) if name == "ffn.fc1" else linear(x))
        if quantise:  # the pass reads the layer's input in bf16: for fc2, fc1's output
            row["quantise_ms"] = _timed(lambda: quantize_rows(x, gelu=quantise == "gelu"))
        for fast in (False, True):
            row[f"scaled_mm_{'fast' if fast else 'slow'}_ms"] = _timed(
                lambda fast=fast: fp8_matmul(fp8_rows, weight, scale, bias, torch.bfloat16, fast_accum=fast))
        ref = F.linear(x.float(), linear.weight.float(), bias.float())
        out = fp8_matmul(fp8_rows, weight, scale, bias, torch.bfloat16).float()
        row["fp8_rel_err"] = float((out - ref).norm() / ref.norm())
    return row


def time_torchao(row: dict, torchao, device="cuda") -> None:
    """torchao's float8 inference on the row's layer shape, into row["torchao_ms"]."""
    x = torch.randn(row["rows"], row["k"], device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        ao = torchao(torch.nn.Linear(row["k"], row["n"], device=device, dtype=torch.bfloat16))
        row["torchao_ms"] = _timed(lambda: ao(x))


def fp8_ways(row: dict) -> dict[str, float | None]:
    """The FP8 layer's time each way, its separate quantising pass included: as the blocks ran it
    before (`_scaled_mm`, no fast accumulation), as `fp8_matmul` runs it now (`_scaled_mm` with
    fast accumulation), the faster of the two for this layer, and torchao's (which quantises its
    input itself)."""
    extra = row.get("quantise_ms") or 0.0
    kernels = [v for v in (row.get("scaled_mm_slow_ms"), row.get("scaled_mm_fast_ms")) if v is not None]

    def plus(v):
        return None if v is None else v + extra

    return {"fp8_before": plus(row.get("scaled_mm_slow_ms")), "fp8_now": plus(row.get("scaled_mm_fast_ms")),
            "fp8_best": plus(min(kernels, default=None)), "torchao": row.get("torchao_ms")}


def per_scale(rows: list[dict], depth: int) -> list[dict]:
    """Per row count (scale): each way's time summed over a block's layers, times the depth, in ms."""
    out = []
    for count in sorted({r["rows"] for r in rows}):
        layers = [r for r in rows if r["rows"] == count]
        ways = [fp8_ways(r) for r in layers]
        totals = {"bf16": [r["bf16_ms"] for r in layers], **{w: [x[w] for x in ways] for w in ways[0]}}
        out.append({"rows": count, **{f"{w}_ms": None if None in v else depth * sum(v) for w, v in totals.items()}})
    return out


def summarize(scales: list[dict], gen_rows: list[dict]) -> dict:
    """Totals over the scales of the matmuls each way, and the generations' latencies."""
    summary = {}
    for way in ("bf16", "fp8_before", "fp8_now", "fp8_best", "torchao"):
        values = [s[f"{way}_ms"] for s in scales]
        summary[f"matmul_{way}_s"] = None if None in values else sum(values) / 1000
    for r in gen_rows:
        summary[f"{r['setting']}_latency_s"] = r.get("latency_s")
    return summary


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def to_markdown(result: dict) -> str:
    ways = ("bf16", "fp8_before", "fp8_now", "fp8_best", "torchao")
    lines = [*header(f"FP8 matmuls: {result['model']}", result),
             f"Rows = 2 x the scale's tokens (batch 1 with CFG). torchao: {result['torchao']}.",
             "FP8 blocks run `_scaled_mm` fast (fp8_now); rel err: their output against float32.", "",
             "## Per layer (ms)", "",
             "| layer | rows | bf16 | quantise | scaled_mm slow | scaled_mm fast | torchao | rel err |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["layers"]:
        cells = [r.get(k) for k in ("bf16_ms", "quantise_ms", "scaled_mm_slow_ms", "scaled_mm_fast_ms", "torchao_ms")]
        lines.append(f"| {r['layer']} | {r['rows']} | " + " | ".join(_fmt(c) for c in cells)
                     + f" | {r['fp8_rel_err']:.4f} |")
    lines += ["", f"## Per scale: a block's matmuls x {result['depth']} blocks (ms)", "",
              "FP8 ways include the separate quantising passes; torchao quantises inside its own call.", "",
              "| rows | " + " | ".join(ways) + " |", "|---|" + "---|" * len(ways)]
    lines += [f"| {s['rows']} | " + " | ".join(_fmt(s[f'{w}_ms'], '.2f') for w in ways) + " |"
              for s in result["scales_matmul"]]
    if result["generations"]:
        lines += ["", "## Generations (`sparvar bench memory` settings, CUDA graphs)", "",
                  "| setting | latency (s) | per scale (ms) |", "|---|---|---|"]
        for r in result["generations"]:
            told = " ".join(f"{s * 1000:.1f}" for s in r.get("scale_s", [])) or r.get("error", "-")
            lines.append(f"| {r['setting']} | {_fmt(r.get('latency_s'))} | {told} |")
    lines += ["", "## Summary", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in result["summary"].items()]
    return "\n".join(lines) + "\n"


def run(model: str, scales: bool, repeats: int, out_dir: str, command: str) -> None:
    from sparvar.bench import memory
    from sparvar.models.registry import MODELS

    if not torch.cuda.is_available():
        raise SparvarError("the FP8 benchmark needs a CUDA GPU")
    spec = MODELS[model]
    cfg = spec.transformer
    if spec.family.fp8_layers != MODELS["infinity-8b"].family.fp8_layers:
        raise SparvarError(f"the FP8 benchmark knows Infinity's layers, not {spec.family.name}'s")
    torch.manual_seed(0)
    layers = []
    for count in [2 * n for n in spec.schedule().lengths]:
        for name, (k, n, quantise) in layer_shapes(cfg.width, cfg.ffn_hidden).items():
            layers.append(bench_layer(name, k, n, quantise, count))
            print(f"{name} x {count} rows: bf16 {_fmt(layers[-1]['bf16_ms'])} ms, "
                  f"FP8 {_fmt(layers[-1]['scaled_mm_fast_ms'])} ms", flush=True)
    generations = []
    if scales:
        settings = {name: memory.SETTINGS[name] for name in ("bf16", "fp8")}
        generations = memory.bench([model], settings, repeats)
    torchao, torchao_version = load_torchao()
    for row in layers if torchao is not None else []:
        time_torchao(row, torchao)
    by_scale = per_scale(layers, cfg.depth)
    summary = summarize(by_scale, generations)
    result = {**provenance(command), "model": model, "depth": cfg.depth, "torchao": torchao_version,
              "layers": layers, "scales_matmul": by_scale, "generations": generations, "summary": summary}
    write(out_dir, "fp8", result, to_markdown(result))


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="sparvar bench fp8", description=__doc__.splitlines()[0],
                            formatter_class=HelpFormatter)
    parser.add_argument("--model", default="infinity-8b", help="an Infinity model (its sizes and schedule)")
    parser.add_argument("--no-scales", action="store_true", help="time the layers only, no generations")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per setting (the median is kept)")
    parser.add_argument("--out", default="benchmarks", help="folder for fp8.json and fp8.md")
    args = parser.parse_args(argv)
    run(args.model, not args.no_scales, args.repeats, args.out, command_line("sparvar bench fp8", argv))


if __name__ == "__main__":
    main()

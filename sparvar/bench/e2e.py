"""End-to-end generation timing on the GPU: random weights, 1024x1024, batch 1 with CFG.

Every number is the median over `repeats` timed generations after a warm-up; per-scale and
per-stage times come from CUDA events recorded by the pipeline, the latency from the host clock
around the whole call (image conversion included). Results go to JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sparvar.errors import SparvarError

PROMPT = "a photo of a red fox sitting in fresh snow at dawn, highly detailed"


def bench_model(model: str, attention="dense", repeats: int = 5, seed: int = 0) -> dict:
    """Time one model with one attention policy; the model's weights are random (fixed seed)."""
    from sparvar.pipeline import load_pipeline

    pipe = load_pipeline(model, device="cuda", random_weights=True, seed=seed)
    schedule = pipe.schedule("1:1", 1024)
    pipe([PROMPT], seed=seed, schedule=schedule, attention=attention, progress=False)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    runs = []
    for i in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = pipe([PROMPT], seed=seed + i, schedule=schedule, attention=attention, progress=False)
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - start, out))
    latencies = [t for t, _ in runs]
    median = lambda xs: statistics.median(xs)  # noqa: E731
    row = {
        "model": model,
        "attention": attention if isinstance(attention, str) else type(attention).__name__,
        "latency_s": median(latencies),
        "latencies_s": latencies,
        "stages_s": {k: median([o.stage_seconds[k] for _, o in runs]) for k in runs[0][1].stage_seconds},
        "scale_s": [median([o.scale_seconds[k] for _, o in runs]) for k in range(len(schedule))],
        "scales": [list(s) for s in schedule.sizes],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    del pipe
    torch.cuda.empty_cache()
    return row


def markdown(result: dict) -> str:
    lines = [
        f"# {result['title']}",
        "",
        f"Card: {result['card']}; date: {result['date']}; torch {result['torch']}.",
        f"Command: `{result['command']}`",
        "",
        "| model | attention | latency (s) | condition | transformer | decode | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        s = r["stages_s"]
        lines.append(
            f"| {r['model']} | {r['attention']} | {r['latency_s']:.3f} | {s['condition']:.3f} | "
            f"{s['transformer']:.3f} | {s['decode']:.3f} | {r['peak_gib']:.1f} |"
        )
    lines += ["", "Per scale (transformer + sampling, ms):", ""]
    header = "| model | " + " | ".join(f"{h}x{w}" for h, w in result["rows"][0]["scales"]) + " |"
    lines += [header, "|---" * (len(result["rows"][0]["scales"]) + 1) + "|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} {r['attention']} | " + " | ".join(f"{t * 1000:.1f}" for t in r["scale_s"]) + " |")
    return "\n".join(lines) + "\n"


def run(models: list[str], attentions: list[str], repeats: int, out_dir: str, name: str, command: str) -> dict:
    if not torch.cuda.is_available():
        raise SparvarError("the end-to-end benchmark needs a CUDA GPU")
    rows = [bench_model(m, attention=a, repeats=repeats) for m in models for a in attentions]
    result = {
        "title": "Generation time: random weights, 1024x1024, batch 1 with CFG, bf16",
        "card": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "command": command,
        "torch": torch.__version__,
        "rows": rows,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sparvar bench baseline", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["infinity-2b", "infinity-8b"])
    parser.add_argument("--attention", nargs="+", default=["dense"], help="attention presets to time")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--name", default="baseline", help="file name of the results (JSON and markdown)")
    args = parser.parse_args(argv)
    command = "sparvar bench baseline " + " ".join(argv if argv is not None else sys.argv[1:])
    run(args.models, args.attention, args.repeats, args.out, args.name, command.strip())


if __name__ == "__main__":
    main()

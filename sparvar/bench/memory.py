"""Latency and peak GPU memory of the memory settings, all in one run on one card.

Infinity-2B and 8B, random weights, 1024x1024, batch 1 with CFG, attention `default` (cuDNN SDPA
for its dense calls, as `sparvar bench e2e` mode d). Each
setting combines a precision and an offload (load_pipeline) with a KV cache (GenerationConfig);
its peak is `torch.cuda.max_memory_allocated` over the timed generations (loading excluded:
random weights are drawn in bf16 on the card before they are quantised or moved). The summary
picks, for each card size, the fastest setting whose peak leaves half a GiB of it free, and then
proves it by running that setting again under `torch.cuda.set_per_process_memory_fraction` of
the card size.
Run: sparvar bench memory [--models infinity-2b infinity-8b] [--out benchmarks]
"""

from __future__ import annotations

import statistics
import time
import traceback
from dataclasses import asdict, dataclass

import torch

from sparvar.bench.common import command_line, generation_inputs, header, provenance, write
from sparvar.errors import SparvarError
from sparvar.options import ArgumentParser, HelpFormatter

GIB = 2**30
MARGIN_GIB = 0.5  # a setting fits a card of N GiB when its peak is at most N - 0.5


@dataclass(frozen=True)
class Setting:
    precision: str = "auto"  # load_pipeline
    offload: str | None = None
    kv_cache: str = "static"  # GenerationConfig
    cuda_graphs: bool = True  # not with offload="blocks"

    @property
    def fp8(self) -> bool:
        """FP8 anywhere (matmuls or KV cache)."""
        return self.precision == "fp8" or self.kv_cache == "fp8"


SETTINGS = {
    "bf16": Setting(),
    "bf16 lean-kv": Setting(kv_cache="lean"),
    "bf16 lean-kv text-offload": Setting(kv_cache="lean", offload="text"),
    "bf16 lean-kv block-stream": Setting(kv_cache="lean", offload="blocks", cuda_graphs=False),
    "fp8": Setting(precision="fp8"),
    "fp8 lean-kv": Setting(precision="fp8", kv_cache="lean"),
    "fp8 fp8-kv": Setting(precision="fp8", kv_cache="fp8"),
    "fp8 fp8-kv text-offload": Setting(precision="fp8", kv_cache="fp8", offload="text"),
    "fp8 fp8-kv block-stream": Setting(precision="fp8", kv_cache="fp8", offload="blocks", cuda_graphs=False),
}
CARDS_8B = {"24g": (24, False), "16g": (16, True), "12g": (12, True)}  # card GiB, FP8 allowed


def time_setting(pipe, setting: Setting, repeats: int) -> dict:
    """Median latency, median time of each scale (the pipeline's CUDA events) and peak memory of
    `repeats` generations after warm-up (and capture)."""
    from sparvar.sparsity import make_policy

    prompt, inputs = generation_inputs(pipe.spec)
    policy = make_policy("default", sdpa_backend="cudnn")  # as `sparvar bench e2e` mode d
    run = lambda seed: pipe([prompt], seed=seed, schedule=pipe.schedule(), attention=policy,  # noqa: E731
                            kv_cache=setting.kv_cache, cuda_graphs=setting.cuda_graphs, progress=False, **inputs)
    for seed in range(3 if setting.cuda_graphs else 1):  # graphs: eager, capture, first replay
        run(seed)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, scales = [], []
    for seed in range(repeats):
        start = time.perf_counter()
        scales.append(run(seed).scale_seconds)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"latency_s": statistics.median(times), "latencies_s": times,
            "scale_s": [statistics.median(per_scale) for per_scale in zip(*scales)],
            "peak_gib": torch.cuda.max_memory_allocated() / GIB}


def _load(model: str, setting: Setting):
    from sparvar.loading import load_pipeline

    pipe = load_pipeline(model, device="cuda", random_weights=True, precision=setting.precision,
                         offload=setting.offload)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the load's bf16 weights, quantised or moved since, leave the pool
    return pipe


def _free() -> None:
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def bench(models: list[str], settings: dict[str, Setting], repeats: int) -> list[dict]:
    """One row per (model, setting); settings of one load share a pipeline."""
    rows = []
    for model in models:
        loads: dict[tuple, list[str]] = {}
        for name, s in settings.items():
            loads.setdefault((s.precision, s.offload), []).append(name)
        for names in loads.values():
            pipe = None
            try:
                pipe = _load(model, settings[names[0]])
            except Exception as err:
                rows += [{"model": model, "setting": n, **asdict(settings[n]), "error": f"load: {err}"} for n in names]
                traceback.print_exc()
            for name in names if pipe is not None else []:
                row = {"model": model, "setting": name, **asdict(settings[name])}
                try:
                    row.update(time_setting(pipe, settings[name], repeats))
                except Exception as err:  # one failing setting must not lose the others' numbers
                    row["error"] = f"{type(err).__name__}: {err}"[:300]
                    traceback.print_exc()
                pipe._graphs, pipe._cache, pipe._warm, pipe._policies = None, None, None, {}
                _free()
                rows.append(row)
                print(f"{model} {name}: " + (f"{row['latency_s']:.3f} s, {row['peak_gib']:.2f} GiB"
                                             if "latency_s" in row else row["error"]), flush=True)
            del pipe
            _free()
    return rows


def fastest_within(rows: list[dict], model: str, limit_gib: float, fp8: bool = True) -> dict | None:
    """The fastest measured setting of `model` whose peak is at most limit_gib (without FP8 anywhere
    when fp8 is False)."""
    fits = [r for r in rows if r["model"] == model and "latency_s" in r and r["peak_gib"] <= limit_gib
            and (fp8 or not Setting(r["precision"], r["offload"], r["kv_cache"], r["cuda_graphs"]).fp8)]
    return min(fits, key=lambda r: r["latency_s"], default=None)


def summarize(rows: list[dict]) -> dict:
    """The summary keys of issue 18; a key whose setting is missing or failed is None."""
    def row(model, name):
        return next((r for r in rows if r["model"] == model and r["setting"] == name and "latency_s" in r), None)

    bf16, fp8 = row("infinity-8b", "bf16"), row("infinity-8b", "fp8")
    summary = {"8b_bf16_default_latency_s": bf16 and bf16["latency_s"],
               "8b_fp8_default_latency_s": fp8 and fp8["latency_s"]}
    picks = {}
    for card, (gib, any_precision) in CARDS_8B.items():
        pick = fastest_within(rows, "infinity-8b", gib - MARGIN_GIB, fp8=any_precision)
        picks[card] = pick and pick["setting"]
        prefix = f"8b_{card}" + ("" if any_precision else "_bf16")
        summary[f"{prefix}_peak_gib"] = pick and pick["peak_gib"]
        if card != "12g":
            summary[f"{prefix}_over_bf16_latency"] = pick and bf16 and pick["latency_s"] / bf16["latency_s"]
    small = [r for r in rows if r["model"] == "infinity-2b" and "latency_s" in r]
    low = min(small, key=lambda r: r["peak_gib"], default=None)
    summary["2b_lowmem_peak_gib"] = low and low["peak_gib"]
    picks["2b_lowmem"] = low and low["setting"]
    return {**summary, "settings": picks}


def prove(rows: list[dict], summary: dict, repeats: int) -> dict:
    """Each picked setting again, under a per-process memory fraction of its card size."""
    total = torch.cuda.get_device_properties(0).total_memory
    cards = {**{k: g for k, (g, _) in CARDS_8B.items()}, "2b_lowmem": 8}
    proofs = {}
    for card, name in summary["settings"].items():
        if name is None:
            continue
        model = "infinity-2b" if card == "2b_lowmem" else "infinity-8b"
        setting = SETTINGS[name]
        pipe = None
        try:
            pipe = _load(model, setting)
            torch.cuda.set_per_process_memory_fraction(cards[card] * GIB / total)
            proofs[card] = {"setting": name, "card_gib": cards[card], **time_setting(pipe, setting, repeats)}
        except Exception as err:
            proofs[card] = {"setting": name, "card_gib": cards[card], "error": f"{type(err).__name__}: {err}"[:300]}
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            del pipe
            _free()
        print(f"proof {card} ({name}): {proofs[card].get('peak_gib', proofs[card].get('error'))}", flush=True)
    return proofs


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def to_markdown(result: dict) -> str:
    lines = [*header(f"Memory settings: {result['title']}", result),
             "| model | setting | precision | offload | KV cache | CUDA graphs | latency (s) | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = (f"{_fmt(r.get('latency_s'))} | {_fmt(r.get('peak_gib'), '.2f')}" if "error" not in r
                 else f"failed: {r['error'][:80]} |")
        lines.append(f"| {r['model']} | {r['setting']} | {r['precision']} | {r['offload'] or '-'} | {r['kv_cache']} | "
                     f"{'yes' if r['cuda_graphs'] else 'no'} | {cells} |")
    lines += ["", "## Summary", "", "| key | value |", "|---|---|"]
    s = result["summary"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in s.items() if k != "settings"]
    lines += ["", "Picked settings, proven under `torch.cuda.set_per_process_memory_fraction` of the card size:", "",
              "| card | setting | proof |", "|---|---|---|"]
    for card, name in s["settings"].items():
        proof = result["proofs"].get(card, {})
        told = f"ran, peak {proof['peak_gib']:.2f} GiB, {proof['latency_s']:.3f} s" if "peak_gib" in proof else \
            proof.get("error", "-")
        lines.append(f"| {card} | {name or 'none fits'} | {told} |")
    return "\n".join(lines) + "\n"


def run(models: list[str], repeats: int, out_dir: str, command: str) -> dict:
    if not torch.cuda.is_available():
        raise SparvarError("the memory benchmark needs a CUDA GPU")
    rows = bench(models, SETTINGS, repeats)
    summary = summarize(rows)
    result = {**provenance(command), "title": "random weights, 1024x1024, batch 1 with CFG, attention default",
              "margin_gib": MARGIN_GIB,
              "settings": {k: asdict(v) for k, v in SETTINGS.items()}, "rows": rows, "summary": summary,
              "proofs": prove(rows, summary, repeats)}
    write(out_dir, "memory", result, to_markdown(result))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="sparvar bench memory", description=__doc__.splitlines()[0],
                            formatter_class=HelpFormatter)
    parser.add_argument("--models", nargs="+", default=["infinity-2b", "infinity-8b"], help="models to measure")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per setting (the median is kept)")
    parser.add_argument("--out", default="benchmarks", help="folder for memory.json and memory.md")
    args = parser.parse_args(argv)
    run(args.models, args.repeats, args.out, command_line("sparvar bench memory", argv))


if __name__ == "__main__":
    main()

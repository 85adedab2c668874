"""Latency and peak GPU memory of the memory settings, all in one run on one card.

Infinity-2B and 8B, random weights, 1024x1024, batch 1 with CFG, attention `default` (its dense
calls on FlashAttention-4 or SDPA cuDNN, as `sparvar bench e2e` mode d). Each
setting combines a precision and an offload (load_pipeline) with a KV cache (GenerationConfig);
its peak is `torch.cuda.max_memory_allocated` over the timed generations (loading excluded:
random weights are drawn in bf16 on the card before they are quantised or moved), beside
`max_memory_reserved` (what a per-process memory cap counts: the allocator's segments, the free
blocks of the CUDA graphs' private pool among them, which replays use but `max_memory_allocated`
does not count). For each card size the settings whose peak leaves half a GiB of it free are
proven, fastest first (2b_lowmem: lowest peak first), by running them again under
`torch.cuda.set_per_process_memory_fraction` of the card size, until one runs (at most MAX_TRIES
per card); only a setting whose proof ran is picked, and the card's summary keys are that proof's
own peak and latency. A failed proof keeps the phase and place it failed in and what the
allocator held then. The allocator grows expandable segments (ALLOCATOR_CONF, unless
PYTORCH_CUDA_ALLOC_CONF says otherwise): with fixed segments, 8B's 16 GiB pick failed its proof on
fragmentation alone, its decoder asking 0.5 GiB that no free block held.
Run: sparvar bench memory [--models infinity-2b infinity-8b] [--out benchmarks]
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sparvar.bench.common import command_line, generation_inputs, header, provenance, write
from sparvar.errors import SparvarError
from sparvar.options import ArgumentParser, HelpFormatter

GIB = 2**30
MARGIN_GIB = 0.5  # a setting fits a card of N GiB when its peak is at most N - 0.5
MAX_TRIES = 3  # settings proven per card, fastest first, until one runs under the cap
ALLOCATOR_CONF = "expandable_segments:True"


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
    # without graphs no private pool stays reserved, and the KV cache is made again for each
    # generation (pipeline.generate), so the text encoder's 2.28 GiB never meet either on the card
    "fp8 fp8-kv text-offload eager": Setting(precision="fp8", kv_cache="fp8", offload="text", cuda_graphs=False),
    "fp8 fp8-kv block-stream": Setting(precision="fp8", kv_cache="fp8", offload="blocks", cuda_graphs=False),
}
# card -> (the model its picks are for, card GiB, FP8 allowed); 2b_lowmem picks the lowest peak
CARDS = {"24g": ("infinity-8b", 24, False), "16g": ("infinity-8b", 16, True), "12g": ("infinity-8b", 12, True),
         "2b_lowmem": ("infinity-2b", 8, True)}


WARM_UP = ("eager warm-up", "graph capture", "first replay")  # the generations before the timed ones (graphs)


def _in_phase(phase: str, fn, *args):
    """fn(*args); an exception leaves knowing the phase it came from (`phase` attribute)."""
    try:
        return fn(*args)
    except Exception as err:
        if getattr(err, "phase", None) is None:
            err.phase = phase
        raise


def time_setting(pipe, setting: Setting, repeats: int) -> dict:
    """Median latency, median time of each scale (the pipeline's CUDA events) and peak memory of
    `repeats` generations after warm-up (and capture): allocated (`peak_gib`; `stage_peak_gib`, the
    first generation's peak so far at the end of each stage), reserved by the allocator
    (`reserved_gib`, the CUDA graphs' private pool included; `graph_pool_gib`, that pool alone),
    and the device's used memory after them (`device_used_gib`: the CUDA context and anything else
    outside PyTorch too)."""
    from sparvar.sparsity import make_policy

    prompt, inputs = generation_inputs(pipe.spec)
    policy = make_policy("default", sdpa_backend="fa4")  # as `sparvar bench e2e` mode d
    run = lambda seed: pipe([prompt], seed=seed, schedule=pipe.schedule(), attention=policy,  # noqa: E731
                            kv_cache=setting.kv_cache, cuda_graphs=setting.cuda_graphs, progress=False, **inputs)
    for seed, phase in enumerate(WARM_UP if setting.cuda_graphs else WARM_UP[:1]):
        _in_phase(phase, run, seed)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, outputs = [], []
    for seed in range(repeats):
        start = time.perf_counter()
        outputs.append(_in_phase(f"timed generation {seed + 1}", run, seed))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    free, total = torch.cuda.mem_get_info()
    return {"latency_s": statistics.median(times), "latencies_s": times,
            "scale_s": [statistics.median(per_scale) for per_scale in zip(*(o.scale_seconds for o in outputs))],
            "peak_gib": torch.cuda.max_memory_allocated() / GIB,
            "stage_peak_gib": outputs[0].stage_peak_gib,  # the first after the reset: which stage set the peak
            "reserved_gib": torch.cuda.max_memory_reserved() / GIB, "device_used_gib": (total - free) / GIB,
            "graph_pool_gib": graph_pools_gib(torch.cuda.memory_snapshot())}


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


def describe_error(err: BaseException, limit: int = 600) -> str:
    """`Type: message`, without PyTorch's advice after an out-of-memory message, at most `limit`
    characters: long enough to keep the OOM message's reserved-but-unallocated figure."""
    text = f"{type(err).__name__}: {err}"
    text = text.split(" If reserved but unallocated memory is large")[0].strip()
    return text[:limit]


def _where(err: BaseException) -> str | None:
    """The innermost two frames of sparvar's code (this bench's own left out) in the error's
    traceback, innermost first: e.g. where a generation asked for the memory it did not get."""
    here = []
    for frame in traceback.extract_tb(err.__traceback__):
        parts = Path(frame.filename).parts
        inside = "/".join(parts[len(parts) - parts[::-1].index("sparvar"):]) if "sparvar" in parts else None
        if inside and inside != "bench/memory.py":
            here.append(f"{inside}:{frame.lineno} {frame.name}")
    return " < ".join(reversed(here[-2:])) or None


def _private(segment: dict) -> bool:
    """Whether a `torch.cuda.memory_snapshot()` segment belongs to a private pool (CUDA graphs')."""
    return tuple(segment.get("segment_pool_id") or (0, 0)) != (0, 0)


def free_by_pool(segments: list[dict]) -> dict:
    """Free bytes (GiB) inside the allocator's segments (`torch.cuda.memory_snapshot()`): in the
    default pool, its largest free block, and in private pools (CUDA graphs). Free blocks of the
    default pool go back to CUDA only with their whole segment, and never during a graph capture;
    a graph's pool keeps its own while the graph lives."""
    default_free, largest, graph_free = 0, 0, 0
    for segment in segments:
        free = segment["total_size"] - segment["allocated_size"]
        if not _private(segment):
            default_free += free
            largest = max([largest] + [b["size"] for b in segment["blocks"] if b["state"] == "inactive"])
        else:
            graph_free += free
    return {"default_pool_free_gib": default_free / GIB, "default_pool_largest_free_gib": largest / GIB,
            "graph_pools_free_gib": graph_free / GIB}


def graph_pools_gib(segments: list[dict]) -> float:
    """GiB the allocator holds in private pools (`torch.cuda.memory_snapshot()` segments): the CUDA
    graphs' pool, where the scales' working memory lives and the decoder allocates between replays.
    Replayed graphs allocate nothing, so the allocated peak never shows that working memory."""
    return sum(s["total_size"] for s in segments if _private(s)) / GIB


def _memory_at_error() -> dict:
    """What the allocator holds while a failed run's tensors are still referenced (the traceback):
    peaks since the cap was set, now, and the free bytes inside segments by pool."""
    if not torch.cuda.is_available():
        return {}
    return {"at_error": {"peak_gib": torch.cuda.max_memory_allocated() / GIB,
                         "reserved_peak_gib": torch.cuda.max_memory_reserved() / GIB,
                         "allocated_gib": torch.cuda.memory_allocated() / GIB,
                         "reserved_gib": torch.cuda.memory_reserved() / GIB,
                         **free_by_pool(torch.cuda.memory_snapshot())}}


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
                rows += [{"model": model, "setting": n, **asdict(settings[n]), "error": f"load: {describe_error(err)}"}
                         for n in names]
                traceback.print_exc()
            for name in names if pipe is not None else []:
                row = {"model": model, "setting": name, **asdict(settings[name])}
                try:
                    row.update(time_setting(pipe, settings[name], repeats))
                except Exception as err:  # one failing setting must not lose the others' numbers
                    row["error"] = describe_error(err)
                    traceback.print_exc()
                pipe._graphs, pipe._cache, pipe._warm, pipe._policies = None, None, None, {}
                _free()
                rows.append(row)
                print(f"{model} {name}: " + (f"{row['latency_s']:.3f} s, {row['peak_gib']:.2f} GiB"
                                             if "latency_s" in row else row["error"]), flush=True)
            del pipe
            _free()
    return rows


def candidates(rows: list[dict], card: str) -> list[dict]:
    """The measured settings of the card's model whose peak leaves MARGIN_GIB of the card free (no
    FP8 anywhere where the card takes none), in the order they are proven: fastest first, or for
    2b_lowmem lowest peak first."""
    model, gib, fp8 = CARDS[card]
    fits = [r for r in rows if r["model"] == model and "latency_s" in r and r["peak_gib"] <= gib - MARGIN_GIB
            and (fp8 or not Setting(r["precision"], r["offload"], r["kv_cache"], r["cuda_graphs"]).fp8)]
    return sorted(fits, key=lambda r: r["peak_gib"] if card == "2b_lowmem" else r["latency_s"])


@contextlib.contextmanager
def _capped(card_gib: float):
    """This process's CUDA allocator held to card_gib (its reserved segments: the CUDA context and
    other memory outside PyTorch are not counted), peak statistics counted from here."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, card_gib * GIB / total))
    torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def prove_setting(model: str, name: str, card_gib: float, repeats: int) -> dict:
    """One setting loaded afresh and timed as the bench does, under a cap of card_gib; an error
    keeps its phase (load, a warm-up generation, a timed one), where in sparvar it came from, and
    what the allocator held then."""
    setting = SETTINGS[name]
    attempt = {"setting": name, "card_gib": card_gib}
    pipe = None
    try:
        pipe = _load(model, setting)  # uncapped: random weights are drawn in bf16 first
        with _capped(card_gib):
            attempt.update(time_setting(pipe, setting, repeats))
    except Exception as err:
        attempt.update(error=describe_error(err), phase=getattr(err, "phase", None) or "load", where=_where(err),
                       **_memory_at_error())
        traceback.print_exc()
    finally:
        del pipe
        _free()
    return attempt


def prove(rows: list[dict], repeats: int) -> dict[str, list[dict]]:
    """Per card whose model was measured: its candidates proven in order until one runs under the
    card's cap, at most MAX_TRIES; every attempt, the one that ran last. Cards of models not
    measured are left out; a measured card with no candidate has no attempts."""
    proofs = {}
    for card, (model, gib, _) in CARDS.items():
        if not any(r["model"] == model for r in rows):
            continue
        proofs[card] = []
        for row in candidates(rows, card)[:MAX_TRIES]:
            attempt = prove_setting(model, row["setting"], gib, repeats)
            proofs[card].append(attempt)
            print(f"proof {card} ({row['setting']}): " + (f"ran, {attempt['peak_gib']:.2f} GiB, "
                  f"{attempt['latency_s']:.3f} s" if "latency_s" in attempt else attempt["error"]), flush=True)
            if "latency_s" in attempt:
                break
    return proofs


def proven(attempts: list[dict]) -> dict | None:
    """The attempt that ran (the last one, as proving stops there), or None."""
    return next((a for a in attempts if "latency_s" in a), None)


def summarize(rows: list[dict], proofs: dict[str, list[dict]]) -> dict:
    """The summary keys of issue 18, each card's from the setting whose proof ran (the proof's own
    peak and latency; the bf16 ratio over the unconstrained bf16 row's latency); a key whose
    setting is missing, failed or was never proven is None. `settings`: each card's proven pick."""
    def row(model, name):
        return next((r for r in rows if r["model"] == model and r["setting"] == name and "latency_s" in r), None)

    bf16, fp8 = row("infinity-8b", "bf16"), row("infinity-8b", "fp8")
    summary = {"8b_bf16_default_latency_s": bf16 and bf16["latency_s"],
               "8b_fp8_default_latency_s": fp8 and fp8["latency_s"]}
    picks = {}
    for card, (_, _, any_precision) in CARDS.items():
        pick = proven(proofs.get(card, []))
        picks[card] = pick and pick["setting"]
        if card == "2b_lowmem":
            summary["2b_lowmem_peak_gib"] = pick and pick["peak_gib"]
            continue
        prefix = f"8b_{card}" + ("" if any_precision else "_bf16")
        summary[f"{prefix}_peak_gib"] = pick and pick["peak_gib"]
        if card != "12g":
            summary[f"{prefix}_over_bf16_latency"] = pick and bf16 and pick["latency_s"] / bf16["latency_s"]
    return {**summary, "settings": picks}


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def _told(attempt: dict) -> str:
    """One attempt in a table cell: what it ran at, or where and how it failed."""
    if "latency_s" in attempt:
        return (f"ran, peak {attempt['peak_gib']:.2f} GiB (reserved {_fmt(attempt.get('reserved_gib'), '.2f')}), "
                f"{attempt['latency_s']:.3f} s")
    at = attempt.get("at_error")
    held = (f" [allocator then: reserved {at['reserved_gib']:.2f} GiB, allocated {at['allocated_gib']:.2f}, "
            f"free in the default pool {at['default_pool_free_gib']:.2f} (largest block "
            f"{at['default_pool_largest_free_gib']:.2f}), free in CUDA graph pools {at['graph_pools_free_gib']:.2f}]"
            if at else "")
    where = f" at {attempt['where']}" if attempt.get("where") else ""
    return f"failed in {attempt.get('phase') or '?'}{where}: {attempt['error']}{held}".replace("|", "/")


def to_markdown(result: dict) -> str:
    allocator = result.get("allocator_conf")  # records before it was set have none
    lines = [*header(f"Memory settings: {result['title']}", result),
             *([f"CUDA allocator: `PYTORCH_CUDA_ALLOC_CONF={allocator}`.", ""] if allocator else []),
             "| model | setting | precision | offload | KV cache | CUDA graphs | latency (s) | peak GiB "
             "| peak before decode | reserved GiB | graphs' pool GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        before_decode = r.get("stage_peak_gib", {}).get("transformer")
        cells = (f"{_fmt(r.get('latency_s'))} | {_fmt(r.get('peak_gib'), '.2f')} | {_fmt(before_decode, '.2f')} | "
                 f"{_fmt(r.get('reserved_gib'), '.2f')} | {_fmt(r.get('graph_pool_gib'), '.2f')}"
                 if "error" not in r else f"failed: {r['error'][:80]} | | | |")
        lines.append(f"| {r['model']} | {r['setting']} | {r['precision']} | {r['offload'] or '-'} | {r['kv_cache']} | "
                     f"{'yes' if r['cuda_graphs'] else 'no'} | {cells} |")
    lines += ["", "## Summary", "",
              "Each card's keys come from its picked setting, the one whose proof ran (below): that proof's own peak "
              "and latency under the cap (the bf16 ratio: over the bf16 row's latency above); None where no proof ran.",
              "", "| key | value |", "|---|---|"]
    s, proofs = result["summary"], result["proofs"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in s.items() if k != "settings"]
    lines += ["", "## Picked settings", "",
              f"Per card, the settings whose peak (allocated) leaves {MARGIN_GIB} GiB of it free, fastest first "
              f"(2b_lowmem: lowest peak first), each loaded again and run as above under "
              f"`torch.cuda.set_per_process_memory_fraction` of the card size until one runs, at most "
              f"{result.get('max_tries', MAX_TRIES)} per card. The cap holds the allocator's reserved memory, not the "
              "CUDA context.", ""]
    measured = [card for card in CARDS if card in proofs]
    if measured:
        lines += ["| card | try | setting | proof |", "|---|---|---|---|"]
    for card in measured:
        model, gib, _ = CARDS[card]
        attempts = proofs[card]
        picked = proven(attempts)
        if not attempts:
            lines.append(f"| {card} | - | none of {model}'s settings peaks under {gib - MARGIN_GIB:g} GiB | - |")
        for i, attempt in enumerate(attempts, 1):
            mark = " (picked)" if attempt is picked else ""
            lines.append(f"| {card} | {i} | {attempt['setting']}{mark} | {_told(attempt)} |")
        if attempts and picked is None:
            lines.append(f"| {card} | - | no proven setting in {len(attempts)} tries | - |")
    left = [card for card in CARDS if card not in proofs]
    if left:
        if measured:
            lines.append("")
        lines.append("Picks are made for infinity-8b (cards 24g, 16g, 12g) and infinity-2b (card 2b_lowmem) only; "
                     "this run did not measure the model, so no pick, for: "
                     + ", ".join(f"{card} ({CARDS[card][0]})" for card in left) + ".")
    return "\n".join(lines) + "\n"


def run(models: list[str], repeats: int, out_dir: str, command: str) -> dict:
    if not torch.cuda.is_available():
        raise SparvarError("the memory benchmark needs a CUDA GPU")
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:  # the user's own setting wins
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_CONF
        torch.cuda.memory._set_allocator_settings(ALLOCATOR_CONF)  # also where CUDA has started already
    rows = bench(models, SETTINGS, repeats)
    proofs = prove(rows, repeats)
    result = {**provenance(command), "title": "random weights, 1024x1024, batch 1 with CFG, attention default",
              "margin_gib": MARGIN_GIB, "max_tries": MAX_TRIES,
              "allocator_conf": os.environ["PYTORCH_CUDA_ALLOC_CONF"], "summary_numbers": "proof",
              "settings": {k: asdict(v) for k, v in SETTINGS.items()}, "rows": rows,
              "summary": summarize(rows, proofs), "proofs": proofs}
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

"""End-to-end generation timing on the GPU: random weights, 1024x1024 (each model's own schedule
where it has one), batch 1 with CFG, bf16.

`sparvar bench baseline` times the plain dense pipeline (issue 2's reference point);
`sparvar bench e2e` times the modes below side by side, in one run on one card (HART and VAREdit
models, e.g. `--models hart-0.7b`, run those without token pruning: all but f, g, h; VAREdit's
edit a fixed picture, bench/common.py):
  a  as users run Infinity today: SDPA's default backend, a KV cache grown by concatenation,
     one PyTorch kernel per elementwise step
  b  our best dense path: static KV cache, FlashAttention-4's dense kernel on Hopper where
     flash-attn-4 is installed, else SDPA's cuDNN kernel (the same for the dense calls of c-i;
     the result's `dense_kernel` says which ran), CUDA graphs per scale, fused elementwise
     kernels (kernels/fused.py)
  c  SparVAR `paper` preset with CSLA on FlexAttention tables (how the paper ran it)
  d  SparVAR `default` preset on our Triton kernels (FlashAttention-4's for the block tables where
     attention/sparse.py's `prefers_fa4` picks it: Hopper, flash-attn-4 installed)
  e  (d) with the last two scales skipped
  f  FastVAR-style token pruning (pruning.py) on (b)
  g  FastVAR as published: (f) with the last two scales skipped
  h  (d) with FastVAR-style token pruning
  i  (d) with adaptive skip (the demo model's thresholds; on random weights its decisions mean
     nothing, so this mode measures the cost of deciding: one host sync per decision scale)
  o  the official code itself (Infinity's, or VAREdit's for VAREdit models), from a local clone
     (`--official PATH`), as its inference script runs it, its flash-attn calls served by SDPA
     (default backend); its own random init
Every number is the median over `repeats` timed generations after warm-up (which also captures
the graphs). Per-scale and per-stage times come from CUDA events recorded by the pipeline; the
latency is the host clock around the whole call (image conversion included; each generation's
host time outside the stages' events, and the garbage collector's part of it, are recorded beside
it); the attention
share comes from one extra eager generation with CUDA events around every attention call.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sparvar import files
from sparvar.attention.fa4 import fa4_runs_here
from sparvar.attention.policy import AttentionPolicy, DenseAttention
from sparvar.bench.common import command_line, generation_inputs, header, provenance, write
from sparvar.errors import SparvarError
from sparvar.generation import GenerationConfig
from sparvar.kernels import reference_only
from sparvar.options import ArgumentParser, HelpFormatter


@dataclass(frozen=True)
class Mode:
    about: str
    attention: Callable[[], AttentionPolicy]
    config: GenerationConfig = GenerationConfig()  # the mode's settings (besides attention, seed and schedule)
    fused: bool = True  # the fused elementwise kernels; False runs their PyTorch reference


def _preset(name: str, **kw) -> Callable[[], AttentionPolicy]:
    def make():
        from sparvar.sparsity import make_policy

        return make_policy(name, **kw)

    return make


GRAPHS = GenerationConfig(cuda_graphs=True)
BASELINE_MODES = {"dense": Mode("static KV cache, SDPA default backend, no graphs", DenseAttention)}
E2E_MODES = {
    "a": Mode("official-style: SDPA default backend, concatenated KV cache, no graphs, unfused ops",
              DenseAttention, GenerationConfig(kv_cache="concat"), fused=False),
    "b": Mode("best dense: static KV cache, FA4 or SDPA cuDNN (dense_kernel), CUDA graphs, fused ops",
              _preset("dense", sdpa_backend="fa4"),
              GRAPHS),
    "c": Mode("SparVAR paper preset, CSLA on FlexAttention, CUDA graphs",
              _preset("paper", backend="flex", sdpa_backend="fa4"), GRAPHS),
    "d": Mode("SparVAR default preset, Triton kernels (FA4 where prefers_fa4), CUDA graphs",
              _preset("default", sdpa_backend="fa4"), GRAPHS),
    "e": Mode("(d) skipping the last 2 scales", _preset("default", sdpa_backend="fa4"),
              GenerationConfig(cuda_graphs=True, skip_last=2)),
    "f": Mode("FastVAR token pruning on (b)", _preset("dense", sdpa_backend="fa4"),
              GenerationConfig(cuda_graphs=True, prune="fastvar")),
    "g": Mode("FastVAR as published: (f) skipping the last 2 scales", _preset("dense", sdpa_backend="fa4"),
              GenerationConfig(cuda_graphs=True, prune="fastvar", skip_last=2)),
    "h": Mode("(d) with FastVAR token pruning", _preset("default", sdpa_backend="fa4"),
              GenerationConfig(cuda_graphs=True, prune="fastvar")),
    "i": Mode("(d) with adaptive skip (demo thresholds; random weights: measures the cost of deciding)",
              _preset("default", sdpa_backend="fa4"), GenerationConfig(cuda_graphs=True, adaptive_skip=True)),
}


class TimedAttention(AttentionPolicy):
    """Wraps a policy and records CUDA events around each call, to measure the attention share."""

    def __init__(self, inner: AttentionPolicy):
        self.inner, self.events = inner, []

    def reset(self):
        self.inner.reset()
        self.events = []

    def __call__(self, q, k, v, call):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.inner(q, k, v, call)
        end.record()
        self.events.append((call.scale, start, end))
        return out

    def seconds_per_scale(self, num_scales: int) -> list[float]:
        torch.cuda.synchronize()
        out = [0.0] * num_scales
        for scale, start, end in self.events:
            out[scale] += start.elapsed_time(end) / 1000
        return out


class CollectorTime:
    """Seconds Python's garbage collector runs while this is entered: a host pause inside a timed
    generation that no CUDA event shows (it runs between the pipeline's stages or around them)."""

    def __init__(self):
        self.seconds, self._started = 0.0, None

    def _note(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def __enter__(self):
        gc.callbacks.append(self._note)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._note)


def timed_calls(call: Callable[[int], object], repeats: int) -> list[tuple[float, float, object]]:
    """(host seconds, seconds of it in garbage collection, result) of call(0), call(1), ...: the
    GPU is idle before each and after."""
    runs = []
    for i in range(repeats):
        torch.cuda.synchronize()
        with CollectorTime() as collector:
            start = time.perf_counter()
            out = call(i)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        runs.append((seconds, collector.seconds, out))
    return runs


def time_mode(pipe, mode: Mode, repeats: int, seed: int = 0) -> dict:
    """Median latency, stages, per-scale times, attention share and peak memory of one mode."""
    with contextlib.nullcontext() if mode.fused else reference_only():
        return _time_mode(pipe, mode, repeats, seed)


def _time_mode(pipe, mode: Mode, repeats: int, seed: int) -> dict:
    prompt, inputs = generation_inputs(pipe.spec)
    run = lambda s, p, **o: pipe([prompt], mode.config, seed=s, schedule=pipe.schedule(), attention=p,  # noqa: E731
                                 progress=False, **inputs, **o)
    policy = mode.attention()
    for s in range(3 if mode.config.cuda_graphs else 1):  # graphs: eager warm-up, capture, first replay
        run(seed + s, policy)
    timed = TimedAttention(mode.attention())  # eager (events need the Python code), after the kernels compiled
    eager = run(seed, timed, cuda_graphs=False)
    attention_s = timed.seconds_per_scale(len(eager.scale_seconds))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    runs = timed_calls(lambda i: run(seed + i, policy), repeats)
    median = statistics.median
    longest = max(len(o.scale_seconds) for _, _, o in runs)  # adaptive skip may stop some runs earlier
    scale_s = [median([o.scale_seconds[k] for _, _, o in runs if k < len(o.scale_seconds)]) for k in range(longest)]
    stats = policy.stats()
    return {
        "latency_s": median([t for t, _, _ in runs]),
        "latencies_s": [t for t, _, _ in runs],
        # host time around the stages' CUDA events (checks, image conversion, pauses), and the
        # garbage collector's share of each generation
        "outside_stages_s": [t - o.stage_seconds["total"] for t, _, o in runs],
        "gc_s": [g for _, g, _ in runs],
        "stages_s": {k: median([o.stage_seconds[k] for _, _, o in runs]) for k in runs[0][2].stage_seconds},
        "scale_s": scale_s,
        "attention_scale_s_eager": attention_s,
        "attention_share_eager": sum(attention_s) / eager.stage_seconds["transformer"],
        "attention_flops_saved": stats["total"]["saved_fraction"] if stats else 0.0,
        "scales_used": [o.scales_used[0] for _, _, o in runs],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


OFFICIAL_ABOUT = ("official code (local clone), its inference script's settings, flash-attn calls served by SDPA "
                  "(default backend), its own random init")


def time_official(path: str, model: str, repeats: int, seed: int = 0) -> dict:
    """Median latency and peak memory of the official code generating one image (mode o)."""
    from sparvar.bench.official import RUNNERS
    from sparvar.models.registry import get_spec

    spec = get_spec(model)
    prompt, inputs = generation_inputs(spec)
    official = RUNNERS[spec.family.official_code](path, spec, torch.device("cuda"), seed)
    official(prompt, spec.schedule(), seed, **inputs)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    latencies = [t for t, _, _ in timed_calls(lambda i: official(prompt, spec.schedule(), seed + i, **inputs), repeats)]
    return {"latency_s": statistics.median(latencies), "latencies_s": latencies,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def modes_for(model: str, modes: dict[str, Mode]) -> dict[str, Mode]:
    """The modes a model can run: HART and VAREdit have no token pruning (their rows are a-e and i)."""
    from sparvar.models.registry import get_spec

    if not get_spec(model).family.token_pruning:
        return {name: mode for name, mode in modes.items() if mode.config.prune is None}
    return modes


def bench(models: list[str], modes: dict[str, Mode], repeats: int, seed: int = 0, official: str | None = None) -> list[dict]:
    from sparvar.loading import load_pipeline

    rows = []
    for model in models:
        if official:  # first, so its memory is its own
            row = {"model": model, "mode": "o", "about": OFFICIAL_ABOUT}
            try:
                row.update(time_official(official, model, repeats, seed))
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
            torch.cuda.empty_cache()
            rows.append(row)
            print(f"{model} o: " + (f"{row['latency_s']:.3f} s" if "latency_s" in row else row["error"]), flush=True)
        pipe = load_pipeline(model, device="cuda", random_weights=True, seed=seed)
        for name, mode in modes_for(model, modes).items():
            row = {"model": model, "mode": name, "about": mode.about, "scales": [list(s) for s in pipe.schedule().sizes]}
            try:
                row.update(time_mode(pipe, mode, repeats, seed))
            except Exception as err:  # one failing mode must not lose the others' numbers
                row["error"] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
            pipe._graphs, pipe._policies, pipe._warm = None, {}, None  # free this mode's graphs
            torch.cuda.empty_cache()
            rows.append(row)
            print(f"{model} {name}: " + (f"{row['latency_s']:.3f} s" if "latency_s" in row else row["error"]),
                  flush=True)
        del pipe
        torch.cuda.empty_cache()
    add_speedups(rows)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Each row's speed-ups over (a), (b) and the official code (o) of the same model."""
    for row in rows:
        for ref in ("a", "b", "o"):
            base = next((r for r in rows if r["model"] == row["model"] and r["mode"] == ref and "latency_s" in r), None)
            if base and "latency_s" in row:
                row[f"speedup_over_{ref}"] = base["latency_s"] / row["latency_s"]


def markdown(result: dict) -> str:
    lines = [
        *header(result["title"], result),
        "| model | mode | latency (s) | vs a | vs b | vs o | condition | transformer | decode | attention share (eager) "
        "| peak GiB | outside stages, ms (in gc) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | failed: {r['error'][:80]} |||||||||| ")
            continue
        vs = [f"{r[k]:.2f}x" if k in r else "" for k in ("speedup_over_a", "speedup_over_b", "speedup_over_o")]
        if "stages_s" in r:
            s = r["stages_s"]
            parts = [f"{s['condition']:.3f}", f"{s['transformer']:.3f}", f"{s['decode']:.3f}",
                     f"{r['attention_share_eager']:.0%}"]
        else:  # the official code: its total only
            parts = ["-"] * 4
        outside = ", ".join(f"{t * 1000:.0f} ({g * 1000:.0f})" for t, g in zip(r.get("outside_stages_s", []),
                                                                             r.get("gc_s", [])))
        lines.append(f"| {r['model']} | {r['mode']} | {r['latency_s']:.3f} | " + " | ".join(vs + parts)
                     + f" | {r['peak_gib']:.1f} | {outside} |")
    lines += ["", "Modes:", ""] + [f"- {k}: {v}" for k, v in result["modes"].items()]
    if result.get("dense_kernel"):
        lines += ["", f"Dense calls of modes b-i ran on {result['dense_kernel']}."]
    ok = [r for r in result["rows"] if "scale_s" in r]
    if ok:
        lines += ["", "Per scale (transformer + sampling, ms):", ""]
        lines += ["| model mode | " + " | ".join(f"{h}x{w}" for h, w in ok[0]["scales"]) + " |",
                  "|---" * (len(ok[0]["scales"]) + 1) + "|"]
        for r in ok:
            lines.append(f"| {r['model']} {r['mode']} | " + " | ".join(f"{t * 1000:.1f}" for t in r["scale_s"]) + " |")
    if result.get("summary"):
        lines += ["", "Summary: " + ", ".join(f"{k} = {v:.3f}" for k, v in result["summary"].items())]
    return "\n".join(lines) + "\n"


def _summary(rows: list[dict]) -> dict:
    def get(model, mode, key):
        row = next((r for r in rows if r["model"] == model and r["mode"] == mode), {})
        return row.get(key)

    pairs = {
        "8b_d_over_a": ("infinity-8b", "d", "speedup_over_a"),
        "8b_d_over_b": ("infinity-8b", "d", "speedup_over_b"),
        "8b_e_over_a": ("infinity-8b", "e", "speedup_over_a"),
        "8b_f_over_a": ("infinity-8b", "f", "speedup_over_a"),
        "8b_g_over_a": ("infinity-8b", "g", "speedup_over_a"),
        "8b_h_over_a": ("infinity-8b", "h", "speedup_over_a"),
        "8b_d_over_o": ("infinity-8b", "d", "speedup_over_o"),
        "8b_o_latency_s": ("infinity-8b", "o", "latency_s"),
        "8b_d_latency_s": ("infinity-8b", "d", "latency_s"),
        "8b_d_peak_gib": ("infinity-8b", "d", "peak_gib"),
        "8b_b_peak_gib": ("infinity-8b", "b", "peak_gib"),
        "hart_b_over_a": ("hart-0.7b", "b", "speedup_over_a"),
        "hart_d_over_a": ("hart-0.7b", "d", "speedup_over_a"),
        "hart_d_over_b": ("hart-0.7b", "d", "speedup_over_b"),
        "hart_e_over_a": ("hart-0.7b", "e", "speedup_over_a"),
        "hart_d_latency_s": ("hart-0.7b", "d", "latency_s"),
        "varedit_8b_d_over_o": ("varedit-8b-1024", "d", "speedup_over_o"),
        "varedit_8b_d_over_b": ("varedit-8b-1024", "d", "speedup_over_b"),
        "varedit_8b_o_latency_s": ("varedit-8b-1024", "o", "latency_s"),
        "varedit_8b_d_latency_s": ("varedit-8b-1024", "d", "latency_s"),
        "varedit_8b_o_peak_gib": ("varedit-8b-1024", "o", "peak_gib"),
        "varedit_8b_d_peak_gib": ("varedit-8b-1024", "d", "peak_gib"),
    }
    return {k: v for k, args in pairs.items() if (v := get(*args)) is not None}


def plot(result: dict, path: Path) -> None:
    """Latency per mode and model, as a bar chart (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    rows = [r for r in result["rows"] if "latency_s" in r]
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        ax.bar([r["mode"] for r in mine], [r["latency_s"] for r in mine], color="tab:blue")
        for i, r in enumerate(mine):
            ax.text(i, r["latency_s"], f"{r['latency_s']:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{model}, {result['card']}")
        ax.set_ylabel("seconds per image")
    fig.tight_layout()
    files.whole(path, lambda part: fig.savefig(part, format="png", dpi=120))


def dense_kernel() -> str:
    """The kernel of the modes' dense calls on this GPU (DenseAttention "fa4")."""
    probe = torch.empty(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16)
    return "FlashAttention-4" if fa4_runs_here(probe) else "SDPA cuDNN"


def run(models, modes: dict[str, Mode], repeats: int, out_dir: str, name: str, title: str, command: str,
        official: str | None = None) -> dict:
    if not torch.cuda.is_available():
        raise SparvarError("the end-to-end benchmark needs a CUDA GPU")
    rows = bench(models, modes, repeats, official=official)
    result = {
        **provenance(command),
        "title": title,
        "dense_kernel": dense_kernel(),
        "modes": {k: m.about for k, m in modes.items()} | ({"o": OFFICIAL_ABOUT} if official else {}),
        "rows": rows,
        "summary": _summary(rows),
    }
    write(out_dir, name, result, markdown(result))
    if len(modes) > 1:
        plot(result, Path(out_dir) / f"{name}.png")
    return result


def check_official(path: str, models: list[str]) -> None:
    """--official PATH: a clone of the one repository whose code all the models have (Family.official_code)."""
    from sparvar.bench.official import RUNNERS
    from sparvar.models.registry import FAMILIES, get_spec

    repositories = {get_spec(m).family.official_code for m in models}
    if None in repositories or len(repositories) > 1:
        have = "; ".join(f"{f.name}: {f.official_code}" for f in FAMILIES.values() if f.official_code)
        raise SparvarError(f"--official times the official code of one repository: give models of one family that "
                           f"has one ({have})")
    runner = RUNNERS[repositories.pop()]
    if not Path(path, runner.marker).is_file():
        raise SparvarError(f"--official {path} is not a clone of {runner.repository} ({runner.marker} is missing)")


def main(argv: list[str] | None = None, which: str = "e2e") -> None:
    table = E2E_MODES if which == "e2e" else BASELINE_MODES
    parser = ArgumentParser(prog=f"sparvar bench {which}", description=__doc__.splitlines()[0],
                            formatter_class=HelpFormatter)
    parser.add_argument("--models", nargs="+", default=["infinity-2b", "infinity-8b"], help="models to time")
    parser.add_argument("--modes", nargs="+", default=list(table), choices=list(table), help="modes to time")
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per mode (the median is kept)")
    parser.add_argument("--out", default="benchmarks", help="folder for the JSON, markdown and plot")
    parser.add_argument("--name", default=which, help="file name of the results (NAME.json, NAME.md)")
    if which == "e2e":
        parser.add_argument("--official", metavar="PATH",
                            help="local clone of the models' official code (FoundationVision/Infinity, or "
                            "HiDream-ai/VAREdit for VAREdit models): adds mode o, the official code itself")
    args = parser.parse_args(argv)
    from sparvar.models.registry import get_spec

    for model in args.models:
        get_spec(model)  # an unknown name fails before any GPU work
    command = command_line(f"sparvar bench {which}", argv)
    title = ("Dense generation baseline" if which == "baseline" else "End to end") + (
        ": random weights, 1024x1024 (or the model's own schedule), batch 1 with CFG, bf16")
    official = getattr(args, "official", None)
    if official:
        check_official(official, args.models)
    run(args.models, {k: table[k] for k in args.modes}, args.repeats, args.out, args.name, title, command.strip(),
        official)


if __name__ == "__main__":
    main()

"""CPU attention benchmark on the shapes of a small Infinity (13-scale 1:1 schedule, head dim 64).

Times dense SDPA at every scale, each sparse backend on the tables the `default` policy builds
(CSLA block tables, CS4A key lists, the decision scale's residual list) and the decision pass,
then adds them up over one generation's plan; --e2e also runs a random-weight model of that size
through the pipeline, dense against `default`. Medians of interleaved repeats, in wall-clock
seconds, or with --clock cpu in CPU seconds of this process (steadier on a shared machine; run
with OMP_NUM_THREADS=1 so they are the seconds of one core).

    sparvar bench cpu-attention --out benchmarks --name demo_cpu_attention [--flex] [--e2e]
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from sparvar.attention.decision import grouped_attention_colsum, reference_attention_colsum
from sparvar.attention.flex import flex_attention
from sparvar.attention.policy import AttentionCall, AttentionPolicy
from sparvar.attention.sparse import sparse_attention
from sparvar.bench.common import command_line, header, provenance, write
from sparvar.options import ArgumentParser, HelpFormatter
from sparvar.schedules import infinity_schedule
from sparvar.sparsity import SparVARPolicy, get_config, make_policy
from sparvar.sparsity.stats import table_density

SCHEDULE = infinity_schedule("1:1", 1024)
BATCH, HEAD_DIM = 2, 64  # CFG doubles one image


class _Recorder(SparVARPolicy):
    """The default policy, keeping every table it hands to the sparse backend."""

    def reset(self):
        super().reset()
        self.tables = {}

    def _sparse(self, q, k, v, table, call):
        self.tables[call.layer, call.scale] = table
        return super()._sparse(q, k, v, table, call)


def _inputs(heads: int, gen: torch.Generator) -> dict:
    """Per scale: cosine-attention-like q (unit rows, sharpened) and k, v as views of one cache."""
    cache = torch.randn(2, BATCH, heads, SCHEDULE.total, HEAD_DIM, generator=gen)
    cache[0] = F.normalize(cache[0], dim=-1)
    out = {}
    for k, n in enumerate(SCHEDULE.lengths):
        q = F.normalize(torch.randn(BATCH, heads, n, HEAD_DIM, generator=gen), dim=-1) * 8
        kv = SCHEDULE.kv_length(k)
        out[k] = (q, cache[0, :, :, :kv], cache[1, :, :, :kv])
    return out


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _median_s(fns: dict, repeats: int, clock) -> dict:
    """Median seconds of each callable, timed in `repeats` interleaved rounds after one warm-up."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def bench_kernels(heads: int, depth: int, repeats: int, flex: bool, clock=time.perf_counter) -> dict:
    gen = torch.Generator().manual_seed(0)
    policy = _Recorder(get_config("default"), "default")
    plan = policy.plan(depth, SCHEDULE)
    cs4a_layer, csla_layer = 0, depth - 1
    inputs = _inputs(heads, gen)
    for layer in (cs4a_layer, csla_layer):  # the policy builds its tables on the way
        for k in range(len(SCHEDULE)):
            if plan.modes[layer][k] != "dense":
                policy(*inputs[k], AttentionCall(layer, k, depth, SCHEDULE, 1.0))
    rows = []
    for k, (q, kk, vv) in inputs.items():
        rows.append({"scale": k, "kind": "dense", "q_len": q.shape[2], "kv_len": kk.shape[2],
                     "seconds": _median_s({"sdpa": lambda: F.scaled_dot_product_attention(q, kk, vv, scale=1.0)}, repeats, clock)})
    for (layer, k), table in sorted(policy.tables.items()):
        q, kk, vv = inputs[k]
        kind = "csla" if table.key_block > 1 else ("residual" if plan.modes[layer][k] == "decision" else "cs4a")
        names = ("cpu", "gather") if kind == "csla" else ("cpu",)  # on key lists cpu runs gather
        options = {name: (lambda name=name: sparse_attention(q, kk, vv, table, 1.0, backend=name)) for name in names}
        options["dense"] = lambda: F.scaled_dot_product_attention(q, kk, vv, scale=1.0)  # same rounds: load hits both
        if flex and kind == "csla":  # compiled: the flex backend compiles only on CUDA
            options["flex"] = lambda: flex_attention(q, kk, vv, table, 1.0, compile=True)
        row = {"scale": k, "kind": kind, "q_len": q.shape[2], "kv_len": kk.shape[2],
               "density": float(table_density(table).mean())}
        if "flex" in options:  # its first call compiles
            start = time.perf_counter()
            out = options["flex"]()
            row["flex_first_call_s"] = time.perf_counter() - start
            row["rel_err_flex_vs_gather"] = _rel(out, options["gather"]())
        if "gather" in options:
            row["rel_err_cpu_vs_gather"] = _rel(options["cpu"](), options["gather"]())
        rows.append(row | {"seconds": _median_s(options, repeats, clock)})
    q, kk, vv = inputs[plan.decision_scale]
    group = policy.config.group
    grouped, ref = grouped_attention_colsum(q, kk, vv, group, 1.0), reference_attention_colsum(q, kk, vv, group, 1.0)
    rows.append({
        "scale": plan.decision_scale, "kind": "decision", "q_len": q.shape[2], "kv_len": kk.shape[2],
        "rel_err_grouped_vs_reference": max(_rel(grouped[0], ref[0]), _rel(grouped[1], ref[1])),
        "seconds": _median_s({"grouped": lambda: grouped_attention_colsum(q, kk, vv, group, 1.0),
                              "reference": lambda: reference_attention_colsum(q, kk, vv, group, 1.0),
                              "dense": lambda: F.scaled_dot_product_attention(q, kk, vv, scale=1.0)}, repeats, clock),
    })
    return {"rows": rows, "estimate": estimate(rows, plan, depth)}


def estimate(rows: list[dict], plan, depth: int) -> dict:
    """Attention seconds of one generation: dense, `default`, and `default` with the previous CPU
    choices for CSLA and the decision scale (expanded-block gather, reference column sums)."""
    t = {(r["scale"], r["kind"]): r["seconds"] for r in rows}
    dense = {k: t[k, "dense"]["sdpa"] for k in range(len(SCHEDULE))}
    now, before = "default (cpu backend)", "default (gather for CSLA, reference decision)"
    total = {"dense": depth * sum(dense.values()), now: 0.0, before: 0.0}
    for layer in range(depth):
        for k, mode in enumerate(plan.modes[layer]):
            if mode == "dense":
                new = old = dense[k]
            elif mode == "decision":
                new = t[k, "decision"]["grouped"] + t[k, "residual"]["cpu"]
                old = t[k, "decision"]["reference"] + t[k, "residual"]["cpu"]
            else:
                new = t[k, mode]["cpu"]
                old = t[k, mode]["gather"] if mode == "csla" else new
            total[now] += new
            total[before] += old
    return total


class _Timed(AttentionPolicy):
    """A policy that adds up the seconds its inner policy spends (attention and its planning)."""

    def __init__(self, inner: AttentionPolicy, clock):
        self.inner, self.clock, self.name, self.seconds = inner, clock, inner.name, 0.0

    def reset(self):
        self.inner.reset()
        self.seconds = 0.0

    def __call__(self, q, k, v, call):
        start = self.clock()
        out = self.inner(q, k, v, call)
        self.seconds += self.clock() - start
        return out


def bench_e2e(heads: int, depth: int, repeats: int, clock=time.perf_counter) -> dict:
    """One image with CFG through the pipeline: a random-weight infinity-demo resized to depth x (heads x 64).

    Per run: the pipeline's stage seconds (wall clock), and `clock` seconds of the whole call and
    of its attention calls. Summary per preset: the run of median total.
    """
    from sparvar.loading import load_pipeline
    from sparvar.models.registry import get_spec

    spec = get_spec("infinity-demo")
    spec = replace(spec, transformer=replace(spec.transformer, depth=depth, width=heads * HEAD_DIM, heads=heads))
    pipe = load_pipeline(spec, device="cpu", random_weights=True)
    policies = {name: _Timed(make_policy(name), clock) for name in ("dense", "default")}
    runs = {name: [] for name in policies}
    pipe([spec.example], seed=0, attention=policies["default"], progress=False)  # warm-up
    for _ in range(repeats):
        for name, policy in policies.items():
            start = clock()
            out = pipe([spec.example], seed=0, attention=policy, progress=False)
            runs[name].append({**out.stage_seconds, "clock_total": clock() - start, "clock_attention": policy.seconds,
                               "attention_flops_saved": policy.inner.stats()["total"]["saved_fraction"]})
    return {name: sorted(r, key=lambda s: s["clock_total"])[len(r) // 2] for name, r in runs.items()} | {"runs": runs}


def to_markdown(result: dict) -> str:
    lines = [*header("CPU attention", result), f"Settings: {result['settings']}; load average "
             f"{result['load_before'][0]:.2f} before, {result['load_after'][0]:.2f} after; seconds by the "
             f"{result['settings']['clock']} clock.", "",
             "| scale | kind | q x kv | density | option: seconds |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        opts = ", ".join(f"{n} {s:.3f}" for n, s in r["seconds"].items())
        lines.append(f"| {r['scale']} | {r['kind']} | {r['q_len']} x {r['kv_len']} | {r.get('density', 1.0):.3f} | {opts} |")
    lines += ["", "| attention per generation | seconds |", "|---|---|"]
    lines += [f"| {n} | {s:.2f} |" for n, s in result["estimate"].items()]
    if "e2e" in result:
        lines += ["", "| pipeline | total s | attention s | stage total s (wall) | attention FLOPs saved |",
                  "|---|---|---|---|---|"]
        for n in ("dense", "default"):
            e = result["e2e"][n]
            lines.append(f"| {n} | {e['clock_total']:.2f} | {e['clock_attention']:.2f} | {e['total']:.2f} | "
                         f"{e['attention_flops_saved']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = ArgumentParser(prog="sparvar bench cpu-attention", description=__doc__.splitlines()[0],
                            formatter_class=HelpFormatter)
    parser.add_argument("--heads", type=int, default=3, help="attention heads of 64")
    parser.add_argument("--depth", type=int, default=12, help="layers")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats (the median is kept)")
    parser.add_argument("--clock", choices=CLOCKS, default="wall", help="wall seconds, or CPU seconds of this process")
    parser.add_argument("--flex", action="store_true", help="also compiled FlexAttention on the CSLA tables (minutes to compile)")
    parser.add_argument("--e2e", action="store_true", help="also dense vs default through the pipeline, random weights")
    parser.add_argument("--out", default="benchmarks", help="folder for NAME.json and NAME.md")
    parser.add_argument("--name", default="cpu_attention", help="file name of the results (NAME.json, NAME.md)")
    args = parser.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "name")}
    result = {**provenance(command_line("sparvar bench cpu-attention", argv), "cpu"), "load_before": os.getloadavg(),
              "settings": settings}
    result |= bench_kernels(args.heads, args.depth, args.repeats, args.flex, CLOCKS[args.clock])
    if args.e2e:
        result["e2e"] = bench_e2e(args.heads, args.depth, max(1, args.repeats // 2), CLOCKS[args.clock])
    result["load_after"] = os.getloadavg()
    write(args.out, args.name, result, to_markdown(result))


if __name__ == "__main__":
    main()

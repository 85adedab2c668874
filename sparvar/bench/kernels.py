"""Attention kernel benchmark on Infinity's 1024x1024 shapes, every contender in one run on one card.

Our Triton block-sparse kernel runs random block tables (5-100% density) and the paper's CSLA
table; on each table it races FlexAttention and, where flash-attn-4 is installed,
FlashAttention-4's block-sparse kernel (attention/fa4.py; its first call, which compiles, is
timed apart, and its dense kernel runs on the 100% rows) and, where flashinfer-python or tilelang
is installed, FlashInfer's block-sparse wrapper (attention/flashinfer.py) and our kernel written in
TileLang (attention/tilelang.py), each planned per table with its first call (plan and JIT
compile) timed apart likewise; the dense SDPA flash and cuDNN backends set the baseline. Without a
package one line says so and its columns stay empty. The decision-scale kernel (dense attention +
column sums) races SDPA flash at scale 10.
Effective TFLOP/s count only the (query, key) pairs of computed blocks.
Run: sparvar bench kernels [--models 2b 8b] [--scales 10 11 12] [--out-dir benchmarks]
"""

from __future__ import annotations

import importlib
import math
import statistics
import time
from contextlib import nullcontext

import torch

from sparvar.attention.sparse import resolve_backend
from sparvar.attention.tables import BlockTable
from sparvar.bench.common import command_line, header, provenance, write
from sparvar.errors import SparvarError
from sparvar.options import ArgumentParser, HelpFormatter
from sparvar.schedules import infinity_schedule

BATCH, HEAD_DIM, BLOCK = 2, 128, 128
MODELS = {"2b": 16, "8b": 28}  # Infinity-2B / 8B: heads of 128
SCALES = (10, 11, 12)  # query scales of the 1024x1024 schedule
DENSITIES = (0.05, 0.10, 0.25, 0.50, 1.00)
DECISION_SCALE, DECISION_GROUP = 10, 192
ROUNDS = 2  # interleaved timing passes per comparison
GRAPH_CALLS, GRAPH_REPLAYS = 20, 10  # --cuda-graphs: calls captured in one graph, replays timed
TARGETS = {  # summary key -> (comparison, bound)
    "csla_paper_s12_8b_vs_flex": (">=", 1.4),
    "csla_paper_s12_8b_vs_sdpa_flash": (">=", 8.0),
    "csla_paper_s12_8b_vs_cudnn": (">=", 6.0),
    "min_tflops_density_10_to_50": (">=", 450.0),
    "min_tflops_density_25_to_50": (">=", 600.0),
    "dense_vs_sdpa_flash": (">=", 1.0),
    "decision_time_over_sdpa_flash": ("<=", 1.3),
}
# Libraries planned once per table, raced where installed: name -> (module, package, what runs)
LIBRARIES = {
    "flashinfer": ("flashinfer.sparse", "flashinfer-python", "FlashInfer (`VariableBlockSparseAttentionWrapper`)"),
    "tilelang": ("tilelang", "tilelang", "TileLang (our kernel written in it, attention/tilelang.py)"),
}


def installed(module: str, package: str, columns: str) -> bool:
    """Whether `module` imports; says in one line why not."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        print(f"{package} is missing ({err}): no {columns} columns (benchmarks/kernels_notes.md: how to carry it)",
              flush=True)
        return False
    return True

def table_from_block_mask(blocks: torch.Tensor, q_len: int, kv_len: int) -> BlockTable:
    """BlockTable (shared by all heads) from a (num_q_blocks, num_kv_blocks) bool mask."""
    counts = blocks.sum(-1).to(torch.int32)
    order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True)  # kept blocks first, ascending
    indices = order[:, : max(int(counts.max()), 1)].to(torch.int32)
    return BlockTable(counts[None, None], indices[None, None].contiguous(), BLOCK, BLOCK, q_len, kv_len)


def random_table(q_len: int, kv_len: int, density: float) -> BlockTable:
    """Each query block keeps round(density * blocks) distinct random key blocks (at least 1)."""
    nq, nk = -(-q_len // BLOCK), -(-kv_len // BLOCK)
    keep = max(1, round(density * nk))
    blocks = torch.zeros(nq, nk, dtype=torch.bool)
    for r in range(nq):
        blocks[r, torch.randperm(nk)[:keep]] = True
    return table_from_block_mask(blocks, q_len, kv_len)


def paper_csla_table(scale: int, device: str) -> tuple[BlockTable, str]:
    """The `paper` preset's CSLA table at a query scale of Infinity 1024x1024; says where it came from."""
    from sparvar.sparsity.csla import PAPER_CSLA_WINDOWS, csla_block_table

    table = csla_block_table(infinity_schedule("1:1", 1024), scale, PAPER_CSLA_WINDOWS, BLOCK, BLOCK, device)
    return table, "sparvar.sparsity.csla"


def _to(table: BlockTable, device: str) -> BlockTable:
    return BlockTable(table.counts.to(device), table.indices.to(device), table.q_block, table.key_block,
                      table.q_len, table.kv_len)


def covered_pairs(table: BlockTable) -> int:
    """(query, key) pairs inside the computed blocks of one (batch, head), keys clipped to kv_len."""
    counts = table.counts.reshape(-1, table.num_q_blocks)[0].cpu().long()
    indices = table.indices.reshape(-1, *table.indices.shape[2:])[0].cpu().long()
    rows = (table.q_len - torch.arange(table.num_q_blocks) * table.q_block).clamp(max=table.q_block)
    keys = (table.kv_len - indices * table.key_block).clamp(min=0, max=table.key_block)
    keys = torch.where(torch.arange(indices.shape[-1]) < counts[:, None], keys, 0).sum(-1)
    return int((rows * keys).sum())


def make_inputs(heads: int, q_len: int, kv_len: int):
    """Random bf16 q and k, v as length views of a static cache sized for the whole schedule."""
    cap = infinity_schedule("1:1", 1024).total
    q = torch.randn(BATCH, heads, q_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    cache = torch.randn(2, BATCH, heads, cap, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    return q, cache[0, :, :, :kv_len], cache[1, :, :, :kv_len]


def time_ms(fn, cuda_graph: bool = False) -> float:
    """Median ms of fn: launched each time, or (cuda_graph) replayed from a CUDA graph, as the
    generations run, which leaves out the host's cost of launching (FA4's Python launch path)."""
    import triton.testing

    fn()  # compile and warm before timing
    torch.cuda.synchronize()
    if cuda_graph:
        return replayed_ms(fn)
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def replayed_ms(fn, calls: int = GRAPH_CALLS, replays: int = GRAPH_REPLAYS) -> float:
    """Median ms of one call of fn, from replays of one CUDA graph of `calls` calls. A fixed count:
    triton's do_bench_cudagraph captures 100 ms worth of calls, thousands of small ones, each
    through the host's launch path, and ran a whole bench past 230 s."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()  # the first replay uploads the graph
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def tflops(pairs: int, heads: int, ms: float) -> float:
    return 4 * BATCH * heads * HEAD_DIM * pairs / (ms * 1e-3) / 1e12


def _sdpa(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend])


def _try_time(fn, cuda_graph: bool) -> tuple[float | None, str | None]:
    try:
        return time_ms(fn, cuda_graph), None
    except Exception as e:  # a baseline that refuses these inputs is recorded, not fatal
        return None, f"{type(e).__name__}: {e}"[:300]


class _Flex:
    """FlexAttention compiled once (dynamic=False, as its docs ask) on BlockMasks of our tables."""

    def __init__(self):
        from torch.nn.attention.flex_attention import flex_attention

        self.fn = torch.compile(flex_attention, dynamic=False)

    @staticmethod
    def block_mask(table: BlockTable):
        from torch.nn.attention.flex_attention import BlockMask

        # every listed block is computed whole: pass them as full blocks, no partial ones;
        # Flex wants one index column per key block. The mask_mod states the same blocks for
        # Flex's paths that ignore the block list (eager); the kernel skips it on full blocks.
        indices = torch.nn.functional.pad(table.indices, (0, table.num_kv_units - table.indices.shape[-1]))
        dense = table.unit_mask()[0, 0].contiguous()
        qb, kb = table.q_block, table.key_block

        def in_table(b, h, q_idx, kv_idx):
            return dense[q_idx // qb, kv_idx // kb]

        return BlockMask.from_kv_blocks(
            kv_num_blocks=torch.zeros_like(table.counts), kv_indices=torch.zeros_like(indices),
            full_kv_num_blocks=table.counts, full_kv_indices=indices,
            BLOCK_SIZE=(qb, kb), mask_mod=in_table, seq_lengths=(table.q_len, table.kv_len),
        )

    def __call__(self, q, k, v, mask, scale):
        return self.fn(q, k, v, block_mask=mask, scale=scale)


def time_rounds(contenders: dict, cuda_graph: bool = False) -> dict:
    """Median ms of each contender, timed in ROUNDS interleaved passes (so clock drift under
    load hits every contender alike) and averaged; None plus the error for one that fails."""
    times, errors = {name: [] for name in contenders}, {}
    for _ in range(ROUNDS):
        for name, (fn, context) in contenders.items():
            if name in errors:
                continue
            with context():
                ms, err = _try_time(fn, cuda_graph)
            if err:
                errors[name] = err
            else:
                times[name].append(ms)
    return {name: (sum(t) / len(t) if t else None, t, errors.get(name)) for name, t in times.items()}


def _first_call(fn) -> tuple[torch.Tensor | None, float | None, str | None]:
    """fn's output and the seconds its first call took (a JIT compile included), or its error."""
    start = time.perf_counter()
    try:
        out = fn()
        torch.cuda.synchronize()
    except Exception as e:  # recorded in the row, not fatal
        return None, None, f"{type(e).__name__}: {e}"[:300]
    return out, time.perf_counter() - start, None


def fa4_contenders(q, k, v, table: BlockTable, sm: float, dense: bool, ours: torch.Tensor) -> tuple[dict, dict]:
    """FA4 on `table` (and dense, with `dense`: the 100% table, where our output is dense attention
    too): the contenders that ran, and per kernel the seconds of its first call, its error against
    our kernel's output `ours`, or why it failed."""
    from sparvar.attention.fa4 import fa4_attention, fa4_block_sparsity

    blocks = fa4_block_sparsity(table)
    calls = {"fa4": lambda: fa4_attention(q, k, v, blocks, sm)}
    if dense:
        calls["fa4_dense"] = lambda: fa4_attention(q, k, v, None, sm)
    contenders, facts = {}, {}
    for name, fn in calls.items():
        out, seconds, err = _first_call(fn)
        facts[f"{name}_first_call_s"] = seconds
        facts[f"{name}_rel_err_vs_triton"] = None if out is None else rel_err(out, ours)
        if err:
            facts[f"{name}_error"] = err
        else:
            contenders[name] = (fn, nullcontext)
    return contenders, facts


def _runner(library: str):
    """The function that plans `library` (a LIBRARIES key) for a table: (q, k, table, scale) -> attend."""
    if library == "flashinfer":
        from sparvar.attention.flashinfer import flashinfer_runner
        return flashinfer_runner
    from sparvar.attention.tilelang import tilelang_runner
    return tilelang_runner


def library_contenders(library: str, q, k, v, table: BlockTable, sm: float,
                       ours: torch.Tensor) -> tuple[dict, dict]:
    """`library` (a LIBRARIES key) on `table`: the contender if it ran, and the seconds of its first
    call (its plan and JIT compile included), its error against our kernel's output `ours`, or why
    it failed."""
    planned = {}

    def first():
        planned["attend"] = _runner(library)(q, k, table, sm)
        return planned["attend"](q, k, v)

    out, seconds, err = _first_call(first)
    facts = {f"{library}_first_call_s": seconds,
             f"{library}_rel_err_vs_triton": None if out is None else rel_err(out, ours)}
    if err:
        return {}, {**facts, f"{library}_error": err}
    return {library: (lambda: planned["attend"](q, k, v), nullcontext)}, facts


def bench_sparse(model: str, scale: int, flex: _Flex, fa4: bool = False, cuda_graph: bool = False,
                 libraries: tuple[str, ...] = ()) -> list[dict]:
    """Rows for one (model, query scale): every table, our kernel vs Flex, FA4 (with `fa4`), the
    `libraries` (LIBRARIES keys) and the SDPA backends."""
    from sparvar.kernels.sparse_attention import triton_sparse_attention

    heads = MODELS[model]
    sched = infinity_schedule("1:1", 1024)
    q_len, kv_len = sched.lengths[scale], sched.kv_length(scale)
    q, k, v = make_inputs(heads, q_len, kv_len)
    sm = 1 / math.sqrt(HEAD_DIM)
    dense_pairs = q_len * kv_len
    with _sdpa("flash"):
        dense_ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=sm)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=sm)

    tables = [(f"random {d:.0%}", random_table(q_len, kv_len, d), d) for d in DENSITIES]
    paper, source = paper_csla_table(scale, "cpu")
    tables.append((f"paper CSLA ({source})", paper, None))
    rows = []
    for name, table, nominal in tables:
        table = _to(table, "cuda")
        pairs = covered_pairs(table)
        ours = triton_sparse_attention(q, k, v, table, sm)
        mask = flex.block_mask(table)
        try:
            flex_err = rel_err(flex(q, k, v, mask, sm), ours)
        except Exception:  # its timing below records the error
            flex_err = None
        contenders = {
            "triton": (lambda: triton_sparse_attention(q, k, v, table, sm), nullcontext),
            "flex": (lambda: flex(q, k, v, mask, sm), nullcontext),
            "sdpa_flash": (sdpa, lambda: _sdpa("flash")),
            "sdpa_cudnn": (sdpa, lambda: _sdpa("cudnn")),
        }
        fa4_facts = {}
        if fa4:
            more, fa4_facts = fa4_contenders(q, k, v, table, sm, nominal == 1.0, ours)
            contenders.update(more)
        library_facts = {}
        for library in libraries:
            more, facts = library_contenders(library, q, k, v, table, sm, ours)
            contenders.update(more)
            library_facts.update(facts)
        t = time_rounds(contenders, cuda_graph)
        ms, flex_ms, flash_ms, cudnn_ms, fa4_ms, fa4_dense_ms = (
            t[c][0] if c in t else None for c in ("triton", "flex", "sdpa_flash", "sdpa_cudnn", "fa4", "fa4_dense"))
        for library in libraries:
            lib_ms = t[library][0] if library in t else None
            library_facts.update({
                f"{library}_ms": lib_ms, f"{library}_tflops": lib_ms and tflops(pairs, heads, lib_ms),
                f"{library}_speedup_vs_flex": lib_ms and flex_ms and flex_ms / lib_ms,
                f"{library}_speedup_vs_sdpa_cudnn": lib_ms and cudnn_ms and cudnn_ms / lib_ms,
                f"{library}_speedup_vs_triton": lib_ms and ms / lib_ms})
        auto = "fa4" if fa4_ms is not None and resolve_backend("auto", q, table) == "fa4" else "triton"
        rows.append({
            "kind": "sparse", "model": model, "heads": heads, "scale": scale, "q_len": q_len,
            "kv_len": kv_len, "table": name, "nominal_density": nominal, "density": pairs / dense_pairs,
            "auto_backend": auto, "triton_ms": ms, "triton_tflops": tflops(pairs, heads, ms),
            "flex_ms": flex_ms, "flex_tflops": flex_ms and tflops(pairs, heads, flex_ms),
            "sdpa_flash_ms": flash_ms, "sdpa_cudnn_ms": cudnn_ms,
            "sdpa_flash_tflops": flash_ms and tflops(dense_pairs, heads, flash_ms),
            "speedup_vs_flex": flex_ms and flex_ms / ms, "speedup_vs_sdpa_flash": flash_ms and flash_ms / ms,
            "speedup_vs_sdpa_cudnn": cudnn_ms and cudnn_ms / ms,
            "rounds_ms": {c: t[c][1] for c in t},
            "rel_err_vs_flex": flex_err,
            "rel_err_vs_sdpa": rel_err(ours, dense_ref) if nominal == 1.0 else None,
            "fa4_ms": fa4_ms, "fa4_tflops": fa4_ms and tflops(pairs, heads, fa4_ms),
            "fa4_dense_ms": fa4_dense_ms, "fa4_dense_tflops": fa4_dense_ms and tflops(dense_pairs, heads, fa4_dense_ms),
            "fa4_speedup_vs_flex": fa4_ms and flex_ms and flex_ms / fa4_ms,
            "fa4_speedup_vs_sdpa_cudnn": fa4_ms and cudnn_ms and cudnn_ms / fa4_ms,
            "fa4_speedup_vs_sdpa_flash": fa4_ms and flash_ms and flash_ms / fa4_ms,
            "fa4_speedup_vs_triton": fa4_ms and ms / fa4_ms,
            **fa4_facts,
            **library_facts,
            "errors": {c: t[c][2] for c in t if t[c][2]},
        })
    return rows


def bench_decision(model: str, cuda_graph: bool = False) -> dict:
    from sparvar.kernels.decision import triton_attention_colsum

    heads = MODELS[model]
    sched = infinity_schedule("1:1", 1024)
    q_len, kv_len = sched.lengths[DECISION_SCALE], sched.kv_length(DECISION_SCALE)
    q, k, v = make_inputs(heads, q_len, kv_len)
    sm = 1 / math.sqrt(HEAD_DIM)
    out, colsum = triton_attention_colsum(q, k, v, DECISION_GROUP, sm)
    with _sdpa("flash"):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=sm)
    t = time_rounds({
        "triton": (lambda: triton_attention_colsum(q, k, v, DECISION_GROUP, sm), nullcontext),
        "sdpa_flash": (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=sm),
                       lambda: _sdpa("flash")),
    }, cuda_graph)
    ms, flash_ms = t["triton"][0], t["sdpa_flash"][0]
    rows_per_group = torch.tensor([min(DECISION_GROUP, q_len - g * DECISION_GROUP) for g in range(colsum.shape[2])],
                                  device=colsum.device, dtype=torch.float32)
    return {
        "kind": "decision", "model": model, "heads": heads, "scale": DECISION_SCALE, "q_len": q_len,
        "kv_len": kv_len, "group": DECISION_GROUP, "triton_ms": ms, "sdpa_flash_ms": flash_ms,
        "time_over_sdpa_flash": ms / flash_ms, "rounds_ms": {c: t[c][1] for c in t},
        "rel_err_vs_sdpa": rel_err(out, ref),
        "colsum_mass_err": float((colsum.sum(-1) - rows_per_group).abs().max() / DECISION_GROUP),
    }


def result_of(row: dict, contender: str, what: str):
    """`what` ("tflops", "speedup_vs_flex", ...) of `contender` in a sparse row: "triton" (ours), "fa4",
    a LIBRARIES key, or "auto" (the one the backend "auto" ran there; ours in rows recorded before it
    was noted)."""
    if contender == "auto":
        contender = row.get("auto_backend", "triton")
    if contender == "fa4" or contender in LIBRARIES:
        return row.get(f"{contender}_{what}")
    return row.get("triton_tflops" if what == "tflops" else what)


def summarize(rows: list[dict]) -> dict:
    """The targets' keys for what the backend "auto" runs on each table, then ours ("triton_"),
    FA4's ("fa4_") and each library's ("flashinfer_", "tilelang_") alone; each None where its rows
    were not run (--models, --scales, a package missing)."""
    sparse = [r for r in rows if r["kind"] == "sparse"]
    s12 = [r for r in sparse if r["model"] == "8b" and r["scale"] == 12]
    paper = next((r for r in s12 if r["table"].startswith("paper")), {})
    dense = next((r for r in s12 if r["nominal_density"] == 1.0), {})
    decision = next((r for r in rows if r["kind"] == "decision" and r["model"] == "8b"), {})

    def lowest(contender, densities, scale=None):
        values = [result_of(r, contender, "tflops") for r in sparse
                  if r["nominal_density"] in densities and scale in (None, r["scale"])]
        return min((v for v in values if v is not None), default=None)

    summary = {
        "paper_table": paper.get("table"),
        "min_tflops_density_10_to_50_scale12": lowest("auto", (0.10, 0.25, 0.50), 12),
        "csla_paper_s12_8b_vs_sdpa_flash": result_of(paper, "auto", "speedup_vs_sdpa_flash"),
        "dense_vs_sdpa_flash": result_of(dense, "auto", "speedup_vs_sdpa_flash"),
        "decision_time_over_sdpa_flash": decision.get("time_over_sdpa_flash"),
        "fa4_dense_s12_8b_tflops": dense.get("fa4_dense_tflops"),
    }
    for prefix, contender in [("", "auto"), ("triton_", "triton"), ("fa4_", "fa4"),
                              *((f"{library}_", library) for library in LIBRARIES)]:
        summary[f"{prefix}csla_paper_s12_8b_vs_flex"] = result_of(paper, contender, "speedup_vs_flex")
        summary[f"{prefix}csla_paper_s12_8b_vs_cudnn"] = result_of(paper, contender, "speedup_vs_sdpa_cudnn")
        summary[f"{prefix}min_tflops_density_10_to_50"] = lowest(contender, (0.10, 0.25, 0.50))
        summary[f"{prefix}min_tflops_density_25_to_50"] = lowest(contender, (0.25, 0.50))
    met = {}
    for key, (op, bound) in TARGETS.items():
        value = summary[key]
        met[key] = value is not None and (value >= bound if op == ">=" else value <= bound)
    return {**summary, "targets": {k: f"{op} {b}" for k, (op, b) in TARGETS.items()}, "met": met}


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def to_markdown(result: dict) -> str:
    lines = [
        *header("Attention kernel benchmark", result),
        f"B={BATCH}, heads of {HEAD_DIM}, bf16, 128x128 blocks. Times (ms): medians of "
        + (f"one CUDA graph of {GRAPH_CALLS} calls replayed {GRAPH_REPLAYS} times, per call (each call replayed "
           "from a CUDA graph, as in generations), "
           if result.get("cuda_graphs") else "triton.testing.do_bench (each call launched from the host), ") +
        f"averaged over {ROUNDS} interleaved passes over the contenders of a row. "
        "TFLOP/s count computed blocks only (SDPA: all pairs).",
        "",
        ("| model | scale | table | density | triton ms | TFLOP/s | flex ms | SDPA flash ms | SDPA cuDNN ms | "
         "vs flex | vs flash | vs cuDNN | FA4 ms | FA4 TFLOP/s | FA4 vs cuDNN | auto runs |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r["kind"] != "sparse":
            continue
        lines.append(
            f"| {r['model']} | {r['scale']} | {r['table']} | {r['density']:.3f} | {r['triton_ms']:.3f} | "
            f"{r['triton_tflops']:.0f} | {_fmt(r['flex_ms'])} | {_fmt(r['sdpa_flash_ms'])} | {_fmt(r['sdpa_cudnn_ms'])} | "
            f"{_fmt(r['speedup_vs_flex'], '.2f')} | {_fmt(r['speedup_vs_sdpa_flash'], '.2f')} | "
            f"{_fmt(r['speedup_vs_sdpa_cudnn'], '.2f')} | {_fmt(r.get('fa4_ms'))} | "
            f"{_fmt(r.get('fa4_tflops'), '.0f')} | {_fmt(r.get('fa4_speedup_vs_sdpa_cudnn'), '.2f')} | "
            f"{r.get('auto_backend', 'triton')} |"
        )
    fa4 = [r for r in result["rows"] if r.get("fa4_first_call_s") is not None]
    if fa4:
        lines += ["", ("FlashAttention-4's first call on each table (it compiles for new shapes), its error against "
                       "our kernel's output, and its dense kernel beside the 100% tables:"), "",
                  "| model | scale | table | first call s | rel err vs ours | dense ms | dense TFLOP/s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['scale']} | {r['table']} | {r['fa4_first_call_s']:.2f} | "
                  f"{r['fa4_rel_err_vs_triton']:.1e} | {_fmt(r.get('fa4_dense_ms'))} | "
                  f"{_fmt(r.get('fa4_dense_tflops'), '.0f')} |" for r in fa4]
    for library, (_, _, what) in LIBRARIES.items():
        ran = [r for r in result["rows"] if f"{library}_first_call_s" in r]
        if not ran:
            continue
        lines += ["", (f"{what} on the same tables: its first call (plan and JIT compile), its error against our "
                       "kernel's output, its time:"), "",
                  "| model | scale | table | first call s | rel err vs ours | ms | TFLOP/s | vs ours | failed |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['scale']} | {r['table']} | {_fmt(r[f'{library}_first_call_s'], '.2f')} | "
                  f"{_fmt(r[f'{library}_rel_err_vs_triton'], '.1e')} | {_fmt(r[f'{library}_ms'])} | "
                  f"{_fmt(r[f'{library}_tflops'], '.0f')} | {_fmt(r[f'{library}_speedup_vs_triton'], '.2f')} | "
                  f"{r.get(f'{library}_error', '')[:80]} |" for r in ran]
    lines += ["", "Decision scale (dense attention + column sums per group of "
              f"{DECISION_GROUP}) vs SDPA flash:", "",
              "| model | scale | triton ms | SDPA flash ms | time ratio |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["kind"] == "decision":
            lines.append(f"| {r['model']} | {r['scale']} | {r['triton_ms']:.3f} | {r['sdpa_flash_ms']:.3f} | "
                         f"{r['time_over_sdpa_flash']:.2f} |")
    s = result["summary"]
    lines += ["", "## Summary", "", "The targets' keys measure what the backend `auto` runs on each table (the last "
              "column above); `triton_` keys measure our kernel alone, `fa4_` keys FA4 alone, `flashinfer_` keys "
              "FlashInfer alone, `tilelang_` keys our TileLang kernel alone.", "",
              f"Paper table: {s['paper_table']}. Lowest effective TFLOP/s of the 10-50% rows at "
              f"scale 12 alone: {_fmt(s['min_tflops_density_10_to_50_scale12'], '.0f')}.", "",
              "| metric | value | target | met |", "|---|---|---|---|"]
    for key in TARGETS:
        lines.append(f"| {key} | {_fmt(s[key])} | {s['targets'][key]} | {'yes' if s['met'][key] else 'NO'} |")
    lines += [f"| {key} | {_fmt(v)} | - | - |" for key, v in s.items()
              if key.startswith(("triton_", "fa4_", *(f"{library}_" for library in LIBRARIES)))]
    return "\n".join(lines) + "\n"


def run_kernel_bench(out_dir: str = "benchmarks", command: str = "sparvar bench kernels", models=tuple(MODELS),
                     scales=SCALES, cuda_graphs: bool = False) -> dict:
    """Run the comparisons of `models` and `scales`, write kernels.json and kernels.md under
    out_dir, return the result. cuda_graphs: time every contender replayed from a CUDA graph."""
    if not torch.cuda.is_available():
        raise SparvarError("the kernel benchmark needs a CUDA GPU")
    torch.manual_seed(0)
    flex = _Flex()
    fa4 = installed("flash_attn.cute", "flash-attn-4", "FA4")
    libraries = tuple(name for name, (module, package, _) in LIBRARIES.items()
                      if installed(module, package, name))
    rows = []
    for model in models:
        for scale in scales:
            rows += bench_sparse(model, scale, flex, fa4, cuda_graphs, libraries)
    for model in models:
        rows.append(bench_decision(model, cuda_graphs))
    result = {**provenance(command), "cuda_graphs": cuda_graphs, "rows": rows, "summary": summarize(rows)}
    write(out_dir, "kernels", result, to_markdown(result))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="sparvar bench kernels", description=__doc__.splitlines()[0],
                            formatter_class=HelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                        help="Infinity sizes whose head counts run")
    parser.add_argument("--scales", nargs="+", type=int, default=list(SCALES), choices=SCALES,
                        help="query scales of the 1024x1024 schedule")
    parser.add_argument("--out-dir", default="benchmarks", help="folder for kernels.json and kernels.md")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="time each call replayed from a CUDA graph, as generations run them, instead of "
                             "launched from the host")
    args = parser.parse_args(argv)
    run_kernel_bench(args.out_dir, command_line("sparvar bench kernels", argv), args.models, args.scales,
                     args.cuda_graphs)


if __name__ == "__main__":
    main()

"""Tuning sweep for the Triton kernels: tile shapes, pipeline depth, load path, and variants that
isolate one cost each. Prints one line per variant and appends JSON lines to --out (a run's first
line: its provenance, bench/common.py); the numbers and what they showed are in
benchmarks/kernels_notes.md.
Run: sparvar bench kernel-variants [--out variants.jsonl] [--sections sparse,probe,...]
"""

from __future__ import annotations

import json
import math

import torch

from sparvar import files
from sparvar.attention.tables import BlockTable
from sparvar.bench.common import command_line, provenance
from sparvar.bench.kernels import (
    HEAD_DIM, _to, covered_pairs, make_inputs, paper_csla_table, random_table, rel_err, tflops, time_ms,
)
from sparvar.errors import SparvarError
from sparvar.options import ArgumentParser, HelpFormatter
from sparvar.schedules import infinity_schedule

SECTIONS = ("sparse", "probe", "gather", "decision", "fp8", "warp_specialize", "quantise")
SM = 1 / math.sqrt(HEAD_DIM)


def gather_table(q_len: int, kv_len: int, group: int, tokens: int) -> BlockTable:
    """CS4A-like column-sparse plan: per query group, `tokens` sorted random key tokens."""
    n = -(-q_len // group)
    idx = torch.stack([torch.randperm(kv_len)[:tokens].sort().values for _ in range(n)]).int()
    return BlockTable(torch.full((1, 1, n), tokens, dtype=torch.int32), idx[None, None], group, 1, q_len, kv_len)


def _sdpa_flash(q, k, v) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=SM))


def sparse_configs(record, heads: int, scale: int) -> None:
    """Tile shapes, pipeline depth and load path on random and CSLA tables."""
    from sparvar.kernels.sparse_attention import triton_sparse_attention

    sched = infinity_schedule("1:1", 1024)
    q_len, kv_len = sched.lengths[scale], sched.kv_length(scale)
    q, k, v = make_inputs(heads, q_len, kv_len)
    flash = _sdpa_flash(q, k, v)
    record(scale=scale, variant="sdpa_flash", ms=flash, tflops=tflops(q_len * kv_len, heads, flash))
    tables = {"paper": _to(paper_csla_table(scale, "cpu")[0], "cuda")}
    for d in (0.10, 0.25, 0.50, 1.0):
        tables[f"{d:.0%}"] = _to(random_table(q_len, kv_len, d), "cuda")
    configs = [
        ("bm64 bn64 st3 (default)", {}),
        ("bm64 bn64 st4", dict(num_stages=4)),
        ("bm64 bn64 st3 pointers", dict(tma=False)),
        ("bm128 bn64 st2 maxnreg128", dict(block_m=128, num_stages=2, maxnreg=128)),
        ("bm128 bn128 st3", dict(block_m=128, block_n=128)),
    ]
    for name, table in tables.items():
        pairs = covered_pairs(table)
        ref = triton_sparse_attention(q, k, v, table, SM, tma=False)
        for label, kw in configs:
            fn = lambda: triton_sparse_attention(q, k, v, table, SM, **kw)  # noqa: E731
            ms = time_ms(fn)
            record(scale=scale, table=name, variant=label, ms=ms, tflops=tflops(pairs, heads, ms), err=rel_err(fn(), ref))


def overhead_probe(record, heads: int, scale: int) -> None:
    """Tables of 1, 2 and 4 key blocks per query block: the time a block adds, and what a
    program costs besides its blocks (load q, start the pipeline, store the output)."""
    from sparvar.kernels.sparse_attention import triton_sparse_attention

    sched = infinity_schedule("1:1", 1024)
    q_len, kv_len = sched.lengths[scale], sched.kv_length(scale)
    q, k, v = make_inputs(heads, q_len, kv_len)
    nk = -(-kv_len // 128)
    times = {}
    for blocks in (1, 2, 4):
        table = _to(random_table(q_len, kv_len, blocks / nk), "cuda")
        times[blocks] = time_ms(lambda: triton_sparse_attention(q, k, v, table, SM))
        record(scale=scale, variant=f"probe {blocks} key blocks per row", ms=times[blocks],
               tflops=tflops(covered_pairs(table), heads, times[blocks]))
    per_block = (times[4] - times[1]) / 3
    record(scale=scale, variant="probe: ms per key block (all rows)", ms=per_block,
           fixed_ms=times[1] - per_block, fixed_share_at_4=(times[1] - per_block) / times[4])


def gather_configs(record, heads: int) -> None:
    """Column-sparse (gather) mode, CS4A-like: 192-query groups, ~20% of the key tokens."""
    from sparvar.kernels.sparse_attention import triton_sparse_attention

    sched = infinity_schedule("1:1", 1024)
    q_len, kv_len = sched.lengths[12], sched.kv_length(12)
    q, k, v = make_inputs(heads, q_len, kv_len)
    table = _to(gather_table(q_len, kv_len, 192, 2128), "cuda")
    for label, kw in [("gather bm64 bn64 st3 (default)", {}), ("gather bn64 st2", dict(num_stages=2)),
                      ("gather bn128 st2", dict(block_n=128, num_stages=2))]:
        ms = time_ms(lambda: triton_sparse_attention(q, k, v, table, SM, **kw))
        record(scale=12, table="gather 2128 tok / 192 q", variant=label, ms=ms, tflops=tflops(q_len * 2128, heads, ms))


def decision_configs(record, heads: int) -> None:
    """The decision call at scale 10: its dense part alone, then the whole call."""
    from sparvar.kernels.decision import dense_table, triton_attention_colsum
    from sparvar.kernels.sparse_attention import triton_sparse_attention

    sched = infinity_schedule("1:1", 1024)
    q_len, kv_len = sched.lengths[10], sched.kv_length(10)
    q, k, v = make_inputs(heads, q_len, kv_len)
    flash = _sdpa_flash(q, k, v)
    record(scale=10, variant="decision: sdpa_flash", ms=flash)
    dense = dense_table(q_len, kv_len, 64, q.device)
    ms = time_ms(lambda: triton_sparse_attention(q, k, v, dense, SM, return_lse=True))
    record(scale=10, variant="decision: dense part alone (out + lse)", ms=ms, over_flash=ms / flash)
    runs = [(192, {}), (192, dict(num_warps=8)), (192, dict(num_stages=2)), (192, dict(key_tile=64)),
            (192, dict(tma=False)), (128, {}), (128, dict(num_warps=8, num_stages=2))]
    for group, kw in runs:
        ms = time_ms(lambda: triton_attention_colsum(q, k, v, group, SM, **kw))
        record(scale=10, variant=f"decision group{group} {kw}", ms=ms, over_flash=ms / flash)


def fp8_configs(record, heads: int, scale: int) -> None:
    """FP8 q, k (and v) against bf16 on the same tables: time (the quantising pass of q, k, v
    timed apart, since an FP8 KV cache and a fused qkv kernel would make it free) and error."""
    from sparvar.kernels.decision import triton_attention_colsum
    from sparvar.kernels.sparse_attention import quantize_heads, triton_sparse_attention

    sched = infinity_schedule("1:1", 1024)
    q_len, kv_len = sched.lengths[scale], sched.kv_length(scale)
    q, k, v = make_inputs(heads, q_len, kv_len)
    q = torch.nn.functional.normalize(q.float(), dim=-1).to(q.dtype) * 4  # cosine attention's range
    k = torch.nn.functional.normalize(k.float(), dim=-1).to(k.dtype)
    (q8, qs), (k8, ks), (v8, vs) = quantize_heads(q), quantize_heads(k), quantize_heads(v)
    record(scale=scale, variant="fp8: quantise q, k, v (3 passes)",
           ms=time_ms(lambda: (quantize_heads(q), quantize_heads(k), quantize_heads(v))))
    tables = {"paper": _to(paper_csla_table(scale, "cpu")[0], "cuda")}
    for d in (0.10, 0.25, 0.50, 1.0):
        tables[f"{d:.0%}"] = _to(random_table(q_len, kv_len, d), "cuda")
    variants = [("bf16 (default)", (q, k, v), {}), ("fp8 qk", (q8, k8, v), dict(q_scale=qs, k_scale=ks)),
                ("fp8 qkv", (q8, k8, v8), dict(q_scale=qs, k_scale=ks, v_scale=vs))]
    for name, table in tables.items():
        pairs = covered_pairs(table)
        ref = triton_sparse_attention(q, k, v, table, 1.0)
        for label, args, kw in variants:
            fn = lambda: triton_sparse_attention(*args, table, 1.0, **kw)  # noqa: E731
            ms = time_ms(fn)
            record(scale=scale, table=name, variant=label, ms=ms, tflops=tflops(pairs, heads, ms), err=rel_err(fn(), ref))
    if scale == 10:
        ref = triton_attention_colsum(q, k, v, 192, 1.0)
        for label, args, kw in variants:
            fn = lambda: triton_attention_colsum(*args, 192, 1.0, **kw)  # noqa: E731
            ms = time_ms(fn)
            out, colsum = fn()
            record(scale=10, variant=f"decision {label}", ms=ms, err=rel_err(out, ref[0]), colsum_err=rel_err(colsum, ref[1]))


def warp_specialize_configs(record, heads: int, scale: int) -> None:
    """Triton's automatic warp specialisation of the bf16 block loop, against the default."""
    from sparvar.kernels.sparse_attention import triton_sparse_attention

    sched = infinity_schedule("1:1", 1024)
    q_len, kv_len = sched.lengths[scale], sched.kv_length(scale)
    q, k, v = make_inputs(heads, q_len, kv_len)
    tables = {"paper": _to(paper_csla_table(scale, "cpu")[0], "cuda"), "100%": _to(random_table(q_len, kv_len, 1.0), "cuda")}
    for name, table in tables.items():
        pairs = covered_pairs(table)
        ref = triton_sparse_attention(q, k, v, table, SM)
        for label, kw in [("bm64 bn64 st3 (default)", {}), ("warp_specialize", dict(warp_specialize=True)),
                          ("bm128 bn128 warp_specialize", dict(block_m=128, block_n=128, warp_specialize=True))]:
            try:
                fn = lambda: triton_sparse_attention(q, k, v, table, SM, **kw)  # noqa: E731
                ms = time_ms(fn)
                record(scale=scale, table=name, variant=label, ms=ms, tflops=tflops(pairs, heads, ms), err=rel_err(fn(), ref))
            except Exception as err:  # a compiler that refuses the variant is a result too
                record(scale=scale, table=name, variant=label, error=f"{type(err).__name__}: {err}"[:300])


def quantise_configs(record, width: int = 3584, hidden: int = 14336) -> None:
    """The FP8 blocks' quantising passes (`quantize_rows_triton`) at Infinity-8B's sizes: the
    attention output (width, plain) and fc1's output (hidden, with GELU), at scale 8's and the last
    scale's rows (batch 1 with CFG): chunk and warps, in GB/s of bf16 read plus FP8 written."""
    from sparvar.kernels.fp8 import quantize_rows_reference, quantize_rows_triton

    for k, gelu in ((width, False), (hidden, True)):
        for rows in (288, 8192):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) * 3
            ref = quantize_rows_reference(x, gelu).data.float()
            for chunk in (1024, 2048, 4096, 16384):  # 4096 for the width, 16384 for fc1's: a whole row
                for warps in (2, 4, 8, 16):
                    if chunk > 2 * k:
                        continue
                    fn = lambda: quantize_rows_triton(x, gelu, chunk=chunk, num_warps=warps)  # noqa: E731
                    ms = time_ms(fn)
                    changed = float((fn().data.float() != ref).float().mean())
                    record(variant=f"quantise k{k}{' gelu' if gelu else ''} rows{rows} chunk{chunk} warps{warps}",
                           ms=ms, gbps=rows * k * 3 / ms / 1e6, changed=changed)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="sparvar bench kernel-variants", description=__doc__.splitlines()[0],
                            formatter_class=HelpFormatter)
    parser.add_argument("--out", default="variants.jsonl", help="JSON lines file the run is appended to")
    parser.add_argument("--heads", type=int, default=28, help="attention heads (Infinity-8B: 28)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated sweeps to run")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SparvarError("the kernel sweep needs a CUDA GPU")
    torch.manual_seed(0)

    def record(**row):  # a line of the file per row, appended whole
        files.append_lines(args.out, [json.dumps(row)])
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    record(**provenance(command_line("sparvar bench kernel-variants", argv)))

    sections = args.sections.split(",")
    for scale in (12, 10):
        if "sparse" in sections:
            sparse_configs(record, args.heads, scale)
        if "probe" in sections:
            overhead_probe(record, args.heads, scale)
        if "fp8" in sections:
            fp8_configs(record, args.heads, scale)
        if "warp_specialize" in sections:
            warp_specialize_configs(record, args.heads, scale)
    if "gather" in sections:
        gather_configs(record, args.heads)
    if "decision" in sections:
        decision_configs(record, args.heads)
    if "quantise" in sections:
        quantise_configs(record)


if __name__ == "__main__":
    main()

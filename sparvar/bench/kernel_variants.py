"""Tuning sweep for the Triton kernels: tile sizes, pipeline depth, launch order, and variants
that isolate one cost each. Prints one line per variant and appends JSON lines to --out.
Run: python -m sparvar.bench.kernel_variants [--out variants.jsonl]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from sparvar.attention.tables import BlockTable
from sparvar.bench.kernels import (
    BLOCK, HEAD_DIM, _to, covered_pairs, make_inputs, paper_csla_table, random_table, rel_err, tflops, time_ms,
)
from sparvar.schedules import infinity_schedule


def _split_rows(table: BlockTable, q_block: int) -> BlockTable:
    """The same plan with smaller query blocks (each row repeated)."""
    r = table.q_block // q_block
    counts = table.counts.repeat_interleave(r, dim=-1)[..., : -(-table.q_len // q_block)]
    indices = table.indices.repeat_interleave(r, dim=-2)[..., : counts.shape[-1], :]
    return BlockTable(counts, indices, q_block, table.key_block, table.q_len, table.kv_len)


def gather_table(q_len: int, kv_len: int, group: int, tokens: int) -> BlockTable:
    """CS4A-like column-sparse plan: per query group, `tokens` sorted random key tokens."""
    n = -(-q_len // group)
    idx = torch.stack([torch.randperm(kv_len)[:tokens].sort().values for _ in range(n)]).int()
    return BlockTable(torch.full((1, 1, n), tokens, dtype=torch.int32), idx[None, None], group, 1, q_len, kv_len)


def main() -> None:
    from sparvar.attention.triton_decision import triton_attention_colsum
    from sparvar.attention.triton_sparse import triton_sparse_attention

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="variants.jsonl")
    parser.add_argument("--heads", type=int, default=28)
    args = parser.parse_args()
    torch.manual_seed(0)
    sched = infinity_schedule("1:1", 1024)
    heads = args.heads
    out = open(args.out, "a")
    sm = 1 / math.sqrt(HEAD_DIM)

    def record(**row):
        out.write(json.dumps(row) + "\n")
        out.flush()
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    for scale in (12, 10):
        q_len, kv_len = sched.lengths[scale], sched.kv_length(scale)
        q, k, v = make_inputs(heads, q_len, kv_len)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=sm))
        record(scale=scale, variant="sdpa_flash", ms=flash, tflops=tflops(q_len * kv_len, heads, flash))
        tables = {"paper": _to(paper_csla_table(scale, "cpu")[0], "cuda")}
        for d in (0.10, 0.25, 0.50, 1.0):
            tables[f"{d:.0%}"] = _to(random_table(q_len, kv_len, d), "cuda")
        for name, table in tables.items():
            pairs = covered_pairs(table)
            ref = triton_sparse_attention(q, k, v, table, sm, tma=False)
            configs = [
                ("bm64 bn64 st3 (default)", {}),
                ("bm64 bn64 st4", dict(num_stages=4)),
                ("bm64 bn64 st3 pointers", dict(tma=False)),
                ("bm128 bn64 st2 maxnreg128", dict(block_m=128, num_stages=2, maxnreg=128)),
                ("bm128 bn128 st3", dict(block_m=128, block_n=128)),
            ]
            for label, kw in configs:
                fn = lambda: triton_sparse_attention(q, k, v, table, sm, **kw)  # noqa: E731
                ms = time_ms(fn)
                record(scale=scale, table=name, variant=label, ms=ms, tflops=tflops(pairs, heads, ms),
                       err=rel_err(fn(), ref))

    # column-sparse (gather) mode, CS4A-like: 192-query groups, ~20% of key tokens
    q_len, kv_len = sched.lengths[12], sched.kv_length(12)
    q, k, v = make_inputs(heads, q_len, kv_len)
    gt = _to(gather_table(q_len, kv_len, 192, 2128), "cuda")
    pairs = q_len * 2128
    for label, kw in [("gather bm64 bn64 st3 (default)", {}), ("gather bn64 st2", dict(num_stages=2)),
                      ("gather bn128 st2", dict(block_n=128, num_stages=2))]:
        ms = time_ms(lambda: triton_sparse_attention(q, k, v, gt, sm, **kw))
        record(scale=12, table="gather 2128 tok / 192 q", variant=label, ms=ms, tflops=tflops(pairs, heads, ms))

    # decision call at scale 10: its dense part alone, then the whole call with column-sum tiles
    from sparvar.attention.triton_decision import dense_table

    q_len, kv_len = sched.lengths[10], sched.kv_length(10)
    q, k, v = make_inputs(heads, q_len, kv_len)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=sm))
    record(scale=10, variant="decision: sdpa_flash", ms=flash)
    dense = dense_table(q_len, kv_len, 64, q.device)
    ms = time_ms(lambda: triton_sparse_attention(q, k, v, dense, sm, return_lse=True))
    record(scale=10, variant="decision: dense part alone (out + lse)", ms=ms, over_flash=ms / flash)
    runs = [(192, {}), (192, dict(num_warps=8)), (192, dict(num_stages=2)), (192, dict(key_tile=64)),
            (192, dict(tma=False)), (128, {}), (128, dict(num_warps=8, num_stages=2))]
    for group, kw in runs:
        ms = time_ms(lambda: triton_attention_colsum(q, k, v, group, sm, **kw))
        record(scale=10, variant=f"decision group{group} {kw}", ms=ms, over_flash=ms / flash)
    out.close()


if __name__ == "__main__":
    main()

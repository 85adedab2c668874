"""A block-sparse attention kernel written in TileLang (PyPI `tilelang`) over block tables: a
contender that `sparvar bench kernels` races where the package is installed (issue 25 asks for one
beside FlashAttention-4 and FlashInfer); no generation runs it.

One program per (query block, head, batch item) walks its table row as FlashAttention does: for
each listed key block, the scores by a matrix product, the online softmax in registers (base 2),
then the values' product. On Hopper, TileLang lowers the loop to a producer warp group that loads
K and V by TMA a few blocks ahead and two consumer warp groups on wgmma; the query tile is loaded
by all threads before they split. Keys past the sequence's end in its last block score -inf; a
query block that lists nothing writes zeros.

TileLang compiles with nvcc at first use; a kernel is built per shape (batch, heads, lengths, head
dim, blocks, dtype, scale), and every row's list is padded to all key units, so the tables of one
shape share one build. The bench counts the build as the first call's time.
"""

# no `from __future__ import annotations`: TileLang reads the kernel's tensor annotations as objects
from functools import lru_cache
from typing import Callable

import torch

from sparvar.attention.tables import BlockTable
from sparvar.errors import SparvarError

LOG2_E = 1.4426950408889634
PIPELINE_STAGES = 2
DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def tilelang_tables(table: BlockTable, batch: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's counts (B, H, query blocks) and indices (B, H, query blocks, key units), int32:
    `table` expanded over `batch` x `heads`, its entries past each count set to 0 (the pipeline may
    read one ahead of the count; it never uses it)."""
    if table.key_block == 1:
        raise SparvarError("the TileLang kernel has no form for gathered key lists (key_block 1); "
                           "use the triton backend for them")
    table.check_spans(batch, heads)
    nq, m = table.indices.shape[2:]
    units = table.num_kv_units
    listed = torch.arange(m, device=table.indices.device) < table.counts[..., None].to(torch.long)
    indices = torch.where(listed, table.indices, 0).to(torch.int32)[..., :units]
    indices = torch.nn.functional.pad(indices, (0, units - indices.shape[-1]))
    counts = table.counts.to(torch.int32).expand(batch, heads, nq).contiguous()
    return counts, indices.expand(batch, heads, nq, units).contiguous()


@lru_cache(maxsize=None)
def _kernel(b: int, h: int, lq: int, lk: int, d: int, q_block: int, key_block: int, scale: float, dtype: str,
            arch: str, q_strides: tuple[int, ...], kv_strides: tuple[int, ...]):
    """The kernel for one shape and layout (q's strides; k's and v's, which may be length views of a
    longer cache), compiled for `arch` ("sm_90a"): (Q, K, V, counts, indices) -> output."""
    import tilelang
    import tilelang.language as T

    nq, units = -(-lq // q_block), -(-lk // key_block)
    bm, bn, acc = q_block, key_block, "float"
    scale2 = scale * LOG2_E
    ragged = lk % bn != 0

    @T.prim_func
    def attend(Q: T.StridedTensor((b, h, lq, d), q_strides, dtype),
               K: T.StridedTensor((b, h, lk, d), kv_strides, dtype),
               V: T.StridedTensor((b, h, lk, d), kv_strides, dtype), Counts: T.Tensor((b, h, nq), "int32"),
               Indices: T.Tensor((b, h, nq, units), "int32"), Out: T.Tensor((b, h, lq, d), dtype)):
        with T.Kernel(nq, h, b, threads=2 * bm) as (qb, head, item):
            q_s = T.alloc_shared((bm, d), dtype)
            k_s = T.alloc_shared((bn, d), dtype)
            v_s = T.alloc_shared((bn, d), dtype)
            o_s = T.alloc_shared((bm, d), dtype)
            scores = T.alloc_fragment((bm, bn), acc)
            probs = T.alloc_fragment((bm, bn), dtype)
            out = T.alloc_fragment((bm, d), acc)
            row_max = T.alloc_fragment((bm,), acc)
            prev_max = T.alloc_fragment((bm,), acc)
            rescale = T.alloc_fragment((bm,), acc)
            block_sum = T.alloc_fragment((bm,), acc)
            row_sum = T.alloc_fragment((bm,), acc)
            # not by TMA: a query block that lists nothing never waits for that load, and its output
            # tile shares q_s's memory, so the load could land on its zeros (or after it exits);
            # 16 bytes a load, which TileLang otherwise drops to 2 where the threads do not divide the tile
            T.copy(Q[item, head, qb * bm:(qb + 1) * bm, :], q_s, coalesced_width=8, annotations={"disable_tma": True})
            T.fill(out, 0)
            T.fill(row_sum, 0)
            T.fill(row_max, -T.infinity(acc))
            for t in T.Pipelined(Counts[item, head, qb], num_stages=PIPELINE_STAGES):
                kb = Indices[item, head, qb, t]
                T.copy(K[item, head, kb * bn:(kb + 1) * bn, :], k_s)
                T.clear(scores)
                T.gemm(q_s, k_s, scores, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                if ragged:
                    for i, j in T.Parallel(bm, bn):
                        scores[i, j] = T.if_then_else(kb * bn + j < lk, scores[i, j], -T.infinity(acc))
                T.copy(row_max, prev_max)
                T.reduce_max(scores, row_max, dim=1, clear=False)
                for i in T.Parallel(bm):
                    rescale[i] = T.exp2(prev_max[i] * scale2 - row_max[i] * scale2)
                for i, j in T.Parallel(bm, bn):
                    scores[i, j] = T.exp2(scores[i, j] * scale2 - row_max[i] * scale2)
                T.reduce_sum(scores, block_sum, dim=1)
                for i in T.Parallel(bm):
                    row_sum[i] = row_sum[i] * rescale[i] + block_sum[i]
                T.copy(scores, probs)
                for i, j in T.Parallel(bm, d):
                    out[i, j] *= rescale[i]
                T.copy(V[item, head, kb * bn:(kb + 1) * bn, :], v_s)
                T.gemm(probs, v_s, out, policy=T.GemmWarpPolicy.FullRow)
            for i, j in T.Parallel(bm, d):
                out[i, j] = T.if_then_else(row_sum[i] > 0, out[i, j] / row_sum[i], 0)
            T.copy(out, o_s)
            T.copy(o_s, Out[item, head, qb * bm:(qb + 1) * bm, :])

    return tilelang.compile(attend, out_idx=[5], target={"kind": "cuda", "arch": arch})


def tilelang_runner(q: torch.Tensor, k: torch.Tensor, table: BlockTable,
                    softmax_scale: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The kernel built for `table` and the shapes and strides of q (B, H, Lq, D) and k (B, H, Lk, D):
    a function of (q, k, v) so laid out (v as k) giving the attention output (B, H, Lq, D), dense.
    Needs CUDA and the package."""
    table.check_fits(q, k)
    if q.dtype not in DTYPES or k.dtype != q.dtype:
        raise SparvarError(f"the TileLang kernel runs fp16 or bf16 inputs of one dtype, not {q.dtype} and {k.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise SparvarError("the TileLang kernel reads heads stored contiguously (last stride 1)")
    if table.q_block not in (64, 128) or table.key_block % 16 or table.key_block > 128 or q.shape[-1] not in (64, 128):
        raise SparvarError(f"the TileLang kernel runs query blocks of 64 or 128, key blocks of 16-128 in steps "
                           f"of 16 and heads of 64 or 128, not {table.q_block}, {table.key_block} and {q.shape[-1]}")
    b, h, lq, d = q.shape
    counts, indices = tilelang_tables(table, b, h)
    major, minor = torch.cuda.get_device_capability(q.device)
    arch = f"sm_{major}{minor}" + ("a" if major >= 9 else "")  # Hopper's wgmma and TMA need sm_90a
    kernel = _kernel(b, h, lq, k.shape[2], d, table.q_block, table.key_block, float(softmax_scale),
                     DTYPES[q.dtype], arch, q.stride(), k.stride())
    return lambda q, k, v: kernel(q, k, v, counts, indices)

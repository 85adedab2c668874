"""One entry for sparse attention over a BlockTable; picks a backend by device and table form.

Backends: "triton" (our kernels, CUDA), "fa4" (FlashAttention-4's block-sparse kernel, Hopper,
where flash-attn-4 is installed; fa4.py), "flex" (FlexAttention for block tables, CUDA; gathered
key lists go to "gather"), "cpu" (SDPA over key slices or copied key rows, reading the table on
the host; cpu.py), "gather" (per query block, SDPA over gathered keys; any device, no host sync,
so it runs inside CUDA graphs), "reference" (masked float32 attention; the definition, for
tests). "auto" takes fa4 where `prefers_fa4` says so, else triton for fp16/bf16 on CUDA, the
reference where the log-sum-exp is asked for, and otherwise cpu on the CPU and gather elsewhere.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

import torch

from sparvar.attention.fa4 import fa4_measured_for, fa4_runs_here
from sparvar.attention.tables import BlockTable, reference_sparse_attention
from sparvar.errors import SparvarError

BACKENDS = ("auto", "reference", "triton", "fa4", "flex", "cpu", "gather")

# Measured on one H100 (benchmarks/hopper_2026-12-06/kernels_8b.md, 8B, heads of 128): FA4 beat our
# kernel on every table at 2,304 and 4,096 queries (1.2-1.45x), and lost on the 5-10% tables at 1,600.
FA4_MIN_QUERIES = 2048


@lru_cache(maxsize=None)
def importable(module: str) -> bool:
    """Whether an optional package of a backend ("triton", "flash_attn.cute") is installed."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def prefers_fa4(q_shape: torch.Size, dtype: torch.dtype, table: BlockTable | None, capability: tuple[int, int],
                lse: bool = False) -> bool:
    """Whether "auto" runs FA4 for queries of q_shape (B, H, Lq, D) over `table` on a GPU of that
    compute capability: where it was measured faster than ours (Hopper, heads of 128, FA4_MIN_QUERIES
    queries or more) and has a form for the table (fa4.py); never for the log-sum-exp."""
    return (table is not None and not lse and fa4_measured_for(q_shape, dtype, capability)
            and q_shape[-2] >= FA4_MIN_QUERIES and table.key_block != 1
            and table.q_block % 64 == 0 and table.key_block % 16 == 0 and table.key_block <= 128)


def resolve_backend(backend: str, q: torch.Tensor, table: BlockTable | None = None, lse: bool = False) -> str:
    """The backend that will run for q and `table` (module docstring); `lse`: the log-sum-exp is asked for."""
    if backend not in BACKENDS:
        raise SparvarError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if (q.is_cuda and prefers_fa4(q.shape, q.dtype, table, torch.cuda.get_device_capability(q.device), lse)
                and importable("flash_attn.cute")):
            return "fa4"
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and importable("triton"):
            return "triton"
        if lse:
            return "reference"
        return "cpu" if q.device.type == "cpu" else "gather"
    if backend == "flex" and table is not None and table.key_block == 1:
        return "gather"
    if backend == "fa4" and not fa4_runs_here(q):
        raise SparvarError("the fa4 backend runs on a Hopper GPU with flash-attn-4 installed, on fp16/bf16 "
                           "heads of 128; use auto or triton here")
    return backend


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: BlockTable,
    scale: float,
    backend: str = "auto",
    return_lse: bool = False,
):
    """Attention of q (B, H, Lq, D) over the keys `table` lists for each query block.

    Returns out, or (out, lse (B, H, Lq) float32) with return_lse (triton and reference only).
    """
    table.check_fits(q, k)  # on every backend
    backend = resolve_backend(backend, q, table, return_lse)
    if backend == "triton":
        from sparvar.kernels.sparse_attention import triton_sparse_attention

        return triton_sparse_attention(q, k, v, table, scale, return_lse)
    if return_lse and backend != "reference":
        raise SparvarError(f"the {backend} backend does not return the log-sum-exp; use triton or reference")
    if backend == "fa4":
        from sparvar.attention.fa4 import fa4_attention, fa4_block_sparsity

        return fa4_attention(q, k, v, fa4_block_sparsity(table), scale)
    if backend == "flex":
        from sparvar.attention.flex import flex_attention

        return flex_attention(q, k, v, table, scale)
    if backend == "cpu":
        from sparvar.attention.cpu import cpu_sparse_attention

        return cpu_sparse_attention(q, k, v, table, scale)
    if backend == "gather":
        from sparvar.attention.gather import gather_attention

        return gather_attention(q, k, v, table, scale)
    return reference_sparse_attention(q, k, v, table, scale, return_lse)

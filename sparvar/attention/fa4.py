"""FlashAttention-4 (PyPI `flash-attn-4`, CuTe DSL kernels) over block tables, for Hopper GPUs.

FA4's forward takes FlexAttention-style block sparsity (`BlockSparseTensorsTorch`): per (batch,
head, query block) a count and a list of "mask" key blocks (a mask_mod runs inside them) and of
"full" ones (computed whole). A BlockTable lists whole blocks, so every entry becomes a full block
and the mask lists stay empty. What the conversion must respect, read off FA4's source
(flash_attn/cute, 4.0.0b36):
- a query block's list is walked from its last entry to its first, and keys past the sequence's
  end are masked only in the first block walked: lists must ascend, so that the block holding the
  end of the keys, where listed, comes last;
- on Hopper with heads of 128 the kernel's tiles are 128 x 128; a key block must equal the tile's
  width or be a multiple of 16 below it, and a query block a multiple of 64;
- its token gather (`gather_kv_indices`) serves only its MLA path (with `qv`), so gathered tables
  (key_block 1, CS4A's) have no FA4 form.

`fa4_block_sparsity` converts a table on any device (tested on the CPU against the table's token
mask); `fa4_attention` calls FA4. That call needs CUDA and the package, so it does not run in this
project's CPU tests: `sparvar bench kernels` times it and checks it against our kernel on a GPU
where flash-attn-4 is installed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sparvar.attention.tables import BlockTable
from sparvar.errors import SparvarError


class Fa4Blocks(NamedTuple):
    """FA4's block-sparse inputs, named as its `BlockSparseTensorsTorch` fields (int32 tensors)."""

    mask_block_cnt: torch.Tensor  # (B|1, H|1, num_q_blocks): zeros
    mask_block_idx: torch.Tensor  # (B|1, H|1, num_q_blocks, 1): unread
    full_block_cnt: torch.Tensor  # (B|1, H|1, num_q_blocks)
    full_block_idx: torch.Tensor  # (B|1, H|1, num_q_blocks, entries): ascending within each count
    block_size: tuple[int, int]  # (query block, key block)


def fa4_block_sparsity(table: BlockTable) -> Fa4Blocks:
    """FA4's block-sparse inputs for `table`: its listed key blocks as full blocks, ascending."""
    if table.key_block == 1:
        raise SparvarError("FlashAttention-4 has no form for gathered key lists (key_block 1): its token "
                           "gather serves MLA only; use the triton backend for them")
    if table.q_block % 64 or table.key_block % 16 or table.key_block > 128:
        raise SparvarError(f"FlashAttention-4 on Hopper needs query blocks of a multiple of 64 and key blocks "
                           f"of a multiple of 16 up to 128, not {table.q_block} x {table.key_block}")
    units = table.num_kv_units
    indices = table.indices[..., :units].long()
    listed = torch.arange(indices.shape[-1], device=indices.device) < table.counts[..., None]
    # unlisted entries sort past every unit, then read as 0 (FA4 reads only the first `count`)
    ordered = torch.where(listed, indices, units).sort(dim=-1).values
    full_idx = torch.where(ordered < units, ordered, 0).to(torch.int32).contiguous()
    counts = table.counts.to(torch.int32).contiguous()
    return Fa4Blocks(torch.zeros_like(counts), torch.zeros_like(full_idx[..., :1]), counts, full_idx,
                     (table.q_block, table.key_block))


def fa4_measured_for(q_shape: torch.Size, dtype: torch.dtype, capability: tuple[int, int]) -> bool:
    """Queries FA4 was measured on (benchmarks/hopper_2026-12-06/kernels_8b.md): a Hopper GPU
    (compute capability 9.0), fp16/bf16, heads of 128."""
    return capability == (9, 0) and dtype in (torch.float16, torch.bfloat16) and q_shape[-1] == 128


def fa4_runs_here(q: torch.Tensor) -> bool:
    """Whether FA4 would run for q on its device: a GPU it was measured on, flash-attn-4 installed."""
    from sparvar.attention.sparse import importable

    return (q.is_cuda and fa4_measured_for(q.shape, q.dtype, torch.cuda.get_device_capability(q.device))
            and importable("flash_attn.cute"))


def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: Fa4Blocks | None,
                  scale: float) -> torch.Tensor:
    """Attention of q (B, H, Lq, D) over k, v (B, H, Lk, D) through FA4: over the key blocks
    `blocks` lists (fa4_block_sparsity), or dense where it is None. Needs flash-attn-4 and a
    CUDA GPU; not run by the CPU tests (module docstring)."""
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    sparse = None if blocks is None else BlockSparseTensorsTorch(**blocks._asdict())
    out, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                             block_sparse_tensors=sparse)
    return out.transpose(1, 2)

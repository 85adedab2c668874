"""FlashInfer's block-sparse attention (PyPI `flashinfer-python`) over block tables: a contender
that `sparvar bench kernels` races where the package is installed (issue 25 asks for it beside
FlashAttention-4 and ours); no generation runs it.

Its `VariableBlockSparseAttentionWrapper` (read off flashinfer 0.7.4) plans once for a boolean
block mask per kv head, shaped (heads, row blocks, column blocks), and the size of every row and
column block; `run` then takes q (heads, Lq, D) and k, v (heads, Lk, D). It has no batch axis, so
a batch folds into the heads: B*H masks, q as (B*H, Lq, D). A BlockTable's mask is its listed key
units; its blocks are q_block by key_block, the last of each axis cut at the sequence's end.
Gathered tables (key_block 1, CS4A's) would need a column per key: refused. FlashInfer compiles
its kernels at first use (JIT with nvcc), which the bench counts as the first call's time.

Read off its source, two things may limit it here. Outside its `cake` backend the wrapper lists
every key of a row's blocks as a page of one token, a gather; its `cake` backend (Hopper, heads of
128, bf16) takes 64-token blocks and at most 64 of them per query block. And its other wrapper,
`BlockSparseAttentionWrapper` (one block pattern for all heads), needs the key length divisible by
the block width, which Infinity's (10,521 keys at 8B's last scale) is not without padding.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from sparvar.attention.tables import BlockTable
from sparvar.errors import SparvarError

WORKSPACE_BYTES = 128 * 2**20  # the float workspace FlashInfer's documentation recommends


class FlashInferBlocks(NamedTuple):
    """The block-sparse plan's inputs, named as `VariableBlockSparseAttentionWrapper.plan` names them."""

    block_mask_map: torch.Tensor  # bool (B*H, row blocks, column blocks)
    block_row_sz: torch.Tensor  # int32 (B*H, row blocks): tokens in each query block
    block_col_sz: torch.Tensor  # int32 (B*H, column blocks): tokens in each key block


def _sizes(length: int, block: int, count: int, heads: int, device) -> torch.Tensor:
    sizes = torch.full((count,), block, dtype=torch.int32, device=device)
    sizes[-1] = length - (count - 1) * block
    return sizes.expand(heads, count).contiguous()


def flashinfer_blocks(table: BlockTable, batch: int, heads: int) -> FlashInferBlocks:
    """FlashInfer's inputs for `table` over `batch` x `heads` (the table may broadcast over either)."""
    if table.key_block == 1:
        raise SparvarError("FlashInfer's block-sparse wrapper has no form for gathered key lists (key_block 1); "
                           "use the triton backend for them")
    table.check_spans(batch, heads)
    units = table.unit_mask()
    mask = units.expand(batch, heads, *units.shape[2:]).reshape(batch * heads, *units.shape[2:]).contiguous()
    rows = _sizes(table.q_len, table.q_block, table.num_q_blocks, batch * heads, units.device)
    cols = _sizes(table.kv_len, table.key_block, table.num_kv_units, batch * heads, units.device)
    return FlashInferBlocks(mask, rows, cols)


def flashinfer_runner(q: torch.Tensor, k: torch.Tensor, table: BlockTable, softmax_scale: float,
                      backend: str = "auto") -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """FlashInfer planned for `table` and the shapes and dtypes of q (B, H, Lq, D) and k (B, H, Lk,
    D): a function of (q, k, v) giving the attention output (B, H, Lq, D). Needs CUDA and the package."""
    from flashinfer.sparse import VariableBlockSparseAttentionWrapper

    table.check_fits(q, k)
    b, h, lq, d = q.shape
    blocks = flashinfer_blocks(table, b, h)
    wrapper = VariableBlockSparseAttentionWrapper(
        torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=q.device), backend=backend)
    wrapper.plan(*blocks, num_qo_heads=b * h, num_kv_heads=b * h, head_dim=d, sm_scale=softmax_scale,
                 q_data_type=q.dtype, kv_data_type=k.dtype)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        lk = k.shape[2]
        out = wrapper.run(q.reshape(b * h, lq, d), k.reshape(b * h, lk, d), v.reshape(b * h, lk, d))
        return out.view(b, h, lq, d)

    return attend

"""FlexAttention backend for block tables (key_block > 1), for the GPU.

A BlockTable maps one to one onto FlexAttention's BlockMask: every listed block is passed as a
"full" block, so the compiled kernel skips the unlisted ones and applies no mask inside the
listed ones; it needs no mask_mod (the default one keeps every graph the same for all tables, so
nothing recompiles per table). The unfused eager path ignores the block lists and evaluates
only the mask_mod, so it gets one that looks up the dense block matrix. BlockMasks are cached
per table, and flex_attention is compiled once per process (torch.compile makes it fast).
"""

from __future__ import annotations

import weakref

import torch

from sparvar.attention.tables import BlockTable
from sparvar.errors import SparvarError

_block_masks: dict[tuple[int, bool], object] = {}  # (id(table), eager) -> BlockMask, dropped with the table
_compiled = None


def block_mask(table: BlockTable, eager: bool = False):
    """The BlockMask of `table` (cached while the table lives); `eager` adds the per-token mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask

    if table.key_block % 16 or table.q_block % 16:
        raise SparvarError(
            f"FlexAttention needs blocks of a multiple of 16 tokens, got {table.q_block} x {table.key_block}; "
            "use the 'gather' or 'reference' backend for gathered key lists"
        )
    key = (id(table), eager)
    cached = _block_masks.get(key)
    if cached is not None:
        return cached
    kb, qb, nk = table.key_block, table.q_block, table.num_kv_units
    mask_mod = None
    if eager:
        dense = table.unit_mask()
        per_b, per_h = int(dense.shape[0] > 1), int(dense.shape[1] > 1)  # 0 broadcasts

        def mask_mod(b, h, q_idx, kv_idx):
            return dense[b * per_b, h * per_h, q_idx // qb, kv_idx // kb]

    # FlexAttention reads the index lists' last dim as the number of key blocks: pad to it
    indices = torch.nn.functional.pad(table.indices, (0, nk - table.indices.shape[-1])).contiguous()
    counts = table.counts.contiguous()
    mask = BlockMask.from_kv_blocks(
        torch.zeros_like(counts),
        torch.zeros_like(indices),
        counts,
        indices,
        BLOCK_SIZE=(qb, kb),
        mask_mod=mask_mod,
        seq_lengths=(table.q_len, table.kv_len),
    )
    _block_masks[key] = mask
    weakref.finalize(table, _block_masks.pop, key, None)
    return mask


def _kernel_options(table: BlockTable) -> dict | None:
    """Kernel tiles must divide the table's blocks; torch's default tiles suit 128 x 128 blocks."""
    if (table.q_block, table.key_block) == (128, 128):
        return None
    return {"BLOCK_M": min(128, table.q_block & -table.q_block), "BLOCK_N": min(64, table.key_block & -table.key_block)}


def _flex():
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: BlockTable, scale: float, compile: bool | None = None
) -> torch.Tensor:
    """Block-sparse attention through FlexAttention; `compile` defaults to True on CUDA.

    On the CPU, torch's compiled flex_attention takes about 30 s to build and the eager one
    computes dense scores under the mask, so it is only there to check tables against the GPU.
    """
    if compile is None:
        compile = q.is_cuda
    mask = block_mask(table, eager=not compile)
    if compile:
        return _flex()(q, k, v, block_mask=mask, scale=scale, kernel_options=_kernel_options(table))
    import warnings

    from torch.nn.attention.flex_attention import flex_attention as eager

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*without torch.compile.*")
        return eager(q, k, v, block_mask=mask, scale=scale)

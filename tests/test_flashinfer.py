"""FlashInfer's block-sparse inputs from block tables (attention/flashinfer.py), checked on the CPU
against the tables' token masks; FlashInfer itself against the float32 reference where it is
installed on a GPU (`sparvar bench kernels` races it there)."""

from __future__ import annotations

import pytest
import torch

from helpers import AWKWARD_TABLES, gathered_table, random_table
from sparvar.attention.flashinfer import flashinfer_blocks
from sparvar.errors import SparvarError


def flashinfer_token_mask(blocks, batch: int, heads: int) -> torch.Tensor:
    """The (B, H, Lq, Lk) mask FlashInfer computes from its inputs: every marked block whole, at the
    sizes given."""
    rows = blocks.block_mask_map.repeat_interleave(blocks.block_row_sz[0].long(), dim=1)
    tokens = rows.repeat_interleave(blocks.block_col_sz[0].long(), dim=2)
    return tokens.view(batch, heads, *tokens.shape[1:])


@pytest.mark.parametrize("tb,th,b,h,q_len,kv_len,q_block,key_block,density", AWKWARD_TABLES)
def test_flashinfer_inputs_cover_exactly_the_tables_mask(tb, th, b, h, q_len, kv_len, q_block, key_block, density):
    """Random tables: unsorted entries, junk past each count, empty query blocks."""
    table = random_table(tb, th, q_len, kv_len, q_block, key_block, density=density, junk=10**6, seed=q_len + kv_len)
    blocks = flashinfer_blocks(table, b, h)
    nq, nk = table.num_q_blocks, table.num_kv_units
    assert blocks.block_mask_map.shape == (b * h, nq, nk) and blocks.block_mask_map.dtype == torch.bool
    assert blocks.block_row_sz.shape == (b * h, nq) and blocks.block_col_sz.shape == (b * h, nk)
    assert (blocks.block_row_sz.sum(-1) == q_len).all() and (blocks.block_col_sz.sum(-1) == kv_len).all()
    assert all(t.is_contiguous() for t in blocks) and blocks.block_row_sz.dtype == torch.int32
    assert torch.equal(flashinfer_token_mask(blocks, b, h), table.to_mask().expand(b, h, q_len, kv_len))


def test_tables_flashinfer_cannot_take_are_refused():
    with pytest.raises(SparvarError, match="gathered key lists"):
        flashinfer_blocks(gathered_table(), 1, 1)
    with pytest.raises(SparvarError, match="does not fit 2 x 4"):
        flashinfer_blocks(random_table(1, 3, 256, 512, 128, 128), 2, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flashinfer_matches_the_reference_cuda():
    """FlashInfer over a per-head random table with empty query blocks, against the float32
    reference, where flashinfer-python is installed."""
    pytest.importorskip("flashinfer")
    from sparvar.attention.flashinfer import flashinfer_runner
    from sparvar.attention.tables import reference_sparse_attention

    b, h, q_len, kv_len = 2, 3, 700, 1500
    table = random_table(1, h, q_len, kv_len, 128, 128, density=0.4, junk=10**6, device="cuda")
    q, k, v = (torch.randn(b, h, n, 128, device="cuda", dtype=torch.bfloat16) for n in (q_len, kv_len, kv_len))
    out = flashinfer_runner(q, k, table, 0.09)(q, k, v)
    ref = reference_sparse_attention(q, k, v, table, 0.09)
    rows = table.to_mask().expand(b, h, q_len, kv_len).any(-1)  # a query that sees no key: its row is undefined
    assert (out.float() - ref.float())[rows].norm() / ref.float()[rows].norm() < 1e-2

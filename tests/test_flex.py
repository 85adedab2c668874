import pytest
import torch

from helpers import random_table

from sparvar.attention.sparse import sparse_attention
from sparvar.attention.tables import BlockTable, reference_sparse_attention
from sparvar.errors import SparvarError
from sparvar.schedules import infinity_schedule
from sparvar.sparsity import PAPER_CSLA_WINDOWS, csla_block_table

flex = pytest.importorskip("sparvar.attention.flex")
pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.mark.parametrize("b,h", [(1, 1), (2, 3)])
def test_block_mask_matches_the_reference_on_awkward_lengths(b, h):
    g = torch.Generator().manual_seed(0)
    lq, lk, d = 200, 333, 16
    q, k, v = (torch.randn(2, 3, n, d, generator=g) for n in (lq, lk, lk))
    table = random_table(b, h, lq, lk, 64, 128, density=0.4, seed=b)
    out = flex.flex_attention(q, k, v, table, 0.25, compile=False)
    ref = reference_sparse_attention(q, k, v, table, 0.25)
    assert (out - ref).norm() / ref.norm() < 1e-5
    assert flex.block_mask(table) is flex.block_mask(table)  # cached per table
    assert torch.equal(flex.block_mask(table).to_dense(), flex.block_mask(table, eager=True).to_dense())


def test_flex_refuses_gathered_tables():
    table = BlockTable(torch.ones(1, 1, 1, dtype=torch.int32), torch.zeros(1, 1, 1, 1, dtype=torch.int32), 16, 1, 16, 16)
    with pytest.raises(SparvarError, match="gather"):
        flex.block_mask(table)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention is checked on the GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks", [(128, 128), (64, 128)])
def test_compiled_flex_on_cuda_matches_the_reference_for_the_paper_table(dtype, blocks):
    s = infinity_schedule()
    table = csla_block_table(s, 11, PAPER_CSLA_WINDOWS, *blocks, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 4, s.lengths[11], 128, device="cuda", generator=g).to(dtype)
    cache = torch.randn(2, 2, 4, s.total, 128, device="cuda", generator=g).to(dtype)
    k, v = cache[0, :, :, : s.kv_length(11)], cache[1, :, :, : s.kv_length(11)]  # cache views, as the pipeline
    out = sparse_attention(q, k, v, table, 0.1, "auto")
    ref = reference_sparse_attention(q.float(), k.float(), v.float(), table, 0.1)
    tol = 1e-3 if dtype == torch.float32 else 1e-2
    assert (out.float() - ref).norm() / ref.norm() < tol

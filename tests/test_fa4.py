"""FlashAttention-4's block-sparse inputs from block tables (attention/fa4.py), checked on the CPU
against the tables' token masks. FA4's kernel itself needs a GPU: `sparvar bench kernels` runs it."""

from __future__ import annotations

import pytest
import torch

from helpers import random_table
from sparvar.attention.fa4 import fa4_block_sparsity
from sparvar.attention.tables import BlockTable
from sparvar.errors import SparvarError


def fa4_token_mask(blocks, q_len: int, kv_len: int) -> torch.Tensor:
    """The (B|1, H|1, q_len, kv_len) mask FA4 computes from its inputs: the first `count` full
    blocks of each query block, whole, keys past kv_len cut off; mask blocks none (their counts
    must be 0)."""
    assert not blocks.mask_block_cnt.any()
    qb, kb = blocks.block_size
    b, h, nq, _ = blocks.full_block_idx.shape
    mask = torch.zeros(b, h, nq * qb, -(-kv_len // kb) * kb, dtype=torch.bool)
    for i in range(b):
        for j in range(h):
            for r in range(nq):
                for unit in blocks.full_block_idx[i, j, r, : blocks.full_block_cnt[i, j, r]].tolist():
                    mask[i, j, r * qb : (r + 1) * qb, unit * kb : (unit + 1) * kb] = True
    return mask[..., :q_len, :kv_len]


@pytest.mark.parametrize("b,h,q_len,kv_len,q_block,key_block,density", [
    (1, 1, 4096, 10521, 128, 128, 0.165),  # 8B scale 12 shapes, one table for all heads
    (2, 3, 200, 300, 64, 64, 0.5),  # per head and item; neither length a multiple of its block
    (1, 2, 130, 129, 128, 16, 0.3),  # the last key block one token long
    (2, 1, 64, 1000, 64, 128, 1.0),
])
def test_fa4_inputs_cover_exactly_the_tables_mask(b, h, q_len, kv_len, q_block, key_block, density):
    """Random tables: unsorted entries, junk past each count, empty query blocks."""
    table = random_table(b, h, q_len, kv_len, q_block, key_block, density=density, junk=10**6, seed=q_len + kv_len)
    blocks = fa4_block_sparsity(table)
    assert blocks.block_size == (q_block, key_block)
    for t in blocks[:4]:
        assert t.dtype == torch.int32 and t.is_contiguous() and t.shape[:3] == table.counts.shape
    assert blocks.full_block_idx.shape[-1] <= table.num_kv_units  # FA4 takes at most one entry per key block
    assert torch.equal(fa4_token_mask(blocks, q_len, kv_len), table.to_mask())
    listed = torch.arange(blocks.full_block_idx.shape[-1]) < blocks.full_block_cnt[..., None]
    steps = blocks.full_block_idx.diff(dim=-1)
    assert (steps[listed[..., 1:]] > 0).all()  # ascending: a listed last key block is walked first, and masked


def test_tables_fa4_cannot_take_are_refused():
    gathered = BlockTable(torch.ones(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 1, dtype=torch.int32),
                          192, 1, 300, 50)
    with pytest.raises(SparvarError, match="gathered key lists"):
        fa4_block_sparsity(gathered)
    with pytest.raises(SparvarError, match="multiple of 64"):
        fa4_block_sparsity(random_table(1, 1, 100, 100, 32, 32))
    with pytest.raises(SparvarError, match="up to 128"):
        fa4_block_sparsity(random_table(1, 1, 256, 512, 128, 256))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("per_head", [False, True])
def test_fa4_matches_the_reference_cuda(per_head):
    """FA4 over a random table (and dense) against the float32 reference, where flash-attn-4 is installed."""
    pytest.importorskip("flash_attn.cute")
    from sparvar.attention.fa4 import fa4_attention
    from sparvar.attention.tables import reference_attention, reference_sparse_attention

    b, h, q_len, kv_len = 2, 3, 700, 1500
    table = random_table(1, h if per_head else 1, q_len, kv_len, 128, 128, density=0.4, junk=10**6, device="cuda")
    q, k, v = (torch.randn(b, h, n, 128, device="cuda", dtype=torch.bfloat16) for n in (q_len, kv_len, kv_len))
    out = fa4_attention(q, k, v, fa4_block_sparsity(table), 0.09)
    ref = reference_sparse_attention(q, k, v, table, 0.09)
    assert (out.float() - ref.float()).norm() / ref.float().norm() < 1e-2
    dense = fa4_attention(q, k, v, None, 0.09)
    ref = reference_attention(q, k, v, None, 0.09)[0]
    assert (dense.float() - ref.float()).norm() / ref.float().norm() < 1e-2


def test_auto_picks_fa4_only_where_it_was_measured_faster():
    """Hopper, fp16/bf16, heads of 128, FA4_MIN_QUERIES queries or more, a table FA4 has a form for,
    no log-sum-exp; anything else stays with the other backends."""
    from sparvar.attention.sparse import FA4_MIN_QUERIES, prefers_fa4

    table = random_table(1, 1, 4096, 10521, 128, 128, density=0.2)
    big = torch.Size((2, 24, 4096, 128))
    assert prefers_fa4(big, torch.bfloat16, table, (9, 0))
    assert prefers_fa4(torch.Size((2, 24, FA4_MIN_QUERIES, 128)), torch.float16, table, (9, 0))
    gathered = BlockTable(torch.ones(1, 1, 22, dtype=torch.int32), torch.zeros(1, 1, 22, 1, dtype=torch.int32),
                          192, 1, 4096, 10521)
    for shape, dtype, t, capability, lse in [
        (big, torch.bfloat16, table, (9, 0), True),  # the log-sum-exp
        (big, torch.bfloat16, table, (8, 0), False),  # Ampere
        (big, torch.bfloat16, table, (10, 0), False),  # Blackwell: not measured
        (big, torch.float32, table, (9, 0), False),
        (torch.Size((2, 24, 4096, 64)), torch.bfloat16, table, (9, 0), False),  # heads of 64
        (torch.Size((2, 24, FA4_MIN_QUERIES - 1, 128)), torch.bfloat16, table, (9, 0), False),
        (big, torch.bfloat16, gathered, (9, 0), False),  # CS4A's key lists
        (big, torch.bfloat16, None, (9, 0), False),
    ]:
        assert not prefers_fa4(shape, dtype, t, capability, lse)


def test_auto_stays_off_fa4_on_the_cpu():
    from sparvar.attention.sparse import resolve_backend

    table = random_table(1, 1, 4096, 10521, 128, 128, density=0.2)
    assert resolve_backend("auto", torch.zeros(1, 1, 4096, 128, dtype=torch.bfloat16), table) == "cpu"


def test_asking_for_fa4_where_it_cannot_run_is_one_line():
    from sparvar.attention.sparse import sparse_attention

    table = random_table(1, 1, 300, 300, 128, 128, density=0.5)
    q = torch.zeros(1, 1, 300, 128, dtype=torch.bfloat16)
    with pytest.raises(SparvarError, match="the fa4 backend runs on a Hopper GPU") as raised:
        sparse_attention(q, q, q, table, 0.1, backend="fa4")
    assert "\n" not in str(raised.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_runs_fa4_on_hopper_and_matches_the_reference_cuda():
    """Where flash-attn-4 is installed on a Hopper GPU, "auto" takes it for a CSLA-sized call, and
    its output (empty query blocks included) matches the float32 reference."""
    pytest.importorskip("flash_attn.cute")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("FA4 is picked on Hopper only")
    from sparvar.attention.sparse import resolve_backend, sparse_attention
    from sparvar.attention.tables import reference_sparse_attention

    table = random_table(2, 4, 2304, 5000, 128, 128, density=0.3, junk=10**6, device="cuda")
    q, k, v = (torch.randn(2, 4, n, 128, device="cuda", dtype=torch.bfloat16) for n in (2304, 5000, 5000))
    assert resolve_backend("auto", q, table) == "fa4"
    out = sparse_attention(q, k, v, table, 0.09)
    ref = reference_sparse_attention(q, k, v, table, 0.09)
    assert torch.isfinite(out).all()
    assert (out.float() - ref.float()).norm() / ref.float().norm() < 1e-2


def test_dense_fa4_falls_back_to_sdpa_where_fa4_does_not_run():
    """DenseAttention("fa4") on the CPU (or any GPU FA4 was not measured on) is SDPA's attention."""
    from sparvar.attention.fa4 import fa4_measured_for, fa4_runs_here
    from sparvar.attention.policy import AttentionCall, DenseAttention
    from sparvar.schedules import infinity_schedule

    assert fa4_measured_for(torch.Size((1, 2, 10, 128)), torch.bfloat16, (9, 0))
    assert not fa4_measured_for(torch.Size((1, 2, 10, 128)), torch.bfloat16, (8, 9))
    assert not fa4_measured_for(torch.Size((1, 2, 10, 80)), torch.float16, (9, 0))
    q, k, v = (torch.randn(2, 3, n, 128) for n in (9, 30, 30))
    assert not fa4_runs_here(q)
    call = AttentionCall(layer=0, num_layers=1, scale=1, schedule=infinity_schedule(), softmax_scale=0.1)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.1)
    torch.testing.assert_close(DenseAttention("fa4")(q, k, v, call), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dense_fa4_matches_the_reference_cuda():
    pytest.importorskip("flash_attn.cute")
    from sparvar.attention.fa4 import fa4_runs_here
    from sparvar.attention.policy import AttentionCall, DenseAttention
    from sparvar.attention.tables import reference_attention
    from sparvar.schedules import infinity_schedule

    q, k, v = (torch.randn(2, 4, n, 128, device="cuda", dtype=torch.bfloat16) for n in (1600, 4121, 4121))
    if not fa4_runs_here(q):
        pytest.skip("FA4 runs on Hopper only")
    call = AttentionCall(layer=0, num_layers=1, scale=10, schedule=infinity_schedule(), softmax_scale=0.09)
    out = DenseAttention("fa4")(q, k, v, call)
    ref = reference_attention(q, k, v, None, 0.09)[0]
    assert (out.float() - ref.float()).norm() / ref.float().norm() < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sparse", [True, False])
def test_fa4_replays_in_a_cuda_graph_cuda(sparse):
    """Generations capture each scale after an eager warm-up (graphs.py): FA4's calls, sparse by
    "auto" and dense by DenseAttention("fa4"), must land in the graph, so that a replay on new
    inputs gives what a fresh call gives (a kernel launched outside the capture would leave the
    graph's output stale)."""
    pytest.importorskip("flash_attn.cute")
    from sparvar.attention.fa4 import fa4_runs_here
    from sparvar.attention.policy import AttentionCall, DenseAttention
    from sparvar.attention.sparse import sparse_attention
    from sparvar.schedules import infinity_schedule

    q, k, v = (torch.randn(2, 4, n, 128, device="cuda", dtype=torch.bfloat16) for n in (2304, 5000, 5000))
    if not fa4_runs_here(q):
        pytest.skip("FA4 runs on Hopper only")
    table = random_table(2, 4, 2304, 5000, 128, 128, density=0.3, junk=10**6, device="cuda")
    call = AttentionCall(layer=0, num_layers=1, scale=11, schedule=infinity_schedule(), softmax_scale=0.09)
    attend = (lambda: sparse_attention(q, k, v, table, 0.09)) if sparse else (lambda: DenseAttention("fa4")(q, k, v, call))
    attend()  # the warm-up: FA4 compiles here
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = attend()
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, attend())

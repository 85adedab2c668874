"""The CPU sparse backend and the grouped decision pass against the float32 reference."""

import pytest
import torch

from helpers import random_table, rel_err, simulate
from sparvar.attention.cpu import cpu_sparse_attention
from sparvar.attention.decision import attention_with_colsum, grouped_attention_colsum, reference_attention_colsum
from sparvar.attention.sparse import resolve_backend, sparse_attention
from sparvar.attention.tables import BlockTable, reference_sparse_attention
from sparvar.errors import SparvarError

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}  # relative: float32 exact, half types their rounding


def _inputs(b, h, lq, lk, d, dtype, gen):
    """q, k, v as strided views: q out of a fused qkv projection, k and v of a longer cache."""
    q = torch.randn(b, lq, h, d, generator=gen).transpose(1, 2)
    cache = torch.randn(2, b, h, lk + 37, d, generator=gen)
    return q.to(dtype), cache[0, :, :, :lk].to(dtype), cache[1, :, :, :lk].to(dtype)


def _empty_rows_are_zero(out, table):
    b, h = out.shape[:2]
    counts = table.counts.expand(b, h, table.num_q_blocks)
    for bi, hi, r in (counts == 0).nonzero().tolist():
        assert out[bi, hi, r * table.q_block : (r + 1) * table.q_block].abs().max() == 0


CASES = [
    # b, h, table dims, q_len, kv_len, d, q_block, key_block
    pytest.param(2, 3, (1, 1), 300, 1000, 16, 128, 128, id="broadcast-awkward"),
    pytest.param(2, 3, (2, 3), 150, 333, 8, 64, 64, id="per-head"),
    pytest.param(2, 4, (1, 4), 77, 500, 16, 32, 48, id="heads-only"),
    pytest.param(3, 1, (3, 1), 129, 257, 32, 128, 128, id="one-head-per-sample"),
    pytest.param(1, 1, (1, 1), 5, 9, 8, 16, 4, id="tiny"),
    pytest.param(2, 3, (2, 3), 400, 900, 16, 192, 1, id="lists-per-head"),
    pytest.param(2, 3, (1, 1), 200, 333, 8, 64, 1, id="lists-broadcast"),
    pytest.param(1, 5, (1, 5), 50, 70, 8, 16, 1, id="lists-many-heads"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("b, h, tdims, lq, lk, d, q_block, key_block", CASES)
def test_cpu_backend_matches_the_reference(b, h, tdims, lq, lk, d, q_block, key_block, dtype):
    gen = torch.Generator().manual_seed(lq * 7 + lk)
    for trial in range(3):  # fresh tables and inputs each time
        table = random_table(*tdims, lq, lk, q_block, key_block, density=(0.1, 0.4, 0.9)[trial], seed=lq + trial)
        q, k, v = _inputs(b, h, lq, lk, d, dtype, gen)
        out = cpu_sparse_attention(q, k, v, table, 0.3)
        ref = reference_sparse_attention(q.float(), k.float(), v.float(), table, 0.3)
        assert out.dtype == dtype and out.shape == (b, h, lq, d)
        assert rel_err(out, ref) < TOL[dtype]
        _empty_rows_are_zero(out, table)


def test_fp16_and_dense_tables():
    gen = torch.Generator().manual_seed(3)
    q, k, v = _inputs(2, 2, 100, 260, 16, torch.float16, gen)
    full = BlockTable(torch.full((1, 1, 2), 5, dtype=torch.int32), torch.arange(5).repeat(1, 1, 2, 1).int(), 64, 64, 100, 260)
    out = cpu_sparse_attention(q, k, v, full, 0.25)
    dense = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.25)
    assert rel_err(out, dense) < TOL[torch.float16]


def test_auto_takes_the_cpu_backend_on_the_cpu():
    q = torch.randn(1, 1, 8, 8)
    table = random_table(1, 1, 8, 20, 4, 4)
    assert resolve_backend("auto", q, table) == "cpu"
    assert resolve_backend("auto", q, table, lse=True) == "reference"
    assert resolve_backend("flex", q, BlockTable(table.counts, table.indices, 4, 1, 8, 20)) == "gather"
    k, v = torch.randn(2, 1, 1, 20, 8).unbind(0)
    assert torch.equal(sparse_attention(q, k, v, table, 0.5), cpu_sparse_attention(q, k, v, table, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("b, h, lq, lk, group", [(2, 3, 250, 333, 64), (1, 1, 10, 7, 16), (2, 2, 192, 500, 192)])
def test_grouped_colsum_matches_the_reference(b, h, lq, lk, group, dtype):
    gen = torch.Generator().manual_seed(lq + lk)
    q, k, v = _inputs(b, h, lq, lk, 16, dtype, gen)
    out, colsum = grouped_attention_colsum(q, k, v, group, 0.4)
    ref_out, ref_colsum = reference_attention_colsum(q, k, v, group, 0.4)
    assert out.dtype == dtype and colsum.dtype == torch.float32 and colsum.shape == ref_colsum.shape
    assert rel_err(out, ref_out) < TOL[dtype]
    assert rel_err(colsum, ref_colsum) < 1e-5  # both compute in float32 from the same inputs
    rows = torch.tensor([min(group, lq - g * group) for g in range(colsum.shape[2])], dtype=torch.float32)
    assert torch.allclose(colsum.sum(-1), rows.expand_as(colsum.sum(-1)), rtol=1e-4)  # each query's mass is 1


def test_decision_dispatch():
    q, k, v = torch.randn(3, 1, 2, 40, 8).unbind(0)
    grouped = attention_with_colsum(q, k, v, 16, 1.0)
    assert torch.equal(grouped[1], grouped_attention_colsum(q, k, v, 16, 1.0)[1])
    ref = attention_with_colsum(q, k, v, 16, 1.0, backend="reference")
    assert torch.equal(ref[1], reference_attention_colsum(q, k, v, 16, 1.0)[1])


@pytest.mark.slow
def test_cpu_generation_agrees_with_the_reference_backend():
    from sparvar.schedules import infinity_schedule
    from sparvar.sparsity import make_policy

    schedule = infinity_schedule("1:1", 512)  # 10 scales: decision, CS4A and CSLA all run
    runs = {}
    for backend in ("auto", "reference"):
        policy = make_policy("paper", backend=backend)
        runs[backend] = simulate(policy, schedule, num_layers=3, heads=2, dim=16)
    modes = {m for row in policy.plan(3, schedule).modes for m in row}
    assert modes == {"dense", "decision", "cs4a", "csla"}
    for key, (*_, out) in runs["auto"].items():
        assert rel_err(out, runs["reference"][key][3]) < 1e-5, key


@pytest.mark.parametrize("backend", ["cpu", "gather", "reference"])
def test_a_table_planned_for_other_lengths_is_refused_on_every_backend(backend):
    """A table for fewer keys than given would read them shifted: one line, not a wrong output."""
    q, k = torch.randn(1, 2, 64, 64), torch.randn(1, 2, 132, 64)
    table = random_table(1, 1, 64, 121, 64, 16, density=0.5)
    with pytest.raises(SparvarError, match="table is for 64 queries x 121 keys, got 64 x 132") as raised:
        sparse_attention(q, k, k, table, 0.1, backend=backend)
    assert "\n" not in str(raised.value)

"""The TileLang kernel (attention/tilelang.py): its table inputs checked on the CPU against the
tables' token masks; its build for Hopper where tilelang and nvcc are installed; its output against
the float32 reference on a GPU where tilelang is installed (`sparvar bench kernels` races it there)."""

import dataclasses
import shutil

import pytest
import torch

from helpers import AWKWARD_TABLES, gathered_table, random_table
from sparvar.attention.tables import BlockTable
from sparvar.attention.tilelang import tilelang_tables
from sparvar.errors import SparvarError


def covered_mask(counts: torch.Tensor, indices: torch.Tensor, table: BlockTable) -> torch.Tensor:
    """The (B, H, Lq, Lk) mask the kernel computes: the first `count` listed key units of each row,
    which is what a table of those counts and indices covers."""
    return dataclasses.replace(table, counts=counts, indices=indices).to_mask()


@pytest.mark.parametrize("tb,th,b,h,q_len,kv_len,q_block,key_block,density", AWKWARD_TABLES)
def test_tilelang_inputs_cover_exactly_the_tables_mask(tb, th, b, h, q_len, kv_len, q_block, key_block, density):
    """Random tables: unsorted entries, junk past each count, empty query blocks."""
    table = random_table(tb, th, q_len, kv_len, q_block, key_block, density=density, junk=10**6, seed=q_len + kv_len)
    counts, indices = tilelang_tables(table, b, h)
    nq, units = table.num_q_blocks, table.num_kv_units
    assert counts.shape == (b, h, nq) and indices.shape == (b, h, nq, units)
    assert counts.dtype == indices.dtype == torch.int32 and counts.is_contiguous() and indices.is_contiguous()
    assert int(indices.min()) >= 0 and int(indices.max()) < units  # no junk left for the pipeline to load
    assert torch.equal(covered_mask(counts, indices, table), table.to_mask().expand(b, h, q_len, kv_len))


def test_tables_the_tilelang_kernel_cannot_take_are_refused():
    with pytest.raises(SparvarError, match="gathered key lists"):
        tilelang_tables(gathered_table(), 1, 1)
    with pytest.raises(SparvarError, match="does not fit 2 x 4"):
        tilelang_tables(random_table(1, 3, 256, 512, 128, 128), 2, 4)


def test_inputs_the_tilelang_kernel_cannot_take_are_one_line():
    """Checked before any build: dtypes, a head not stored contiguously, block and head sizes."""
    from sparvar.attention.tilelang import tilelang_runner

    table = random_table(1, 1, 256, 300, 128, 128)
    q, k = torch.zeros(1, 1, 256, 128, dtype=torch.bfloat16), torch.zeros(1, 1, 300, 128, dtype=torch.bfloat16)
    with pytest.raises(SparvarError, match="fp16 or bf16 inputs of one dtype"):
        tilelang_runner(q.float(), k.float(), table, 0.1)
    with pytest.raises(SparvarError, match="last stride 1"):
        tilelang_runner(q, torch.zeros(1, 1, 128, 300, dtype=torch.bfloat16).transpose(-1, -2), table, 0.1)
    with pytest.raises(SparvarError, match="query blocks of 64 or 128"):
        tilelang_runner(q, k, random_table(1, 1, 256, 300, 32, 128), 0.1)
    with pytest.raises(SparvarError, match="table is for 256 queries x 300 keys"):
        tilelang_runner(q, k[:, :, :200], table, 0.1)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_tilelang_kernel_builds_for_hopper():
    """The kernel lowers to Hopper's TMA and wgmma and nvcc compiles it (no GPU needed)."""
    pytest.importorskip("tilelang")
    from sparvar.attention.tilelang import _kernel

    q_strides, kv_strides = (2 * 200 * 128, 200 * 128, 128, 1), (2 * 300 * 128, 300 * 128, 128, 1)  # k, v: views
    source = _kernel(1, 2, 200, 129, 128, 128, 64, 0.1, "bfloat16", "sm_90a", q_strides, kv_strides).get_kernel_source()
    assert "tma_load" in source and "wgmma" in source
    # the query tile by plain loads: an empty query block never waits for a TMA load of it;
    # 16 bytes a load, though 384 threads do not divide a 128 x 128 tile into such loads evenly
    assert "Q_desc" not in source and "*(uint4*)(Q + " in source


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,d,q_block,key_block,q_len,kv_len", [
    (torch.bfloat16, 128, 128, 128, 700, 1500),
    (torch.float16, 128, 128, 64, 4096, 10521),  # 8B scale 12's lengths, blocks of 64 keys
    (torch.bfloat16, 64, 64, 64, 130, 129),  # HART's heads; one key in the last block
])
def test_tilelang_matches_the_reference_cuda(dtype, d, q_block, key_block, q_len, kv_len):
    """Per-head random tables with empty query blocks, k and v views of a longer cache, against the
    float32 reference."""
    pytest.importorskip("tilelang")
    from sparvar.attention.tables import reference_sparse_attention
    from sparvar.attention.tilelang import tilelang_runner

    b, h = 2, 3
    table = random_table(1, h, q_len, kv_len, q_block, key_block, density=0.4, junk=10**6, device="cuda")
    gen = torch.Generator("cuda").manual_seed(q_len + kv_len)
    q = torch.randn(b, h, q_len, d, device="cuda", dtype=dtype, generator=gen)
    # k, v: length views, as of a KV cache
    cache = torch.randn(2, b, h, kv_len + 37, d, device="cuda", dtype=dtype, generator=gen)
    cache[:, :, :, kv_len:] = float("nan")  # past the keys: must never be read into the output
    k, v = cache[0, :, :, :kv_len], cache[1, :, :, :kv_len]
    out = tilelang_runner(q, k, table, 0.09)(q, k, v)
    ref = reference_sparse_attention(q, k, v, table, 0.09)
    assert (out.float() - ref.float()).norm() / ref.float().norm() < 1e-2
    empty = ~table.to_mask().expand(b, h, q_len, kv_len).any(-1)
    assert (out[empty] == 0).all()

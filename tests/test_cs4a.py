import pytest
import torch

from helpers import nearest_groups
from sparvar import layout
from sparvar.attention.gather import gather_attention
from sparvar.attention.sparse import sparse_attention
from sparvar.attention.tables import BlockTable, reference_sparse_attention
from sparvar.kernels.fused import add_upsampled_
from sparvar.schedules import Schedule, infinity_schedule
from sparvar.sparsity import cs4a


def test_topk_budget_rounds_to_multiples_of_112():
    assert cs4a.topk_budget(4121, 0.2, 112) == 784  # Infinity 1024, decision scale 10
    assert cs4a.topk_budget(4121, 1.0, 112) == 4121
    assert cs4a.topk_budget(119, 1.0, 112) == 119
    assert cs4a.topk_budget(255, 0.2, 112) == 48  # short sequences fall back to multiples of 16


def test_group_map_is_identity_on_its_own_scale_and_follows_relative_place():
    s = infinity_schedule("1:2")  # non-square
    assert torch.equal(cs4a.group_map(s, 10, 10, 192), torch.arange(-(-s.lengths[10] // 192)))
    m = cs4a.group_map(s, 10, 12, 192)
    assert m[0] == 0 and m[-1] == -(-s.lengths[10] // 192) - 1
    assert (m[1:] >= m[:-1]).all()  # row-major strips keep their order


SMALL = Schedule(((1, 1), (2, 2), (3, 4), (5, 7), (6, 9), (8, 12), (10, 15)))


@pytest.mark.parametrize("schedule, src, dst, group", [
    (infinity_schedule("1:2"), 10, 12, 192), (infinity_schedule("1:2"), 10, 11, 192),
    (infinity_schedule("1:1"), 10, 12, 192), (infinity_schedule("4:3", 512), 7, 9, 192),
    (SMALL, 4, 5, 16), (SMALL, 4, 6, 16),
], ids=["1:2-10-12", "1:2-10-11", "1:1-10-12", "4:3@512-7-9", "small-4-5", "small-4-6"])
def test_group_map_takes_the_group_with_the_nearest_centre(schedule, src, dst, group):
    """Against the numpy oracle: centres of the cells (y + 0.5, x + 0.5) as shares of the grid."""
    assert torch.equal(cs4a.group_map(schedule, src, dst, group), nearest_groups(schedule, src, dst, group))


def test_local_keys_are_the_union_of_the_group_windows():
    s = Schedule(((1, 1), (2, 2), (5, 9)))
    idx, valid = cs4a.local_keys(s, 2, 8, 3)
    mask = layout.window_mask(s, 2, 2, 3)
    for g in range(idx.shape[0]):
        want = mask[g * 8 : (g + 1) * 8].any(0).nonzero().flatten() + s.offsets[2]
        assert torch.equal(idx[g][valid[g]], want)


def test_key_remap_moves_keys_to_the_matching_finer_scale():
    s = Schedule(((1, 1), (2, 3), (3, 4), (5, 7), (8, 10)))
    remap = cs4a.key_remap(s, 3, 4, 2, "cpu")  # decided at scale 3, used at scale 4, 2 sink scales
    assert torch.equal(remap[: s.offsets[2]], torch.arange(s.offsets[2]))  # sinks stay
    for j in (2, 3):
        (h, w), (ht, wt) = s.sizes[j], s.sizes[j + 1]
        for y in range(h):
            for x in range(w):
                want = s.offsets[j + 1] + (y * ht // h) * wt + (x * wt // w)
                assert remap[s.offsets[j] + y * w + x] == want
    assert len(set(remap.tolist())) == len(remap)  # distinct keys stay distinct on growing scales


def test_select_keys_top_k_and_mass():
    colsum = torch.tensor([[[[5.0, 1.0, 3.0, 0.5, 0.5] + [0.0] * 27]]])
    idx, valid = cs4a.select_keys(colsum, 16)
    picked = idx.flatten().tolist()  # in no order without `mass`
    assert {0, 1, 2, 3, 4} <= set(picked) and len(set(picked)) == len(picked) == 16 and valid.all()
    peaked = torch.zeros(1, 1, 1, 64)
    peaked[..., 7] = 100.0
    peaked[..., 20:40] = 0.001
    idx, valid = cs4a.select_keys(peaked, 32, mass=0.5)
    assert idx[0, 0, 0, 0] == 7 and valid.sum() == 16  # one key holds the mass; 16 is the floor
    flat = torch.ones(1, 1, 1, 64)
    _, valid = cs4a.select_keys(flat, 48, mass=0.5)
    assert valid.sum() == 32


def test_compact_sorts_and_removes_duplicates_and_invalid():
    idx = torch.tensor([[5, 3, 5, 9, 0, 3], [7, 7, 7, 1, 2, 2]])
    valid = torch.tensor([[True, True, True, False, True, True], [True, True, True, True, True, False]])
    counts, out = cs4a.compact(idx, valid, 10)
    assert counts.tolist() == [3, 3]
    assert out[0, :3].tolist() == [0, 3, 5] and out[1, :3].tolist() == [1, 2, 7]


@pytest.mark.parametrize("width,kv_len", [(1, 3), (7, 4), (40, 1000), (64, 50)])
def test_compact_matches_a_set_per_list(width, kv_len):
    """Random candidate lists with repeats, invalid entries and lists with nothing valid, against
    sorted(set()) of each list, padded with zeros."""
    gen = torch.Generator().manual_seed(width * 7 + kv_len)
    idx = torch.randint(0, kv_len, (2, 3, 5, width), generator=gen)
    valid = torch.rand(idx.shape, generator=gen) < 0.7
    valid[0, 0, 0] = False
    counts, out = cs4a.compact(idx, valid, kv_len)
    assert counts.dtype == out.dtype == torch.int32 and out.shape == idx.shape
    for row in range(idx[..., 0].numel()):
        want = sorted(set(idx.view(-1, width)[row][valid.view(-1, width)[row]].tolist()))
        assert counts.view(-1)[row] == len(want)
        assert out.view(-1, width)[row].tolist() == want + [0] * (width - len(want))


def test_the_residual_resize_keeps_constants_and_identity():
    x = torch.randn(2, 3, 20, 4)
    assert torch.allclose(add_upsampled_(torch.zeros_like(x), x, (4, 5), (4, 5)), x)
    const = torch.ones(1, 1, 6, 2)
    twos = torch.full((1, 1, 35, 2), 2.0)
    assert torch.allclose(add_upsampled_(torch.ones(1, 1, 35, 2), const, (2, 3), (5, 7)), twos)


def test_gather_attention_matches_the_reference():
    g = torch.Generator().manual_seed(1)
    b, h, lq, lk, d, group = 2, 3, 50, 70, 8, 16
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (lq, lk, lk))
    groups = -(-lq // group)
    idx = torch.stack([torch.randperm(lk, generator=g)[:20] for _ in range(b * h * groups)]).view(b, h, groups, 20)
    counts = torch.randint(0, 21, (b, h, groups), generator=g)
    counts[0, 0, 0] = 0  # an empty row gives zeros
    table = BlockTable(counts.int(), idx.int(), group, 1, lq, lk)
    out = gather_attention(q, k, v, table, 0.3)
    ref = reference_sparse_attention(q, k, v, table, 0.3)
    assert (out - ref).norm() / ref.norm() < 1e-5
    assert out[0, 0, :group].abs().max() == 0
    half = gather_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), table, 0.3)
    assert (half.float() - ref).norm() / ref.norm() < 1e-2


def test_gather_attention_over_block_tables_matches_the_reference():
    g = torch.Generator().manual_seed(2)
    lq, lk, d = 150, 333, 8  # neither a multiple of the blocks: a short last key block
    q, k, v = (torch.randn(2, 3, n, d, generator=g) for n in (lq, lk, lk))
    keep = torch.rand(2, 1, 3, 6, generator=g) < 0.5
    keep[0, 0, 1] = False  # an empty query block gives zeros
    keep[1, 0, 2, -1] = True  # the short last block is kept somewhere
    counts = keep.sum(-1).int()
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :5]
    table = BlockTable(counts, order.int().contiguous(), 64, 64, lq, lk)
    out = sparse_attention(q, k, v, table, 0.3, backend="gather")  # expanded into key lists
    ref = reference_sparse_attention(q, k, v, table, 0.3)
    assert (out - ref).norm() / ref.norm() < 1e-5
    assert out[0, :, 64:128].abs().max() == 0


def test_key_table_broadcasts_shared_parts():
    sinks = (torch.arange(3), torch.ones(3, dtype=torch.bool))
    own = (torch.tensor([[3, 4], [4, 5]]), torch.tensor([[True, True], [True, False]]))
    picked = (torch.tensor([[[[0, 6], [7, 3]]]]).expand(2, 1, 2, 2), torch.ones(2, 1, 2, 2, dtype=torch.bool))
    table = cs4a.key_table([sinks, picked, own], 2, 1, 10, 5, 8)
    assert table.counts.shape == (2, 1, 2) and table.counts[0, 0].tolist() == [6, 6]
    assert table.indices[1, 0, 1, :6].tolist() == [0, 1, 2, 3, 4, 7]

import torch

from sparvar import layout
from sparvar.schedules import VAR_256, VAR_512, Schedule, infinity_schedule


def test_cells_are_row_major():
    s = Schedule(((1, 1), (2, 3)))
    y, x = layout.cells(s, 1)
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    assert x.tolist() == [0, 1, 2, 0, 1, 2]
    assert layout.scale_of_tokens(s, 1).tolist() == [0, 1, 1, 1, 1, 1, 1]


def test_projection_non_square_rounds_half_to_even_and_clamps():
    s = Schedule(((1, 2), (3, 2), (4, 8), (10, 5)))
    y, x = layout.cells(s, 3)  # 10 x 5 onto 4 x 8: y*4/10, x*8/5
    py, px = layout.project(s, 3, 2, y, x)
    grid_y = py.view(10, 5)[:, 0].tolist()
    grid_x = px.view(10, 5)[0].tolist()
    # y*0.4 = 0, .4, .8, 1.2, 1.6, 2.0, 2.4, 2.8, 3.2, 3.6
    assert grid_y == [0, 0, 1, 1, 2, 2, 2, 3, 3, 4 - 1]  # 3.6 rounds to 4, clamped onto the grid
    assert grid_x == [0, 2, 3, 5, 6]  # x*1.6 = 0, 1.6, 3.2, 4.8, 6.4
    # exact halves round to even: 2 x 2 onto 5 x 3 gives y: 0, 2.5 -> 2 and x: 0, 1.5 -> 2
    t = Schedule(((2, 2), (5, 3)))
    qy, qx = layout.project(t, 0, 1, *layout.cells(t, 0))
    assert qy.tolist() == [0, 0, 2, 2] and qx.tolist() == [0, 2, 0, 2]


def test_projection_onto_finer_scale_and_self():
    s = infinity_schedule("1:2")
    for src, dst in ((5, 12), (12, 12), (12, 5)):
        y, x = layout.cells(s, src)
        py, px = layout.project(s, src, dst, y, x)
        (hs, ws), (hd, wd) = s.sizes[src], s.sizes[dst]
        assert py.max() < hd and px.max() < wd
        want_y = torch.tensor([min(hd - 1, round(v * hd / hs)) for v in y.tolist()])
        want_x = torch.tensor([min(wd - 1, round(v * wd / ws)) for v in x.tolist()])
        assert torch.equal(py, want_y) and torch.equal(px, want_x)
    y, x = layout.cells(s, 9)
    assert all(torch.equal(a, b) for a, b in zip(layout.project(s, 9, 9, y, x), (y, x)))


def test_blocks_of_64_and_128():
    for block in (64, 128):
        ids = layout.block_ids(300, block)
        sizes = layout.block_sizes(300, block)
        assert layout.num_blocks(300, block) == len(sizes) == int(ids[-1]) + 1
        assert sizes.sum() == 300 and torch.equal(torch.bincount(ids), sizes)
    assert layout.block_sizes(300, 128).tolist() == [128, 128, 44]


def test_window_mask_clips_at_border():
    s = Schedule(((4, 4),))
    m = layout.window_mask(s, 0, 0, 3).view(4, 4, 4, 4)
    assert m[0, 0].sum() == 4 and m[1, 1].sum() == 9 and m[1, 1, 0, 0] and not m[1, 1, 3, 3]
    assert layout.window_mask(s, 0, 0, None).all() and not layout.window_mask(s, 0, 0, 0).any()


def test_default_sinks_fill_at_most_one_128_block():
    assert layout.default_sink_scales(infinity_schedule()) == 5  # 121 tokens, as the paper
    assert layout.default_sink_scales(infinity_schedule("1:3")) == 5
    assert layout.default_sink_scales(VAR_256) == 6  # 91 tokens
    assert layout.default_sink_scales(VAR_512) == 5  # 66 tokens
    assert layout.default_sink_scales(Schedule(((16, 16),))) == 1

import pytest
import torch

from sparvar.errors import SparvarError
from sparvar.schedules import VAR_256, VAR_512, Schedule, infinity_schedule, parse_schedule


def test_infinity_1024_square_matches_reference():
    s = infinity_schedule("1:1", 1024)
    assert [h for h, _ in s.sizes] == [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64]
    assert s.total == 10521
    assert s.offsets == (0, 1, 5, 21, 57, 121, 265, 521, 921, 1497, 2521, 4121, 6425)
    assert s.kv_length(12) == 10521 and s.kv_length(10) == 4121


def test_512_is_first_ten_scales_with_the_1m_position_grid():
    s = infinity_schedule("1:1", 512)
    assert len(s) == 10 and s.total == 2521 and s.pos_grid == (64, 64)
    full = infinity_schedule("1:1", 1024)
    for k in range(10):
        assert all(torch.equal(a, b) for a, b in zip(s.positions(k), full.positions(k)))


def test_inverse_aspect_swaps_height_and_width():
    portrait, landscape = infinity_schedule("3:4"), infinity_schedule("4:3")
    assert portrait.sizes[-1] == (72, 54) and landscape.sizes[-1] == (54, 72)
    assert all((h, w) == (w2, h2) for (h, w), (h2, w2) in zip(portrait.sizes, landscape.sizes))
    assert portrait.pos_grid == (72, 54)


def test_positions_follow_the_rounding_recipe():
    s = infinity_schedule("1:1")
    rows, cols = s.positions(3)  # 6x6 onto the 64-grid: round(i * 64 / 6), half to even
    assert rows.view(6, 6)[:, 0].tolist() == [0, 11, 21, 32, 43, 53]
    assert cols.view(6, 6)[0].tolist() == [0, 11, 21, 32, 43, 53]
    # 10x8 onto (70, 56) for h/w = 1.25: 7 per row step, 7 per column step
    r, c = infinity_schedule("4:5").positions(4)
    assert r.view(10, 8)[:, 0].tolist() == [7.0 * i for i in range(10)]
    assert c.view(10, 8)[0].tolist() == [7.0 * j for j in range(8)]


def test_var_schedules():
    assert VAR_256.total == 680 and VAR_512.total == 2240


def test_parse_schedule():
    assert parse_schedule("1,2,4").sizes == ((1, 1), (2, 2), (4, 4))
    assert parse_schedule("1x1, 2x3 4x6").sizes == ((1, 1), (2, 3), (4, 6))
    with pytest.raises(SparvarError):
        parse_schedule("1,two")
    with pytest.raises(SparvarError):
        Schedule(((1, 1), (0, 2)))


@pytest.mark.parametrize("aspect,res", [("16:9", 1024), ("1:1", 640)])
def test_bad_schedule_requests_name_the_choices(aspect, res):
    with pytest.raises(SparvarError, match="choose one of"):
        infinity_schedule(aspect, res)

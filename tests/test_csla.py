import pytest
import torch

from sparvar.attention.tables import reference_attention, reference_sparse_attention
from sparvar.errors import SparvarError
from sparvar.schedules import Schedule, infinity_schedule
from sparvar.sparsity import PAPER_CSLA_WINDOWS, csla_block_table
from sparvar.sparsity.csla import csla_token_density, csla_token_mask
from sparvar.sparsity.stats import table_density


def test_paper_table_at_infinity_1024_scale_12_has_16_5_percent_density():
    table = csla_block_table(infinity_schedule(), 12, PAPER_CSLA_WINDOWS, 128, 128)
    assert table.counts.shape == (1, 1, 32) and table.kv_len == 10521
    block_share = table.counts.sum().item() / (32 * 83)  # kept blocks / all blocks
    pair_share = table_density(table).item()  # kept (query, key) pairs, partial blocks clipped
    assert abs(block_share - 0.165) < 0.005 and abs(pair_share - 0.165) < 0.005


def test_table_covers_exactly_the_blocks_touched_by_the_token_mask():
    s = infinity_schedule("2:3", 512)  # non-square, 10 scales
    windows = (None, None, None, 0, 1, 1, 3, 3, 5, 7)
    for q_block, key_block in ((128, 128), (64, 128), (64, 64)):
        table = csla_block_table(s, 9, windows, q_block, key_block)
        mask = csla_token_mask(s, 9, windows)
        blocks = table.to_mask()[0, 0]
        assert blocks[mask].all()  # every kept pair is computed
        # and every computed block holds a kept pair: shrinking a block's area to its mask hits
        nq, nk = table.num_q_blocks, table.num_kv_units
        padded = torch.nn.functional.pad(mask, (0, nk * key_block - mask.shape[1], 0, nq * q_block - mask.shape[0]))
        hits = padded.view(nq, q_block, nk, key_block).any(3).any(1)
        assert torch.equal(hits.sum(1).int(), table.counts[0, 0])
        assert abs(table_density(table).item() - blocks.double().mean().item()) < 1e-12


def test_token_density_matches_the_mask():
    s = infinity_schedule("4:3", 512)
    windows = (None, None, 0, 0, 1, 1, 3, 3, 5, 7)
    for scale in (7, 8, 9):
        assert abs(csla_token_density(s, scale, windows) - csla_token_mask(s, scale, windows).double().mean().item()) < 1e-12


@pytest.mark.parametrize("first_window", [None, 3, 0])
def test_a_text_prefix_in_scale_zeros_slot_is_kept_whole_or_not_at_all(first_window):
    """HART's 300 text tokens fill scale 0's slot without a grid: the mask spans all of them
    (kv_length), any window but 0 keeps them all, and the density counts them."""
    from sparvar.models.registry import MODELS

    s = MODELS["hart-0.7b"].schedule()
    windows = (first_window, None, None, None, None, None, 0, 0, 1, 1, 3, 5, 7, 7)
    for scale in (11, 13):
        mask = csla_token_mask(s, scale, windows)
        assert mask.shape == (s.lengths[scale], s.kv_length(scale))
        text = mask[:, :300]
        assert text.all() if first_window != 0 else not text.any()
        assert mask[:, 300:304].all()  # the image's scale 1 (2 x 2), a sink
        assert abs(csla_token_density(s, scale, windows) - mask.double().mean().item()) < 1e-12


def test_paper_windows_see_sinks_and_local_cells():
    s = infinity_schedule()
    mask = csla_token_mask(s, 12, PAPER_CSLA_WINDOWS)
    assert mask[:, :121].all() and not mask[:, 121:921].any()  # sinks 0-4 all, scales 5-7 none
    q = 10 * 64 + 20  # query at (10, 20) of the 64 x 64 scale
    own = mask[q, 6425:].view(64, 64)
    assert own.sum() == 49 and own[7:14, 17:24].all()
    on_48 = mask[q, 4121:6425].view(48, 48)  # (10, 20) * 48/64 = (7.5, 15) -> (8, 15), 5 x 5
    assert on_48.sum() == 25 and on_48[6:11, 13:18].all()


def test_all_covering_windows_equal_dense_attention():
    s = Schedule(((1, 1), (2, 3), (3, 5), (6, 7), (9, 11)))
    big = (None,) + (25,) * 4
    table = csla_block_table(s, 4, big, 64, 64)
    assert table_density(table).item() == 1.0
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (99, s.total, s.total))
    out = reference_sparse_attention(q, k, v, table, 0.25)
    ref, _ = reference_attention(q, k, v, None, 0.25)
    assert (out - ref).norm() / ref.norm() < 1e-6


def test_tables_are_cached_per_schedule_scale_and_device():
    s = infinity_schedule("1:2")
    a = csla_block_table(s, 11, PAPER_CSLA_WINDOWS)
    assert csla_block_table(s, 11, list(PAPER_CSLA_WINDOWS), device=torch.device("cpu")) is a
    assert csla_block_table(s, 11, PAPER_CSLA_WINDOWS, q_block=64) is not a


def test_missing_windows_fail_clearly():
    with pytest.raises(SparvarError, match="window for each key scale"):
        csla_block_table(infinity_schedule(), 12, PAPER_CSLA_WINDOWS[:10])

"""SparVAR over a source slot (VAREdit's source picture before scale 0): sparse passes see the
source through a window around each query's place, the scales keep their own plan, and the first
layer, which sees the source pooled to each scale, runs the same modes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import all_covering, capture_tables, cli_error, edit_pipeline, nearest_groups, rel_err, simulate
from sparvar.cli import main as cli_main
from sparvar.schedules import Schedule
from sparvar.sparsity import PRESETS, SparVARPolicy, get_config, make_plan, make_policy, plan_report
from sparvar.sparsity import cs4a
from sparvar.sparsity.csla import csla_block_table, csla_token_density, csla_token_mask

# 7 scales after a 10x15 source (the last scale's grid), not square
EDIT = Schedule(((1, 1), (2, 2), (3, 4), (5, 7), (6, 9), (8, 12), (10, 15)), source=(10, 15))


def window_oracle(q_size, grid, side):
    """(n_q, h*w) bool, from numpy: the grid cells within the side x side window (clipped) around
    each query cell's place on the grid (round half to even of y * h / h_q, x * w / w_q)."""
    (hq, wq), (h, w) = q_size, grid
    y, x = np.divmod(np.arange(hq * wq), wq)
    cy = np.clip(np.round(y * h / hq), 0, h - 1)[:, None]
    cx = np.clip(np.round(x * w / wq), 0, w - 1)[:, None]
    gy, gx = np.divmod(np.arange(h * w), w)
    lo, hi = (side - 1) // 2, side // 2
    inside = (gy[None] - cy >= -lo) & (gy[None] - cy <= hi) & (gx[None] - cx >= -lo) & (gx[None] - cx <= hi)
    return torch.from_numpy(inside)


@pytest.mark.parametrize("side", [1, 3, 7])
@pytest.mark.parametrize("scale", [3, 5, 6])
def test_csla_sees_the_source_through_its_window_and_the_scales_as_without_it(scale, side):
    windows = (None, None, 0, 1, 3, 5, 7)
    mask = csla_token_mask(EDIT, scale, windows, source_window=side)
    n = EDIT.source_length
    assert mask.shape == (EDIT.lengths[scale], EDIT.kv_length(scale))
    assert torch.equal(mask[:, :n], window_oracle(EDIT.sizes[scale], EDIT.source, side))
    assert torch.equal(mask[:, n:], csla_token_mask(EDIT.target, scale, windows))
    assert abs(csla_token_density(EDIT, scale, windows, side) - mask.double().mean().item()) < 1e-12
    table = csla_block_table(EDIT, scale, windows, 16, 16, source_window=side)
    blocks = F.pad(mask, (0, -mask.shape[1] % 16, 0, -mask.shape[0] % 16))
    blocks = blocks.view(-1, 16, blocks.shape[1] // 16, 16).any(3).any(1)
    want = blocks.repeat_interleave(16, 1)[:, : mask.shape[1]].repeat_interleave(16, 0)[: mask.shape[0]]
    assert torch.equal(table.to_mask()[0, 0], want)  # every block with a kept pair, none else
    assert torch.equal(csla_token_mask(EDIT, scale, windows, source_window=None)[:, :n], torch.ones(mask.shape[0], n,
                                                                                                      dtype=torch.bool))


@pytest.mark.parametrize("group", [5, 16, 37])
@pytest.mark.parametrize("side", [None, 0, 3])
def test_cs4a_source_keys_of_a_group_are_the_union_of_its_queries_windows(group, side):
    scale = 6
    idx, valid = cs4a.source_keys(EDIT, scale, group, side)
    n_q, n = EDIT.lengths[scale], EDIT.source_length
    if side is None:
        windows = torch.ones(n_q, n, dtype=torch.bool)
    else:
        windows = window_oracle(EDIT.sizes[scale], EDIT.source, side) if side else torch.zeros(n_q, n, dtype=torch.bool)
    for g, start in enumerate(range(0, n_q, group)):
        want = torch.nonzero(windows[start:start + group].any(0)).flatten().tolist()
        assert sorted(idx[g][valid[g]].tolist()) == want
    assert idx.shape[0] == -(-n_q // group)


@pytest.mark.parametrize("residual", [True, False])
def test_all_covering_plans_over_a_source_equal_dense_in_every_mode_and_the_pooled_layer(residual):
    policy = SparVARPolicy(all_covering(EDIT, residual=residual))
    seen = simulate(policy, EDIT, num_layers=4, pooled_layers=(0,))
    modes = set()
    for (layer, scale), (q, k, v, out) in seen.items():
        modes.add(policy.plan(4, EDIT).modes[layer][scale])
        assert rel_err(out, F.scaled_dot_product_attention(q, k, v, scale=1.0)) < 1e-5, (layer, scale)
    assert modes == {"dense", "decision", "cs4a", "csla"}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_over_a_source_and_a_pooled_first_layer(preset):
    policy = make_policy(preset, group=16, q_block=32, key_block=32)
    seen = simulate(policy, EDIT, num_layers=3, pooled_layers=(0,))
    plan = policy.plan(3, EDIT)
    for (layer, scale), (q, k, v, out) in seen.items():
        assert out.shape == q.shape and torch.isfinite(out).all()
        if plan.modes[layer][scale] in ("dense", "decision"):
            assert rel_err(out, F.scaled_dot_product_attention(q, k, v, scale=1.0)) < 1e-5
    sparse = [e for e in policy.stats()["entries"] if e["mode"] in ("cs4a", "csla")]
    planned = any(m in ("cs4a", "csla") for row in plan.modes for m in row)
    assert bool(sparse) == planned and (planned or preset != "paper")
    assert all(0 < e["token_density"] <= e["block_density"] + 1e-12 <= 1 + 1e-12 for e in sparse)


def test_the_modes_and_top_k_are_the_scales_own_whatever_the_source_layout():
    for preset in ("paper", "default"):
        config = get_config(preset, group=16, q_block=32, key_block=32)
        own = make_plan(config, 6, EDIT.target)
        for keys in [EDIT] + [EDIT.pooled(k) for k in range(len(EDIT))]:
            plan = make_plan(config, 6, keys)
            assert plan.modes == own.modes and plan.topk == own.topk and plan.source_window == config.source_window
        assert own.source_window == 0


def test_cs4a_over_a_source_ranks_the_scales_keys_and_windows_the_source(monkeypatch):
    tables = capture_tables(monkeypatch)
    config = get_config("cs4a", sink_scales=2, topk=0.25, topk_multiple=16, group=16, local_windows=(3, 5),
                        source_window=3)
    policy = SparVARPolicy(config)
    simulate(policy, EDIT, num_layers=3)  # layer 0 is the CS4A layer
    plan = policy.plan(3, EDIT)
    S, n = plan.decision_scale, EDIT.source_length
    assert S == 4 and plan.modes[0][5:] == ("cs4a", "cs4a")
    picked = policy._selected[0][0]  # among the scales' keys: indices from scale 0's first token on
    assert picked.max() < EDIT.kv_length(S) - n
    for scale in (5, 6):
        table = tables[EDIT.lengths[scale], EDIT.kv_length(scale)]
        windows = window_oracle(EDIT.sizes[scale], EDIT.source, 3)
        group_of = nearest_groups(EDIT.target, S, scale, 16)
        local_idx, local_ok = cs4a.local_keys(EDIT, scale, 16, plan.local_windows[scale])
        sinks = set(range(n, EDIT.offsets[2]))
        for g in range(table.num_q_blocks):
            want = sinks | set(torch.nonzero(windows[g * 16:(g + 1) * 16].any(0)).flatten().tolist())
            want |= set((picked[1, 0, group_of[g]] + n).tolist()) | set(local_idx[g][local_ok[g]].tolist())
            assert table.indices[1, 0, g, : table.counts[1, 0, g]].tolist() == sorted(want)


def test_plan_report_counts_the_pooled_first_layer():
    """Dense pairs: n_k x (source + scales 0..k) in every layer, but n_k x (n_k + scales 0..k) in
    the pooled one."""
    report = plan_report(3, EDIT, "dense", pooled_layers=(0,))
    n = EDIT.source_length
    lengths = np.array(EDIT.lengths)
    seen = np.cumsum(lengths)
    want = 2 * (lengths * (n + seen)).sum() + (lengths * (lengths + seen)).sum()
    assert report["pairs"]["dense"] == want
    assert report["schedule"]["source"] == [10, 15] and report["pooled_source_layers"] == [0]
    assert report["sink_tokens"] == sum(EDIT.lengths[: report["sink_scales"]])


@pytest.mark.slow
def test_sparvar_plan_shows_varedit_8b_1024_layer_by_layer(capsys):
    assert cli_main(["plan", "--model", "varedit-8b-1024"]) == 0
    out = capsys.readouterr().out
    assert "64x64 source (4096 keys, before scale 0)" in out and "7x7 window" in out
    assert "scale 12 (64x64): cs4a" in out and "csla" in out
    assert cli_main(["plan", "--model", "varedit-8b-1024", "--json"]) == 0
    report = __import__("json").loads(capsys.readouterr().out)
    layer0, layer1 = report["layers"][0]["scales"][11], report["layers"][1]["scales"][11]
    assert layer0["mode"] == layer1["mode"] == "cs4a" and layer0["block_density"] != layer1["block_density"]
    assert 0.5 < report["pairs"]["saved_fraction"] < 0.9
    assert "only 1:1 images at 1024x1024" in cli_error(capsys, ["plan", "--model", "varedit-8b-1024", "--resolution",
                                                                 "512"])


@pytest.mark.slow
def test_an_edit_under_an_all_covering_plan_gives_dense_logits():
    """The whole path on varedit-tiny: the source's slot, the pooled first layer, CS4A deciding and
    reusing keys, CSLA: with plans that keep every key the logits are dense attention's."""
    from PIL import Image

    pipe = edit_pipeline()
    picture = Image.new("RGB", (24, 16), (30, 140, 200))
    runs = {}
    for name, attention in (("dense", None), ("covering", SparVARPolicy(all_covering(pipe.schedule())))):
        seen = []
        out = pipe(["make it red"], image=picture, seed=1, attention=attention, progress=False,
                   on_scale=lambda k, logits, bits: seen.append(logits))
        runs[name] = torch.cat(seen, dim=1), out
    assert rel_err(runs["covering"][0], runs["dense"][0]) < 1e-4
    modes = {e["mode"] for e in runs["covering"][1].policy.stats()["entries"]}
    assert modes == {"dense", "decision", "cs4a", "csla"}

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import all_covering, capture_tables, nearest_groups, rel_err, simulate

from sparvar.attention.decision import attention_with_colsum
from sparvar.attention.sparse import sparse_attention
from sparvar.errors import SparvarError
from sparvar.schedules import VAR_256, VAR_512, Schedule, infinity_schedule
from sparvar.sparsity import PAPER_CSLA_WINDOWS, PRESETS, SparVARPolicy, get_config, make_policy, plan_report
from sparvar.sparsity import cs4a

WIDE_3_1 = infinity_schedule("3:1", 512)  # 10 non-square scales up to 18 x 54
SCHEDULES = {"var256": VAR_256, "infinity-3:1-512": WIDE_3_1}


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)


@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.slow
def test_every_preset_runs_a_generation(preset, schedule):
    policy = make_policy(preset, group=64)
    layers = 3
    seen = simulate(policy, schedule, num_layers=layers)
    plan = policy.plan(layers, schedule)
    for (layer, scale), (q, k, v, out) in seen.items():
        assert out.shape == q.shape and torch.isfinite(out).all()
        if plan.modes[layer][scale] in ("dense", "decision"):
            assert rel_err(out, _sdpa(q, k, v)) < 1e-5
    stats = policy.stats()
    assert [(e["layer"], e["scale"]) for e in stats["entries"]] == sorted(seen)
    modes = {e["mode"] for e in stats["entries"]}
    assert modes == {m for row in plan.modes for m in row}
    sparse = [e for e in stats["entries"] if e["mode"] in ("cs4a", "csla")]
    assert (stats["total"]["saved_fraction"] > 0) == (bool(sparse) and preset not in ("dense",))
    for e in sparse:
        assert 0 < e["block_density"] <= 1 and len(e["block_density_per_head"]) == 2
        assert e["token_density"] <= e["block_density"] + 1e-12


def test_the_paper_preset_uses_every_mode_on_var_schedules():
    for schedule in (VAR_256, VAR_512, WIDE_3_1):
        plan = make_policy("paper").plan(16, schedule)
        assert {m for row in plan.modes for m in row} == {"dense", "decision", "cs4a", "csla"}


@pytest.mark.parametrize("residual", [True, False])
def test_all_covering_windows_and_full_top_k_equal_dense_in_every_mode(residual):
    schedule = Schedule(((1, 1), (2, 3), (3, 4), (5, 6), (7, 10), (9, 13)))
    policy = SparVARPolicy(all_covering(schedule, residual=residual))
    seen = simulate(policy, schedule, num_layers=4)
    modes = set()
    for (layer, scale), (q, k, v, out) in seen.items():
        modes.add(policy.plan(4, schedule).modes[layer][scale])
        assert rel_err(out, _sdpa(q, k, v)) < 1e-5
    assert modes == {"dense", "decision", "cs4a", "csla"}


def test_cs4a_keys_are_the_decision_top_k_plus_sinks_and_window_and_the_residual_is_added(monkeypatch):
    tables = capture_tables(monkeypatch)
    schedule = Schedule(((1, 1), (2, 2), (3, 4), (5, 7), (6, 9), (8, 12), (10, 15)))
    config = get_config("cs4a", sink_scales=2, topk=0.25, topk_multiple=16, group=16, local_windows=(3, 5))
    policy = SparVARPolicy(config)
    seen = simulate(policy, schedule, num_layers=3)  # layer 0 is the CS4A layer
    plan = policy.plan(3, schedule)
    S = plan.decision_scale
    assert S == 4 and plan.modes[0][5:] == ("cs4a", "cs4a")
    q, k, v, _ = seen[0, S]
    dense, colsum = attention_with_colsum(q, k, v, 16, 1.0)
    picked = colsum.topk(plan.topk, dim=-1).indices
    sinks = torch.arange(schedule.offsets[2])
    decision_table = cs4a.key_table(
        [(sinks, torch.ones_like(sinks, dtype=torch.bool)), (picked, torch.ones_like(picked, dtype=torch.bool))],
        2, 2, schedule.lengths[S], 16, k.shape[2],
    )
    residual = dense - sparse_attention(q, k, v, decision_table, 1.0)
    for scale in (5, 6):
        q, k, v, out = seen[0, scale]
        table = tables[schedule.lengths[scale], schedule.kv_length(scale)]  # only layer 0 is sparse
        group_of = nearest_groups(schedule, S, scale, 16)
        local_idx, local_ok = cs4a.local_keys(schedule, scale, 16, plan.local_windows[scale])
        for b in range(2):
            for h in range(2):
                for g in range(table.num_q_blocks):
                    want = set(sinks.tolist()) | set(picked[b, h, group_of[g]].tolist())
                    want |= set(local_idx[g][local_ok[g]].tolist())
                    got = table.indices[b, h, g, : table.counts[b, h, g]].tolist()
                    assert got == sorted(want)
        b, h, _, d = residual.shape
        grid = residual.reshape(b * h, *schedule.sizes[S], d).permute(0, 3, 1, 2)
        up = F.interpolate(grid, size=schedule.sizes[scale], mode="bilinear", align_corners=False)
        up = up.permute(0, 2, 3, 1).reshape(b, h, -1, d)
        assert rel_err(out, sparse_attention(q, k, v, table, 1.0) + up) < 1e-5


def test_remap_moves_picked_keys_into_finer_scales(monkeypatch):
    tables = capture_tables(monkeypatch)
    schedule = Schedule(((1, 1), (2, 2), (3, 4), (5, 7), (6, 9), (8, 12), (10, 15)))
    config = get_config("paper-remap", csla=False, sink_scales=2, topk=0.25, topk_multiple=16, group=16, local_windows=(1,))
    policy = SparVARPolicy(config)
    simulate(policy, schedule, num_layers=3)
    decided = policy._selected[0][0]
    table = tables[schedule.lengths[6], schedule.total]  # two scales after the decision: keys move up by two
    remap = cs4a.key_remap(schedule, 4, 6, 2)
    own = set(range(schedule.offsets[6], schedule.total))
    group_of = nearest_groups(schedule, 4, 6, 16)
    got = set(table.indices[0, 0, 3, : table.counts[0, 0, 3]].tolist())
    moved = set(remap[decided[0, 0, group_of[3]]].tolist())
    assert moved <= got and got - moved - own <= set(range(schedule.offsets[2]))
    assert any(schedule.offsets[5] <= i < schedule.offsets[6] for i in moved)  # scale 3 keys reached scale 5


def test_reset_clears_the_generation_state():
    schedule = VAR_256
    policy = make_policy("paper", group=64)
    simulate(policy, schedule, num_layers=2)
    assert policy.stats()["entries"]
    policy.reset()
    assert policy.stats()["entries"] == []
    plan = policy.plan(2, schedule)
    scale = plan.decision_scale + 1
    q = torch.randn(1, 2, schedule.lengths[scale], 16)
    k = torch.randn(1, 2, schedule.kv_length(scale), 16)
    from sparvar.attention.policy import AttentionCall

    with pytest.raises(SparvarError, match="reset"):
        policy(q, k, k, AttentionCall(0, scale, 2, schedule, 1.0))


def test_bfloat16_generation_stays_close_to_float32_where_plans_are_static():
    schedule = WIDE_3_1
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        policy = make_policy("csla")
        outs[dtype] = simulate(policy, schedule, num_layers=2, dtype=dtype)
    plan = make_policy("csla").plan(2, schedule)
    checked = 0
    for key, (*_, out32) in outs[torch.float32].items():
        if plan.modes[key[0]][key[1]] == "csla":
            assert rel_err(outs[torch.bfloat16][key][3], out32) < 1e-2
            checked += 1
    assert checked == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fast backends run on CUDA")
def test_cuda_backends_agree_with_the_reference_over_an_infinity_1024_generation():
    schedule = infinity_schedule()
    runs = {}
    for backend in ("auto", "reference"):  # auto for float32 on CUDA: gather, grouped decision pass
        policy = make_policy("paper", backend=backend)
        runs[backend] = simulate(policy, schedule, num_layers=3, heads=2, dim=128, device="cuda")
    for key, (*_, out) in runs["auto"].items():
        assert rel_err(out, runs["reference"][key][3]) < 1e-3, key


def test_paper_plan_report_at_infinity_1024():
    for layers in (32, 40):  # Infinity-2B and -8B
        report = plan_report(layers, infinity_schedule(), "paper")
        json.dumps(report)
        assert report["sink_scales"] == 5 and report["sink_tokens"] == 121
        assert report["decision_scale"] == 10 and report["topk_keys"] == 784 and report["cs4a_layers"] == 11
        assert report["csla_windows"] == list(PAPER_CSLA_WINDOWS)
        rows = [[s["mode"] for s in layer["scales"]] for layer in report["layers"]]
        assert len(rows) == layers
        assert all(r == ["dense"] * 10 + ["decision", "cs4a", "cs4a"] for r in rows[:11])
        assert all(r == ["dense"] * 10 + ["csla"] * 3 for r in rows[11:])
        last = report["layers"][-1]["scales"][12]
        assert last["exact"] and abs(last["block_density"] - 0.165) < 0.005
        assert not report["layers"][0]["scales"][12]["exact"]
        assert 0.5 < report["pairs"]["saved_fraction"] < 0.9


@pytest.mark.slow
def test_plans_for_other_schedules():
    # 512x512 and other aspect ratios follow the same rules, counted from the last scale
    p512 = plan_report(32, infinity_schedule("1:1", 512), "paper")
    assert p512["decision_scale"] == 7 and p512["csla_windows"][-3:] == [3, 5, 7]
    wide = plan_report(32, infinity_schedule("2:1"), "paper")
    assert wide["decision_scale"] == 10 and wide["csla_windows"] == list(PAPER_CSLA_WINDOWS)
    # default keeps a scale dense where its plan keeps more than 40% of the pairs
    for schedule in (VAR_256, infinity_schedule("1:1", 512), infinity_schedule()):
        report = plan_report(16, schedule, "default")
        for layer in report["layers"]:
            for s in layer["scales"]:
                assert s["mode"] in ("dense", "decision") or s["block_density"] <= 0.4
    assert all(s["mode"] == "dense" for layer in plan_report(16, VAR_256, "default")["layers"] for s in layer["scales"])
    # default was chosen at no more planned attention than the paper's (tools/calibrate_default.py)
    for depth in (12, 32, 40):
        planned = {p: plan_report(depth, infinity_schedule(), p)["pairs"]["planned"] for p in ("default", "paper")}
        assert planned["default"] <= planned["paper"]
    assert plan_report(32, infinity_schedule(), "paper", q_block=64)["settings"]["q_block"] == 64


def test_presets_are_listed_and_bad_names_fail_clearly():
    assert {"dense", "paper", "default"} <= set(PRESETS)
    assert all(p.description and "\n" not in p.description for p in PRESETS.values())
    with pytest.raises(SparvarError, match="choose one of"):
        make_policy("fastest")
    with pytest.raises(SparvarError, match="unknown SparVAR setting"):
        make_policy("paper", top_k=0.1)
    with pytest.raises(SparvarError, match="key_mapping"):
        make_policy("paper", key_mapping="nearest")


def test_gather_takes_strided_queries_whose_length_fills_the_groups():
    from sparvar.attention.gather import gather_attention
    from sparvar.attention.tables import BlockTable, reference_sparse_attention

    qkv = torch.randn(2, 64, 3, 2, 16).permute(2, 0, 3, 1, 4)  # q as the model makes it: a strided view
    q, k, v = qkv.unbind(0)
    idx = torch.stack([torch.randperm(64)[:20].sort().values for _ in range(4)]).int()
    table = BlockTable(torch.full((1, 1, 4), 20, dtype=torch.int32), idx[None, None], 16, 1, 64, 64)
    assert not q.is_contiguous()
    assert rel_err(gather_attention(q, k, v, table, 0.5), reference_sparse_attention(q, k, v, table, 0.5)) < 1e-5

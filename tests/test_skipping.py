"""Token pruning (FastVAR-style), adaptive skipping and their composition with attention policies."""

import math

import numpy as np
import pytest
import torch

from helpers import detail_energy, tiny_pipeline, var_pipeline
from sparvar.attention.policy import DenseAttention
from sparvar.bench.common import provenance
from sparvar.errors import SparvarError
from sparvar.eval.quality import ErrorProbe
from sparvar.kv_cache import KVCache
from sparvar.schedules import infinity_schedule, parse_schedule
from sparvar.eval.flops import transformer_flops
from sparvar.pruning import PruneConfig, TokenPruning, farthest_from_mean, prune_plan, stand_in_positions
from sparvar.skipping import AdaptiveSkip
from sparvar.sparsity import Combination, combination, make_policy

SCHEDULE = infinity_schedule("4:3", 512)  # 10 scales: cache scale 5 (16x12), pruned 6 and 7, sparse 7-9


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def _same_tokens(a, b) -> list[bool]:
    return [torch.equal(x, y) for x, y in zip(a.tokens, b.tokens)]


def test_the_fastvar_plan_on_infinity_and_other_depths():
    plan = prune_plan(PruneConfig(), 32, infinity_schedule("1:1", 1024))
    assert (plan.first, plan.last, plan.cache_scale) == (3, 28, 8)
    assert plan.kept == {9: 615, 10: 800}  # 60% of 32x32, 50% of 40x40, as FastVAR rounds
    assert (prune_plan(PruneConfig(), 6, infinity_schedule()).first, prune_plan(PruneConfig(), 6, infinity_schedule()).last) == (1, 5)
    with pytest.raises(SparvarError, match="at least 5 scales"):
        prune_plan(PruneConfig(), 32, parse_schedule("1,2,4,8"))
    with pytest.raises(SparvarError, match="no layer"):
        prune_plan(PruneConfig(layers=(0.5, 0.55)), 4, SCHEDULE)
    for bad in (dict(keep=(0.0, 0.5)), dict(keep=(0.5,)), dict(cache_from_end=3), dict(layers=(0.5, 0.2))):
        with pytest.raises(SparvarError):
            PruneConfig(**bad)


def test_kept_tokens_are_the_farthest_from_the_mean():
    x = torch.randn(3, 37, 8, generator=torch.Generator().manual_seed(0))
    got = farthest_from_mean(x, 11)
    for b in range(3):  # slow reference: distance of every token to the mean, largest first
        mean = sum(x[b, i] for i in range(37)) / 37
        dist = [float(((x[b, i] - mean) ** 2).sum()) for i in range(37)]
        expected = sorted(sorted(range(37), key=lambda i: -dist[i])[:11])
        assert got[b].tolist() == expected


def test_stand_ins_are_the_nearest_cache_scale_tokens():
    schedule = parse_schedule("1,2x3,4x6")
    pos = stand_in_positions(schedule, 2, 1, "cpu")
    assert pos.shape == (24,) and pos.min() >= schedule.offsets[1] and pos.max() < schedule.offsets[2]
    grid = (pos - schedule.offsets[1]).view(4, 6)
    assert grid[0, 0] == 0 and grid[3, 5] == 5 and grid[0, 5] == 2 and grid[3, 0] == 3  # corners map to corners
    assert (grid[:2] < 3).all() and (grid[2:] >= 3).all()  # top half -> top row


def test_kv_cache_writes_kept_tokens_and_stand_ins():
    cache = KVCache(1, 2, 1, 10, 2, torch.float32, "cpu")
    cache.buffer.zero_()
    cache.buffer[0, :, :, :, :4] = torch.arange(4.0)[:, None]  # earlier tokens 0..3 hold their index
    k = torch.full((2, 1, 2, 2), 100.0)
    index = torch.tensor([[0, 3], [1, 2]])
    keys, values = cache.write_kept(0, 4, 5, k, k + 1, index, torch.tensor([1, 1, 2, 2, 3]))
    assert keys.shape == (2, 1, 9, 2)
    assert keys[0, 0, 4:, 0].tolist() == [100, 1, 2, 100, 3] and keys[1, 0, 4:, 0].tolist() == [1, 100, 100, 2, 3]
    assert values[0, 0, 4:, 0].tolist() == [101, 1, 2, 101, 3]


def test_pruned_tokens_take_the_cache_scales_update_upsampled():
    """TokenPruning with stand-in layers: the range doubles x; other layers add 1."""
    schedule = parse_schedule("1,2,4,6,8,12")  # cache scale 1 (2x2), pruned 2 (4x4) and 3 (6x6)
    pruning = TokenPruning(PruneConfig(keep=(0.5, 0.25)))
    plan = pruning.plan(8, schedule)
    seen = []

    def run(x, rope, attend, layers):
        seen.append((layers, x.shape[1], rope[0].shape))
        inside = layers.start >= plan.first and layers.stop <= plan.last and len(layers)
        if inside:
            attend(layers.start, None, None, None)
        return x * 2 if inside else x + len(layers)

    class Hook:
        """Stands in for CachedAttend: records the kept tokens each attention call sees."""

        def __init__(self, kept=None):
            self.kept = kept

        def pruned(self, kept):
            return Hook(kept)

        def __call__(self, layer, q, k, v):
            seen.append(self.kept)

    attend = Hook()

    gen = torch.Generator().manual_seed(0)
    rope = (torch.rand(36, 4, generator=gen), torch.rand(36, 4, generator=gen))
    cached = torch.randn(2, 4, 3, generator=gen)
    out = pruning.forward(cached, 1, schedule, 8, rope[:1] * 2, attend, run)  # (cos, sin) of 4 tokens unused
    entering = cached + plan.first
    assert torch.allclose(out, 2 * entering + 8 - plan.last, atol=1e-6)
    x = torch.randn(2, 36, 3, generator=gen)
    seen.clear()
    out = pruning.forward(x, 3, schedule, 8, rope, attend, run)
    entering = x + plan.first
    index = farthest_from_mean(entering, 9)
    kept = seen[2]
    assert torch.equal(kept.index, index) and torch.equal(kept.stand_in, stand_in_positions(schedule, 3, 1, "cpu"))
    assert seen[1] == (range(plan.first, plan.last), 9, (2, 1, 9, 4))  # kept tokens and their own angles
    update = cached + plan.first  # the range doubled what entered it at the cache scale (2x2)
    up = torch.nn.functional.interpolate(update.transpose(1, 2).reshape(2, 3, 2, 2), size=(6, 6), mode="area")
    expected = entering + up.flatten(2).transpose(1, 2)
    for b in range(2):
        expected[b, index[b]] = 2 * entering[b, index[b]]
    assert torch.allclose(out, expected + 8 - plan.last, atol=1e-6)


@pytest.mark.slow
def test_keep_everything_is_exactly_no_pruning(pipe):
    full = PruneConfig(keep=(1.0, 1.0))
    plain = pipe(["a boat", "a tree"], seed=2, schedule=SCHEDULE, progress=False)
    kept = pipe(["a boat", "a tree"], seed=2, schedule=SCHEDULE, prune=full, progress=False)
    assert all(_same_tokens(plain, kept))
    assert np.array_equal(np.asarray(plain.images[1]), np.asarray(kept.images[1]))
    var = var_pipeline()
    assert all(_same_tokens(var([3], seed=1, progress=False), var([3], seed=1, prune=full, progress=False)))


@pytest.mark.slow
def test_pruning_changes_only_the_pruned_scales_and_after(pipe):
    plain = pipe(["a boat"], seed=2, schedule=SCHEDULE, progress=False)
    pruned = pipe(["a boat"], seed=2, schedule=SCHEDULE, prune="fastvar", progress=False)
    same = _same_tokens(plain, pruned)
    assert all(same[:6]) and not same[6]
    var = var_pipeline()
    same = _same_tokens(var([3], seed=1, progress=False), var([3], seed=1, prune="fastvar", progress=False))
    assert all(same[:6]) and not all(same[6:])


@pytest.mark.slow
def test_pruned_items_do_not_depend_on_the_batch(pipe):
    batch = pipe(["a boat", "a tree"], seed=[5, 6], schedule=SCHEDULE, prune="fastvar", progress=False)
    alone = pipe(["a tree"], seed=[6], schedule=SCHEDULE, prune="fastvar", progress=False)
    assert all(torch.equal(a[1:], b) for a, b in zip(batch.tokens, alone.tokens))


@pytest.mark.slow
def test_every_policy_composes_and_falls_back_to_dense_where_queries_were_pruned(pipe):
    class Recorder(DenseAttention):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __call__(self, q, k, v, call):
            self.calls.append((call.layer, call.scale, q.shape[2], k.shape[2], call.query_index is not None))
            return super().__call__(q, k, v, call)

    recorder = Recorder()
    pipe(["a boat"], seed=2, schedule=SCHEDULE, attention=recorder, prune="fastvar", progress=False)
    plan = prune_plan(PruneConfig(), pipe.spec.transformer.depth, SCHEDULE)
    for layer, scale, nq, nk, pruned in recorder.calls:
        expect = plan.first <= layer < plan.last and scale in plan.kept
        assert pruned == expect and nk == SCHEDULE.kv_length(scale)  # keys keep their layout
        assert nq == (plan.kept[scale] if expect else SCHEDULE.lengths[scale])

    model = tiny_pipeline(depth=8, block_chunks=2)  # CS4A in layers 0-2 (decision at 7), CSLA in 3-7
    probe = ErrorProbe(make_policy("paper"))
    out = model(["a boat"], seed=2, schedule=SCHEDULE, attention=probe, prune=PruneConfig(layers=(1 / 8, 5 / 8)),
                progress=False)
    entries = {(e["layer"], e["scale"]): e for e in out.policy.stats()["entries"]}
    errors = probe.errors(8, len(SCHEDULE))
    for layer in range(1, 5):
        for scale in (6, 7):
            assert entries[layer, scale]["pruned"] and entries[layer, scale]["mode"] == "dense"
            assert errors[layer][scale] < 1e-6  # pruned calls: exactly what dense attention gives
    assert [entries[layer, 8]["mode"] for layer in range(8)] == ["cs4a", "dense", "dense"] + ["csla"] * 5
    assert entries[0, 7]["mode"] == "decision"  # layer 0 is not pruned: its CS4A plan runs
    assert out.policy.stats()["total"]["saved_fraction"] > 0.05


def test_pruning_needs_the_cache_scale_first_and_the_static_cache(pipe):
    pruning = TokenPruning(PruneConfig())
    plan = pruning.plan(4, SCHEDULE)
    x = torch.zeros(1, SCHEDULE.lengths[6], 8)
    with pytest.raises(SparvarError, match="cache scale"):
        pruning.forward(x, 6, SCHEDULE, 4, None, None, lambda x, rope, attend, layers: x)
    assert plan.cache_scale == 5
    with pytest.raises(SparvarError, match="preallocated KV cache"):
        pipe(["a"], schedule=SCHEDULE, prune="fastvar", kv_cache="concat", progress=False)
    with pytest.raises(SparvarError, match="unknown token pruning"):
        pipe(["a"], schedule=SCHEDULE, prune="fast", progress=False)


def _scores(pipe, out, schedule, scale):
    """Detail energy of every item's estimate after `scale`, from its tokens (the numpy oracle)."""
    summed = None
    for k in range(scale + 1):
        summed = pipe.codes.accumulate(summed, pipe.codes.to_codes(out.tokens[k], k, schedule), k, schedule)
    return torch.from_numpy(detail_energy(summed.double().numpy()))


def test_detail_energy_is_what_is_finer_than_a_quarter_of_the_image():
    gen = torch.Generator().manual_seed(0)
    for shape in ((3, 4, 16, 24), (2, 3, 27, 36), (1, 2, 6, 3)):  # cells of unequal sizes where 4 does not divide
        latent = torch.randn(shape, generator=gen, dtype=torch.float64)
        assert AdaptiveSkip.score(latent).tolist() == pytest.approx(detail_energy(latent.numpy()).tolist(), rel=1e-9)
    # stripes two pixels wide vanish in 4-pixel blocks: all of their energy is detail
    stripes = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64).repeat(4).expand(1, 1, 16, 16)
    assert AdaptiveSkip.score(stripes).item() == pytest.approx(1.0)
    assert AdaptiveSkip.score(torch.full((1, 2, 8, 8), 3.0)).item() == 0.0


@pytest.mark.slow
def test_adaptive_skip_at_threshold_zero_never_skips_and_at_inf_stops_at_the_first_decision(pipe):
    K = len(SCHEDULE)
    plain = pipe(["a boat", "a tree"], seed=3, schedule=SCHEDULE, progress=False)
    never = pipe(["a boat", "a tree"], seed=3, schedule=SCHEDULE, adaptive_skip=AdaptiveSkip((0.0, 0.0)),
                 progress=False)
    assert never.scales_used == [K, K] and all(_same_tokens(plain, never))
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(never.images[0]))
    always = pipe(["a boat", "a tree"], seed=3, schedule=SCHEDULE, adaptive_skip=AdaptiveSkip((math.inf, math.inf)),
                  progress=False)
    skip2 = pipe(["a boat", "a tree"], seed=3, schedule=SCHEDULE, skip_last=2, progress=False)
    assert always.scales_used == [K - 2, K - 2] and len(always.tokens) == K - 2  # the loop stopped there
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(always.images, skip2.images))
    one = pipe(["a boat"], seed=3, schedule=SCHEDULE, skip_last=1, adaptive_skip=AdaptiveSkip((math.inf,)),
               progress=False)
    assert one.scales_used == [K - 1]  # no decision after the last scale that runs
    assert AdaptiveSkip().threshold_after(K - 3, K) == AdaptiveSkip().thresholds[1]
    assert AdaptiveSkip().threshold_after(K - 4, K) is None and AdaptiveSkip().threshold_after(K - 1, K) is None


@pytest.mark.slow
def test_adaptive_decisions_are_per_item_and_do_not_depend_on_the_batch(pipe):
    K = len(SCHEDULE)
    conditions, seeds = ["a boat", "a tree"], [11, 12]
    plain = pipe(conditions, seed=seeds, schedule=SCHEDULE, progress=False)
    energy = _scores(pipe, plain, SCHEDULE, K - 3).tolist()
    assert energy[0] != energy[1]
    rule = AdaptiveSkip((0.0, sum(energy) / 2))  # the smoother item skips the last two scales, the other none
    smooth = int(energy[1] < energy[0])
    batch = pipe(conditions, seed=seeds, schedule=SCHEDULE, adaptive_skip=rule, progress=False)
    assert batch.scales_used[smooth] == K - 2 and batch.scales_used[1 - smooth] == K
    skip2 = pipe(conditions, seed=seeds, schedule=SCHEDULE, skip_last=2, progress=False)
    assert np.array_equal(np.asarray(batch.images[smooth]), np.asarray(skip2.images[smooth]))  # its codes froze
    assert np.array_equal(np.asarray(batch.images[1 - smooth]), np.asarray(plain.images[1 - smooth]))
    for i in range(2):  # alone, an item decides the same; its image may differ in the last bits of batched matmuls
        alone = pipe([conditions[i]], seed=[seeds[i]], schedule=SCHEDULE, adaptive_skip=rule, progress=False)
        assert alone.scales_used == [batch.scales_used[i]]
        assert all(torch.equal(a[i : i + 1], b) for a, b in zip(batch.tokens, alone.tokens))
        # the VAE's batched convolutions may round differently with several threads: one level at most
        diff = np.abs(np.asarray(alone.images[0], dtype=int) - np.asarray(batch.images[i], dtype=int))
        assert diff.max() <= 1


def test_adaptive_skip_composes_with_pruning_and_sparse_attention(pipe):
    out = pipe(["a boat"], seed=3, schedule=SCHEDULE, attention="paper", prune="fastvar",
               adaptive_skip=AdaptiveSkip((math.inf, 0.0)), progress=False)
    assert out.scales_used == [len(SCHEDULE) - 1] and out.policy.stats()["total"]["saved_fraction"] > 0
    with pytest.raises(SparvarError, match="adaptive_skip takes"):
        pipe(["a"], schedule=SCHEDULE, adaptive_skip=0.5, progress=False)
    with pytest.raises(SparvarError, match="one threshold"):
        AdaptiveSkip(())


def test_combination_names():
    assert combination("default+skip2") == Combination("default", 2, None, False)
    assert combination("fastvar+skip2") == Combination("dense", 2, "fastvar", False)
    assert combination("paper+adaptive+fastvar") == Combination("paper", 0, "fastvar", True)
    assert combination("default").options() == {"skip_last": 0, "prune": None, "adaptive_skip": False}
    for bad in ("default+skip", "default+skip2+skip1", "default+bogus", "default+fastvar+fastvar"):
        with pytest.raises(SparvarError, match="cannot read"):
            combination(bad)
    assert "skipped" in combination("default+skip2").describe()


def test_transformer_flops_count_pruned_tokens_and_attention_density():
    cfg = tiny_pipeline().spec.transformer
    full = transformer_flops(cfg, SCHEDULE, len(SCHEDULE))
    assert transformer_flops(cfg, SCHEDULE, len(SCHEDULE) - 2) < full
    plan = prune_plan(PruneConfig(), cfg.depth, SCHEDULE)
    assert transformer_flops(cfg, SCHEDULE, len(SCHEDULE), plan) < full
    half = {(layer, k): 0.5 for layer in range(cfg.depth) for k in range(len(SCHEDULE))}
    attention = sum(4.0 * n * SCHEDULE.kv_length(k) * cfg.width * cfg.depth for k, n in enumerate(SCHEDULE.lengths))
    assert math.isclose(full - transformer_flops(cfg, SCHEDULE, len(SCHEDULE), density=half), attention / 2)


@pytest.mark.slow
def test_calibration_picks_the_cheapest_rule_at_static_skip1_quality():
    from sparvar.eval.skip_calibration import choose, measure, outcome, report, to_markdown

    pipe = tiny_pipeline(text_width=0, num_classes=3)
    schedule = parse_schedule("1,2,4,6,8")
    measured = measure(pipe, [0, 1, 2], [0, 1], batch=4, schedule=schedule, progress=False)
    assert set(measured["scores"]) == {1, 2} and len(measured["mse"][2]) == 6
    assert 0 < measured["flops_share"][2] < measured["flops_share"][1] < 1
    assert outcome(measured, (0.0, 0.0))["stopped"] == {0: 6, 1: 0, 2: 0}
    assert outcome(measured, (1e9, 1e9))["stopped"] == {0: 0, 1: 0, 2: 6}
    chosen = choose(measured)
    budget = float(np.mean(measured["mse"][1]))
    assert chosen["outcome"]["mean_mse"] <= budget and chosen["outcome"]["flops_share"] <= measured["flops_share"][1]
    result = {**provenance("sparvar calibrate-skip"), "model": "tiny", "device": "cpu", "attention": "dense",
              "conditions": 3, "seeds": [0, 1], **report(measured, chosen), "thresholds": chosen["thresholds"],
              "mse_budget": budget}
    assert "| adaptive |" in to_markdown(result)


@pytest.mark.slow
def test_calibrate_skip_command_writes_thresholds(tmp_path):
    import json

    from sparvar.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a boat\na tree\n")
    out = tmp_path / "cal"
    argv = ["calibrate-skip", "--model", "infinity-tiny", "--prompts", str(prompts), "--seeds", "2", "--batch", "4",
            "--device", "cpu", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    result = json.loads((out / "calibrate-skip.json").read_text())
    assert len(result["thresholds"]) == 2 and result["samples"] == 4 and result["seeds"] == [1000, 1001]
    assert "| adaptive |" in (out / "calibrate-skip.md").read_text()
    assert main(["calibrate-skip", "--model", "infinity-tiny", "--out", str(out), "--quiet"]) == 2  # no prompts

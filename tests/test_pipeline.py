"""The sampler loop: seeds, guidance, the static KV cache and the attention seam."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import rel_err, tiny_pipeline
from sparvar import load_pipeline
from sparvar.attention.policy import AttentionPolicy, DenseAttention
from sparvar.errors import SparvarError
from sparvar.schedules import Schedule, infinity_schedule, parse_schedule

SCHEDULE = parse_schedule("1,2,3x4,4,6x5")


def _pixels(out):
    return [np.asarray(im) for im in out.images]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.mark.slow
def test_same_seed_same_image_other_seed_other_image(pipe):
    a = pipe(["a boat"], seed=4, schedule=SCHEDULE, progress=False)
    b = pipe(["a boat"], seed=4, schedule=SCHEDULE, progress=False)
    c = pipe(["a boat"], seed=5, schedule=SCHEDULE, progress=False)
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(b)))
    assert not all(torch.equal(x, y) for x, y in zip(a.tokens, c.tokens))
    size = pipe.spec.vae.patch * 6, pipe.spec.vae.patch * 5
    assert a.images[0].size == (size[1], size[0])  # PIL gives (width, height)


def test_item_seeds_do_not_depend_on_the_batch(pipe):
    batch = pipe(["a boat", "a tree"], seed=10, schedule=SCHEDULE, progress=False)
    alone = pipe(["a tree"], seed=[11], schedule=SCHEDULE, progress=False)
    assert torch.equal(batch.tokens[0][1:], alone.tokens[0])  # first scale: same draw
    assert len(batch.scale_seconds) == len(SCHEDULE)
    assert set(batch.stage_seconds) == {"condition", "transformer", "decode", "total"}
    assert batch.stage_peak_gib == {}  # the CPU has no allocator peak to tell


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the allocator's peak is CUDA's")
def test_stage_peaks_rise_where_a_stage_allocates():
    gpu = load_pipeline("infinity-tiny", device="cuda", dtype=torch.float32)
    torch.cuda.reset_peak_memory_stats()
    out = gpu(["a boat"], seed=1, progress=False)
    peaks = out.stage_peak_gib
    assert list(peaks) == ["condition", "transformer", "decode"]
    assert 0 < peaks["condition"] < peaks["transformer"] <= peaks["decode"]
    assert peaks["decode"] == torch.cuda.max_memory_allocated() / 2**30


def test_guidance_one_runs_without_the_unconditional_half(pipe):
    calls = []

    class Recorder(DenseAttention):
        def __call__(self, q, k, v, call):
            calls.append(q.shape[0])
            return super().__call__(q, k, v, call)

    pipe(["a boat"], cfg=1.0, schedule=SCHEDULE, attention=Recorder(), progress=False)
    pipe(["a boat"], cfg=3.0, schedule=SCHEDULE, attention=Recorder(), progress=False)
    n = len(SCHEDULE) * pipe.spec.transformer.depth
    assert calls == [1] * n + [2] * n


def test_every_self_attention_call_goes_through_the_policy(pipe):
    class Recorder(AttentionPolicy):
        def __init__(self):
            self.calls, self.resets = [], 0

        def reset(self):
            self.resets += 1
            self.calls.clear()

        def __call__(self, q, k, v, call):
            self.calls.append((call.layer, call.scale, q.shape[2], k.shape[2], call.kv_length, call.q_offset))
            return F.scaled_dot_product_attention(q, k, v, scale=call.softmax_scale)

    policy = Recorder()
    schedule = Schedule(((1, 1), (2, 3), (4, 4)))
    dense = pipe(["x"], seed=1, schedule=schedule, progress=False)
    out = pipe(["x"], seed=1, schedule=schedule, attention=policy, progress=False)
    depth = pipe.spec.transformer.depth
    expected = [
        (layer, k, schedule.lengths[k], schedule.kv_length(k), schedule.kv_length(k), schedule.offsets[k])
        for k in range(3) for layer in range(depth)
    ]
    assert policy.calls == expected and policy.resets == 1
    assert all(torch.equal(a, b) for a, b in zip(dense.tokens, out.tokens))
    pipe(["x"], seed=1, schedule=schedule, attention=policy, progress=False)
    assert policy.resets == 2 and len(policy.calls) == len(expected)


def test_policy_output_changes_the_image(pipe):
    class Zero(AttentionPolicy):
        def __call__(self, q, k, v, call):
            return torch.zeros_like(q)

    dense = pipe(["x"], seed=1, schedule=SCHEDULE, progress=False)
    zero = pipe(["x"], seed=1, schedule=SCHEDULE, attention=Zero(), progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(dense.tokens, zero.tokens))


def test_kv_cache_is_static_and_reused(pipe):
    views = []

    class Recorder(DenseAttention):
        def __call__(self, q, k, v, call):
            views.append((k.data_ptr(), k.shape[2]))
            return super().__call__(q, k, v, call)

    pipe(["a"], schedule=SCHEDULE, attention=Recorder(), progress=False)
    buffer = pipe._cache[1].buffer
    pipe(["b"], schedule=SCHEDULE, attention=Recorder(), progress=False)
    assert pipe._cache[1].buffer is buffer  # same shape: no new allocation
    # every scale of a layer reads the same storage, growing in length: written in place
    depth = pipe.spec.transformer.depth
    layer0 = views[: len(SCHEDULE) * depth : depth]
    assert len({ptr for ptr, _ in layer0}) == 1
    assert [n for _, n in layer0] == [SCHEDULE.kv_length(k) for k in range(len(SCHEDULE))]


def test_class_conditional_labels_and_errors():
    pipe = tiny_pipeline(text_width=0, num_classes=4)
    out = pipe([0, "3"], schedule=SCHEDULE, progress=False)
    assert len(out.images) == 2
    for bad in ([4], ["dog"], [-1]):
        with pytest.raises(SparvarError, match="class-conditional"):
            pipe(bad, schedule=SCHEDULE, progress=False)


def test_text_model_rejects_labels_and_bad_arguments(pipe):
    with pytest.raises(SparvarError, match="text-conditioned"):
        pipe([3], schedule=SCHEDULE, progress=False)
    with pytest.raises(SparvarError, match="seeds"):
        pipe(["a", "b"], seed=[1], schedule=SCHEDULE, progress=False)
    with pytest.raises(SparvarError, match="tau"):
        pipe(["a"], tau=0, schedule=SCHEDULE, progress=False)


PRESET_SCHEDULE = infinity_schedule("4:3", 512)  # 10 scales, not square: every preset has sparse scales


@pytest.fixture(scope="module")
def dense_last_logits(pipe):
    last = {}
    pipe(["a boat"], seed=2, schedule=PRESET_SCHEDULE, progress=False,
         on_scale=lambda k, logits, bits: last.update(logits=logits))
    return last["logits"]


# preset -> (share of attention FLOPs saved, relative error of the last scale's logits against dense's),
# recorded on this machine's CPU for seed 2 (`stats()` counts the tables; CS4A's keys depend on the data)
RECORDED = {"dense": (0.0, 0.0), "paper": (0.4322, 0.0116), "default": (0.3135, 0.0167),
            "paper-remap": (0.4401, 0.0144), "cs4a": (0.1399, 0.0065), "csla": (0.2923, 0.0074),
            "mass": (0.4198, 0.0111)}


@pytest.mark.parametrize("preset", RECORDED)
@pytest.mark.slow
def test_a_small_model_generates_with_each_preset(pipe, dense_last_logits, preset):
    last = {}
    out = pipe(["a boat"], seed=2, schedule=PRESET_SCHEDULE, attention=preset, progress=False,
               on_scale=lambda k, logits, bits: last.update(logits=logits))
    h, w = PRESET_SCHEDULE.sizes[-1]
    assert out.images[0].size == (w * pipe.spec.vae.patch, h * pipe.spec.vae.patch)
    stats = out.policy.stats()
    plan = out.policy.plan(pipe.spec.transformer.depth, PRESET_SCHEDULE)
    assert {e["mode"] for e in stats["entries"]} == {m for row in plan.modes for m in row}
    assert torch.isfinite(last["logits"]).all()
    if preset == "dense":
        assert stats["total"]["saved_fraction"] == 0 and torch.equal(last["logits"], dense_last_logits)
    else:
        assert stats["total"]["saved_fraction"] > 0.05 and not torch.equal(last["logits"], dense_last_logits)
    saved, error = RECORDED[preset]
    assert stats["total"]["saved_fraction"] == pytest.approx(saved, abs=2e-3)
    assert rel_err(last["logits"], dense_last_logits) <= 1.5 * error  # sparse, yet close to dense


def test_concat_cache_gives_the_same_generation(pipe):
    static = pipe(["a boat"], seed=3, schedule=SCHEDULE, progress=False)
    concat = pipe(["a boat"], seed=3, schedule=SCHEDULE, kv_cache="concat", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(static.tokens, concat.tokens))


def test_skip_last_stops_early_and_decodes_at_full_size(pipe):
    full = pipe(["a boat"], seed=3, schedule=SCHEDULE, progress=False)
    short = pipe(["a boat"], seed=3, schedule=SCHEDULE, skip_last=2, progress=False)
    assert len(short.tokens) == len(SCHEDULE) - 2 and len(short.scale_seconds) == len(SCHEDULE) - 2
    assert all(torch.equal(a, b) for a, b in zip(short.tokens, full.tokens))
    assert short.images[0].size == full.images[0].size
    assert not np.array_equal(np.asarray(short.images[0]), np.asarray(full.images[0]))
    with pytest.raises(SparvarError, match="skip_last"):
        pipe(["a boat"], schedule=SCHEDULE, skip_last=len(SCHEDULE), progress=False)


def test_cuda_graphs_need_a_gpu(pipe):
    if pipe.device.type == "cpu":
        with pytest.raises(SparvarError, match="cuda_graphs needs a CUDA device"):
            pipe(["a boat"], schedule=SCHEDULE, cuda_graphs=True, progress=False)

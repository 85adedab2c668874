"""GenerationConfig: every value checked when built, the model's defaults and schedules, the machine."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from helpers import tiny_pipeline
from sparvar import generation
from sparvar.errors import SparvarError
from sparvar.generation import MAX_SEED, GenerationConfig, kv_cache_bytes
from sparvar.models.registry import MODELS
from sparvar.schedules import VAR_256, VAR_512, infinity_schedule, parse_schedule


@pytest.mark.parametrize("options,message", [
    (dict(seed=-1), "seed must be in 0..9223372036854775807, got -1"),
    (dict(seed=2**63), "seed must be in 0..9223372036854775807, got 9223372036854775808"),
    (dict(seed=[0, 1.5]), "seed must be an integer, got 1.5"),
    (dict(seed="7"), "seed must be an integer or one integer per item"),
    (dict(cfg=-5), "cfg must be at least 0, got -5"),
    (dict(cfg=float("nan")), "cfg must be a finite number"),
    (dict(tau=0), "tau must be above 0, got 0"),
    (dict(top_k=-3), "top_k must be 0 or more, got -3"),
    (dict(top_k=2.5), "top_k must be an integer, got 2.5"),
    (dict(top_p=5), "top_p must be in [0, 1], got 5"),
    (dict(resolution=0), "resolution must be 1 or more, got 0"),
    (dict(schedule="1,2,x"), "cannot read scale 'x'"),
    (dict(schedule="1,2", aspect="4:3"), "give a schedule or an aspect ratio and resolution, not both"),
    (dict(attention="turbo"), "unknown attention preset 'turbo'"),
    (dict(attention=3), "attention takes a preset name or an AttentionPolicy"),
    (dict(skip_last=-1), "skip_last must be 0 or more, got -1"),
    (dict(prune="fast"), "unknown token pruning 'fast'"),
    (dict(adaptive_skip="yes"), "adaptive_skip takes True, False or an AdaptiveSkip"),
    (dict(kv_cache="paged"), "unknown kv_cache 'paged'; choose one of static, concat, lean, fp8"),
    (dict(kv_cache="concat", prune="fastvar"), "need a preallocated KV cache"),
    (dict(tiled_decode="yes"), "tiled_decode takes True, False or None"),
])
def test_a_bad_value_fails_when_the_config_is_built(options, message):
    with pytest.raises(SparvarError) as err:
        GenerationConfig(**options)
    assert message in str(err.value)


def test_build_replaces_fields_and_names_unknown_ones():
    base = GenerationConfig(seed=3, cfg=2.0)
    assert GenerationConfig.build(base, seed=[4, 5]) == GenerationConfig(seed=(4, 5), cfg=2.0)
    assert GenerationConfig.build(None, top_k=7) == GenerationConfig(top_k=7)
    with pytest.raises(SparvarError, match="unknown generation option.* sed; known: seed, cfg"):
        GenerationConfig.build(base, sed=1)
    with pytest.raises(SparvarError, match="top_p must be in"):  # replacing checks again
        GenerationConfig.build(base, top_p=1.5)
    with pytest.raises(SparvarError, match="config must be a GenerationConfig, not 5"):
        GenerationConfig.build(5)


def test_resolved_fills_in_the_model_defaults_and_its_schedule():
    var = GenerationConfig(top_k=5).resolved(MODELS["var-d16"])
    assert (var.cfg, var.tau, var.top_k, var.top_p, var.schedule) == (4.0, 1.0, 5, 0.95, VAR_256)
    tall = GenerationConfig(aspect="3:4", resolution=512).resolved(MODELS["infinity-2b"])
    assert tall.schedule == infinity_schedule("3:4", 512) and (tall.aspect, tall.resolution) == ("1:1", None)
    assert tall.resolved(MODELS["infinity-2b"]) == tall  # resolving twice changes nothing
    wider = replace(MODELS["var-tiny"], transformer=replace(MODELS["var-tiny"].transformer, schedule=VAR_512))
    assert GenerationConfig().resolved(wider).schedule == VAR_512  # a VAR model's own schedule is its config's


@pytest.mark.parametrize("model,schedule,message", [
    ("infinity-demo", "64,1", "infinity-demo generates only the schedules it was trained on (1 2 4 6 8 12 16 20 24 "
     "32 40 48 64 or 1 2 4 6 8 12 16 20 24 32), not 64 1"),
    ("infinity-demo", "1,2,4,8", "not 1 2 4 8"),
    ("var-tiny", "1,2,3", "var-tiny generates only the schedule it was trained on"),
    ("infinity-tiny", "1,2,100000", "scale 100000x100000 of schedule 1 2 100000 is beyond infinity-tiny's position "
     "grid of 128x128 tokens"),
    ("infinity-tiny", ",".join(["1"] * 16), "has 16 scales; infinity-tiny has level embeddings for 15"),
    ("infinity-tiny", "1,4,2", "shrinks from 4x4 to 2x2"),
])
def test_a_schedule_the_model_cannot_generate_is_refused(model, schedule, message):
    with pytest.raises(SparvarError) as err:
        GenerationConfig(schedule=schedule).resolved(MODELS[model])
    assert message in str(err.value)


def test_the_demo_takes_its_own_schedule_and_stops_early_with_skip_last():
    spec = MODELS["infinity-demo"]
    config = GenerationConfig(schedule="1,2,4,6,8,12,16,20,24,32,40,48,64", skip_last=11).resolved(spec)
    assert config.schedule == spec.schedule()
    prefix = GenerationConfig(resolution=512).resolved(spec).schedule  # its first 10 scales, trained first
    assert prefix == spec.schedule().truncated(10) and prefix in spec.only_schedules
    with pytest.raises(SparvarError, match="skip_last must be in 0..12 for 13 scales, got 13"):
        GenerationConfig(skip_last=13).resolved(spec)
    with pytest.raises(SparvarError, match="token pruning needs at least 5 scales"):
        GenerationConfig(schedule="1,2,3", prune="fastvar").resolved(MODELS["infinity-tiny"])


def test_seeds_per_item():
    assert GenerationConfig(seed=7).seeds(3) == [7, 8, 9]
    assert GenerationConfig(seed=MAX_SEED).seeds(1) == [MAX_SEED]
    with pytest.raises(SparvarError, match="leaves no room for 2 images"):
        GenerationConfig(seed=MAX_SEED).seeds(2)
    with pytest.raises(SparvarError, match="2 seeds for 3 conditions"):
        GenerationConfig(seed=[1, 2]).seeds(3)


def test_kv_cache_estimate_is_the_size_of_the_cache_the_pipeline_allocates():
    pipe = tiny_pipeline()
    schedule = parse_schedule("1,2,3x4")
    cache = pipe.transformer.new_kv_cache(3, schedule.total)
    assert kv_cache_bytes(pipe.spec, schedule, 3, torch.float32) == cache.buffer.numel() * cache.buffer.element_size()


def test_check_device_refuses_what_the_machine_cannot_run(monkeypatch):
    spec = MODELS["infinity-tiny"]
    cpu = torch.device("cpu")
    with pytest.raises(SparvarError, match="cuda_graphs needs a CUDA device"):
        GenerationConfig(cuda_graphs=True).resolved(spec).check_device(spec, cpu, torch.float32, 1)
    config = GenerationConfig(schedule="1,2,4").resolved(spec)
    parts = config.memory_needed(spec, torch.float32, 1)
    assert parts == {  # cfg 3: the batch runs twice through the transformer, once through the decoder
        "KV cache": kv_cache_bytes(spec, config.schedule, 2, torch.float32),
        "activations": 2 * 16 * 64 * 24 * 4,  # rows, tokens of the 4x4 scale, width, ACTIVATION_WIDTHS, float32
        "decoder": 4 * 32 * 8 * 8 * 4,  # DECODER_MAPS of 32 channels at 8x8 pixels (4x4 tokens, patch 2)
    }
    need = sum(parts.values())
    monkeypatch.setattr(generation, "device_memory", lambda device: need)
    config.check_device(spec, cpu, torch.float32, 1)  # it just fits
    monkeypatch.setattr(generation, "device_memory", lambda device: need - 1)
    with pytest.raises(SparvarError, match=r"^1 image\(s\) of schedule 1 2 4 with guidance in float32 need about "
                       r"0.3 MB besides the weights \(KV cache 0.1 MB, activations 0.2 MB, decoder 0.0 MB\), more than "
                       r"the 0.3 MB available on cpu; generate fewer images at once$"):
        config.check_device(spec, cpu, torch.float32, 1)


def test_the_pipeline_takes_a_config_and_keywords_that_replace_its_fields():
    pipe = tiny_pipeline()
    config = GenerationConfig(seed=3, schedule="1,2,4")
    by_keywords = pipe(["a boat"], seed=4, schedule="1,2,4", progress=False)
    by_config = pipe(["a boat"], config, seed=4, progress=False)
    assert np.array_equal(np.asarray(by_keywords.images[0]), np.asarray(by_config.images[0]))
    assert not np.array_equal(np.asarray(pipe(["a boat"], config, progress=False).images[0]),
                              np.asarray(by_config.images[0]))
    with pytest.raises(SparvarError, match="top_p must be in"):
        pipe(["a boat"], config, top_p=2, progress=False)

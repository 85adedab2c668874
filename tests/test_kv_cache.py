"""The lean and FP8 KV caches (kv_cache.StagedKVCache) against the static one."""

from __future__ import annotations

import pytest
import torch

from helpers import same_generation, teacher_forced_logits, tiny_pipeline, var_pipeline
from sparvar.cli import main as cli_main
from sparvar.generation import GenerationConfig, kv_cache_bytes
from sparvar.kernels.fp8 import quantize_rows_reference
from sparvar.kv_cache import KVCache, StagedKVCache
from sparvar.loading import load_pipeline
from sparvar.schedules import parse_schedule
from sparvar.sparsity import make_policy

SCHEDULE = parse_schedule("1,2,3x4,4,6x5")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.mark.slow
def test_a_cache_of_the_last_scale_run_is_left_out(pipe):
    pipe(["a boat"], seed=0, schedule=SCHEDULE, kv_cache="lean", skip_last=1, progress=False)
    cache = pipe._cache[1]
    assert isinstance(cache, StagedKVCache) and cache.stored == SCHEDULE.offsets[-2] and cache.scale is None
    assert cache.staging.shape[3] == SCHEDULE.total


@pytest.mark.parametrize("options", [{}, dict(skip_last=2), dict(attention="default"), dict(prune="fastvar")])
@pytest.mark.slow
def test_lean_cache_gives_the_static_generation(pipe, options):
    static = pipe(["a boat", "a tree"], seed=3, schedule=SCHEDULE, progress=False, **options)
    lean = pipe(["a boat", "a tree"], seed=3, schedule=SCHEDULE, kv_cache="lean", progress=False, **options)
    assert same_generation(static, lean)


@pytest.mark.slow
def test_lean_cache_gives_the_static_generation_for_var():
    var = var_pipeline()
    assert same_generation(var([3, 5], seed=1, progress=False), var([3, 5], seed=1, kv_cache="lean", progress=False))


@pytest.mark.slow
def test_lean_cache_gives_the_static_generation_for_hart():
    """HART's text prefix sits in scale 0's slot of the cache like any scale's tokens."""
    hart = load_pipeline("hart-tiny", device="cpu", random_weights=True)
    assert same_generation(hart(["a cat"], seed=1, progress=False),
                           hart(["a cat"], seed=1, kv_cache="lean", progress=False))


def test_fp8_cache_reads_back_the_quantised_prefix_and_the_exact_new_keys():
    torch.manual_seed(0)
    b, h, d, lengths = 2, 3, 16, (1, 4, 6)
    staged = StagedKVCache(1, b, h, sum(lengths), sum(lengths[:-1]), d, torch.float32, "cpu", fp8=True)
    static = KVCache(1, b, h, sum(lengths), d, torch.float32, "cpu")
    start = 0
    for n in lengths:
        k, v = torch.randn(b, h, n, d), torch.randn(b, h, n, d) * 5
        keys, values = staged.write(0, start, k, v)
        exact_k, exact_v = static.write(0, start, k, v)
        for got, exact in ((keys, exact_k), (values, exact_v)):
            rows = quantize_rows_reference(exact[:, :, :start])
            torch.testing.assert_close(got[:, :, :start], rows.data.float() * rows.scale)  # earlier scales: FP8
            assert torch.equal(got[:, :, start:], exact[:, :, start:])  # its own: exact
        start += n
    assert staged.data.dtype == torch.float8_e4m3fn and staged.data.shape[4] == sum(lengths[:-1])


@pytest.mark.slow
def test_fp8_cache_stays_close_to_the_static_one(pipe):
    static = pipe(["a boat"], seed=3, schedule=SCHEDULE, progress=False)
    logits = []
    pipe(["a boat"], seed=3, schedule=SCHEDULE, kv_cache="fp8", progress=False,
         on_scale=lambda k, lg, t: logits.append(lg))
    assert isinstance(pipe._cache[1], StagedKVCache) and pipe._cache[1].scale is not None
    # scale 0 reads no cache, scale 1 reads FP8 keys: given the same tokens, logits move by FP8 error only
    forced = teacher_forced_logits(pipe, ["a boat"], SCHEDULE, static.tokens, 3.0)
    first = SCHEDULE.lengths[0]
    assert torch.allclose(logits[0], forced[:, :first], atol=1e-4)
    rel = (logits[1] - forced[:, first:first + SCHEDULE.lengths[1]]).norm() / logits[1].norm()
    assert 0 < rel < 0.05


@pytest.mark.parametrize("kind", ["static", "lean", "fp8"])
@pytest.mark.parametrize("skip_last", [0, 1])
@pytest.mark.slow
def test_kv_cache_bytes_counts_the_buffers(pipe, kind, skip_last):
    pipe(["a"], seed=0, schedule=SCHEDULE, kv_cache=kind, skip_last=skip_last, progress=False)
    cache = pipe._cache[1]
    tensors = [cache.buffer] if kind == "static" else [cache.data, cache.staging] + ([cache.scale] * (kind == "fp8"))
    have = sum(t.numel() * t.element_size() for t in tensors)
    assert kv_cache_bytes(pipe.spec, SCHEDULE, 2, torch.float32, kind, skip_last) == have


def test_kv_cache_option_is_one_line_on_the_command_line(capsys, tmp_path):
    assert cli_main(["generate", "--model", "var-tiny", "--kv-cache", "huge", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "error: unknown kv_cache 'huge'; choose one of static, concat, lean, fp8\n"
    assert not (tmp_path / "out").exists()


def test_kv_cache_kinds_are_checked():
    with pytest.raises(Exception, match="unknown kv_cache 'fp4'"):
        GenerationConfig(kv_cache="fp4")
    with pytest.raises(Exception, match="preallocated KV cache"):
        GenerationConfig(kv_cache="concat", prune="fastvar")
    GenerationConfig(kv_cache="fp8", prune="fastvar", attention=make_policy("default"))

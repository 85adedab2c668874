"""Bookkeeping of `sparvar bench fp8` on fake rows (its timings need a GPU), and the per-scale
times `sparvar bench memory` now records."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from sparvar.bench import fp8, kernels, memory
from sparvar.bench.common import provenance


def layer(name, rows, bf16, slow, fast, quantise=None, torchao=None):
    row = {"layer": name, "rows": rows, "bf16_ms": bf16, "scaled_mm_slow_ms": slow, "scaled_mm_fast_ms": fast,
           "fp8_rel_err": 0.03}
    if quantise is not None:
        row["quantise_ms"] = quantise
    if torchao is not None:
        row["torchao_ms"] = torchao
    return row


LAYERS = [
    layer("sa.proj", 2, 0.020, 0.025, 0.028, quantise=0.002),  # fast accumulation losing, for fp8_best
    layer("ffn.fc2", 2, 0.040, 0.050, 0.045, quantise=0.003),
    layer("sa.proj", 8192, 0.300, 0.220, 0.190, quantise=0.020, torchao=0.260),
    layer("ffn.fc2", 8192, 1.200, 0.800, 0.700, quantise=0.080, torchao=0.900),
]


def test_layer_shapes_are_an_infinity_blocks_fp8_layers_run_per_scale():
    from sparvar.models.registry import INFINITY_FP8

    shapes = fp8.layer_shapes(3584, 14336)
    assert set(shapes) == set(INFINITY_FP8) - {"ca.mat_kv"}  # the text projection runs once per generation
    assert shapes["sa.mat_qkv"] == (3584, 10752, None) and shapes["ffn.fc2"] == (14336, 3584, "gelu")


def test_each_way_counts_the_quantising_pass_and_the_best_kernel():
    ways = fp8.fp8_ways(LAYERS[1])
    assert ways == pytest.approx({"fp8_before": 0.053, "fp8_now": 0.048, "fp8_best": 0.048, "torchao": None})
    assert fp8.fp8_ways(LAYERS[0]) == pytest.approx({"fp8_before": 0.027, "fp8_now": 0.030, "fp8_best": 0.027,
                                                     "torchao": None})
    assert fp8.fp8_ways(LAYERS[3])["torchao"] == 0.9  # torchao quantises inside its own call


def test_per_scale_sums_a_blocks_layers_times_the_depth():
    scales = fp8.per_scale(LAYERS, depth=40)
    assert [s["rows"] for s in scales] == [2, 8192]
    assert scales[0]["bf16_ms"] == pytest.approx(40 * 0.060) and scales[0]["fp8_now_ms"] == pytest.approx(40 * 0.078)
    assert scales[0]["fp8_best_ms"] == pytest.approx(40 * 0.075) and scales[1]["fp8_now_ms"] == pytest.approx(40 * 0.99)
    assert scales[0]["torchao_ms"] is None and scales[1]["torchao_ms"] == pytest.approx(40 * 1.16)
    summary = fp8.summarize(scales, [{"setting": "bf16", "latency_s": 0.67}, {"setting": "fp8", "error": "x"}])
    assert summary["matmul_bf16_s"] == pytest.approx(40 * 1.56 / 1000) and summary["matmul_torchao_s"] is None
    assert summary["bf16_latency_s"] == 0.67 and summary["fp8_latency_s"] is None
    assert summary["matmul_fp8_now_s"] == pytest.approx(40 * (0.078 + 0.99) / 1000)
    assert set(summary) == {"matmul_bf16_s", "matmul_fp8_before_s", "matmul_fp8_now_s", "matmul_fp8_best_s",
                            "matmul_torchao_s", "bf16_latency_s", "fp8_latency_s"}


def test_markdown_has_every_layer_scale_and_generation():
    scales = fp8.per_scale(LAYERS, depth=40)
    gens = [{"setting": "bf16", "latency_s": 0.67, "scale_s": [0.0084, 0.2270]}, {"setting": "fp8", "error": "OOM"}]
    result = {**provenance("c"), "model": "infinity-8b", "depth": 40, "torchao": "missing", "layers": LAYERS,
              "scales_matmul": scales, "generations": gens, "summary": fp8.summarize(scales, gens)}
    md = fp8.to_markdown(result)
    assert md.count("| sa.proj |") == 2 and md.count("| ffn.fc2 |") == 2 and "torchao: missing." in md
    assert "| bf16 | 0.670 | 8.4 227.0 |" in md and "| fp8 | - | OOM |" in md
    assert "| sa.proj | 2 | 0.020 | 0.002 | 0.025 | 0.028 | - | 0.0300 |" in md
    assert "| ffn.fc2 | 8192 | 1.200 | 0.080 | 0.800 | 0.700 | 0.900 | 0.0300 |" in md
    assert "| 2 | 2.40 | 3.20 | 3.12 | 3.00 | - |" in md and "| matmul_fp8_now_s | 0.043 |" in md


def test_a_layer_row_has_every_way_timed(monkeypatch):
    """bench_layer end to end on the CPU (torch 2.13's CPU `_scaled_mm` takes rowwise scales), with
    one call per timing."""
    import sparvar.bench.kernels
    from sparvar.models.fp8 import cpu_takes_rowwise_scales

    if not cpu_takes_rowwise_scales():
        pytest.skip("this torch's CPU _scaled_mm takes one scale per operand (torch 2.11)")
    monkeypatch.setattr(sparvar.bench.kernels, "time_ms", lambda fn: fn() is not None and 1.0)
    row = fp8.bench_layer("ffn.fc2", 64, 48, "gelu", 4, device="cpu")
    fp8.time_torchao(row, lambda linear: linear, device="cpu")
    timed = {key for key, value in row.items() if key.endswith("_ms") and value == 1.0}
    assert timed == {"bf16_ms", "quantise_ms", "scaled_mm_slow_ms", "scaled_mm_fast_ms", "torchao_ms"}
    assert {key for key in row if key.endswith("_ms")} == timed and 0 < row["fp8_rel_err"] < 0.1


def test_a_missing_torchao_is_said_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import fails
    assert fp8.load_torchao() == (None, "missing")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("torchao is missing")


@pytest.mark.parametrize("bench", [lambda: fp8.run("infinity-8b", False, 1, "unused", "c"),
                                   lambda: kernels.run_kernel_bench("unused", "c", ["8b"], [12])])
def test_the_fp8_and_kernel_benches_need_a_gpu(bench):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(Exception, match="needs a CUDA GPU"):
        bench()


def test_memory_settings_record_the_median_time_of_each_scale(monkeypatch):
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 2 * memory.GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 3 * memory.GIB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (76 * memory.GIB, 80 * memory.GIB))
    pool = {"total_size": memory.GIB // 2, "segment_pool_id": (1, 0)}
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: [{"total_size": memory.GIB, "segment_pool_id": (0, 0)},
                                                                 pool])
    monkeypatch.setattr("sparvar.sparsity.make_policy", lambda *a, **kw: None)
    per_scale = iter([[9.0, 9.0]] * 3 + [[1.0, 5.0], [3.0, 4.0], [2.0, 6.0]])  # three warm-ups (graphs) first
    peaks = iter([{"transformer": 9.0}] * 3 + [{"transformer": 1.5}, {"transformer": 7.0}, {"transformer": 8.0}])

    class Pipe:
        spec = SimpleNamespace(family=SimpleNamespace(source_image=None))

        def schedule(self):
            return None

        def __call__(self, *args, **kwargs):
            return SimpleNamespace(scale_seconds=next(per_scale), stage_peak_gib=next(peaks))

    row = memory.time_setting(Pipe(), memory.SETTINGS["bf16"], repeats=3)
    assert row["peak_gib"] == 2.0 and len(row["latencies_s"]) == 3 and row["scale_s"] == [2.0, 5.0]
    assert row["reserved_gib"] == 3.0 and row["device_used_gib"] == 4.0 and row["graph_pool_gib"] == 0.5
    assert row["stage_peak_gib"] == {"transformer": 1.5}  # the first timed generation's, after the reset

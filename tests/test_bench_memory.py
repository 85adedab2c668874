"""Bookkeeping of `sparvar bench memory` and `sparvar bench fp8-fidelity`, on fake rows and tiny models."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from sparvar.bench import fp8_fidelity, memory
from sparvar.bench.common import provenance
from sparvar.bench.memory import SETTINGS, fastest_within, summarize, to_markdown


def row(model, name, latency, peak):
    return {"model": model, "setting": name, **asdict(SETTINGS[name]), "latency_s": latency, "peak_gib": peak}


ROWS = [
    row("infinity-8b", "bf16", 0.64, 31.8),
    row("infinity-8b", "bf16 lean-kv", 0.65, 27.2),
    row("infinity-8b", "bf16 lean-kv text-offload", 0.70, 23.4),
    row("infinity-8b", "bf16 lean-kv block-stream", 9.0, 9.0),
    row("infinity-8b", "fp8", 0.45, 23.0),
    row("infinity-8b", "fp8 lean-kv", 0.46, 18.7),
    row("infinity-8b", "fp8 fp8-kv", 0.47, 15.6),  # 0.1 GiB over the 16 GiB card's limit
    row("infinity-8b", "fp8 fp8-kv text-offload", 0.50, 13.4),
    row("infinity-8b", "fp8 fp8-kv block-stream", 4.0, 6.1),
    row("infinity-2b", "fp8 fp8-kv text-offload", 0.2, 4.2),
    row("infinity-2b", "fp8 fp8-kv block-stream", 1.5, 2.9),
    {"model": "infinity-2b", "setting": "bf16", **asdict(SETTINGS["bf16"]), "error": "OutOfMemoryError: ..."},
]


def test_summary_picks_the_fastest_setting_under_each_budget():
    s = summarize(ROWS)
    assert s["8b_bf16_default_latency_s"] == 0.64 and s["8b_fp8_default_latency_s"] == 0.45
    # 24 GiB without FP8: fp8 (23.0) is faster but FP8; lean-kv (27.2) does not fit
    assert s["settings"]["24g"] == "bf16 lean-kv text-offload" and s["8b_24g_bf16_peak_gib"] == 23.4
    assert s["8b_24g_bf16_over_bf16_latency"] == pytest.approx(0.70 / 0.64)
    assert s["settings"]["16g"] == "fp8 fp8-kv text-offload" and s["8b_16g_peak_gib"] == 13.4
    assert s["8b_16g_over_bf16_latency"] == pytest.approx(0.50 / 0.64)
    assert s["settings"]["12g"] == "fp8 fp8-kv block-stream" and s["8b_12g_peak_gib"] == 6.1
    assert s["settings"]["2b_lowmem"] == "fp8 fp8-kv block-stream" and s["2b_lowmem_peak_gib"] == 2.9


def test_summary_keys_stay_when_nothing_fits_or_rows_failed():
    s = summarize([r for r in ROWS if r.get("peak_gib", 99) > 20])  # only large peaks, and the failed row
    assert s["settings"]["16g"] is None and s["8b_16g_peak_gib"] is None and s["8b_16g_over_bf16_latency"] is None
    assert set(s) >= {"8b_bf16_default_latency_s", "8b_fp8_default_latency_s", "8b_24g_bf16_peak_gib",
                      "8b_24g_bf16_over_bf16_latency", "8b_16g_peak_gib", "8b_16g_over_bf16_latency",
                      "8b_12g_peak_gib", "2b_lowmem_peak_gib"}
    assert fastest_within(ROWS, "infinity-2b", 100.0)["setting"] == "fp8 fp8-kv text-offload"  # failed rows skipped


def test_markdown_lists_every_row_and_the_proofs():
    result = {**provenance("c"), "title": "t", "rows": ROWS,
              "summary": summarize(ROWS), "proofs": {"16g": {"setting": "x", "peak_gib": 13.0, "latency_s": 0.5},
                                                      "24g": {"setting": "y", "error": "OutOfMemoryError"}}}
    md = to_markdown(result)
    assert md.count("| infinity-") == len(ROWS) and "failed: OutOfMemoryError" in md
    assert "ran, peak 13.00 GiB" in md and "| 24g | bf16 lean-kv text-offload | OutOfMemoryError |" in md


def test_memory_bench_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(Exception, match="needs a CUDA GPU"):
        memory.run(["infinity-2b"], 1, "unused", "c")


@pytest.mark.slow
def test_fp8_fidelity_rows_on_tiny_models(tmp_path):
    rows = fp8_fidelity.logit_rows("infinity-tiny", "cpu", None) + fp8_fidelity.logit_rows("var-tiny", "cpu", None)
    variants = {r["variant"] for r in rows}
    assert variants == set(fp8_fidelity.VARIANTS)
    kv_only = [r for r in rows if r["variant"] == "fp8-kv"]
    assert all(r["logit_rel_err"] == 0 for r in kv_only if r["scale"] == 0)  # scale 0 reads no cache
    assert all(0 <= r["logit_rel_err"] < 0.2 and r["greedy_agreement"] > 0.8 for r in rows)
    summary = fp8_fidelity.summarize(rows, [{"variant": "fp8", "psnr_pooled_db": 40.0},
                                            {"variant": "default", "psnr_pooled_db": 33.0}])
    assert summary["demo_fp8_costs_less_than_default"] is True
    assert summary["tiny_fp8_max_logit_rel_err"] == max(r["logit_rel_err"] for r in rows
                                                        if r["model"] == "infinity-tiny" and r["variant"] == "fp8")


def test_first_different_scale_is_where_the_tokens_part():
    reference = [torch.zeros(3, 1, 2), torch.zeros(3, 4, 2), torch.zeros(3, 9, 2)]
    tokens = [t.clone() for t in reference]
    tokens[1][0, 3, 1] = 1  # sample 0 parts at scale 1, sample 1 at scale 2, sample 2 never
    tokens[2][0, 0, 0] = tokens[2][1, 8, 1] = 1
    assert fp8_fidelity.first_different_scale(tokens, reference).tolist() == [1, 2, 3]


@pytest.mark.slow
def test_the_greedy_loop_feeds_its_own_choices():
    from sparvar.loading import load_pipeline

    pipe = load_pipeline("var-tiny", device="cpu", random_weights=True)
    schedule = pipe.schedule()
    logits, tokens = fp8_fidelity.scale_loop(pipe, [3], schedule, "static")
    again, _ = fp8_fidelity.scale_loop(pipe, [3], schedule, "lean", tokens)
    assert all(torch.equal(t, lg.argmax(-1)) for t, lg in zip(tokens, logits))
    assert all(torch.allclose(a, b) for a, b in zip(logits, again))

"""Bookkeeping of `sparvar bench kernels` on fake rows (its timings need a GPU): the summary of a
partial run, FlashAttention-4's and FlashInfer's columns, and the one line said without a package."""

from __future__ import annotations

import sys

from sparvar.bench import kernels
from sparvar.bench.common import provenance


def sparse(scale, table, nominal, tflops, model="8b", **more):
    row = {"kind": "sparse", "model": model, "scale": scale, "table": table, "nominal_density": nominal,
           "density": nominal or 0.165, "triton_ms": 1.0, "triton_tflops": tflops, "flex_ms": 1.2, "sdpa_flash_ms": 3.5,
           "sdpa_cudnn_ms": 2.3, "speedup_vs_flex": 1.2, "speedup_vs_sdpa_flash": 3.5, "speedup_vs_sdpa_cudnn": 2.3,
           "fa4_ms": None, "fa4_tflops": None, "fa4_dense_ms": None, "fa4_dense_tflops": None}
    return {**row, **more}


ROWS = [
    sparse(12, "random 10%", 0.10, 400.0, fa4_ms=0.5, fa4_tflops=550.0, fa4_first_call_s=2.5,
           fa4_rel_err_vs_triton=1e-3),
    sparse(12, "random 25%", 0.25, 500.0, fa4_ms=0.6, fa4_tflops=640.0, fa4_first_call_s=0.1,
           fa4_rel_err_vs_triton=2e-3, auto_backend="fa4"),
    sparse(12, "random 50%", 0.50, 450.0),  # FA4 failed on this table
    sparse(12, "random 100%", 1.00, 440.0, fa4_ms=1.7, fa4_tflops=700.0, fa4_dense_ms=1.67, fa4_dense_tflops=738.0,
           fa4_first_call_s=0.2, fa4_rel_err_vs_triton=1e-3),
    sparse(12, "paper CSLA (x)", None, 420.0, speedup_vs_sdpa_cudnn=4.99, fa4_speedup_vs_flex=1.5,
           fa4_speedup_vs_sdpa_cudnn=7.0, auto_backend="fa4"),
]


def test_a_run_of_one_scale_summarises_what_it_ran():
    s = kernels.summarize(ROWS)
    assert s["triton_csla_paper_s12_8b_vs_cudnn"] == 4.99 and s["triton_min_tflops_density_25_to_50"] == 450.0
    assert s["triton_min_tflops_density_10_to_50"] == 400.0 and s["decision_time_over_sdpa_flash"] is None
    assert s["fa4_min_tflops_density_25_to_50"] == 640.0 and s["fa4_min_tflops_density_10_to_50"] == 550.0
    assert s["fa4_csla_paper_s12_8b_vs_cudnn"] == 7.0 and s["fa4_dense_s12_8b_tflops"] == 738.0
    assert s["met"]["decision_time_over_sdpa_flash"] is False
    empty = kernels.summarize([])
    assert empty["paper_table"] is None and not any(empty["met"].values())


def test_the_targets_keys_take_each_table_from_the_backend_auto_ran():
    s = kernels.summarize(ROWS)
    # FA4 on the 25% and paper tables, ours on the 10% and 50% (FA4 did not run there) and on 100%
    assert s["min_tflops_density_25_to_50"] == 450.0 and s["min_tflops_density_10_to_50"] == 400.0
    assert s["csla_paper_s12_8b_vs_cudnn"] == 7.0 and s["met"]["csla_paper_s12_8b_vs_cudnn"] is True
    assert s["csla_paper_s12_8b_vs_flex"] == 1.5 and s["dense_vs_sdpa_flash"] == 3.5
    faster = [{**r, "triton_tflops": 700.0} if r["table"] == "random 50%" else r for r in ROWS]
    assert kernels.summarize(faster)["min_tflops_density_25_to_50"] == 640.0
    recorded_before = [{k: v for k, v in r.items() if k != "auto_backend"} for r in ROWS]
    assert kernels.summarize(recorded_before)["csla_paper_s12_8b_vs_cudnn"] == 4.99


def test_markdown_shows_fa4_where_it_ran():
    result = {**provenance("c"), "rows": ROWS, "summary": kernels.summarize(ROWS)}
    md = kernels.to_markdown(result)
    assert md.count("| 8b | 12 |") == len(ROWS) + 3  # the table's rows and FA4's three that ran
    assert "| 8b | 12 | random 100% | 0.20 | 1.0e-03 | 1.670 | 738 |" in md
    assert "| fa4_dense_s12_8b_tflops | 738.000 | - | - |" in md
    assert "| triton_csla_paper_s12_8b_vs_cudnn | 4.990 | - | - |" in md
    assert "triton.testing.do_bench (each call launched from the host)" in md
    graphed = kernels.to_markdown({**result, "cuda_graphs": True})
    assert "one CUDA graph of 20 calls replayed 10 times, per call" in graphed
    assert "| 8b | 12 | random 25% | 0.250 | 1.000 | 500 |" in md and md.count(" 7.00 | fa4 |") == 1


def test_a_missing_package_is_said_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    assert kernels.installed("flash_attn.cute", "flash-attn-4", "FA4") is False
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("flash-attn-4 is missing") and "no FA4 columns" in out[0]
    assert kernels.installed("json", "json", "JSON") is True and capsys.readouterr().out == ""


def test_flashinfer_rows_are_summarised_and_shown_apart_its_failures_too():
    rows = [sparse(12, "random 25%", 0.25, 500.0, flashinfer_ms=0.7, flashinfer_tflops=560.0,
                   flashinfer_first_call_s=40.0, flashinfer_rel_err_vs_triton=2e-3, flashinfer_speedup_vs_triton=1.43),
            sparse(12, "random 50%", 0.50, 450.0, flashinfer_ms=None, flashinfer_tflops=None,
                   flashinfer_first_call_s=None, flashinfer_rel_err_vs_triton=None, flashinfer_speedup_vs_triton=None,
                   flashinfer_error="RuntimeError: nvcc failed"),
            sparse(12, "paper CSLA (x)", None, 420.0, flashinfer_speedup_vs_flex=1.6, flashinfer_speedup_vs_sdpa_cudnn=6.5)]
    s = kernels.summarize(rows)
    assert s["flashinfer_min_tflops_density_25_to_50"] == 560.0 and s["flashinfer_csla_paper_s12_8b_vs_cudnn"] == 6.5
    assert s["min_tflops_density_25_to_50"] == 450.0  # "auto" never runs FlashInfer
    md = kernels.to_markdown({**provenance("c"), "rows": rows, "summary": s})
    assert "| 8b | 12 | random 25% | 40.00 | 2.0e-03 | 0.700 | 560 | 1.43 |  |" in md
    assert "| 8b | 12 | random 50% | - | - | - | - | - | RuntimeError: nvcc failed |" in md
    assert "| flashinfer_csla_paper_s12_8b_vs_flex | 1.600 | - | - |" in md
    without = kernels.to_markdown({**provenance("c"), "rows": ROWS, "summary": kernels.summarize(ROWS)})
    assert "FlashInfer (`VariableBlockSparseAttentionWrapper`)" not in without

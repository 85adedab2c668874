"""Bookkeeping of `sparvar bench memory` and `sparvar bench fp8-fidelity`, on fake rows and tiny models."""

from __future__ import annotations

import contextlib
from dataclasses import asdict

import pytest
import torch

from sparvar.bench import fp8_fidelity, memory
from sparvar.bench.common import provenance
from sparvar.bench.memory import SETTINGS, candidates, summarize, to_markdown


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


NAMES = {setting: name for name, setting in SETTINGS.items()}


def fake_proofs(monkeypatch, fails=(), rows=ROWS):
    """memory.prove over `rows` with loading and timing faked: a proof runs at its row's numbers
    nudged (peak + 0.01 GiB, latency x 1.1, so the summary shows which it took), except the
    (model, setting) pairs in `fails`, which run out of memory in their first replay.
    Returns (proofs, [(model, setting, card GiB) of each attempt])."""
    calls, cap = [], []
    monkeypatch.setattr(memory, "_load", lambda model, setting: (model, NAMES[setting]))
    monkeypatch.setattr(memory, "_capped", lambda gib: cap.append(gib) or contextlib.nullcontext())

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.28 GiB.")

    def time_setting(pipe, setting, repeats):
        model, name = pipe
        calls.append((model, name, cap[-1]))
        if (model, name) in fails:
            return memory._in_phase("first replay", oom)
        r = next(r for r in rows if r["model"] == model and r["setting"] == name)
        return {"latency_s": r["latency_s"] * 1.1, "peak_gib": r["peak_gib"] + 0.01, "reserved_gib": r["peak_gib"] + 1}

    monkeypatch.setattr(memory, "time_setting", time_setting)
    return memory.prove(rows, 1), calls


def test_candidates_fit_each_card_in_the_order_they_are_proven():
    names = {card: [r["setting"] for r in candidates(ROWS, card)] for card in memory.CARDS}
    # 24 GiB without FP8: fp8 (23.0) is faster but FP8; lean-kv (27.2) does not fit
    assert names["24g"] == ["bf16 lean-kv text-offload", "bf16 lean-kv block-stream"]
    # 16 GiB: fp8 fp8-kv (15.6) is 0.1 GiB over 16 - 0.5; the rest fastest first
    assert names["16g"] == ["fp8 fp8-kv text-offload", "fp8 fp8-kv block-stream", "bf16 lean-kv block-stream"]
    assert names["12g"] == ["fp8 fp8-kv block-stream", "bf16 lean-kv block-stream"]
    assert names["2b_lowmem"] == ["fp8 fp8-kv block-stream", "fp8 fp8-kv text-offload"]  # lowest peak first


def test_a_failed_proof_falls_back_to_the_next_setting_and_only_proven_ones_count(monkeypatch):
    proofs, calls = fake_proofs(monkeypatch, fails={("infinity-8b", "fp8 fp8-kv text-offload")})
    first, second = proofs["16g"]
    assert first["setting"] == "fp8 fp8-kv text-offload" and "latency_s" not in first
    assert first["error"].startswith("OutOfMemoryError: CUDA out of memory") and first["phase"] == "first replay"
    assert "test_bench_memory.py" not in (first["where"] or "") and first["card_gib"] == 16
    assert second["setting"] == "fp8 fp8-kv block-stream" and second["peak_gib"] == pytest.approx(6.11)
    assert [len(proofs[c]) for c in memory.CARDS] == [1, 2, 1, 1]  # each card stops at its first that ran
    assert ("infinity-8b", "fp8 fp8-kv text-offload", 16) in calls
    assert ("infinity-2b", "fp8 fp8-kv block-stream", 8) in calls

    s = summarize(ROWS, proofs)
    assert s["8b_bf16_default_latency_s"] == 0.64 and s["8b_fp8_default_latency_s"] == 0.45  # unconstrained rows
    assert s["settings"] == {"24g": "bf16 lean-kv text-offload", "16g": "fp8 fp8-kv block-stream",
                             "12g": "fp8 fp8-kv block-stream", "2b_lowmem": "fp8 fp8-kv block-stream"}
    # the proven setting's numbers, from its proof: not the failed text-offload's 13.4 GiB / 0.50 s
    assert s["8b_16g_peak_gib"] == pytest.approx(6.11) and s["8b_16g_over_bf16_latency"] == pytest.approx(4.4 / 0.64)
    assert s["8b_24g_bf16_peak_gib"] == pytest.approx(23.41)
    assert s["8b_24g_bf16_over_bf16_latency"] == pytest.approx(0.77 / 0.64)
    assert s["8b_12g_peak_gib"] == pytest.approx(6.11) and s["2b_lowmem_peak_gib"] == pytest.approx(2.91)

    md = to_markdown({**provenance("c"), "title": "t", "rows": ROWS, "summary": s, "proofs": proofs})
    assert "| 16g | 1 | fp8 fp8-kv text-offload | failed in first replay" in md
    assert "| 16g | 2 | fp8 fp8-kv block-stream (picked) | ran, peak 6.11 GiB (reserved 7.10), 4.400 s |" in md
    for card, name in s["settings"].items():  # the markdown's picks are the JSON's
        assert md.count(f"| {card} |") == len(proofs[card]) and f"| {name} (picked) |" in md
    assert "| 8b_16g_peak_gib | 6.110 |" in md


def test_a_card_with_no_proven_setting_gives_none_after_three_tries(monkeypatch):
    rows = [row(r["model"], r["setting"], r["latency_s"], 15.0) if r["setting"] == "fp8 lean-kv" else r for r in ROWS]
    fails = {("infinity-8b", n) for n in ("fp8 lean-kv", "fp8 fp8-kv text-offload", "fp8 fp8-kv block-stream",
                                          "bf16 lean-kv block-stream")}
    proofs, calls = fake_proofs(monkeypatch, fails, rows)
    assert len(candidates(rows, "16g")) == 4 and memory.MAX_TRIES == 3
    tried = [a["setting"] for a in proofs["16g"]]
    assert tried == ["fp8 lean-kv", "fp8 fp8-kv text-offload", "fp8 fp8-kv block-stream"]
    assert all("error" in a for a in proofs["16g"] + proofs["12g"]) and len(proofs["12g"]) == 2
    s = summarize(rows, proofs)
    assert s["settings"]["16g"] is None and s["8b_16g_peak_gib"] is None and s["8b_16g_over_bf16_latency"] is None
    assert s["settings"]["12g"] is None and s["8b_12g_peak_gib"] is None
    assert s["settings"]["24g"] == "bf16 lean-kv text-offload"  # its first proof ran
    md = to_markdown({**provenance("c"), "title": "t", "rows": rows, "summary": s, "proofs": proofs})
    assert "| 16g | - | no proven setting in 3 tries | - |" in md and "(picked)" not in md.split("| 16g |", 1)[1][:600]
    assert "| 8b_16g_peak_gib | - |" in md


def test_summary_keys_stay_when_nothing_fits_or_rows_failed(monkeypatch):
    rows = [r for r in ROWS if r.get("peak_gib", 99) > 20]  # only large peaks, and the failed row
    proofs, calls = fake_proofs(monkeypatch, rows=rows)
    assert proofs["16g"] == [] and proofs["12g"] == [] and proofs["2b_lowmem"] == []
    assert calls == [("infinity-8b", "bf16 lean-kv text-offload", 24)]  # 23.4 GiB: only the 24 GiB card's
    s = summarize(rows, proofs)
    assert s["settings"]["16g"] is None and s["8b_16g_peak_gib"] is None and s["8b_16g_over_bf16_latency"] is None
    assert set(s) >= {"8b_bf16_default_latency_s", "8b_fp8_default_latency_s", "8b_24g_bf16_peak_gib",
                      "8b_24g_bf16_over_bf16_latency", "8b_16g_peak_gib", "8b_16g_over_bf16_latency",
                      "8b_12g_peak_gib", "2b_lowmem_peak_gib"}
    md = to_markdown({**provenance("c"), "title": "t", "rows": rows, "summary": s, "proofs": proofs})
    assert "| 16g | - | none of infinity-8b's settings peaks under 15.5 GiB | - |" in md
    assert "| 2b_lowmem | - | none of infinity-2b's settings peaks under 7.5 GiB | - |" in md


def test_no_picks_are_claimed_for_models_the_run_did_not_measure(monkeypatch):
    rows = [{**r, "model": "varedit-8b-1024"} for r in ROWS]
    proofs, calls = fake_proofs(monkeypatch, rows=rows)
    assert proofs == {} and calls == []
    s = summarize(rows, proofs)
    assert set(s["settings"].values()) == {None} and s["8b_16g_peak_gib"] is None
    md = to_markdown({**provenance("c"), "title": "t", "rows": rows, "summary": s, "proofs": proofs})
    assert "none of" not in md and "| 16g |" not in md and "| card | try |" not in md
    assert "Picks are made for infinity-8b (cards 24g, 16g, 12g) and infinity-2b (card 2b_lowmem) only" in md
    only_2b = [r for r in ROWS if r["model"] == "infinity-2b"]
    proofs, _ = fake_proofs(monkeypatch, rows=only_2b)
    assert list(proofs) == ["2b_lowmem"]
    md = to_markdown({**provenance("c"), "title": "t", "rows": only_2b, "summary": summarize(only_2b, proofs),
                      "proofs": proofs})
    assert "| 2b_lowmem | 1 | fp8 fp8-kv block-stream (picked) |" in md and "| 16g |" not in md
    assert "no pick, for: 24g (infinity-8b), 16g (infinity-8b), 12g (infinity-8b)." in md


def test_markdown_lists_every_row():
    result = {**provenance("c"), "title": "t", "rows": ROWS, "summary": summarize(ROWS, {}), "proofs": {}}
    md = to_markdown(result)
    assert md.count("| infinity-") == len(ROWS) and "failed: OutOfMemoryError" in md
    assert all(line.count("|") == 12 for line in md.splitlines() if line.startswith("| infinity-"))
    peaked = {**ROWS[0], "stage_peak_gib": {"condition": 16.0, "transformer": 29.5, "decode": 31.8},
              "reserved_gib": 33.3, "graph_pool_gib": 3.25}
    # the decoder set the peak; the graphs' pool is a column of its own
    assert "| 0.640 | 31.80 | 29.50 | 33.30 | 3.25 |" in to_markdown({**result, "rows": [peaked]})


def test_an_out_of_memory_error_keeps_its_numbers_and_drops_the_advice():
    message = ("CUDA out of memory. Tried to allocate 224.00 MiB. GPU 0 has a total capacity of 139.80 GiB of which "
               "123.02 GiB is free. Including non-PyTorch memory, this process has 16.76 GiB memory in use. 16.00 GiB "
               "allowed; Of the allocated memory 13.98 GiB is allocated by PyTorch, with 827.02 MiB allocated in "
               "private pools (e.g., CUDA Graphs), and 1.85 GiB is reserved by PyTorch but unallocated. If reserved "
               "but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    text = memory.describe_error(torch.OutOfMemoryError(message))
    assert text.startswith("OutOfMemoryError: CUDA out of memory.")
    assert text.endswith("1.85 GiB is reserved by PyTorch but unallocated.")
    from sparvar.offload import OffloadedModule

    with pytest.raises(RuntimeError) as raised:
        memory._in_phase("eager warm-up", OffloadedModule, torch.nn.Linear(2, 2), "no-such-device")
    assert raised.value.phase == "eager warm-up"
    where = memory._where(raised.value)
    assert where.startswith("offload.py:") and where.endswith(" __init__")  # sparvar's frame, not the bench's


def test_free_memory_is_told_by_pool():
    mib = 2**20
    block = lambda size, state: {"size": size * mib, "state": state}  # noqa: E731
    segments = [  # a split default segment (a freed 2 GiB buffer partly reused), a whole one, a graph pool's
        {"total_size": 2048 * mib, "allocated_size": 400 * mib, "segment_pool_id": (0, 0),
         "blocks": [block(400, "active_allocated"), block(1648, "inactive")]},
        {"total_size": 224 * mib, "allocated_size": 224 * mib, "segment_pool_id": (0, 0),
         "blocks": [block(224, "active_allocated")]},
        {"total_size": 1024 * mib, "allocated_size": 200 * mib, "segment_pool_id": (1, 0),
         "blocks": [block(200, "active_allocated"), block(824, "inactive")]},
    ]
    free = memory.free_by_pool(segments)
    assert free == pytest.approx({"default_pool_free_gib": 1648 / 1024, "default_pool_largest_free_gib": 1648 / 1024,
                                  "graph_pools_free_gib": 824 / 1024})
    assert memory.graph_pools_gib(segments) == 1.0 and memory.graph_pools_gib(segments[:2]) == 0.0


def test_text_offload_without_graphs_keeps_no_kv_cache_between_generations():
    """What the `fp8 fp8-kv text-offload eager` setting counts on: with the text encoder offloaded and
    no CUDA graphs, the KV cache is dropped before the decoder and the next text encoding."""
    from sparvar.loading import load_pipeline

    assert SETTINGS["fp8 fp8-kv text-offload eager"] == memory.Setting("fp8", "text", "fp8", cuda_graphs=False)
    pipe = load_pipeline("infinity-tiny", device="cpu", random_weights=True, offload="text")
    seen, text = [], pipe._text
    pipe._text = lambda *args: seen.append(pipe._cache) or text(*args)
    for seed in range(2):
        pipe(["a boat"], seed=seed, kv_cache="fp8", progress=False)
        assert pipe._cache is None
    assert seen == [None, None]  # no cache on the device while the text encoder visits


def test_memory_bench_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(Exception, match="needs a CUDA GPU"):
        memory.run(["infinity-2b"], 1, "unused", "c")


@pytest.mark.parametrize("users", [None, "max_split_size_mb:64"])
def test_memory_bench_grows_expandable_segments_unless_the_user_set_the_allocator(monkeypatch, tmp_path, users):
    """The 16 GiB proof ran only with expandable segments; a user's PYTORCH_CUDA_ALLOC_CONF is kept,
    and the record names what ran."""
    applied = []
    if users is None:
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", users)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", applied.append)
    monkeypatch.setattr(memory, "bench", lambda *args: [])
    monkeypatch.setattr(memory, "provenance", lambda command: {"card": "test", "date": "d", "torch": "t",
                                                               "triton": None, "cuda": None, "commit": None,
                                                               "command": command})
    result = memory.run(["infinity-8b"], 1, str(tmp_path), "c")
    assert result["allocator_conf"] == (users or "expandable_segments:True")
    assert applied == ([] if users else ["expandable_segments:True"])
    assert f"PYTORCH_CUDA_ALLOC_CONF={result['allocator_conf']}" in (tmp_path / "memory.md").read_text()


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

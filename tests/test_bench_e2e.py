"""The end-to-end benchmark's bookkeeping (the timings themselves need a GPU), and its official
mode's runner on a small official model where a clone of the official code is at hand."""

import datetime
import os
import sys

import numpy as np
import pytest
import torch

from sparvar.bench import official
from sparvar.bench.common import provenance
from sparvar.bench.e2e import _summary, add_speedups, markdown


def _row(mode, latency, **extra):
    stages = {"condition": 0.01, "transformer": latency - 0.05, "decode": 0.04, "total": latency}
    return {"model": "infinity-8b", "mode": mode, "latency_s": latency, "stages_s": stages,
            "attention_share_eager": 0.2, "peak_gib": 30.0, "scale_s": [0.1], "scales": [[1, 1]], **extra}


def test_official_rows_give_speedups_and_render_without_stages():
    rows = [{"model": "infinity-8b", "mode": "o", "latency_s": 1.6, "peak_gib": 34.5},
            _row("a", 1.3), _row("d", 0.64)]
    add_speedups(rows)
    assert rows[2]["speedup_over_o"] == pytest.approx(2.5)
    assert rows[2]["speedup_over_a"] == pytest.approx(1.3 / 0.64)
    summary = _summary(rows)
    assert summary["8b_d_over_o"] == pytest.approx(2.5) and summary["8b_o_latency_s"] == 1.6
    text = markdown({**provenance("cmd"), "title": "t", "rows": rows, "modes": {"o": "official", "a": "a", "d": "d"},
                     "summary": summary})
    official_line = next(line for line in text.splitlines() if line.startswith("| infinity-8b | o |"))
    assert "| 1.600 |" in official_line and "| - |" in official_line and "34.5" in official_line
    d_line = next(line for line in text.splitlines() if line.startswith("| infinity-8b | d |"))
    assert "2.50x" in d_line


def test_rows_show_each_generations_host_time_outside_its_stages_and_in_the_collector():
    row = _row("d", 0.66, outside_stages_s=[0.005, 0.031], gc_s=[0.0, 0.024])
    text = markdown({**provenance("cmd"), "title": "t", "rows": [row], "modes": {"d": "d"}, "summary": {}})
    d_line = next(line for line in text.splitlines() if line.startswith("| infinity-8b | d |"))
    assert d_line.endswith("| 30.0 | 5 (0), 31 (24) |")


def test_collector_time_counts_collections_made_inside_only():
    import gc

    from sparvar.bench.e2e import CollectorTime

    gc.collect()
    with CollectorTime() as inside:
        pass
    assert inside.seconds == 0.0
    with CollectorTime() as inside:
        gc.collect()
    gc.collect()
    assert inside.seconds > 0.0 and inside._note not in gc.callbacks


CLONE = os.environ.get("SPARVAR_INFINITY_CLONE")


@pytest.mark.skipif(not CLONE, reason="set SPARVAR_INFINITY_CLONE to a clone of FoundationVision/Infinity")
def test_official_runner_makes_images_of_two_models_in_one_process():
    """bench e2e builds the official 8B, then the 2B, in one process."""
    from dataclasses import replace

    from sparvar.bench.official import OfficialInfinity
    from sparvar.models.registry import get_spec

    for name in ("infinity-8b", "infinity-2b"):
        spec = get_spec(name)
        spec = replace(spec, transformer=replace(spec.transformer, depth=2, width=64, heads=1, block_chunks=2,
                                                 text_width=128),
                       vae=replace(spec.vae, base=32),
                       text=dict(spec.text, d_model=128, num_layers=1, num_heads=2, d_kv=64, d_ff=256,
                                 vocab_size=300))
        official = OfficialInfinity(CLONE, spec, torch.device("cpu"))
        image = official("a red fox", spec.schedule("1:1", 256), seed=0)
        assert image.shape == (256, 256, 3) and image.dtype == torch.uint8
        assert image.float().std() > 1  # a picture, not a constant


def test_hart_runs_the_modes_without_token_pruning_and_gets_its_summary():
    from sparvar.bench.e2e import E2E_MODES, modes_for

    assert list(modes_for("hart-0.7b", E2E_MODES)) == ["a", "b", "c", "d", "e", "i"]
    assert list(modes_for("infinity-8b", E2E_MODES)) == list(E2E_MODES)
    rows = [dict(_row(m, t), model="hart-0.7b") for m, t in (("a", 0.9), ("b", 0.45), ("d", 0.3), ("e", 0.15))]
    add_speedups(rows)
    summary = _summary(rows)
    assert summary["hart_d_over_a"] == pytest.approx(3.0) and summary["hart_e_over_a"] == pytest.approx(6.0)
    assert summary["hart_d_over_b"] == pytest.approx(1.5)


def test_e2e_refuses_unknown_models_and_the_official_infinity_mode_for_hart():
    from sparvar.bench.e2e import main
    from sparvar.errors import SparvarError

    with pytest.raises(SparvarError, match="unknown model"):
        main(["--models", "hart-9b"])
    with pytest.raises(SparvarError, match="one family that has one"):
        main(["--models", "hart-0.7b", "--official", "/nowhere"])
    with pytest.raises(SparvarError, match="one family that has one"):  # two repositories: one path cannot be both
        main(["--models", "infinity-8b", "varedit-8b-1024", "--official", "/nowhere"])
    with pytest.raises(SparvarError, match="not a clone of HiDream-ai/VAREdit"):
        main(["--models", "varedit-8b-1024", "--official", "/nowhere"])


@pytest.mark.slow
def test_the_modes_of_a_varedit_row_edit_a_picture_on_the_cpu():
    """What `bench e2e --models varedit-8b-1024` runs, on varedit-tiny without CUDA graphs: every
    mode edits the benchmark's picture; the official-style concatenated cache (a) and the static
    one (b) draw the same tokens (both dense)."""
    from dataclasses import replace

    from helpers import edit_pipeline, same_generation
    from sparvar.bench.common import generation_inputs
    from sparvar.bench.e2e import E2E_MODES, modes_for
    from sparvar.kernels import reference_only

    pipe = edit_pipeline()
    prompt, inputs = generation_inputs(pipe.spec)
    assert set(inputs) == {"image"}
    modes = modes_for("varedit-8b-1024", E2E_MODES)
    assert list(modes) == ["a", "b", "c", "d", "e", "i"]
    outs = {}
    for name, mode in modes.items():
        config = replace(mode.config, cuda_graphs=False)
        policy = mode.attention() if name != "c" else None  # c's FlexAttention tables need CUDA
        with reference_only() if not mode.fused else __import__("contextlib").nullcontext():
            outs[name] = pipe([prompt], config, attention=policy, seed=0, progress=False, **inputs)
        assert outs[name].images[0].size == inputs["image"].size
    assert same_generation(outs["a"], outs["b"])
    assert len(outs["e"].tokens) == len(outs["d"].tokens) - 2


VAREDIT_CLONE = os.environ.get("SPARVAR_VAREDIT_CLONE")


@pytest.mark.skipif(not VAREDIT_CLONE, reason="set SPARVAR_VAREDIT_CLONE to a clone of HiDream-ai/VAREdit")
def test_official_varedit_runner_edits_a_picture():
    """bench e2e's mode o for VAREdit models: the official code builds a (small) model as its
    loader does and edits the picture as infer.generate_image does."""
    from dataclasses import replace

    from PIL import Image

    from sparvar.bench.official import RUNNERS
    from sparvar.models.registry import get_spec

    spec = get_spec("varedit-8b-1024")
    spec = replace(spec, transformer=replace(spec.transformer, depth=2, width=64, heads=1, block_chunks=2,
                                             text_width=128, resolution=256),
                   vae=replace(spec.vae, base=32),
                   text=dict(spec.text, d_model=128, num_layers=1, num_heads=2, d_kv=64, d_ff=256, vocab_size=300))
    official = RUNNERS[spec.family.official_code](VAREDIT_CLONE, spec, torch.device("cpu"))
    picture = Image.new("RGB", (90, 60), (20, 120, 220))
    edited = official("make it red", spec.schedule(), seed=0, image=picture)
    assert edited.size == picture.size
    assert np.asarray(edited).std() > 1  # a picture, not a constant


def test_pytz_stand_in_where_it_is_missing(monkeypatch):
    """The GPU machine has no pytz, which the official Infinity code imports to stamp log lines."""
    real_find_spec = official.importlib.util.find_spec
    monkeypatch.setattr(official.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytz" else real_find_spec(name, *a))
    monkeypatch.delitem(sys.modules, "pytz", raising=False)
    before = set(sys.modules)
    try:
        official._install_stand_ins()
        zone = sys.modules["pytz"].timezone("Asia/Shanghai")
        assert zone.utcoffset(None) == datetime.timedelta(hours=8)
        with pytest.raises(KeyError):
            sys.modules["pytz"].timezone("Europe/Paris")
    finally:  # stand-ins (modules no import made: no __spec__) leave with the test
        for name in set(sys.modules) - before:
            if getattr(sys.modules[name], "__spec__", None) is None:
                del sys.modules[name]

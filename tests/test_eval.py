"""sparvar eval and analyze: metrics, the attention-error probe, property measurements, outputs."""

import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import difference_picture, tiny_pipeline
from sparvar.attention.policy import AttentionPolicy, DenseAttention
from sparvar.bench.common import provenance
from sparvar.cli import main
from sparvar.errors import SparvarError
from sparvar.eval.analyze import (
    PropertyProbe,
    TableRecorder,
    draw_tables,
    head_mean_probs,
    locality,
    resize_map,
    source_locality,
)
from sparvar.eval.draw import difference_map
from sparvar.eval.metrics import lpips_model, psnr, ssim, to_tensor
from sparvar.eval.quality import ErrorProbe, conditions_of, evaluate, preset_configs, summary, to_markdown
from sparvar.generation import GenerationConfig
from sparvar.models.registry import get_spec
from sparvar.schedules import Schedule, parse_schedule
from sparvar.sparsity import make_policy

SCHEDULE = parse_schedule("1,2,3,4,6,8,12,16")  # sinks 0-4, CS4A decides at 5, CSLA at 5-7


def test_psnr_and_ssim_on_known_images():
    a = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(psnr(a, a)).all() and torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(psnr(a, a + 0.1), torch.full((2,), 20.0, dtype=torch.float64))  # MSE 0.01
    noisy = (a + 0.2 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    s = ssim(a, noisy)
    assert (s < 0.9).all() and torch.allclose(s, ssim(noisy, a))
    image = Image.fromarray(np.full((4, 4, 3), 255, dtype=np.uint8))
    assert to_tensor([image]).shape == (1, 3, 4, 4) and to_tensor([image]).max() == 1.0


def test_ssim_is_scikit_image_s():
    """Wang et al.'s SSIM as scikit-image computes it (Gaussian window of sigma 1.5, population
    covariances, means over the positions whose window fits): an independent implementation."""
    from skimage.metrics import structural_similarity

    gen = torch.Generator().manual_seed(2)
    a = torch.rand(3, 3, 24, 20, generator=gen, dtype=torch.float64)
    b = (a + 0.15 * torch.randn(a.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    b[2] = a[2].flip(-1)  # structure moved, not noise
    want = [structural_similarity(x.numpy(), y.numpy(), channel_axis=0, data_range=1.0, gaussian_weights=True,
                                  sigma=1.5, use_sample_covariance=False) for x, y in zip(a, b)]
    assert ssim(a, b).tolist() == pytest.approx(want, abs=1e-9)


def test_difference_map_draws_the_gained_difference():
    gen = np.random.default_rng(0)
    a, b = (Image.fromarray(gen.integers(0, 256, (6, 5, 3), dtype=np.uint8)) for _ in range(2))
    drawn = np.asarray(difference_map(a, b)).astype(int)
    assert np.abs(drawn - difference_picture(a, b)).max() <= 1  # the ramp's rounding
    black, grey = Image.new("RGB", (2, 2)), Image.new("RGB", (2, 2), (16, 16, 16))
    # 16 levels of 255 times the gain 4 is a quarter of full scale: the ramp's second colour
    assert np.abs(np.asarray(difference_map(black, grey))[0, 0].astype(int) - [59, 82, 139]).max() <= 1


def test_lpips_runs_when_it_can_and_says_why_not(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lpips", None)  # `import lpips` fails
    assert lpips_model("cpu") == (None, "LPIPS skipped: the lpips package is not installed (pip install lpips)")
    fake = types.ModuleType("lpips")
    fake.LPIPS = lambda net, verbose: torch.nn.Identity() if net == "alex" else None
    monkeypatch.setitem(sys.modules, "lpips", fake)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    cache = tmp_path / "checkpoints"
    assert lpips_model("cpu") == (None, f"LPIPS skipped: AlexNet's weights (alexnet-owt-*.pth) are not in {cache}")
    cache.mkdir()
    (cache / "alexnet-owt-7be5be79.pth").write_bytes(b"")
    model, note = lpips_model("cpu")
    assert isinstance(model, torch.nn.Identity) and note == "LPIPS: AlexNet"


@pytest.mark.slow
def test_error_probe_returns_the_inner_output_and_measures_its_error():
    class Zero(AttentionPolicy):
        def __call__(self, q, k, v, call):
            return torch.zeros_like(q)

    pipe = tiny_pipeline(text_width=0, num_classes=3)
    zero, dense = ErrorProbe(Zero()), ErrorProbe(DenseAttention())
    pipe([1], schedule=SCHEDULE, attention=zero, progress=False)
    pipe([1], schedule=SCHEDULE, attention=dense, progress=False)
    depth = pipe.spec.transformer.depth
    assert np.allclose(zero.errors(depth, len(SCHEDULE)), 1.0)
    assert np.allclose(dense.errors(depth, len(SCHEDULE)), 0.0)


@pytest.mark.slow
def test_evaluate_compares_presets_on_the_same_seeds():
    pipe = tiny_pipeline(text_width=0, num_classes=3)
    runs = preset_configs(pipe.spec, [0, 2], ["dense", "paper", "default"], GenerationConfig(schedule=SCHEDULE),
                          pipe.device, pipe.transformer.dtype, batch=3)
    results = evaluate(pipe, [0, 2], [0, 1], runs, batch=3, progress=False)
    dense, paper = results["presets"]["dense"], results["presets"]["paper"]
    assert results["samples"] == 4 and dense["density"] == 1.0 and dense["attention_rel_error_max"] == 0.0
    assert 0 < paper["density"] < 1 and paper["attention_rel_error_max"] > 0
    assert paper["psnr"] > 0 and -1 <= paper["ssim"] <= 1
    errors = np.array(paper["attention_rel_error"])
    assert errors.shape == (pipe.spec.transformer.depth, len(SCHEDULE)) and (errors[:, :5] == 0).all()
    results = {**provenance("sparvar eval"), **results, "summary": summary(results)}
    assert results["summary"]["paper_density"] == paper["density"] and results["summary"]["samples"] == 4
    gain = results["presets"]["default"]["psnr"] - paper["psnr"]
    assert results["summary"]["default_minus_paper_psnr_db"] == gain
    text = to_markdown(results)
    assert "| dense |" in text and "| paper |" in text and "paper_psnr" in text


@pytest.mark.slow
def test_eval_command_writes_json_and_markdown(tmp_path):
    out, prompts = tmp_path / "q", tmp_path / "prompts.txt"
    prompts.write_text("a boat\n\na tree\n")
    argv = ["eval", "--model", "infinity-tiny", "--prompts", str(prompts), "--seeds", "1", "--presets", "dense,default",
            "--resolution", "512", "--out", str(out), "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    results = json.loads((out / "eval.json").read_text())
    assert results["samples"] == 2 and results["conditions"] == ["a boat", "a tree"]
    assert set(results["summary"]) == {"samples", "default_psnr", "default_ssim", "default_density"}
    assert results["presets"]["default"]["density"] < 1
    assert "| default |" in (out / "eval.md").read_text()
    assert main(["eval", "--model", "var-tiny", "--out", str(out), "--quiet"]) == 2  # which classes: --labels


def test_without_prompts_a_text_model_is_evaluated_on_its_example():
    """eval and calibrate-skip on the demo model draw its example prompt; other text models need a file."""
    assert conditions_of(get_spec("infinity-demo"), None) == ["grinning face"]
    with pytest.raises(SparvarError, match="infinity-tiny is text-conditioned: give --prompts FILE"):
        conditions_of(get_spec("infinity-tiny"), None)


def test_attention_maps_resize_and_locality():
    s = parse_schedule("2,4")
    m = torch.rand(4, 4)
    assert torch.allclose(resize_map(m, (2, 2), (2, 2), (2, 2), (2, 2)), m)
    const = resize_map(torch.full((4, 4), 0.25), (2, 2), (2, 2), (4, 4), (4, 4))
    assert const.shape == (16, 16) and torch.allclose(const, torch.full((16, 16), 0.25))
    # all mass on each query's own cell of its own scale: fully local at any radius
    p = torch.cat([torch.zeros(16, 4), torch.eye(16)], dim=1)
    assert locality(p, s, 1, 0, 0) == pytest.approx(1.0)
    spread = torch.full((16, 20), 1 / 20)
    assert locality(spread, s, 1, 1, 0) == pytest.approx(1 / 16)
    q, k = torch.randn(3, 5, 8), torch.randn(3, 7, 8)
    assert torch.allclose(head_mean_probs(q, k, 0.5).sum(-1), torch.ones(5))


def test_source_locality_is_the_share_near_each_querys_place_on_the_source():
    s = Schedule(((1, 1), (2, 2)), source=(4, 4))  # keys: the 16 source cells, then scales 0 and 1
    y, x = np.divmod(np.arange(4), 2)  # the 2x2 scale's queries land on source cells (2y, 2x)
    p = torch.zeros(4, 21)
    p[np.arange(4), 2 * y * 4 + 2 * x] = 0.5
    p[:, 16:] = 0.1  # mass elsewhere does not count
    assert source_locality(p, s, 1, 0) == pytest.approx(1.0)
    uniform = torch.cat([torch.full((4, 16), 1 / 32), torch.full((4, 5), 0.1)], dim=1)
    assert source_locality(uniform, s, 1, 0) == pytest.approx(1 / 16)
    assert source_locality(uniform, s, 1, 1) == pytest.approx(np.mean([9, 6, 6, 4]) / 16)  # 3x3 windows, clipped


@pytest.mark.slow
def test_analyze_measures_the_source_of_an_edit_on_random_weights(tmp_path):
    from PIL import Image

    picture = tmp_path / "in.png"
    Image.new("RGB", (20, 12), (200, 50, 50)).save(picture)
    argv = ["analyze", "--model", "varedit-tiny", "--image", str(picture), "--attention", "paper", "--radii", "1,3",
            "--out", str(tmp_path / "a"), "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "a" / "analyze.json").read_text())
    grids = {name: np.array(grid) for name, grid in report["layers"].items()}
    assert {"source_mass", "source_locality_r1", "source_locality_r3"} <= set(grids) and report["random_weights"]
    assert ((grids["source_mass"] > 0) & (grids["source_mass"] + grids["sink_mass"] <= 1 + 1e-6)).all()
    assert (grids["source_locality_r1"] <= grids["source_locality_r3"] + 1e-9).all()  # wider window, more mass
    assert "say nothing about a trained model" in (tmp_path / "a" / "analyze.md").read_text()


@pytest.mark.slow
def test_property_probe_and_table_pictures(tmp_path):
    pipe = tiny_pipeline(text_width=0, num_classes=3)
    probe = PropertyProbe(5, [1, 2], sinks=5)
    pipe([1], schedule=SCHEDULE, attention=probe, progress=False)
    depth = pipe.spec.transformer.depth
    keys = {(layer, k) for layer in range(depth) for k in range(5, len(SCHEDULE))}
    assert set(probe.sink_mass) == set(probe.cross) == set(probe.local[1]) == keys
    for values in (probe.sink_mass, probe.cross, probe.local[1], probe.local[2]):
        assert all(-1e-6 <= v <= 1 + 1e-6 for v in values.values())
    assert all(probe.local[1][key] <= probe.local[2][key] + 1e-9 for key in keys)  # wider window, more mass

    policy = make_policy("paper")
    recorder = TableRecorder(policy)
    pipe([1], schedule=SCHEDULE, attention=policy, progress=False)
    modes = policy.plan(depth, SCHEDULE).modes
    sparse = {(layer, k) for layer in range(depth) for k in range(len(SCHEDULE)) if modes[layer][k] in ("cs4a", "csla")}
    assert sparse and sparse <= set(recorder.tables)
    files = draw_tables({key: recorder.tables[key] for key in sparse}, modes, tmp_path)
    distinct = {id(recorder.tables[key][0]) for key in sparse}  # CSLA's tables are shared by its layers
    assert len(files) == len(distinct) < len(sparse) and all((tmp_path / f).is_file() for f in files)


@pytest.mark.slow
def test_analyze_command_writes_measurements_and_pictures(tmp_path, capsys):
    argv = ["analyze", "--model", "infinity-tiny", "--resolution", "512", "--out", str(tmp_path), "--device", "cpu",
            "--radii", "1,3"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "analyze.json").read_text())
    assert report["sink_scales"] == 5 and report["query_scales"] == [5, 6, 7, 8, 9]
    shown = capsys.readouterr().out
    assert shown.index("1/3 dense generation") < shown.index("2/3 default generation") < shown.index("3/3 drawing")
    assert set(report["layers"]) == {"sink_mass", "cross_scale_similarity", "locality_r1", "locality_r3"}
    assert all((tmp_path / name).is_file() for name in report["pictures"])
    assert any(name.startswith("table_") for name in report["pictures"])


@pytest.mark.slow
def test_evaluate_takes_skipping_and_pruning_combinations():
    pipe = tiny_pipeline(text_width=0, num_classes=3)
    presets = ["dense", "default+skip2", "fastvar", "fastvar+skip2", "dense+adaptive"]
    runs = preset_configs(pipe.spec, [0, 2], presets, GenerationConfig(schedule=SCHEDULE), pipe.device,
                          pipe.transformer.dtype, batch=2)
    results = evaluate(pipe, [0, 2], [0], runs, batch=2, progress=False)
    rows = results["presets"]
    assert rows["dense"]["flops_share"] == 1.0 and rows["dense"]["scales_used_mean"] == len(SCHEDULE)
    assert rows["default+skip2"]["scales_used_mean"] == len(SCHEDULE) - 2
    assert rows["fastvar+skip2"]["flops_share"] < rows["default+skip2"]["flops_share"] < 1
    assert rows["fastvar"]["flops_share"] < 1 and rows["fastvar"]["scales_used_mean"] == len(SCHEDULE)
    assert rows["fastvar"]["density"] == 1.0 and 0 < rows["fastvar"]["psnr"] < 100
    assert len(SCHEDULE) - 2 <= rows["dense+adaptive"]["scales_used_mean"] <= len(SCHEDULE)
    assert "skipped" in rows["default+skip2"]["description"] and "FastVAR" in rows["fastvar"]["description"]
    results = {**provenance("sparvar eval"), **results, "summary": summary(results)}
    assert {"default+skip2_psnr", "fastvar+skip2_flops"} <= set(results["summary"])
    assert "| fastvar+skip2 |" in to_markdown(results)

"""tools/calibrate_default.py: candidate settings against dense on calibration prompts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_pipeline

from sparvar.errors import SparvarError
from sparvar.sparsity import get_config
from tools.calibrate_default import calibrate, choice, read_candidates


def test_candidates_are_settings_over_a_preset(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"paper": {}, "wide": {"csla_windows_from_end": [9, 5], "topk": 0.3},
                                "ablation": {"preset": "csla", "sink_scales": 6}}))
    candidates = read_candidates(path)
    assert candidates["paper"] == get_config("paper")
    assert candidates["wide"] == get_config("paper", csla_windows_from_end=(9, 5), topk=0.3)
    assert candidates["ablation"] == get_config("csla", sink_scales=6)
    for text, error in (("{", "cannot read candidates file"), ("[1]", "must hold"), ('{"a": {"top": 1}}', "top"),
                        ('{"a": {"preset": "fast"}}', "unknown attention preset"),
                        ('{"a": {"local_windows": 7}}', "candidate 'a' in .*not iterable")):
        path.write_text(text)
        with pytest.raises(SparvarError, match=error) as raised:
            read_candidates(path)
        assert "\n" not in str(raised.value)


def test_the_choice_is_the_best_psnr_at_no_more_density_than_the_paper():
    row = lambda psnr, density, planned: {"psnr": psnr, "density": density,  # noqa: E731
                                          "planned_density": {"demo": density, "infinity-8b": planned}}
    rows = {"paper": row(30.0, 0.25, 0.248), "denser": row(31.0, 0.26, 0.24),
            "plans-more-on-8b": row(30.9, 0.24, 0.25), "lean": row(30.5, 0.245, 0.245), "leaner": row(30.2, 0.2, 0.2)}
    assert choice(rows) == "lean"
    assert choice({"paper": row(30.0, 0.25, 0.248), "worse": row(29.0, 0.2, 0.2)}) == "paper"
    assert choice({"lean": row(30.5, 0.245, 0.245)}) is None


@pytest.mark.slow
def test_calibration_measures_candidates_once_and_keeps_their_record(tmp_path):
    pipe = tiny_pipeline()
    run = lambda candidates, conditions=("a cat", "a dog"): calibrate(  # noqa: E731
        pipe, list(conditions), 1, candidates, 2, tmp_path / "dense.pt", tmp_path, "cal", "cmd")
    first = run({"paper": get_config("paper", group=16), "dense": get_config("dense")})
    rows = first["candidates"]
    assert rows["dense"]["psnr"] == 100 and rows["dense"]["density"] == 1 and rows["dense"]["settings"] == {
        "cs4a": False, "csla": False}
    assert 0 < rows["paper"]["density"] < 1 and rows["paper"]["psnr"] < 100 and len(rows["paper"]["psnr_per_image"]) == 2
    assert set(rows["paper"]["planned_density"]) == {"infinity-tiny", "infinity-2b", "infinity-8b"}
    second = run({"paper": get_config("paper", group=16), "more": get_config("paper", group=16, topk=0.5)})
    assert second["candidates"]["paper"] == rows["paper"] and list(second["candidates"]) == ["paper", "dense", "more"]
    assert json.loads((tmp_path / "cal.json").read_text())["commands"] == ["cmd", "cmd"]
    assert "| more | group=16, topk=0.5 |" in (tmp_path / "cal.md").read_text()
    assert "paper's): `paper`, +0.00 dB over the paper." in (tmp_path / "cal.md").read_text()  # the others: denser
    with pytest.raises(SparvarError, match="other settings: rename it"):
        run({"more": get_config("paper", topk=0.5)})
    with pytest.raises(SparvarError, match="other prompts or seeds"):
        run({}, ("a cat",))


@pytest.mark.slow
@pytest.mark.parametrize("candidates, argv, says", [
    ("{", [], "cannot read candidates file"),
    ('{"a": {"topk": "x"}}', [], "candidate 'a'"),
    pytest.param("{}", ["--device", "cuda"], "CUDA was asked for",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_command_refuses_bad_input_in_one_line(candidates, argv, says, tmp_path):
    (tmp_path / "c.json").write_text(candidates, encoding="utf-8")
    (tmp_path / "p.txt").write_text("a cat\n", encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "tools.calibrate_default", "--prompts", str(tmp_path / "p.txt"),
                           "--candidates", str(tmp_path / "c.json"), "--out", str(tmp_path), *argv],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("error: ") and says in done.stderr


def test_default_is_the_choice_of_the_committed_calibration():
    root = Path(__file__).resolve().parents[1]
    result = json.loads((root / "benchmarks" / "default_calibration.json").read_text())
    candidates = read_candidates(root / "tools" / "default_candidates.json")
    assert get_config("default") == candidates[choice(result["candidates"])]

"""tools/demo_measurements.sh, the demo's GPU measurements: what it does before any GPU work."""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "demo_measurements.sh"


def run(*args: str, budget: str = "0") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, "BUDGET": budget}, cwd=SCRIPT.parents[1])


def test_an_unknown_stage_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    done = run("measure", str(out))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: the stage is calibrate or evaluate, not 'measure'"]
    assert not out.exists()


def test_no_output_folder_is_one_line():
    done = run("calibrate")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: give the output folder: tools/demo_measurements.sh calibrate OUT"]


def test_a_spent_budget_skips_every_step(tmp_path):
    for stage, steps in (("calibrate", 4), ("evaluate", 2)):
        done = run(stage, str(tmp_path / stage))
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("== skipped, 0 s left in the call") == steps
        assert list((tmp_path / stage).iterdir()) == []

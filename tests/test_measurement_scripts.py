"""tools/demo_measurements.sh and tools/hopper_measurements.sh, the device calls' scripts: what
they do before any GPU work."""

import os
import subprocess
import tarfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def run(script: str, *args: str, budget: str = "0") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TOOLS / script), *args], capture_output=True, text=True,
                          env={**os.environ, "BUDGET": budget}, cwd=TOOLS.parent)


def test_demo_unknown_stage_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    done = run("demo_measurements.sh", "measure", str(out))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: the stage is calibrate or evaluate, not 'measure'"]
    assert not out.exists()


def test_demo_no_output_folder_is_one_line():
    done = run("demo_measurements.sh", "calibrate")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: give the output folder: tools/demo_measurements.sh calibrate OUT"]


def test_demo_steps_are_skipped_on_a_spent_budget(tmp_path):
    for stage, steps in (("calibrate", 4), ("evaluate", 2)):
        done = run("demo_measurements.sh", stage, str(tmp_path / stage))
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("== skipped, ") == steps
        assert list((tmp_path / stage).iterdir()) == []

def test_hopper_bad_arguments_are_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "out"
    done = run("hopper_measurements.sh", "f", str(out))
    assert (done.returncode, done.stderr.strip().splitlines()) == (2, ["error: the stage is a, b, c, d or e, not 'f'"])
    done = run("hopper_measurements.sh", "c")
    assert (done.returncode, done.stderr.strip().splitlines()) == (
        2, ["error: give the output folder: tools/hopper_measurements.sh c OUT"])
    assert not out.exists()


def test_hopper_steps_are_skipped_on_a_spent_budget(tmp_path):
    done = run("hopper_measurements.sh", "c", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("== skipped, ") == 4  # memory, profile, HART's profile, kernels under graphs
    assert [p.name for p in tmp_path.iterdir()] == ["results"]


def test_hopper_steps_pack_what_they_wrote(tmp_path):
    """A step that runs packs OUT/results into one tar (stage c's bench fails at once without a GPU)."""
    done = run("hopper_measurements.sh", "c", str(tmp_path), budget="100")
    assert done.returncode == 0, done.stderr
    assert "== status" in done.stdout
    with tarfile.open(tmp_path / "results.tar") as tar:
        assert "results" in tar.getnames()

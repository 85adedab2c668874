"""tools/hopper_measurements.sh, issue 25's GPU measurements: what it does before any GPU work."""

import os
import subprocess
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "hopper_measurements.sh"


def run(*args: str, budget: str = "0") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, "BUDGET": budget}, cwd=SCRIPT.parents[1])


def test_bad_arguments_are_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "out"
    done = run("d", str(out))
    assert (done.returncode, done.stderr.strip().splitlines()) == (2, ["error: the stage is a, b or c, not 'd'"])
    done = run("c")
    assert (done.returncode, done.stderr.strip().splitlines()) == (
        2, ["error: give the output folder: tools/hopper_measurements.sh c OUT"])
    assert not out.exists()


def test_a_spent_budget_skips_every_step(tmp_path):
    done = run("c", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("== skipped, 0 s left in the call") == 2
    assert [p.name for p in tmp_path.iterdir()] == ["results"]


def test_each_step_packs_what_the_steps_wrote(tmp_path):
    """A step that runs packs OUT/results into one tar (stage c's bench fails at once without a GPU)."""
    done = run("c", str(tmp_path), budget="100")
    assert done.returncode == 0, done.stderr
    assert "== status" in done.stdout
    with tarfile.open(tmp_path / "results.tar") as tar:
        assert "results" in tar.getnames()

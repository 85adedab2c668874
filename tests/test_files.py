"""Files are written whole or not at all: a full disk (a write that fails, faked) leaves nothing
behind and ends in one line; a full disk found before the work costs no work."""

import errno
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

import sparvar.loading
from helpers import cli_error
from sparvar import files
from sparvar.batch import MANIFEST
from sparvar.bench.common import write
from sparvar.errors import SparvarError

PACKAGE = Path(__file__).parent.parent / "sparvar"
FULL = "No space left on device"


def _full_after(monkeypatch, count: int) -> None:
    """PNGs fail as on a full disk after `count` of them: half the file is written, then ENOSPC."""
    saved, real = [], Image.Image.save

    def save(image, fp, *args, **kwargs):
        if len(saved) >= count:
            Path(fp).write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, FULL)
        saved.append(fp)
        return real(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)


def test_a_failed_write_leaves_nothing_and_says_where(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("the last run's")

    def fails(part: Path):
        part.write_text("half")
        raise OSError(errno.ENOSPC, FULL)

    with pytest.raises(SparvarError, match=f"^cannot write {re.escape(str(target))}: {FULL}$"):
        files.whole(target, fails)
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"] and target.read_text() == "the last run's"
    files.write_text(target, "this run's")
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"] and target.read_text() == "this run's"


def test_appended_lines_are_all_or_none(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    files.append_lines(log, ["one"])
    real = files.os.write

    def half(fd, data):
        real(fd, data[:3])
        raise OSError(errno.ENOSPC, FULL)

    monkeypatch.setattr(files.os, "write", half)
    with pytest.raises(SparvarError, match=f"cannot write {re.escape(str(log))}: {FULL}"):
        files.append_lines(log, ["two", "three"])
    assert log.read_text() == "one\n"  # the half line written was cut off again


def test_the_bench_and_eval_writer_fails_in_one_line(tmp_path, monkeypatch):
    def full(path, text, **kwargs):
        raise OSError(errno.ENOSPC, FULL)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(SparvarError, match=f"cannot write {re.escape(str(tmp_path / 'eval.json'))}: {FULL}"):
        write(tmp_path, "eval", {"a": 1}, "# eval\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_generate_on_a_full_disk_leaves_no_file(tmp_path, capsys, monkeypatch):
    _full_after(monkeypatch, 0)
    out = tmp_path / "out"
    err = cli_error(capsys, ["generate", "--model", "var-tiny", "--class", "3", "--attention", "dense,default",
                             "--out", str(out), "--quiet", "--device", "cpu"])
    assert err == f"error: cannot write {out / '000_3_dense.png'}: {FULL}"
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_a_batch_job_on_a_disk_that_fills_stops_in_one_line_and_resumes(tmp_path, capsys, monkeypatch):
    job = ["generate", "--model", "var-tiny", "--class", "3", "--class", "7", "--class", "1", "--batch-size", "1",
           "--out", str(tmp_path), "--device", "cpu", "--quiet"]
    _full_after(monkeypatch, 1)
    err = cli_error(capsys, job)
    assert err == f"error: cannot write {tmp_path / '001_7.png'}: {FULL} (1 image made; the same command resumes " \
                  "the job)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000_3.png", "job.json", "job.lock", MANIFEST]  # no .part
    assert [json.loads(line)["file"] for line in (tmp_path / MANIFEST).read_text().splitlines()] == ["000_3.png"]
    monkeypatch.undo()
    capsys.readouterr()
    from sparvar.cli import main

    assert main(job) == 0 and "images to make 2 (1 already there)" in capsys.readouterr().out


@pytest.mark.parametrize("job", [[], ["--batch-size", "2"]], ids=["one-pass", "batch-job"])
def test_a_full_disk_is_found_before_the_model_loads(tmp_path, capsys, monkeypatch, job):
    monkeypatch.setattr(sparvar.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    err = cli_error(capsys, ["generate", "--model", "var-d16", "--random-weights", "--class", "3", "--device", "cpu",
                             "--out", str(tmp_path / "out"), *job])
    need = (1 if not job else 2) * (3 * 256 * 256 + 256 + 4096)  # 256x256 pixels, one or a batch of two
    assert err == f"error: cannot write to {tmp_path / 'out'}: its filesystem is full (0.0 MB free, " \
                  f"{need / 1e6:.1f} MB needed)"


def test_every_file_is_written_through_files_py():
    """No module writes a file itself, only through files.py."""
    own = re.compile(r"\.save\(|\.savefig\(|write_text\(|write_bytes\(|open\([^)]*[\"'][wa]|torch\.save\(|save_file\(")
    found = [f"{path.relative_to(PACKAGE)}:{i}" for path in PACKAGE.rglob("*.py")
             if path.name != "files.py"
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if own.search(line) and "files." not in line and "buffer" not in line]  # a buffer is memory
    assert not found

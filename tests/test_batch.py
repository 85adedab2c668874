"""Batch jobs: torchrun's gloo processes make the images of one process; resume; the manifest."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import cli_error
from sparvar import batch, files
from sparvar.batch import MANIFEST, SETTINGS, Item, pending
from sparvar.checkpoint import fingerprint
from sparvar.cli import main
from sparvar.models.registry import MODELS

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a cat", "a dog on a hill", "a red fox", "snow", "a lighthouse at dawn"]


def _sparvar(*argv, processes: int = 0, fails: bool = False) -> str:
    """`python -m sparvar ARGV` in a child process, under torchrun when `processes` is given; its
    output, or its error output when it `fails` (as it must then). One thread per process, as
    torchrun sets: with the same setting one process makes the same images as N."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    command = [sys.executable, *(torchrun if processes else []), "-m", "sparvar", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode != 0) == fails, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stderr if fails else done.stdout


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines()]


@pytest.mark.slow
def test_two_gloo_processes_make_the_images_of_one_and_resume(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    job = ["generate", "--model", "infinity-tiny", "--prompts", str(prompts), "--schedule", "1,2,4",
           "--batch-size", "2", "--seed", "10", "--device", "cpu", "--quiet"]
    one, two = tmp_path / "one", tmp_path / "two"
    _sparvar(*job, "--out", str(one))
    _sparvar(*job, "--out", str(two), processes=2)

    names = sorted(p.name for p in one.glob("*.png"))
    assert len(names) == 5 and names == sorted(p.name for p in two.glob("*.png"))
    for name in names:
        assert np.array_equal(_pixels(one / name), _pixels(two / name)), name
    assert len({_pixels(one / name).tobytes() for name in names}) == 5  # different seeds, different images

    records = {r["item"]: r for r in _manifest(two)}
    assert sorted(records) == [0, 1, 2, 3, 4] and len(_manifest(two)) == 5
    assert [records[i]["rank"] for i in range(5)] == [0, 0, 1, 1, 0]  # batch j goes to process j % 2
    assert [records[i]["seed"] for i in range(5)] == [10, 11, 12, 13, 14]
    assert [records[i]["file"] for i in range(5)] == names
    assert [records[i]["condition"] for i in range(5)] == PROMPTS
    assert json.loads((two / SETTINGS).read_text()) == {
        "model": "infinity-tiny", "weights": "random (seed 0)", "vae": "random (seed 0)",
        "text_encoder": "random (seed 0)", "attention": "default", "skip_last": 0, "prune": None,
        "adaptive_skip": False, "cfg": 3.0, "tau": 0.5, "top_k": 0, "top_p": 0.97, "seed_base": 10,
        "schedule": "1 2 4", "cuda_graphs": False, "sampler": "sparvar", "negative_prompt": None,
        "more_smooth": False, "device": "cpu",
    }
    assert all(r["seconds"] > 0 for r in records.values())
    assert [r["rank"] for r in _manifest(one)] == [0] * 5

    (two / names[3]).unlink()  # to be made again
    with open(two / MANIFEST, "a") as f:
        f.write('{"item": 0, "file": "000_a-c')  # a line cut short by a killed job
    out = _sparvar(*job, "--out", str(two), processes=2)
    assert "images to make 1 (4 already there)" in out
    assert sorted(r["file"] for r in _manifest(two)) == names  # one line per image, none repeated
    assert _pixels(two / names[3]).shape == (8, 8, 3)
    assert not list(two.glob("*.part"))
    # other settings into the folder: every process stops with rank 0's reason, none waits for it
    err = _sparvar(*job, "--out", str(two), "--cfg", "2", processes=2, fails=True)
    assert "error: " + f"{two} holds a job with other settings (cfg 3.0 there, 2.0 now)" in err


@pytest.mark.slow
def test_rerun_of_a_finished_job_makes_nothing_again(tmp_path, capsys):
    job = ["generate", "--model", "var-tiny", "--class", "3", "--class", "7", "--batch-size", "4",
           "--out", str(tmp_path), "--device", "cpu", "--quiet"]
    assert main(job) == 0
    first = (tmp_path / MANIFEST).read_text()
    assert main(job) == 0
    assert "all 2 images of this job are in" in capsys.readouterr().out
    assert (tmp_path / MANIFEST).read_text() == first


@pytest.mark.slow
def test_prompts_file_of_the_demo_model(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("cat face\n\nflag: Japan\n3\n")
    argv = ["generate", "--model", "infinity-demo", "--prompts", str(prompts), "--skip-last", "11",
            "--batch-size", "2", "--out", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 0
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == ["000_cat-face.png", "001_flag-japan.png", "002_3.png"]
    records = _manifest(tmp_path / "out")
    assert [r["condition"] for r in records] == ["cat face", "flag: Japan", "3"]
    settings = json.loads((tmp_path / "out" / SETTINGS).read_text())
    assert settings["attention"] == "default" and settings["skip_last"] == 11  # a batch job runs one preset
    assert settings["weights"] == fingerprint(MODELS["infinity-demo"].bundled_path("--weights"))


def test_batch_job_errors(tmp_path, capsys):
    def error(argv) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    job = ["generate", "--model", "var-tiny", "--out", str(tmp_path), "--device", "cpu", "--quiet"]
    assert "runs one --attention preset, not 2" in error(job + ["--batch-size", "2", "--attention", "dense,default"])
    assert "--batch-size must be at least 1" in error(job + ["--batch-size", "0"])
    classes = tmp_path / "classes.txt"
    classes.write_text("1\n2\n12\n")
    assert "class indices 0..9, or 'random', not 12" in error(job + ["--batch-size", "2", "--prompts", str(classes)])
    assert not list(tmp_path.glob("*.png"))  # a bad line stops the job before any image


def test_pending_keeps_one_manifest_line_per_whole_image(tmp_path):
    items = [Item(i, f"p{i}", i, tmp_path / f"{i}.png") for i in range(4)]
    for i in (0, 1):
        files.save_image(Image.new("RGB", (4, 4)), items[i].path)
    line = lambda i, **more: json.dumps({"item": i, "condition": f"p{i}", "seed": i, "file": f"{i}.png", **more})  # noqa: E731
    lines = [line(0, v=1), line(2), line(0, v=2), "not json", line(1)]
    (tmp_path / MANIFEST).write_text("\n".join(lines) + "\n")
    assert [item.index for item in pending(items, tmp_path)] == [2, 3]
    kept = [json.loads(line) for line in (tmp_path / MANIFEST).read_text().splitlines()]
    assert [(r["item"], r.get("v")) for r in kept] == [(0, 2), (1, None)]


# ---- the folder of a job: its settings, crashes, damaged files (var-tiny: quick) ---------------
def _job(folder: Path, *options: str) -> list[str]:
    """Batches of one: a remade image then equals the first one whatever else is missing."""
    return ["generate", "--model", "var-tiny", "--class", "3", "--class", "7", "--class", "1", "--batch-size", "1",
            "--out", str(folder), "--device", "cpu", "--quiet", *options]


def _images(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: _pixels(p) for p in sorted(folder.glob("*.png"))}


@pytest.mark.slow
def test_a_rerun_with_other_settings_is_refused_naming_them(tmp_path, capsys):
    assert main(_job(tmp_path)) == 0
    before, manifest = _images(tmp_path), (tmp_path / MANIFEST).read_text()
    err = cli_error(capsys, _job(tmp_path, "--cfg", "2", "--seed", "5"))
    assert f"{tmp_path} holds a job with other settings (cfg 4.0 there, 2.0 now; seed_base 0 there, 5 now)" in err
    assert "--overwrite" in err
    assert "attention 'default' there, 'paper' now" in cli_error(capsys, _job(tmp_path, "--attention", "paper"))
    assert "skip_last 0 there, 1 now" in cli_error(capsys, _job(tmp_path, "--skip-last", "1"))
    assert "top_k 900 there, 5 now" in cli_error(capsys, _job(tmp_path, "--top-k", "5"))
    assert "weights 'random (seed 0)' there, 'random (seed 0)' now" not in err
    after = _images(tmp_path)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert (tmp_path / MANIFEST).read_text() == manifest  # nothing was made, nothing mixed in


@pytest.mark.slow
def test_overwrite_makes_every_image_again_with_the_new_settings(tmp_path, capsys):
    assert main(_job(tmp_path, "--class", "5")) == 0  # four images
    before = _images(tmp_path)
    assert main(_job(tmp_path, "--seed", "5", "--overwrite")) == 0
    assert "images to make 3," in capsys.readouterr().out
    after = _images(tmp_path)
    assert sorted(after) == ["000_3.png", "001_7.png", "002_1.png"]  # the old job's fourth image went too
    assert not any(np.array_equal(after[k], before[k]) for k in after)  # other seeds, other images
    assert [r["seed"] for r in _manifest(tmp_path)] == [5, 6, 7]
    assert json.loads((tmp_path / SETTINGS).read_text())["seed_base"] == 5


def test_a_folder_of_a_job_without_a_record_is_refused(tmp_path, capsys):
    (tmp_path / MANIFEST).write_text('{"item": 0, "file": "000_3.png"}\n')
    assert "holds images of a job whose settings were not recorded" in cli_error(capsys, _job(tmp_path))


@pytest.mark.slow
def test_a_job_killed_between_its_images_and_its_lines_leaves_no_line_without_its_image(tmp_path, monkeypatch):
    assert main(_job(tmp_path / "whole")) == 0
    recorded = []
    append_lines = files.append_lines

    def killed_after_one(path, lines):  # the process dies after its first line, the second image written
        if recorded:
            raise SystemExit("killed")
        recorded.extend(lines)
        append_lines(path, lines)

    monkeypatch.setattr(files, "append_lines", killed_after_one)
    with pytest.raises(SystemExit):
        main(_job(tmp_path / "killed"))
    killed = tmp_path / "killed"
    lines = {r["file"] for r in _manifest(killed)}
    assert set(_images(killed)) == {"000_3.png", "001_7.png"} and lines == {"000_3.png"}  # an image came first
    monkeypatch.undo()
    assert main(_job(killed)) == 0
    whole, resumed = _images(tmp_path / "whole"), _images(killed)
    assert resumed.keys() == whole.keys() and all(np.array_equal(resumed[k], whole[k]) for k in whole)
    assert sorted(r["file"] for r in _manifest(killed)) == sorted(whole)  # one line per image


@pytest.mark.slow
def test_an_image_without_its_line_is_made_again(tmp_path, capsys):
    assert main(_job(tmp_path)) == 0
    lines = (tmp_path / MANIFEST).read_text().splitlines()
    (tmp_path / MANIFEST).write_text("\n".join(lines[:2]) + "\n")  # e.g. from a crash of an older sparvar
    assert main(_job(tmp_path)) == 0
    assert "images to make 1 (2 already there)" in capsys.readouterr().out
    assert sorted(r["file"] for r in _manifest(tmp_path)) == sorted(_images(tmp_path))


@pytest.mark.parametrize("damage", ["empty", "cut short", "not a PNG"])
@pytest.mark.slow
def test_an_empty_or_damaged_png_counts_as_missing(tmp_path, capsys, damage):
    assert main(_job(tmp_path)) == 0
    before = _images(tmp_path)
    target = tmp_path / "001_7.png"
    data = target.read_bytes()
    target.write_bytes({"empty": b"", "cut short": data[: len(data) // 2], "not a PNG": b"GIF89a" + data[6:]}[damage])
    assert main(_job(tmp_path)) == 0
    assert "images to make 1 (2 already there)" in capsys.readouterr().out
    after = _images(tmp_path)
    assert all(np.array_equal(after[k], before[k]) for k in before)
    assert sorted(r["file"] for r in _manifest(tmp_path)) == sorted(before)  # one line each


# ---- one job per folder; Ctrl+C and SIGTERM ----------------------------------------------------
@pytest.mark.slow
def test_a_second_job_into_a_folder_refuses_at_once_naming_the_first(tmp_path, capsys):
    """Two identical jobs started at once into one new folder: the second one makes nothing."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from sparvar.batch import lock; "
         "lock(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)", str(tmp_path)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        err = cli_error(capsys, _job(tmp_path))
        assert err == f"error: another job (pid {holder.pid}) is writing into {tmp_path}: wait for it to end, " \
                      "or give another --out"
        assert sorted(p.name for p in tmp_path.iterdir()) == [batch.LOCK]  # no record, no image, no line
    finally:
        holder.kill()
        holder.wait()
    assert main(_job(tmp_path)) == 0 and len(_images(tmp_path)) == 3  # the lock went with its process


@pytest.mark.slow
def test_two_identical_jobs_started_at_once_make_each_image_once(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(str(i) for i in range(6)) + "\n")
    job = [sys.executable, "-m", "sparvar", "generate", "--model", "var-tiny", "--prompts", str(classes), "--batch-size",
           "1", "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    both = [subprocess.Popen(job, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = [(proc.pid, proc.wait(300), proc.stderr.read()) for proc in both]
    (winner, _, _), (_, status, err) = sorted(done, key=lambda d: d[1])
    assert status == 2 and err.strip() == f"error: another job (pid {winner}) is writing into {tmp_path / 'out'}: " \
                                          "wait for it to end, or give another --out"
    assert sorted(r["item"] for r in _manifest(tmp_path / "out")) == list(range(6))  # each image once


@pytest.mark.slow
@pytest.mark.parametrize("number,status,name", [(signal.SIGINT, 130, "Ctrl+C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_ends_a_job_between_writes_in_one_line(tmp_path, capsys, monkeypatch, number, status, name):
    generate, calls = batch.Job.generate, []

    def signalled_in_the_second_batch(job, pipe, items):
        calls.append(items)
        if len(calls) == 2:
            os.kill(os.getpid(), number)
        return generate(job, pipe, items)

    monkeypatch.setattr(batch.Job, "generate", signalled_in_the_second_batch)
    assert main(_job(tmp_path)) == status
    err = capsys.readouterr().err.strip()
    assert err == f"stopped by {name}: 1 image made; the same command resumes the job"
    assert sorted(_images(tmp_path)) == ["000_3.png"] and [r["file"] for r in _manifest(tmp_path)] == ["000_3.png"]
    assert not list(tmp_path.glob("*.part"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back
    monkeypatch.undo()
    assert main(_job(tmp_path)) == 0 and "images to make 2 (1 already there)" in capsys.readouterr().out

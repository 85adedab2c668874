"""`sparvar bench multigpu`: its arithmetic, and a run of its torchrun jobs on CPU processes."""

import json

import pytest
import torch

from sparvar.bench import multigpu
from sparvar.cli import main


def test_throughput_counts_steady_state_only():
    def record(rank, item, finished):
        return {"rank": rank, "item": item, "finished": finished, "seconds": 0.5}

    # rank 0: warm-up ends at 10, then 3 images by 13; rank 1: warm-up ends at 11, 3 images by 15
    records = [record(0, i, t) for i, t in ((0, 9), (2, 10), (4, 11), (6, 12), (8, 13))]
    records += [record(1, i, t) for i, t in ((1, 8), (3, 11), (5, 12), (7, 14), (9, 15))]
    row = multigpu.throughput(records, warmup_images=2)
    assert row["gpus"] == 2 and row["images"] == 6 and row["seconds"] == 4 and row["images_per_s"] == 1.5
    assert [r["seconds"] for r in row["per_rank"]] == [3, 4]
    rows = [{"gpus": 1, "images_per_s": 0.8}, row]
    multigpu.add_scaling(rows)
    assert rows[0]["scaling"] == 1 and rows[1]["scaling"] == pytest.approx(1.875)


@pytest.mark.slow
def test_bench_multigpu_runs_the_job_on_cpu_processes(tmp_path, capsys):
    argv = ["bench", "multigpu", "--model", "infinity-tiny", "--schedule", "1,2", "--device", "cpu", "--gpus", "2",
            "--batches", "2", "--warmup", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "multigpu.json").read_text())
    (row,) = result["rows"]
    assert row["gpus"] == 2 and row["images"] == 4 and row["images_per_s"] > 0
    assert "--nproc-per-node 2 -m sparvar generate --model infinity-tiny --random-weights" in row["command"]
    assert result["command"].startswith("sparvar bench multigpu --model infinity-tiny")
    table = (tmp_path / "multigpu.md").read_text().rstrip().splitlines()[-1]
    assert table.startswith("| 2 | 4 |") and capsys.readouterr().out.rstrip().endswith(table)  # the table comes last


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_multigpu_needs_cuda(capsys):
    assert main(["bench", "multigpu"]) == 2
    assert "needs CUDA GPUs" in capsys.readouterr().err

"""Images per second of a batch job on 1 and 2 GPUs, and the scaling between them.

Each run is the job users run, `torchrun --nproc-per-node N -m sparvar generate`, here with
random weights, the default SparVAR preset and CUDA graphs. Every process makes `warmup`
batches (eager run, graph capture, first replay), then `batches` timed ones. A process's
steady-state time runs from the end of its last warm-up batch to the end of its last batch
(read from the job's manifest); throughput = timed images of all processes / the longest
steady-state time. Model loading and warm-up are excluded; writing the PNGs is included.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import sparvar
from sparvar import files
from sparvar.batch import MANIFEST
from sparvar.bench.common import PROMPT, command_line, header, provenance, write
from sparvar.errors import SparvarError
from sparvar.options import ArgumentParser, HelpFormatter


def job_command(args, gpus: int, prompts: Path, out: Path) -> list[str]:
    """The torchrun command of one run (the same code path as a user's batch job)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
        "-m", "sparvar", "generate", "--model", args.model, "--random-weights", "--prompts", str(prompts),
        "--out", str(out), "--batch-size", str(args.batch_size), "--attention", args.attention,
        "--device", args.device, "--quiet",
    ]
    command += ["--schedule", args.schedule] if args.schedule else ["--resolution", str(args.resolution)]
    return command + (["--cuda-graphs"] if args.device == "cuda" else [])


def throughput(records: list[dict], warmup_images: int) -> dict:
    """Images per second of one run from its manifest: each process's first `warmup_images`
    (by item index, the order it made them) are excluded, and its clock starts when they end."""
    ranks = []
    for rank in sorted({r["rank"] for r in records}):
        mine = sorted((r for r in records if r["rank"] == rank), key=lambda r: r["item"])
        warm, timed = mine[:warmup_images], mine[warmup_images:]
        if not warm or not timed:
            raise SparvarError(f"rank {rank} made {len(mine)} images: too few to time after {warmup_images} warm-up")
        seconds = max(r["finished"] for r in timed) - max(r["finished"] for r in warm)
        ranks.append({"rank": rank, "images": len(timed), "seconds": seconds,
                      "generation_s_per_image": statistics.median(r["seconds"] for r in timed)})
    images, seconds = sum(r["images"] for r in ranks), max(r["seconds"] for r in ranks)
    return {"gpus": len(ranks), "images": images, "seconds": seconds, "images_per_s": images / seconds,
            "per_rank": ranks}


def run_one(args, gpus: int, work: Path) -> dict:
    """One torchrun job of `gpus` processes; its output streams to this terminal."""
    per_rank = (args.warmup + args.batches) * args.batch_size
    prompts = work / f"prompts_{gpus}.txt"
    files.write_text(prompts, f"{PROMPT}\n" * (gpus * per_rank))
    command = job_command(args, gpus, prompts, work / f"gpus_{gpus}")
    print(f"{gpus} GPU{'s' if gpus > 1 else ''}: {' '.join(command[1:])}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))  # torchrun's default, for every N
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(sparvar.__file__).parent.parent),
                                                      env.get("PYTHONPATH")]))  # this sparvar in the children
    status = subprocess.run(command, env=env).returncode
    if status != 0:
        raise SparvarError(f"the {gpus}-process job failed with exit status {status}; its output is above")
    lines = (work / f"gpus_{gpus}" / MANIFEST).read_text().splitlines()
    row = throughput([json.loads(line) for line in lines], args.warmup * args.batch_size)
    return {**row, "command": " ".join(["torchrun"] + command[3:]).replace(str(work), "$WORK")}


def add_scaling(rows: list[dict]) -> None:
    one = next((r for r in rows if r["gpus"] == 1), None)
    for row in rows:
        if one:
            row["scaling"] = row["images_per_s"] / one["images_per_s"]


def markdown(result: dict) -> str:
    lines = [
        *header(result["title"], result),
        result["setup"],
        "",
        "Jobs ($WORK: a temporary folder):",
        "",
        *[f"- `{r['command']}`" for r in result["rows"]],
        "",
        "| GPUs | timed images | seconds | images/s | scaling | generation s/image (median) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        per_image = statistics.median(p["generation_s_per_image"] for p in r["per_rank"])
        scaling = f"{r['scaling']:.2f}x" if "scaling" in r else ""
        lines.append(f"| {r['gpus']} | {r['images']} | {r['seconds']:.2f} | {r['images_per_s']:.3f} | {scaling} | "
                     f"{per_image:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(prog="sparvar bench multigpu", description=__doc__.splitlines()[0],
                            formatter_class=HelpFormatter)
    parser.add_argument("--model", default="infinity-8b", help="model of the job (random weights)")
    parser.add_argument("--resolution", type=int, default=1024, help="pixel budget of the schedule")
    parser.add_argument("--schedule", help="custom scales instead of --resolution (quick checks)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="process counts to run")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass in each process")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per process")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches per process (eager, capture, replay)")
    parser.add_argument("--attention", default="default", help="attention preset")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: gloo processes, no CUDA graphs (to check the benchmark itself)")
    parser.add_argument("--out", default="benchmarks", help="folder for multigpu.json and multigpu.md")
    args = parser.parse_args(argv)
    if min(args.gpus) < 1 or args.batch_size < 1 or args.batches < 1 or args.warmup < 1:
        raise SparvarError("--gpus, --batch-size, --batches and --warmup must be at least 1")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SparvarError("bench multigpu needs CUDA GPUs (--device cpu checks it on gloo processes)")
        if torch.cuda.device_count() < max(args.gpus):
            raise SparvarError(f"--gpus {max(args.gpus)} asked for but this machine has {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory(prefix="sparvar-multigpu-") as work:
        rows = [run_one(args, gpus, Path(work)) for gpus in args.gpus]
    add_scaling(rows)
    shape = f"scales {args.schedule}" if args.schedule else f"{args.resolution}x{args.resolution}"
    result = {
        **provenance(command_line("sparvar bench multigpu", argv), args.device),
        "title": "Batch generation on several GPUs (torchrun)",
        "setup": f"{args.model}, {shape}, random weights, preset {args.attention}, "
        f"{'CUDA graphs, ' if args.device == 'cuda' else ''}batch {args.batch_size} per process with CFG, "
        f"{args.warmup} warm-up + {args.batches} timed batches per process; PNGs written as in any job.",
        "rows": rows,
    }
    write(args.out, "multigpu", result, markdown(result))
    return result

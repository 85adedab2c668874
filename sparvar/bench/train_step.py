"""Time of the demo transformer's training step, per variant of the step (issue 22).

The step is the training's own (`sparvar.demo.train.Run.transformer_step`: sampling a batch,
quantising with bit flips, the text encoder, teacher forcing, backward, gradient clipping, fused
AdamW) on the emoji data with an untrained tokenizer; what differs between rows is the
TeacherForcing variant (demo/step.py), the schedule (the prefix phase's first scales, or all) and
the batch. Each row warms up (compiling, where it compiles), then times --steps steps between
device synchronisations. Every row starts from a reset torch.compile cache.
Run: sparvar bench train-step [--rows prefix:48:eager ...] [--out benchmarks]
"""

from __future__ import annotations

import time
import traceback

import torch

from sparvar.bench.common import command_line, header, provenance, write
from sparvar.demo import train
from sparvar.demo.step import TeacherForcing
from sparvar.errors import SparvarError
from sparvar.options import ArgumentParser, HelpFormatter

VARIANTS = {"eager": ("sdpa", "off"), "compile": ("sdpa", "graph"), "compile-flex": ("flex", "graph"),
            "compile-blocks": ("sdpa", "blocks"), "compile-blocks-flex": ("flex", "blocks")}
DEFAULT_ROWS = ["prefix:48:compile-blocks", "full:16:eager", "full:16:compile-blocks", "full:24:compile-blocks"]


def time_row(run: train.Run, kind: str, batch: int, variant: str, steps: int) -> dict:
    """Seconds of one training step of `variant` at `batch` on phase `kind`'s schedule."""
    attention, compile = VARIANTS[variant]
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run.batch, run.latent_set = batch, run.latents(kind)
    run.teacher = TeacherForcing(run.model, run.text, run.codes, run.schedules[kind], attention, compile)
    params = list(run.model.parameters()) + list(run.text.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step():
        loss = run.transformer_step()["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return {"first_step_s": first, "ms_per_step": seconds * 1e3, "ms_per_sample": seconds * 1e3 / batch,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def to_markdown(result: dict) -> str:
    lines = header(f"Demo training step: {result['title']}", result)
    lines += ["| phase | scales (tokens) | batch | variant | ms per sample | ms per step | peak GiB | first step (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = (f"{r['ms_per_sample']:.2f} | {r['ms_per_step']:.1f} | {r['peak_gib']:.1f} | {r['first_step_s']:.1f}"
                 if "error" not in r else f"failed: {r['error'][:90]} | | |")
        lines.append(f"| {r['phase']} | {r['scales']} ({r['tokens']}) | {r['batch']} | {r['variant']} | {cells} |")
    if result.get("note"):
        lines += ["", result["note"]]
    return "\n".join(lines) + "\n"


def run(rows: list[str], data: str, steps: int, out_dir: str, command: str) -> dict:
    if not torch.cuda.is_available():
        raise SparvarError("the training-step benchmark needs a CUDA GPU")
    args = train.parse_args(["--data", data, "--device", "cuda"])
    run_ = train.Run(args, torch.device("cuda"), train._new_state(args, torch.device("cuda")))
    run_.model.train()
    run_.text.train()
    cfg = run_.cfg
    result = {**provenance(command), "title": f"width {cfg.width}, {cfg.heads} heads, depth {cfg.depth}, "
              "bf16 autocast, fused AdamW", "steps": steps, "rows": []}
    for row in rows:
        kind, batch, variant = row.split(":")
        schedule = run_.schedules[kind]
        record = {"phase": kind, "scales": len(schedule), "tokens": schedule.total, "batch": int(batch),
                  "variant": variant}
        try:
            record.update(time_row(run_, kind, int(batch), variant, steps))
        except Exception as err:  # noqa: BLE001 - an out-of-memory or compile failure is a result too
            traceback.print_exc()
            record["error"] = f"{type(err).__name__}: {err}"[:300]
        result["rows"].append(record)
        # written after every row: a call that runs out of time keeps the rows it measured
        write(out_dir, "demo_train_step", result, to_markdown(result))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="sparvar bench train-step", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS,
                        help=f"phase:batch:variant, variants {', '.join(VARIANTS)}")
    parser.add_argument("--data", default="runs/emoji.npz", help="the emoji data set (sparvar train-demo prepare)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--out", default="benchmarks", help="folder for demo_train_step.json and .md")
    args = parser.parse_args(argv)
    run(args.rows, args.data, args.steps, args.out, command_line("sparvar bench train-step", argv))


if __name__ == "__main__":
    main()

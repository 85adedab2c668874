"""Train the demo model: `sparvar train-demo [prepare | train | export | prompts]`.

- `prepare` draws the emoji data set from the installed packages into one file (--data, ~10 MB).
- `train` (the default) spends at most --budget-minutes of wall time on what remains of three
  phases and leaves a resumable checkpoint in --out (`--resume` continues it):
  1. the tokenizer: encoder + bitwise multi-scale quantiser + BSQ-VAE decoder, MSE plus commitment,
     straight-through, with a few random bit flips so the decoder tolerates the sampler's mistakes,
     on the emoji at both sizes the transformer sees (its last scale's pixels, and its prefix's);
  2. the transformer with its text encoder on the schedule's first --prefix-scales scales (128 px
     for the demo): most of the steps, at a fifth of the cost of a full-schedule step;
  3. the same on every scale (256 px), starting from phase 2's weights, as Infinity was trained
     at 512 then 1024.
  The transformer phases teach by teacher forcing on the frozen encoder's bits (step.py): bit
  cross-entropy, random bit flips for self-correction, prompts dropped to the learned empty prompt
  for classifier-free guidance, attention temperatures learning faster (--scale-lr).
  Each phase runs a fixed number of steps: its --*-steps option, or what fits its planned minutes,
  timed on its first steps and recorded, so later calls (and a replay) keep it. A call ends with
  a preview grid (preview.png) once a transformer phase has trained; `--travel DIR` also writes
  the checkpoint there in bf16, small enough to come back from a GPU machine and travel to the next.
- `export` writes the bf16 weights the package ships (sparvar/assets), with the tokenizer's encoder,
  and the log (benchmarks/); `--resume-from-export` continues from them on another machine.
- `score` generates --samples training prompts with the exported weights and records in the log's
  summary how many show their own emoji (score.py).
- `prompts` writes the prompts of one split, one a line (held-out ones for `sparvar eval --prompts`).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sparvar import files
from sparvar.demo import checkpoint, data
from sparvar.demo.grid import grid
from sparvar.demo.score import retrieval_top1
from sparvar.demo.step import ATTENTION, COMPILE, TeacherForcing
from sparvar.demo.tokenizer import Encoder, Tokenizer
from sparvar.errors import SparvarError
from sparvar.eval.metrics import psnr
from sparvar.loading import load_pipeline
from sparvar.models.infinity.bitwise import BitwiseCodes
from sparvar.models.infinity.text import (
    ByteTokenizer,
    TextEncoder,
    build_t5,
    load_t5,
    t5_state,
)
from sparvar.models.infinity.transformer import InfinityTransformer
from sparvar.models.infinity.vae import InfinityVAE
from sparvar.models.registry import ASSETS, get_spec
from sparvar.options import ArgumentParser
from sparvar.pipeline import Pipeline
from sparvar.schedules import parse_schedule
from sparvar.validation import resolve_device

PROBE_STEPS = 10  # steps timed (after 3 warm-up steps) to turn planned minutes into a step count
REWARM_STEPS = 50  # a resumed phase has fresh optimiser moments: its learning rate ramps up again
END_MARGIN = 45.0  # seconds a call keeps for its last save and the preview
EVAL_EVERY = 500  # steps between two held-out losses
NEXT_PHASE_SECONDS = 300.0  # a call starts a second phase only with this much time left: its first step compiles
PHASES = ("tokenizer", "prefix", "full")  # the transformer's phases: the schedule's prefix, then all of it
# options of one call (or of the other actions); the others belong to the run and come from the
# checkpoint on --resume
CALL_OPTIONS = ("action", "data", "out", "resume", "resume_from_export", "replan", "phase", "budget_minutes", "save_every_minutes",
                "device", "travel", "attention", "compile", "assets", "log", "samples", "scales", "score_batch", "split",
                "prompts_out")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="sparvar train-demo", description=__doc__.splitlines()[0])
    p.add_argument("action", nargs="?", default="train", choices=("train", "prepare", "export", "score", "prompts"))
    p.add_argument("--data", default="runs/emoji.npz", help="the emoji data set (`prepare` writes it)")
    p.add_argument("--out", default="runs/demo", help="checkpoint folder")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out with its options")
    p.add_argument("--resume-from-export", action="store_true",
                   help="continue what `export` wrote (--assets, --log) into a new --out, with fresh random streams")
    p.add_argument("--phase", default="all", choices=("all",) + PHASES, help="which phases this call may train")
    p.add_argument("--budget-minutes", type=float, default=8.5, help="wall time of this call, saving included")
    p.add_argument("--save-every-minutes", type=float, default=2.0)
    p.add_argument("--replan", metavar="PHASE=STEPS", action="append", default=[],
                   help="on a resume: give a phase that has not ended a new step count; its cosine schedule "
                        "continues from the step it is at towards the new end (e.g. full=5000)")
    p.add_argument("--travel", help="also write the checkpoint here at the end, in bf16 (what a GPU call sends back)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer-minutes", type=float, default=3.0, help="planned time of the whole tokenizer phase")
    p.add_argument("--tokenizer-steps", type=int, help="tokenizer steps (default: what fits --tokenizer-minutes)")
    p.add_argument("--tokenizer-batch", type=int, default=64)
    p.add_argument("--tokenizer-lr", type=float, default=1e-3)
    p.add_argument("--tokenizer-flip", type=float, default=0.05, help="max share of bits flipped per sample")
    p.add_argument("--encoder-width", type=int, default=64)
    p.add_argument("--prefix-scales", type=int, default=10, help="scales of the first transformer phase")
    p.add_argument("--prefix-minutes", type=float, default=20.0,
                   help="planned time of the prefix phase, over all calls")
    p.add_argument("--prefix-steps", type=int, help="prefix-phase steps (default: what fits --prefix-minutes)")
    p.add_argument("--prefix-batch", type=int, default=48)
    p.add_argument("--prefix-lr", type=float, default=1e-3)
    p.add_argument("--full-minutes", type=float, default=30.0, help="planned time of the full phase, over all calls")
    p.add_argument("--full-steps", type=int, help="full-phase steps (default: what fits --full-minutes)")
    p.add_argument("--full-batch", type=int, default=16)
    p.add_argument("--full-lr", type=float, default=5e-4)
    p.add_argument("--flip", type=float, default=0.2, help="max share of bits flipped per sample (self-correction)")
    p.add_argument("--text-dropout", type=float, default=0.1, help="share of prompts replaced by the empty one")
    p.add_argument("--scale-lr", type=float, default=10.0,
                   help="learning-rate factor of the attention temperatures (log-scale, start at 4)")
    p.add_argument("--attention", default="sdpa", choices=ATTENTION, help="teacher forcing's attention (step.py)")
    p.add_argument("--compile", default="auto", choices=("auto",) + COMPILE,
                   help="torch.compile the transformer step as one graph or per block (step.py; auto: graph on CUDA)")
    p.add_argument("--model", default="infinity-demo", help="registry config to train")
    p.add_argument("--schedule", help="other scales than the model's (small test runs)")
    p.add_argument("--depth", type=int, help="other depth than the model's (small test runs)")
    p.add_argument("--width", type=int, help="other width than the model's (small test runs)")
    p.add_argument("--heads", type=int, help="other head count than the model's (small test runs)")
    p.add_argument("--assets", default=str(ASSETS),
                   help="export: folder for the bf16 weights (--resume-from-export reads them)")
    p.add_argument("--log", default="benchmarks/demo_training.json",
                   help="export: where the training log goes (--resume-from-export reads it)")
    p.add_argument("--samples", type=int, default=500, help="score: training prompts generated (a fixed sample)")
    p.add_argument("--scales", default="full", choices=("full", "prefix"), help="score: the schedule generated")
    p.add_argument("--score-batch", type=int, default=16, help="score: images per batch")
    p.add_argument("--split", default="held-out", choices=("held-out", "train"), help="prompts: which split")
    p.add_argument("--prompts-out", help="prompts: file to write (default: print them)")
    return p.parse_args(argv)


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 5% of the steps (at most 100), then cosine down to 10%."""
    warmup = max(1, min(100, total // 20))
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(t, 1.0))))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Phase:
    """One phase's optimiser, learning-rate schedule and step budget. `record` is the phase's part
    of the checkpoint state (steps done, total, seconds, history) and is updated in place."""

    def __init__(self, name: str, groups: list[dict], peak: float, record: dict, planned_seconds: float, device):
        self.name, self.peak, self.record, self.planned, self.device = name, peak, record, planned_seconds, device
        self.opt = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.95), weight_decay=0.01,
                                     fused=device.type == "cuda")
        self.params = [p for group in self.opt.param_groups for p in group["params"]]

    def lr(self, step: int, first: int) -> float:
        rate = lr_at(step, self.record["total"] or 10**9, self.peak)
        return rate * min(1.0, (step - first + 1) / REWARM_STEPS) if first > 0 else rate

    def run(self, step_fn, deadline: float, save, save_every: float, evaluate=None) -> bool:
        """Steps until the phase's total or until `deadline` (time.monotonic()) comes near; True
        when the phase is complete. `evaluate()` -> metrics runs every EVAL_EVERY steps and at the
        end, into the record's "evaluations"."""
        rec = self.record
        first, start = rec["steps"], time.monotonic()
        last_save, last_step, step_seconds, probe_start = start, start, 0.0, None
        while rec["total"] is None or rec["steps"] < rec["total"]:
            if time.monotonic() + 2 * step_seconds + END_MARGIN > deadline:
                print(f"[{self.name}] stopping at step {rec['steps']}: the call's budget is spent", flush=True)
                break
            done_here = rec["steps"] - first
            if rec["total"] is None and done_here in (3, 3 + PROBE_STEPS):
                _sync(self.device)
                if done_here == 3:
                    probe_start = time.monotonic()
                else:
                    per_step = (time.monotonic() - probe_start) / PROBE_STEPS
                    rec["total"] = max(rec["steps"] + 1, int(self.planned / per_step))
                    rec["probe_ms_per_step"] = per_step * 1000
                    print(f"[{self.name}] {per_step * 1000:.0f} ms/step: {rec['total']} steps fit "
                          f"{self.planned / 60:.1f} min", flush=True)
            lr = self.lr(rec["steps"], first)
            for group in self.opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            metrics = step_fn()
            self.opt.zero_grad(set_to_none=True)
            metrics["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            rec["steps"] += 1
            now = time.monotonic()
            step_seconds = now - last_step if done_here > 2 else step_seconds  # the first steps compile and tune
            last_step = now
            if rec["steps"] % 25 == 0 or rec["steps"] == rec["total"]:
                row = {"step": rec["steps"], "lr": lr, "grad_norm": float(grad_norm),
                       "seconds": rec["seconds"] + now - start}
                row.update({k: float(v.detach()) for k, v in metrics.items()})
                rec["history"].append(row)
                print(f"[{self.name}] " + " ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
            if evaluate is not None and (rec["steps"] % EVAL_EVERY == 0 or rec["steps"] == rec["total"]):
                row = {"step": rec["steps"], **evaluate()}
                rec.setdefault("evaluations", []).append(row)
                print(f"[{self.name}] " + " ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
            if now - last_save > save_every:
                rec["seconds"] += now - start
                start = last_save = now
                save()
        rec["seconds"] += time.monotonic() - start
        return rec["total"] is not None and rec["steps"] >= rec["total"]


class Run:
    """The models, data and state of one training run, on one device."""

    def __init__(self, args, device: torch.device, state: dict):
        self.args, self.device, self.state = args, device, state
        spec = get_spec(args.model)
        overrides = {k: getattr(args, k) for k in ("depth", "width", "heads") if getattr(args, k)}
        self.cfg = cfg = replace(spec.transformer, **overrides)
        full = parse_schedule(args.schedule) if args.schedule else spec.schedule()
        if not 1 <= args.prefix_scales <= len(full):
            raise SparvarError(f"--prefix-scales must be 1 to {len(full)}, got {args.prefix_scales}")
        self.schedules = {"prefix": full.truncated(args.prefix_scales), "full": full}
        self.spec = replace(spec, transformer=cfg, schedules=(full, self.schedules["prefix"]))
        self.sizes = {k: s.sizes[-1][0] * spec.vae.patch for k, s in self.schedules.items()}  # pixels
        if cfg.patchify or full.sizes[-1][0] != full.sizes[-1][1]:
            raise SparvarError("the demo tokenizer makes square images without patchified tokens")
        if cfg.text_width != spec.text["d_model"]:
            raise SparvarError(f"{spec.name}: text_width {cfg.text_width} is not its T5's width {spec.text['d_model']}")
        torch.manual_seed(args.seed)
        self.encoder = Encoder(cfg.vae_channels, args.encoder_width).to(device)
        self.decoder = InfinityVAE(spec.vae).to(device).init_weights(args.seed)
        self.codes = BitwiseCodes(cfg.vae_channels, patchify=False)
        self.tokenizer = Tokenizer(self.encoder, self.decoder, self.codes)
        self.text = build_t5(spec.text).to(device)
        self.model = InfinityTransformer(cfg).to(device).init_weights(args.seed)
        self.gen = torch.Generator(device).manual_seed(args.seed)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

        emoji = data.load(args.data)
        self.train_set, self.held_out = emoji.split(held_out=False), emoji.split(held_out=True)
        self.images = torch.from_numpy(self.train_set.images).to(device)
        self.byte_tokenizer = ByteTokenizer(spec.text["vocab_size"])
        # one padded length for both splits, so the held-out loss runs the training step's shapes
        ids, mask = self.byte_tokenizer(self.train_set.prompts + self.held_out.prompts, cfg.text_max_len)
        n = len(self.train_set.prompts)
        self.ids, self.mask = ids[:n].to(device), mask[:n].to(device)
        self.held_ids, self.held_mask = ids[n:].to(device), mask[n:].to(device)

    # ---- checkpoint ----------------------------------------------------------------------
    def tensors(self, travel: bool = False) -> dict[str, torch.Tensor]:
        """What the checkpoint holds: the frozen tokenizer in bf16 (what ships), trained parts in
        float32 (bf16 for `travel`), the transformer and text encoder once they have trained, and
        the RNG states."""
        dtype = torch.bfloat16 if self.state["tokenizer"]["done"] or travel else torch.float32
        out = {}
        for prefix, module in (("encoder.", self.encoder), ("vae.", self.decoder)):
            out.update({prefix + k: v.to(dtype) for k, v in module.state_dict().items()})
        if self.state["prefix"]["steps"] > 0:
            dtype = torch.bfloat16 if travel else torch.float32
            out.update({"transformer." + k: v.to(dtype) for k, v in self.model.state_dict().items()})
            out.update({"text." + k: v.to(dtype) for k, v in t5_state(self.text).items()})
        out["rng.data"] = self.gen.get_state()
        out["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            out["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.encoder.load_state_dict(part("encoder."))
        # without the untrained encoder that exports and checkpoints before the decoder-only VAE hold
        self.decoder.load_state_dict(self.decoder.checkpoint_state(part("vae.")))
        if part("transformer."):  # saved once the transformer has begun
            self.model.load_state_dict(part("transformer."))
            load_t5(self.text, part("text."), "the checkpoint's text encoder")
        if "rng.data" not in tensors:  # an export: the streams go on from a seed of their own
            print("note: no random streams saved (an export): they restart from the seed and the steps done")
            seed = self.args.seed + sum(self.state[p]["steps"] for p in PHASES)
            self.gen.manual_seed(seed)
            torch.manual_seed(seed)
            self.state["device_type"] = self.device.type
        elif self.state["device_type"] == self.device.type:
            self.gen.set_state(tensors["rng.data"])
            torch.set_rng_state(tensors["rng.torch"])
            if self.device.type == "cuda":
                torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        else:
            print(f"note: the checkpoint was made on {self.state['device_type']}: its random streams restart here")
            self.state["device_type"] = self.device.type

    def save_checkpoint(self, folder: str | Path | None = None, travel: bool = False) -> list[Path]:
        tag = "-".join(f"{name[0]}{self.state[name]['steps']}" for name in PHASES)
        return checkpoint.write(folder or self.args.out, self.tensors(travel), self.state, tag)

    # ---- phase 1: the tokenizer ------------------------------------------------------------
    def tokenizer_step(self) -> dict:
        """One batch of random training emoji, half of them mirrored (only the tokenizer sees mirrored
        emoji: prompts say "left" and "right"), at the transformer phases' sizes in turn."""
        args, n, rec = self.args, self.args.tokenizer_batch, self.state["tokenizer"]
        kind = ("full", "prefix")[rec["steps"] % 2]
        idx = torch.randint(len(self.images), (n,), device=self.device, generator=self.gen)
        x = data.to_pixels(self.images[idx], self.sizes[kind])
        mirror = torch.rand(n, device=self.device, generator=self.gen) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        flip = torch.rand(len(x), device=self.device, generator=self.gen) * args.tokenizer_flip
        with self.autocast:
            recon, z, quantised = self.tokenizer(x, self.schedules[kind], flip, self.gen)
        mse = F.mse_loss(recon.float(), x)
        commit = F.mse_loss(z, quantised)
        return {"loss": mse + 0.25 * commit, "mse": mse.detach(), "commit": commit.detach()}

    @torch.no_grad()
    def reconstruction_psnr(self, images: np.ndarray, kind: str) -> float:
        """Mean PSNR (dB) of the tokenizer's reconstructions of uint8 images at a phase's size,
        quantised without flips."""
        self.tokenizer.eval()
        values = []
        for chunk in torch.from_numpy(images).split(32):
            x = data.to_pixels(chunk.to(self.device), self.sizes[kind])
            with self.autocast:
                recon = self.tokenizer(x, self.schedules[kind])[0].float()
            values.append(psnr((recon.clamp(-1, 1) + 1) / 2, (x + 1) / 2))
        self.tokenizer.train()
        return float(torch.cat(values).mean())

    def train_tokenizer(self, deadline: float) -> bool:
        args, rec = self.args, self.state["tokenizer"]
        rec["total"] = rec["total"] or args.tokenizer_steps
        self.tokenizer.train()
        phase = Phase("tokenizer", [{"params": list(self.tokenizer.parameters())}], args.tokenizer_lr, rec,
                      args.tokenizer_minutes * 60, self.device)
        if not phase.run(self.tokenizer_step, deadline, self.save_checkpoint, args.save_every_minutes * 60):
            return False
        with torch.no_grad():  # frozen from here on as it ships, in bf16, so a resumed run sees the same weights
            for p in self.tokenizer.parameters():
                p.copy_(p.bfloat16())
        for kind in ("full", "prefix"):
            rec[f"held_out_psnr_{self.sizes[kind]}px"] = self.reconstruction_psnr(self.held_out.images, kind)
            rec[f"train_psnr_{self.sizes[kind]}px"] = self.reconstruction_psnr(self.train_set.images[:256], kind)
        rec["done"] = True
        print("[tokenizer] reconstruction PSNR " + ", ".join(f"{k} {v:.2f} dB" for k, v in rec.items()
                                                              if "psnr" in k), flush=True)
        self.save_checkpoint()
        return True

    # ---- phases 2 and 3: the transformer ---------------------------------------------------
    @torch.no_grad()
    def latents(self, kind: str, images: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen encoder's latents (B, c, h, w), float32, of uint8 images (the training set's
        by default) at a phase's size."""
        self.encoder.eval()
        out = []
        for chunk in (self.images if images is None else images).split(64):
            with self.autocast:
                out.append(self.encoder(data.to_pixels(chunk, self.sizes[kind])).float())
        return torch.cat(out)

    def transformer_step(self) -> dict:
        """One batch of teacher forcing on the frozen encoder's latents (`self.latent_set`)."""
        args, n = self.args, self.batch
        idx = torch.randint(len(self.latent_set), (n,), device=self.device, generator=self.gen)
        flip = torch.rand(n, device=self.device, generator=self.gen) * args.flip
        drop = torch.rand(n, device=self.device, generator=self.gen) < args.text_dropout
        return self.teacher(self.latent_set[idx], self.ids[idx], self.mask[idx], flip, drop, self.gen)

    def held_out_loss(self) -> dict:
        """The step's loss on the held-out emoji, without bit flips or dropped prompts, in batches of
        the training step's size (the same compiled graph; no gradient is taken)."""
        n = self.batch
        losses = []
        self.text.eval()
        for start in range(0, len(self.held_latents) - n + 1, n):
            part = slice(start, start + n)
            metrics = self.teacher(self.held_latents[part], self.held_ids[part], self.held_mask[part],
                                   torch.zeros(n, device=self.device), torch.zeros(n, dtype=torch.bool, device=self.device))
            losses.append(float(metrics["loss"].detach()))
        self.text.train()
        return {"held_out_loss": float(np.mean(losses))} if losses else {}

    def train_transformer(self, kind: str, deadline: float) -> bool:
        """Phase `kind` ("prefix" or "full") until its steps are done or the call's time is up."""
        args, model, rec = self.args, self.model, self.state[kind]
        rec["total"] = rec["total"] or getattr(args, f"{kind}_steps")
        self.batch = getattr(args, f"{kind}_batch")
        self.latent_set = self.latents(kind)
        self.held_latents = self.latents(kind, torch.from_numpy(self.held_out.images).to(self.device))
        compile = args.compile if args.compile != "auto" else "graph" if self.device.type == "cuda" else "off"
        self.teacher = TeacherForcing(model, self.text, self.codes, self.schedules[kind], args.attention, compile)
        model.train()
        self.text.train()
        temperatures = [p for n, p in model.named_parameters() if n.endswith("scale_mul_1H11")]
        others = [p for n, p in model.named_parameters() if not n.endswith("scale_mul_1H11")]
        groups = [{"params": others + list(self.text.parameters())},
                  {"params": temperatures, "lr_scale": args.scale_lr, "weight_decay": 0.0}]
        phase = Phase(kind, groups, getattr(args, f"{kind}_lr"), rec, getattr(args, f"{kind}_minutes") * 60,
                      self.device)
        rec["done"] = phase.run(self.transformer_step, deadline, self.save_checkpoint, args.save_every_minutes * 60,
                                self.held_out_loss)
        return rec["done"]

    def preview(self, path: Path, kind: str) -> None:
        """Two seeds of four training and four held-out prompts, dense, as the model is now."""
        self.model.eval()
        self.decoder.eval()
        encoder = TextEncoder(self.text, self.byte_tokenizer, self.cfg.text_max_len)
        pipe = Pipeline(self.spec, self.model, self.decoder, encoder)
        train, held = self.train_set.prompts, self.held_out.prompts
        prompts = train[:: max(1, len(train) // 4)][:4] + held[:4]
        files.save_image(grid(pipe, prompts, [0, 1], schedule=self.schedules[kind]), path)
        self.model.train()
        self.text.train()


def _new_state(args, device: torch.device) -> dict:
    spec = get_spec(args.model)
    phase = lambda: {"steps": 0, "total": None, "seconds": 0.0, "history": [], "done": False}  # noqa: E731
    return {"model": args.model, "args": {k: v for k, v in vars(args).items() if k not in CALL_OPTIONS},
            "device_type": device.type, "text_config": spec.text, "vae_config": asdict(spec.vae),
            "calls": [], **{name: phase() for name in PHASES}}


def replan(state: dict, changes: list[str]) -> None:
    """Applies --replan PHASE=STEPS to a resumed state: the phase's total, which its learning-rate
    schedule ends at, becomes STEPS (at least the steps it has done, plus one)."""
    for change in changes:
        kind, _, steps = change.partition("=")
        if kind not in ("prefix", "full") or not steps.isdigit():
            raise SparvarError(f"--replan takes prefix=STEPS or full=STEPS, got {change!r}")
        rec = state[kind]
        if rec["done"] or int(steps) <= rec["steps"]:
            raise SparvarError(f"--replan {change}: the {kind} phase is at step {rec['steps']}"
                               + (" and has ended" if rec["done"] else ": give more steps than that"))
        rec.setdefault("replanned", []).append({"at_step": rec["steps"], "from": rec["total"], "to": int(steps)})
        rec["total"] = int(steps)
        print(f"[{kind}] replanned: {int(steps)} steps in all (was {rec['replanned'][-1]['from']})")


def train(args, argv: list[str]) -> dict:
    deadline = time.monotonic() + args.budget_minutes * 60
    out = Path(args.out)
    device = resolve_device(args.device)
    if args.resume and args.resume_from_export:
        raise SparvarError("--resume continues --out; --resume-from-export continues --assets and --log: pick one")
    if args.resume_from_export and checkpoint.exists(out):
        raise SparvarError(f"{out} holds a training checkpoint: continue it with --resume, or give another --out")
    if args.replan and not (args.resume or args.resume_from_export):
        raise SparvarError("--replan changes a resumed run's plan: pass --resume or --resume-from-export")
    if args.resume or args.resume_from_export:
        tensors, state = checkpoint.load(out) if args.resume else load_export(args)
        args = argparse.Namespace(**{**vars(args), **state["args"]})
        replan(state, args.replan)
        print(f"resuming {out}: " + ", ".join(f"{p} step {state[p]['steps']}" for p in PHASES)
              + f" (run options of the first call: {state['args']})")
    elif checkpoint.exists(out):
        raise SparvarError(f"{out} holds a training checkpoint: pass --resume to continue it, or another --out")
    else:
        tensors, state = None, _new_state(args, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    run = Run(args, device, state)
    if tensors is not None:
        run.restore(tensors)
    state.update(transformer_config=asdict(run.cfg), schedules={k: s.describe() for k, s in run.schedules.items()},
                 data={"source": args.data, "train_emoji": len(run.train_set.prompts),
                       "held_out_emoji": len(run.held_out.prompts), "image_sizes": run.sizes})
    call = {"command": "sparvar train-demo " + " ".join(argv), "phase": args.phase,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "steps_before": {p: state[p]["steps"] for p in PHASES}}
    state["calls"].append(call)

    ready = state["tokenizer"]["done"]
    if not ready and args.phase in ("all", "tokenizer"):
        ready = run.train_tokenizer(deadline)
    if args.phase in ("prefix", "full") and not ready:
        raise SparvarError(f"the tokenizer of {out} is not trained yet: run --phase tokenizer (or all) first")
    trained = None
    for kind in ("prefix", "full"):
        if ready and not state[kind]["done"] and args.phase in ("all", kind):
            if trained is not None:
                run.save_checkpoint()  # the finished phase is kept whatever the next one's compile costs
                if deadline - time.monotonic() < NEXT_PHASE_SECONDS:
                    print(f"[{kind}] not started: less than {NEXT_PHASE_SECONDS:.0f} s of the call are left", flush=True)
                    break
            trained = kind
            ready = run.train_transformer(kind, deadline)
        ready = ready and state[kind]["done"]
    call.update(finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                steps_after={p: state[p]["steps"] for p in PHASES})
    if device.type == "cuda":
        call["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    written = run.save_checkpoint()  # before the preview, which uses no random stream of the training
    if args.travel:
        written += run.save_checkpoint(args.travel, travel=True)
    if trained is not None:
        run.preview(out / "preview.png", trained)
        written.append(out / "preview.png")
    print(f"wrote {', '.join(str(f) for f in written)}")
    return state


def exported_files(spec, assets: str | Path) -> dict[str, Path]:
    """Checkpoint prefix -> the bf16 file `export` writes it to: the three the pipeline loads, and
    the tokenizer's encoder, which training needs (and which turns images into tokens)."""
    assets = Path(assets)
    paths = {prefix: assets / spec.bundled[option] for option, prefix in
             (("--weights", "transformer."), ("--vae", "vae."), ("--text-encoder", "text."))}
    paths["encoder."] = assets / spec.bundled["--vae"].replace("_vae.", "_encoder.")
    return paths


def export(args) -> list[Path]:
    """The checkpoint's weights as the bf16 files the model ships, and its state as the log."""
    tensors, state = checkpoint.load(args.out)
    spec = get_spec(state["model"])
    for kind in ("prefix", "full"):
        if not state[kind]["done"]:
            print(f"note: the transformer's {kind} phase is at step {state[kind]['steps']} of {state[kind]['total']}")
    written = []
    for prefix, path in exported_files(spec, args.assets).items():
        part = {k[len(prefix):]: v.to(torch.bfloat16) for k, v in tensors.items() if k.startswith(prefix)}
        if not part:
            raise SparvarError(f"{args.out} holds no {prefix[:-1]} weights yet: train further first")
        path.parent.mkdir(parents=True, exist_ok=True)
        files.whole(path, lambda temporary, part=part: save_file(part, str(temporary)))
        written.append(path)
    tokenizer = state["tokenizer"]
    state["summary"] = {  # what `score` adds refers to these weights only: an export starts it anew
        "tokenizer_heldout_psnr_db": tokenizer.get(f"held_out_psnr_{state['data']['image_sizes']['full']}px"),
        "tokenizer_heldout_psnr_db_prefix": tokenizer.get(f"held_out_psnr_{state['data']['image_sizes']['prefix']}px"),
    }
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(log, json.dumps(state, indent=1))
    return written + [log]


def score(args, argv: list[str]) -> dict:
    """Retrieval top-1 of the exported model on training prompts, recorded in the log's summary."""
    log = Path(args.log)
    if not log.is_file():
        raise SparvarError(f"no training log at {log}: `score` measures what `export` wrote")
    state = json.loads(log.read_text())
    spec = get_spec(state["model"])
    paths = exported_files(spec, args.assets)
    pipe = load_pipeline(spec, weights=str(paths["transformer."]), vae=str(paths["vae."]),
                         text_encoder=str(paths["text."]), device=args.device)
    schedule = spec.schedules[0] if args.scales == "full" else spec.schedules[0].truncated(state["args"]["prefix_scales"])
    train_set = data.load(args.data).split(held_out=False)
    result = retrieval_top1(pipe, train_set, args.samples, args.score_batch, schedule)
    key = "train_prompt_retrieval_top1" + ("" if args.scales == "full" else "_prefix")
    state.setdefault("summary", {}).update({
        key: result["train_prompt_retrieval_top1"], f"{key}_samples": result["samples"],
        f"{key}_command": "sparvar train-demo " + " ".join(argv), f"{key}_misses": result["misses_shown"]})
    files.write_text(log, json.dumps(state, indent=1))
    print(f"{key}: {result['train_prompt_retrieval_top1']:.3f} of {result['samples']} prompts (written to {log})")
    return result


def load_export(args) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of what `export` wrote (--assets and --log), to resume from in a new place."""
    log = Path(args.log)
    if not log.is_file():
        raise SparvarError(f"no training log at {log}: --resume-from-export continues what `export` wrote")
    state = json.loads(log.read_text())
    tensors = {}
    for prefix, path in exported_files(get_spec(state["model"]), args.assets).items():
        if not path.is_file():
            raise SparvarError(f"{path} is missing: --resume-from-export needs every file `export` writes")
        tensors.update({prefix + k: v for k, v in load_file(str(path)).items()})
    return tensors, state


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.action == "prepare":
        Path(args.data).parent.mkdir(parents=True, exist_ok=True)
        summary = data.prepare(args.data)
        print(f"wrote {args.data}: {summary['emoji']} emoji ({summary['held_out']} held out), "
              f"{summary['bytes'] / 2**20:.1f} MiB of PNGs" +
              (f"; not in the font: {', '.join(summary['missing_from_font'])}" if summary["missing_from_font"] else ""))
        return summary
    if args.action == "export":
        print("wrote " + ", ".join(map(str, export(args))))
        return None
    if args.action == "score":
        return score(args, argv)
    if args.action == "prompts":
        prompts = data.load(args.data).split(held_out=args.split == "held-out").prompts
        if args.prompts_out:
            files.write_text(args.prompts_out, "\n".join(prompts) + "\n")
            print(f"wrote {len(prompts)} prompts to {args.prompts_out}")
        else:
            print("\n".join(prompts))
        return None
    return train(args, argv)


if __name__ == "__main__":
    main()

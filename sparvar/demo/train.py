"""Train the demo model: `sparvar train-demo --out DIR` (or `python -m sparvar.demo.train`).

Two phases on one device, from one seed:
1. the tokenizer: encoder + bitwise multi-scale quantiser + BSQ-VAE decoder, reconstruction loss
   (MSE) plus commitment, straight-through, with a few random bit flips so the decoder tolerates
   the sampler's mistakes;
2. the transformer (the `infinity-demo` config of the registry) by teacher forcing on the frozen
   encoder's bits: cross-entropy per bit, random bit flips for self-correction, labels dropped
   to the unconditional row for classifier-free guidance, the attention temperatures learning
   faster than the rest (`--scale-lr`). `--tokenizer DIR` takes phase 1's files from an earlier run.

Each phase runs a fixed number of steps, or as many as fit in a time budget (measured after a few
steps, then fixed and recorded, so `--tokenizer-steps/--steps` replay the run). Writes
transformer.safetensors, vae.safetensors (the decoder), encoder.safetensors and train_log.json
to --out, the weights also every --save-every seconds so an interrupted run leaves a model.
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

from sparvar.demo.data import FASHION_MNIST_DIR, load_images, to_pixels
from sparvar.demo.tokenizer import Encoder, Tokenizer, quantize
from sparvar.eval.metrics import psnr
from sparvar.models.infinity.bitwise import BitwiseCodes
from sparvar.models.infinity.transformer import InfinityTransformer
from sparvar.models.infinity.vae import InfinityVAE
from sparvar.models.registry import get_spec
from sparvar.pipeline import resolve_device
from sparvar.schedules import parse_schedule

PROBE_STEPS = 10  # steps timed to turn a time budget into a step count (after 3 warm-up steps)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sparvar train-demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data", default=str(FASHION_MNIST_DIR), help="Fashion-MNIST folder or an .npz (images, labels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--tokenizer-steps", type=int, help="tokenizer steps (default: what fits --tokenizer-seconds)")
    p.add_argument("--tokenizer-seconds", type=float, default=90.0)
    p.add_argument("--tokenizer-batch", type=int, default=128)
    p.add_argument("--tokenizer-lr", type=float, default=2e-3)
    p.add_argument("--tokenizer-flip", type=float, default=0.05, help="max share of bits flipped per sample")
    p.add_argument("--encoder-width", type=int, default=64)
    p.add_argument("--steps", type=int, help="transformer steps (default: what fits --seconds)")
    p.add_argument("--seconds", type=float, default=420.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--flip", type=float, default=0.2, help="max share of bits flipped per sample (self-correction)")
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--scale-lr", type=float, default=10.0,
                   help="learning-rate factor of the attention temperatures (log-scale, start at 4): lets "
                   "attention sharpen within a short run")
    p.add_argument("--tokenizer", help="folder with encoder.safetensors and vae.safetensors: skip phase 1")
    p.add_argument("--save-every", type=float, default=60.0, help="seconds between checkpoints")
    p.add_argument("--model", default="infinity-demo", help="registry config to train")
    p.add_argument("--schedule", help="other scales than the model's (small test runs)")
    p.add_argument("--depth", type=int, help="other depth than the model's (small test runs)")
    p.add_argument("--width", type=int, help="other width than the model's (small test runs)")
    p.add_argument("--heads", type=int, help="other head count than the model's (small test runs)")
    return p.parse_args(argv)


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 5% of the steps (at most 100), then cosine down to 10%."""
    warmup = max(1, min(100, total // 20))
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(t, 1.0))))


def scale_weights(schedule, device) -> torch.Tensor:
    """Per-token loss weights: scale k weighs sqrt(n_k) in all, so the few coarse tokens that set
    the layout are not drowned by the 4096 of the last scale; normalised to sum 1."""
    w = torch.cat([torch.full((n,), n**-0.5) for n in schedule.lengths])
    return (w / w.sum()).to(device)


class Phase:
    """One optimiser over parameter groups (a group's "lr_scale" multiplies the schedule's rate),
    a step budget (fixed, or fitted to seconds), history, saving."""

    def __init__(self, name, groups, lr, steps, seconds, save, save_every, device):
        self.name, self.peak, self.steps, self.seconds = name, lr, steps, seconds
        self.save, self.save_every, self.device = save, save_every, device
        self.opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
        self.params = [p for group in self.opt.param_groups for p in group["params"]]
        self.history: list[dict] = []

    def run(self, step_fn) -> dict:
        start = last_save = time.perf_counter()
        probe_start, step, total = None, 0, self.steps
        while total is None or step < total:
            if step == 3:
                probe_start = time.perf_counter()
            if total is None and step == 3 + PROBE_STEPS:
                per_step = (time.perf_counter() - probe_start) / PROBE_STEPS
                total = max(step + 1, int((self.seconds - (probe_start - start)) / per_step))
                print(f"[{self.name}] {per_step * 1000:.0f} ms/step: {total} steps fit {self.seconds:.0f} s",
                      flush=True)
            lr = lr_at(step, total or 10**9, self.peak)
            for group in self.opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            metrics = step_fn()
            self.opt.zero_grad(set_to_none=True)
            metrics["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            step += 1
            if step % 25 == 0 or step == total:
                row = {"step": step, "lr": lr, "grad_norm": float(grad_norm), "seconds": time.perf_counter() - start}
                row.update({k: float(v.detach()) for k, v in metrics.items()})
                self.history.append(row)
                print(f"[{self.name}] " + " ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
            if time.perf_counter() - last_save > self.save_every:
                self.save()
                last_save = time.perf_counter()
        return {"steps": total, "seconds": time.perf_counter() - start, "history": self.history}


def _state(module) -> dict:
    return {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator(device).manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    spec = get_spec(args.model)
    overrides = {k: getattr(args, k) for k in ("depth", "width", "heads") if getattr(args, k)}
    cfg = replace(spec.transformer, **overrides)
    schedule = parse_schedule(args.schedule) if args.schedule else spec.schedule()
    size = schedule.sizes[-1][0] * spec.vae.patch
    if spec.vae.patch != 1 or cfg.patchify or schedule.sizes[-1][0] != schedule.sizes[-1][1]:
        raise ValueError("the demo tokenizer works at patch 1 on square images")

    images, labels = load_images(args.data, "train")
    test_images, _ = load_images(args.data, "test")
    images, labels = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
    test_pixels = to_pixels(torch.from_numpy(test_images[:1000]).to(device), size)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(images), (n,), device=device, generator=gen)
        x = to_pixels(images[idx], size)
        mirror = torch.rand(n, device=device, generator=gen) < 0.5  # left-right flips: clothes are symmetric
        return torch.where(mirror[:, None, None, None], x.flip(-1), x), labels[idx]

    log = {
        "command": "sparvar train-demo " + " ".join(argv),
        "args": vars(args),
        "model": args.model,
        "transformer_config": asdict(cfg),
        "vae_config": asdict(spec.vae),
        "schedule": schedule.describe(),
        "data": {"source": args.data, "train_images": len(images), "image_size": size},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

    # ---- phase 1: tokenizer ------------------------------------------------------------
    encoder = Encoder(cfg.vae_channels, args.encoder_width).to(device)
    decoder = InfinityVAE(spec.vae).init_weights(args.seed).to(device)
    codes = BitwiseCodes(cfg.vae_channels, patchify=False, next_input=cfg.next_input)
    tokenizer = Tokenizer(encoder, decoder, schedule, codes).train()

    def save_tokenizer():
        save_file(_state(decoder), str(out / "vae.safetensors"))
        save_file(_state(encoder), str(out / "encoder.safetensors"))

    def tokenizer_step():
        x, _ = batch(args.tokenizer_batch)
        flip = torch.rand(len(x), device=device, generator=gen) * args.tokenizer_flip
        with autocast:
            recon, z, quantised = tokenizer(x, flip, gen)
        mse = F.mse_loss(recon.float(), x)
        commit = F.mse_loss(z, quantised)
        return {"loss": mse + 0.25 * commit, "mse": mse.detach(), "commit": commit.detach()}

    if args.tokenizer:  # a tokenizer trained before (same seed and data): its files, not a new run
        source = Path(args.tokenizer)
        encoder.load_state_dict(load_file(str(source / "encoder.safetensors")))
        decoder.load_state_dict(load_file(str(source / "vae.safetensors")))
        log["tokenizer"] = {"loaded_from": str(source)}
    else:
        phase = Phase("tokenizer", [{"params": list(tokenizer.parameters())}], args.tokenizer_lr,
                      args.tokenizer_steps, args.tokenizer_seconds, save_tokenizer, args.save_every, device)
        log["tokenizer"] = phase.run(tokenizer_step)
    tokenizer.eval()
    save_tokenizer()
    with torch.no_grad(), autocast:
        recon = torch.cat([tokenizer(x)[0].float() for x in test_pixels.split(250)])
    log["tokenizer"]["test_psnr"] = float(psnr((recon.clamp(-1, 1) + 1) / 2, (test_pixels + 1) / 2).mean())
    print(f"[tokenizer] held-out reconstruction PSNR {log['tokenizer']['test_psnr']:.2f} dB", flush=True)

    # ---- phase 2: transformer ----------------------------------------------------------
    model = InfinityTransformer(cfg).to(device).init_weights(args.seed).train()
    weights = scale_weights(schedule, device)
    bounds = np.cumsum((0,) + schedule.lengths)

    def save_transformer():
        save_file(_state(model), str(out / "transformer.safetensors"))

    def transformer_step():
        x, y = batch(args.batch)
        with torch.no_grad(), autocast:
            z = encoder(x).float()
        flip = torch.rand(len(x), device=device, generator=gen) * args.flip
        bits, inputs, _ = quantize(z, schedule, codes, flip, gen)
        bits = torch.cat(bits, dim=1)
        drop = torch.rand(len(y), device=device, generator=gen) < args.label_dropout
        y = torch.where(drop, cfg.num_classes, y)
        with autocast:
            logits = model.forward_full(inputs, schedule, model.prepare(y, guidance=False))
        ce = F.cross_entropy(logits.flatten(0, 2), bits.flatten(), reduction="none").view(bits.shape).mean(-1)
        correct = (logits.argmax(-1) == bits).float().mean((0, 2)).detach()
        metrics = {"loss": (ce * weights).sum(-1).mean()}
        for k in sorted({0, len(schedule) // 3, 2 * len(schedule) // 3, len(schedule) - 1}):
            metrics[f"acc{k}"] = correct[bounds[k] : bounds[k + 1]].mean()
        return metrics

    temperatures = [p for n, p in model.named_parameters() if n.endswith("scale_mul_1H11")]
    others = [p for n, p in model.named_parameters() if not n.endswith("scale_mul_1H11")]
    groups = [{"params": others}, {"params": temperatures, "lr_scale": args.scale_lr, "weight_decay": 0.0}]
    phase = Phase("transformer", groups, args.lr, args.steps, args.seconds, save_transformer,
                  args.save_every, device)
    log["transformer"] = phase.run(transformer_step)
    save_transformer()
    log["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    print(f"wrote {out}/transformer.safetensors, vae.safetensors, encoder.safetensors, train_log.json")
    return log


if __name__ == "__main__":
    main()

"""Record VAREdit parity fixtures: small random-weight official VAREdit models, run by the official code.

    python tools/parity/record_varedit.py --varedit ~/src/VAREdit --out tests/data/parity_varedit

For each case it writes the weights as official-format files (bf16 .pth: the transformer, the VAE
with its encoder) and what the official code made of them, per run: the source's transformer
input (16 evenly spaced tokens of it), the greedy (or official-sampler) bits of every scale, the
decoded image and, where asked, the teacher-forced logits. A run edits one of two source pictures
(saved beside the cases as PNG) with one prompt, as the official `infer.py` does: its `transform`
pads and resizes the picture, `gen_one_img` generates. The prompts go through the Infinity
fixtures' tiny T5 (`--t5`). It also writes a digest of the official 2B and 8B layouts (the models
built on the meta device) for tests/test_parity.py to compare sparvar's with. Everything runs on
the CPU in float32; tools/parity/README.md says what the harness stands in for.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import (  # noqa: E402
    TEXT_CHANNELS, InfinityCase, even_rows, git_commit, image_record, logits_record, pack_bits, what_the_loop_makes,
)
from record_hart import parameters_on_meta  # noqa: E402

from sparvar.bench import official  # noqa: E402

PROMPTS = ["make the sky purple", "add a red hat"]
BUDGETS = {256: "0.06M", 512: "0.25M", 1024: "1M"}  # our resolution -> the official pixel budget
LEVELS = 2  # VAE levels: patch 2 (the official VAE code at its smallest; the 2B's has 5, the 8B's 4)
OFFICIAL_SIZES = {"2b": dict(depth=32, embed_dim=2048, num_heads=16), "8b": dict(depth=40, embed_dim=3584, num_heads=28)}


def source_pictures(out: Path) -> dict[str, Image.Image]:
    """Two fixed pictures (colour gradients and discs), a square one and a wide one (the official
    transform pads it with white), saved as PNG the first time."""
    pictures = {}
    for name, (w, h), seed in (("square", (64, 64), 0), ("wide", (72, 40), 1)):
        path = out / f"source_{name}.png"
        if not path.exists():
            rng = np.random.default_rng(seed)
            y, x = np.mgrid[0:h, 0:w] / max(w, h)
            image = np.stack([x, y, 1 - x * y], axis=-1) * 200
            for _ in range(5):
                cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
                image[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
            Image.fromarray(image.round().astype(np.uint8)).save(path)
        pictures[name] = Image.open(path).convert("RGB")
    return pictures


class EditCase(InfinityCase):
    """One official VAREdit model (random weights) and the edits recorded with it."""

    def __init__(self, off, name, base, patchify, runs, seed, out, t5, pictures):
        super().__init__(off, name, base, patchify, runs, seed, out, t5)
        self.levels, self.patch, self.pictures = LEVELS, 2 ** (LEVELS - 1), pictures

    def record(self) -> dict:
        return dict(super().record(), family="varedit")

    def run(self, model, vae, tokenizer, encoder, key: str, run: dict) -> dict[str, torch.Tensor]:
        """One official edit (infer.py's steps: transform, gen_one_img), and, if asked, the
        teacher-forced logits on the next-scale inputs it made."""
        tables = self.off.dynamic_resolution.dynamic_resolution_h_w[1.0]
        schedule = [(1, h, w) for _, h, w in tables[BUDGETS[run["resolution"]]]["scales"]]
        run["schedule"] = [[h, w] for _, h, w in schedule]
        side = schedule[-1][1] * self.patch * (2 if self.patchify else 1)
        source, _ = self.off.infer.transform(self.pictures[run["source"]], side)

        with what_the_loop_makes(model, vae) as made, torch.no_grad(), official.exact_cross_attention(self.off.basic), \
                official.cuda_calls_stay_on_cpu():
            self.off.run.gen_one_img(
                model, vae, tokenizer, encoder, run["prompt"], source, g_seed=run["seed"], gt_leak=0, gt_ls_Bl=None,
                cfg_list=run["cfg"], tau_list=run["tau"], scale_schedule=schedule, top_k=run["top_k"],
                top_p=run["top_p"], cfg_insertion_layer=[0], vae_type=self.d, sampling_per_bits=1,
                enable_positive_prompt=0, apply_spatial_patchify=int(self.patchify),
            )
        bits, (prefix, *inputs), images = made.bits, made.inputs, made.images  # word_embed's first input: the source
        rows = even_rows(prefix.shape[1])
        out = {f"{key}_source_rows": rows, f"{key}_source": prefix[:, rows].contiguous()}
        out.update({f"{key}_bits_{s}": pack_bits(self.token_bits(b)) for s, b in enumerate(bits)})
        out.update(image_record(f"{key}_image", images[0]))
        if run.get("teacher_forced"):
            text = self.encode(self.off, tokenizer, encoder, [run["prompt"]])
            with torch.no_grad(), official.exact_cross_attention(self.off.basic):
                logits = teacher_forced(model, text, prefix, torch.cat(inputs, dim=1), schedule).float()
            out.update(logits_record(key, logits, [h * w for _, h, w in schedule]))
        return out


def teacher_forced(model, text, source, target, schedule):
    """The official training forward (`Infinity.forward`) step by step, as its FlexAttention path
    runs it in training: the sequence padded to a multiple of `pad_to_multiplier` (the first
    block's own path, the source pooled to each scale, fails on a sequence without padding) and
    the block-causal mask over [source; scales; padding] ('var' over the edit's blocks). Its
    non-flex path builds the mask from the target's scales alone, which does not fit the
    sequence. Condition dropout is off."""
    kv, _, cu_seqlens, max_len = text
    kv = model.text_norm(kv)
    cond = model.text_proj_for_sos((kv, cu_seqlens, max_len)).float()
    ca_kv = model.text_proj_for_ca(kv), cu_seqlens, max_len
    gss = model.shared_ada_lin(cond)
    b = source.shape[0]
    sos = cond.unsqueeze(1).expand(b, 1, -1) + model.pos_start.expand(b, 1, -1)
    x = torch.cat([model.word_embed(source), sos, model.word_embed(target)], dim=1)
    pad = -x.shape[1] % model.pad_to_multiplier
    x = model.add_lvl_embeding_for_x_BLC(F.pad(x, (0, 0, 0, pad)), schedule, pad)
    blocks = [source.shape[1]] + [h * w for _, h, w in schedule] + [pad]
    block_of = torch.repeat_interleave(torch.arange(len(blocks)), torch.tensor(blocks))
    mask = torch.where(block_of[:, None] >= block_of[None, :], 0.0, -torch.inf)[None, None]
    for i, chunk in enumerate(model.block_chunks):
        x = chunk(x=x, cond_BD=gss, ca_kv=ca_kv, attn_bias_or_two_vector=mask, scale_schedule=schedule,
                  rope2d_freqs_grid=model.rope2d_freqs_grid, start_layer=i == 0)
    return model.get_logits(x[:, source.shape[1]:x.shape[1] - pad], cond)


def layout_digests(off) -> dict:
    """sha256 of the official 2B and 8B transformers' (name, shape) lists, sorted, with their counts:
    the models built on the meta device over a small VAE of the right channels."""
    digests = {}
    for size, arch in OFFICIAL_SIZES.items():
        patchify = size == "8b"
        with official.shrunk(off.bsq_vae, "AutoEncoder", base_ch=32, num_res_blocks=0):
            vae = off.bsq_vae.vae_model(None, "dynamic", 14 if patchify else 32, 2 ** (14 if patchify else 32),
                                        patch_size=2, encoder_ch_mult=[1, 1], decoder_ch_mult=[1, 1], test_mode=True)
        with parameters_on_meta(), official.cuda_calls_stay_on_cpu(), official.modules_stay_on_cpu():
            model = off.model.Infinity(
                vae_local=vae, text_channels=2048, text_maxlen=512, shared_aln=True, fused_norm=True,
                pad_to_multiplier=128, add_lvl_embeding_only_first_block=1, use_bit_label=1, rope2d_each_sa_layer=1,
                rope2d_normalized_by_hw=2, pn="1M", apply_spatial_patchify=int(patchify), inference_mode=True,
                train_h_div_w_list=[1.0], mlp_ratio=4, block_chunks=8, **arch,
            )
        digests[size] = layout_digest({k: list(v.shape) for k, v in model.state_dict().items()})
    return digests


def layout_digest(layout: dict[str, list[int]]) -> dict:
    text = json.dumps(sorted(layout.items()))
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "tensors": len(layout),
            "elements": int(sum(np.prod(shape) for shape in layout.values()))}


def load_t5(folder: Path):
    from transformers import AutoTokenizer, T5EncoderModel

    return AutoTokenizer.from_pretrained(folder), T5EncoderModel.from_pretrained(folder).float().eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--varedit", required=True, help="local clone of HiDream-ai/VAREdit")
    parser.add_argument("--out", default="tests/data/parity_varedit", help="fixture folder")
    parser.add_argument("--t5", default="tests/data/parity/t5", help="the tiny T5 folder of the Infinity fixtures")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    off = official.load_varedit(args.varedit)
    t5, pictures = load_t5(Path(args.t5)), source_pictures(out)
    greedy = dict(cfg=3.0, tau=1.0, top_k=1, top_p=0.0, seed=0)
    cases = {
        "varedit-2b-style": EditCase(off, "varedit-2b-style", "varedit-2b-512", False, [
            dict(greedy, prompt=PROMPTS[0], source="square", resolution=512, teacher_forced=True),
            dict(greedy, prompt=PROMPTS[1], source="wide", resolution=1024),
        ], seed=31, out=out, t5=t5, pictures=pictures),
        "varedit-8b-style": EditCase(off, "varedit-8b-style", "varedit-8b-1024", True, [
            dict(greedy, prompt=PROMPTS[1], source="wide", resolution=512, teacher_forced=True),
            # the official sampler at VAREdit's defaults (cfg 3, tau 0.1, top-p 0.97)
            dict(prompt=PROMPTS[0], source="square", resolution=256, cfg=3.0, tau=0.1, top_k=900, top_p=0.97,
                 seed=11, sampler="official"),
        ], seed=32, out=out, t5=t5, pictures=pictures),
    }
    manifest = {
        "recorded": date.today().isoformat(), "torch": torch.__version__, "varedit_commit": git_commit(Path(args.varedit)),
        "command": f"python tools/parity/record_varedit.py --varedit VAREDIT_CLONE --out {args.out} --t5 {args.t5}",
        "t5": args.t5, "text_width": TEXT_CHANNELS, "official_layouts": layout_digests(off),
        "cases": {name: case.record() for name, case in cases.items()},
    }
    (out / "cases.json").write_text(json.dumps(manifest, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {len(cases)} VAREdit cases to {out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

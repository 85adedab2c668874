"""Record parity fixtures: small random-weight official models, run by the official code.

    python tools/parity/record.py --infinity ~/src/Infinity --var ~/src/VAR --out tests/data/parity

For every case it writes the weights as official-format files (bf16 .pth, as the official
checkpoints are) and the official code's outputs as safetensors beside a case JSON:
teacher-forced logits per scale, greedy CFG tokens per scale, the decoded images, and runs with
the official sampler and generation options. tests/test_parity.py loads the weights through
`sparvar.load_pipeline` and compares. Everything runs on the CPU in float32; see
tools/parity/README.md for the quirks of the official code that the harness works around.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import types
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sparvar.bench import official

TEXT_CHANNELS = 128  # the official attentive pooling needs text width >= 128 (heads of 128)
T5_CONFIG = dict(
    d_model=TEXT_CHANNELS, num_layers=1, num_heads=2, d_kv=64, d_ff=256, feed_forward_proj="gated-gelu",
    vocab_size=384, relative_attention_num_buckets=32, relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False,
)
PROMPTS = ["a red fox in the snow", "a lighthouse"]  # two lengths: packing and padding both matter
NEGATIVE = "blurry, low quality"
TOKENS_PER_SCALE = 16  # teacher-forced logits are kept for this many evenly spaced tokens per scale
VAE_RES_BLOCKS = 0  # per encoder level (the decoder has one more): the smallest official-shaped VAE
CROP, POOLED = 64, 32  # fixture images: a full-resolution crop and the pooled whole (image_record)
OFFICIAL_RATIO = {1.0: 1.0, 4 / 3: 1.333, 3 / 4: 0.75}  # h/w -> the official table's key
OFFICIAL_BUDGET = {256: "0.06M", 512: "0.25M", 1024: "1M"}  # our resolution -> the official pixel budget


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Fresh random parameters, rounded to bf16 (the format of the official files): matrices
    N(0, 1/fan_in); vectors (norm scales, biases, per-head scales) their value +- N(0, 0.1).
    Buffers (the zero k biases, masks) stay as built."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() >= 2 and p.shape[-1] > 1 and p[0].numel() > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.add_(noise * 0.1)
            p.copy_(p.bfloat16().float())


def bf16_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.bfloat16() if v.is_floating_point() else v).clone() for k, v in module.state_dict().items()}


def even_rows(n: int, count: int = TOKENS_PER_SCALE) -> torch.Tensor:
    """`count` evenly spaced token indices of a scale of n tokens (all of them if fewer)."""
    return torch.linspace(0, n - 1, min(n, count)).round().long().unique()


def logits_record(prefix: str, logits: torch.Tensor, lengths: list[int]) -> dict[str, torch.Tensor]:
    """Teacher-forced logits (B, L, ...) of scales of `lengths` tokens, kept for TOKENS_PER_SCALE
    evenly spaced tokens of each (`{prefix}_logits_{k}`), with those tokens (`{prefix}_rows_{k}`)."""
    out, start = {}, 0
    for k, n in enumerate(lengths):
        rows = even_rows(n)
        out[f"{prefix}_rows_{k}"] = rows
        out[f"{prefix}_logits_{k}"] = logits[:, start + rows].contiguous()
        start += n
    return out


def image_record(prefix: str, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Images (B, 3, H, W) in [-1, 1], small enough for the fixtures, in float16 (rounding
    error < 5e-4): a centre crop of up to CROP x CROP pixels at full resolution, and the
    whole image average-pooled to about POOLED pixels a side."""
    h, w = images.shape[-2:]
    side = min(CROP, h, w)
    top, left = (h - side) // 2, (w - side) // 2
    pool = max(1, max(h, w) // POOLED)
    return {
        f"{prefix}_crop": images[..., top:top + side, left:left + side].half().contiguous(),
        f"{prefix}_pool{pool}": F.avg_pool2d(images.float(), pool).half().contiguous(),
    }


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., n) in {0, 1} -> (..., ceil(n / 8)) uint8, as numpy's packbits (tests unpack them)."""
    return torch.from_numpy(np.packbits(bits.numpy().astype(np.uint8), axis=-1))


def input_image(out: Path, size: int = 256) -> torch.Tensor:
    """A fixed picture (colour gradients and discs) for the image-variation runs, saved beside the
    fixtures as uint8; returned (1, 3, H, W) in [-1, 1] as the official image transform makes it."""
    path = out / "input_image.safetensors"
    if not path.exists():
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:size, 0:size] / size
        image = np.stack([x, y, 1 - x * y], axis=-1) * 200
        for _ in range(6):
            cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
            image[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        save_file({"image": torch.from_numpy(image.round().astype(np.uint8))}, str(path))
    pixels = load_file(str(path))["image"].permute(2, 0, 1)[None].float().div(255)
    return pixels + pixels - 1


def git_commit(root: Path) -> str:
    return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


# ---- Infinity --------------------------------------------------------------------------------

class InfinityCase:
    """One official Infinity model (random weights) and the runs recorded with it."""

    def __init__(self, off, name: str, base: str, patchify: bool, runs: list[dict], seed: int, out: Path, t5):
        self.off, self.name, self.base, self.patchify, self.runs, self.seed = off, name, base, patchify, runs, seed
        self.dir = out / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.t5 = t5
        self.d = 14 if patchify else 32
        self.levels = 4 if patchify else 5
        self.patch = 8 if patchify else 16
        self.arch = dict(depth=2, embed_dim=32, num_heads=1, mlp_ratio=8, block_chunks=2)  # FFN 256 wide

    def build_vae(self, path: Path | None):
        """The official BSQ-VAE at a small width (base 32 channels, `levels` levels, VAE_RES_BLOCKS a level),
        loaded from `path` by the official loader, or with the official init."""
        with official.shrunk(self.off.bsq_vae, "AutoEncoder", base_ch=32, num_res_blocks=VAE_RES_BLOCKS):
            return self.off.bsq_vae.vae_model(
                None if path is None else str(path), "dynamic", self.d, 2 ** self.d,
                patch_size=self.patch, encoder_ch_mult=[1] * self.levels,
                decoder_ch_mult=[1] * self.levels, test_mode=True,
            ).float().eval()

    def save_vae(self, vae) -> None:
        """The official file layout: {'vae': state} with the plain names the official loader maps
        onto its wrapper modules (x.conv.weight <- x.weight, x.norm.weight <- x.weight)."""
        plain = {}
        for key, value in bf16_state(vae).items():
            for wrapper in (".conv.", ".norm."):
                head, sep, tail = key.rpartition(wrapper)
                if sep and tail in ("weight", "bias"):
                    key = f"{head}.{tail}"
                    break
            plain[key] = value
        torch.save({"vae": plain}, self.dir / "vae.pth")

    def load_transformer(self, vae):
        run = self.off.run
        with official.cuda_calls_stay_on_cpu(), official.modules_stay_on_cpu():
            model = run.load_infinity(
                rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, use_scale_schedule_embedding=0, pn="1M",
                use_bit_label=1, add_lvl_embeding_only_first_block=1, model_path=str(self.dir / "transformer.pth"),
                scale_schedule=None, vae=vae, device="cpu", model_kwargs=dict(self.arch, drop_path_rate=0.0),
                text_channels=TEXT_CHANNELS, apply_spatial_patchify=int(self.patchify), use_flex_attn=False,
                bf16=False, checkpoint_type="torch",
            )
        model.cond_drop_rate = 0.0  # the training forward drops prompts at random otherwise
        return model.float().eval()

    def record(self) -> dict:
        torch.manual_seed(self.seed)
        vae = self.build_vae(None)
        randomize(vae, self.seed)
        with torch.no_grad():  # keep random decoder outputs inside [-1, 1] most of the time
            out_conv = vae.decoder.conv_out.conv.weight
            out_conv.copy_((out_conv * 0.25).bfloat16())
        self.save_vae(vae)
        vae = self.build_vae(self.dir / "vae.pth")  # reloaded through the official loader

        with official.cuda_calls_stay_on_cpu(), official.modules_stay_on_cpu():
            fresh = self.off.model.Infinity(
                vae_local=vae, text_channels=TEXT_CHANNELS, text_maxlen=512, shared_aln=True, fused_norm=True,
                pad_to_multiplier=128, add_lvl_embeding_only_first_block=1, use_bit_label=1,
                rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, pn="1M",
                apply_spatial_patchify=int(self.patchify), inference_mode=True, train_h_div_w_list=[1.0],
                **self.arch,
            )
        randomize(fresh, self.seed + 1)
        torch.save(bf16_state(fresh), self.dir / "transformer.pth")
        model = self.load_transformer(vae)
        tokenizer, encoder = self.t5

        results, runs = {}, []
        for i, run in enumerate(self.runs):
            results.update(self.run(model, vae, tokenizer, encoder, f"run{i}", run))
            runs.append(run)
        save_file(results, str(self.dir / "results.safetensors"))
        return {
            "family": "infinity", "base_model": self.base, "prompts_file": None,
            "transformer": dict(depth=self.arch["depth"], width=self.arch["embed_dim"], heads=self.arch["num_heads"],
                                text_width=TEXT_CHANNELS, block_chunks=self.arch["block_chunks"],
                                mlp_ratio=self.arch["mlp_ratio"]),
            "vae": dict(base=32, ch_mult=[1] * self.levels, res_blocks=VAE_RES_BLOCKS),
            "text_encoder": "t5", "runs": runs, "tokens_per_scale": TOKENS_PER_SCALE,
        }

    def schedule(self, run: dict) -> tuple[list[tuple[int, int, int]], tuple[int, int]]:
        """The official schedule of the run's aspect (width:height) and pixel budget, and the
        grid its 2D RoPE positions are stretched onto (the last scale of the 1M schedule)."""
        width, height = map(int, run["aspect"].split(":"))
        tables = self.off.dynamic_resolution.dynamic_resolution_h_w[OFFICIAL_RATIO[height / width]]
        scales = tables[OFFICIAL_BUDGET[run["resolution"]]]["scales"]
        return [(1, h, w) for _, h, w in scales], tuple(tables["1M"]["scales"][-1][1:])

    def run(self, model, vae, tokenizer, encoder, key: str, run: dict) -> dict[str, torch.Tensor]:
        """One official generation (and, if asked, the teacher-forced logits on its inputs)."""
        schedule, run["pos_grid"] = self.schedule(run)
        run["schedule"] = [[h, w] for _, h, w in schedule]
        prompts = run["prompts"]
        text = self.encode(self.off, tokenizer, encoder, prompts)
        negative = self.encode(self.off, tokenizer, encoder, [run["negative_prompt"]] * len(prompts)) \
            if run.get("negative_prompt") else None
        k = len(schedule)
        cfg_list = run["cfg"] if isinstance(run["cfg"], list) else [run["cfg"]] * k
        tau_list = run["tau"] if isinstance(run["tau"], list) else [run["tau"]] * k

        out, forced = {}, None
        if run.get("init_scales"):  # variations of a given image: its encoded bits force the first scales
            vae_schedule = [(1, 2 * h, 2 * w) for _, h, w in schedule] if self.patchify else schedule
            image = input_image(self.dir.parent).repeat(len(prompts), 1, 1, 1)
            with torch.no_grad():
                forced = vae.encode(image, scale_schedule=vae_schedule)[3]
            out.update({f"{key}_init_bits_{s}": pack_bits(self.token_bits(b)) for s, b in enumerate(forced)})
        with what_the_loop_makes(model, vae) as made, torch.no_grad(), official.exact_cross_attention(self.off.basic):
            model.autoregressive_infer_cfg(
                vae=vae, scale_schedule=schedule, label_B_or_BLT=text, g_seed=run["seed"], B=len(prompts),
                negative_label_B_or_BLT=negative, cfg_list=cfg_list, tau_list=tau_list, top_k=run["top_k"],
                top_p=run["top_p"], returns_vemb=1, cfg_insertion_layer=[0], vae_type=self.d, ret_img=True,
                gt_leak=run.get("init_scales", 0), gt_ls_Bl=forced, inference_mode=True,
            )
        bits, inputs, images = made.bits, made.inputs, made.images
        out.update({f"{key}_bits_{s}": pack_bits(self.token_bits(b)) for s, b in enumerate(bits)})
        if run.get("images"):
            out.update(image_record(f"{key}_image", images[0]))
        if run.get("teacher_forced"):
            with torch.no_grad(), official.exact_cross_attention(self.off.basic):
                logits = model(text, torch.cat(inputs, dim=1), schedule).float()  # (B, L, 2 * bits)
            out.update(logits_record(key, logits, [h * w for _, h, w in schedule]))
        return out

    def token_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """Official sampled bits (B, 1, H, W, d) on the VAE grid -> (B, h*w, bits) transformer tokens."""
        x = bits.squeeze(1).permute(0, 3, 1, 2)
        if self.patchify:
            x = F.pixel_unshuffle(x.float(), 2).long()
        return x.flatten(2).transpose(1, 2).contiguous()

    @staticmethod
    def encode(off, tokenizer, encoder, prompts: list[str]):
        """The official prompt encoding (padded to 512 and packed), one prompt at a time as the
        official script calls it, packed into one batch."""
        parts = []
        with official.cuda_calls_stay_on_cpu(), torch.no_grad():
            for prompt in prompts:
                parts.append(off.run.encode_prompt(tokenizer, encoder, prompt))
        kv = torch.cat([p[0] for p in parts])
        lens = [n for p in parts for n in p[1]]
        cu = F.pad(torch.tensor(lens, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
        return kv, lens, cu, max(lens)


@contextlib.contextmanager
def what_the_loop_makes(model, vae):
    """What the official loop makes, in lists that fill as it runs: each scale's bits (it returns
    none of them for bitwise models: they are read where it turns them into codes), the inputs of
    `word_embed` (the next-scale inputs; VAREdit's source first) and the decoded images."""
    made = types.SimpleNamespace(bits=[], inputs=[], images=[])
    hook = model.word_embed.register_forward_pre_hook(lambda mod, args: made.inputs.append(args[0].clone()))
    lfq, to_codes, decode = vae.quantizer.lfq, vae.quantizer.lfq.indices_to_codes, vae.decode

    def keep_bits(indices, *args, **kwargs):
        made.bits.append(indices.clone())
        return to_codes(indices, *args, **kwargs)

    def keep_decoded(z):
        made.images.append(decode(z))
        return made.images[-1]

    lfq.indices_to_codes, vae.decode = keep_bits, keep_decoded
    try:
        yield made
    finally:
        hook.remove()
        del lfq.indices_to_codes, vae.decode  # back to the class's methods


def save_text_model(model: torch.nn.Module, folder: Path, seed: int):
    """A transformers text model randomised (`randomize`) and saved in bf16 with transformers'
    byte-level tokenizer as a local folder, as a user's would be; returns the folder's tokenizer."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    randomize(model, seed)
    model.to(torch.bfloat16).save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def tiny_t5(out: Path, seed: int):
    """A random T5 encoder with a byte-level tokenizer, saved as a transformers folder."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = save_text_model(T5EncoderModel(T5Config(**T5_CONFIG)).eval(), out / "t5", seed)
    return tokenizer, T5EncoderModel.from_pretrained(out / "t5").float().eval()


def record_text_features(off, out: Path, t5) -> None:
    """The official prompt encoding of PROMPTS (padded to 512 tokens, then packed): the features
    sparvar's encoder, which pads to the longest prompt, must reproduce."""
    kv, lens, _, _ = InfinityCase.encode(off, *t5, PROMPTS)
    save_file({"features": kv.contiguous(), "lengths": torch.tensor(lens)}, str(out / "t5" / "official_features.safetensors"))


def infinity_cases(off, out: Path) -> dict[str, dict]:
    t5 = tiny_t5(out, seed=100)
    record_text_features(off, out, t5)
    greedy = dict(prompts=PROMPTS, cfg=3.0, tau=0.5, top_k=1, top_p=0.0, seed=0)
    cases = {
        # the full 13-scale 1:1 schedule to 64x64 tokens, greedy and with the official sampler
        "infinity-2b-style": InfinityCase(off, "infinity-2b-style", "infinity-2b", False, [
            dict(greedy, aspect="1:1", resolution=1024, teacher_forced=True, images=True),
            dict(greedy, aspect="3:4", resolution=256, teacher_forced=True, images=True),
            dict(prompts=PROMPTS, cfg=3.0, tau=0.5, top_k=900, top_p=0.97, seed=7, aspect="1:1", resolution=256,
                 sampler="official"),
            dict(greedy, aspect="1:1", resolution=256, init_scales=3),
        ], seed=1, out=out, t5=t5),
        "infinity-8b-style": InfinityCase(off, "infinity-8b-style", "infinity-8b", True, [
            dict(greedy, aspect="1:1", resolution=512, teacher_forced=True, images=True),
            dict(greedy, aspect="3:4", resolution=512, teacher_forced=True, images=True),
            dict(greedy, aspect="3:4", resolution=256, negative_prompt=NEGATIVE,
                 cfg=[1.0, 2.0, 3.0, 3.0, 4.0, 4.0, 5.0], tau=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5]),
            dict(prompts=PROMPTS, cfg=4.0, tau=1.0, top_k=900, top_p=0.97, seed=12, aspect="1:1", resolution=256,
                 sampler="official", negative_prompt=NEGATIVE),
            dict(greedy, aspect="1:1", resolution=256, init_scales=2),
        ], seed=2, out=out, t5=t5),
    }
    return {name: case.record() for name, case in cases.items()}


# ---- VAR -------------------------------------------------------------------------------------

VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAR_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
VQVAE_ARCH = dict(vocab=64, channels=16, base=32)  # the VQVAE both VAR cases share, as d16..d36 do


class VARCase:
    """One official VAR model (random weights) over a shared random VQVAE, and its runs."""

    def __init__(self, off, name: str, base: str, patch_nums, shared_aln: bool, runs: list[dict], seed: int,
                 out: Path):
        self.off, self.name, self.base, self.patch_nums = off, name, base, patch_nums
        self.shared_aln, self.runs, self.seed, self.out = shared_aln, runs, seed, out
        self.dir = out / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.arch = dict(depth=2, embed_dim=32, num_heads=1, num_classes=10)

    def build_vqvae(self):
        """The official VQVAE at a small width: every level at `base` channels, no res blocks but
        the decoder's one (its attention blocks stay)."""
        vqvae = self.off.vqvae
        small = dict(ch_mult=(1, 1, 1, 1, 1), num_res_blocks=VAE_RES_BLOCKS)
        with official.shrunk(vqvae, "Encoder", **small), official.shrunk(vqvae, "Decoder", **small):
            return vqvae.VQVAE(vocab_size=VQVAE_ARCH["vocab"], z_channels=VQVAE_ARCH["channels"],
                               ch=VQVAE_ARCH["base"], test_mode=True, share_quant_resi=4,
                               v_patch_nums=self.patch_nums).float().eval()

    def record(self, vqvae_file: Path) -> dict:
        torch.manual_seed(self.seed)
        vae = self.build_vqvae()
        if not vqvae_file.exists():
            randomize(vae, self.seed)
            torch.save(bf16_state(vae), vqvae_file)
        vae.load_state_dict(torch.load(vqvae_file), strict=True)
        vae.float()
        model = self.off.models.VAR(
            vae_local=vae, **self.arch, norm_eps=1e-6, shared_aln=self.shared_aln, cond_drop_rate=0.0,
            attn_l2_norm=True, patch_nums=self.patch_nums, flash_if_available=False, fused_if_available=False,
        )
        randomize(model, self.seed + 1)
        state = bf16_state(model)
        model.load_state_dict(state, strict=True)
        # the block-causal mask buffer (L x L, 10 MB at the 512 schedule) is left out of the file:
        # it follows from the schedule, and sparvar rebuilds it when a file lacks it
        del state["attn_bias_for_masking"]
        torch.save(state, self.dir / "transformer.pth")
        model = model.float().eval()

        results = {}
        for i, run in enumerate(self.runs):
            results.update(self.run(model, vae, f"run{i}", run))
        save_file(results, str(self.dir / "results.safetensors"))
        return {
            "family": "var", "base_model": self.base, "vae_file": str(vqvae_file.relative_to(self.out)),
            "transformer": dict(depth=self.arch["depth"], width=self.arch["embed_dim"], heads=self.arch["num_heads"],
                                num_classes=self.arch["num_classes"], vocab=VQVAE_ARCH["vocab"],
                                vae_channels=VQVAE_ARCH["channels"]),
            "vae": dict(VQVAE_ARCH, ch_mult=[1] * 5, res_blocks=VAE_RES_BLOCKS),
            "runs": self.runs, "tokens_per_scale": TOKENS_PER_SCALE,
        }

    def run(self, model, vae, key: str, run: dict) -> dict[str, torch.Tensor]:
        """One official generation: tokens and labels it drew, its image, and (if asked) the
        teacher-forced logits on its tokens."""
        run["schedule"] = [[pn, pn] for pn in self.patch_nums]
        tokens, labels = [], []
        embedding = vae.quantize.embedding
        hooks = [
            embedding.register_forward_hook(lambda mod, args, out: tokens.append(args[0].clone())),
            model.class_emb.register_forward_hook(lambda mod, args, out: labels.append(args[0][: len(args[0]) // 2])),
        ]
        label = None if run["labels"] is None else torch.tensor(run["labels"])
        try:
            with torch.no_grad():
                image = model.autoregressive_infer_cfg(
                    B=run["batch"], label_B=label, g_seed=run["seed"], cfg=run["cfg"], top_k=run["top_k"],
                    top_p=run["top_p"], more_smooth=run.get("more_smooth", False),
                )
        finally:
            for hook in hooks:
                hook.remove()
        out = {f"{key}_labels": labels[0].clone()}
        out.update({f"{key}_tokens_{s}": t for s, t in enumerate(tokens)})  # none with more_smooth
        if run.get("images"):
            out.update(image_record(f"{key}_image", image * 2 - 1))
        if run.get("teacher_forced"):
            with torch.no_grad():
                logits = model(labels[0], vae.quantize.idxBl_to_var_input(tokens)).float()
            out.update(logits_record(key, logits, [pn * pn for pn in self.patch_nums]))
        return out


def var_cases(off, out: Path) -> dict[str, dict]:
    vqvae_file = out / "var-vqvae.pth"
    if vqvae_file.exists():
        vqvae_file.unlink()  # a fresh one with this recording's seed
    greedy = dict(labels=[3, 7], batch=2, cfg=4.0, top_k=1, top_p=0.0, seed=0)
    cases = {
        "var-d16-style": VARCase(off, "var-d16-style", "var-d16", VAR_256, False, [
            dict(greedy, teacher_forced=True, images=True),
            dict(greedy, labels=[1, 2], cfg=1.5, top_k=32, top_p=0.95, seed=5, sampler="official"),
            dict(greedy, labels=None, batch=3, cfg=2.0, top_k=32, top_p=0.95, seed=9, sampler="official"),
            dict(greedy, cfg=3.0, top_k=32, top_p=0.9, seed=3, sampler="official", more_smooth=True, images=True),
        ], seed=3, out=out),
        "var-d36-style": VARCase(off, "var-d36-style", "var-d36", VAR_512, True, [
            dict(greedy, teacher_forced=True, images=True),
        ], seed=4, out=out),
    }
    return {name: case.record(vqvae_file) for name, case in cases.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--infinity", required=True, help="local clone of FoundationVision/Infinity")
    parser.add_argument("--var", required=True, help="local clone of FoundationVision/VAR")
    parser.add_argument("--out", default="tests/data/parity", help="fixture folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    cases = infinity_cases(official.load_infinity(args.infinity), out)
    cases.update(var_cases(official.load_var(args.var), out))
    manifest = {
        "recorded": date.today().isoformat(), "torch": torch.__version__,
        "infinity_commit": git_commit(Path(args.infinity)), "var_commit": git_commit(Path(args.var)),
        "command": "python tools/parity/record.py --infinity INFINITY_CLONE --var VAR_CLONE --out " + args.out,
        "cases": cases,
    }
    (out / "cases.json").write_text(json.dumps(manifest, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {len(cases)} cases to {out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

"""Record HART parity fixtures: small random-weight official HART models, run by the official code.

    python tools/parity/record_hart.py --hart ~/src/hart --out tests/data/parity_hart

Writes the official folder layout (llm/ with config.json, model.safetensors and the ema_model.bin
the official sampler loads over it; tokenizer/; a tiny Qwen2 text model with a byte-level
tokenizer that both sides use), then the official code's outputs per run: the text features of
`encode_prompts`, greedy tokens per scale, teacher-forced logits, the diffusion head's input,
noise and output, and the decoded images. `--layouts FILE` also writes the state-dict layout of
the official hart-0.7b (the believed config, `HARTConfig()`) and of its tokenizer. Everything runs
on the CPU in float32; tools/parity/README.md says what the harness stands in for.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import types
from datetime import date
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import bf16_state, git_commit, image_record, logits_record, randomize, save_text_model  # noqa: E402

from sparvar.bench import official  # noqa: E402
from sparvar.models.hart.diffusion import diffusion_noise  # noqa: E402
from sparvar.models.hart.transformer import HARTConfig  # noqa: E402

SCHEDULE = [1, 2, 3, 4, 6, 8]
CONTEXT_TOKENS = 24  # the prompts below are shorter: padding is part of every run
TEXT = dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=True)
TOKENIZER = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=[1, 1, 1], share_quant_resi=4, quant_resi=0.5,
                 quantizer_type="var_hybrid", v_patch_nums=SCHEDULE)
VAE_RES_BLOCKS = 0  # the official ddconfig hard-codes 2; the harness builds the smallest
ARCH = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=4.0, context_token=CONTEXT_TOKENS,
            context_dim=TEXT["hidden_size"], patch_nums=SCHEDULE, attn_type="llama", mlp_type="llama",
            diff_width=32, diff_depth=2, num_sampling_steps="4", drop_path_rate=0.0, cond_drop_rate=0.0)
PROMPTS = ["a red fox in the snow", "a lighthouse"]


@contextlib.contextmanager
def loads_in_float32(*classes):
    """`cls.from_pretrained` in float32 (transformers would keep the files' bf16) and on the CPU: the
    official HART model loads its tokenizer inside its constructor, which transformers >= 5 runs
    on the meta device."""
    saved = {cls: cls.__dict__.get("from_pretrained") for cls in classes}

    def wrap(real):
        def load(klass, *args, **kwargs):
            with torch.device("cpu"):
                return real(klass, *args, **{**kwargs, "dtype": torch.float32})

        return classmethod(load)

    for cls in classes:
        cls.from_pretrained = wrap(cls.from_pretrained.__func__)
    try:
        yield
    finally:
        for cls, old in saved.items():
            if old is None:
                del cls.from_pretrained
            else:
                cls.from_pretrained = old


@contextlib.contextmanager
def parameters_on_meta():
    """Parameters go to the meta device as modules register them (layouts of full-size models
    without their memory or init time); everything else stays where it is."""
    real = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        real(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = real


def text_model(out: Path, seed: int):
    """A random Qwen2 model with transformers' byte-level tokenizer, saved as a local folder."""
    from transformers import AutoModel, Qwen2Config, Qwen2Model

    torch.manual_seed(seed)
    tokenizer = save_text_model(Qwen2Model(Qwen2Config(**TEXT)).eval(), out / "text", seed)
    return tokenizer, AutoModel.from_pretrained(out / "text", dtype=torch.float32).eval()


@contextlib.contextmanager
def small_autoencoders(off):
    """The official autoencoder built (and loaded) with VAE_RES_BLOCKS blocks a level."""
    small = dict(num_res_blocks=VAE_RES_BLOCKS)
    with official.shrunk(off.hart_autoencoder, "Encoder", **small), \
            official.shrunk(off.hart_autoencoder, "Decoder", **small):
        yield


def tokenizer_folder(off, folder: Path, config: dict, seed: int | None) -> None:
    """The official autoencoder at a small width; its file holds vae.* only (the discriminator is
    training's, and the official loader builds it when it is missing)."""
    with small_autoencoders(off):
        model = off.autoencoder.HARTAutoEncoderWithDisc(off.autoencoder.HARTAutoEncoderWithDiscConfig(**config))
    if seed is not None:
        randomize(model.vae, seed)
        with torch.no_grad():  # keep random decoder outputs inside [-1, 1] most of the time
            model.vae.decoder.conv_out.weight.mul_(0.25)
    model.save_pretrained(folder)
    state = {f"vae.{k}": v for k, v in bf16_state(model.vae).items()}
    for old in folder.glob("*.safetensors"):
        old.unlink()
    save_file(state, str(folder / "model.safetensors"))


def build_official(off, arch: dict, tokenizer: Path):
    config = off.transformer.HARTForT2IConfig(vae_path=str(tokenizer), **arch)
    with official.cuda_calls_stay_on_cpu(), official.modules_stay_on_cpu(), small_autoencoders(off), \
            loads_in_float32(off.autoencoder.HARTAutoEncoderWithDisc):
        return off.transformer.HARTForT2I(config)


def load_official(off, folder: Path):
    """What sample.py's `AutoModel.from_pretrained(llm folder)` does: the model of the folder's
    config (its tokenizer found beside the folder), the folder's weights loaded strictly. The
    harness builds it itself: transformers >= 5 runs constructors on the meta device there, where
    the official one's `.item()` calls and its own from_pretrained of the tokenizer fail."""
    from safetensors.torch import load_file

    config = off.transformer.HARTForT2IConfig.from_pretrained(folder)
    config._name_or_path = str(folder)
    with official.cuda_calls_stay_on_cpu(), official.modules_stay_on_cpu(), small_autoencoders(off), \
            loads_in_float32(off.autoencoder.HARTAutoEncoderWithDisc):
        model = off.transformer.HARTForT2I(config)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model


class Case:
    def __init__(self, off, name: str, folder: str, arch: dict, runs: list[dict], seed: int, out: Path):
        self.off, self.name, self.arch, self.runs, self.seed, self.out = off, name, arch, runs, seed, out
        self.dir = out / folder  # beside tokenizer/, where the official loader looks for it

    def record(self, text) -> dict:
        torch.manual_seed(self.seed)
        fresh = build_official(self.off, self.arch, self.out / "tokenizer")
        fresh.config.vae_path = None  # found beside llm/ by the official loader, as in the public folders
        fresh.to(torch.bfloat16).save_pretrained(self.dir)  # the folder's own weights: the official init
        ema = build_official(self.off, self.arch, self.out / "tokenizer")
        randomize(ema, self.seed + 1)
        torch.save(bf16_state(ema), self.dir / "ema_model.bin")
        model = load_official(self.off, self.dir)
        model.load_state_dict(torch.load(self.dir / "ema_model.bin"))  # use_ema, as sample.py does
        model = model.float().eval()
        results = {}
        for i, run in enumerate(self.runs):
            results.update(self.run(model, text, f"run{i}", run))
        save_file(results, str(self.out / f"{self.name}.safetensors"))
        return {"folder": self.dir.name, "config": self.arch, "runs": self.runs}

    def run(self, model, text, key: str, run: dict) -> dict[str, torch.Tensor]:
        tokenizer, encoder = text
        utils = self.off.utils
        with torch.no_grad(), official.cuda_calls_stay_on_cpu():
            _, mask, positions, context = utils.encode_prompts(
                run["prompts"], encoder, tokenizer, CONTEXT_TOKENS, utils.llm_system_prompt, run["system_prompt"])
        out = {f"{key}_context": context.contiguous(), f"{key}_mask": mask}

        tokens, inputs, diffusion = [], [], {}
        module = self.off.transformer

        def greedy(logits, **_):  # the official top-k/top-p sampler, replaced by argmax
            tokens.append(logits.argmax(-1))
            return tokens[-1][..., None]

        steps, rows = int(self.arch["num_sampling_steps"]), len(run["prompts"]) * SCHEDULE[-1] ** 2
        gens = [torch.Generator().manual_seed(run["seed"] + i) for i in range(len(run["prompts"]))]
        noise = diffusion_noise(gens, steps, SCHEDULE[-1] ** 2, TOKENIZER["z_channels"], "cpu")
        draws = iter(noise)

        def padded(own, count):  # sparvar's noise for the cond rows; the others' are discarded
            return torch.cat([own, torch.zeros(count - len(own), own.shape[1])]) if count > len(own) else own

        def first_noise(*shape, **_):  # DiffLoss.sample's start
            diffusion["noise"] = noise.contiguous()
            return padded(next(draws), shape[0])

        def step_noise(x):  # p_sample's draw at every step
            return padded(next(draws), len(x))

        sample = model.diffloss.sample

        def keep_diffusion(z, temperature=1.0, cfg=1.5, sampler=None):
            result = sample(z=z, temperature=temperature, cfg=cfg, sampler=sampler)
            diffusion.update(cond=z.clone(), weight=torch.tensor(cfg), out=result[: rows].clone())
            return result

        hook = model.word_embed.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].clone()))
        real_sampler, model.diffloss.sample = module.sample_with_top_k_top_p_, keep_diffusion
        module.sample_with_top_k_top_p_ = greedy
        torch_in_diffloss, th_in_diffusion = self.off.diffloss.torch, self.off.gaussian_diffusion.th
        self.off.diffloss.torch = _With(torch, randn=first_noise)
        self.off.gaussian_diffusion.th = _With(torch, randn_like=step_noise)
        try:
            with torch.no_grad(), official.cuda_calls_stay_on_cpu():
                image = model.autoregressive_infer_cfg(
                    B=len(run["prompts"]), label_B=context, cfg=run["cfg"], g_seed=run["seed"], more_smooth=False,
                    context_position_ids=positions, context_mask=mask)
        finally:
            hook.remove()
            module.sample_with_top_k_top_p_ = real_sampler
            del model.diffloss.sample
            self.off.diffloss.torch, self.off.gaussian_diffusion.th = torch_in_diffloss, th_in_diffusion
        out.update({f"{key}_tokens_{s}": t.contiguous() for s, t in enumerate(tokens)})
        out.update({f"{key}_diffusion_{k}": v.contiguous() for k, v in diffusion.items()})
        out.update(image_record(f"{key}_image", image * 2 - 1))
        if run.get("teacher_forced"):
            forced = torch.cat(inputs[: len(SCHEDULE) - 1], dim=1)  # the last call embeds the diffusion's codes
            with torch.no_grad():
                logits = teacher_forced(model, context, forced, positions, mask)
            out.update(logits_record(key, logits, [pn * pn for pn in SCHEDULE]))
        return out


class _With(types.ModuleType):
    """A module (torch) with some functions replaced."""

    def __init__(self, module, **replaced):
        super().__init__(module.__name__)
        self._module = module
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self._module, name)


def teacher_forced(model, context, inputs, positions, mask):
    """The official training forward without its MaskGIT masking of the last scale (and with
    condition dropout off): block-causal attention over text and all scales, logits of every
    image token from the last text position on, as it returns them."""
    cond = model.context_embed(model.context_norm(context))
    x = torch.cat([cond, model.word_embed(inputs)], dim=1)
    x = x + model.lvl_embed(model.lvl_1L.expand(len(x), -1))
    for block in model.blocks:
        x = block(x=x, cond_BD=cond, attn_bias=model.attn_bias_for_masking, context_position_ids=positions,
                  context_mask=mask)
    return model.get_logits(x, cond)[:, model.context_token - 1:].float()


def layouts(off, path: Path) -> None:
    """The official state-dict layouts of hart-0.7b (the believed config) and of its tokenizer."""
    import tempfile

    believed = HARTConfig()
    arch = dict(depth=believed.depth, embed_dim=believed.width, num_heads=believed.heads, mlp_ratio=believed.mlp_ratio,
                context_token=believed.context_tokens, context_dim=believed.context_width,
                patch_nums=list(believed.patch_nums), attn_type="llama", mlp_type="llama",
                attn_l2_norm=believed.cosine_attention, use_context_norm=believed.context_norm,
                sep_aln_pooling_mode=believed.pooling, diff_width=believed.diffusion_width,
                diff_depth=believed.diffusion_depth, num_sampling_steps=str(believed.diffusion_steps))
    with tempfile.TemporaryDirectory() as tmp:
        small = dict(TOKENIZER, vocab_size=believed.vocab, z_channels=believed.vae_channels, ch_mult=[1, 1],
                     v_patch_nums=list(believed.patch_nums))
        tokenizer_folder(off, Path(tmp), small, seed=None)
        with parameters_on_meta():
            model = build_official(off, arch, Path(tmp))
            vae = off.autoencoder.HARTAutoEncoderWithDisc(off.autoencoder.HARTAutoEncoderWithDiscConfig(
                quantizer_type="var_hybrid", v_patch_nums=list(believed.patch_nums)))
    found = {
        "hart-0.7b": {"config": arch, "layout": {k: list(v.shape) for k, v in model.state_dict().items()}},
        "hart-tokenizer": {"config": {"quantizer_type": "var_hybrid", "v_patch_nums": list(believed.patch_nums)},
                           "layout": {k: list(v.shape) for k, v in vae.state_dict().items()}},
    }
    path.write_text(json.dumps(found) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hart", required=True, help="local clone of mit-han-lab/hart")
    parser.add_argument("--out", default="tests/data/parity_hart", help="fixture folder")
    parser.add_argument("--layouts", help="also write the official hart-0.7b layouts to this JSON file")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    off = official.load_hart(args.hart)
    if args.layouts:
        layouts(off, Path(args.layouts))
    text = text_model(out, seed=200)
    tokenizer_folder(off, out / "tokenizer", TOKENIZER, seed=201)
    greedy = dict(prompts=PROMPTS, cfg=4.5, seed=0, system_prompt=True, teacher_forced=True)
    cases = {
        # the believed hart-0.7b switches: max-pooled adaLN, softmax scale 0.25 / sqrt(d), context norm
        "hart-0.7b-style": Case(off, "hart-0.7b-style", "llm", dict(ARCH, use_context_norm=True), [
            greedy,
            # no system prompt; guidance 1.25 makes the last scale's weight 1.0, where the official
            # diffusion sampler runs unguided
            dict(greedy, cfg=1.25, seed=3, system_prompt=False, teacher_forced=False),
        ], seed=202, out=out),
        # the other switches config.json can set: mean-pooled adaLN, cosine attention, no context norm
        "hart-variant": Case(off, "hart-variant", "llm-variant", dict(
            ARCH, sep_aln_pooling_mode="avg", attn_l2_norm=True, use_context_norm=False), [greedy],
            seed=204, out=out),
    }
    manifest = {
        "recorded": date.today().isoformat(), "torch": torch.__version__, "hart_commit": git_commit(Path(args.hart)),
        "command": "python tools/parity/record_hart.py --hart HART_CLONE --out " + args.out,
        "schedule": SCHEDULE, "context_tokens": CONTEXT_TOKENS, "text": TEXT, "tokenizer": TOKENIZER,
        "vae_res_blocks": VAE_RES_BLOCKS, "cases": {name: case.record(text) for name, case in cases.items()},
    }
    (out / "cases.json").write_text(json.dumps(manifest, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {len(cases)} HART cases to {out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

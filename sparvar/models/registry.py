"""Named model configurations and the files each needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from sparvar.errors import SparvarError
from sparvar.models.base import Family, TransformerConfig
from sparvar.models.hart import files as hart_files
from sparvar.models.hart.text import QWEN2_1_5B, HARTTextEncoder
from sparvar.models.hart.tokenizer import HARTTokenizer, HybridCodes
from sparvar.models.hart.transformer import HARTConfig, HARTTransformer
from sparvar.models.infinity.bitwise import BitwiseCodes
from sparvar.models.infinity.text import T5_XL, TextEncoder
from sparvar.models.infinity.transformer import InfinityConfig, InfinityTransformer
from sparvar.models.infinity.vae import InfinityVAE, VAEConfig
from sparvar.models.var.transformer import VARConfig, VARTransformer
from sparvar.models.varedit.source import EditImages
from sparvar.models.varedit.transformer import VAREditConfig, VAREditTransformer
from sparvar.models.var.vqvae import VQVAE, VQVAEConfig
from sparvar.schedules import VAR_256, VAR_512, Schedule, infinity_schedule

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# the demo's text encoder: a small T5 over UTF-8 bytes (ByteTokenizer), trained with the transformer
DEMO_TEXT = dict(T5_XL, d_model=256, num_layers=3, num_heads=4, d_kv=64, d_ff=512, vocab_size=259)


def _own_schedule(spec: "ModelSpec", aspect: str, resolution: int | None) -> Schedule:
    """VAR and HART models generate square images at their own resolution only (VAR's pos_1LC and
    HART's level embeddings fix the scales)."""
    if aspect != "1:1" or resolution not in (None, spec.resolution):
        asked = f"{aspect} at {resolution}" if resolution else aspect
        raise SparvarError(
            f"{spec.name} generates only 1:1 images at {spec.resolution}x{spec.resolution}, not {asked}"
        )
    return spec.transformer.schedule


def _bitwise_codes(spec: "ModelSpec", decoder) -> BitwiseCodes:
    cfg = spec.transformer
    return BitwiseCodes(cfg.vae_channels, cfg.patchify)


INFINITY_FP8 = ("sa.mat_qkv", "sa.proj", "ca.mat_q", "ca.mat_kv", "ca.proj", "ffn.fc1", "ffn.fc2")
# Infinity: 2B and 8B; the demo model is an Infinity model trained on one schedule and its first scales
INFINITY = Family(
    "Infinity",
    InfinityTransformer,
    InfinityVAE,
    _bitwise_codes,
    lambda spec, aspect, resolution: infinity_schedule(aspect, resolution or spec.resolution),
    TextEncoder,
    negative_prompts=True, tiled_decode=True, official_code="FoundationVision/Infinity",
    fp8_layers=INFINITY_FP8,
)
# the VQVAE's residual quantiser turns token indices into the latent and the next input
VAR = Family(
    "VAR", VARTransformer, VQVAE, lambda spec, decoder: decoder.quantize, _own_schedule,
    fixed_schedule=True, official_temperature=False, more_smooth=True,
    fp8_layers=("attn.mat_qkv", "attn.proj", "ffn.fc1", "ffn.fc2"),
    kept_layers=("ada_lin.1",),  # the adaLN of models without a shared one: once per generation (prepare)
)
HART = Family(
    "HART", HARTTransformer, HARTTokenizer, lambda spec, decoder: HybridCodes(decoder.vae.quantize), _own_schedule,
    HARTTextEncoder, hart_files.configure,
    fixed_schedule=True, token_pruning=False, official_sampler=False, init_images=False, system_prompt=True,
    fp8_layers=("attn.qkv_proj", "attn.proj", "ffn.gate_proj", "ffn.up_proj", "ffn.down_proj"),
    kept_layers=("ada_lin.1",),  # the blocks' adaLN: once per generation (prepare)
)
# VAREdit: Infinity fine-tuned to edit a source image (its VAE, codes and text encoder are Infinity's)
VAREDIT = Family(
    "VAREdit", VAREditTransformer, InfinityVAE, _bitwise_codes, _own_schedule, TextEncoder,
    fixed_schedule=True, token_pruning=False, init_images=False, tiled_decode=True, source_image=EditImages,
    official_code="HiDream-ai/VAREdit", fp8_layers=INFINITY_FP8,
)
# Infinity-2B and -8B (and VAREdit, their fine-tuning): transformer sizes, VAEs and the VAE files
ARCH = {"2b": dict(depth=32, width=2048, heads=16, vae_channels=32),
        "8b": dict(depth=40, width=3584, heads=28, vae_channels=14, patchify=True)}
VAES = {"2b": VAEConfig(channels=32, ch_mult=(1, 2, 4, 4, 4)), "8b": VAEConfig(channels=14, ch_mult=(1, 2, 4, 4))}
VAE_FILES = {"2b": "infinity_vae_d32reg.pth", "8b": "infinity_vae_d56_f8_14_patchify.pth"}
FAMILIES = {family.name: family for family in (INFINITY, VAR, HART, VAREDIT)}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    about: str
    transformer: TransformerConfig
    vae: VAEConfig | VQVAEConfig
    text: dict | None  # architecture of the text encoder (T5, Qwen2); None for class-conditional models
    files: dict[str, str] = field(default_factory=dict)  # CLI option -> the official file it takes
    resolution: int = 1024  # default pixel budget (Infinity) or the one resolution (VAR)
    family: Family = INFINITY
    bundled: dict[str, str] = field(default_factory=dict)  # CLI option -> weights file in sparvar/assets
    # the schedules an Infinity model trained on one (or a few) generates, none else (the demo);
    # empty: any within the two limits below. VAR models generate their own only (`only_schedules`).
    schedules: tuple[Schedule, ...] = ()
    max_scales: int = 15  # Infinity: the rows of its level embedding
    max_side: int = 128  # Infinity: the side of its RoPE position grid in tokens (official: 2048 / 16)
    example: str | None = None  # prompt drawn when none is given (text models)

    def bundled_path(self, option: str) -> Path | None:
        """The weights file shipped in the package for `option` (--weights, --vae), if any."""
        return ASSETS / self.bundled[option] if option in self.bundled else None

    @property
    def only_schedules(self) -> tuple[Schedule, ...]:
        """The schedules the model can generate when they are a fixed few; empty: any within its limits."""
        if self.family.fixed_schedule:  # VAR: pos_1LC has a row per token; HART: its level embeddings
            return (self.transformer.schedule,)
        return self.schedules

    @property
    def text_conditioned(self) -> bool:
        return self.text is not None

    @property
    def default_condition(self) -> str | int | None:
        """What `sparvar generate` draws when given nothing: the example prompt, or class 0."""
        return self.example if self.text_conditioned else 0

    @property
    def num_classes(self) -> int:
        return self.transformer.num_classes

    def schedule(self, aspect: str = "1:1", resolution: int | None = None) -> Schedule:
        """The scale schedule of an aspect ratio (width:height) and pixel budget."""
        return self.family.schedule(self, aspect, resolution)

    @property
    def vae_encodes(self) -> bool:
        """Whether its VAE has an encoder, which variations of a picture need (VQVAEs always do; the
        demo's BSQ-VAE has no trained one)."""
        return getattr(self.vae, "encoder", True)

    def image_size(self, schedule: Schedule) -> tuple[int, int]:
        """(height, width) in pixels of the images a schedule makes, known before loading."""
        side = self.transformer.latent_per_token * self.vae.patch
        return schedule.sizes[-1][0] * side, schedule.sizes[-1][1] * side


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "infinity-2b",
            "Infinity-2B text-to-image, 1024x1024, d32 BSQ-VAE at patch 16",
            InfinityConfig(**ARCH["2b"], cfg=3.0, tau=0.5),
            VAES["2b"],
            T5_XL,
            files={
                "--weights": "infinity_2b_reg.pth",
                "--vae": VAE_FILES["2b"],
                "--text-encoder": "folder of google/flan-t5-xl (config.json, weights, tokenizer)",
            },
        ),
        ModelSpec(
            "infinity-8b",
            "Infinity-8B text-to-image, 1024x1024, 14-channel BSQ-VAE at patch 8, 2x2 patchified tokens",
            InfinityConfig(**ARCH["8b"], cfg=3.0, tau=1.0),
            VAES["8b"],
            T5_XL,
            files={
                "--weights": "infinity_8b_weights/ (folder of shards with an index json)",
                "--vae": VAE_FILES["8b"],
                "--text-encoder": "folder of google/flan-t5-xl (config.json, weights, tokenizer)",
            },
        ),
        ModelSpec(
            "infinity-demo",
            "small text-to-image Infinity over the full 13-scale 1:1 schedule (64x64 tokens, 256x256 px) and its "
            "first 10 scales (32x32 tokens, 128x128 px: --resolution 512), trained on Noto's colour emoji and their "
            "Unicode names (sparvar train-demo, docs/demo_model.md); weights ship with the package",
            InfinityConfig(depth=12, width=256, heads=4, vae_channels=16, text_width=256, text_max_len=128,
                           block_chunks=1, cfg=3.0, tau=1.0),
            # its VAE file's encoder (this class's) was never trained: the tokenizer's is sparvar/demo's
            VAEConfig(channels=16, ch_mult=(1, 2, 2), base=32, encoder=False),
            DEMO_TEXT,
            # trained as Infinity was: first on the 10-scale prefix (128x128 px), then on all 13
            schedules=(infinity_schedule("1:1", 1024), infinity_schedule("1:1", 512)),
            bundled={"--weights": "infinity_demo.safetensors", "--vae": "infinity_demo_vae.safetensors",
                     "--text-encoder": "infinity_demo_text.safetensors"},
            example="grinning face",
        ),
        ModelSpec(
            "infinity-tiny",
            "tiny text-conditioned Infinity for tests (random weights, byte tokenizer)",
            InfinityConfig(depth=4, width=64, heads=2, vae_channels=4, text_width=32, text_max_len=16, block_chunks=2),
            VAEConfig(channels=4, ch_mult=(1, 2), base=32),
            dict(T5_XL, d_model=32, num_layers=2, num_heads=2, d_kv=16, d_ff=64, vocab_size=300),
        ),
        *[
            ModelSpec(
                f"var-d{depth}",
                f"VAR-d{depth} class-conditional ImageNet, 256x256, scales {VAR_256.describe()} "
                f"({VAR_256.total} tokens)",
                VARConfig(depth=depth, width=64 * depth, heads=depth),
                VQVAEConfig(),
                None,
                files={"--weights": f"var_d{depth}.pth", "--vae": "vae_ch160v4096z32.pth"},
                resolution=256,
                family=VAR,
            )
            for depth in (16, 20, 24, 30)
        ],
        ModelSpec(
            "var-d36",
            f"VAR-d36 class-conditional ImageNet, 512x512, scales {VAR_512.describe()} ({VAR_512.total} tokens), "
            "shared AdaLN",
            VARConfig(depth=36, width=64 * 36, heads=36, schedule=VAR_512, shared_aln=True),
            VQVAEConfig(),
            None,
            files={"--weights": "var_d36.pth", "--vae": "vae_ch160v4096z32.pth"},
            resolution=512,
            family=VAR,
        ),
        ModelSpec(
            "hart-0.7b",
            "HART-0.7B text-to-image, 1024x1024, scales 1..64 after 300 text tokens of Qwen2-VL-1.5B-Instruct, "
            "a diffusion head for the last scale's residual; the architecture is read from the folders' "
            "config.json (built without them: the believed hart-0.7b-1024px one)",
            HARTConfig(),
            VQVAEConfig(usage_rows=len(HARTConfig().patch_nums)),
            QWEN2_1_5B,
            files={
                "--weights": "hart-0.7b-1024px/llm/ (config.json and weights; its ema_model.bin is used)",
                "--vae": "hart-0.7b-1024px/tokenizer/ (config.json and weights)",
                "--text-encoder": "folder of mit-han-lab/Qwen2-VL-1.5B-Instruct (config.json, weights, tokenizer)",
            },
            family=HART,
        ),
        ModelSpec(
            "hart-tiny",
            "tiny HART for tests (random weights, byte tokenizer), 7 scales to 16x16 after 12 text tokens",
            HARTConfig(depth=2, width=64, heads=2, patch_nums=(1, 2, 4, 6, 8, 12, 16), context_tokens=12, context_width=32,
                       diffusion_width=32, diffusion_depth=2, diffusion_steps=4, vocab=32, vae_channels=8),
            VQVAEConfig(vocab=32, channels=8, base=32, ch_mult=(1, 1, 1, 2), usage_rows=7),
            dict(QWEN2_1_5B, vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512),
            resolution=128,
            family=HART,
        ),
        *[
            ModelSpec(
                f"varedit-{size}-{resolution}",
                f"VAREdit-{size.upper()} image editing (Infinity-{size.upper()} fine-tuned), 1:1 at "
                f"{resolution}x{resolution}: a prompt and a source picture, whose VAE features lead the KV cache",
                VAREditConfig(**ARCH[size], resolution=resolution),
                VAES[size],
                T5_XL,
                files={
                    "--weights": f"{size.upper()}-{resolution}.pth (from HiDream-ai/VAREdit)",
                    "--vae": f"{VAE_FILES[size]} (beside it)",
                    "--text-encoder": "flan-t5-xl/ (beside it; google/flan-t5-xl)",
                },
                resolution=resolution,
                family=VAREDIT,
            )
            for size, resolution in (("2b", 512), ("8b", 512), ("8b", 1024))
        ],
        ModelSpec(
            "varedit-tiny",
            "tiny VAREdit for tests (random weights, byte tokenizer), 7 scales to 16x16 after a 16x16 source",
            VAREditConfig(depth=4, width=64, heads=2, vae_channels=4, text_width=32, text_max_len=16, block_chunks=2,
                          resolution=256),
            VAEConfig(channels=4, ch_mult=(1, 2), base=32),
            dict(T5_XL, d_model=32, num_layers=2, num_heads=2, d_kv=16, d_ff=64, vocab_size=300),
            resolution=256,
            family=VAREDIT,
        ),
        ModelSpec(
            "var-tiny",
            "tiny class-conditional VAR for tests (random weights), VAR's 10 scales at 32x32 pixels",
            VARConfig(depth=2, width=64, heads=2, num_classes=10, vocab=32, vae_channels=8),
            VQVAEConfig(vocab=32, channels=8, base=32, ch_mult=(1, 2)),
            None,
            resolution=32,
            family=VAR,
        ),
    ]
}


def get_spec(name: "str | ModelSpec") -> ModelSpec:
    """The registered spec of a name; a spec given itself (a model of another size) is returned as is."""
    if isinstance(name, ModelSpec):
        return name
    if name not in MODELS:
        raise SparvarError(f"unknown model {name!r}; known models: {', '.join(MODELS)} (see `sparvar models`)")
    return MODELS[name]


def create_model(name: "str | ModelSpec", device="cpu", dtype: torch.dtype | None = None, seed: int = 0) -> nn.Module:
    """The transformer of a named config; random weights (from `seed`) unless built on meta."""
    spec = get_spec(name)
    with torch.device("meta"):
        model = spec.family.transformer(spec.transformer)
    if torch.device(device).type == "meta":
        return model.to(dtype) if dtype else model
    return model.to(dtype or torch.float32).to_empty(device=device).init_weights(seed).eval()


def create_vae(spec: ModelSpec, device="cpu", dtype: torch.dtype | None = None, seed: int = 0) -> nn.Module:
    """The image decoder of a model; random weights (from `seed`) unless built on meta."""
    with torch.device("meta"):
        vae = spec.family.decoder(spec.vae)
    if torch.device(device).type == "meta":
        return vae.to(dtype) if dtype else vae
    return vae.to(dtype or torch.float32).to_empty(device=device).init_weights(seed).eval()


def guess_model(state: dict[str, torch.Tensor]) -> str | None:
    """The registered transformer whose layout matches `state` exactly, if any."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for name in MODELS:
        if {k: tuple(v.shape) for k, v in create_model(name, device="meta").state_dict().items()} == shapes:
            return name
    return None

"""The HART transformer (text-to-image next-scale prediction with a continuous last-scale residual).

Parameter names follow the official checkpoints (the `llm/` folder: blocks.{i}.attn.qkv_proj, ...,
diffloss.net.*), so they load strictly; the architecture comes from the folder's config.json as
the official loader reads it (`HARTConfig.from_json`). What the official code does, and this
module with it:
- the text (context_tokens features of the text model, padded) is scale 0's slot of the sequence,
  with 1D RoPE over its positions (cumulative count of real tokens); its last position predicts
  the 1x1 token. Attention is not masked at inference: every padded text token is a key;
- image tokens get 2D RoPE: rows and columns stretched onto the last scale's grid (not rounded),
  both shifted by the item's last text position. The rotation pairs dimension d with d + D/2 and
  its angles are laid out [rows, rows, columns, columns], as the official rotary table is;
- blocks: RMSNorm (with its weight) modulated by an adaLN of the text pooled by the config's rule
  (max or masked mean); SwiGLU FFN; softmax scale 0.25 / sqrt(head dim), or cosine attention when
  the config asks for it; the head's adaLN takes the max over all text tokens;
- guidance ramps w = cfg * k / (K - 1) up to scale K - 2; the last scale repeats K - 2's weight
  (the official loop's ratio is left from its last iteration there);
- at the last scale the diffusion head (diffusion.py) adds a continuous residual to every token's
  codeword, from decoder_norm(hidden state + word_embed(codeword)) (`residual`).
The residual stream is float32 and matrix products run in the model's dtype, as in the Infinity
and VAR transformers; `forward_scale` (KV cache + attention policy) and `forward_full` (teacher
forcing, block-causal) share every block.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparvar.attention.policy import AttentionPolicy
from sparvar.errors import SparvarError
from sparvar.kernels.fp8 import quantize_rows
from sparvar.kernels.fused import add_norm, gated_add, qkv_heads
from sparvar.kv_cache import KVCache
from sparvar.models.base import Attend, CachedAttend, ScaleTransformer, TransformerConfig
from sparvar.models.fp8 import Fp8Linear, project
from sparvar.models.hart.diffusion import DiffusionHead
from sparvar.models.hart.text import SYSTEM_PROMPT
from sparvar.models.infinity.transformer import (
    RMSNorm,  # float32, as HART's fused kernel
)
from sparvar.schedules import Schedule
from sparvar.pruning import TokenPruning

HART_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)  # patch_nums of hart-0.7b-1024px
ROPE_BASE = 10000.0


@dataclass(frozen=True)
class HARTConfig(TransformerConfig):
    """The architecture (config.json's names in comments) and the official sampling defaults."""

    depth: int = 16  # depth
    width: int = 1536  # embed_dim
    heads: int = 24  # num_heads
    patch_nums: tuple[int, ...] = HART_1024  # patch_nums: the side of every scale
    context_tokens: int = 300  # context_token: text tokens, padded (the official max_token_length)
    context_width: int = 1536  # context_dim: the text model's width
    mlp_ratio: float = 4.0  # mlp_ratio
    norm_eps: float = 1e-6  # norm_eps
    cosine_attention: bool = False  # attn_l2_norm
    pooling: str = "max"  # sep_aln_pooling_mode: how a block's adaLN pools the text ("max" or "avg")
    context_norm: bool = True  # use_context_norm
    diffusion_width: int = 1024  # diff_width
    diffusion_depth: int = 6  # diff_depth
    diffusion_steps: int = 8  # num_sampling_steps
    vocab: int = 4096  # from the tokenizer's config: vocab_size
    vae_channels: int = 32  # from the tokenizer's config: z_channels
    cfg: float = 4.5  # the official sample.py's defaults
    tau: float = 1.0  # the official sampler has no temperature
    top_p: float = 0.0
    system_prompt: str = SYSTEM_PROMPT  # the official sampler's prompt enhancement (use_llm_system_prompt)
    num_classes: int = 0

    @property
    def text_max_len(self) -> int:
        return self.context_tokens

    @property
    def ffn_hidden(self) -> int:
        return int(self.width * self.mlp_ratio * 2 / 3 + 255) // 256 * 256

    @property
    def schedule(self) -> Schedule:
        """The only schedule the model generates: its scales after its text prefix."""
        return Schedule(tuple((p, p) for p in self.patch_nums), prefix=self.context_tokens)

    @property
    def top_k(self) -> tuple[int, ...]:
        """The official per-scale top-k: 600 at the first seven scales, 300 after."""
        return tuple(600 if k < 7 else 300 for k in range(len(self.patch_nums)))

    @property
    def softmax_scale(self) -> float:
        return 1.0 if self.cosine_attention else 0.25 / math.sqrt(self.head_dim)

    @classmethod
    def from_json(cls, model_config: Path, tokenizer_config: Path | None, defaults: "HARTConfig") -> "HARTConfig":
        """The architecture the official loader builds from the llm/ and tokenizer/ config.json
        files; options it has that change the structure beyond what is implemented are refused."""
        cfg = _read_json(model_config)
        unsupported = {"attn_type": "llama", "mlp_type": "llama", "disable_aln": False, "use_timestep_embed": False,
                       "use_cross_attn": False}
        for key, value in unsupported.items():
            if cfg.get(key, value) != value:
                raise SparvarError(f"{model_config}: {key}={cfg[key]!r} is not supported (only {value!r}, as in "
                                   "hart-0.7b-1024px)")
        if cfg.get("sep_aln_pooling_mode", "max") not in ("max", "avg"):
            raise SparvarError(f"{model_config}: unknown sep_aln_pooling_mode {cfg['sep_aln_pooling_mode']!r}")
        names = dict(depth="depth", width="embed_dim", heads="num_heads", patch_nums="patch_nums",
                     context_tokens="context_token", context_width="context_dim", mlp_ratio="mlp_ratio",
                     norm_eps="norm_eps", cosine_attention="attn_l2_norm", pooling="sep_aln_pooling_mode",
                     context_norm="use_context_norm", diffusion_width="diff_width", diffusion_depth="diff_depth",
                     diffusion_steps="num_sampling_steps")
        values = {field: cfg[key] for field, key in names.items() if key in cfg}
        if tokenizer_config is not None:
            tok = _read_json(tokenizer_config)
            values.update({f: tok[k] for f, k in (("vocab", "vocab_size"), ("vae_channels", "z_channels")) if k in tok})
        if "patch_nums" in values:
            values["patch_nums"] = tuple(values["patch_nums"])
        if "diffusion_steps" in values:
            steps = str(values["diffusion_steps"])
            if not steps.isdigit():
                raise SparvarError(f"{model_config}: num_sampling_steps {steps!r} is not a step count")
            values["diffusion_steps"] = int(steps)
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: getattr(defaults, k) for k in known}, **values})


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise SparvarError(f"cannot read {path}: {err}") from None


def inverse_frequencies(head_dim: int, stride: int, device) -> torch.Tensor:
    return 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, stride, dtype=torch.int64, device=device).float() / head_dim)


def text_rope(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (R, T, D) of 1D RoPE at text positions (R, T)."""
    freqs = positions.float()[..., None] * inverse_frequencies(head_dim, 2, positions.device)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def image_rope(side: int, grid: int, offsets: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (R, side^2, D) of 2D RoPE on a side x side scale stretched onto a grid x grid one,
    positions shifted by each row's offset (R,)."""
    steps = torch.arange(side, device=offsets.device) / side * grid
    rows = steps[:, None].expand(side, side).reshape(-1)[None] + offsets[:, None]
    cols = steps[None, :].expand(side, side).reshape(-1)[None] + offsets[:, None]
    inv = inverse_frequencies(head_dim, 4, offsets.device)
    fr, fc = rows[..., None] * inv, cols[..., None] * inv
    angles = torch.cat([fr, fr, fc, fc], dim=-1)
    return angles.cos(), angles.sin()


class Attention(nn.Module):
    def __init__(self, cfg: HARTConfig):
        super().__init__()
        c = cfg.width
        self.heads = cfg.heads
        self.qkv_proj = nn.Linear(c, 3 * c, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(c))
        self.v_bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("zero_k_bias", torch.zeros(c))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, cfg.heads, 1, 1), math.log(4.0))) if cfg.cosine_attention \
            else None
        self.proj = nn.Linear(c, c)

    def forward(self, x, cos, sin, attend: Attend, layer: int):
        """Heads, the optional cosine normalisation and the half-rotation RoPE in one kernel
        (fused.qkv_heads, which writes k and v into the cache's slots), where kernels run."""
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        log_scale = None if self.scale_mul_1H11 is None else self.scale_mul_1H11.flatten()
        q, k, v = qkv_heads(project(x, self.qkv_proj, bias), self.heads, log_scale, (cos, sin),
                            attend.slots(layer, x.shape[1]), rope_half=True)
        return self.proj(attend(layer, q, k, v).transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        if isinstance(self.gate_proj, Fp8Linear):  # one quantising pass for both projections
            x = quantize_rows(x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """x += attn(RMSNorm(x) * (1 + s1) + b1) * g1; x += FFN(RMSNorm(x) * (1 + s2) + b2) * g2."""

    def __init__(self, cfg: HARTConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.ffn = SwiGLU(cfg.width, cfg.ffn_hidden)
        self.ln_wo_grad = RMSNorm(cfg.width, cfg.norm_eps)  # named as the official norm "without affine", which has a weight
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 6 * cfg.width))

    def forward(self, x, mod, cos, sin, attend: Attend, layer: int):
        """The norms, modulations and residual adds run fused (kernels/fused.py) where kernels run."""
        dtype = self.ada_lin[1].weight.dtype  # the model dtype: the projections' may be FP8
        gamma1, gamma2, mul1, mul2, shift1, shift2 = mod.unbind(2)  # mul: 1 + the adaLN's scale
        norm = self.ln_wo_grad
        _, normed = add_norm(x, None, None, mul1, shift1, norm.eps, dtype, rms_weight=norm.weight)
        attended = self.attn(normed, cos, sin, attend, layer)
        x, normed = add_norm(x, attended, gamma1, mul2, shift2, norm.eps, dtype, rms_weight=norm.weight)
        return gated_add(x, self.ffn(normed), gamma2)


class HeadNorm(nn.Module):
    def __init__(self, cfg: HARTConfig):
        super().__init__()
        self.ln_wo_grad = RMSNorm(cfg.width, cfg.norm_eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))


@dataclass
class Prepared:
    """Per-generation tensors that depend only on the text (batch already CFG-doubled)."""

    start: torch.Tensor  # (B, T, C) the embedded text: scale 0's input, float32
    mods: torch.Tensor  # (depth, B, 1, 6, C) every block's adaLN: gamma1, gamma2, 1 + scale1, 1 + scale2, shift1, shift2
    head: torch.Tensor  # (B, 1, 2, C) the head's adaLN: scale, shift
    text_cos: torch.Tensor  # (B, T, D) 1D RoPE of the text
    text_sin: torch.Tensor
    offsets: torch.Tensor  # (B,) float32: each row's last text position, added to the image positions


class HARTTransformer(ScaleTransformer):
    def __init__(self, cfg: HARTConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.width
        self.context_embed = nn.Linear(cfg.context_width, c)
        self.context_norm = RMSNorm(cfg.context_width, cfg.norm_eps) if cfg.context_norm else None
        self.word_embed = nn.Linear(cfg.vae_channels, c)
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), c)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.head_nm = HeadNorm(cfg)
        self.head = nn.Linear(c, cfg.vocab)
        self.decoder_norm = RMSNorm(c, cfg.norm_eps)
        self.diffloss = DiffusionHead(cfg.vae_channels, c, cfg.diffusion_width, cfg.diffusion_depth, cfg.diffusion_steps)

    @staticmethod
    def guidance_weight(scale: int, num_scales: int, cfg: float) -> float:
        """w in l = l_c + w (l_c - l_u): cfg * k / (K - 1), the last scale taking scale K - 2's."""
        return cfg * min(scale, max(num_scales - 2, 0)) / max(num_scales - 1, 1)

    def checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A file's tensors without the two buffers the official model keeps for training, the
        scale of every token and the block-causal mask (L x L, 380 MB at 1024px): both follow from
        the schedule, so their shapes are checked and they are left out."""
        total = self.cfg.schedule.total
        derived = {"lvl_1L": (1, total), "attn_bias_for_masking": (1, 1, total, total)}
        for key, shape in derived.items():
            if key in state and tuple(state[key].shape) != shape:
                raise SparvarError(f"the checkpoint's {key} has shape {tuple(state[key].shape)}, not {shape}: it was "
                                   "made for another schedule or text length than its config.json says")
        return {k: v for k, v in state.items() if k not in derived}

    def init_weights(self, seed: int = 0) -> "HARTTransformer":
        """Random weights of the right scale, drawn on the model's device (benchmarks, tests)."""
        ones = ("norm.weight", "ln_wo_grad.weight", "in_ln.weight")  # RMSNorm scales
        self.draw_weights(seed, lambda p: 1 / math.sqrt(p.shape[-1]), ones)
        return self

    # ---- conditioning -------------------------------------------------------------------
    def prepare(self, condition, guidance: bool, negative=None) -> Prepared:
        """Text features (B, T, Cctx) float and mask (B, T) bool -> the per-generation tensors;
        with guidance the batch is [text; empty text]: zero features whose mask keeps the first token.
        (HART takes no negative prompt: `negative` is always None.)"""
        feats, mask = condition
        if feats.shape[1] != self.cfg.context_tokens:
            raise SparvarError(f"HART takes {self.cfg.context_tokens} text tokens, got {feats.shape[1]}")
        positions = mask.long().cumsum(1) - 1
        if guidance:
            empty = torch.zeros_like(mask)
            empty[:, 0] = True
            feats, mask = torch.cat([feats, torch.zeros_like(feats)]), torch.cat([mask, empty])
            positions = torch.cat([positions, torch.zeros_like(positions)])
        dtype = self.dtype
        text = feats.float() if self.context_norm is None else self.context_norm(feats)
        text = self.context_embed(text.to(dtype)).float()  # (B, T, C): the sos tokens and the condition
        if self.cfg.pooling == "max":
            pooled = text.max(1).values
        else:
            weight = mask[..., None].float()
            pooled = (text * weight / weight.sum(1).clamp(min=1)[:, None]).sum(1)
        mods = torch.stack([self.block(i).ada_lin(pooled.to(dtype)).float().view(-1, 1, 6, self.cfg.width)
                            for i in range(self.cfg.depth)])
        mods[..., 2:4, :] += 1  # the norms' multipliers, 1 + scale, once per generation
        head = self.head_nm.ada_lin(text.max(1).values.to(dtype)).float().view(-1, 1, 2, self.cfg.width)
        cos, sin = text_rope(positions, self.cfg.head_dim)
        return Prepared(start=text, mods=mods, head=head, text_cos=cos, text_sin=sin, offsets=positions[:, -1].float())

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Next-scale input (B, n, Cvae) -> token embeddings (B, n, C), float32."""
        return self.word_embed(codes.to(self.dtype)).float()

    # ---- the transformer ----------------------------------------------------------------
    def _blocks(self, x, prep: Prepared, cos, sin, attend: Attend) -> torch.Tensor:
        for layer in range(self.cfg.depth):
            x = self.block(layer)(x, prep.mods[layer], cos, sin, attend, layer)
        return x

    def logits(self, x: torch.Tensor, prep: Prepared) -> torch.Tensor:
        """Token logits (B, L, vocab) of hidden states (B, L, C)."""
        scale, shift = prep.head.unbind(2)
        normed = self.head_nm.ln_wo_grad(x) * (1 + scale) + shift
        return self.head(normed.to(self.dtype)).float()

    def _rope(self, scale: int, schedule: Schedule, prep: Prepared):
        if scale == 0:
            return prep.text_cos, prep.text_sin
        return image_rope(schedule.sizes[scale][0], schedule.sizes[-1][0], prep.offsets, self.cfg.head_dim)

    def forward_scale(
        self, x: torch.Tensor, scale: int, schedule: Schedule, prep: Prepared, cache: KVCache, policy: AttentionPolicy,
        pruning: TokenPruning | None = None,
    ):
        """One generation step: inputs of scale `scale` (B, n, C) -> logits (B, n, vocab); scale 0's
        input is the text and its logits are the last text position's. At the last scale also the
        hidden states (B, n, C), which the diffusion head reads (`residual`)."""
        if pruning is not None:
            raise SparvarError("token pruning is not available for HART models")
        x = x + self.lvl_embed.weight[scale].float()
        attend = CachedAttend(cache, policy, scale, schedule, self.cfg.depth, softmax_scale=self.cfg.softmax_scale)
        x = self._blocks(x, prep, *self._rope(scale, schedule, prep), attend)
        if scale == 0:
            x = x[:, -1:]
        logits = self.logits(x, prep)
        return (logits, x) if scale == len(schedule) - 1 else logits

    def residual(self, hidden: torch.Tensor, codes: torch.Tensor, weight: float,
                 generators: list[torch.Generator]) -> torch.Tensor:
        """The diffusion head's continuous residual (B, Cvae, h, w) of the last scale's codewords
        `codes` (B, Cvae, h, w), from the hidden states (B or 2B rows, n, C) and guidance `weight`."""
        b, channels, h, w = codes.shape
        words = self.embed_codes(codes.flatten(2).transpose(1, 2))
        words = words.repeat(hidden.shape[0] // b, 1, 1)
        cond = self.decoder_norm(hidden + words).flatten(0, 1)
        noise = self.diffloss.draw_noise(generators, h * w, codes.device)
        out = self.diffloss.sample(cond, weight, noise)
        return out.view(b, h * w, channels).transpose(1, 2).reshape(b, channels, h, w)

    def forward_full(self, inputs: list[torch.Tensor], schedule: Schedule, prep: Prepared) -> torch.Tensor:
        """Teacher forcing: inputs of scales 1.. (each (B, n_k, Cvae)) -> logits of every image token
        (B, sum n_k, vocab), scale 0's from the last text position, as the official forward returns
        them. Block-causal attention runs as one unmasked attention per scale over its prefix."""
        x = torch.cat([prep.start] + [self.embed_codes(c) for c in inputs], dim=1)
        levels = torch.repeat_interleave(torch.arange(len(schedule)), torch.tensor(schedule.lengths))
        x = x + self.lvl_embed.weight[levels.to(x.device)].float()
        ropes = [self._rope(k, schedule, prep) for k in range(len(schedule))]
        cos, sin = torch.cat([r[0] for r in ropes], 1), torch.cat([r[1] for r in ropes], 1)
        ends = [start + n for start, n in zip(schedule.offsets, schedule.lengths)]

        def attend(layer, q, k, v):
            outs = [F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end],
                                                   scale=self.cfg.softmax_scale)
                    for start, end in zip(schedule.offsets, ends)]
            return torch.cat(outs, dim=2)

        x = self._blocks(x, prep, cos, sin, Attend(attend))
        return self.logits(x[:, schedule.lengths[0] - 1:], prep)

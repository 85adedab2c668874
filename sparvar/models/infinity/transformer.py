"""The Infinity transformer (bitwise next-scale prediction), readable top to bottom.

Parameter names and shapes follow the official checkpoints (block_chunks.{c}.module.{j}.*), so
their state dicts load strictly. The residual stream is kept in float32 and the matrix products
run in the model's dtype (bf16 on GPU), as the official code does under autocast.

Two ways to run it share every block:
- `forward_scale`: one step of generation; keys/values go into a static KV cache and
  self-attention goes through the attention policy (the seam SparVAR plugs into);
- `forward_full`: teacher forcing over the whole sequence with the block-causal mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparvar.attention.policy import AttentionPolicy
from sparvar.errors import SparvarError
from sparvar.kernels.fused import add_norm, gated_add, linear_gelu, qkv_heads
from sparvar.kv_cache import KVCache
from sparvar.models.base import Attend, CachedAttend, ScaleTransformer, TransformerConfig
from sparvar.models.fp8 import Fp8Linear, project
from sparvar.schedules import Schedule
from sparvar.pruning import TokenPruning


@dataclass(frozen=True)
class InfinityConfig(TransformerConfig):
    depth: int
    width: int
    heads: int
    vae_channels: int  # channels of the VAE latent (32, or 14 for the 8B's VAE)
    patchify: bool = False  # 8B: 2x2 pixel-unshuffle of the latent, so 4 * 14 = 56 bits per token
    text_width: int = 2048  # 0: class-conditional (no cross-attention)
    text_max_len: int = 512
    num_classes: int = 0
    block_chunks: int = 8
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    cfg: float = 3.0  # default guidance, temperature and filtering of this model's sampling
    tau: float = 0.5
    top_k: int = 0
    top_p: float = 0.97

    @property
    def bits(self) -> int:
        """Bits per transformer token: the latent channels, times 4 when patchified."""
        return self.vae_channels * (4 if self.patchify else 1)

    @property
    def latent_per_token(self) -> int:
        return 2 if self.patchify else 1

    @property
    def ffn_hidden(self) -> int:
        return round(self.width * self.mlp_ratio / 256) * 256

    @property
    def text_conditioned(self) -> bool:
        return self.text_width > 0

    @property
    def cross_attention(self) -> bool:
        return self.text_conditioned


def adaptive_norm(x, scale, shift, eps, dtype):
    """LayerNorm without affine, modulated by the condition; returned in the matmul dtype."""
    return add_norm(x, None, None, 1 + scale, shift, eps, dtype)[1]


class RopeTable:
    """2D rotary embedding: cos/sin (tokens, head_dim / 2) in float32 of tokens at (row, col).

    Pairs (2i, 2i+1) of a head rotate: the first half of the pairs with the row position,
    the second half with the column position.
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, head_dim: int, device, base: float = 10000.0):
        half = head_dim // 2
        inv_freq = 1.0 / base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half)
        angles = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=-1)
        self.cos = angles.cos().to(device)
        self.sin = angles.sin().to(device)

    def slice(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[start : start + length], self.sin[start : start + length]


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        """Float32 result, as the text features it normalises are float32."""
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


class SelfAttention(nn.Module):
    """Cosine attention: q, k L2-normalised, q scaled per head by exp(min(s, log 100)).

    VAR's blocks use the same attention without RoPE (rope=None).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        c = width
        self.heads, self.head_dim = heads, width // heads
        self.mat_qkv = nn.Linear(c, 3 * c, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(c))
        self.v_bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("zero_k_bias", torch.zeros(c))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(c, c)

    def qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, kv_out=None):
        """q, k, v (B, H, L, D) in the matmul dtype, normalised (and rotated, given RoPE angles); k, v
        possibly written into kv_out (see fused.qkv_heads). x may come as FP8 rows (models/fp8.py)."""
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        return qkv_heads(project(x, self.mat_qkv, bias), self.heads, self.scale_mul_1H11.flatten(), rope, kv_out)

    def forward(self, x, rope, attend: Attend, layer: int):
        q, k, v = self.qkv(x, rope, attend.slots(layer, x.shape[1]))
        out = attend(layer, q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    """Attention from image tokens (or one learned query, for pooling) to padded text tokens."""

    def __init__(self, width: int, text_width: int, heads: int, pooled: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        if pooled:
            self.mat_q = nn.Parameter(torch.zeros(1, heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(width, width)
        self.mat_kv = nn.Linear(text_width, 2 * width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def text_kv(self, text: torch.Tensor):
        """Keys and values (B, H, T, D) of the text; computed once per generation."""
        b, t, _ = text.shape
        kv = project(text, self.mat_kv, torch.cat([self.zero_k_bias, self.v_bias]))
        k, v = kv.view(b, t, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor | None, kv, text_mask: torch.Tensor) -> torch.Tensor:
        """text_mask: (B, T) True at real tokens, or its additive form (B, T) (0 / -inf)."""
        k, v = kv
        b = k.shape[0]
        if x is None:  # pooling: one learned query per head
            q = self.mat_q.to(k.dtype)[:, :, None].expand(b, -1, 1, -1)
        else:
            q = self.mat_q(x).view(b, x.shape[1], self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=text_mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).flatten(2))


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        if isinstance(self.fc1, Fp8Linear):  # the GELU runs in the pass that quantises fc2's input
            return self.fc2(self.fc1.gelu_rows(x))
        return self.fc2(linear_gelu(x, self.fc1))


class TextPool(nn.Module):
    """Attentive pooling of the text into one vector: the start token and the condition."""

    def __init__(self, width: int, text_width: int):
        super().__init__()
        heads = max(1, text_width // (64 if width > 4096 else 128))  # 16 for T5-XL features
        self.ca = CrossAttention(width, text_width, heads, pooled=True)

    def forward(self, text, mask):
        return self.ca(None, self.ca.text_kv(text), mask).squeeze(1)


class HeadNorm(nn.Module):
    """adaLN before the head, driven by the condition vector."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, cond):
        dtype = self.ada_lin[1].weight.dtype
        scale, shift = self.ada_lin(cond.to(dtype)).float().view(-1, 1, 2, x.shape[-1]).unbind(2)
        return adaptive_norm(x, scale, shift, self.eps, dtype)


class Block(nn.Module):
    """x += SA(adaLN(x)) * g1; x += CA(LN(x), text); x += FFN(adaLN(x)) * g2."""

    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.eps = cfg.norm_eps
        self.sa = SelfAttention(cfg.width, cfg.heads)
        if cfg.text_conditioned:
            self.ca = CrossAttention(cfg.width, cfg.width, cfg.heads)
            self.ca_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        else:
            self.ca = None
        self.ffn = FFN(cfg.width, cfg.ffn_hidden)
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, cfg.width))

    def forward(self, x, mod, text, rope, attend: Attend, layer: int):
        """mod: this block's adaLN (Prepared.mods); text: this block's ((k, v), mask) of the
        cross-attention (Prepared.text[layer]). Each residual add is fused with the norm that
        follows it (kernels/fused.py); with FP8 projections the norms hand them FP8 rows."""
        dtype = self.ffn.fc1.weight.dtype
        gamma1, gamma2, mul1, mul2, shift1, shift2 = mod.unbind(2)
        _, normed = add_norm(x, None, None, mul1, shift1, self.eps, dtype)
        attended = self.sa(normed, rope, attend, layer)
        if self.ca is not None:
            x, normed = add_norm(x, attended, gamma1, self.ca_norm.weight, self.ca_norm.bias, self.eps, dtype)
            kv, mask = text
            x, normed = add_norm(x, self.ca(normed, kv, mask), None, mul2, shift2, self.eps, dtype)
        else:
            x, normed = add_norm(x, attended, gamma1, mul2, shift2, self.eps, dtype)
        return gated_add(x, self.ffn(normed), gamma2)


class BlockChunk(nn.Module):
    """Only there so parameter names match the official checkpoints (block_chunks.c.module.j)."""

    def __init__(self, blocks):
        super().__init__()
        self.module = nn.ModuleList(blocks)


@dataclass
class Prepared:
    """Per-generation tensors that depend only on the condition (batch already CFG-doubled)."""

    start: torch.Tensor  # (B, 1, C) input of scale 0
    cond: torch.Tensor  # (B, C) condition vector (adaLN of the head)
    mods: torch.Tensor  # (depth, B, 1, 6, C) float32 per block: gamma1, gamma2, 1 + scale1, 1 + scale2, shift1, shift2
    text: list | None  # per layer ((k, v), additive mask (B, T)) of the cross-attention, or None


class InfinityTransformer(ScaleTransformer):
    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.width
        if cfg.text_conditioned:
            self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_max_len, cfg.text_width))
            self.text_norm = RMSNorm(cfg.text_width, cfg.norm_eps)
            self.text_proj_for_sos = TextPool(c, cfg.text_width)
            self.text_proj_for_ca = nn.Sequential(
                nn.Linear(cfg.text_width, c), nn.GELU(approximate="tanh"), nn.Linear(c, c)
            )
        else:
            self.class_emb = nn.Embedding(cfg.num_classes + 1, c)  # last row: unconditional
        self.pos_start = nn.Parameter(torch.zeros(1, 1, c))
        self.lvl_embed = nn.Embedding(15, c)
        self.word_embed = nn.Linear(cfg.bits, c)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        per_chunk = cfg.depth // cfg.block_chunks
        if per_chunk * cfg.block_chunks != cfg.depth:
            raise ValueError(f"depth {cfg.depth} is not a multiple of block_chunks {cfg.block_chunks}")
        self.block_chunks = nn.ModuleList(
            BlockChunk([Block(cfg) for _ in range(per_chunk)]) for _ in range(cfg.block_chunks)
        )
        self.head_nm = HeadNorm(c, cfg.norm_eps)
        self.head = nn.Linear(c, 2 * cfg.bits)
        self._ropes: dict = {}

    @property
    def blocks(self) -> list[Block]:
        return [b for chunk in self.block_chunks for b in chunk.module]

    @staticmethod
    def guidance_weight(scale: int, num_scales: int, cfg: float) -> float:
        """w in l = l_c + w (l_c - l_u): Infinity mixes cfg * l_c + (1 - cfg) * l_u at every scale."""
        return cfg - 1

    @staticmethod
    def official_guidance(logits: torch.Tensor, guidance: bool, scale: int, num_scales: int, cfg: float,
                          tau: float) -> torch.Tensor:
        """The guided logits as the official sampler computes them, to the last bit: both halves
        times 1 / tau, then cfg * cond + (1 - cfg) * uncond (the condition alone where cfg is 1)."""
        logits = logits.mul(1 / tau)
        if not guidance:
            return logits
        cond, uncond = logits.chunk(2)
        return cond if cfg == 1 else cfg * cond + (1 - cfg) * uncond

    @staticmethod
    def checkpoint_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An official file's tensors as this module loads them: the same."""
        return state

    def init_weights(self, seed: int = 0) -> "InfinityTransformer":
        """Random weights of the right scale, drawn on the model's device (benchmarks, tests)."""
        self.draw_weights(seed, math.sqrt(1 / self.cfg.width / 3))
        return self

    # ---- conditioning -------------------------------------------------------------------
    def prepare(self, condition, guidance: bool, negative=None) -> Prepared:
        """Condition tensors for one generation; with guidance the batch is [cond; uncond].

        condition: (text features (B, T, Ct5) float, mask (B, T) bool) for text models,
        or class labels (B,) for class-conditional ones. negative: the features and mask of
        negative prompts (padded like the condition's), which take the unconditional half's place
        (the learned empty-prompt embedding, cfg_uncond, otherwise).
        """
        dtype = self.dtype
        if negative is not None and not (guidance and self.cfg.text_conditioned):
            raise SparvarError("a negative prompt needs a text-conditioned model and guidance (cfg != 1)")
        if self.cfg.text_conditioned:
            feats, mask = condition
            if guidance:
                if negative is None:
                    negative = self.cfg_uncond[: feats.shape[1]].to(feats.dtype).expand_as(feats), mask
                feats, mask = torch.cat([feats, negative[0]]), torch.cat([mask, negative[1]])
            feats = self.text_norm(feats).to(dtype)
            cond = self.text_proj_for_sos(feats, mask).float()
            text_tokens = self.text_proj_for_ca(feats)
            # the mask in the additive form SDPA would otherwise make from it in every call
            bias = torch.zeros(mask.shape, device=mask.device, dtype=dtype).masked_fill(~mask, float("-inf"))
            text = [(self.block(i).ca.text_kv(text_tokens), bias) for i in range(self.cfg.depth)]
        else:
            labels = condition
            if guidance:
                labels = torch.cat([labels, torch.full_like(labels, self.cfg.num_classes)])
            cond = self.class_emb(labels).float()
            text = None
        gss = self.shared_ada_lin(cond.to(dtype)).float().view(-1, 1, 6, self.cfg.width)
        # every block's modulation once per generation, not at every scale (small scales are launch-bound)
        mods = torch.stack([self.block(i).ada_gss[0].clone() for i in range(self.cfg.depth)]).float()[:, None] + gss
        mods = mods + torch.tensor([0, 0, 1, 1, 0, 0], device=mods.device, dtype=mods.dtype)[:, None]
        start = cond[:, None] + self.pos_start.float()
        return Prepared(start=start, cond=cond, mods=mods, text=text)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Next-scale input (B, n, bits) -> token embeddings (B, n, C), float32."""
        return self.word_embed(codes.to(self.dtype)).float()

    @staticmethod
    def positions(schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, col) on the RoPE grid of every token of the sequence (`Schedule.positions`)."""
        rows, cols = zip(*(schedule.positions(k) for k in range(len(schedule))))
        return torch.cat(rows), torch.cat(cols)

    def rope(self, schedule: Schedule) -> RopeTable:
        key = (schedule, self.device)
        if key not in self._ropes:
            with torch.inference_mode(False):  # a cached table must also serve training
                self._ropes[key] = RopeTable(*self.positions(schedule), self.cfg.head_dim, self.device)
        return self._ropes[key]

    # ---- the transformer ----------------------------------------------------------------
    def _blocks(self, x, prep: Prepared, rope, attend: Attend, layers: range | None = None, blocks=None):
        """x through the blocks of `layers` (all by default); `blocks` may stand in for the model's
        (torch.compile'd wrappers of them, in training)."""
        for layer in range(self.cfg.depth) if layers is None else layers:
            text = None if prep.text is None else prep.text[layer]
            block = self.block(layer) if blocks is None else blocks[layer]
            x = block(x, prep.mods[layer], text, rope, attend, layer)
        return x

    def logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Bit logits (B, L, bits, 2) of hidden states x (B, L, C)."""
        return self.head(self.head_nm(x, cond)).float().unflatten(-1, (self.cfg.bits, 2))

    def forward_scale(
        self, x: torch.Tensor, scale: int, schedule: Schedule, prep: Prepared, cache: KVCache, policy: AttentionPolicy,
        pruning: TokenPruning | None = None,
    ) -> torch.Tensor:
        """One generation step: inputs of scale `scale` (B, n, C) -> bit logits (B, n, bits, 2).

        `pruning` (pruning.py) may run a range of layers on part of the tokens (`kept`)."""
        start, n = schedule.offsets[scale], schedule.lengths[scale]
        x = x + self.lvl_embed.weight[scale].float()

        attend = CachedAttend(cache, policy, scale, schedule, self.cfg.depth)
        rope = self.rope(schedule).slice(start, n)
        if pruning is None:
            x = self._blocks(x, prep, rope, attend)
        else:
            run = lambda x, rope, attend, layers: self._blocks(x, prep, rope, attend, layers)  # noqa: E731
            x = pruning.forward(x, scale, schedule, self.cfg.depth, rope, attend, run)
        return self.logits(x, prep.cond)

    def forward_full(
        self, inputs: list[torch.Tensor], schedule: Schedule, prep: Prepared, attend: Attend | None = None,
        blocks=None,
    ) -> torch.Tensor:
        """Teacher forcing: inputs of scales 1.. (each (B, n_k, bits)) -> logits of all tokens.

        `attend` applies the block-causal mask over the whole sequence; by default one SDPA per
        scale (`PrefixAttend`). `blocks` may stand in for the model's blocks (see _blocks)."""
        x = torch.cat([prep.start] + [self.embed_codes(c) for c in inputs], dim=1)
        scale_of_token = torch.repeat_interleave(torch.arange(len(schedule)), torch.tensor(schedule.lengths))
        x = x + self.lvl_embed.weight[scale_of_token.to(x.device)].float()
        attend = PrefixAttend(schedule) if attend is None else attend
        x = self._blocks(x, prep, self.rope(schedule).slice(0, schedule.total), attend, blocks=blocks)
        return self.logits(x, prep.cond)


class PrefixAttend(Attend):
    """The block-causal mask of teacher forcing as one unmasked attention per scale, its queries
    over the keys of every scale up to its own: the same result without an L x L mask, so flash
    kernels run and the masked half is skipped."""

    def __init__(self, schedule: Schedule):
        self.bounds = [(start, start + n) for start, n in zip(schedule.offsets, schedule.lengths)]

    def __call__(self, layer, q, k, v):
        q, k = q.to(v.dtype), k.to(v.dtype)  # under autocast v is already in the low precision
        outs = [F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], scale=1.0)
                for start, end in self.bounds]
        return torch.cat(outs, dim=2)

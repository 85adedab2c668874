"""The VAR transformer (class-conditional next-scale prediction over VQ tokens).

Parameter and buffer names follow the official checkpoints (var_d16.pth ... var_d36.pth), so
they load strictly. A token's input is its embedding plus a learned absolute position (pos_1LC,
one row per token of the model's own schedule) and its scale's level embedding; no RoPE. The
blocks use the same cosine attention and FFN as Infinity (imported from there) and AdaLN from the class
embedding: per block (ada_lin) or, for d36, one shared projection plus a learned per-block offset.
As in the Infinity transformer, the residual stream stays in float32 and the products run in
the model's dtype; `forward_scale` (KV cache + attention policy) and `forward_full` (teacher
forcing with the block-causal mask) share every block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparvar.attention.policy import AttentionPolicy
from sparvar.errors import SparvarError
from sparvar.kernels.fused import add_norm, gated_add
from sparvar.kv_cache import KVCache
from sparvar.models.base import Attend, CachedAttend, ScaleTransformer, TransformerConfig
from sparvar.models.infinity.transformer import FFN, HeadNorm, SelfAttention, adaptive_norm
from sparvar.schedules import VAR_256, Schedule
from sparvar.pruning import TokenPruning


@dataclass(frozen=True)
class VARConfig(TransformerConfig):
    depth: int
    width: int  # 64 * depth for the official models
    heads: int  # = depth for the official models (head_dim 64)
    schedule: Schedule = VAR_256  # the only schedule the model generates: pos_1LC has one row per token
    shared_aln: bool = False  # d36: one AdaLN projection for all blocks plus a learned per-block ada_gss
    num_classes: int = 1000
    vocab: int = 4096
    vae_channels: int = 32
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    cfg: float = 4.0  # default guidance, temperature and filtering: the official demo's
    tau: float = 1.0
    top_k: int = 900
    top_p: float = 0.95

    @property
    def ffn_hidden(self) -> int:
        return round(self.width * self.mlp_ratio)


class Block(nn.Module):
    """x += attn(adaLN(x)) * g1; x += FFN(adaLN(x)) * g2, the AdaLN from the class condition."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.eps, self.width = cfg.norm_eps, cfg.width
        self.attn = SelfAttention(cfg.width, cfg.heads)
        self.ffn = FFN(cfg.width, cfg.ffn_hidden)
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, cfg.width))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 6 * cfg.width))

    def modulation(self, cond: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        """(B, 1, 6, C) float32 gamma1, gamma2, scale1, scale2, shift1, shift2 of a condition;
        `shared` is the shared projection's output (B, 1, 6, C) for shared-AdaLN models."""
        if shared is not None:
            return self.ada_gss.float() + shared
        return self.ada_lin(cond.to(self.ada_lin[1].weight.dtype)).float().view(-1, 1, 6, self.width)

    def forward(self, x, mod: torch.Tensor, attend: Attend, layer: int):
        dtype = self.ffn.fc1.weight.dtype
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)
        attended = self.attn(adaptive_norm(x, scale1, shift1, self.eps, dtype), None, attend, layer)
        x, normed = add_norm(x, attended, gamma1, 1 + scale2, shift2, self.eps, dtype)  # one fused pass
        return gated_add(x, self.ffn(normed), gamma2)


@dataclass
class Prepared:
    """Per-generation tensors that depend only on the class labels (batch already CFG-doubled)."""

    start: torch.Tensor  # (B, 1, C) class embedding + pos_start: input of scale 0, float32
    cond: torch.Tensor  # (B, C) class embedding (AdaLN of the head)
    mods: list[torch.Tensor]  # per block, its AdaLN modulation (B, 1, 6, C)


class VARTransformer(ScaleTransformer):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        c, total = cfg.width, cfg.schedule.total
        self.pos_start = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_1LC = nn.Parameter(torch.zeros(1, total, c))
        # scale of every token and the block-causal additive mask: persistent in the official files
        self.register_buffer("lvl_1L", torch.zeros(1, total, dtype=torch.long))
        self.register_buffer("attn_bias_for_masking", torch.zeros(1, 1, total, total))
        self.word_embed = nn.Linear(cfg.vae_channels, c)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, c)  # last row: unconditional
        self.lvl_embed = nn.Embedding(len(cfg.schedule), c)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c)) if cfg.shared_aln else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.head_nm = HeadNorm(c, cfg.norm_eps)
        self.head = nn.Linear(c, cfg.vocab)
        self._fill_buffers()

    @staticmethod
    def _levels(schedule: Schedule, device=None) -> torch.Tensor:
        """The scale of every token (L,)."""
        return torch.cat([torch.full((n,), k, dtype=torch.long, device=device) for k, n in enumerate(schedule.lengths)])

    @staticmethod
    def _mask(schedule: Schedule, device=None) -> torch.Tensor:
        """The block-causal additive mask (1, 1, L, L): a token sees its own and earlier scales."""
        levels = VARTransformer._levels(schedule, device)
        causal = levels[:, None] >= levels[None, :]
        return torch.zeros_like(causal, dtype=torch.float).masked_fill(~causal, -math.inf)[None, None]

    def _fill_buffers(self) -> None:
        device = self.lvl_1L.device
        with torch.no_grad():
            self.lvl_1L.copy_(self._levels(self.cfg.schedule, device)[None])
            self.attn_bias_for_masking.copy_(self._mask(self.cfg.schedule, device))

    def checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A file's state with the block-causal mask filled in where the file leaves it out: it
        follows from the schedule (and takes 4 L^2 bytes, 20 MB at the 512 schedule)."""
        if "attn_bias_for_masking" in state:
            return state
        return {**state, "attn_bias_for_masking": self._mask(self.cfg.schedule)}

    @staticmethod
    def guidance_weight(scale: int, num_scales: int, cfg: float) -> float:
        """w in l = l_c + w (l_c - l_u): VAR ramps t = cfg * k / (K - 1) from 0 at the first scale."""
        return cfg * scale / max(num_scales - 1, 1)

    @staticmethod
    def official_guidance(logits: torch.Tensor, guidance: bool, scale: int, num_scales: int, cfg: float,
                          tau: float) -> torch.Tensor:
        """The guided logits as the official sampler computes them, to the last bit:
        (1 + t) cond - t uncond with t = cfg * (k / (K - 1)). It has no temperature."""
        if tau != 1:
            raise SparvarError(f"the official VAR sampler has no temperature: use tau 1, not {tau}")
        if not guidance:
            return logits
        t = cfg * (scale / max(num_scales - 1, 1))
        cond, uncond = logits.chunk(2)
        return (1 + t) * cond - t * uncond

    def init_weights(self, seed: int = 0) -> "VARTransformer":
        """Random weights of the right scale, drawn on the model's device (benchmarks, tests)."""
        self.draw_weights(seed, math.sqrt(1 / self.cfg.width / 3))
        self._fill_buffers()  # the scale of every token and the block-causal mask
        return self

    def check_schedule(self, schedule: Schedule) -> None:
        if schedule != self.cfg.schedule:
            raise SparvarError(
                f"this VAR model generates only its own scales ({self.cfg.schedule.describe()}), "
                f"not {schedule.describe()}"
            )

    # ---- conditioning -------------------------------------------------------------------
    def prepare(self, labels: torch.Tensor, guidance: bool, negative=None) -> Prepared:
        """Condition tensors for class labels (B,); with guidance the batch is [labels; unconditional]."""
        if negative is not None:
            raise SparvarError("negative prompts need a text-conditioned model; VAR's condition is a class")
        if guidance:
            labels = torch.cat([labels, torch.full_like(labels, self.cfg.num_classes)])
        cond = self.class_emb(labels).float()
        shared = None
        if self.shared_ada_lin is not None:
            shared = self.shared_ada_lin(cond.to(self.dtype)).float().view(-1, 1, 6, self.cfg.width)
        mods = [self.block(i).modulation(cond, shared) for i in range(len(self.blocks))]
        return Prepared(start=cond[:, None] + self.pos_start.float(), cond=cond, mods=mods)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Next-scale input (B, n, Cvae) -> token embeddings (B, n, C), float32."""
        return self.word_embed(codes.to(self.dtype)).float()

    # ---- the transformer ----------------------------------------------------------------
    def _blocks(self, x, prep: Prepared, attend: Attend, layers: range | None = None) -> torch.Tensor:
        for layer in range(len(self.blocks)) if layers is None else layers:
            x = self.block(layer)(x, prep.mods[layer], attend, layer)
        return x

    def logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Token logits (B, L, vocab) of hidden states x (B, L, C)."""
        return self.head(self.head_nm(x, cond)).float()

    def forward_scale(
        self, x: torch.Tensor, scale: int, schedule: Schedule, prep: Prepared, cache: KVCache, policy: AttentionPolicy,
        pruning: TokenPruning | None = None,
    ) -> torch.Tensor:
        """One generation step: inputs of scale `scale` (B, n, C) -> logits (B, n, vocab).

        `pruning` (pruning.py) may run a range of layers on part of the tokens (`kept`)."""
        self.check_schedule(schedule)
        start, n = schedule.offsets[scale], schedule.lengths[scale]
        x = x + self.lvl_embed.weight[scale].float() + self.pos_1LC[0, start : start + n].float()

        attend = CachedAttend(cache, policy, scale, schedule, self.cfg.depth)
        if pruning is None:
            x = self._blocks(x, prep, attend)
        else:
            run = lambda x, rope, attend, layers: self._blocks(x, prep, attend, layers)  # noqa: E731
            x = pruning.forward(x, scale, schedule, self.cfg.depth, None, attend, run)
        return self.logits(x, prep.cond)

    def forward_full(self, inputs: list[torch.Tensor], schedule: Schedule, prep: Prepared) -> torch.Tensor:
        """Teacher forcing: inputs of scales 1.. (each (B, n_k, Cvae)) -> logits of all tokens."""
        self.check_schedule(schedule)
        x = torch.cat([prep.start] + [self.embed_codes(c) for c in inputs], dim=1)
        x = x + self.lvl_embed(self.lvl_1L[0]).float() + self.pos_1LC[0].float()
        mask = self.attn_bias_for_masking[0, 0]

        def attend(layer, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=1.0)

        return self.logits(self._blocks(x, prep, Attend(attend)), prep.cond)

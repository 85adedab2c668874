"""VAR's multi-scale VQVAE: image <-> latent (LDM-style conv encoder and decoder, with attention at
the coarsest level and in the middle) and the residual quantiser (quant.py) between them.

Parameter names follow the official file vae_ch160v4096z32.pth, which holds the encoder, the
decoder, the quantiser and both 3x3 quant convolutions; all of it is built and loaded strictly,
so encoding works as well as decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparvar.errors import SparvarError
from sparvar.kernels.fused import channels_last_on_gpu, group_norm_silu
from sparvar.models.infinity.vae import Downsample, ResBlock, Upsample, group_norm  # the same LDM-style pieces
from sparvar.models.var.quant import ResidualQuantizer
from sparvar.schedules import Schedule


@dataclass(frozen=True)
class VQVAEConfig:
    vocab: int = 4096
    channels: int = 32  # latent channels (Cvae)
    base: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # one level per entry; 2 ** (levels - 1) = patch size
    res_blocks: int = 2  # per encoder level; the decoder has one more
    phis: int = 4  # shared Phi convolutions of the quantiser
    phi_mix: float = 0.5
    usage_rows: int = 10  # rows of the file's codeword-usage buffer (one per training scale)

    @property
    def patch(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map, added to it."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # (B, hw, C) each
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Level(nn.Module):
    """Residual blocks of one resolution, each followed by attention at the coarsest level."""

    def __init__(self, cin: int, cout: int, blocks: int, attention: bool):
        super().__init__()
        self.block = nn.ModuleList(ResBlock(cin if i == 0 else cout, cout) for i in range(blocks))
        self.attn = nn.ModuleList(AttnBlock(cout) for _ in range(blocks if attention else 0))

    def forward(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        return x


class DownLevel(Level):
    def __init__(self, cin: int, cout: int, blocks: int, attention: bool, downsample: bool):
        super().__init__(cin, cout, blocks, attention)
        self.downsample = Downsample(cout) if downsample else None

    def forward(self, x):
        x = super().forward(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(Level):
    def __init__(self, cin: int, cout: int, blocks: int, attention: bool, upsample: bool):
        super().__init__(cin, cout, blocks, attention)
        self.upsample = Upsample(cout) if upsample else None

    def forward(self, x):
        x = super().forward(x)
        return x if self.upsample is None else self.upsample(x)


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        widths = [cfg.base * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(3, cfg.base, 3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(cfg.base if i == 0 else widths[i - 1], widths[i], cfg.res_blocks, i == last, i != last)
            for i in range(len(widths))
        )
        self.mid = Mid(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], cfg.channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(group_norm_silu(self.mid(x), self.norm_out))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        widths = [cfg.base * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1])
        # levels are stored fine-first (up.0 is the finest) and run coarse to fine
        self.up = nn.ModuleList(
            UpLevel(widths[min(i + 1, last)], widths[i], cfg.res_blocks + 1, i == last, i != 0)
            for i in range(len(widths))
        )
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(group_norm_silu(x, self.norm_out))


class VQVAE(nn.Module):
    """Images (B, 3, 16h, 16w) in [-1, 1] <-> multi-scale token indices, through the latent f_hat.

    `quantize` is the residual quantiser; the sampler loop uses it as the family's codes.
    """

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = ResidualQuantizer(cfg.vocab, cfg.channels, cfg.phis, cfg.phi_mix, cfg.usage_rows)
        self.quant_conv = nn.Conv2d(cfg.channels, cfg.channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.channels, cfg.channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def init_weights(self, seed: int = 0) -> "VQVAE":
        """Random weights (He-scaled convolutions and codewords) drawn on the model's device."""
        gen = torch.Generator(self.quant_conv.weight.device).manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif p.dim() == 1:  # GroupNorm scales
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, math.sqrt(2.0 / p[0].numel()), generator=gen)
            self.quantize.ema_vocab_hit_SV.zero_()
        return self

    @staticmethod
    def checkpoint_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The official file's tensors already carry this module's names; all of them are used."""
        return state

    def latent_of(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> the continuous latent f (B, C, H / 16, W / 16), float32."""
        return self.quant_conv(self.encoder(images.to(self.dtype))).float()

    def encode(self, images: torch.Tensor, schedule: Schedule) -> list[torch.Tensor]:
        """Images -> token indices per scale, (B, h_k * w_k) each; the last scale's grid is the latent's."""
        size = tuple(images.shape[-2:])
        expected = tuple(s * self.cfg.patch for s in schedule.sizes[-1])
        if size != expected:
            raise SparvarError(f"images of {size[0]}x{size[1]} pixels do not fit scales up to "
                               f"{schedule.sizes[-1]}: expected {expected[0]}x{expected[1]}")
        return self.quantize.tokens_of(self.latent_of(images), schedule)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """f_hat (B, C, h, w) -> images (B, 3, 16h, 16w) in [-1, 1], float32."""
        return self.decoder(self.post_quant_conv(channels_last_on_gpu(latent.to(self.dtype)))).float().clamp(-1, 1)

    def decode_indices(self, indices: list[torch.Tensor], schedule: Schedule) -> torch.Tensor:
        return self.decode(self.quantize.latent(indices, schedule))

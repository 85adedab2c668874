"""Infinity's BSQ-VAE: Flux-style convolutional encoder and decoder without attention.

Parameter names follow the official .pth files ({'vae': state_dict}), which store plain names
such as decoder.conv_in.weight; the module names of the official code (decoder.conv_in.conv.weight)
load too. Generation needs the decoder only; the encoder (images -> latent, for variations of a
given image) is built when the config says the file has one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparvar.errors import SparvarError
from sparvar.kernels.fused import channels_last_on_gpu, group_norm_silu
from sparvar.models.infinity.tiled_decode import BAND_PIXELS, TiledDecoder


@dataclass(frozen=True)
class VAEConfig:
    channels: int  # latent channels (32 or 14)
    ch_mult: tuple[int, ...]  # one level per entry; 2 ** (levels - 1) = patch size
    base: int = 128
    res_blocks: int = 2  # per encoder level; the decoder has one more
    encoder: bool = True  # the official files hold a trained encoder too (the demo's do not)

    @property
    def patch(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(group_norm_silu(x, self.norm1))
        h = self.conv2(group_norm_silu(h, self.norm2))
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))  # in place: one map less at the peak


class Downsample(nn.Module):
    """Stride-2 convolution after padding one pixel right and below (the official asymmetric pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResBlock(channels, channels)
        self.block_2 = ResBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.block_1(x))


class DownLevel(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResBlock(cin if i == 0 else cout, cout) for i in range(blocks))
        # with no blocks the level keeps its input width, and so does its downsampling
        self.downsample = Downsample(cout if blocks else cin) if downsample else None

    def forward(self, x):
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class Encoder(nn.Module):
    """Pixels (B, 3, H, W) -> latent (B, channels, H / patch, W / patch)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base * m for m in cfg.ch_mult]
        cins = [cfg.base] + widths[:-1]  # a level starts at the width the one before ended with
        self.conv_in = nn.Conv2d(3, cfg.base, 3, padding=1)
        last = len(widths) - 1
        self.down = nn.ModuleList(DownLevel(cins[i], widths[i], cfg.res_blocks, i != last) for i in range(len(widths)))
        width = widths[-1] if cfg.res_blocks else cins[-1]
        self.mid = Mid(width)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, cfg.channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(group_norm_silu(self.mid(x), self.norm_out))


class UpLevel(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResBlock(cin if i == 0 else cout, cout) for i in range(blocks))
        self.upsample = Upsample(cout) if upsample else None

    def forward(self, x):
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1])
        # levels are stored fine-first (up.0 is the finest) and run coarse to fine
        cins = [widths[min(i + 1, len(widths) - 1)] for i in range(len(widths))]
        self.up = nn.ModuleList(
            UpLevel(cins[i], widths[i], cfg.res_blocks + 1, upsample=i != 0) for i in range(len(widths))
        )
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(group_norm_silu(x, self.norm_out))


class InfinityVAE(nn.Module):
    """Latent codes (B, c, H, W) -> RGB images (B, 3, H*patch, W*patch) in [-1, 1]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg) if cfg.encoder else None
        self.decoder = Decoder(cfg)

    def init_weights(self, seed: int = 0) -> "InfinityVAE":
        """Random weights (He-scaled convolutions) drawn on the model's device."""
        gen = torch.Generator(self.decoder.conv_in.weight.device).manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif p.dim() == 1:  # GroupNorm scales
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, math.sqrt(2.0 / p[0].numel()), generator=gen)
        return self

    def checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The encoder's (if built) and decoder's tensors of an official VAE file, in this module's
        names: names saved by the official module classes (decoder.conv_in.conv.weight) lose their
        wrapper segment; the quantizer's bit masks are dropped (they follow from the channels)."""
        parts = ("encoder.", "decoder.") if self.encoder is not None else ("decoder.",)
        kept = {k: v for k, v in state.items() if k.startswith(parts)}
        if "decoder.conv_in.conv.weight" in kept:  # module names: every weight sits one wrapper deeper
            kept = {re.sub(r"\.(conv|norm)\.(weight|bias)$", r".\2", k): v for k, v in kept.items()}
        return kept

    def latent_of(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> the continuous latent (B, c, H / patch, W / patch), float32."""
        if self.encoder is None:
            raise SparvarError("this model's VAE file holds no encoder, so it cannot encode images")
        dtype = self.decoder.conv_in.weight.dtype
        return self.encoder(channels_last_on_gpu(images.to(dtype))).float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        dtype = self.decoder.conv_in.weight.dtype
        return self.decoder(channels_last_on_gpu(z.to(dtype))).float().clamp(-1, 1)

    def decode_tiled(self, z: torch.Tensor, band_pixels: int = BAND_PIXELS) -> torch.Tensor:
        """`decode` in bands of rows with the maps in CPU memory (tiled_decode.py): for images whose
        whole decode does not fit on the device."""
        dtype = self.decoder.conv_in.weight.dtype
        out = TiledDecoder(self.decoder, z.device, band_pixels=band_pixels)(z.to(dtype))
        return out.to(z.device).float().clamp(-1, 1)


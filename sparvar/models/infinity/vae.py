"""The decoder of Infinity's BSQ-VAE: a Flux-style convolutional decoder without attention.

Parameter names follow the official .pth files ({'vae': state_dict}), which store plain names
such as decoder.conv_in.weight; `checkpoint.py` also accepts the module names of the official
code (decoder.conv_in.conv.weight). The encoder is not needed for generation and is not built.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparvar.models.fused import channels_last_on_gpu, group_norm_silu


@dataclass(frozen=True)
class VAEConfig:
    channels: int  # latent channels (32 or 14)
    ch_mult: tuple[int, ...]  # one level per entry; 2 ** (levels - 1) = patch size
    base: int = 128
    res_blocks: int = 2  # the decoder has one more per level

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

    @staticmethod
    def checkpoint_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The decoder's tensors of an official VAE file, in this module's names.

        The encoder and quantizer buffers are dropped (generation only decodes); names saved by
        the official module classes (decoder.conv_in.conv.weight) lose their wrapper segment.
        """
        decoder = {k: v for k, v in state.items() if k.startswith("decoder.")}
        if "decoder.conv_in.conv.weight" in decoder:
            decoder = {re.sub(r"\.(conv|norm)\.(weight|bias)$", r".\2", k): v for k, v in decoder.items()}
        return decoder

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        dtype = self.decoder.conv_in.weight.dtype
        return self.decoder(channels_last_on_gpu(z.to(dtype))).float().clamp(-1, 1)


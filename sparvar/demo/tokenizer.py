"""The demo model's tokenizer: a convolutional encoder (4x downsampling), Infinity's multi-scale
bitwise quantiser, and the BSQ-VAE decoder class the pipeline already decodes with (patch 4).

Quantisation follows Infinity: for each scale k, the residual is area-downsampled to the scale's
grid, every channel becomes one bit (its sign), the code (2b - 1) / sqrt(c) is upsampled back
(bilinear) and subtracted. The upsampling and the next-scale inputs are `BitwiseCodes`' own, so
training sees exactly the sums and inputs the sampler loop builds at generation time.

Only the encoder is new here; generation needs the decoder alone (registry's `vae` file).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparvar.models.infinity.bitwise import BitwiseCodes
from sparvar.models.infinity.vae import InfinityVAE, ResBlock, group_norm
from sparvar.schedules import Schedule


class Encoder(nn.Module):
    """Pixels (B, 3, H, W) in [-1, 1] -> latent (B, channels, H / 4, W / 4): residual blocks at
    widths w, 2w, 4w with a stride-2 convolution between them (the decoder's patch 4, mirrored)."""

    def __init__(self, channels: int, width: int = 64):
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        self.conv_in = nn.Conv2d(3, width, 3, padding=1)
        layers, cin = [], width
        for i, w in enumerate(widths):
            layers.append(ResBlock(cin, w))
            if i + 1 < len(widths):
                layers.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
            cin = w
        self.blocks = nn.Sequential(*layers, ResBlock(cin, cin))
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, channels, 3, padding=1)

    def forward(self, x):
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))


@torch.no_grad()
def quantize(
    z: torch.Tensor, schedule: Schedule, codes: BitwiseCodes, flip: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Multi-scale residual bitwise quantisation of latents z (B, c, H, W), H x W the last scale,
    with the next-scale inputs as `codes` (the model's) builds them.

    Returns (bits per scale, each (B, n_k, c) int64; transformer inputs of scales 1.., each
    (B, n_k, c); the quantised latent (B, c, H, W)). `flip` (B,) is a per-sample probability of
    flipping each bit before it is used: the bits of later scales then describe the residual
    left by the corrupted codes, so a transformer trained on them learns to correct its own
    mistakes (Infinity's bitwise self-correction). The returned bits are the unflipped labels.
    """
    summed, residual, labels, inputs = None, z.float(), [], []
    for k, (h, w) in enumerate(schedule.sizes):
        bits = (F.interpolate(residual, size=(h, w), mode="area") > 0).long()  # (B, c, h, w)
        labels.append(bits.flatten(2).transpose(1, 2))
        if flip is not None:
            noise = torch.rand(bits.shape, device=z.device, generator=generator) < flip.view(-1, 1, 1, 1)
            bits = bits ^ noise.long()
        up = codes.accumulate(None, (bits.float() * 2 - 1) / math.sqrt(codes.channels), k, schedule)
        summed = up if summed is None else summed + up
        residual = residual - up
        if k + 1 < len(schedule):
            inputs.append(codes.next_input(summed, k + 1, schedule))
    return labels, inputs, summed


class Tokenizer(nn.Module):
    """Encoder + quantiser + decoder, trained together with a straight-through estimator. Both
    convolutional halves take any image size; the schedule's last grid must be the latent's."""

    def __init__(self, encoder: Encoder, decoder: InfinityVAE, codes: BitwiseCodes):
        super().__init__()
        self.encoder, self.decoder, self.codes = encoder, decoder, codes

    def forward(self, x: torch.Tensor, schedule: Schedule, flip: torch.Tensor | None = None, generator=None):
        """(reconstruction, latent z, quantised latent); gradients pass the quantiser unchanged."""
        z = self.encoder(x).float()
        _, _, quantised = quantize(z, schedule, self.codes, flip, generator)
        straight = z + (quantised - z).detach()
        return self.decoder.decoder(straight.to(x.dtype)), z, quantised

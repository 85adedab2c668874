"""Infinity's multi-scale bitwise codes at inference: bits -> codes -> summed latent -> next input.

A token's bits b map to codes (2b - 1) / sqrt(c) over the c latent channels (unit norm). Codes of
every scale are upsampled (bilinear, i.e. Infinity's trilinear with one frame) to the final latent
size and summed; the next scale's input is that sum resized bilinearly to the next size, as
official Infinity does (its quantiser's `z_interplote_up`, at inference and in training).
The 8B's VAE works at twice the token resolution: 2x2 latent pixels are folded into one token of
4c bits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sparvar.schedules import Schedule


class BitwiseCodes:
    def __init__(self, channels: int, patchify: bool):
        self.channels = channels
        self.patchify = patchify

    @property
    def bits(self) -> int:
        return self.channels * (4 if self.patchify else 1)

    def latent_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Latent grid of a token grid."""
        f = 2 if self.patchify else 1
        return size[0] * f, size[1] * f

    def to_codes(self, bits: torch.Tensor, scale: int, schedule: Schedule) -> torch.Tensor:
        """Sampled bits (B, h*w, bits) in {0, 1} of `scale` -> codes (B, c, H, W) on its latent grid."""
        h, w = schedule.sizes[scale]
        x = (bits.float() * 2 - 1).view(bits.shape[0], h, w, self.bits).permute(0, 3, 1, 2)
        if self.patchify:
            x = F.pixel_shuffle(x, 2)
        return x / math.sqrt(self.channels)

    def accumulate(self, summed: torch.Tensor | None, codes: torch.Tensor, scale: int, schedule: Schedule):
        """Add one scale's codes, upsampled to the final latent grid, to the running sum."""
        final = self.latent_size(schedule.sizes[-1])
        if codes.shape[-2:] != final:
            codes = F.interpolate(codes, size=final, mode="bilinear")
        return codes if summed is None else summed + codes

    def tokens_of(self, latent: torch.Tensor, schedule: Schedule) -> list[torch.Tensor]:
        """The bits (B, h*w, bits) of every scale that describe a latent (B, c, H, W) on the final
        latent grid, as the official VAE's multi-scale quantiser encodes it: each scale takes the
        sign of the residual the scales before it left, area-downsampled to its grid."""
        final = self.latent_size(schedule.sizes[-1])
        if tuple(latent.shape[-2:]) != final:
            raise ValueError(f"a latent of {tuple(latent.shape[-2:])} does not fit scales up to {schedule.sizes[-1]}")
        residual, tokens = latent.float(), []
        for size in schedule.sizes:
            grid = self.latent_size(size)
            bits = (F.interpolate(residual, size=grid, mode="area") if grid != final else residual) > 0
            codes = (bits.float() * 2 - 1) / math.sqrt(self.channels)
            residual = residual - (F.interpolate(codes, size=final, mode="bilinear") if grid != final else codes)
            bits = F.pixel_unshuffle(bits.float(), 2) if self.patchify else bits.float()
            tokens.append(bits.flatten(2).transpose(1, 2).long())
        return tokens

    def next_input(self, summed: torch.Tensor, scale: int, schedule: Schedule) -> torch.Tensor:
        """The running sum seen at the token grid of `scale`, as transformer input (B, h*w, bits)."""
        x = F.interpolate(summed, size=self.latent_size(schedule.sizes[scale]), mode="bilinear")
        if self.patchify:
            x = F.pixel_unshuffle(x, 2)
        return x.flatten(2).transpose(1, 2)

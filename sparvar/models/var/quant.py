"""VAR's multi-scale residual quantiser: token indices <-> the latent f_hat the VQVAE decodes.

Scale k quantises the residual (area-downsampled to its grid) to its nearest codewords; their
embedding, upsampled bicubically to the final grid and refined by a shared Phi convolution, is
added to f_hat and removed from the residual. The sampler loop uses the same pieces to turn
sampled tokens into f_hat and f_hat into the next scale's input (`to_codes`, `accumulate`,
`next_input`); parameter names follow the official VQVAE files (quantize.*).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparvar.schedules import Schedule


def phi_index(scale: int, num_scales: int, num_phis: int) -> int:
    """Which of the shared Phi convolutions refines `scale`: the one whose tick lies nearest to
    scale / (num_scales - 1) in [0, 1].

    Ticks are evenly spaced with a margin of 1/(3n) (n = 4) or 1/(2n) at both ends. Computed in
    numpy float64 as the official code does: with 10 scales, scales 2 and 7 sit exactly halfway
    between two ticks and the rounding of that arithmetic decides (see tests).
    """
    margin = 1 / 3 / num_phis if num_phis == 4 else 1 / 2 / num_phis
    ticks = np.linspace(margin, 1 - margin, num_phis)
    return int(np.argmin(np.abs(ticks - scale / max(num_scales - 1, 1))))


class Phi(nn.Conv2d):
    """phi(h) = (1 - m) h + m conv3x3(h), on a float32 h; the convolution runs in its own dtype."""

    def __init__(self, channels: int, mix: float):
        super().__init__(channels, channels, 3, padding=1)
        self.mix = mix

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.mix) + super().forward(h.to(self.weight.dtype)).float() * self.mix


class SharedPhis(nn.Module):
    """A few Phi convolutions shared by all scales (only there for the official name qresi_ls)."""

    def __init__(self, count: int, channels: int, mix: float):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, mix) for _ in range(count))

    def for_scale(self, scale: int, num_scales: int) -> Phi:
        return self.qresi_ls[phi_index(scale, num_scales, len(self.qresi_ls))]


class ResidualQuantizer(nn.Module):
    def __init__(self, vocab: int, channels: int, phis: int, mix: float, usage_rows: int):
        super().__init__()
        self.channels = channels
        self.quant_resi = SharedPhis(phis, channels, mix)
        # codeword usage per training scale: unused here, kept so the official files load strictly
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(usage_rows, vocab))
        self.embedding = nn.Embedding(vocab, channels)

    # ---- tokens -> latent (the sampler loop's codes interface) ----------------------------------
    def to_codes(self, indices: torch.Tensor, scale: int, schedule: Schedule) -> torch.Tensor:
        """Token indices (B, h*w) of `scale` -> their codewords (B, C, h, w), float32."""
        h, w = schedule.sizes[scale]
        return self.embedding(indices).float().transpose(1, 2).reshape(indices.shape[0], self.channels, h, w)

    def soft_codes(self, probs: torch.Tensor, scale: int, schedule: Schedule) -> torch.Tensor:
        """Mixtures of codewords (B, C, h, w) by per-token probabilities (B, h*w, vocab): the codes
        of VAR's more_smooth sampling."""
        h, w = schedule.sizes[scale]
        mixed = probs.float() @ self.embedding.weight.float()
        return mixed.transpose(1, 2).reshape(probs.shape[0], self.channels, h, w)

    def accumulate(self, summed: torch.Tensor | None, codes: torch.Tensor, scale: int, schedule: Schedule):
        """f_hat += Phi(codes upsampled bicubically to the final grid)."""
        final = schedule.sizes[-1]
        if codes.shape[-2:] != final:
            codes = F.interpolate(codes, size=final, mode="bicubic")
        codes = self.quant_resi.for_scale(scale, len(schedule))(codes)
        return codes if summed is None else summed + codes

    def next_input(self, summed: torch.Tensor, scale: int, schedule: Schedule) -> torch.Tensor:
        """f_hat area-downsampled to the grid of `scale`, as transformer input (B, h*w, C)."""
        return F.interpolate(summed, size=schedule.sizes[scale], mode="area").flatten(2).transpose(1, 2)

    def latent(self, indices: list[torch.Tensor], schedule: Schedule) -> torch.Tensor:
        """f_hat of a whole pyramid of indices (one (B, h*w) tensor per scale)."""
        summed = None
        for k, idx in enumerate(indices):
            summed = self.accumulate(summed, self.to_codes(idx, k, schedule), k, schedule)
        return summed

    # ---- latent -> tokens -----------------------------------------------------------------------
    @staticmethod
    def latent_size(size: tuple[int, int]) -> tuple[int, int]:
        """Latent grid of a token grid: the same (a token is one latent pixel)."""
        return size

    def tokens_of(self, f: torch.Tensor, schedule: Schedule) -> list[torch.Tensor]:
        """Latent f (B, C, H, W) on the final grid -> token indices (B, h*w) per scale."""
        return self.quantize(f, schedule)[0]

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the codeword nearest (L2) to every pixel of z (B, C, h, w) -> (B, h*w)."""
        flat = z.float().flatten(2).transpose(1, 2)
        book = self.embedding.weight.float()
        dist = flat.square().sum(-1, keepdim=True) + book.square().sum(-1) - 2 * flat @ book.T
        return dist.argmin(-1)

    def quantize(self, f: torch.Tensor, schedule: Schedule) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Latent f (B, C, H, W) on the final grid -> (indices per scale, f_hat after all scales)."""
        rest, summed, indices = f.float(), None, []
        for k, size in enumerate(schedule.sizes):
            idx = self.nearest(F.interpolate(rest, size=size, mode="area"))
            step = self.accumulate(None, self.to_codes(idx, k, schedule), k, schedule)
            summed = step if summed is None else summed + step
            rest = rest - step
            indices.append(idx)
        return indices, summed

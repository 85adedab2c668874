"""Infinity's VAE decoder in bands of rows, for images whose whole decode does not fit.

A whole decode keeps a few full-resolution maps and their convolution workspaces on the GPU at
once (about 1.5 GiB for Infinity-8B's decoder at 1024x1024). Here every map lives in (pinned)
CPU memory and each step of the decoder (GroupNorm + SiLU + 3x3 convolution, with the upsampling
or residual add around it) runs over bands of output rows, each band with the one row above and
below it that its convolution reads. GroupNorm needs statistics of the whole map: each step sums
its output per channel (in float64) as its bands come out, and the next step normalises with
those. So the result is the whole decode's, up to the order of the sums.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BAND_PIXELS = 1 << 20  # output pixels (rows x width) per band


class _Map:
    """A full map in `store` memory and the per-channel sums (B, C, 2) float64 of its values."""

    def __init__(self, data: torch.Tensor, sums: torch.Tensor):
        self.data, self.sums = data, sums

    def stats(self, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and 1/std per (item, channel), float32, for `norm`'s groups."""
        b, c, h, w = self.data.shape
        g = norm.num_groups
        s = self.sums.view(b, g, c // g, 2).sum(2) / (c // g * h * w)
        mean, var = s[..., 0], (s[..., 1] - s[..., 0] ** 2).clamp_min(0)
        rstd = torch.rsqrt(var + norm.eps)
        return tuple(t.repeat_interleave(c // g, dim=1).float() for t in (mean, rstd))


class TiledDecoder:
    """Runs `decoder` (vae.Decoder) band by band; maps live on `store`, compute on `device`."""

    def __init__(self, decoder: nn.Module, device, store="cpu", band_pixels: int = BAND_PIXELS):
        self.decoder, self.device, self.store = decoder, torch.device(device), torch.device(store)
        self.pin = self.store.type == "cpu" and self.device.type == "cuda"
        self.band_pixels = band_pixels

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        x = self._step(self._put(z), d.conv_in)
        for block in (d.mid.block_1, d.mid.block_2):
            x = self._res_block(x, block)
        for level in reversed(d.up):
            for block in level.block:
                x = self._res_block(x, block)
            if level.upsample is not None:
                x = self._step(x, level.upsample.conv, upsample=True)
        return self._step(x, d.conv_out, norm=d.norm_out).data

    def _res_block(self, x: _Map, block) -> _Map:
        h = self._step(x, block.conv1, norm=block.norm1)
        return self._step(h, block.conv2, norm=block.norm2, skip=x, shortcut=block.nin_shortcut)

    def _put(self, z: torch.Tensor) -> _Map:
        return _Map(z.to(self.store), torch.zeros(0))

    def _step(self, x: _Map, conv: nn.Conv2d, norm: nn.GroupNorm | None = None, upsample: bool = False,
              skip: _Map | None = None, shortcut: nn.Conv2d | None = None) -> _Map:
        """conv(upsample?(silu(norm(x)))) (+ shortcut(skip)), band by band: a 3x3 convolution with
        padding 1 (or a 1x1 one), stride 1."""
        b, _, h, w = x.data.shape
        f = 2 if upsample else 1
        oh, ow, pad = h * f, w * f, conv.padding[0]
        out = torch.empty((b, conv.out_channels, oh, ow), dtype=x.data.dtype, device=self.store, pin_memory=self.pin)
        sums = torch.zeros(b, conv.out_channels, 2, dtype=torch.float64, device=self.device)
        stats = [s.to(self.device) for s in x.stats(norm)] if norm is not None else None
        rows = max(1, self.band_pixels // ow)
        for r0 in range(0, oh, rows):
            r1 = min(oh, r0 + rows)
            lo, hi = max(0, r0 - pad), min(oh, r1 + pad)  # rows of the convolution's input it reads
            band = x.data[:, :, lo // f : -(-hi // f)].to(self.device, non_blocking=True)
            if stats is not None:
                band = _norm_silu(band, norm, *stats)
            if upsample:
                band = F.interpolate(band, scale_factor=2.0, mode="nearest")[:, :, lo - lo // f * f :][:, :, : hi - lo]
            band = F.pad(band, (0, 0, pad - (r0 - lo), pad - (hi - r1)))  # zeros past the image, as the conv pads
            y = F.conv2d(band, conv.weight, conv.bias, padding=(0, pad))
            if skip is not None:
                res = skip.data[:, :, r0:r1].to(self.device, non_blocking=True)
                y = y + (res if shortcut is None else shortcut(res))
            # per row in float32, then over rows in float64: no float64 copy of the band (1 GiB for
            # a 1024-wide map of 128 channels, which once ran a 16 GiB card out of memory)
            sums[..., 0] += y.sum(3, dtype=torch.float32).double().sum(2)
            sums[..., 1] += torch.linalg.vector_norm(y, dim=3, dtype=torch.float32).double().square().sum(2)
            out[:, :, r0:r1].copy_(y, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the last bands' copies to `out`
        return _Map(out, sums.cpu() if self.store.type == "cpu" else sums)


def _norm_silu(x: torch.Tensor, norm: nn.GroupNorm, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """silu(GroupNorm(x)) with the statistics of the whole map (mean, rstd (B, C))."""
    mul = rstd * norm.weight.float()
    add = norm.bias.float() - mean * mul
    return F.silu(x.float() * mul[:, :, None, None] + add[:, :, None, None]).to(x.dtype)

"""HART's diffusion head: a small MLP denoiser that samples the continuous residual of every
last-scale token, conditioned on the transformer's hidden state there (official `DiffLoss`).

The denoiser is an MLP with adaLN residual blocks (`SimpleMLPAdaLN`, parameter names of the
official `diffloss.net.*`). Sampling is DDPM with learned variances over the cosine schedule of
1000 steps respaced to a few (8 for hart-0.7b), x0 clipped to [-1, 1], the result scaled by 0.6;
guidance mixes the noise predictions eps = (1 + w) eps_c - w eps_u, except at w == 1, where the
official sampler runs without guidance. The schedule's tables are float64 and each step reads
them as float32, as the official sampler does, so that its outputs are reproduced to float noise.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

VAE_SCALE = 0.6  # the official head samples latents / 0.6
TRAIN_STEPS = 1000


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N, dim) of timesteps (N,): cosines, then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequencies).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), the modulation from the condition y."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class Denoiser(nn.Module):
    """(noisy latent x (N, C), timestep t (N,), condition c (N, Cz)) -> (eps, variance value) (N, 2C)."""

    def __init__(self, channels: int, cond_width: int, width: int, depth: int):
        super().__init__()
        self.channels = channels
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_width, width)
        self.input_proj = nn.Linear(channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * channels)

    def forward(self, x, t, c):
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


def respaced_timesteps(steps: int) -> list[int]:
    """The official respacing of 1000 steps to `steps` evenly strided ones (Python's rounding)."""
    stride, at, taken = (TRAIN_STEPS - 1) / (steps - 1) if steps > 1 else 1, 0.0, set()
    for _ in range(steps):  # accumulated, not multiplied: the rounding follows the official sums
        taken.add(round(at))
        at += stride
    return sorted(taken)


class DDPMTables:
    """Per-step coefficients of the respaced cosine schedule, float64 (read as float32)."""

    def __init__(self, steps: int):
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - alpha_bar((i + 1) / TRAIN_STEPS) / alpha_bar(i / TRAIN_STEPS), 0.999)
                          for i in range(TRAIN_STEPS)])
        cumprod = np.cumprod(1.0 - betas)
        self.timesteps = respaced_timesteps(steps)
        last, spaced = 1.0, []
        for i in self.timesteps:
            spaced.append(1 - cumprod[i] / last)
            last = cumprod[i]
        betas = np.array(spaced)
        ac = np.cumprod(1.0 - betas)
        prev = np.append(1.0, ac[:-1])
        variance = betas * (1.0 - prev) / (1.0 - ac)
        self.columns = {
            "recip": np.sqrt(1.0 / ac), "recipm1": np.sqrt(1.0 / ac - 1),
            "coef1": betas * np.sqrt(prev) / (1.0 - ac), "coef2": (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
            "min_log": np.log(np.append(variance[1], variance[1:])), "max_log": np.log(betas),
        }

    def at(self, step: int) -> dict[str, float]:
        """The coefficients of one step as float32 values."""
        return {k: float(np.float32(v[step])) for k, v in self.columns.items()}


class DiffusionHead(nn.Module):
    """The denoiser (as `net`, the official name) and its sampler."""

    def __init__(self, channels: int, cond_width: int, width: int, depth: int, steps: int):
        super().__init__()
        self.net = Denoiser(channels, cond_width, width, depth)
        self.steps = steps
        self._tables: DDPMTables | None = None

    @property
    def tables(self) -> DDPMTables:
        if self._tables is None:
            self._tables = DDPMTables(self.steps)
        return self._tables

    def draw_noise(self, generators: list[torch.Generator], tokens: int, device) -> torch.Tensor:
        return diffusion_noise(generators, self.steps, tokens, self.net.channels, device)

    @torch.inference_mode()
    def sample(self, cond: torch.Tensor, weight: float, noise: torch.Tensor) -> torch.Tensor:
        """Residuals (N, C) of the N rows of `cond` (their unconditional rows after them when
        guided, 2N rows); noise (steps + 1, N, C) from `draw_noise`."""
        dtype = self.net.input_proj.weight.dtype
        guided = cond.shape[0] == 2 * noise.shape[1] and weight != 1.0
        if not guided:
            cond = cond[: noise.shape[1]]
        cond = cond.to(dtype)
        channels, tables = self.net.channels, self.tables
        x = noise[0].float()
        for i in reversed(range(self.steps)):
            t = torch.full((cond.shape[0],), tables.timesteps[i], device=cond.device, dtype=torch.long)
            out = self.net((torch.cat([x, x]) if guided else x).to(dtype), t, cond).float()
            if guided:
                (eps, var), (eps_u, _) = out[: len(x)].split(channels, 1), out[len(x):].split(channels, 1)
                eps = eps * (1 + weight) - weight * eps_u
            else:
                eps, var = out.split(channels, 1)
            c = tables.at(i)
            frac = (var + 1) / 2
            log_variance = frac * c["max_log"] + (1 - frac) * c["min_log"]
            x0 = (c["recip"] * x - c["recipm1"] * eps).clamp(-1, 1)
            mean = c["coef1"] * x0 + c["coef2"] * x
            x = mean + torch.exp(0.5 * log_variance) * noise[self.steps - i] if i > 0 else mean
        return x * VAE_SCALE


def diffusion_noise(generators: list[torch.Generator], steps: int, tokens: int, channels: int, device) -> torch.Tensor:
    """Noise (steps + 1, B * tokens, channels) of the B items, rows item-major: the start, then one
    draw per step (the last one unused, as in the official sampler). Item b's comes from a
    generator seeded from its own seed, so it does not depend on what the token sampler drew."""
    per_item = []
    for g in generators:
        seed = (g.initial_seed() * 6364136223846793005 + 1442695040888963407) % 2**63
        own = torch.Generator(g.device).manual_seed(seed)
        per_item.append(torch.randn((steps + 1, tokens, channels), generator=own, device=device))
    return torch.cat(per_item, dim=1)

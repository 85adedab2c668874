"""Fidelity of sparse-attention images to the dense ones: PSNR, SSIM, and LPIPS when it can run.

Images are compared as uint8 RGB (what the user sees), scaled to [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> (N, 3, H, W) float64 in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2) / 255.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (N, C, H, W) images in [0, 1]; identical images give inf."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03), mean
    over channels and over the window positions inside the image."""
    a, b = a.double(), b.double()
    c = a.shape[1]
    window = _gaussian_window().to(a.device)[None, None].expand(c, 1, -1, -1)
    blur = lambda x: F.conv2d(x, window, groups=c)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def lpips_model(device) -> tuple[object | None, str]:
    """LPIPS (AlexNet) if the `lpips` package and AlexNet's weights are on disk; else (None, why).

    Nothing is downloaded: the backbone must already sit in torch's hub cache.
    """
    try:
        import lpips
    except ImportError:
        return None, "LPIPS skipped: the lpips package is not installed (pip install lpips)"
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(cache.glob("alexnet-owt-*.pth")):
        return None, f"LPIPS skipped: AlexNet's weights (alexnet-owt-*.pth) are not in {cache}"
    return lpips.LPIPS(net="alex", verbose=False).to(device).eval(), "LPIPS: AlexNet"


@torch.no_grad()
def lpips_distance(model, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS of (N, 3, H, W) images in [0, 1]."""
    device = next(model.parameters()).device
    return model(a.float().to(device) * 2 - 1, b.float().to(device) * 2 - 1).flatten().double().cpu()

"""The VAE decoder in bands (models/infinity/tiled_decode.py) equals the whole decode."""

from __future__ import annotations

import pytest
import torch

from sparvar.models.infinity.vae import InfinityVAE, VAEConfig
from sparvar.models.registry import MODELS
from sparvar.loading import load_pipeline


@pytest.mark.parametrize("model", ["infinity-2b", "infinity-8b"])  # the d32 and the d14-patchify decoders
@pytest.mark.parametrize("latent,band", [((5, 7), 300), ((3, 2), 50), ((4, 4), 1 << 20)])
@torch.inference_mode()
@pytest.mark.slow
def test_tiled_decode_equals_the_whole_decode(model, latent, band):
    """Random weights of the official layout at a narrower base width; bands of a few rows (one
    row down to the whole image), latent sides that split no band evenly."""
    cfg = MODELS[model].vae
    vae = InfinityVAE(VAEConfig(cfg.channels, cfg.ch_mult, base=32, encoder=False)).init_weights(0).eval()
    z = torch.randn(2, cfg.channels, *latent, generator=torch.Generator().manual_seed(1)) * 0.3
    whole, tiled = vae.decode(z), vae.decode_tiled(z, band_pixels=band)
    assert tiled.shape == whole.shape == (2, 3, latent[0] * cfg.patch, latent[1] * cfg.patch)
    assert ((tiled - whole).norm() / whole.norm()) < 1e-5
    assert (tiled - whole).abs().max() < 1e-4


@pytest.mark.slow
def test_pipeline_decodes_in_tiles_when_asked():
    pipe = load_pipeline("infinity-tiny", device="cpu", random_weights=True)
    whole = pipe(["a boat"], seed=0, progress=False)
    tiled = pipe(["a boat"], seed=0, tiled_decode=True, progress=False)
    assert (whole.pixels - tiled.pixels).norm() / whole.pixels.norm() < 1e-4  # a random decoder amplifies float noise

"""The modules' state dicts have exactly the official checkpoints' names and shapes."""

import math
import re

import pytest
import torch

from sparvar import create_model
from sparvar.models.infinity.vae import InfinityVAE, VAEConfig
from sparvar.models.registry import MODELS
from sparvar.models.var.vqvae import VQVAE


@pytest.mark.parametrize(
    "name,elements", [("infinity-2b", 2_204_697_152), ("infinity-8b", 8_376_082_128)]
)
def test_transformer_layout_and_element_count(name, elements, official_layouts):
    model = create_model(name, device="meta")
    mine = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert mine == official_layouts[name]
    assert sum(v.numel() for v in model.state_dict().values()) == elements


@pytest.mark.parametrize(
    "name,model", [("infinity-vae-d32", "infinity-2b"), ("infinity-vae-d14-patchify", "infinity-8b")]
)
def test_vae_encoder_and_decoder_layout(name, model, official_layouts):
    with torch.device("meta"):
        vae = InfinityVAE(MODELS[model].vae)
    mine = {k: list(v.shape) for k, v in vae.state_dict().items()}
    # official module names wrap convs and norms (decoder.conv_in.conv.weight); files drop that
    official = {
        re.sub(r"\.(conv|norm)\.(weight|bias)$", r".\2", k): v
        for k, v in official_layouts[name].items()
        if k.startswith(("encoder.", "decoder."))
    }
    assert any(k.startswith("encoder.") for k in official)
    assert mine == official


def test_vae_patch_sizes():
    assert MODELS["infinity-2b"].vae.patch == 16 and MODELS["infinity-8b"].vae.patch == 8
    assert VAEConfig(4, (1, 2), base=32).patch == 2


def _elements(layout: dict) -> int:
    return sum(math.prod(shape) for shape in layout.values())


@pytest.mark.parametrize("name", ["var-d16", "var-d30", "var-d36"])
def test_var_transformer_layout_and_element_count(name, official_layouts):
    model = create_model(name, device="meta")
    mine = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert mine == official_layouts[name]  # buffers lvl_1L and attn_bias_for_masking included
    assert sum(v.numel() for v in model.state_dict().values()) == _elements(official_layouts[name])


def test_var_vqvae_layout_and_element_count(official_layouts):
    assert MODELS["var-d16"].vae == MODELS["var-d36"].vae  # one VAE file serves 256 and 512 px
    with torch.device("meta"):
        vae = VQVAE(MODELS["var-d16"].vae)
    mine = {k: list(v.shape) for k, v in vae.state_dict().items()}
    assert mine == official_layouts["var-vqvae"]  # encoder, decoder, quantiser, quant convs
    assert sum(v.numel() for v in vae.state_dict().values()) == _elements(official_layouts["var-vqvae"])


@pytest.mark.parametrize("depth", [16, 20, 24, 30, 36])
def test_var_depths(depth):
    cfg = MODELS[f"var-d{depth}"].transformer
    assert (cfg.width, cfg.heads, cfg.head_dim, cfg.ffn_hidden) == (64 * depth, depth, 64, 256 * depth)
    assert cfg.shared_aln == (depth == 36) and cfg.schedule.total == (2240 if depth == 36 else 680)

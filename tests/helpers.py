"""Small random models for tests: built directly so any config (patchified, class-conditional) works."""

from dataclasses import replace

import torch

from sparvar.models.infinity.text import TextEncoder
from sparvar.models.infinity.transformer import InfinityTransformer
from sparvar.models.infinity.vae import InfinityVAE
from sparvar.models.registry import MODELS
from sparvar.pipeline import Pipeline


def tiny_pipeline(seed: int = 0, **overrides) -> Pipeline:
    """infinity-tiny (text-conditioned) with config fields overridden, random weights, on the CPU."""
    spec = MODELS["infinity-tiny"]
    spec = replace(spec, transformer=replace(spec.transformer, **overrides))
    transformer = InfinityTransformer(spec.transformer).init_weights(seed).eval()
    vae = InfinityVAE(spec.vae).init_weights(seed).eval()
    text = None
    if spec.transformer.text_conditioned:
        text = TextEncoder.random(spec.text, "cpu", torch.float32, seed, spec.transformer.text_max_len)
    else:
        spec = replace(spec, text=None, classes=tuple(f"c{i}" for i in range(spec.transformer.num_classes)))
    return Pipeline(spec, transformer, vae, text)

"""Small random models for tests: built directly so any config (patchified, class-conditional) works."""

from dataclasses import replace

import torch

from sparvar.models.infinity.text import TextEncoder
from sparvar.models.infinity.transformer import InfinityTransformer
from sparvar.models.infinity.vae import InfinityVAE
from sparvar.models.registry import MODELS
from sparvar.models.var.transformer import VARTransformer
from sparvar.models.var.vqvae import VQVAE
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


def var_pipeline(seed: int = 0, **overrides) -> Pipeline:
    """var-tiny (VAR's 10 scales, 32x32 pixels) with config fields overridden, random weights, on the CPU."""
    spec = MODELS["var-tiny"]
    spec = replace(spec, transformer=replace(spec.transformer, **overrides))
    transformer = VARTransformer(spec.transformer).init_weights(seed).eval()
    return Pipeline(spec, transformer, VQVAE(spec.vae).init_weights(seed).eval())


@torch.no_grad()  # the sampled tokens are inference tensors
def teacher_forced_logits(pipe: Pipeline, conditions, schedule, tokens, cfg: float) -> torch.Tensor:
    """Guided logits of one full forward pass (block-causal mask) over the sequence rebuilt from
    the sampled tokens: what the KV-cache loop must have produced scale by scale."""
    model, codes = pipe.transformer, pipe.codes
    weights = [model.guidance_weight(k, len(schedule), cfg) for k in range(len(schedule))]
    guidance = any(w != 0 for w in weights)
    summed, inputs = None, []
    for k, drawn in enumerate(tokens):
        summed = codes.accumulate(summed, codes.to_codes(drawn, k, schedule), k, schedule)
        if k + 1 < len(schedule):
            x = codes.next_input(summed, k + 1, schedule)
            inputs.append(torch.cat([x, x]) if guidance else x)
    logits = model.forward_full(inputs, schedule, model.prepare(pipe.encode(conditions), guidance))
    if not guidance:
        return logits
    cond, uncond = logits.chunk(2)
    grids = [h * w for h, w in schedule.sizes]  # HART's logits of scale 0 are its text's last position's
    w = torch.repeat_interleave(torch.tensor(weights), torch.tensor(grids))
    return cond + w.view(1, -1, *[1] * (cond.dim() - 2)) * (cond - uncond)

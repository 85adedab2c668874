"""Building pipelines: a model's files (or random weights) into a ready `Pipeline`.

    pipe = sparvar.load_pipeline("infinity-2b", weights=..., vae=..., text_encoder=...)

Official checkpoints load from local paths as they are (`sparvar models` lists which file goes
where); FP8 weights are quantised and offloaded blocks packed as they load. The sampler loop
itself is pipeline.py.
"""

from __future__ import annotations

import torch

from sparvar.checkpoint import load_strict, read_state_dict
from sparvar.errors import SparvarError
from sparvar.models.fp8 import quantize_blocks
from sparvar.models.registry import ModelSpec, create_model, create_vae, get_spec, guess_model
from sparvar.offload import BlockStream, OffloadedModule, layer_stack, move_except_blocks
from sparvar.pipeline import Pipeline
from sparvar.validation import check_offload, check_precision, default_dtype, resolve_device


def _bundled(spec: ModelSpec, option: str) -> str | None:
    """The weights shipped in the package for `option`, if the model has any."""
    path = spec.bundled_path(option)
    if path is not None and not path.is_file():
        raise SparvarError(f"{spec.name}'s bundled weights {path} are missing: reinstall sparvar, or train them "
                           "(sparvar train-demo, docs/demo_model.md)")
    return None if path is None else str(path)


def load_pipeline(
    model: str | ModelSpec = "infinity-demo",
    weights: str | None = None,
    vae: str | None = None,
    text_encoder: str | None = None,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | None = None,
    random_weights: bool = False,
    seed: int = 0,
    precision: str = "auto",
    offload: str | None = None,
) -> Pipeline:
    """A ready pipeline for a named model (or a ModelSpec: a registered one at other sizes).

    Official checkpoints load from local paths (`sparvar models` lists which file goes where);
    the demo model loads the weights shipped in the package unless others are given; models
    that need no files build the parts not given with random weights (seeded).
    `random_weights=True` builds every part with random weights (benchmarks, tests).
    bf16 on GPU, float32 on CPU unless `dtype` says otherwise.
    precision "fp8": the transformer blocks' projections (`Family.fp8_layers`) run as FP8 matmuls
    (models/fp8.py), their weights quantised as they load (random weights are drawn in `dtype` first, so an FP8 pipeline
    holds the quantised weights of the same-seeded full-precision one).
    offload "text": the text encoder waits in CPU memory between encodings; "blocks": that, and
    the transformer blocks stream from CPU memory (offload.py; random weights are drawn on the
    device first).
    """
    spec = get_spec(model)
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    check_precision(precision, device, dtype)
    check_offload(offload, spec)
    family = spec.family
    if family.configure is not None and not random_weights:
        spec, weights, vae = family.configure(spec, weights, vae)
    if not random_weights:
        weights = weights or _bundled(spec, "--weights")
        vae = vae or _bundled(spec, "--vae")
        text_encoder = text_encoder or _bundled(spec, "--text-encoder")
        given = {"--weights": weights, "--vae": vae, "--text-encoder": text_encoder}
        missing = [opt for opt in spec.files if given[opt] is None]
        if missing:
            raise SparvarError(f"{spec.name} needs " + ", ".join(f"{opt} ({spec.files[opt]})" for opt in missing))

    if weights is None or random_weights:
        transformer = create_model(spec, device, dtype, seed)
        if precision == "fp8":
            quantize_blocks(transformer, family.fp8_layers)
        if offload == "blocks":
            transformer.stream = BlockStream(transformer.blocks, device)
    else:
        transformer = create_model(spec, "meta", dtype)
        state = read_state_dict(weights)
        other = guess_model(state)
        hint = f"It looks like a checkpoint of {other}; pass --model {other}." if other and other != spec.name else ""
        load_strict(transformer, transformer.checkpoint_state(state), f"{spec.name}'s transformer ({weights})", hint)
        transformer = transformer.to(dtype=dtype).eval()
        streamed = offload == "blocks"
        if precision == "fp8":  # layer by layer onto the device, so only FP8 weights pile up there
            quantize_blocks(transformer, family.fp8_layers, "cpu" if streamed else device)
        if streamed:
            move_except_blocks(transformer, device)
            transformer.stream = BlockStream(transformer.blocks, device)
        else:
            transformer = transformer.to(device=device)

    if vae is None or random_weights:
        decoder = create_vae(spec, device, dtype, seed)
    else:
        decoder = create_vae(spec, "meta", dtype)
        state = decoder.checkpoint_state(read_state_dict(vae))
        load_strict(decoder, state, f"{spec.name}'s VAE ({vae})")
        decoder = decoder.to(device=device, dtype=dtype).eval()

    encoder = None
    if spec.text_conditioned:
        if text_encoder is None or random_weights:
            encoder = family.text_encoder.random(spec.text, device, dtype, seed, spec.transformer.text_max_len)
        else:
            encoder = family.text_encoder.load(text_encoder, spec.text, device, dtype, spec.transformer.text_max_len)
    text_offload = (OffloadedModule(encoder.model, device, layer_stack(encoder.model))
                    if encoder is not None and offload else None)
    return Pipeline(spec, transformer, decoder, encoder, text_offload, precision, offload)

"""What is checked before any work, in one place: a generation against a model and a machine.

`validate` checks one generation: its conditions (prompts or classes), its GenerationConfig
resolved for the model (generation.py), the source pictures of an edit (read here), how the model
is loaded (precision, offload) and what the device must offer (CUDA graphs, memory for the KV
cache). The command line calls it before
the model loads (for a batch job: the job's settings at its batch size, which every batch then
runs), and so do eval and analyze; the web page and `Pipeline.__call__` call it per generation.
The loop (`Pipeline.generate`) trusts what it returns. `load_pipeline` checks its own device,
precision and offload with the same functions, for callers that load without generating.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from sparvar.errors import SparvarError
from sparvar.generation import GenerationConfig
from sparvar.models.registry import ModelSpec
from sparvar.options import read_picture


def resolve_device(device: str | torch.device | None) -> torch.device:
    """auto (or None): the GPU when there is one, else the CPU; cpu, cuda and cuda:N are checked
    against this machine."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise SparvarError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise SparvarError(f"sparvar runs on cpu or cuda, not {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SparvarError("CUDA was asked for but this machine has no usable CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SparvarError(f"{device} asked for but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU, float32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


RANDOM_CLASS = "random"  # a condition that asks for a random class (the official label_B None)


def labels_of(spec: ModelSpec, conditions: Sequence) -> list[int | None]:
    """Class indices of a class-conditional model's conditions: indices or digit strings; None (or
    "random") where a random class is to be drawn."""
    labels = []
    for c in conditions:
        if c is None or c == RANDOM_CLASS:
            labels.append(None)
            continue
        if isinstance(c, str) and c.isdigit():
            c = int(c)
        if not isinstance(c, int) or not 0 <= c < spec.num_classes:
            raise SparvarError(
                f"{spec.name} is class-conditional: give class indices 0..{spec.num_classes - 1}, or {RANDOM_CLASS!r}, "
                f"not {c!r}"
            )
        labels.append(c)
    return labels


def check_conditions(spec: ModelSpec, conditions: Sequence, sampler: str = "sparvar") -> None:
    """Prompts for a text model, classes for the others: a bad one fails before any work."""
    if spec.text_conditioned:
        if not all(isinstance(c, str) for c in conditions):
            raise SparvarError(f"{spec.name} is text-conditioned: give prompts (strings)")
        return
    labels = labels_of(spec, conditions)
    if sampler == "official" and None in labels and any(label is not None for label in labels):
        raise SparvarError("the official sampler draws random classes for the whole batch: ask for all or none")


PRECISIONS = ("auto", "fp8")
OFFLOADS = (None, "text", "blocks")


def check_offload(offload: str | None, spec: ModelSpec) -> None:
    """An offload load_pipeline knows, of a part the model has."""
    if offload not in OFFLOADS:
        raise SparvarError(f"unknown offload {offload!r}; choose text or blocks, or leave it out")
    if offload == "text" and not spec.text_conditioned:
        raise SparvarError(f"offload 'text': {spec.name} has no text encoder")


def check_precision(precision: str, device: torch.device, dtype: torch.dtype) -> None:
    """`auto`: the matmuls in `dtype`; `fp8`: the blocks' in FP8, where the machine has FP8 matmuls."""
    if precision not in PRECISIONS:
        raise SparvarError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "fp8":
        return
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 9):
            raise SparvarError(f"precision fp8 needs a GPU with FP8 matmuls (Ada or Hopper, compute capability "
                               f"8.9+); {torch.cuda.get_device_name(device)} has none")
        if dtype != torch.bfloat16:
            raise SparvarError(f"precision fp8 runs with dtype bfloat16 on the GPU, not {dtype}")


def source_images(spec: ModelSpec, conditions: Sequence, config: GenerationConfig) -> GenerationConfig:
    """`config` with its source pictures read: a model that edits needs one, or one per condition
    (a model that edits nothing refuses them when the config is resolved)."""
    if not spec.family.source_image:
        return config
    if config.image is None:
        raise SparvarError(f"{spec.name} edits a picture: give it one (image= in Python, --image FILE on the command "
                           "line)")
    if len(config.image) not in (1, len(conditions)):
        raise SparvarError(f"{len(config.image)} source pictures for {len(conditions)} prompts: give one, or one per "
                           "prompt")
    return replace(config, image=tuple(read_picture(i) if isinstance(i, (str, Path)) else i for i in config.image))


def validate(spec: ModelSpec, conditions: Sequence, config: GenerationConfig, device: torch.device,
             dtype: torch.dtype, precision: str = "auto", offload: str | None = None,
             batch: int | None = None) -> GenerationConfig:
    """`config` resolved for `spec` (its defaults filled in, its schedule chosen), once the
    generation of `conditions` holds against the model and a `device` running it in `dtype`
    with `precision` and `offload`; `batch`: images per forward pass (default: all of them)."""
    if not conditions:
        raise SparvarError("nothing to generate: give at least one prompt or class")
    check_conditions(spec, conditions, config.sampler)
    check_precision(precision, device, dtype)
    check_offload(offload, spec)
    resolved = source_images(spec, conditions, config.resolved(spec))
    if resolved.cuda_graphs and offload == "blocks":
        raise SparvarError("offload 'blocks' streams the weights through the GPU: run it without CUDA graphs")
    resolved.check_device(spec, device, dtype, batch or len(conditions))
    resolved.seeds(len(conditions))
    return resolved

"""Importing the official Infinity and VAR code from local clones, with stand-ins for what a CPU
machine lacks. Nothing of the official code is copied here: the clones are put on sys.path.

Stand-ins (each one documented in tools/parity/README.md):
- `flash_attn`: its two attention calls, served by SDPA (per sequence for the varlen one);
- `timm`, `torchvision`, `cv2`, `pandas`, `yaml`, where not installed: imported by the official
  modules for training, logging or image I/O that the harness never calls; only the names used
  at import exist;
- float32 comparisons: Infinity's cross-attention casts float32 inputs to bf16 before the flash
  call; `exact_cross_attention()` makes that cast a no-op in its module, so both sides compute
  in float32;
- `torch.compile`d norms (`fused_norm=True`, needed because the non-fused path drops the scale
  index under the KV cache) run eagerly: the model module gets the functions they wrap.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


def _flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
    """flash_attn's (B, L, H, D) layout over SDPA."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale, is_causal=causal
    )
    return out.transpose(1, 2)


def _flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                                     dropout_p=0.0, softmax_scale=None, **_):
    """Packed sequences q (Nq, H, D), kv (Nk, 2, H, D): SDPA over each sequence on its own."""
    outs = []
    for i in range(len(cu_seqlens_q) - 1):
        qi = q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]].transpose(0, 1)
        ki, vi = kv[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].permute(1, 2, 0, 3)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, scale=softmax_scale).transpose(0, 1))
    return torch.cat(outs)


class _DropPath(nn.Module):
    """Drop path is the identity at inference; the harness never trains."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x):
        return x


class _UnusedLoss(nn.Module):
    """A training loss the official modules import and the harness never calls."""


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__path__ = []  # a package, so submodule imports of the stand-in resolve
    return mod


def _install_stand_ins() -> None:
    # transformers probes for flash_attn, torchvision and timm when its T5 loads: before any stand-in exists
    from transformers import AutoTokenizer, T5EncoderModel  # noqa: F401

    flash = _module("flash_attn", flash_attn_func=_flash_attn_func,
                    flash_attn_varlen_kvpacked_func=_flash_attn_varlen_kvpacked_func)
    layers = _module("timm.models.layers", DropPath=_DropPath, drop_path=lambda x, *a, **k: x,
                     trunc_normal_=nn.init.trunc_normal_)
    timm_models = _module("timm.models", register_model=lambda fn: fn, layers=layers)
    timm = _module("timm", models=timm_models, loss=_module("timm.loss", SoftTargetCrossEntropy=_UnusedLoss))
    tv_functional = _module("torchvision.transforms.functional", to_tensor=None)
    tv_transforms = _module("torchvision.transforms", functional=tv_functional)
    stand_ins = {
        "flash_attn": flash, "timm": timm, "timm.models": timm_models, "timm.models.layers": layers,
        "timm.loss": timm.loss, "torchvision": _module("torchvision", transforms=tv_transforms),
        "torchvision.transforms": tv_transforms, "torchvision.transforms.functional": tv_functional,
        "cv2": _module("cv2"), "pandas": _module("pandas"), "yaml": _module("yaml"),
    }
    missing = {name for name in stand_ins if "." not in name and name not in sys.modules
               and (name == "flash_attn" or importlib.util.find_spec(name) is None)}  # real packages win
    for name, mod in stand_ins.items():
        if name.split(".")[0] in missing:
            sys.modules[name] = mod


def add_clone(path: str | Path, marker: str) -> Path:
    """Put a clone on sys.path after checking it is the repository asked for."""
    root = Path(path).expanduser().resolve()
    if not (root / marker).is_file():
        raise SystemExit(f"{root} does not look like the right clone: {marker} is missing")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def load_infinity(path: str | Path):
    """The official `infinity` package and its `tools.run_infinity` helpers."""
    _install_stand_ins()
    add_clone(path, "infinity/models/infinity.py")
    import infinity.models.basic as basic
    import infinity.models.bsq_vae.vae as bsq_vae
    import infinity.models.infinity as model

    for name in ("fused_ada_layer_norm", "fused_ada_rms_norm"):  # torch.compile'd: run them eagerly
        setattr(model, name, getattr(model, name).__wrapped__)
    import infinity.utils.dynamic_resolution as dynamic_resolution
    import tools.run_infinity as run_infinity

    return types.SimpleNamespace(basic=basic, model=model, bsq_vae=bsq_vae, run=run_infinity,
                                 dynamic_resolution=dynamic_resolution)


def load_var(path: str | Path):
    """The official VAR `models` package (its own flash/xformers imports are optional)."""
    _install_stand_ins()
    root = add_clone(path, "models/var.py")
    import models
    import models.vqvae as vqvae

    if not Path(models.__file__).resolve().is_relative_to(root):
        raise SystemExit(f"`models` was imported from {models.__file__}, not from {root}")
    return types.SimpleNamespace(models=models, vqvae=vqvae, var=sys.modules["models.var"])


class _Float32As(types.ModuleType):
    """torch, except that `bfloat16` names float32 (see exact_cross_attention)."""

    bfloat16 = torch.float32

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def exact_cross_attention(basic):
    """Run Infinity's cross-attention in float32: its `.to(torch.bfloat16)` becomes a no-op."""
    real = basic.torch
    basic.torch = _Float32As("torch")
    try:
        yield
    finally:
        basic.torch = real


@contextlib.contextmanager
def cuda_calls_stay_on_cpu():
    """`Tensor.cuda()` returns the tensor itself (the official prompt encoder moves ids to CUDA)."""
    real = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = real


@contextlib.contextmanager
def shrunk(module, name: str, **fixed):
    """Build `module.name` with some constructor arguments replaced: keyword arguments, or fields
    of the one argparse namespace it takes. The official constructors hard-code full-size widths,
    and fixtures must be small."""
    real = getattr(module, name)

    def build(*args, **kwargs):
        if len(args) == 1 and isinstance(args[0], argparse.Namespace):
            return real(argparse.Namespace(**{**vars(args[0]), **fixed}))
        return real(*args, **{**kwargs, **fixed})

    setattr(module, name, build)
    try:
        yield
    finally:
        setattr(module, name, real)

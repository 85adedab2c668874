"""Importing the official Infinity, VAR, HART and VAREdit code from local clones, for the parity
harness (tools/parity) and the benchmark's official mode (`sparvar bench e2e --official PATH`:
`RUNNERS`, one per official repository), with stand-ins for what this machine may lack. Nothing of the official code is copied here: the clones
are put on sys.path.

Stand-ins (each one documented in tools/parity/README.md):
- `flash_attn`: its two attention calls, served by SDPA (per sequence for the varlen one);
- `timm`, `torchvision`, `cv2`, `pandas`, `yaml`, where not installed: imported by the official
  modules for training, logging or image I/O that the harness never calls; only the names used
  at import exist, and torchvision's `to_tensor` for the uint8 pictures VAREdit's transform gives it;
- `pytz`, where not installed (the GPU machine lacks it): the official code asks it for one zone,
  Asia/Shanghai, to stamp its log lines; the stand-in answers with that zone's fixed UTC+8;
- float32 comparisons: Infinity's cross-attention casts float32 inputs to bf16 before the flash
  call; `exact_cross_attention()` makes that cast a no-op in its module, so both sides compute
  in float32;
- `torch.compile`d norms (`fused_norm=True`, needed because the non-fused path drops the scale
  index under the KV cache) run eagerly: the model module gets the functions they wrap;
- HART's CUDA extension `hart_backend` (its RMSNorm kernel in PyTorch) and, where not installed,
  `scipy.stats.truncnorm` (built by its constructor for training-time masking, never sampled here);
  its model classes call transformers' `post_init()`, which transformers >= 5 needs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import importlib.util
import sys
import types
from pathlib import Path
from unittest import mock

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


def _to_tensor(picture):
    """torchvision's to_tensor for an (H, W, 3) uint8 array, as VAREdit's image transform calls it:
    (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(picture).permute(2, 0, 1).float().div(255)


class _DropPath(nn.Module):
    """Drop path is the identity at inference; the harness never trains."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x):
        return x


class _UnusedLoss(nn.Module):
    """A training loss the official modules import and the harness never calls."""


def _shanghai(name: str) -> datetime.tzinfo:
    """pytz.timezone for the one zone the official code names (UTC+8 all year: no summer time)."""
    if name != "Asia/Shanghai":
        raise KeyError(f"the pytz stand-in knows only Asia/Shanghai, not {name!r}")
    return datetime.timezone(datetime.timedelta(hours=8), name)


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
    tv_functional = _module("torchvision.transforms.functional", to_tensor=_to_tensor)
    tv_transforms = _module("torchvision.transforms", functional=tv_functional)
    stand_ins = {
        "flash_attn": flash, "timm": timm, "timm.models": timm_models, "timm.models.layers": layers,
        "timm.loss": timm.loss, "torchvision": _module("torchvision", transforms=tv_transforms),
        "torchvision.transforms": tv_transforms, "torchvision.transforms.functional": tv_functional,
        "cv2": _module("cv2"), "pandas": _module("pandas"), "yaml": _module("yaml"),
        "pytz": _module("pytz", timezone=_shanghai),
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
        compiled = getattr(model, name)  # a second load finds them unwrapped already
        setattr(model, name, getattr(compiled, "__wrapped__", compiled))
    import infinity.utils.dynamic_resolution as dynamic_resolution
    import tools.run_infinity as run_infinity

    return types.SimpleNamespace(basic=basic, model=model, bsq_vae=bsq_vae, run=run_infinity,
                                 dynamic_resolution=dynamic_resolution)


def load_varedit(path: str | Path):
    """The official VAREdit code: its `infinity` package (Infinity's, with the edit's source), its
    `tools.run_infinity` helpers and `infer` (the picture transform). Its package has Infinity's
    name: one process imports one of the two."""
    add_clone(path, "infer.py")
    off = load_infinity(path)
    import infer

    off.infer = infer
    return off


def load_var(path: str | Path):
    """The official VAR `models` package (its own flash/xformers imports are optional)."""
    _install_stand_ins()
    root = add_clone(path, "models/var.py")
    import models
    import models.vqvae as vqvae

    if not Path(models.__file__).resolve().is_relative_to(root):
        raise SystemExit(f"`models` was imported from {models.__file__}, not from {root}")
    return types.SimpleNamespace(models=models, vqvae=vqvae, var=sys.modules["models.var"])


def _hart_rms_norm(out, x, weight, eps, use_quant=False):
    """hart_backend's fused RMSNorm kernel in PyTorch: x / rms(x) in float32, cast back, times weight."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    out.copy_(normed.to(x.dtype) * weight)


class _TruncNorm:
    """scipy.stats.truncnorm as HART's constructor uses it: built, and sampled only in training."""

    def __init__(self, *args, **kwargs):
        pass


def load_hart(path: str | Path):
    """The official `hart` package, with stand-ins for its CUDA extension (`hart_backend`: only its
    RMSNorm kernel runs at inference; the fused RoPE kernels sit in code the model never calls) and,
    where scipy is not installed, for the truncated normal of its training-time masking."""
    _install_stand_ins()
    root = add_clone(path, "hart/modules/models/transformer/hart_transformer_t2i.py")
    kernels = _module("hart_backend.fused_kernels", rms_norm=_hart_rms_norm)
    sys.modules.setdefault("hart_backend", _module("hart_backend", fused_kernels=kernels))
    sys.modules.setdefault("hart_backend.fused_kernels", kernels)
    if importlib.util.find_spec("scipy") is None:
        stats = _module("scipy.stats", truncnorm=_TruncNorm)
        sys.modules["scipy"], sys.modules["scipy.stats"] = _module("scipy", stats=stats), stats
    import hart.modules.diffusion.diffloss as diffloss
    import hart.modules.diffusion.gaussian_diffusion as gaussian_diffusion
    import hart.modules.models.autoencoder as autoencoder
    import hart.modules.models.autoencoder.hart_autoencoder as hart_autoencoder
    import hart.modules.models.transformer.hart_transformer_t2i as transformer
    import hart.modules.networks.basic_hart as basic
    import hart.utils as utils

    if not Path(transformer.__file__).resolve().is_relative_to(root):
        raise SystemExit(f"`hart` was imported from {transformer.__file__}, not from {root}")
    from hart.modules.losses.vqgan.discriminator import NLayerDiscriminator

    for cls in (transformer.HARTForT2I, hart_autoencoder.HARTAutoEncoder, autoencoder.HARTAutoEncoderWithDisc,
                NLayerDiscriminator):
        _calls_post_init(cls)
    return types.SimpleNamespace(transformer=transformer, autoencoder=autoencoder, hart_autoencoder=hart_autoencoder,
                                 basic=basic, diffloss=diffloss, gaussian_diffusion=gaussian_diffusion, utils=utils)


def _calls_post_init(cls) -> None:
    """transformers >= 5 needs `post_init()` at the end of a model's constructor (it records the
    tied weights that loading reads); the official HART classes, written for transformers 4, do
    not call it."""
    real = cls.__init__
    if getattr(real, "calls_post_init", False):
        return

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if type(self) is cls and not hasattr(self, "all_tied_weights_keys"):
            self.post_init()

    init.calls_post_init = True
    cls.__init__ = init


def modules_stay_on_cpu():
    """`nn.Module.cuda()` returns the module itself (the official loaders move models to CUDA)."""
    return mock.patch.object(nn.Module, "cuda", lambda module, *a, **k: module)


class _Float32As(types.ModuleType):
    """torch, except that `bfloat16` names float32 (see exact_cross_attention)."""

    bfloat16 = torch.float32

    def __getattr__(self, name):
        return getattr(torch, name)


def exact_cross_attention(basic):
    """Run Infinity's cross-attention in float32: its `.to(torch.bfloat16)` becomes a no-op."""
    return mock.patch.object(basic, "torch", _Float32As("torch"))


@contextlib.contextmanager
def cuda_calls_stay_on_cpu():
    """`Tensor.cuda()` and `Tensor.to("cuda")` leave the tensor on the CPU (the official prompt
    encoder moves ids to CUDA, VAREdit's generation the source picture)."""
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and args[0] == "cuda":
            args = ("cpu", *args[1:])
        return real_to(self, *args, **kwargs)

    with mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self), mock.patch.object(torch.Tensor, "to", to):
        yield


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


class _PaddingTokenizer:
    """The transformers tokenizer call the official prompt encoder makes, over the byte stand-in
    tokenizer of random text encoders: ids and mask padded to `max_length`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text, max_length, padding, truncation, return_tensors):
        ids, mask = self.tokenizer(text, max_length)
        pad = max_length - ids.shape[1]
        return types.SimpleNamespace(input_ids=F.pad(ids, (0, pad)), attention_mask=F.pad(mask.long(), (0, pad)))


@contextlib.contextmanager
def _generators_follow_tensors():
    """`trunc_normal_` on a tensor of another device than its generator draws without the
    generator (the official constructor seeds a CPU generator for cfg_uncond)."""
    real = nn.init.trunc_normal_

    def trunc_normal_(tensor, *args, generator=None, **kwargs):
        if generator is not None and generator.device != tensor.device:
            generator = None
        return real(tensor, *args, generator=generator, **kwargs)

    nn.init.trunc_normal_ = trunc_normal_
    try:
        yield
    finally:
        nn.init.trunc_normal_ = real


class OfficialInfinity:
    """The official Infinity code at full size with its own random initialisation, run as its
    inference script runs it (`gen_one_img`: prompt encoding padded to 512 tokens, bf16 autocast,
    blocks in bf16, cfg on the logits), for `sparvar bench e2e --official PATH`. flash-attn's calls
    are served by SDPA (`_install_stand_ins`)."""

    repository, marker = "FoundationVision/Infinity", "infinity/models/infinity.py"  # a clone has the marker file
    load = staticmethod(load_infinity)

    def __init__(self, path: str | Path, spec, device: torch.device, seed: int = 0):
        from sparvar.models.infinity.text import TextEncoder

        self.off, self.spec, self.device = self.load(path), spec, device
        cfg = spec.transformer
        torch.manual_seed(seed)
        with torch.device(device), _generators_follow_tensors():
            self.vae = self.off.bsq_vae.vae_model(
                None, "dynamic", cfg.vae_channels, 2 ** cfg.vae_channels, patch_size=spec.vae.patch,
                encoder_ch_mult=list(spec.vae.ch_mult), decoder_ch_mult=list(spec.vae.ch_mult), test_mode=True,
            )
            self.model = self.off.model.Infinity(
                vae_local=self.vae, text_channels=spec.text["d_model"], text_maxlen=cfg.text_max_len, shared_aln=True,
                raw_scale_schedule=None, checkpointing="full-block", customized_flash_attn=False, fused_norm=True,
                pad_to_multiplier=128, use_flex_attn=False, add_lvl_embeding_only_first_block=1, use_bit_label=1,
                rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, pn="1M", apply_spatial_patchify=int(cfg.patchify),
                inference_mode=True, train_h_div_w_list=[1.0], depth=cfg.depth, embed_dim=cfg.width,
                num_heads=cfg.heads, drop_path_rate=0.1, mlp_ratio=cfg.mlp_ratio, block_chunks=cfg.block_chunks,
            )
        if device.type == "cuda":  # the official loader's bf16=1 (its default), for its CUDA autocast
            for block in self.model.unregistered_blocks:
                block.bfloat16()
        self.model.eval().requires_grad_(False)
        self.model.rng = torch.Generator(device=device)
        # the official loader keeps T5 in fp16
        text = TextEncoder.random(spec.text, device, torch.float16, seed, cfg.text_max_len)
        self.encoder, self.tokenizer = text.model, _PaddingTokenizer(text.tokenizer)

    def __call__(self, prompt: str, schedule, seed: int):
        """One image, as the official script makes it (returns its uint8 BGR image)."""
        scales = [(1, h, w) for h, w in schedule.sizes]
        cfg = self.spec.transformer
        on_cpu = cuda_calls_stay_on_cpu() if self.device.type == "cpu" else contextlib.nullcontext()
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad(), on_cpu:  # it prints every step
            return self.off.run.gen_one_img(
                self.model, self.vae, self.tokenizer, self.encoder, prompt, cfg_list=cfg.cfg, tau_list=cfg.tau,
                scale_schedule=scales, top_k=900, top_p=0.97, cfg_insertion_layer=[0], vae_type=cfg.vae_channels,
                g_seed=seed,
            )


class OfficialVAREdit(OfficialInfinity):
    """The official VAREdit code, built as its loader builds the model (Infinity's constructor
    with its settings), run as `infer.generate_image` runs an edit: the picture padded and resized
    (`transform`), `gen_one_img` at the model's sampling defaults, the result turned into a
    picture and cropped back to the source's shape. Its file read and logging are left out;
    `generate_image` itself takes 512 or 1024 pixels only, which small test models are not."""

    repository, marker = "HiDream-ai/VAREdit", "infer.py"
    load = staticmethod(load_varedit)

    def __call__(self, prompt: str, schedule, seed: int, image=None):
        """One edit of `image` (a PIL picture) by the official code; returns the edited picture."""
        import numpy as np
        from PIL import Image

        cfg = self.spec.transformer
        side = self.spec.image_size(schedule)[0]
        scales = [(1, h, w) for h, w in schedule.sizes]
        on_cpu = cuda_calls_stay_on_cpu() if self.device.type == "cpu" else contextlib.nullcontext()
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad(), on_cpu:
            pixels, crop = self.off.infer.transform(image.convert("RGB"), side)
            edited = self.off.run.gen_one_img(
                self.model, self.vae, self.tokenizer, self.encoder, prompt, pixels, g_seed=seed, gt_leak=0,
                gt_ls_Bl=None, cfg_list=cfg.cfg, tau_list=cfg.tau, scale_schedule=scales, cfg_insertion_layer=[0],
                vae_type=cfg.vae_channels, sampling_per_bits=1, enable_positive_prompt=0,
                apply_spatial_patchify=int(cfg.patchify),
            )
        return crop(Image.fromarray(edited.cpu().numpy()[..., ::-1].astype(np.uint8)))


RUNNERS = {runner.repository: runner for runner in (OfficialInfinity, OfficialVAREdit)}  # Family.official_code
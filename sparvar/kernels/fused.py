"""The models' elementwise work in few passes over memory: Triton kernels on CUDA, PyTorch elsewhere.

Besides its matrix products, an Infinity or VAR block runs a dozen elementwise steps over the
float32 residual stream: LayerNorm, adaLN modulation, gated residual adds, casts, q/k
normalisation and RoPE. As one PyTorch kernel each they took more GPU time than attention in
an Infinity-8B generation at 1024x1024 (benchmarks/profile.json). Here each group is one kernel:

- `add_norm`: x + branch * gate (the residual add), then LayerNorm(x) * mul + add (or HART's
  RMSNorm with its weight), cast to the matmul dtype (`gated_add`: the add alone);
- `qkv_heads`: the qkv projection split into heads, q and k L2-normalised, q scaled per head
  (cosine attention; optional for HART), both rotated by RoPE (adjacent pairs, or HART's halves);
- `group_norm_silu`: the VAE decoders' GroupNorm + SiLU, in NCHW or channels_last (PyTorch's
  bf16 GroupNorm statistics kernel runs one thread block per group: 46 of the 84 ms of an 8B
  decode at 1024x1024);
- `linear_gelu`: the FFN's first projection with its tanh-GELU in the matmul's epilogue;
- `add_upsampled_`: CS4A's residual, resized bilinearly from the decision scale's grid and added
  to a later scale's attention output in place (as PyTorch ops: a float32 copy, the resize, a
  cast and an add over strided memory, 6-10 ms of an 8B generation with `default`).

`add_norm` quantises its output itself when asked for FP8 (kernels/fp8.py), so the norm's output
never exists in bf16.

The PyTorch versions are the reference: they run on the CPU, under autograd (training), inside
`reference_only()` (the benchmark's official-style baseline), and in the tests against the
kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sparvar.kernels import use_kernels
from sparvar.kernels.fp8 import FP8, Fp8Rows, quantize_rows_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs may lack triton; the reference path needs none
    triton = None

LOG_100 = math.log(100.0)  # cap of the attention's learned log temperature


def _residual_rows(x: torch.Tensor) -> bool:
    """x is the float32 residual stream (B, n, C) the add/norm kernel reads, where kernels run."""
    return use_kernels(x) and x.dim() == 3 and x.dtype == torch.float32


def _per_batch(t: torch.Tensor, batch: int, width: int) -> tuple[torch.Tensor, int]:
    """A (C,) or (B, 1, C) / (B, C) vector as (tensor, batch stride) for the kernels, which
    read any float dtype (so no cast kernel runs here)."""
    if t.dim() == 1:
        return t.contiguous(), 0
    if t.shape[0] not in (1, batch):
        raise ValueError(f"a per-item vector of {t.shape[0]} items for a batch of {batch}")
    t = t.reshape(t.shape[0], width)
    if t.stride(1) != 1:
        t = t.contiguous()
    return t, (t.stride(0) if t.shape[0] == batch > 1 else 0)


# ---- residual add + LayerNorm + modulation ---------------------------------------------------
def add_norm_reference(x, branch, gate, mul, add, eps: float, dtype, rms_weight=None):
    if branch is not None:
        x = x + (branch * gate if gate is not None else branch.float())
    if rms_weight is None:
        normed = F.layer_norm(x, x.shape[-1:], eps=eps) * mul + add
    else:  # HART's RMSNorm, then its modulation, in this order
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * rms_weight.float() * mul + add
    return x, quantize_rows_reference(normed) if dtype == FP8 else normed.to(dtype)


def add_norm(x, branch, gate, mul, add, eps: float, dtype, rms_weight=None) -> tuple[torch.Tensor, torch.Tensor | Fp8Rows]:
    """(x + branch * gate, (LayerNorm(x + branch * gate) * mul + add) in `dtype`).

    x: (B, n, C) float32; branch: (B, n, C) or None (then x is returned as it is); gate, mul,
    add: (B, 1, C) per item or (C,) for all; gate may be None (plain add). dtype FP8: the normed
    rows come quantised (Fp8Rows), for an FP8 matmul. rms_weight (C,): RMSNorm with that weight
    in place of the LayerNorm (HART's blocks).
    """
    if _residual_rows(x):
        return add_norm_triton(x, branch, gate, mul, add, eps, dtype, rms_weight)
    return add_norm_reference(x, branch, gate, mul, add, eps, dtype, rms_weight)


def add_norm_triton(x, branch, gate, mul, add, eps: float, dtype, rms_weight=None):
    """Without mul (and add, dtype), only the residual add: (x + branch * gate, None)."""
    b, n, c = x.shape
    x = x.contiguous()
    norm, quant = mul is not None, dtype == FP8
    out = torch.empty((b, n, c), device=x.device, dtype=dtype) if norm else None
    scale = torch.empty((b, n, 1), device=x.device, dtype=torch.float32) if quant else x
    new_x = x if branch is None else torch.empty_like(x)
    mul, stride_mul = _per_batch(mul, b, c) if norm else (x, 0)
    add, stride_add = _per_batch(add, b, c) if norm else (x, 0)
    has_gate = gate is not None
    gate, stride_gate = _per_batch(gate, b, c) if has_gate else (x, 0)
    block = triton.next_power_of_2(c)
    rms = rms_weight is not None
    _add_norm_kernel[(b * n,)](
        x, x if branch is None else branch.contiguous(), gate, mul, add, rms_weight.contiguous() if rms else x,
        new_x, out if norm else x, scale, n, c, eps, stride_gate, stride_mul, stride_add,
        HAS_BRANCH=branch is not None, HAS_GATE=has_gate, NORM=norm, RMS=rms, QUANT=quant, BLOCK=block,
        num_warps=min(max(block // 256, 1), 16),
    )
    return new_x, Fp8Rows(out, scale) if quant else out


def gated_add(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + branch * gate: a residual add not followed by a norm (the FFN's), in one pass."""
    if _residual_rows(x):
        return add_norm_triton(x, branch, gate, None, None, 0.0, None)[0]
    return x + branch * gate


# ---- q, k, v heads with normalisation and RoPE -----------------------------------------------
def qkv_heads_reference(qkv, heads: int, q_log_scale, rope, rope_half: bool = False):
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = q.float(), k.float()
    if q_log_scale is not None:
        q_scale = q_log_scale.float().clamp_max(LOG_100).exp()
        q = F.normalize(q, dim=-1) * q_scale.view(1, heads, 1, 1)
        k = F.normalize(k, dim=-1)
    if rope is not None and rope_half:
        cos, sin = (t.float().unsqueeze(-3) if t.dim() == 3 else t.float() for t in rope)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    elif rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return q.to(qkv.dtype), k.to(qkv.dtype), v


def qkv_heads(qkv: torch.Tensor, heads: int, q_log_scale: torch.Tensor | None, rope, kv_out=None,
              rope_half: bool = False) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, H, n, D) of the qkv projection (B, n, 3C).

    With q_log_scale, q and k are L2-normalised over D and q is multiplied by
    exp(min(q_log_scale, log 100)) (one per head: the cosine attention's learned temperature);
    None leaves them as they are. With rope=(cos, sin) ((n, D/2) each, or (B, 1, n, D/2) per item)
    adjacent pairs of both are rotated; with rope_half (HART) dimension d pairs with d + D/2 as
    x * cos + rotate_half(x) * sin, over angles (n, D) or (B, n, D) for all D dimensions. kv_out:
    (B, H, n, D) views (the KV cache's slots) the kernel writes k and v into, saving their copy;
    the reference returns new tensors. The kernel puts q in (B, n, H, D) memory, so attention
    outputs of that layout reach the out projection without a copy.
    """
    d = qkv.shape[-1] // 3 // heads
    if use_kernels(qkv) and d >= 16 and not d & (d - 1):
        return qkv_heads_triton(qkv, heads, q_log_scale, rope, kv_out, rope_half)
    return qkv_heads_reference(qkv, heads, q_log_scale, rope, rope_half)


def qkv_heads_triton(qkv, heads: int, q_log_scale, rope, kv_out=None, rope_half: bool = False):
    b, n, width3 = qkv.shape
    d = width3 // 3 // heads
    qkv = qkv.contiguous()
    q = torch.empty((b, n, heads, d), device=qkv.device, dtype=qkv.dtype)
    if kv_out is None:  # k like q; v stays a view of qkv
        k, v = torch.empty_like(q).transpose(1, 2), qkv.view(b, n, 3, heads, d)[:, :, 2].transpose(1, 2)
    else:
        k, v = kv_out
        if k.shape != (b, heads, n, d) or v.shape != k.shape or k.stride(3) != 1 or v.stride(3) != 1:
            raise ValueError(f"kv_out must be (B, H, n, D) = {(b, heads, n, d)} views with a contiguous D")
    # angles per token of the scale (n, D/2), or per row (B, 1, n, D/2) where tokens were pruned per
    # item; for rope_half all D of them, per token or per row (HART's are per item)
    width = d if rope_half else d // 2
    cos, sin = (t.float().reshape(-1, width).contiguous() for t in rope) if rope is not None else (q, q)
    normalize = q_log_scale is not None
    _qkv_heads_kernel[(b * n,)](
        qkv, q_log_scale.contiguous() if normalize else q, cos, sin, q, k, v, n, heads, *k.stride()[:3],
        *v.stride()[:3], NORMALIZE=normalize, HAS_ROPE=rope is not None, ROPE_HALF=rope_half,
        ROPE_PER_ROW=rope is not None and cos.shape[0] == b * n != n,
        WRITE_V=kv_out is not None, D=d, BLOCK_H=triton.next_power_of_2(heads),
        num_warps=8 if heads * d >= 2048 else 4,
    )
    return q.transpose(1, 2), k, v


# ---- FFN projection + GELU -------------------------------------------------------------------
def linear_gelu(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """gelu_tanh(linear(x)); on CUDA the GELU runs in cuBLASLt's epilogue of the matmul."""
    if use_kernels(x) and linear.bias is not None:
        flat = torch._addmm_activation(linear.bias, x.reshape(-1, x.shape[-1]), linear.weight.t(), use_gelu=True)
        return flat.view(*x.shape[:-1], -1)
    return F.gelu(linear(x), approximate="tanh")


# ---- the VAE decoders: channels_last, GroupNorm + SiLU ---------------------------------------
def channels_last_on_gpu(x: torch.Tensor) -> torch.Tensor:
    """The decoders' input layout: on CUDA channels_last, which cuDNN convolves without the
    NCHW<->NHWC transposes it adds around every NCHW convolution (time, and 1 GiB at 1024x1024)."""
    return x.contiguous(memory_format=torch.channels_last) if use_kernels(x) else x


def group_norm_silu(x: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    """silu(norm(x)) for x (N, C, H, W)."""
    if use_kernels(x) and x.dim() == 4 and norm.affine:
        return group_norm_silu_triton(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(norm(x))


def group_norm_silu_triton(x, groups: int, weight, bias, eps: float, pixels_per_program: int = 256):
    """NCHW or channels_last x. Statistics in float32 from per-channel sums shifted by the
    group's first element (so large means do not cancel), combined per group in PyTorch; then
    one normalise + SiLU pass that keeps x's memory layout."""
    n, c, h, w = x.shape
    if not x.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous()
    hw, per_group = h * w, c // groups
    stride_n, stride_c, stride_p = x.stride(0), x.stride(1), x.stride(3)  # pixel p = y * w + x
    block_c = triton.next_power_of_2(c)
    block_p = max(1, min(4096 // block_c, triton.next_power_of_2(hw)))
    chunk = max(block_p, pixels_per_program)
    pivot = x[:, ::per_group, 0, 0].float().contiguous()  # (N, G): first element of each group
    sums = torch.empty((n, triton.cdiv(hw, chunk), block_c, 2), device=x.device, dtype=torch.float32)
    # pixel chunks on grid axis 0: axes 1 and 2 allow 65535 programs only
    _channel_sums_kernel[(sums.shape[1], n)](
        x, pivot, sums, hw, c, per_group, stride_n, stride_c, stride_p, CHUNK=chunk, BLOCK_P=block_p, BLOCK_C=block_c,
    )
    s1, s2 = sums[:, :, :c].sum(1).view(n, groups, per_group, 2).sum(2).unbind(-1)
    shift = s1 / (per_group * hw)
    mean = (pivot + shift).contiguous()
    rstd = torch.rsqrt((s2 / (per_group * hw) - shift * shift).clamp_min(0) + eps).contiguous()
    out = torch.empty_like(x)
    _norm_silu_kernel[(triton.cdiv(hw, block_p), n)](
        x, out, mean, rstd, weight.float().contiguous(), bias.float().contiguous(), hw, c, per_group,
        stride_n, stride_c, stride_p, BLOCK_P=block_p, BLOCK_C=block_c,
    )
    return out


# ---- CS4A's residual: bilinear resize + add ---------------------------------------------------
def add_upsampled_reference_(out: torch.Tensor, residual: torch.Tensor, src: tuple[int, int],
                             dst: tuple[int, int]) -> torch.Tensor:
    b, h, _, d = residual.shape
    grid = residual.reshape(b * h, *src, d).permute(0, 3, 1, 2)
    up = F.interpolate(grid.float(), size=dst, mode="bilinear", align_corners=False)
    return out.add_(up.permute(0, 2, 3, 1).reshape(b, h, dst[0] * dst[1], d).to(residual.dtype))


def add_upsampled_(out: torch.Tensor, residual: torch.Tensor, src: tuple[int, int],
                   dst: tuple[int, int]) -> torch.Tensor:
    """out (B, H, h'*w', D) += residual (B, H, h*w, D), resized bilinearly (align_corners=False,
    in float32, then cast to residual's dtype) from grid src = (h, w) to dst = (h', w'). Any strides
    with a contiguous D (the attention kernels' (B, L, H, D) memory); returns out."""
    tokens = (out.shape[2], residual.shape[2]) == (dst[0] * dst[1], src[0] * src[1])
    if out.shape[:2] != residual.shape[:2] or not tokens:
        raise ValueError(f"residual {tuple(residual.shape)} on grid {src} does not resize onto out "
                         f"{tuple(out.shape)} on grid {dst}")
    d = out.shape[-1]
    if use_kernels(out) and out.numel() and d >= 16 and not d & (d - 1) and out.stride(3) == residual.stride(3) == 1:
        return add_upsampled_triton_(out, residual, src, dst)
    return add_upsampled_reference_(out, residual, src, dst)


def add_upsampled_triton_(out, residual, src, dst, block_t: int = 32):
    b, h, n, d = out.shape
    _upsample_add_kernel[(b * h, triton.cdiv(n, block_t))](
        out, residual, h, *src, dst[1], n, src[0] / dst[0], src[1] / dst[1], *out.stride()[:3],
        *residual.stride()[:3], D=d, BLOCK_T=block_t, num_warps=4,
    )
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[-x2, x1] of x's halves (x1, x2) over its last dimension."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (B, H, L, D) by the angles whose cos/sin are (L, D/2)."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2)


if triton is not None:
    from sparvar.kernels.fp8 import _fp8_row

    _LOG_100 = tl.constexpr(LOG_100)  # globals a kernel may read

    @triton.jit(do_not_specialize=["n"])
    def _add_norm_kernel(X, BRANCH, GATE, MUL, ADD, RMS_WEIGHT, X_OUT, OUT, SCALE, n, C, eps, stride_gate,
                         stride_mul, stride_add, HAS_BRANCH: tl.constexpr, HAS_GATE: tl.constexpr,
                         NORM: tl.constexpr, RMS: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        item = row // n
        cols = tl.arange(0, BLOCK)
        ok = cols < C
        x = tl.load(X + row * C + cols, mask=ok, other=0.0)
        if HAS_BRANCH:
            y = tl.load(BRANCH + row * C + cols, mask=ok, other=0.0).to(tl.float32)
            if HAS_GATE:
                y = y * tl.load(GATE + item * stride_gate + cols, mask=ok, other=0.0).to(tl.float32)
            x = x + y
            tl.store(X_OUT + row * C + cols, x, mask=ok)
        if NORM:
            if RMS:
                rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
                y = x * rstd * tl.load(RMS_WEIGHT + cols, mask=ok, other=0.0).to(tl.float32)
            else:
                mean = tl.sum(x, axis=0) / C
                centred = tl.where(ok, x - mean, 0.0)
                rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / C + eps)
                y = centred * rstd
            mul = tl.load(MUL + item * stride_mul + cols, mask=ok, other=0.0).to(tl.float32)
            add = tl.load(ADD + item * stride_add + cols, mask=ok, other=0.0).to(tl.float32)
            y = y * mul + add  # 0 past C
            if QUANT:
                y = _fp8_row(y, SCALE + row)
            tl.store(OUT + row * C + cols, y.to(OUT.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=["n"])
    def _qkv_heads_kernel(QKV, LOG_SCALE, COS, SIN, Q, K, V, n, H, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl,
                          NORMALIZE: tl.constexpr, HAS_ROPE: tl.constexpr, ROPE_HALF: tl.constexpr,
                          ROPE_PER_ROW: tl.constexpr, WRITE_V: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # one token: all its heads as a (heads, D) tile
        item, token = row // n, row % n
        heads = tl.arange(0, BLOCK_H)[:, None]
        dims = tl.arange(0, D)[None, :]
        ok = (heads < H) & (dims < D)
        width = H * D
        src = QKV + row * 3 * width + heads * D + dims
        q = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        k = tl.load(src + width, mask=ok, other=0.0).to(tl.float32)
        q_mul = tl.full((BLOCK_H, 1), 1.0, tl.float32)  # per head: the normalisation (and q's temperature)
        k_norm = tl.full((BLOCK_H, 1), 1.0, tl.float32)
        if NORMALIZE:
            q_scale = tl.exp(tl.minimum(tl.load(LOG_SCALE + heads, mask=heads < H, other=0.0).to(tl.float32), _LOG_100))
            q_mul = q_scale / tl.maximum(tl.sqrt(tl.sum(q * q, axis=1)), 1e-12)[:, None]
            k_norm = tl.maximum(tl.sqrt(tl.sum(k * k, axis=1)), 1e-12)[:, None]
            q = q * q_mul
            k = k / k_norm
        position = row if ROPE_PER_ROW else token
        if HAS_ROPE and ROPE_HALF:  # x * cos + [-x2, x1] * sin: dimension d pairs with d + D/2
            cos = tl.load(COS + position * D + dims)
            sin = tl.load(SIN + position * D + dims)
            partner = src - dims + (dims + D // 2) % D
            sign = tl.where(dims < D // 2, -1.0, 1.0)
            q_rot = tl.load(partner, mask=ok, other=0.0).to(tl.float32) * q_mul * sign
            k_rot = tl.load(partner + width, mask=ok, other=0.0).to(tl.float32) / k_norm * sign
            q, k = q * cos + q_rot * sin, k * cos + k_rot * sin
        elif HAS_ROPE:  # rotate pairs (2i, 2i+1) by angle i of this token
            pairs = tl.arange(0, D // 2)[None, :]
            cos = tl.load(COS + position * (D // 2) + pairs)
            sin = tl.load(SIN + position * (D // 2) + pairs)
            q0, q1 = tl.split(tl.reshape(q, (BLOCK_H, D // 2, 2)))
            k0, k1 = tl.split(tl.reshape(k, (BLOCK_H, D // 2, 2)))
            q = tl.reshape(tl.join(cos * q0 - sin * q1, sin * q0 + cos * q1), (BLOCK_H, D))
            k = tl.reshape(tl.join(cos * k0 - sin * k1, sin * k0 + cos * k1), (BLOCK_H, D))
        tl.store(Q + row * width + heads * D + dims, q.to(Q.dtype.element_ty), mask=ok)  # (B, n, H, D) memory
        tl.store(K + item * k_sb + heads * k_sh + token * k_sl + dims, k.to(K.dtype.element_ty), mask=ok)
        if WRITE_V:
            v = tl.load(src + 2 * width, mask=ok, other=0.0)
            tl.store(V + item * v_sb + heads * v_sh + token * v_sl + dims, v, mask=ok)

    @triton.jit
    def _channel_sums_kernel(X, PIVOT, SUMS, hw, C, per_group, stride_n, stride_c, stride_p,
                             CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        part, item = tl.program_id(0), tl.program_id(1).to(tl.int64)
        channels = tl.arange(0, BLOCK_C)[None, :]
        groups = C // per_group
        pivot = tl.load(PIVOT + item * groups + channels // per_group, mask=channels < C, other=0.0)
        s1 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        s2 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        for start in range(part * CHUNK, part * CHUNK + CHUNK, BLOCK_P):
            pixels = start + tl.arange(0, BLOCK_P)[:, None]
            ok = (pixels < hw) & (channels < C)
            v = tl.load(X + item * stride_n + channels * stride_c + pixels * stride_p, mask=ok, other=0.0)
            v = tl.where(ok, v.to(tl.float32) - pivot, 0.0)
            s1 += v
            s2 += v * v
        out = SUMS + ((item * tl.num_programs(0) + part) * BLOCK_C + tl.arange(0, BLOCK_C)) * 2
        tl.store(out, tl.sum(s1, axis=0))
        tl.store(out + 1, tl.sum(s2, axis=0))

    @triton.jit
    def _norm_silu_kernel(X, OUT, MEAN, RSTD, WEIGHT, BIAS, hw, C, per_group, stride_n, stride_c, stride_p,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        item = tl.program_id(1).to(tl.int64)
        pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]
        channels = tl.arange(0, BLOCK_C)[None, :]
        ok = (pixels < hw) & (channels < C)
        group = item * (C // per_group) + channels // per_group
        mul = tl.load(RSTD + group, mask=channels < C, other=0.0) * tl.load(WEIGHT + channels, mask=channels < C)
        add = tl.load(BIAS + channels, mask=channels < C) - tl.load(MEAN + group, mask=channels < C) * mul
        offs = item * stride_n + channels * stride_c + pixels * stride_p
        y = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32) * mul + add
        y = y / (1.0 + tl.exp(-y))
        tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=ok)

    @triton.jit
    def _upsample_add_kernel(OUT, RES, heads, src_h, src_w, dst_w, n, scale_y, scale_x, so_b, so_h, so_t,
                             sr_b, sr_h, sr_t, D: tl.constexpr, BLOCK_T: tl.constexpr):
        # PyTorch's bilinear source index (align_corners=False): max((i + 0.5) * in / out - 0.5, 0)
        bh = tl.program_id(0)
        item, head = bh // heads, bh % heads
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        ok = (t < n)[:, None]
        fy = tl.maximum(((t // dst_w).to(tl.float32) + 0.5) * scale_y - 0.5, 0.0)
        fx = tl.maximum(((t % dst_w).to(tl.float32) + 0.5) * scale_x - 0.5, 0.0)
        y0, x0 = fy.to(tl.int32), fx.to(tl.int32)  # floor: both are >= 0
        y1, x1 = tl.minimum(y0 + 1, src_h - 1), tl.minimum(x0 + 1, src_w - 1)
        ly, lx = (fy - y0)[:, None], (fx - x0)[:, None]
        cols = tl.arange(0, D)[None, :]
        res = RES + item.to(tl.int64) * sr_b + head.to(tl.int64) * sr_h + cols
        r00 = tl.load(res + (y0 * src_w + x0)[:, None].to(tl.int64) * sr_t, mask=ok, other=0.0).to(tl.float32)
        r01 = tl.load(res + (y0 * src_w + x1)[:, None].to(tl.int64) * sr_t, mask=ok, other=0.0).to(tl.float32)
        r10 = tl.load(res + (y1 * src_w + x0)[:, None].to(tl.int64) * sr_t, mask=ok, other=0.0).to(tl.float32)
        r11 = tl.load(res + (y1 * src_w + x1)[:, None].to(tl.int64) * sr_t, mask=ok, other=0.0).to(tl.float32)
        up = (1.0 - ly) * ((1.0 - lx) * r00 + lx * r01) + ly * ((1.0 - lx) * r10 + lx * r11)
        up = up.to(RES.dtype.element_ty).to(tl.float32)  # the reference casts the resized residual first
        o = OUT + item.to(tl.int64) * so_b + head.to(tl.int64) * so_h + t[:, None].to(tl.int64) * so_t + cols
        total = tl.load(o, mask=ok, other=0.0).to(tl.float32) + up
        tl.store(o, total.to(OUT.dtype.element_ty), mask=ok)

"""Triton attention kernels against the float32 reference.

The small, awkward cases run the compiled kernels on a CUDA machine and Triton's interpreter on
the CPU; a CUDA machine also checks the full Infinity-8B shapes. The interpreter copies of the
kernel modules are loaded under private names with TRITON_INTERPRET set only while they load, so
the regular modules (and every other test) keep compiled kernels. One process never runs both:
interpreted runs patch triton.language, which compiled kernels would then trip over.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import triton

from helpers import random_table, rel_err
import sparvar.kernels.decision as compiled_decision
import sparvar.kernels.fp8 as compiled_fp8
import sparvar.kernels.fused as compiled_fused
import sparvar.kernels.sparse_attention as compiled_sparse
from sparvar.attention.decision import attention_with_colsum, reference_attention_colsum
from sparvar.attention.sparse import resolve_backend, sparse_attention
from sparvar.attention.tables import BlockTable, reference_sparse_attention
from sparvar.errors import SparvarError

KERNELS_DIR = Path(compiled_sparse.__file__).parent
BF16_TOL = 1e-2  # relative error for bf16 operands


def _load_interpreted(name: str, deps: dict | None = None):
    """An interpreted copy of sparvar.kernels.<name>, importing `deps` (module name -> copy)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    saved = {m: sys.modules.get(m) for m in deps or {}}
    sys.modules.update(deps or {})
    try:
        spec = importlib.util.spec_from_file_location(f"_interpreted_{name}", KERNELS_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.modules.update(saved)
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return module


ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if ON_GPU:
    kernels_sparse, kernels_decision = compiled_sparse, compiled_decision
    kernels_fused, kernels_fp8 = compiled_fused, compiled_fp8
else:
    kernels_fp8 = _load_interpreted("fp8")
    kernels_fused = _load_interpreted("fused", {"sparvar.kernels.fp8": kernels_fp8})
    kernels_sparse = _load_interpreted("sparse_attention", {"sparvar.kernels.fp8": kernels_fp8})
    kernels_decision = _load_interpreted("decision", {"sparvar.kernels.sparse_attention": kernels_sparse,
                                                      "sparvar.kernels.fp8": kernels_fp8})


@pytest.fixture(autouse=True, scope="module")
def _interpreter_fixes():
    """Interpreter gaps, patched for this module only, so the compiled kernels stay intact:
    - Triton's own library functions (tl.sum, tl.max) are compiled-mode when triton was imported
      without TRITON_INTERPRET (as here, or by any earlier test); run them interpreted too.
    - a nested jit call patches triton.language for the interpreter and never undoes it, which
      breaks later compilation in this process; undo it when the call returns.
    - tl.dot multiplies bf16 bit patterns (triton-lang/triton#11584, unsupported upstream);
      upcast bf16 operands to float32 first, which the tensor cores compute exactly.
    - triton 3.6 turns a loaded scalar into an index with int() of a 1-element array, which
      numpy 2 refuses (later versions squeeze it first).
    - float32 -> e4m3 casts lose the carry of a mantissa that rounds up into the next power of
      two (127.6 becomes 64, not 128: the exponent bits are OR-ed, not added); cast with torch."""
    if ON_GPU:
        yield
        return
    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.interpreter import InterpretedFunction, InterpreterBuilder
    from triton.runtime.jit import JITFunction

    real_dot = InterpreterBuilder.create_dot
    real_fp_to_fp = InterpreterBuilder.create_fp_to_fp
    real_patch_tensor = interpreter._patch_lang_tensor
    watched = [(tl.tensor, "to"), (tl.tensor, "__index__"), (tl.core, "reduce"), (tl.math, "exp2")]
    compiled_lang = [getattr(obj, name, None) for obj, name in watched]

    def dot(self, a, b, *args, **kwargs):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return real_dot(self, a, b, *args, **kwargs)

    def fp_to_fp(self, src, dst_type, rounding_mode):
        if dst_type.scalar != tl.float8e4nv or src.dtype.scalar != tl.float32:
            return real_fp_to_fp(self, src, dst_type, rounding_mode)
        data = torch.from_numpy(src.data.copy()).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return interpreter.TensorHandle(data, dst_type.scalar)

    def patch_tensor(tensor, scope):
        real_patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    def nested_call(self, *args, **kwargs):
        scope = interpreter._patch_lang(self.fn)
        try:
            return InterpretedFunction(self.fn).rewrite()(*args, **kwargs)
        finally:
            scope.restore()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InterpreterBuilder, "create_dot", dot)
        mp.setattr(InterpreterBuilder, "create_fp_to_fp", fp_to_fp)
        mp.setattr(interpreter, "_patch_lang_tensor", patch_tensor)
        mp.setattr(JITFunction, "__call__", nested_call)
        mp.setattr(InterpretedFunction, "__call__", nested_call)
        yield
    assert [getattr(obj, name, None) for obj, name in watched] == compiled_lang  # nothing leaked


@pytest.fixture
def poisoned(monkeypatch):
    """Fresh float buffers come back full of NaN, so an unwritten output element shows."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(real_empty_like(*a, **kw)))
    return monkeypatch


def cache_views(b, h, lk, d, dtype, device=DEVICE, spare=40):
    """k, v as length slices of one bigger cache whose unused tail holds NaN."""
    cache = torch.randn(2, b, h, lk + spare, d, dtype=dtype, device=device)
    cache[:, :, :, lk:] = float("nan")
    return cache[0, :, :, :lk], cache[1, :, :, :lk]


def kernel_table(tb, th, lq, lk, q_block, key_block, max_entries=None, device=DEVICE, seed=0):
    """A random plan whose entries past the counts point past every key: the kernels never read them."""
    units = -(-lk // key_block)
    return random_table(tb, th, lq, lk, q_block, key_block, max_entries=max_entries, junk=units + 1000, seed=seed,
                        device=device)


SPARSE_CASES = [
    # (B, H, table dims, Lq, Lk, D, q_block, key_block, dtype, kernel options)
    pytest.param(1, 1, (1, 1), 200, 333, 64, 64, 64, torch.bfloat16, {}, id="block64-onehead-bf16"),
    pytest.param(2, 2, (2, 2), 150, 290, 64, 128, 128, torch.float16, dict(block_m=128, block_n=128),
                 id="block128-tiles128-per-bh-fp16"),
    pytest.param(2, 3, (1, 3), 130, 300, 128, 64, 128, torch.bfloat16, {}, id="q64-key128-heads-d128"),
    pytest.param(1, 2, (1, 1), 140, 333, 64, 128, 32, torch.bfloat16, {}, id="key32-two-per-tile"),
    pytest.param(1, 2, (1, 2), 150, 333, 64, 64, 96, torch.float16, {}, id="key96-sliced"),
    pytest.param(2, 2, (2, 2), 130, 333, 64, 64, 1, torch.bfloat16, {}, id="gather-tokens"),
    pytest.param(1, 2, (1, 1), 400, 333, 64, 192, 1, torch.float16, dict(block_n=128), id="gather-group192"),
]


@pytest.mark.parametrize("b,h,tdims,lq,lk,d,q_block,key_block,dtype,opts", SPARSE_CASES)
def test_sparse_matches_reference(poisoned, b, h, tdims, lq, lk, d, q_block, key_block, dtype, opts):
    q = torch.randn(b, h, lq, d, dtype=dtype, device=DEVICE)
    k, v = cache_views(b, h, lk, d, dtype)
    table = kernel_table(*tdims, lq, lk, q_block, key_block, max_entries=200 if key_block == 1 else None)
    scale = 1 / math.sqrt(d)
    ref, ref_lse = reference_sparse_attention(q, k, v, table, scale, return_lse=True)
    # block mode runs through TMA descriptors and through pointer loads; gather mode has one path
    for tma in (True, False) if key_block >= 64 else (False,):
        out, lse = kernels_sparse.triton_sparse_attention(q, k, v, table, scale, return_lse=True, tma=tma, **opts)

        assert out.dtype == dtype and lse.dtype == torch.float32
        assert out.transpose(1, 2).is_contiguous()  # the out projection's rows, with no copy
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < BF16_TOL
        empty = torch.isinf(ref_lse)
        assert empty.any() and not empty.all()  # the case has both kinds of rows
        assert (out[empty.expand_as(out[..., 0])] == 0).all()
        assert torch.equal(torch.isinf(lse), empty.expand_as(lse)) and (lse[torch.isinf(lse)] < 0).all()
        assert torch.allclose(lse[~torch.isinf(lse)], ref_lse.expand_as(lse)[~torch.isinf(lse)], atol=1e-3)


FP8_CASES = [
    pytest.param(2, 3, (1, 3), 130, 300, 128, 64, 128, {}, id="block-d128"),
    pytest.param(1, 2, (1, 1), 140, 333, 64, 128, 32, {}, id="key32-two-per-tile"),
    pytest.param(2, 2, (2, 2), 130, 333, 64, 64, 1, {}, id="gather-tokens"),
    pytest.param(1, 2, (1, 2), 150, 290, 64, 128, 128, dict(warp_specialize=True, block_m=128, block_n=128),
                 id="block128-warp-specialize"),
]


def _dequantised(x8, scale):
    return x8.float() * scale[..., None]


@pytest.mark.parametrize("b,h,tdims,lq,lk,d,q_block,key_block,opts", FP8_CASES)
@pytest.mark.parametrize("fp8_v", [False, True])
def test_fp8_sparse_matches_the_reference_of_its_quantised_inputs(poisoned, b, h, tdims, lq, lk, d, q_block,
                                                                   key_block, opts, fp8_v):
    """FP8 q, k (and v) with row scales: the float reference of the dequantised inputs, and FP8
    error against the bf16 inputs; cosine-attention-like q (unit rows times a temperature)."""
    q = torch.nn.functional.normalize(torch.randn(b, h, lq, d), dim=-1).to(DEVICE, torch.bfloat16) * 4
    k, v = cache_views(b, h, lk, d, torch.bfloat16)
    k = torch.nn.functional.normalize(k.float(), dim=-1).to(torch.bfloat16)
    table = kernel_table(*tdims, lq, lk, q_block, key_block, max_entries=200 if key_block == 1 else None)
    q8, qs = kernels_sparse.quantize_heads(q)
    k8, ks = kernels_sparse.quantize_heads(k)
    v8, vs = kernels_sparse.quantize_heads(v) if fp8_v else (v, None)
    out, lse = kernels_sparse.triton_sparse_attention(q8, k8, v8, table, 1.0, return_lse=True, q_scale=qs,
                                                      k_scale=ks, v_scale=vs, **opts)
    v_ref = _dequantised(v8, vs) if fp8_v else v
    ref, ref_lse = reference_sparse_attention(_dequantised(q8, qs), _dequantised(k8, ks), v_ref, table, 1.0,
                                              return_lse=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(out, ref) < BF16_TOL
    seen = ~torch.isinf(ref_lse.expand_as(lse))
    assert torch.allclose(lse[seen], ref_lse.expand_as(lse)[seen], atol=1e-3)
    assert rel_err(out, reference_sparse_attention(q, k, v, table, 1.0)) < 0.08


def test_fp8_inputs_need_their_scales():
    q = torch.randn(1, 1, 64, 64, device=DEVICE).to(torch.float8_e4m3fn)
    v = torch.randn(1, 1, 64, 64, device=DEVICE, dtype=torch.bfloat16)
    table = kernel_table(1, 1, 64, 64, 64, 64)
    with pytest.raises(SparvarError, match="row scales"):
        kernels_sparse.triton_sparse_attention(q, q, v, table, 1.0)
    scale = torch.ones(1, 1, 64, device=DEVICE)
    with pytest.raises(SparvarError, match="FP8 together"):
        kernels_sparse.triton_sparse_attention(q, v, v, table, 1.0, q_scale=scale)


def test_warp_specialize_needs_128_tiles():
    """Triton 3.6 fails to compile the pass on 64 x 64 tiles; a q_block of 64 clips the tile to 64."""
    q = torch.randn(1, 1, 128, 64, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(SparvarError, match="128 x 128 tiles.*got 64 x 128"):
        kernels_sparse.triton_sparse_attention(q, q, q, kernel_table(1, 1, 128, 128, 64, 128), 1.0,
                                               block_m=128, block_n=128, warp_specialize=True)


@pytest.mark.parametrize("fp8_v", [False, True])
def test_fp8_colsum_matches_the_reference_of_its_quantised_inputs(poisoned, fp8_v):
    q = torch.nn.functional.normalize(torch.randn(2, 2, 200, 64), dim=-1).to(DEVICE, torch.bfloat16) * 4
    k, v = cache_views(2, 2, 300, 64, torch.bfloat16)
    (q8, qs), (k8, ks) = kernels_sparse.quantize_heads(q), kernels_sparse.quantize_heads(k)
    v8, vs = kernels_sparse.quantize_heads(v) if fp8_v else (v, None)
    out, colsum = kernels_decision.triton_attention_colsum(q8, k8, v8, 64, 1.0, q_scale=qs, k_scale=ks, v_scale=vs)
    ref, ref_colsum = reference_attention_colsum(_dequantised(q8, qs), _dequantised(k8, ks),
                                                 _dequantised(v8, vs) if fp8_v else v, 64, 1.0)
    assert rel_err(out, ref) < BF16_TOL and rel_err(colsum, ref_colsum) < 1e-3


def test_block_mode_uses_tma_only_where_the_views_allow():
    k = torch.randn(1, 2, 100, 64, dtype=torch.float16, device=DEVICE)
    assert kernels_sparse.tma_ready(k) and kernels_sparse.tma_ready(k[:, :, 3:])
    odd = torch.randn(1, 2, 100, 68, dtype=torch.float16, device=DEVICE)[..., :64]  # rows 136 bytes apart
    assert not kernels_sparse.tma_ready(odd)
    q = torch.randn(1, 2, 130, 64, dtype=torch.float16, device=DEVICE)
    table = kernel_table(1, 1, 130, 100, 64, 64)
    out = kernels_sparse.triton_sparse_attention(q, odd, odd, table, 0.125)  # falls back to pointer loads
    assert rel_err(out, reference_sparse_attention(q, odd, odd, table, 0.125)) < BF16_TOL


def test_sparse_entries_past_kv_len_add_nothing():
    """A block id one past the last key block covers no key: rows listing only it give zeros."""
    q = torch.randn(1, 1, 192, 64, dtype=torch.float16, device=DEVICE)
    k, v = cache_views(1, 1, 200, 64, torch.float16)
    past = 4  # 200 keys = 4 blocks of 64
    indices = torch.tensor([[[[past, 0, 0], [past, 2, 3], [1, past, 0]]]], dtype=torch.int32, device=DEVICE)
    table = BlockTable(torch.tensor([[[1, 3, 2]]], dtype=torch.int32, device=DEVICE), indices, 64, 64, 192, 200)
    out, lse = kernels_sparse.triton_sparse_attention(q, k, v, table, 0.125, return_lse=True)
    ref, ref_lse = reference_sparse_attention(q, k, v, table, 0.125, return_lse=True)
    assert (out[0, 0, :64] == 0).all() and torch.isinf(lse[0, 0, :64]).all()
    assert torch.isfinite(out).all() and rel_err(out, ref) < BF16_TOL
    assert torch.allclose(lse[0, 0, 64:], ref_lse[0, 0, 64:], atol=1e-3)


@pytest.mark.parametrize(
    "b,h,lq,lk,d,group,dtype,tma",
    [
        pytest.param(1, 2, 200, 333, 64, 192, torch.bfloat16, True, id="group192-padded"),
        pytest.param(2, 1, 256, 300, 128, 128, torch.float16, True, id="group128-exact"),
        pytest.param(1, 1, 100, 260, 64, 256, torch.bfloat16, True, id="group256-one-partial"),
        pytest.param(1, 2, 200, 192, 64, 192, torch.float16, False, id="group192-pointers-tiles-exact"),
        pytest.param(1, 1, 130, 100, 64, 128, torch.bfloat16, True, id="keys-fewer-than-a-tile"),
        pytest.param(1, 1, 128, 200, 64, 128, torch.float16, True, id="one-full-tile-then-tail"),
    ],
)
def test_colsum_matches_reference(poisoned, b, h, lq, lk, d, group, dtype, tma):
    q = torch.randn(b, h, lq, d, dtype=dtype, device=DEVICE)
    k, v = cache_views(b, h, lk, d, dtype)
    ref_out, ref_cs = reference_attention_colsum(q, k, v, group, 0.1)
    out, cs = kernels_decision.triton_attention_colsum(q, k, v, group, 0.1, tma=tma)

    assert cs.shape == (b, h, -(-lq // group), lk) and cs.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(cs).all()
    assert rel_err(out, ref_out) < BF16_TOL
    assert rel_err(cs, ref_cs) < 1e-4  # probabilities stay float32 in the kernel
    rows = torch.tensor([min(group, lq - g * group) for g in range(cs.shape[2])], dtype=torch.float32, device=DEVICE)
    assert torch.allclose(cs.sum(-1), rows.expand_as(cs.sum(-1)), rtol=1e-4)


def test_rejects_unsupported_shapes():
    q = torch.randn(1, 1, 64, 96, dtype=torch.float16, device=DEVICE)
    k = v = torch.randn(1, 1, 64, 96, dtype=torch.float16, device=DEVICE)
    table = kernel_table(1, 1, 64, 64, 64, 64)
    with pytest.raises(SparvarError, match="head dims"):
        kernels_sparse.triton_sparse_attention(q, k, v, table, 1.0)
    q, k = q[..., :64].contiguous(), k[..., :64].contiguous()
    odd = kernel_table(1, 1, 64, 64, 8, 64)
    with pytest.raises(SparvarError, match="q_block"):
        kernels_sparse.triton_sparse_attention(q, k, k, odd, 1.0)
    with pytest.raises(SparvarError, match="multiple of 16"):
        kernels_decision.triton_attention_colsum(q, k, k, 24, 1.0)


def test_dispatch():
    q = torch.randn(1, 1, 70, 64)
    k, v = torch.randn(1, 1, 90, 64), torch.randn(1, 1, 90, 64)
    table = kernel_table(1, 1, 70, 90, 64, 64, device="cpu")
    assert resolve_backend("auto", q) == "cpu"  # CPU tensors
    assert resolve_backend("triton", q) == "triton"
    with pytest.raises(SparvarError, match="unknown attention backend"):
        sparse_attention(q, k, v, table, 1.0, backend="flash")
    out, lse = sparse_attention(q, k, v, table, 1.0, return_lse=True)
    ref, ref_lse = reference_sparse_attention(q, k, v, table, 1.0, return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    out, cs = attention_with_colsum(q, k, v, 64, 1.0, backend="reference")
    assert torch.equal(cs, reference_attention_colsum(q, k, v, 64, 1.0)[1])


# ---- compiled kernels at full Infinity-8B sizes (CUDA only) ----

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reference_by_heads(fn, q, k, v, *args, chunk=4):
    """The float32 reference a few heads at a time, so full sizes fit in memory."""
    parts = [fn(q[:, i : i + chunk], k[:, i : i + chunk], v[:, i : i + chunk], *args) for i in range(0, q.shape[1], chunk)]
    return tuple(torch.cat(p, dim=1) for p in zip(*parts))


def _sliced(table: BlockTable, i: int, chunk: int) -> BlockTable:
    if table.counts.shape[1] == 1:
        return table
    return BlockTable(table.counts[:, i : i + chunk], table.indices[:, i : i + chunk], table.q_block,
                      table.key_block, table.q_len, table.kv_len)


@cuda
@pytest.mark.parametrize("q_block,key_block,per_head", [(128, 128, False), (64, 64, True), (192, 1, True)])
def test_sparse_full_size_cuda(q_block, key_block, per_head):
    b, h, lq, lk, d = 2, 28, 4096, 10521, 128
    q = torch.randn(b, h, lq, d, dtype=torch.bfloat16, device="cuda")
    k, v = cache_views(b, h, lk, d, torch.bfloat16, device="cuda")
    table = kernel_table(1, h if per_head else 1, lq, lk, q_block, key_block,
                         max_entries=2100 if key_block == 1 else None, device="cuda")
    out, lse = sparse_attention(q, k, v, table, 1.0, return_lse=True)
    chunk = 4
    parts = [reference_sparse_attention(q[:, i : i + chunk], k[:, i : i + chunk], v[:, i : i + chunk],
                                        _sliced(table, i, chunk), 1.0, return_lse=True) for i in range(0, h, chunk)]
    ref = torch.cat([p[0] for p in parts], dim=1)
    ref_lse = torch.cat([p[1].expand(b, -1, -1) for p in parts], dim=1)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < BF16_TOL
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-3)


@cuda
def test_colsum_full_size_cuda():
    b, h, lq, lk, d = 2, 28, 1600, 4121, 128
    q = torch.randn(b, h, lq, d, dtype=torch.bfloat16, device="cuda")
    k, v = cache_views(b, h, lk, d, torch.bfloat16, device="cuda")
    out, cs = attention_with_colsum(q, k, v, 192, 0.1)
    ref_out, ref_cs = reference_by_heads(reference_attention_colsum, q, k, v, 192, 0.1)
    assert rel_err(out, ref_out) < BF16_TOL
    assert rel_err(cs, ref_cs) < 1e-4


def _compile_for_hopper(fn, pointers, constexprs, **options):
    """Compile a kernel for sm_90 without a GPU (Triton ships the compiler and ptxas)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n == "qk_scale" else "i32")
                 for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.slow
def test_compiled_kernels_build_for_hopper_after_interpreter_runs(tma):
    """The regular (compiled) kernels still build in a process that ran the interpreter, and
    their matrix products lower to wgmma."""
    bf, kv = "*bf16", "tensordesc<bf16[1,1,128,128]>" if tma else "*bf16"
    k = _compile_for_hopper(
        compiled_sparse._sparse_attention_kernel,
        dict(Q=bf, K=kv, V=kv, O=bf, LSE="*fp32", COUNTS="*i32", INDICES="*i32", QS="*fp32", KS="*fp32", VS="*fp32"),
        dict(Q_BLOCK=128, KEY_BLOCK=128, BLOCK_M=128, BLOCK_N=128, HEAD_DIM=128, USE_TMA=tma, RETURN_LSE=True),
        num_warps=8, num_stages=3)
    assert "wgmma.mma_async" in k.asm["ptx"]
    fp8 = "tensordesc<fp8e4nv[1,1,64,128]>" if tma else "*fp8e4nv"
    k = _compile_for_hopper(
        compiled_sparse._sparse_attention_kernel,
        dict(Q="*fp8e4nv", K=fp8, V=fp8, O=bf, LSE="*fp32", COUNTS="*i32", INDICES="*i32", QS="*fp32", KS="*fp32",
             VS="*fp32"),
        dict(Q_BLOCK=128, KEY_BLOCK=128, BLOCK_M=64, BLOCK_N=64, HEAD_DIM=128, USE_TMA=tma, RETURN_LSE=False,
             FP8_QK=True, FP8_V=True), num_warps=4, num_stages=3)
    assert re.search(r"wgmma\.mma_async\S*\.e4m3\.e4m3", k.asm["ptx"])  # QK^T at the FP8 rate
    k = _compile_for_hopper(  # Triton's automatic warp specialisation of the key loop builds too
        compiled_sparse._sparse_attention_kernel,
        dict(Q=bf, K=kv, V=kv, O=bf, LSE="*fp32", COUNTS="*i32", INDICES="*i32", QS="*fp32", KS="*fp32", VS="*fp32"),
        dict(Q_BLOCK=128, KEY_BLOCK=128, BLOCK_M=128, BLOCK_N=128, HEAD_DIM=128, USE_TMA=tma, RETURN_LSE=False,
             WARP_SPECIALIZE=True), num_warps=8, num_stages=3)
    assert "wgmma.mma_async" in k.asm["ptx"]
    q = "tensordesc<bf16[1,1,64,128]>" if tma else "*bf16"
    k = _compile_for_hopper(
        compiled_decision._colsum_kernel, dict(Q=q, K=kv, LSE="*fp32", PART="*fp32", QS="*fp32", KS="*fp32"),
        dict(BLOCK_N=128, BLOCK_M=64, HEAD_DIM=128, USE_TMA=tma), num_warps=4, num_stages=3)
    assert "wgmma.mma_async" in k.asm["ptx"]


@pytest.mark.parametrize("name,pointers,constexprs,num_warps", [
    ("_add_norm_kernel", dict(X="*fp32", BRANCH="*bf16", GATE="*fp32", MUL="*fp32", ADD="*fp32", RMS_WEIGHT="*fp32",
                              X_OUT="*fp32", OUT="*bf16", SCALE="*fp32", eps="fp32"),
     dict(HAS_BRANCH=True, HAS_GATE=True, NORM=True, RMS=False, QUANT=False, BLOCK=4096), 16),
    ("_add_norm_kernel", dict(X="*fp32", BRANCH="*bf16", GATE="*fp32", MUL="*fp32", ADD="*fp32", RMS_WEIGHT="*fp32",
                              X_OUT="*fp32", OUT="*fp8e4nv", SCALE="*fp32", eps="fp32"),
     dict(HAS_BRANCH=True, HAS_GATE=True, NORM=True, RMS=False, QUANT=True, BLOCK=4096), 16),
    ("_add_norm_kernel", dict(X="*fp32", BRANCH="*bf16", GATE="*fp32", MUL="*fp32", ADD="*fp32", RMS_WEIGHT="*bf16",
                              X_OUT="*fp32", OUT="*bf16", SCALE="*fp32", eps="fp32"),
     dict(HAS_BRANCH=True, HAS_GATE=True, NORM=True, RMS=True, QUANT=False, BLOCK=2048), 8),
    ("_quantize_rows_kernel", dict(X="*bf16", Q="*fp8e4nv", SCALE="*fp32"), dict(GELU=True, CHUNK=2048), 4),
    ("_dequantize_rows_kernel", dict(SRC="*fp8e4nv", SCALE="*fp32", DST="*bf16"), dict(D=128, BLOCK=32), 4),
    ("_qkv_heads_kernel", dict(QKV="*bf16", LOG_SCALE="*bf16", COS="*fp32", SIN="*fp32", Q="*bf16", K="*bf16",
                               V="*bf16"), dict(NORMALIZE=True, HAS_ROPE=True, ROPE_HALF=False, ROPE_PER_ROW=False,
                                                WRITE_V=True, D=128, BLOCK_H=32), 8),
    ("_qkv_heads_kernel", dict(QKV="*bf16", LOG_SCALE="*bf16", COS="*fp32", SIN="*fp32", Q="*bf16", K="*bf16",
                               V="*bf16"), dict(NORMALIZE=False, HAS_ROPE=True, ROPE_HALF=True, ROPE_PER_ROW=True,
                                                WRITE_V=True, D=64, BLOCK_H=16), 4),
    ("_channel_sums_kernel", dict(X="*bf16", PIVOT="*fp32", SUMS="*fp32"), dict(CHUNK=256, BLOCK_P=32, BLOCK_C=128), 4),
    ("_norm_silu_kernel", dict(X="*bf16", OUT="*bf16", MEAN="*fp32", RSTD="*fp32", WEIGHT="*fp32", BIAS="*fp32"),
     dict(BLOCK_P=32, BLOCK_C=128), 4),
    ("_upsample_add_kernel", dict(OUT="*bf16", RES="*bf16", scale_y="fp32", scale_x="fp32"),
     dict(D=128, BLOCK_T=32), 4),
])
@pytest.mark.slow
def test_fused_kernels_build_for_hopper(name, pointers, constexprs, num_warps):
    """The blocks' elementwise kernels assemble into sm_90 machine code at Infinity-8B's width and
    heads, for the threads asked, within a Hopper block's shared memory and without scratch memory."""
    module = compiled_fp8 if hasattr(compiled_fp8, name) else compiled_fused
    kernel = _compile_for_hopper(getattr(module, name), pointers, constexprs, num_warps=num_warps)
    ptx = kernel.asm["ptx"]
    assert ".target sm_90" in ptx and f".visible .entry {name}(" in ptx
    assert f".reqntid {32 * num_warps}" in ptx and len(kernel.asm["cubin"]) > 0  # ptxas built it
    assert kernel.metadata.shared <= 227 * 1024 and kernel.metadata.global_scratch_size == 0


# ---- the blocks' fused elementwise kernels and FP8 rows (sparvar/kernels/fused.py, fp8.py) ---
def _vector(kind, b, c, gen):
    """A gate/mul/add vector: per item (a float32 strided slice of a (B, 1, 6, C) tensor), or
    shared (bf16, like a LayerNorm's weights in a bf16 model)."""
    if kind == "item":
        return torch.randn(b, 1, 6, c, generator=gen).unbind(2)[3].to(DEVICE)
    return torch.randn(c, generator=gen).to(DEVICE, torch.bfloat16)


@pytest.mark.parametrize("b,n,c", [(2, 5, 96), (1, 1, 130), (3, 7, 64)])
@pytest.mark.parametrize("branch,gate,mul", [(False, None, "item"), (True, "item", "shared"), (True, None, "item")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rms", [False, True])
def test_add_norm_matches_reference(poisoned, b, n, c, branch, gate, mul, dtype, rms):
    """LayerNorm (Infinity, VAR) or RMSNorm with its weight (HART), then the modulation."""
    gen = torch.Generator().manual_seed(b * 1000 + n * 10 + c)
    x = (torch.randn(b, n, c, generator=gen) * 3 + 1).to(DEVICE)
    y = torch.randn(b, n, c, generator=gen).to(DEVICE, dtype) if branch else None
    g = _vector(gate, b, c, gen) if gate else None
    m, a = _vector(mul, b, c, gen), _vector(mul, b, c, gen)
    w = _vector("shared", b, c, gen) if rms else None
    new_x, out = kernels_fused.add_norm_triton(x, y, g, m, a, 1e-6, dtype, w)
    ref_x, ref = kernels_fused.add_norm_reference(x, y, g, m, a, 1e-6, dtype, w)
    assert out.dtype == dtype and new_x.dtype == torch.float32
    torch.testing.assert_close(new_x, ref_x, rtol=1e-6, atol=1e-6)
    assert rel_err(out, ref) < BF16_TOL
    if not branch:
        assert new_x is x or torch.equal(new_x, x)
    else:
        only_x, none = kernels_fused.add_norm_triton(x, y, g, None, None, 0.0, None)
        assert none is None and torch.equal(only_x, new_x)


def assert_fp8_rows_close(rows, ref):
    """Scales within float rounding; FP8 values within one e4m3 step where a division rounded
    differently (a value near a rounding boundary)."""
    torch.testing.assert_close(rows.scale, ref.scale, rtol=1e-5, atol=0)
    steps = (rows.data.view(torch.uint8).int() - ref.data.view(torch.uint8).int()).abs()
    assert rows.data.dtype == torch.float8_e4m3fn and steps.max() <= 1 and (steps > 0).float().mean() < 0.01


@pytest.mark.parametrize("b,n,c", [(2, 5, 96), (1, 1, 130)])
@pytest.mark.parametrize("branch", [False, True])
def test_add_norm_fp8_matches_reference(poisoned, b, n, c, branch):
    gen = torch.Generator().manual_seed(b * 1000 + n * 10 + c)
    x = (torch.randn(b, n, c, generator=gen) * 3 + 1).to(DEVICE)
    y = torch.randn(b, n, c, generator=gen).to(DEVICE, torch.bfloat16) if branch else None
    m, a = _vector("item", b, c, gen), _vector("item", b, c, gen)
    fp8 = kernels_fp8.FP8
    new_x, rows = kernels_fused.add_norm_triton(x, y, None, m, a, 1e-6, fp8)
    ref_x, ref = kernels_fused.add_norm_reference(x, y, None, m, a, 1e-6, fp8)
    torch.testing.assert_close(new_x, ref_x, rtol=1e-6, atol=1e-6)
    assert rows.shape == (b, n, c) and rows.scale.shape == (b, n, 1)
    assert_fp8_rows_close(rows, ref)


@pytest.mark.parametrize("shape", [(3, 100), (2, 5, 64), (1, 1, 300)])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [kernels_fp8.QUANTIZE_CHUNK, 64])  # 64: rows in several chunks, a short last one
def test_quantize_rows_matches_reference(poisoned, shape, gelu, dtype, chunk):
    x = (torch.randn(shape) * 4).to(DEVICE, dtype)
    x[0, ..., :] = 0  # an all-zero row keeps a finite scale and quantises to zeros
    if x[0].numel() < x.numel():  # a later row's largest value in its last chunk's last lane
        x.view(-1, shape[-1])[-1, -1] = -50.0
    rows = kernels_fp8.quantize_rows_triton(x, gelu, chunk=chunk)
    ref = kernels_fp8.quantize_rows_reference(x, gelu)
    assert rows.shape == shape and rows.scale.shape == (*shape[:-1], 1)
    assert_fp8_rows_close(rows, ref)
    assert (rows.data[0].float() == 0).all() and (rows.scale > 0).all()
    dequantised = rows.data.float() * rows.scale  # within half an e4m3 step (2^-4 relative) of the input
    source = torch.nn.functional.gelu(x.float(), approximate="tanh") if gelu else x.float()
    assert ((dequantised - source).abs() <= (source.abs() / 16 + rows.scale * 2**-10) * 1.001).all()


@pytest.mark.parametrize("length,d", [(1, 16), (37, 64), (130, 128)])
def test_dequantize_rows_writes_into_strided_views(poisoned, length, d):
    """The FP8 KV cache's prefix (B, H planes of a longer stored buffer) into its staging buffer."""
    rows = kernels_fp8.quantize_rows_reference(torch.randn(2, 2, 3, length + 5, d) * 3)
    data, scale = rows.data[1].to(DEVICE), rows.scale[1].to(DEVICE)  # one layer of a (layers, ...) cache
    staging = torch.full((2, 3, length + 9, d), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    kernels_fp8.dequantize_rows(data[:, :, :length], scale[:, :, :length], staging[:, :, :length])
    ref = (data[:, :, :length].float() * scale[:, :, :length]).to(torch.bfloat16)
    assert torch.equal(staging[:, :, :length], ref) and staging[:, :, length:].isnan().all()


@pytest.mark.parametrize("b,n,heads,d", [(2, 5, 3, 64), (1, 1, 1, 16), (2, 9, 5, 128)])
@pytest.mark.parametrize("rope", [True, "per item", False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qkv_heads_matches_reference(poisoned, b, n, heads, d, rope, dtype):
    gen = torch.Generator().manual_seed(b * 100 + n * 10 + heads + d)
    qkv = (torch.randn(b, n, 3 * heads * d, generator=gen) * 2).to(DEVICE, dtype)
    scale = (torch.rand(heads, generator=gen) * 6 - 1).to(DEVICE)  # log temperatures, some past the cap
    angles = torch.rand(*((b, 1) if rope == "per item" else ()), n, d // 2, generator=gen) * 20
    angles = (angles.cos().to(DEVICE), angles.sin().to(DEVICE)) if rope else None
    ref_q, ref_k, ref_v = kernels_fused.qkv_heads_reference(qkv, heads, scale, angles)
    q, k, v = kernels_fused.qkv_heads_triton(qkv, heads, scale, angles)
    assert q.shape == k.shape == (b, heads, n, d) and q.dtype == k.dtype == dtype
    assert q.transpose(1, 2).is_contiguous() and k.transpose(1, 2).is_contiguous()
    assert rel_err(q, ref_q) < BF16_TOL and rel_err(k, ref_k) < BF16_TOL
    assert torch.equal(v, ref_v)
    cache = torch.full((2, b, heads, n + 7, d), float("nan"), dtype=dtype, device=DEVICE)  # slots inside a cache
    slots = (cache[0, :, :, 3 : 3 + n], cache[1, :, :, 3 : 3 + n])
    q2, k2, v2 = kernels_fused.qkv_heads_triton(qkv, heads, scale, angles, kv_out=slots)
    assert k2.data_ptr() == slots[0].data_ptr() and torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)
    assert cache[:, :, :, :3].isnan().all() and cache[:, :, :, 3 + n :].isnan().all()
    torch.testing.assert_close(k.float().norm(dim=-1), torch.ones(b, heads, n, device=DEVICE), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("b,n,heads,d", [(2, 5, 3, 64), (1, 1, 1, 16), (2, 9, 5, 128)])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("per_item", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qkv_heads_half_rotation_matches_reference(poisoned, b, n, heads, d, normalize, per_item, dtype):
    """HART's RoPE (d pairs with d + D/2, angles for all D, per item or shared), with and without
    the cosine normalisation."""
    gen = torch.Generator().manual_seed(b * 100 + n * 10 + heads + d + normalize)
    qkv = (torch.randn(b, n, 3 * heads * d, generator=gen) * 2).to(DEVICE, dtype)
    scale = (torch.rand(heads, generator=gen) * 6 - 1).to(DEVICE) if normalize else None
    angles = torch.rand(*((b,) if per_item else ()), n, d, generator=gen) * 20  # halves need not repeat
    angles = (angles.cos().to(DEVICE), angles.sin().to(DEVICE))
    ref_q, ref_k, ref_v = kernels_fused.qkv_heads_reference(qkv, heads, scale, angles, rope_half=True)
    cache = torch.full((2, b, heads, n + 7, d), float("nan"), dtype=dtype, device=DEVICE)
    slots = (cache[0, :, :, 3 : 3 + n], cache[1, :, :, 3 : 3 + n])
    q, k, v = kernels_fused.qkv_heads_triton(qkv, heads, scale, angles, kv_out=slots, rope_half=True)
    assert q.shape == k.shape == (b, heads, n, d) and q.dtype == k.dtype == dtype
    assert rel_err(q, ref_q) < BF16_TOL and rel_err(k, ref_k) < BF16_TOL and torch.equal(v, ref_v)
    assert k.data_ptr() == slots[0].data_ptr() and cache[:, :, :, :3].isnan().all()
    x = qkv.float().view(b, n, 3, heads, d)[:, :, 0].transpose(1, 2)  # the rotation as HART's code writes it
    cos, sin = (t[:, None] if per_item else t for t in angles)
    if not normalize:
        rotated = x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin
        assert rel_err(q, rotated) < BF16_TOL


def test_fused_dispatch_keeps_autograd_and_cpu_on_the_reference():
    x = torch.randn(2, 3, 8, requires_grad=True)
    new_x, out = compiled_fused.add_norm(x, torch.randn(2, 3, 8), None, torch.ones(8), torch.zeros(8), 1e-6,
                                         torch.float32)
    out.sum().backward()
    assert x.grad is not None and new_x.shape == x.shape


@pytest.mark.parametrize("n,c,h,w,groups,pixels", [(1, 64, 5, 7, 32, 256), (2, 96, 9, 3, 8, 4), (1, 32, 16, 16, 32, 16)])
@pytest.mark.parametrize("offset", [0.0, 100.0])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_matches_reference(poisoned, n, c, h, w, groups, pixels, offset, channels_last):
    gen = torch.Generator().manual_seed(n + c + h + w)
    norm = torch.nn.GroupNorm(groups, c, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=gen)
        norm.bias.normal_(generator=gen)
    norm = norm.to(DEVICE, torch.bfloat16)
    x = (torch.randn(n, c, h, w, generator=gen) + offset).to(DEVICE, torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = kernels_fused.group_norm_silu_triton(x, groups, norm.weight, norm.bias, norm.eps, pixels_per_program=pixels)
    ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x.float(), groups, norm.weight.float(),
                                                                  norm.bias.float(), norm.eps))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert rel_err(out, ref) < BF16_TOL


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@torch.inference_mode()
def test_fused_kernels_match_their_reference_in_the_demo_model_cuda():
    """The whole transformer (teacher forcing) and the decoder, kernels against their reference
    (random weights: the device calls carry the checkout without the weight files)."""
    from sparvar.kernels import reference_only
    from sparvar.loading import load_pipeline

    pipe = load_pipeline("infinity-demo", device="cuda", random_weights=True)
    schedule, bits = pipe.schedule(), pipe.transformer.cfg.bits
    gen = torch.Generator("cuda").manual_seed(0)
    prep = pipe.transformer.prepare(pipe.encode(["cat face", "flag: Japan"]), guidance=True)
    inputs = [torch.randint(0, 2, (4, n, bits), generator=gen, device="cuda") * 2.0 - 1 for n in schedule.lengths[1:]]
    z = torch.randn(2, pipe.vae.cfg.channels, 64, 64, generator=gen, device="cuda")
    fast, image = pipe.transformer.forward_full(inputs, schedule, prep), pipe.vae.decode(z)
    with reference_only():
        slow, ref_image = pipe.transformer.forward_full(inputs, schedule, prep), pipe.vae.decode(z)
    assert rel_err(fast, slow) < 2e-2
    assert rel_err(image, ref_image) < 2e-2


@pytest.mark.parametrize("src,dst,block_t", [((4, 5), (9, 13), 32), ((1, 1), (3, 2), 4), ((6, 6), (6, 6), 8),
                                             ((7, 5), (3, 4), 4), ((5, 5), (8, 8), 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "tokens-major"])
def test_add_upsampled_matches_reference(src, dst, block_t, dtype, layout):
    """CS4A's residual resized and added in place, outputs and residuals in (B, H, L, D) memory or
    the attention kernels' (B, L, H, D); token counts that fill no block of block_t, a 1x1 grid,
    the same grid, and a smaller one."""
    b, h, d = 2, 3, 32
    gen = torch.Generator().manual_seed(src[0] * 100 + dst[0] * 10 + dst[1])
    residual = torch.randn(b, h, src[0] * src[1], d, generator=gen).to(DEVICE, dtype)
    n = dst[0] * dst[1]
    out = torch.randn(b, h, n, d, generator=gen).to(DEVICE, dtype)
    if layout == "tokens-major":  # both, as the decision scale's outputs leave the residual
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
        residual = residual.transpose(1, 2).contiguous().transpose(1, 2)
    ref = kernels_fused.add_upsampled_reference_(out.clone(), residual, src, dst)
    got = out.clone()
    assert kernels_fused.add_upsampled_triton_(got, residual, src, dst, block_t) is got
    assert got.stride() == out.stride() and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:  # a rounding step apart at most (the interpreter's casts to bf16 round differently)
        assert rel_err(got, ref) < BF16_TOL
        torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=2 ** -6)


def test_add_upsampled_refuses_grids_that_do_not_match_and_passes_empty_batches():
    out, residual = torch.zeros(1, 2, 12, 16), torch.ones(1, 2, 4, 16)
    with pytest.raises(ValueError, match="does not resize onto"):
        compiled_fused.add_upsampled_(out, residual, (2, 2), (3, 5))
    assert torch.equal(compiled_fused.add_upsampled_(out, residual, (2, 2), (3, 4)), torch.ones(1, 2, 12, 16))
    empty = torch.zeros(0, 2, 12, 16, device=DEVICE)
    assert compiled_fused.add_upsampled_(empty, torch.zeros(0, 2, 4, 16, device=DEVICE), (2, 2), (4, 3)).numel() == 0


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@torch.inference_mode()
def test_fused_kernels_match_their_reference_in_hart_blocks_cuda():
    """HART's blocks (RMSNorm with its weight, through add_norm), kernels against their reference."""
    from sparvar.kernels import reference_only
    from sparvar.loading import load_pipeline

    pipe = load_pipeline("hart-tiny", device="cuda", random_weights=True, dtype=torch.bfloat16)
    schedule, width = pipe.schedule(), pipe.transformer.word_embed.in_features
    gen = torch.Generator("cuda").manual_seed(0)
    prep = pipe.transformer.prepare(pipe.encode(["a boat", "a red fox"]), guidance=True)
    inputs = [torch.randn(4, n, width, generator=gen, device="cuda") for n in schedule.lengths[1:]]
    fast = pipe.transformer.forward_full(inputs, schedule, prep)
    with reference_only():
        slow = pipe.transformer.forward_full(inputs, schedule, prep)
    assert rel_err(fast, slow) < 2e-2


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_group_norm_silu_at_the_8b_decoders_largest_map_cuda():
    """256 channels at 1024x1024: more pixel tiles than a grid's second axis allows."""
    x = torch.randn(1, 256, 1024, 1024, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(256, device="cuda"), torch.randn(256, device="cuda")
    out = compiled_fused.group_norm_silu_triton(x, 32, weight, bias, 1e-6)
    ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x.float(), 32, weight, bias, 1e-6))
    assert rel_err(out, ref) < BF16_TOL

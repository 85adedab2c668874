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
import sys
from pathlib import Path

import pytest
import triton
import torch

import sparvar.attention.triton_decision as compiled_decision
import sparvar.attention.triton_sparse as compiled_sparse
from sparvar.attention.decision import attention_with_colsum, reference_attention_colsum
from sparvar.attention.sparse import resolve_backend, sparse_attention
from sparvar.attention.tables import BlockTable, reference_sparse_attention
from sparvar.errors import SparvarError

ATTENTION_DIR = Path(compiled_sparse.__file__).parent
BF16_TOL = 1e-2  # relative error for bf16 operands (METHOD.md)


def _load_interpreted(name: str, deps: dict | None = None):
    """An interpreted copy of sparvar.attention.<name>, importing `deps` (module name -> copy)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    saved = {m: sys.modules.get(m) for m in deps or {}}
    sys.modules.update(deps or {})
    try:
        spec = importlib.util.spec_from_file_location(f"_interpreted_{name}", ATTENTION_DIR / f"{name}.py")
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
else:
    kernels_sparse = _load_interpreted("triton_sparse")
    kernels_decision = _load_interpreted("triton_decision", {"sparvar.attention.triton_sparse": kernels_sparse})


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
      numpy 2 refuses (later versions squeeze it first)."""
    if ON_GPU:
        yield
        return
    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.interpreter import InterpretedFunction, InterpreterBuilder
    from triton.runtime.jit import JITFunction

    real_dot = InterpreterBuilder.create_dot
    real_patch_tensor = interpreter._patch_lang_tensor
    watched = [(tl.tensor, "to"), (tl.tensor, "__index__"), (tl.core, "reduce"), (tl.math, "exp2")]
    compiled_lang = [getattr(obj, name, None) for obj, name in watched]

    def dot(self, a, b, *args, **kwargs):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return real_dot(self, a, b, *args, **kwargs)

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


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def cache_views(b, h, lk, d, dtype, device=DEVICE, spare=40):
    """k, v as length slices of one bigger cache whose unused tail holds NaN."""
    cache = torch.randn(2, b, h, lk + spare, d, dtype=dtype, device=device)
    cache[:, :, :, lk:] = float("nan")
    return cache[0, :, :, :lk], cache[1, :, :, :lk]


def random_table(tb, th, lq, lk, q_block, key_block, max_entries=None, device=DEVICE):
    """Distinct random entries per row, random counts, row 0 empty, garbage past the count."""
    nq, units = -(-lq // q_block), -(-lk // key_block)
    m = min(units, max_entries or units)
    counts = torch.randint(1, m + 1, (tb, th, nq))
    counts[..., 0] = 0
    indices = torch.full((tb, th, nq, m), units + 1000, dtype=torch.int32)
    for i, c in enumerate(counts.view(-1).tolist()):
        indices.view(-1, m)[i, :c] = torch.randperm(units)[:c].int()
    return BlockTable(counts.int().to(device), indices.to(device), q_block, key_block, lq, lk)


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
    table = random_table(*tdims, lq, lk, q_block, key_block, max_entries=200 if key_block == 1 else None)
    scale = 1 / math.sqrt(d)
    ref, ref_lse = reference_sparse_attention(q, k, v, table, scale, return_lse=True)
    # block mode runs through TMA descriptors and through pointer loads; gather mode has one path
    for tma in (True, False) if key_block >= 64 else (False,):
        out, lse = kernels_sparse.triton_sparse_attention(q, k, v, table, scale, return_lse=True, tma=tma, **opts)

        assert out.dtype == dtype and lse.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < BF16_TOL
        empty = torch.isinf(ref_lse)
        assert empty.any() and not empty.all()  # the case has both kinds of rows
        assert (out[empty.expand_as(out[..., 0])] == 0).all()
        assert torch.equal(torch.isinf(lse), empty.expand_as(lse)) and (lse[torch.isinf(lse)] < 0).all()
        assert torch.allclose(lse[~torch.isinf(lse)], ref_lse.expand_as(lse)[~torch.isinf(lse)], atol=1e-3)


def test_block_mode_uses_tma_only_where_the_views_allow():
    k = torch.randn(1, 2, 100, 64, dtype=torch.float16, device=DEVICE)
    assert kernels_sparse.tma_ready(k) and kernels_sparse.tma_ready(k[:, :, 3:])
    odd = torch.randn(1, 2, 100, 68, dtype=torch.float16, device=DEVICE)[..., :64]  # rows 136 bytes apart
    assert not kernels_sparse.tma_ready(odd)
    q = torch.randn(1, 2, 130, 64, dtype=torch.float16, device=DEVICE)
    table = random_table(1, 1, 130, 100, 64, 64)
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
    table = random_table(1, 1, 64, 64, 64, 64)
    with pytest.raises(SparvarError, match="head dims"):
        kernels_sparse.triton_sparse_attention(q, k, v, table, 1.0)
    q, k = q[..., :64].contiguous(), k[..., :64].contiguous()
    odd = random_table(1, 1, 64, 64, 8, 64)
    with pytest.raises(SparvarError, match="q_block"):
        kernels_sparse.triton_sparse_attention(q, k, k, odd, 1.0)
    with pytest.raises(SparvarError, match="multiple of 16"):
        kernels_decision.triton_attention_colsum(q, k, k, 24, 1.0)


def test_dispatch():
    q = torch.randn(1, 1, 70, 64)
    k, v = torch.randn(1, 1, 90, 64), torch.randn(1, 1, 90, 64)
    table = random_table(1, 1, 70, 90, 64, 64, device="cpu")
    assert resolve_backend("auto", q) == "reference"  # CPU tensors
    assert resolve_backend("triton", q) == "triton"
    with pytest.raises(SparvarError, match="unknown attention backend"):
        sparse_attention(q, k, v, table, 1.0, backend="flash")
    out, lse = sparse_attention(q, k, v, table, 1.0, return_lse=True)
    ref, ref_lse = reference_sparse_attention(q, k, v, table, 1.0, return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    out, cs = attention_with_colsum(q, k, v, 64, 1.0)
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
    table = random_table(1, h if per_head else 1, lq, lk, q_block, key_block,
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
def test_compiled_kernels_build_for_hopper_after_interpreter_runs(tma):
    """The regular (compiled) kernels still build in a process that ran the interpreter, and
    their matrix products lower to wgmma."""
    bf, kv = "*bf16", "tensordesc<bf16[1,1,128,128]>" if tma else "*bf16"
    k = _compile_for_hopper(
        compiled_sparse._sparse_attention_kernel,
        dict(Q=bf, K=kv, V=kv, O=bf, LSE="*fp32", COUNTS="*i32", INDICES="*i32"),
        dict(Q_BLOCK=128, KEY_BLOCK=128, BLOCK_M=128, BLOCK_N=128, HEAD_DIM=128, USE_TMA=tma, RETURN_LSE=True),
        num_warps=8, num_stages=3)
    assert "wgmma.mma_async" in k.asm["ptx"]
    q = "tensordesc<bf16[1,1,64,128]>" if tma else "*bf16"
    k = _compile_for_hopper(
        compiled_decision._colsum_kernel, dict(Q=q, K=kv, LSE="*fp32", PART="*fp32"),
        dict(BLOCK_N=128, BLOCK_M=64, HEAD_DIM=128, USE_TMA=tma), num_warps=4, num_stages=3)
    assert "wgmma.mma_async" in k.asm["ptx"]

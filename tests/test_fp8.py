"""FP8 matmuls (models/fp8.py): torch._scaled_mm against the float32 reference of the same
quantised numbers, the layers against full precision, and FP8 pipelines end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from helpers import rel_err, teacher_forced_logits, tiny_pipeline
from sparvar.cli import main as cli_main
from sparvar.errors import SparvarError
from sparvar.kernels.fp8 import FP8, quantize_rows, quantize_rows_reference
from sparvar.models.fp8 import (
    Fp8Linear,
    fp8_matmul,
    fp8_matmul_reference,
    quantize_blocks,
    quantize_weight,
)
from sparvar.models.registry import FAMILIES, MODELS, create_model
from sparvar.loading import load_pipeline


ON_GPU = torch.cuda.is_available()


def test_weight_quantisation_is_per_output_channel():
    w = torch.randn(48, 80) * torch.logspace(-3, 2, 48)[:, None]  # rows of very different sizes
    w[5] = 0
    q, scale = quantize_weight(w)
    assert q.dtype == FP8 and scale.shape == (48,) and (scale > 0).all()
    assert torch.equal(q.float().abs().amax(1)[torch.arange(48) != 5], torch.full((47,), 448.0))
    assert (q[5].float() == 0).all()
    assert rel_err(q.float() * scale[:, None], w) < 0.04


@pytest.mark.parametrize("m,k,n", [(1, 16, 16), (7, 48, 112), (33, 80, 64), (130, 64, 48)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_matches_the_float_reference(m, k, n, bias, out_dtype):
    """The calling convention (row-major A, column-major B, (M, 1) and (1, N) scales) is the one
    torch._scaled_mm takes on the GPU too; on the CPU it computes the reference's numbers."""
    gen = torch.Generator().manual_seed(m * k + n)
    x = torch.randn(2, m, k, generator=gen) * 3
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen).to(out_dtype) if bias else None
    rows, (wq, ws) = quantize_rows(x), quantize_weight(w)
    out = fp8_matmul(rows, wq, ws, b, out_dtype)
    ref = fp8_matmul_reference(rows, wq, ws, b, out_dtype)
    assert out.shape == (2, m, n) and out.dtype == out_dtype
    assert rel_err(out, ref) < (1e-5 if out_dtype == torch.float32 else 1e-2)
    assert rel_err(out, x @ w.t() + (0 if b is None else b.float())) < 0.08  # FP8 against float32


def test_a_cpu_torch_without_rowwise_scales_computes_the_reference(monkeypatch):
    """torch 2.11's CPU _scaled_mm takes one scale per operand only: the float32 reference stands in."""
    import sparvar.models.fp8 as fp8

    monkeypatch.setattr(fp8, "cpu_takes_rowwise_scales", lambda: False)
    rows, (wq, ws) = quantize_rows(torch.randn(3, 5, 32)), quantize_weight(torch.randn(24, 32))
    out = fp8.fp8_matmul(rows, wq, ws, None, torch.bfloat16)
    assert out.shape == (3, 5, 24)
    assert torch.equal(out, fp8_matmul_reference(rows, wq, ws, None, torch.bfloat16))


def test_every_row_count_takes_scaled_mm_with_fast_accumulation(monkeypatch):
    """One path at every row count (the early scales' few rows too): `_scaled_mm`, with fast
    accumulation unless asked otherwise."""
    import sparvar.models.fp8 as fp8

    calls = []
    monkeypatch.setattr(fp8, "cpu_takes_rowwise_scales", lambda: True)
    # the call is recorded, not made: torch 2.11's CPU _scaled_mm refuses rowwise scales
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, **kw: calls.append((a.shape[0], kw["use_fast_accum"]))
                        or a.new_zeros(a.shape[0], b.shape[1], dtype=kw["out_dtype"]))
    wq, ws = quantize_weight(torch.randn(24, 32))
    for shape in [(1, 2, 32), (1, 64, 32), (2, 33, 32)]:
        out = fp8.fp8_matmul(quantize_rows(torch.randn(shape)), wq, ws, None, torch.float32)
        assert out.shape == (*shape[:2], 24)
    fp8.fp8_matmul(quantize_rows(torch.randn(3, 32)), wq, ws, None, torch.float32, fast_accum=False)
    assert calls == [(2, True), (64, True), (66, True), (3, False)]


def test_cublaslt_refusing_the_product_is_one_line(monkeypatch):
    import sparvar.models.fp8 as fp8

    def refuse(*args, **kw):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasLtMatmulAlgoGetHeuristic( "
                           "ltHandle, computeDesc.descriptor(), ...)`")

    monkeypatch.setattr(fp8, "cpu_takes_rowwise_scales", lambda: True)
    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    wq, ws = quantize_weight(torch.randn(24, 32))
    with pytest.raises(SparvarError, match=r"no FP8 kernel here for a 6 x 32 by 32 x 24 product") as raised:
        fp8.fp8_matmul(quantize_rows(torch.randn(2, 3, 32)), wq, ws, None, torch.bfloat16)
    assert "\n" not in str(raised.value) and "without --precision fp8" in str(raised.value)
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="other"):  # anything else is not ours to reword
        fp8.fp8_matmul(quantize_rows(torch.randn(2, 3, 32)), wq, ws, None, torch.bfloat16)


def test_a_bias_cublaslt_refuses_to_fuse_is_added_after_and_the_shape_remembered(monkeypatch):
    import sparvar.models.fp8 as fp8

    calls = []

    def without_bias_only(a, b, *, bias=None, **kw):  # as cuBLASLt did for fc2 at 2 rows on one H100
        calls.append(bias is not None)
        if bias is not None and a.shape[0] == 2:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasLtMatmulAlgoGetHeuristic(`")
        out = (a.float() * kw["scale_a"]) @ (b.float() * kw["scale_b"])
        return (out if bias is None else out + bias.float()).to(kw["out_dtype"])

    monkeypatch.setattr(fp8, "cpu_takes_rowwise_scales", lambda: True)
    monkeypatch.setattr(fp8, "_BIAS_REFUSED", set())
    monkeypatch.setattr(torch, "_scaled_mm", without_bias_only)
    wq, ws = quantize_weight(torch.randn(24, 32))
    bias = torch.randn(24)
    for rows in (quantize_rows(torch.randn(2, 32)), quantize_rows(torch.randn(3, 32))):
        out = fp8.fp8_matmul(rows, wq, ws, bias, torch.float32)
        assert torch.allclose(out, fp8_matmul_reference(rows, wq, ws, bias, torch.float32), atol=1e-5)
    assert calls == [True, False, True]  # 2 rows: refused, then without; 3 rows: fused
    fp8.fp8_matmul(quantize_rows(torch.randn(2, 32)), wq, ws, bias, torch.float32)
    assert calls[3:] == [False]  # the refused shape goes straight to the product without its bias


@torch.no_grad()
def test_fp8_linear_takes_rows_or_tensors_and_a_bias_override():
    linear = nn.Linear(64, 96)
    layer = Fp8Linear.from_linear(linear)
    x = torch.randn(3, 5, 64)
    assert layer.weight.dtype == FP8 and layer.out_dtype == torch.float32
    torch.testing.assert_close(layer(x), layer(quantize_rows(x)))
    assert rel_err(layer(x), linear(x)) < 0.06
    other = torch.randn(96)
    assert rel_err(layer(x, other), linear(x) - linear.bias + other) < 0.06
    gelu = layer.gelu_rows(x)
    ref = quantize_rows_reference(layer(x), gelu=True)
    assert torch.equal(gelu.data.view(torch.uint8), ref.data.view(torch.uint8)) and torch.equal(gelu.scale, ref.scale)


def test_quantize_blocks_replaces_the_projections_only():
    pipe = tiny_pipeline()
    model = pipe.transformer
    # qkv, proj; ca q, kv, proj; fc1, fc2
    assert quantize_blocks(model, pipe.spec.family.fp8_layers) == 7 * len(model.blocks)
    block = model.blocks[0]
    for layer in (block.sa.mat_qkv, block.sa.proj, block.ca.mat_q, block.ca.mat_kv, block.ca.proj, block.ffn.fc1,
                  block.ffn.fc2):
        assert isinstance(layer, Fp8Linear)
    assert isinstance(model.head, nn.Linear) and isinstance(model.word_embed, nn.Linear)


def test_quantize_blocks_refuses_sizes_the_gpu_matmul_cannot_take():
    with pytest.raises(SparvarError, match="multiples of 16"):
        quantize_blocks(tiny_pipeline(width=72, heads=2).transformer, FAMILIES["Infinity"].fp8_layers)


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES)
def test_every_linear_layer_of_the_blocks_is_quantised_or_kept_on_purpose(family):
    """precision="fp8" quantises the family's listed layers; every other linear layer of a block is
    listed as kept in the model dtype, so none is left out unsaid (HART's once were)."""
    spec = next(s for s in MODELS.values() if s.family is family and s.name.endswith("-tiny"))
    model = create_model(spec)
    paths = {path for block in model.blocks for path, m in block.named_modules() if isinstance(m, nn.Linear)}
    assert paths == set(family.fp8_layers) | set(family.kept_layers)
    assert quantize_blocks(model, family.fp8_layers) == len(family.fp8_layers) * len(model.blocks)
    for block in model.blocks:
        for path, module in block.named_modules():
            assert not isinstance(module, nn.Linear) or path in family.kept_layers
            assert not isinstance(module, Fp8Linear) or path in family.fp8_layers


@pytest.mark.parametrize("model", ["infinity-tiny", "var-tiny", "hart-tiny"])
@pytest.mark.slow
def test_fp8_pipeline_stays_close_to_full_precision(model):
    """Teacher-forced on the full-precision run's tokens, the FP8 model's logits stay within FP8
    error at every scale, and most greedy bits agree."""
    full = load_pipeline(model, device="cpu", random_weights=True)
    fp8 = load_pipeline(model, device="cpu", random_weights=True, precision="fp8")
    assert isinstance(fp8.transformer.blocks[0].get_submodule(fp8.spec.family.fp8_layers[-1]), Fp8Linear)
    conditions = ["a red fox"] if fp8.spec.text_conditioned else [1, 2]
    out = full(conditions, seed=0, progress=False)
    a = teacher_forced_logits(full, conditions, out.schedule, out.tokens, 3.0)
    b = teacher_forced_logits(fp8, conditions, out.schedule, out.tokens, 3.0)
    assert rel_err(b, a) < 0.1
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    again = fp8(conditions, seed=0, progress=False)
    assert all(torch.equal(t, u) for t, u in zip(again.tokens, fp8(conditions, seed=0, progress=False).tokens))


def test_precision_is_checked_in_one_line(capsys):
    with pytest.raises(SparvarError, match="unknown precision 'fp4'"):
        load_pipeline("infinity-tiny", device="cpu", random_weights=True, precision="fp4")
    assert cli_main(["generate", "--model", "var-tiny", "--precision", "fp4", "--out", "unused"]) == 2
    assert "unknown precision 'fp4'" in capsys.readouterr().err


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("m,k,n", [(2, 2048, 6144), (64, 3584, 10752), (8192, 3584, 14336), (77, 14336, 3584),
                                   (2, 14336, 3584)])
def test_fp8_matmul_matches_the_float_reference_cuda(m, k, n):
    """`_scaled_mm` with fast accumulation at the 2B and 8B sizes, from the early scales' few rows
    to the last scale's thousands."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    rows, (wq, ws) = quantize_rows(x), quantize_weight(w)
    out = fp8_matmul(rows, wq, ws, b, torch.bfloat16)
    assert rel_err(out, fp8_matmul_reference(rows, wq, ws, b, torch.bfloat16)) < 1e-2


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_fp8_pipeline_replays_in_cuda_graphs():
    """No host sync in the FP8 forward: the captured graphs give the eager run's images."""
    pipe = load_pipeline("infinity-demo", device="cuda", precision="fp8", random_weights=True)  # no weight files
    # needed: the device calls of tools/hopper_measurements.sh carry the checkout without them
    prompts = ["cat face", "flag: Japan"]
    eager = pipe(prompts, seed=0, progress=False).pixels
    runs = [pipe(prompts, seed=0, cuda_graphs=True, progress=False).pixels for _ in range(3)]  # warm, capture, replay
    for run in runs:
        assert (run - eager).abs().max() < 1e-2

"""The VAR family: KV-cache generation equals teacher forcing, the CFG ramp, the seam, the residual
quantiser and the VQVAE."""

import pytest
import torch
import torch.nn.functional as F

from helpers import teacher_forced_logits, var_pipeline
from sparvar import create_model
from sparvar.attention.policy import DenseAttention
from sparvar.errors import SparvarError
from sparvar.models.registry import MODELS
from sparvar.models.var.quant import phi_index
from sparvar.models.var.transformer import VARTransformer
from sparvar.models.var.vqvae import VQVAE
from sparvar.schedules import VAR_256, VAR_512, parse_schedule


@pytest.mark.parametrize("shared_aln,cfg", [(False, 2.5), (True, 1.5), (False, 0.0)])
@pytest.mark.slow
def test_kv_cache_generation_equals_teacher_forcing(shared_aln, cfg):
    pipe = var_pipeline(seed=2, shared_aln=shared_aln)
    seen = []
    out = pipe([3, 7], seed=5, cfg=cfg, top_k=0, top_p=0.0, progress=False,
               on_scale=lambda k, logits, tokens: seen.append(logits))
    schedule = out.schedule
    assert schedule == VAR_256 and [t.shape for t in out.tokens] == [(2, n) for n in schedule.lengths]
    full = teacher_forced_logits(pipe, [3, 7], schedule, out.tokens, cfg)
    step = torch.cat(seen, dim=1)
    assert full.shape == step.shape == (2, 680, pipe.spec.transformer.vocab)
    err = (full - step).norm() / full.norm()
    assert err < 1e-4, f"relative error {err}"


def test_guidance_ramps_from_zero_to_cfg():
    weights = [VARTransformer.guidance_weight(k, 10, 3.0) for k in range(10)]
    assert weights[0] == 0 and weights[-1] == pytest.approx(3.0)
    assert weights == pytest.approx([3.0 * k / 9 for k in range(10)])


@pytest.mark.parametrize("cfg,batch", [(0.0, 1), (1.0, 2)])
def test_every_attention_call_goes_through_the_policy(cfg, batch):
    """cfg 0 mixes nothing in (no unconditional half); the policy sees the cache prefix of each scale."""

    class Recorder(DenseAttention):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __call__(self, q, k, v, call):
            self.calls.append((call.layer, call.scale, q.shape[:3], k.shape[2], call.softmax_scale, k.data_ptr()))
            return super().__call__(q, k, v, call)

    pipe, policy = var_pipeline(), Recorder()
    pipe([1], cfg=cfg, attention=policy, progress=False)
    s, depth, heads = VAR_256, pipe.spec.transformer.depth, pipe.spec.transformer.heads
    expected = [(layer, k, (batch, heads, s.lengths[k]), s.kv_length(k), 1.0)
                for k in range(len(s)) for layer in range(depth)]
    assert [c[:5] for c in policy.calls] == expected
    assert len({c[5] for c in policy.calls if c[0] == 0}) == 1  # layer 0 reads one static buffer


def test_buffers_hold_levels_and_the_block_causal_mask():
    model = create_model("var-tiny", seed=1)
    levels = model.lvl_1L[0]
    assert [int(levels[o]) for o in VAR_256.offsets] == list(range(10)) and levels[-1] == 9
    allowed = torch.isfinite(model.attn_bias_for_masking[0, 0])
    assert torch.equal(allowed, levels[:, None] >= levels[None, :])
    assert model.attn_bias_for_masking.max() == 0


def test_model_schedules_and_their_errors():
    assert MODELS["var-d30"].schedule() == VAR_256 and VAR_256.total == 680
    assert MODELS["var-d36"].schedule("1:1", 512) == VAR_512 and VAR_512.total == 2240
    with pytest.raises(SparvarError, match="only 1:1 images at 256x256, not 4:3"):
        MODELS["var-d16"].schedule("4:3")
    with pytest.raises(SparvarError, match="only 1:1 images at 512x512"):
        MODELS["var-d36"].schedule("1:1", 256)
    pipe = var_pipeline()
    with pytest.raises(SparvarError, match="generates only the schedule it was trained on"):
        pipe([1], schedule=parse_schedule("1,2,3"), progress=False)


def test_class_labels_are_checked():
    pipe = var_pipeline()
    assert len(pipe([0, "9"], progress=False).images) == 2
    for bad in ([10], [-1], ["a dog"]):
        with pytest.raises(SparvarError, match=r"class-conditional: give class indices 0\.\.9"):
            pipe(bad, progress=False)


def test_phi_index_follows_the_official_ticks():
    # 4 Phis over 10 scales; scales 2 and 7 fall exactly between two ticks (see phi_index)
    assert [phi_index(k, 10, 4) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi_index(k, 4, 4) for k in range(4)] == [0, 1, 2, 3]
    assert [phi_index(k, 3, 2) for k in range(3)] == [0, 0, 1]  # other counts: margin 1/(2n)


@pytest.fixture(scope="module")
def vqvae():
    return VQVAE(MODELS["var-tiny"].vae).init_weights(4).eval()


def test_quantiser_reconstruction_is_the_sum_of_upsampled_residuals(vqvae):
    quant, schedule = vqvae.quantize, VAR_256
    f = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    indices, f_hat = quant.quantize(f, schedule)
    assert [i.shape for i in indices] == [(2, n) for n in schedule.lengths]
    expected = torch.zeros_like(f)
    for k, idx in enumerate(indices):
        h, w = schedule.sizes[k]
        codes = quant.embedding.weight[idx].transpose(1, 2).reshape(2, 8, h, w)
        up = F.interpolate(codes, size=(16, 16), mode="bicubic") if k < 9 else codes
        phi = quant.quant_resi.qresi_ls[phi_index(k, 10, 4)]
        expected += 0.5 * up + 0.5 * F.conv2d(up, phi.weight, phi.bias, padding=1)
    assert torch.allclose(f_hat, expected, atol=1e-5)
    assert torch.allclose(quant.latent(indices, schedule), f_hat, atol=1e-6)
    # the first scale quantises the mean of f to its nearest codeword
    assert torch.equal(indices[0][:, 0], torch.cdist(f.mean((2, 3)), quant.embedding.weight).argmin(-1))


def test_encode_then_decode_keeps_shapes_and_is_deterministic(vqvae):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    indices = vqvae.encode(images, VAR_256)
    assert [i.shape for i in indices] == [(2, n) for n in VAR_256.lengths]
    assert all(0 <= int(i.min()) and int(i.max()) < 32 for i in indices)
    assert all(torch.equal(a, b) for a, b in zip(indices, vqvae.encode(images, VAR_256)))
    out = vqvae.decode_indices(indices, VAR_256)
    assert out.shape == images.shape and out.abs().max() <= 1
    assert torch.equal(out, vqvae.decode_indices(indices, VAR_256))
    with pytest.raises(SparvarError, match="expected 32x32"):
        vqvae.encode(images[..., :16, :16], VAR_256)



def test_sampling_defaults_are_the_models_and_arguments_override_them():
    pipe, seen = var_pipeline(), []
    assert (pipe.spec.transformer.cfg, pipe.spec.transformer.top_k, pipe.spec.transformer.top_p) == (4.0, 900, 0.95)
    default = pipe([2], seed=1, progress=False)
    explicit = pipe([2], seed=1, cfg=4.0, tau=1.0, top_k=900, top_p=0.95, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(default.tokens, explicit.tokens))
    greedy = pipe([2], seed=1, top_k=1, progress=False, on_scale=lambda k, logits, tokens: seen.append(logits))
    assert all(torch.equal(t, logits.argmax(-1)) for t, logits in zip(greedy.tokens, seen))
    assert not all(torch.equal(a, b) for a, b in zip(default.tokens, greedy.tokens))

"""The Infinity transformer: KV-cache generation equals teacher forcing; RoPE; bitwise codes."""

import math

import pytest
import torch
from helpers import teacher_forced_logits, tiny_pipeline

from sparvar.kernels.fused import apply_rope
from sparvar.models.infinity.bitwise import BitwiseCodes
from sparvar.models.infinity.transformer import InfinityTransformer, RopeTable
from sparvar.schedules import Schedule, infinity_schedule


@pytest.mark.parametrize(
    "schedule,overrides",
    [
        (infinity_schedule("4:3", 512), {}),  # 10 scales, not square
        (infinity_schedule("1:1", 512), {"patchify": True}),  # the 8B's 2x2 patchified tokens
        (Schedule(((1, 1), (2, 3), (3, 3), (4, 5), (5, 4), (6, 6), (7, 9), (8, 8), (9, 12), (12, 11))), {"num_classes": 3, "text_width": 0}),
    ],
)
def test_kv_cache_generation_equals_teacher_forcing(schedule, overrides):
    torch.manual_seed(1)
    pipe = tiny_pipeline(**overrides)
    conditions = ["a small red house", "sea"] if pipe.spec.text_conditioned else [0, 2]
    seen = []
    cfg = 2.5
    out = pipe(conditions, seed=3, cfg=cfg, tau=1.0, schedule=schedule, progress=False,
               on_scale=lambda k, logits, bits: seen.append(logits))
    assert len(seen) == len(schedule) >= 10
    full = teacher_forced_logits(pipe, conditions, schedule, out.tokens, cfg)
    step = torch.cat(seen, dim=1)
    assert full.shape == step.shape
    err = (full - step).norm() / full.norm()
    assert err < 1e-4, f"relative error {err}"


def test_rope_angles_follow_row_then_column_recipe():
    s = infinity_schedule("1:1", 1024)
    table = RopeTable(*InfinityTransformer.positions(s), head_dim=128, device="cpu")
    off = s.offsets[9]  # the 32x32 scale, stretched onto the 64-grid
    token = 5 * 32 + 7
    row, col = round(5 * 64 / 32), round(7 * 64 / 32)
    inv = [10000 ** (-2 * i / 64) for i in range(32)]
    expect = torch.tensor([row * f for f in inv] + [col * f for f in inv])
    assert torch.allclose(table.cos[off + token], expect.cos(), atol=1e-5)
    assert torch.allclose(table.sin[off + token], expect.sin(), atol=1e-5)


def test_apply_rope_rotates_adjacent_pairs_and_keeps_norms():
    x = torch.randn(2, 3, 5, 8)
    angles = torch.randn(5, 4)
    y = apply_rope(x, angles.cos(), angles.sin())
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    a = angles[2, 1]
    x0, x1 = x[1, 2, 2, 2], x[1, 2, 2, 3]
    assert torch.allclose(y[1, 2, 2, 2], a.cos() * x0 - a.sin() * x1, atol=1e-6)
    assert torch.allclose(y[1, 2, 2, 3], a.sin() * x0 + a.cos() * x1, atol=1e-6)


@pytest.mark.parametrize("patchify", [False, True])
def test_bitwise_codes_round_trip(patchify):
    codes = BitwiseCodes(channels=6, patchify=patchify)
    schedule = Schedule(((3, 5),))
    bits = torch.randint(0, 2, (2, 15, codes.bits))
    c = codes.to_codes(bits, 0, schedule)
    assert c.shape == (2, 6, *codes.latent_size((3, 5)))
    assert torch.allclose(c.norm(dim=1), torch.ones(()))  # unit-norm codes per latent pixel
    assert torch.allclose(c.abs(), torch.full((), 1 / math.sqrt(6)))
    summed = codes.accumulate(None, c, 0, schedule)
    back = codes.next_input(summed, 0, schedule)  # a one-scale sum seen at its own size
    assert torch.equal((back > 0).long(), bits)


def test_next_input_is_the_sum_of_upsampled_codes_at_the_next_size():
    codes = BitwiseCodes(channels=2, patchify=False)
    schedule = Schedule(((1, 1), (2, 2), (4, 4)))
    b0 = torch.tensor([[[1, 0]]])
    summed = codes.accumulate(None, codes.to_codes(b0, 0, schedule), 0, schedule)
    assert summed.shape == (1, 2, 4, 4)
    # a 1x1 code upsampled is constant, so every coarser view equals it
    x1 = codes.next_input(summed, 1, schedule)
    assert torch.allclose(x1, torch.tensor([1.0, -1.0]) / math.sqrt(2) * torch.ones(1, 4, 1))


def test_next_input_resizes_bilinearly_as_official_infinity():
    """Official Infinity resizes the summed codes bilinearly (align_corners False); area, which an
    earlier version used, gives other inputs on a non-constant sum."""
    codes = BitwiseCodes(channels=3, patchify=False)
    schedule = Schedule(((2, 2), (3, 3), (8, 8)))
    summed = torch.randn(2, 3, 8, 8)
    got = codes.next_input(summed, 1, schedule)
    for mode, same in (("bilinear", True), ("area", False)):
        expected = torch.nn.functional.interpolate(summed, size=(3, 3), mode=mode).flatten(2).transpose(1, 2)
        assert torch.allclose(got, expected, atol=1e-3) == same, mode

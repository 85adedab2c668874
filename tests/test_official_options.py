"""The official generation options (their parity with the official code is in test_parity.py):
forced first scales, per-scale guidance, the official sampler's batch-wide generator, random classes."""

import pytest
import torch

from helpers import teacher_forced_logits, tiny_pipeline, var_pipeline
from sparvar.errors import SparvarError
from sparvar.schedules import parse_schedule

SCHEDULE = parse_schedule("1,2,4")


@pytest.mark.slow
def test_forced_scales_take_the_given_tokens_and_the_rest_are_drawn():
    pipe = tiny_pipeline()
    picture = torch.rand(1, 3, 8, 8) * 2 - 1
    given = pipe.image_tokens(picture, SCHEDULE)
    assert [tuple(t.shape) for t in given] == [(1, 1, 4), (1, 4, 4), (1, 16, 4)]
    out = pipe(["a", "b"], schedule=SCHEDULE, init_tokens=given, init_scales=2, top_k=0, progress=False)
    for k in range(2):
        assert torch.equal(out.tokens[k], given[k].expand(2, -1, -1))
    free = pipe(["a", "b"], schedule=SCHEDULE, top_k=0, progress=False)
    assert not torch.equal(free.tokens[0], out.tokens[0]) or not torch.equal(free.tokens[1], out.tokens[1])
    # the scale after the forced ones is the model's: greedy, it is the argmax of the guided logits a
    # full forward pass gives over the forced tokens (teacher forcing), not the picture's own tokens
    greedy = pipe(["a", "b"], schedule=SCHEDULE, init_tokens=given, init_scales=2, top_k=1, progress=False)
    logits = teacher_forced_logits(pipe, ["a", "b"], SCHEDULE, greedy.tokens, pipe.spec.transformer.cfg)
    last = logits[:, SCHEDULE.offsets[2]:]
    assert torch.equal(greedy.tokens[2], last.argmax(-1))
    assert not torch.equal(greedy.tokens[2], given[2].expand(2, -1, -1))


@pytest.mark.slow
def test_forcing_every_scale_decodes_the_picture_as_the_vae_encodes_it():
    pipe = tiny_pipeline()
    picture = torch.rand(1, 3, 8, 8) * 2 - 1
    given = pipe.image_tokens(picture, SCHEDULE)
    out = pipe(["a"], schedule=SCHEDULE, init_tokens=given, init_scales=3, progress=False)
    summed = None
    for k, bits in enumerate(given):
        summed = pipe.codes.accumulate(summed, pipe.codes.to_codes(bits, k, SCHEDULE), k, SCHEDULE)
    assert torch.allclose(out.pixels, pipe.vae.decode(summed), atol=1e-6)


def test_tokens_that_do_not_fit_a_scale_are_refused():
    pipe = tiny_pipeline()
    with pytest.raises(SparvarError, match="init_tokens of scale 1 have shape \\(1, 9, 4\\); scale 1 \\(2\\) has 4 tokens"):
        pipe(["a"], schedule=SCHEDULE, init_tokens=(torch.zeros(1, 1, 4), torch.zeros(1, 9, 4)), init_scales=2)
    with pytest.raises(SparvarError, match="do not fit scales up to \\(4, 4\\): give 8x8"):
        pipe.image_tokens(torch.zeros(1, 3, 16, 16), SCHEDULE)


@pytest.mark.slow
def test_one_guidance_value_per_scale_equals_the_same_value_everywhere():
    pipe = tiny_pipeline()
    scalar = pipe(["a"], schedule=SCHEDULE, cfg=2.5, tau=0.7, progress=False)
    listed = pipe(["a"], schedule=SCHEDULE, cfg=[2.5, 2.5, 2.5], tau=(0.7, 0.7, 0.7), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(scalar.tokens, listed.tokens))
    guided = {}
    for name, cfg in (("varied", [2.5, 2.5, 9.0]), ("scalar", 2.5)):
        seen = guided[name] = []
        pipe(["a"], schedule=SCHEDULE, cfg=cfg, top_k=1, progress=False, on_scale=lambda k, logits, d: seen.append(logits))
    assert all(torch.equal(a, b) for a, b in zip(guided["varied"][:2], guided["scalar"][:2]))
    assert not torch.allclose(guided["varied"][2], guided["scalar"][2])


@pytest.mark.slow
def test_the_official_sampler_shares_one_generator_across_the_batch():
    pipe = var_pipeline()
    alone = pipe([3], seed=7, sampler="official", top_k=0, top_p=0, progress=False)
    again = pipe([3], seed=7, sampler="official", top_k=0, top_p=0, progress=False)
    pair = pipe([5, 3], seed=7, sampler="official", top_k=0, top_p=0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(alone.tokens, again.tokens))
    assert not all(torch.equal(a[0], b[1]) for a, b in zip(alone.tokens, pair.tokens))  # item 1 drew after item 0
    ours = pipe([3], seed=7, top_k=0, top_p=0, progress=False)
    ours_pair = pipe([5, 3], seed=[6, 7], top_k=0, top_p=0, progress=False)
    assert all(torch.equal(a[0], b[1]) for a, b in zip(ours.tokens, ours_pair.tokens))


@pytest.mark.slow
def test_random_classes_come_from_the_seed():
    pipe = var_pipeline()
    first = pipe([None, "random", 4], seed=3, progress=False)
    again = pipe([None, "random", 4], seed=3, progress=False)
    assert first.labels == again.labels and first.labels[2] == 4
    assert all(0 <= label < pipe.spec.num_classes for label in first.labels)
    drawn = {tuple(pipe([None] * 4, seed=s, progress=False).labels) for s in range(4)}
    assert len(drawn) > 1
    official = pipe([None, None], seed=3, sampler="official", progress=False)
    assert official.labels == pipe([None, None], seed=3, sampler="official", progress=False).labels


@pytest.mark.slow
def test_more_smooth_mixes_codewords_and_still_decodes():
    pipe = var_pipeline()
    smooth = pipe([1, 2], seed=0, more_smooth=True, progress=False)
    plain = pipe([1, 2], seed=0, progress=False)
    assert smooth.pixels.shape == plain.pixels.shape
    assert not torch.allclose(smooth.pixels, plain.pixels)
    assert all(torch.equal(a, b) for a, b in zip(smooth.tokens[:1], plain.tokens[:1]))  # the first draws agree

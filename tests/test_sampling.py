import torch

from sparvar.sampling import filter_logits, sample


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.8))
    assert kept.tolist() == [[True, True, False, False]]
    # on bits with top_p 0.97 (Infinity's default) a 2% bit is dropped, a 4% bit kept
    bits = torch.tensor([[0.98, 0.02], [0.96, 0.04]]).log()
    assert torch.isfinite(filter_logits(bits, top_p=0.97)).tolist() == [[True, False], [True, True]]


def test_greedy_and_filtered_tokens_are_never_drawn():
    logits = torch.randn(3, 50, 7)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    assert torch.equal(sample(logits, gens, top_k=1), logits.argmax(-1))
    drawn = sample(logits, gens, top_k=3)
    top3 = logits.topk(3, dim=-1).indices
    assert (drawn[..., None] == top3).any(-1).all()


def test_frequencies_follow_probabilities_and_seeds_repeat():
    logits = torch.tensor([0.2, 0.5, 0.3]).log().expand(1, 20000, 3)
    draws = sample(logits, [torch.Generator().manual_seed(7)])
    freq = torch.bincount(draws.flatten(), minlength=3).float() / draws.numel()
    assert torch.allclose(freq, torch.tensor([0.2, 0.5, 0.3]), atol=0.015)
    assert torch.equal(draws, sample(logits, [torch.Generator().manual_seed(7)]))
    assert not torch.equal(draws, sample(logits, [torch.Generator().manual_seed(8)]))


def test_each_item_uses_its_own_generator():
    logits = torch.randn(1, 100, 2)
    alone = sample(logits, [torch.Generator().manual_seed(5)])
    batched = sample(logits.expand(2, -1, -1), [torch.Generator().manual_seed(9), torch.Generator().manual_seed(5)])
    assert torch.equal(batched[1:], alone)


def _general_draw(logits, u, top_k, top_p):
    """The inverse-CDF draw of `sample` for any vocabulary, on given uniforms."""
    cdf = filter_logits(logits, top_k, top_p).softmax(dim=-1).cumsum(dim=-1)
    return (cdf <= u[..., None] * cdf[..., -1:]).sum(dim=-1).clamp_max(logits.shape[-1] - 1)


def test_two_token_draws_equal_the_general_path():
    """Bits take a path without sort and cumsum; it draws what the general path draws."""
    logits = torch.randn(3, 4000, 6, 2) * 3
    for top_k, top_p in [(0, 0.0), (0, 0.97), (0, 0.6), (1, 0.0), (2, 0.9)]:
        drawn = sample(logits, [torch.Generator().manual_seed(i) for i in range(3)], top_k, top_p)
        u = torch.stack([torch.rand(logits.shape[1:-1], generator=torch.Generator().manual_seed(i)) for i in range(3)])
        general = _general_draw(logits, u, top_k, top_p)
        assert (drawn != general).float().mean() < 1e-4  # only draws within rounding of a boundary differ
        assert 0.05 < drawn.float().mean() < 0.95

"""CUDA-graph replay of the scale loop gives the eager generation (GPU only)."""

import pytest
import torch

from sparvar import load_pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.mark.parametrize("model,condition", [("infinity-tiny", "a boat"), ("var-tiny", 3)])
@pytest.mark.parametrize("attention", ["dense", "paper"])
def test_graph_replays_equal_eager_generations(model, condition, attention):
    pipe = load_pipeline(model, device="cuda", dtype=torch.float32)
    schedule = pipe.schedule()
    eager = [pipe([condition], seed=s, schedule=schedule, attention=attention, progress=False) for s in (1, 2, 3)]
    graphed = [pipe([condition], seed=s, schedule=schedule, attention=attention, cuda_graphs=True, progress=False)
               for s in (1, 2, 3)]  # warm-up, capture, replay
    assert pipe._graphs is not None and pipe._graphs[1].captured
    for e, g in zip(eager, graphed):
        for a, b in zip(e.tokens, g.tokens):
            assert (a != b).float().mean() < 1e-3  # kernels may differ in the last bits; tokens barely
    if attention != "dense":
        assert graphed[-1].policy.stats()["total"]["saved_fraction"] > 0.1  # stats survive replays
    # the decoder ran in the graphs' pool between replays: later replays are unharmed, and equal
    again = [pipe([condition], seed=1, schedule=schedule, attention=attention, cuda_graphs=True, progress=False)
             for _ in range(2)]
    assert torch.equal(again[0].pixels, again[1].pixels) and again[0].pixels.device.type == "cpu"
    for a, b in zip(eager[0].tokens, again[1].tokens):
        assert (a != b).float().mean() < 1e-3


@pytest.mark.parametrize("model,condition", [("infinity-tiny", "a boat"), ("var-tiny", 3)])
@pytest.mark.parametrize("attention", ["dense", "paper"])
def test_graphs_with_token_pruning_and_adaptive_skip(model, condition, attention):
    import math

    from sparvar.skipping import AdaptiveSkip

    pipe = load_pipeline(model, device="cuda", dtype=torch.float32)
    schedule = pipe.schedule()
    stop = AdaptiveSkip((math.inf, 0.0))  # every item stops before the last scale
    for options in (dict(prune="fastvar"), dict(prune="fastvar", adaptive_skip=stop)):
        eager = [pipe([condition], seed=s, schedule=schedule, attention=attention, progress=False, **options)
                 for s in (1, 2, 3)]
        graphed = [pipe([condition], seed=s, schedule=schedule, attention=attention, cuda_graphs=True,
                        progress=False, **options) for s in (1, 2, 3)]  # warm-up, capture, replay
        assert pipe._graphs[1].captured  # the warm-up and capture ran every scale, even when stopping early
        for e, g in zip(eager, graphed):
            assert e.scales_used == g.scales_used  # tokens of later scales may be drawn, unused
            for a, b in zip(e.tokens[: e.scales_used[0]], g.tokens):
                assert (a != b).float().mean() < 1e-3
        if "adaptive_skip" in options:
            assert graphed[-1].scales_used == [len(schedule) - 1] and len(graphed[-1].tokens) == len(schedule) - 1

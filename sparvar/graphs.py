"""CUDA graphs of the transformer's per-scale forward, replayed on static buffers.

At small scales a generation step is a few hundred tiny kernels whose launch cost exceeds
their work (30-40 ms per scale on an H200 for Infinity-2B/8B). A graph per scale replays them
with one launch. Everything a graph reads lives at a fixed address: the scale's input (a view
of one buffer all scales share),
a copy of the condition tensors, the static KV cache, and whatever the attention policy cached
or kept (tables, CS4A's selected keys and residuals) when it was captured, and the token
pruning's cached update (pruning.py).

Capture happens during a real generation: each scale is captured, then replayed to produce its
result, so the capturing generation is itself correct. The policy's Python code runs only then;
replays re-run its captured kernels, so a policy must keep its per-generation state in tensors
it created while being captured (SparVARPolicy does) and must not be reset between replays;
so must token pruning.
"""

from __future__ import annotations

import torch

from sparvar.schedules import Schedule


def _copy_into(static, value):
    """Copy a structure of tensors (dataclass fields, lists, tuples) into one of the same shape."""
    if isinstance(static, torch.Tensor):
        static.copy_(value)
    elif isinstance(static, (list, tuple)):
        for s, v in zip(static, value):
            _copy_into(s, v)
    elif static is not None:
        for name in vars(static):
            _copy_into(getattr(static, name), getattr(value, name))


def shapes(value) -> tuple:
    """Shapes of every tensor in a structure: what a captured graph depends on."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape),)
    if isinstance(value, (list, tuple)):
        return tuple(s for v in value for s in shapes(v))
    if value is None:
        return ()
    return tuple(s for v in vars(value).values() for s in shapes(v))


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if value is None:
        return None
    return type(value)(**{name: _clone(v) for name, v in vars(value).items()})


class ScaleGraphs:
    """Graphs of the first `num_scales` scales for fixed shapes, cache and policy."""

    def __init__(self, transformer, schedule: Schedule, num_scales: int, prep, cache, policy, pruning=None):
        self.transformer, self.schedule, self.cache, self.policy = transformer, schedule, cache, policy
        self.pruning = pruning
        self.prep = _clone(prep)
        self.pool = torch.cuda.MemPool()  # shared: graphs replay in capture order
        # every scale's input is a view of one buffer sized for the largest: scales run one at a time
        batch, _, width = prep.start.shape
        self.input_buffer = prep.start.new_empty(batch * max(schedule.lengths[:num_scales]) * width)
        self.inputs: list[torch.Tensor | None] = [None] * num_scales
        self.outputs: list[torch.Tensor | None] = [None] * num_scales
        self.graphs: list[torch.cuda.CUDAGraph | None] = [None] * num_scales

    @property
    def captured(self) -> bool:
        return all(g is not None for g in self.graphs)

    def load(self, prep) -> None:
        """Condition tensors of a new generation into the captured buffers."""
        _copy_into(self.prep, prep)

    def between_replays(self):
        """A context routing allocations to the graphs' pool, for work that ends before the next
        replay (the decoder): the pool's free blocks are the scales' temporaries, idle until then.
        Nothing allocated inside may outlive it: a replay writes its temporaries where they were."""
        return torch.cuda.use_mem_pool(self.pool)

    def run(self, scale: int, x: torch.Tensor) -> torch.Tensor:
        """Logits of `scale` for input x, capturing the scale's graph the first time."""
        if self.graphs[scale] is None:
            self.inputs[scale] = self.input_buffer[: x.numel()].view(x.shape)
            self.inputs[scale].copy_(x)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool.id):
                self.outputs[scale] = self.transformer.forward_scale(
                    self.inputs[scale], scale, self.schedule, self.prep, self.cache, self.policy, self.pruning
                )
            self.graphs[scale] = graph
        else:
            self.inputs[scale].copy_(x)
        self.graphs[scale].replay()
        return self.outputs[scale]

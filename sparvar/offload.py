"""Weights kept in CPU memory for cards too small for them (load_pipeline's `offload`).

- "text": the text encoder lives in pinned CPU memory and visits the GPU for each encoding, its
  stack of layers one layer at a time, then is dropped there (its weights never change, so
  nothing is copied back): the 2.4 GB of Flan-T5-XL are free while the transformer runs, and
  an encoding holds its embeddings and about one of its 24 layers on the card, not all of it
  (docs/memory_proofs.md: the whole encoder's 2.28 GiB were what broke the 16 GiB cap).
- "blocks": the same for T5, and the transformer blocks stream from pinned CPU memory through
  two device-resident blocks: while one computes, the next block's weights are copied into the
  other on a side stream. The rest of the transformer (embeddings, head) stays on the GPU.

Each module's tensors are packed into one flat buffer (`FlatTensors`), so a move is one copy.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

ALIGN = 256  # bytes; every tensor of a flat buffer starts at a multiple


def _entries(module: nn.Module, skip: frozenset[int] = frozenset()) -> list[tuple[nn.Module, str, torch.Tensor, bool]]:
    """(owner, name, tensor, is_parameter) of every parameter and buffer, tied ones repeated;
    modules whose id is in `skip` left out."""
    out = []
    for owner in module.modules():
        if id(owner) in skip:
            continue
        out += [(owner, n, p, True) for n, p in owner._parameters.items() if p is not None]
        out += [(owner, n, b, False) for n, b in owner._buffers.items() if b is not None]
    return out


class FlatTensors:
    """A module's tensors packed into one byte buffer on `device` (pinned on the CPU when a GPU
    will read it), the module's parameters and buffers turned into views of it. `point(flat)`
    turns them into views of another buffer of the same layout. Modules whose id is in `skip`
    keep their own tensors."""

    def __init__(self, module: nn.Module, device, pin: bool = False, skip: frozenset[int] = frozenset()):
        self.entries, self.layout, offsets, total = _entries(module, skip), [], {}, 0
        for _, _, t, _ in self.entries:
            if id(t) not in offsets:  # a tied tensor keeps one place
                offsets[id(t)] = total
                total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
            self.layout.append((offsets[id(t)], t.dtype, t.shape))
        self.flat = torch.empty(total, dtype=torch.uint8, device=device, pin_memory=pin)
        for (_, _, t, _), view in zip(self.entries, self.views(self.flat)):
            view.copy_(t)
        self.point(self.flat)

    def signature(self) -> list:
        return [(o, d, tuple(s)) for o, d, s in self.layout]

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o : o + dtype.itemsize * shape.numel()].view(dtype).view(shape) for o, dtype, shape in self.layout]

    def point(self, flat: torch.Tensor) -> None:
        for (owner, name, _, is_param), view in zip(self.entries, self.views(flat)):
            if is_param:
                owner._parameters[name] = nn.Parameter(view, requires_grad=False)
            else:
                owner._buffers[name] = view


class OffloadedModule:
    """A module whose weights wait in CPU memory and visit `device` only while it works: each of
    `layers` (its stack of layers, `layer_stack`) only while that layer runs, the rest from
    `bring` to `release`."""

    def __init__(self, module: nn.Module, device, layers: nn.ModuleList | None = None):
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        layers = list(layers or [])
        inside = frozenset(id(m) for layer in layers for m in layer.modules())
        self.store = FlatTensors(module.cpu(), "cpu", pin=pin, skip=inside)
        self.visiting = False
        for layer in layers:
            store = FlatTensors(layer, "cpu", pin=pin)
            layer.register_forward_pre_hook(lambda _module, _args, store=store: self._visit(store))
            layer.register_forward_hook(lambda _module, _args, _out, store=store: store.point(store.flat))

    def _visit(self, store: FlatTensors) -> None:
        """A store's weights onto the device during a visit: one copy, ordered before the kernels
        that use them."""
        if self.visiting:
            store.point(store.flat.to(self.device, non_blocking=True))

    def bring(self) -> None:
        """The weights outside the layers onto the device (the layers come as they run)."""
        self.visiting = True
        self._visit(self.store)

    def release(self) -> None:
        """Back to the CPU copy; the device buffer is freed once the queued kernels are done."""
        self.store.point(self.store.flat)
        self.visiting = False


def layer_stack(module: nn.Module) -> nn.ModuleList | None:
    """The module's stack of layers: its ModuleList holding the most parameters (T5's
    `encoder.block`, Qwen2's `layers`), or None."""
    stacks = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    return max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


class BlockStream:
    """Blocks in pinned CPU memory, fetched one at a time into two device-resident carriers.

    `fetch(layer)` returns a carrier holding that block's weights: the current stream waits for
    its copy, and the copy of the next layer into the other carrier starts on a side stream once
    the block that last used that carrier is done. A carrier's tensors are overwritten two
    fetches later, so callers use what a fetched block returns at once (results, not views).
    """

    def __init__(self, blocks: list[nn.Module], device):
        self.device, self.cuda = torch.device(device), torch.device(device).type == "cuda"
        carriers = [copy.deepcopy(blocks[0]).to(self.device) for _ in range(2)]
        self.carriers = [FlatTensors(c, self.device) for c in carriers]
        self.modules = carriers
        self.stores = [FlatTensors(b.cpu(), "cpu", pin=self.cuda) for b in blocks]
        if any(s.signature() != self.carriers[0].signature() for s in self.stores):
            raise ValueError("streamed blocks must all have the same tensors")
        self.loaded = [-1, -1]  # the layer each carrier holds (or is being copied)
        self.turn = 0
        if self.cuda:
            self.side = torch.cuda.Stream(self.device)
            self.ready = [torch.cuda.Event(), torch.cuda.Event()]
            self.freed = [torch.cuda.Event(), torch.cuda.Event()]

    def fetch(self, layer: int) -> nn.Module:
        slot, other = self.turn % 2, (self.turn + 1) % 2
        self.turn += 1
        if self.loaded[slot] != layer:  # not prefetched (the first block, or another order)
            self._copy(layer, slot)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
            self.freed[other].record(torch.cuda.current_stream(self.device))  # the block that used it is queued
        self._copy((layer + 1) % len(self.stores), other)
        return self.modules[slot]

    def _copy(self, layer: int, slot: int) -> None:
        target, source = self.carriers[slot].flat, self.stores[layer].flat
        if self.cuda:
            with torch.cuda.stream(self.side):
                self.side.wait_event(self.freed[slot])
                target.copy_(source, non_blocking=True)
                self.ready[slot].record(self.side)
        else:
            target.copy_(source)
        self.loaded[slot] = layer


def move_except_blocks(model: nn.Module, device) -> None:
    """Every parameter and buffer of `model` onto `device`, except those of its blocks."""
    inside = {id(m) for block in model.blocks for m in block.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.to(device)

"""Memory modes (offload.py): the same images with weights kept in CPU memory."""

from __future__ import annotations

import pytest
import torch

from helpers import same_generation
from sparvar.cli import main as cli_main
from sparvar.errors import SparvarError
from sparvar.loading import load_pipeline
from sparvar.offload import BlockStream, FlatTensors, OffloadedModule, layer_stack

ON_GPU = torch.cuda.is_available()


def test_flat_tensors_keep_values_and_ties_in_one_buffer():
    module = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 3).to(torch.bfloat16))
    module.register_buffer("steps", torch.arange(7))
    module.tied = torch.nn.Linear(3, 5)
    module.tied.weight = module[0].weight
    before = {k: v.clone() for k, v in module.state_dict().items()}
    flat = FlatTensors(module, "cpu")
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert module.tied.weight.data_ptr() == module[0].weight.data_ptr()
    for t in after.values():  # every tensor is a view of the flat buffer
        assert flat.flat.data_ptr() <= t.data_ptr() < flat.flat.data_ptr() + flat.flat.numel()


@pytest.mark.parametrize("model,conditions", [("infinity-tiny", ["a boat", "a tree"]), ("var-tiny", [3, 5]),
                                              ("hart-tiny", ["a boat", "a tree"])])
@pytest.mark.parametrize("offload", ["text", "blocks"])
@pytest.mark.parametrize("precision", ["auto", "fp8"])
@pytest.mark.slow
def test_offloaded_pipelines_make_the_same_images(model, conditions, offload, precision):
    if offload == "text" and model == "var-tiny":
        with pytest.raises(SparvarError, match="has no text encoder"):
            load_pipeline(model, device="cpu", random_weights=True, offload=offload)
        return
    plain = load_pipeline(model, device="cpu", random_weights=True, precision=precision)
    moved = load_pipeline(model, device="cpu", random_weights=True, precision=precision, offload=offload)
    assert (moved.transformer.stream is not None) == (offload == "blocks")
    for _ in range(2):  # streaming state carries over between generations
        assert same_generation(plain(conditions, seed=1, progress=False), moved(conditions, seed=1, progress=False))


def test_block_stream_serves_any_order():
    blocks = [torch.nn.Linear(4, 4) for _ in range(3)]
    weights = [b.weight.detach().clone() for b in blocks]
    stream = BlockStream(blocks, "cpu")
    for layer in (0, 1, 2, 0, 2, 2, 1):  # prefetches of layer + 1 that miss are copied again
        assert torch.equal(stream.fetch(layer).weight, weights[layer])


def test_offload_values_are_checked(capsys, tmp_path):
    with pytest.raises(SparvarError, match="unknown offload 'gpu'; choose text or blocks, or leave it out"):
        load_pipeline("var-tiny", device="cpu", random_weights=True, offload="gpu")
    for option, message in (("gpu", "unknown offload 'gpu'"), ("text", "offload 'text': var-tiny has no text encoder")):
        assert cli_main(["generate", "--model", "var-tiny", "--offload", option, "--out", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err == f"error: {message}" + ("; choose text or blocks, or leave it out\n"
                                                                  if option == "gpu" else "\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_offloaded_weights_leave_the_gpu():
    pipe = load_pipeline("infinity-2b", device="cuda", random_weights=True, offload="blocks")
    on_gpu = sum(t.numel() * t.element_size() for t in pipe.transformer.state_dict().values() if t.is_cuda)
    assert on_gpu < 0.05 * sum(t.numel() * t.element_size() for t in pipe.transformer.state_dict().values())
    assert not next(pipe.text_encoder.model.parameters()).is_cuda
    ref = load_pipeline("infinity-2b", device="cuda", random_weights=True)
    schedule = ref.schedule("1:1", 256)
    a = ref(["a fox"], seed=0, schedule=schedule, progress=False)
    b = pipe(["a fox"], seed=0, schedule=schedule, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))


def test_offloaded_module_moves_nothing_back():
    module = torch.nn.Linear(3, 3)
    store = OffloadedModule(module, "cpu")
    host = store.store.flat.data_ptr()
    store.bring()
    store.release()
    assert module.weight.data_ptr() - host < store.store.flat.numel()


class _Stack(torch.nn.Module):
    """A small encoder: an input projection, a stack of layers, a norm."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(4, 8)
        self.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
                                          for _ in range(3))
        self.small = torch.nn.ModuleList([torch.nn.Linear(8, 2)])
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def test_offloaded_layers_visit_the_device_one_at_a_time():
    """Each layer of the stack is on the device only while it runs; the rest from bring to
    release; the output is the module's own ("meta" stands in for the GPU on the CPU)."""
    module = _Stack()
    expected = module(torch.ones(2, 4))
    assert layer_stack(module) is module.layers  # the ModuleList holding the most parameters
    store = OffloadedModule(module, "meta", layer_stack(module))
    seen = []
    for i, layer in enumerate(module.layers):
        layer.register_forward_pre_hook(lambda _m, _a, i=i: seen.append(
            (i, [next(other.parameters()).device.type for other in module.layers], module.norm.weight.device.type)))
    store.bring()
    assert module.embed.weight.is_meta and not module.layers[0][0].weight.is_meta
    assert module(torch.ones(2, 4, device="meta")).is_meta
    store.release()
    assert seen == [(i, ["meta" if j == i else "cpu" for j in range(3)], "meta") for i in range(3)]
    assert all(not p.is_meta for p in module.parameters())  # all back in CPU memory
    torch.testing.assert_close(module(torch.ones(2, 4)), expected)

"""The demo model: data loader, tokenizer quantiser, training command, shipped weights, default job."""

import gzip

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sparvar.checkpoint import load_strict
from sparvar.cli import main
from sparvar.demo import train
from sparvar.demo.data import FASHION_MNIST_CLASSES, export_npz, load_fashion_mnist, load_images, read_idx
from sparvar.demo.tokenizer import quantize
from sparvar.errors import SparvarError
from sparvar.models.infinity.bitwise import BitwiseCodes
from sparvar.models.infinity.transformer import InfinityTransformer
from sparvar.models.infinity.vae import InfinityVAE
from sparvar.models.registry import MODELS
from sparvar.pipeline import load_pipeline
from sparvar.schedules import parse_schedule


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    """A Fashion-MNIST folder in the Debian package's layout, with a few random images."""
    root = tmp_path_factory.mktemp("fashion-mnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 24), ("t10k", 8)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def test_loader_reads_the_package_layout_and_the_npz(fashion_root, tmp_path):
    x, y = load_fashion_mnist(fashion_root, "train")
    assert x.shape == (24, 28, 28) and x.dtype == np.uint8 and y.tolist() == [i % 10 for i in range(24)]
    assert np.array_equal(read_idx(fashion_root / "t10k-images-idx3-ubyte.gz"), load_images(fashion_root, "test")[0])
    export_npz(tmp_path / "fm.npz", fashion_root)
    x2, y2 = load_images(tmp_path / "fm.npz", "train")
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert len(FASHION_MNIST_CLASSES) == 10


def test_loader_says_what_to_install(tmp_path):
    with pytest.raises(SparvarError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_quantiser_builds_what_the_sampler_loop_builds():
    schedule = parse_schedule("1,2,3,5,8")
    z = torch.nn.functional.interpolate(torch.randn(2, 6, 3, 3), size=(8, 8), mode="bilinear")
    codes, summed, errors = BitwiseCodes(6, patchify=False), None, []
    labels, inputs, quantised = quantize(z, schedule, codes)
    for k, bits in enumerate(labels):  # what pipeline.py does with sampled bits
        assert bits.shape == (2, schedule.lengths[k], 6)
        summed = codes.accumulate(summed, codes.to_codes(bits, k, schedule), k, schedule)
        errors.append(float((summed - z).norm() / z.norm()))
        if k + 1 < len(schedule):
            assert torch.allclose(codes.next_input(summed, k + 1, schedule), inputs[k], atol=1e-6)
    assert torch.allclose(summed, quantised, atol=1e-6)
    assert errors[-1] < errors[0] / 2  # residual quantisation: each scale corrects the ones before


def test_bit_flips_corrupt_inputs_and_later_labels_correct_them():
    schedule = parse_schedule("1,2,4")
    z = torch.randn(3, 4, 4, 4)
    codes = BitwiseCodes(z.shape[1], patchify=False)
    clean = quantize(z, schedule, codes)
    flipped = quantize(z, schedule, codes, flip=torch.tensor([0.0, 1.0, 1.0]))
    assert torch.equal(flipped[0][0], clean[0][0])  # scale 0 sees the clean residual
    assert torch.equal(flipped[1][0][0], clean[1][0][0])  # flip 0: sample 0 unchanged
    assert torch.equal(flipped[1][0][1], -clean[1][0][1])  # every bit flipped: the code changes sign
    assert not torch.equal(flipped[0][1][1:], clean[0][1][1:])  # the next scale's labels compensate


def test_training_command_writes_loadable_weights_and_a_log(fashion_root, tmp_path):
    argv = ["--out", str(tmp_path), "--data", str(fashion_root), "--schedule", "1,2,4", "--depth", "1",
            "--width", "64", "--heads", "1", "--encoder-width", "32", "--tokenizer-steps", "4", "--steps", "4",
            "--tokenizer-batch", "4", "--batch", "2", "--device", "cpu"]
    log = train.main(argv)
    assert log["tokenizer"]["steps"] == 4 and log["transformer"]["steps"] == 4
    assert log["data"]["train_images"] == 24 and log["command"].startswith("sparvar train-demo --out")
    spec = MODELS["infinity-demo"]
    model = InfinityTransformer(type(spec.transformer)(**log["transformer_config"]))
    load_strict(model, load_file(str(tmp_path / "transformer.safetensors")), "trained transformer")
    decoder = InfinityVAE(spec.vae)
    load_strict(decoder, decoder.checkpoint_state(load_file(str(tmp_path / "vae.safetensors"))), "trained decoder")
    assert (tmp_path / "train_log.json").is_file() and (tmp_path / "encoder.safetensors").is_file()


def test_demo_pipeline_loads_the_shipped_weights(capsys):
    spec = MODELS["infinity-demo"]
    pipe = load_pipeline("infinity-demo", device="cpu")
    shipped = load_file(str(spec.bundled_path("--weights")))
    assert torch.equal(pipe.transformer.head.weight, shipped["head.weight"])
    assert spec.bundled_path("--weights").stat().st_size + spec.bundled_path("--vae").stat().st_size < 25e6
    assert spec.classes == FASHION_MNIST_CLASSES and len(spec.schedule()) == 13
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "trained on Fashion-MNIST" in out and str(spec.bundled_path("--weights")) in out


def test_default_generate_compares_dense_and_default(tmp_path, capsys):
    """The README's command: demo model, full schedule, dense and the default policy, same seed.
    (Its time on the CI machine is recorded in benchmarks/demo_cpu.md, not asserted here.)"""
    assert main(["generate", "--out", str(tmp_path), "--quiet", "--device", "cpu"]) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["000_t-shirt_compare.png", "000_t-shirt_default.png", "000_t-shirt_dense.png"]
    out = capsys.readouterr().out
    assert "dense:" in out and "default:" in out and "attention density 100.0%" in out
    density = float(out.split("default:")[1].split("attention density ")[1].split("%")[0])
    assert 0 < density < 50

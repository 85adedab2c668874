"""Official-layout checkpoints load strictly (file, sharded folder, VAE container) or fail readably."""

import json

import pytest
import torch
from safetensors.torch import save_file

from sparvar import create_model, load_pipeline
from sparvar.errors import SparvarError
from sparvar.models.registry import MODELS, create_vae


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture()
def tiny_state():
    return create_model("infinity-tiny", seed=7).state_dict()


def test_single_file_round_trip(tmp_path, tiny_state):
    torch.save(tiny_state, tmp_path / "tiny.pth")
    pipe = load_pipeline("infinity-tiny", weights=str(tmp_path / "tiny.pth"), device="cpu")
    assert _states_equal(pipe.transformer.state_dict(), tiny_state)
    assert not _states_equal(create_model("infinity-tiny", seed=8).state_dict(), tiny_state)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_folder_with_index(tmp_path, tiny_state, fmt):
    keys = sorted(tiny_state)
    halves = {f"part-0.{fmt}": keys[: len(keys) // 2], f"part-1.{fmt}": keys[len(keys) // 2 :]}
    weight_map = {}
    for name, part in halves.items():
        shard = {k: tiny_state[k].contiguous() for k in part}
        save_file(shard, tmp_path / name) if fmt == "safetensors" else torch.save(shard, tmp_path / name)
        weight_map.update({k: name for k in part})
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (tmp_path / index).write_text(json.dumps({"weight_map": weight_map}))
    pipe = load_pipeline("infinity-tiny", weights=str(tmp_path), device="cpu")
    assert _states_equal(pipe.transformer.state_dict(), tiny_state)


def _official_module_name(key: str) -> str:
    """decoder.mid.block_1.norm1.weight -> decoder.mid.block_1.norm1.norm.weight (convs get .conv)."""
    module, param = key.rsplit(".", 1)
    wrapper = "norm" if "norm" in module.rsplit(".", 1)[-1] else "conv"
    return f"{module}.{wrapper}.{param}"


def test_vae_file_with_official_module_names(tmp_path):
    spec = MODELS["infinity-tiny"]
    decoder = create_vae(spec, seed=3).state_dict()
    # the official module classes wrap convs and norms; the file also holds encoder and quantizer
    wrapped = {_official_module_name(k): v for k, v in decoder.items()}
    assert "decoder.conv_in.conv.weight" in wrapped and "decoder.norm_out.norm.weight" in wrapped
    wrapped["encoder.conv_in.conv.weight"] = torch.zeros(3)
    wrapped["quantizer.lfq.mask"] = torch.arange(4)
    torch.save({"vae": wrapped}, tmp_path / "vae.pth")
    pipe = load_pipeline("infinity-tiny", vae=str(tmp_path / "vae.pth"), device="cpu")
    assert _states_equal(pipe.vae.state_dict(), decoder)


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path, tiny_state):
    state = dict(tiny_state)
    del state["block_chunks.1.module.0.ffn.fc2.bias"]
    state["extra.weight"] = torch.zeros(2)
    state["head.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(SparvarError) as err:
        load_pipeline("infinity-tiny", weights=str(tmp_path / "bad.pth"), device="cpu")
    msg = str(err.value)
    assert "1 missing (block_chunks.1.module.0.ffn.fc2.bias)" in msg
    assert "1 unexpected (extra.weight)" in msg
    assert "head.bias (3,) vs (8,)" in msg


def test_checkpoint_of_another_model_is_named(tmp_path, tiny_state):
    torch.save(tiny_state, tmp_path / "tiny.pth")
    with pytest.raises(SparvarError, match="looks like a checkpoint of infinity-tiny; pass --model infinity-tiny"):
        load_pipeline("infinity-demo", weights=str(tmp_path / "tiny.pth"), device="cpu")


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SparvarError, match="cannot read checkpoint"):
        load_pipeline("infinity-tiny", weights=str(tmp_path / "junk.pth"), device="cpu")
    with pytest.raises(SparvarError, match="checkpoint not found"):
        load_pipeline("infinity-tiny", weights=str(tmp_path / "nope.pth"), device="cpu")
    with pytest.raises(SparvarError, match="without an index json or weight files"):
        load_pipeline("infinity-tiny", weights=str(tmp_path), device="cpu")


def test_official_models_say_which_files_they_need():
    with pytest.raises(SparvarError, match=r"--weights \(infinity_2b_reg.pth\), --vae \(infinity_vae_d32reg.pth\), --text-encoder"):
        load_pipeline("infinity-2b", device="cpu")


def test_missing_text_encoder_folder_is_not_downloaded(tmp_path):
    from sparvar.models.infinity.text import TextEncoder

    with pytest.raises(SparvarError, match="T5 text encoder folder not found"):
        TextEncoder.from_folder(tmp_path / "flan-t5-xl", "cpu", torch.float32)

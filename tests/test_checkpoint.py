"""Official-layout checkpoints load strictly (file, sharded folder, VAE container) or fail readably."""

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from sparvar import Pipeline, create_model, load_pipeline
from sparvar.checkpoint import load_strict, read_state_dict
from sparvar.errors import SparvarError
from sparvar.models.registry import MODELS, create_vae
from sparvar.models.var.transformer import VARTransformer
from sparvar.models.var.vqvae import VQVAE


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
    vae = create_vae(spec, seed=3).state_dict()
    # the official module classes wrap convs and norms; the file also holds the quantizer's masks
    wrapped = {_official_module_name(k): v for k, v in vae.items()}
    assert "decoder.conv_in.conv.weight" in wrapped and "decoder.norm_out.norm.weight" in wrapped
    assert "encoder.down.0.downsample.conv.conv.weight" in wrapped
    wrapped["quantizer.lfq.mask"] = torch.arange(4)
    torch.save({"vae": wrapped}, tmp_path / "vae.pth")
    pipe = load_pipeline("infinity-tiny", vae=str(tmp_path / "vae.pth"), device="cpu")
    assert _states_equal(pipe.vae.state_dict(), vae)


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


class _RunsCode:
    """Unpickling this calls a function the file names: what reading weights must refuse."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def _cut(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kind,expected", [
    ("code", "holds objects other than tensors (print): refused for safety"),
    ("empty", "the file is empty (0 bytes)"),
    ("text", "not a PyTorch checkpoint: neither torch.save's archive nor a safetensors file"),
    ("cut archive", "a torch.save archive that is cut short or damaged"),
    ("cut safetensors", "a safetensors file that is cut short or damaged"),
])
def test_a_file_that_is_no_checkpoint_is_named_in_one_line(tmp_path, capsys, tiny_state, kind, expected):
    from sparvar.cli import main

    path = tmp_path / "weights.pth"
    if kind == "code":
        torch.save({"head.weight": torch.zeros(2), "extra": _RunsCode()}, path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("transformer weights: see the download page\n")
    elif kind == "cut archive":
        torch.save(tiny_state, path)
        _cut(path)
    else:
        save_file({k: v.contiguous() for k, v in tiny_state.items()}, path)
        _cut(path)
    argv = ["generate", "--model", "infinity-tiny", "--prompt", "x", "--weights", str(path), "--out", str(tmp_path),
            "--device", "cpu", "--quiet"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err == f"error: cannot read checkpoint {path}: {expected}"
    assert "weights_only" not in err and "this ran while loading" not in captured.out


def test_official_models_say_which_files_they_need():
    with pytest.raises(SparvarError, match=r"--weights \(infinity_2b_reg.pth\), --vae \(infinity_vae_d32reg.pth\), --text-encoder"):
        load_pipeline("infinity-2b", device="cpu")


def test_missing_text_encoder_folder_is_not_downloaded(tmp_path):
    from sparvar.models.infinity.text import TextEncoder

    with pytest.raises(SparvarError, match="T5 text encoder folder not found"):
        TextEncoder.from_folder(tmp_path / "flan-t5-xl", "cpu", torch.float32)


def test_missing_or_broken_hart_text_model_folder_is_one_line(tmp_path):
    from sparvar.models.hart.text import HARTTextEncoder

    with pytest.raises(SparvarError, match="^text model folder not found or incomplete: .*Qwen2-VL-1.5B-Instruct"):
        HARTTextEncoder.from_folder(tmp_path / "qwen", "cpu", torch.float32, 300)
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text("{not json")
    with pytest.raises(SparvarError, match="^cannot load the text model from ") as err:
        HARTTextEncoder.from_folder(tmp_path / "qwen", "cpu", torch.float32, 300)
    assert "\n" not in str(err.value)


def _official_var_state(official_layouts: dict, name: str, cfg, gen: torch.Generator) -> dict:
    """A state dict for the small config `cfg`: the key names of the released model `name` (from the
    official layout, blocks cut to cfg.depth), the shapes by the official formulas, random values,
    and the two buffers holding each token's scale and the block-causal mask."""
    c, total, levels = cfg.width, cfg.schedule.total, len(cfg.schedule)
    shapes = {
        "pos_start": (1, 1, c), "pos_1LC": (1, total, c), "lvl_1L": (1, total),
        "attn_bias_for_masking": (1, 1, total, total), "word_embed.weight": (c, cfg.vae_channels),
        "word_embed.bias": (c,), "class_emb.weight": (cfg.num_classes + 1, c), "lvl_embed.weight": (levels, c),
        "shared_ada_lin.1.weight": (6 * c, c), "shared_ada_lin.1.bias": (6 * c,),
        "head_nm.ada_lin.1.weight": (2 * c, c), "head_nm.ada_lin.1.bias": (2 * c,),
        "head.weight": (cfg.vocab, c), "head.bias": (cfg.vocab,),
    }
    block = {
        "ada_gss": (1, 1, 6, c), "ada_lin.1.weight": (6 * c, c), "ada_lin.1.bias": (6 * c,),
        "attn.scale_mul_1H11": (1, cfg.heads, 1, 1), "attn.q_bias": (c,), "attn.v_bias": (c,),
        "attn.zero_k_bias": (c,), "attn.mat_qkv.weight": (3 * c, c), "attn.proj.weight": (c, c),
        "attn.proj.bias": (c,), "ffn.fc1.weight": (4 * c, c), "ffn.fc1.bias": (4 * c,),
        "ffn.fc2.weight": (c, 4 * c), "ffn.fc2.bias": (c,),
    }
    state = {}
    for key in official_layouts[name]:
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            if int(i) < cfg.depth:
                state[key] = torch.randn(block[rest], generator=gen) * 0.1
        else:
            state[key] = torch.randn(shapes[key], generator=gen) * 0.1
    level = torch.repeat_interleave(torch.arange(levels), torch.tensor(cfg.schedule.lengths))
    state["lvl_1L"] = level[None]
    state["attn_bias_for_masking"] = torch.where(level[:, None] >= level[None, :], 0.0, -math.inf)[None, None]
    return state


@pytest.mark.parametrize("released", ["var-d16", "var-d36"])
@pytest.mark.slow
def test_official_layout_var_checkpoint_loads_strictly(tmp_path, official_layouts, released):
    spec = MODELS["var-tiny"]
    if released == "var-d36":  # the shared-AdaLN layout
        spec = replace(spec, transformer=replace(spec.transformer, shared_aln=True))
    state = _official_var_state(official_layouts, released, spec.transformer, torch.Generator().manual_seed(0))
    vae_state = create_vae(spec, seed=5).state_dict()
    torch.save(state, tmp_path / "var.pth")
    torch.save(vae_state, tmp_path / "vae.pth")
    with torch.device("meta"):
        transformer, vae = VARTransformer(spec.transformer), VQVAE(spec.vae)
    load_strict(transformer, read_state_dict(tmp_path / "var.pth"), "the transformer")
    load_strict(vae, read_state_dict(tmp_path / "vae.pth"), "the VQVAE")
    assert _states_equal(transformer.state_dict(), state) and _states_equal(vae.state_dict(), vae_state)
    pipe = Pipeline(spec, transformer.eval(), vae.eval())
    assert pipe([4], seed=0, progress=False).images[0].size == (32, 32)


def test_var_files_through_load_pipeline(tmp_path):
    torch.save(create_model("var-tiny", seed=3).state_dict(), tmp_path / "var.pth")
    pipe = load_pipeline("var-tiny", weights=str(tmp_path / "var.pth"), device="cpu")
    assert _states_equal(pipe.transformer.state_dict(), create_model("var-tiny", seed=3).state_dict())
    with pytest.raises(SparvarError, match="looks like a checkpoint of var-tiny; pass --model var-tiny"):
        load_pipeline("var-d16", weights=str(tmp_path / "var.pth"), vae="v.pth", device="cpu")
    with pytest.raises(SparvarError, match=r"needs --weights \(var_d30.pth\), --vae \(vae_ch160v4096z32.pth\)"):
        load_pipeline("var-d30", device="cpu")
    assert load_pipeline("var-tiny", random_weights=True, device="cpu", seed=1).vae.cfg.patch == 2


def test_var_vae_file_without_the_encoder_is_refused(tmp_path):
    state = {k: v for k, v in create_vae(MODELS["var-tiny"]).state_dict().items() if not k.startswith("encoder.")}
    torch.save(state, tmp_path / "vae.pth")
    with pytest.raises(SparvarError, match=r"does not fit var-tiny's VAE .* missing \(encoder\.conv_in"):
        load_pipeline("var-tiny", vae=str(tmp_path / "vae.pth"), device="cpu")


def test_integer_or_boolean_tensors_are_refused_naming_the_first(tmp_path, capsys):
    """The right names and shapes, but integers: one line, before any tensor is loaded."""
    from helpers import cli_error

    state = {k: v.round().to(torch.int64) for k, v in create_model("var-tiny", seed=1).state_dict().items()}
    state["attn_bias_for_masking"] = state["attn_bias_for_masking"].bool()
    torch.save(state, tmp_path / "ints.pth")
    err = cli_error(capsys, ["generate", "--model", "var-tiny", "--weights", str(tmp_path / "ints.pth"), "--class", "3",
                             "--device", "cpu", "--quiet", "--out", str(tmp_path / "out")])
    floats = [k for k, v in create_model("var-tiny", device="meta").state_dict().items() if v.is_floating_point()]
    assert f"{len(floats)} tensors hold integers or booleans where it takes floats ({floats[0]} int64, " \
           f"{floats[1]} int64, attn_bias_for_masking bool and {len(floats) - 3} more)" in err
    assert not list((tmp_path / "out").glob("*.png"))


def test_floats_of_another_precision_load_with_a_note(tmp_path, capsys):
    state = create_model("var-tiny", seed=1).state_dict()
    torch.save(state, tmp_path / "full.pth")
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "half.pth")
    full = {k: v for k, v in state.items() if v.is_floating_point()}  # not lvl_1L, each token's scale
    pipe = load_pipeline("var-tiny", weights=str(tmp_path / "half.pth"), device="cpu")
    err = capsys.readouterr().err.strip()
    assert err == f"note: var-tiny's transformer ({tmp_path / 'half.pth'}): converted {len(full)} float16 tensors " \
                  "to float32"
    loaded = pipe.transformer.state_dict()
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v.half().float()) for k, v in full.items())
    load_pipeline("var-tiny", weights=str(tmp_path / "full.pth"), device="cpu")
    assert capsys.readouterr().err == ""  # the model's own precision: nothing to say

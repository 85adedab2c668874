"""The HART family: official layouts, config files, the schedule with its text prefix, sampling
defaults, and the sampler loop with SparVAR on a tiny random model."""

import json
import math
from pathlib import Path

import pytest
import torch

from sparvar import create_model, load_pipeline
from sparvar.errors import SparvarError
from sparvar.generation import GenerationConfig
from sparvar.layout import default_sink_scales
from sparvar.models.hart.tokenizer import HARTTokenizer, config_from_json
from sparvar.models.hart.transformer import HARTConfig, HARTTransformer
from sparvar.models.registry import MODELS, get_spec
from sparvar.sparsity import plan_report

LAYOUTS = json.loads((Path(__file__).parent / "data" / "official_layouts_hart.json").read_text())


def test_transformer_layout_and_element_count_are_the_official_ones():
    """Built on meta from the believed config, as the official code builds it (recorded by
    tools/parity/record_hart.py); the two training buffers the loader drops aside."""
    official = LAYOUTS["hart-0.7b"]["layout"]
    model = create_model("hart-0.7b", device="meta")
    mine = {k: list(v.shape) for k, v in model.state_dict().items()}
    training_only = {"lvl_1L", "attn_bias_for_masking"}
    assert mine == {k: v for k, v in official.items() if k not in training_only}
    assert sum(v.numel() for v in model.state_dict().values()) == sum(
        math.prod(v) for k, v in official.items() if k not in training_only) == 729_787_968
    assert sum(p.numel() for p in model.diffloss.parameters()) == 36_585_536  # the "37M" diffusion head


def test_tokenizer_layout_is_the_official_autoencoder():
    with torch.device("meta"):
        tokenizer = HARTTokenizer(MODELS["hart-0.7b"].vae)
    mine = {k: list(v.shape) for k, v in tokenizer.state_dict().items()}
    official = {k: v for k, v in LAYOUTS["hart-tokenizer"]["layout"].items() if not k.startswith("disc.")}
    assert mine == official


def test_checkpoint_state_drops_the_training_buffers_and_checks_their_shape():
    model = create_model("hart-tiny", device="meta")
    total = model.cfg.schedule.total
    state = {"head.weight": torch.zeros(1), "lvl_1L": torch.zeros(1, total), "attn_bias_for_masking": torch.zeros(1, 1, total, total)}
    assert set(model.checkpoint_state(state)) == {"head.weight"}
    with pytest.raises(SparvarError, match="another schedule"):
        model.checkpoint_state({"lvl_1L": torch.zeros(1, total + 1)})


def test_config_files_give_the_architecture_and_refuse_what_is_not_implemented(tmp_path):
    (tmp_path / "llm.json").write_text(json.dumps({"depth": 3, "embed_dim": 96, "num_heads": 3, "patch_nums": [1, 2],
                                                   "num_sampling_steps": "5", "sep_aln_pooling_mode": "avg"}))
    (tmp_path / "tok.json").write_text(json.dumps({"vocab_size": 16, "z_channels": 4, "ch": 32, "ch_mult": [1, 2],
                                                   "v_patch_nums": [1, 2], "quantizer_type": "var_hybrid"}))
    cfg = HARTConfig.from_json(tmp_path / "llm.json", tmp_path / "tok.json", HARTConfig())
    assert (cfg.depth, cfg.width, cfg.heads, cfg.patch_nums, cfg.diffusion_steps, cfg.pooling, cfg.vocab) == (
        3, 96, 3, (1, 2), 5, "avg", 16)
    vae = config_from_json(tmp_path / "tok.json", MODELS["hart-0.7b"].vae)
    assert (vae.vocab, vae.channels, vae.ch_mult, vae.usage_rows) == (16, 4, (1, 2), 2)
    (tmp_path / "gpt2.json").write_text(json.dumps({"attn_type": "gpt2"}))
    with pytest.raises(SparvarError, match="attn_type"):
        HARTConfig.from_json(tmp_path / "gpt2.json", None, HARTConfig())


def test_missing_config_json_is_one_line(tmp_path):
    with pytest.raises(SparvarError, match="no config.json"):
        load_pipeline("hart-0.7b", weights=str(tmp_path), vae=str(tmp_path), text_encoder=str(tmp_path), device="cpu")


def test_schedule_has_the_text_prefix_in_scale_zeros_slot():
    schedule = get_spec("hart-0.7b").schedule()
    assert len(schedule) == 14 and schedule.sizes[-1] == (64, 64) and schedule.prefix == 300
    assert schedule.lengths[0] == 300 and schedule.total == 300 + 9451 - 1
    assert schedule.offsets[1] == 300 and schedule.truncated(3).prefix == 300
    assert "after 300 text tokens" in schedule.describe()
    assert default_sink_scales(schedule) == 6  # text + image scales 0-5 (104 image tokens)
    with pytest.raises(SparvarError, match="generates only"):
        GenerationConfig(schedule="1,2,3").resolved(get_spec("hart-0.7b"))


def test_sampling_defaults_are_the_official_sampler_s():
    spec = get_spec("hart-0.7b")
    config = GenerationConfig().resolved(spec)
    assert config.cfg == 4.5 and config.top_p == 0.0 and config.tau == 1.0
    assert config.top_k == (600,) * 7 + (300,) * 7
    assert config.system_prompt.startswith("Given a user prompt")
    weights = [HARTTransformer.guidance_weight(k, 14, 4.5) for k in range(14)]
    assert weights[0] == 0 and weights[12] == pytest.approx(4.5 * 12 / 13) and weights[13] == weights[12]
    with pytest.raises(SparvarError, match="top_k values"):
        GenerationConfig(top_k=(5, 5)).resolved(spec)
    with pytest.raises(SparvarError, match="takes no system prompt"):
        GenerationConfig(system_prompt="be nice").resolved(get_spec("infinity-2b"))
    with pytest.raises(SparvarError, match="pruning"):
        GenerationConfig(prune="fastvar").resolved(spec)


@pytest.fixture(scope="module")
def tiny():
    return load_pipeline("hart-tiny", device="cpu")


def test_generation_is_seeded_per_item_and_the_diffusion_head_adds_detail(tiny):
    out = tiny(["a red fox", "a lighthouse"], seed=3, progress=False)
    again = tiny(["a lighthouse"], seed=4, progress=False)
    assert [tuple(t.shape) for t in out.tokens] == [(2, n * n) for n in tiny.transformer.cfg.patch_nums]
    assert torch.equal(out.tokens[-1][1], again.tokens[-1][0])
    assert (out.pixels[1] - again.pixels[0]).abs().max() < 1e-4
    skipped = tiny(["a red fox"], seed=3, skip_last=1, progress=False)  # no last scale, no diffusion residual
    assert len(skipped.tokens) == len(out.tokens) - 1 and (skipped.pixels[0] - out.pixels[0]).abs().mean() > 1e-3


def test_sparvar_runs_on_hart_with_the_text_kept_whole(tiny, monkeypatch):
    import sparvar.sparsity.policy as policy_module

    schedule = tiny.schedule()
    report = plan_report(tiny.transformer.cfg.depth, schedule, "paper")
    assert any(entry["mode"] == "csla" for layer in report["layers"] for entry in layer["scales"])
    tables, keys, sparse_attention = [], [], policy_module.sparse_attention

    def recorded(q, k, v, table, *rest):
        tables.append(table)
        keys.append(k.shape[2])
        return sparse_attention(q, k, v, table, *rest)

    monkeypatch.setattr(policy_module, "sparse_attention", recorded)
    dense = tiny(["a red fox"], seed=0, progress=False)
    sparse = tiny(["a red fox"], seed=0, attention="paper", progress=False)
    text = schedule.lengths[0]  # scale 0's slot: the text prefix
    # planned for the real keys (the whole prefix: a table of one text column once ran on shifted keys)
    assert tables and [t.kv_len for t in tables] == keys
    assert all(t.to_mask()[..., :text].all() for t in tables)  # every sparse query sees all the text
    assert sparse.policy.stats()["total"]["saved_fraction"] > 0
    assert (sparse.pixels - dense.pixels).abs().mean() < 0.5


def test_hart_0_7b_plan_covers_its_last_scales():
    report = plan_report(16, get_spec("hart-0.7b").schedule(), "default")
    modes = {entry["mode"] for layer in report["layers"] for entry in layer["scales"][11:]}
    assert {"decision", "cs4a", "csla"} <= modes and report["pairs"]["saved_fraction"] > 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_replay_hart_scales_and_the_diffusion_step():
    pipe = load_pipeline("hart-tiny", device="cuda")
    eager = pipe(["a red fox"], seed=0, progress=False)
    for _ in range(3):
        graphed = pipe(["a red fox"], seed=0, cuda_graphs=True, progress=False)
    assert (graphed.pixels - eager.pixels).abs().max() < 2e-2

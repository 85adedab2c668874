"""Parity with the official HART code, on fixtures it recorded (tools/parity/record_hart.py).

The fixture folders have the official layout (llm/ with config.json, its weights and the
ema_model.bin the official sampler uses; tokenizer/; a text model folder) and load through
`sparvar.load_pipeline` as a user's folders would. For every recorded run: the text features, the
greedy tokens of every scale, the diffusion head's output from the recorded noise and the decoded
images equal the official ones (tokens 100%, images within 1e-3), and so do the teacher-forced
logits (1e-4 relative).
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sparvar.models.hart.text import SYSTEM_PROMPT
from sparvar.models.registry import get_spec
from sparvar.loading import load_pipeline

FIXTURES = Path(__file__).parent / "data" / "parity_hart"
MANIFEST = json.loads((FIXTURES / "cases.json").read_text())
CASES = MANIFEST["cases"]
RUNS = [(name, i) for name, case in CASES.items() for i in range(len(case["runs"]))]


def run_id(param) -> str:
    name, i = param
    run = CASES[name]["runs"][i]
    return f"{name}-run{i}-cfg{run['cfg']}" + ("-system-prompt" if run["system_prompt"] else "")


@lru_cache(maxsize=None)
def pipeline(name: str):
    base = get_spec("hart-0.7b")  # the architecture comes from the folders' config.json files
    spec = replace(base, name=f"{name} (parity fixture)", vae=replace(base.vae, res_blocks=MANIFEST["vae_res_blocks"]))
    return load_pipeline(spec, weights=str(FIXTURES / CASES[name]["folder"]), vae=str(FIXTURES / "tokenizer"),
                         text_encoder=str(FIXTURES / "text"), device="cpu", dtype=torch.float32)


@lru_cache(maxsize=None)
def results(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / f"{name}.safetensors"))


def system_prompt(run: dict) -> str:
    return SYSTEM_PROMPT if run["system_prompt"] else ""


@lru_cache(maxsize=None)
def generated(name: str, index: int):
    run = CASES[name]["runs"][index]
    return pipeline(name)(run["prompts"], seed=run["seed"], cfg=run["cfg"], top_k=1, system_prompt=system_prompt(run),
                          progress=False)


def test_the_folders_load_with_their_config_and_the_ema_weights():
    for name, case in CASES.items():
        pipe = pipeline(name)
        cfg = pipe.transformer.cfg
        assert cfg.patch_nums == tuple(MANIFEST["schedule"]) and cfg.context_tokens == MANIFEST["context_tokens"]
        assert cfg.cosine_attention == case["config"].get("attn_l2_norm", False)
        assert cfg.pooling == case["config"].get("sep_aln_pooling_mode", "max")
        ema = torch.load(FIXTURES / case["folder"] / "ema_model.bin")
        own = load_file(str(FIXTURES / case["folder"] / "model.safetensors"))
        loaded = pipe.transformer.head.weight
        assert torch.equal(loaded, ema["head.weight"].float())
        assert not torch.equal(loaded, own["head.weight"].float())  # the folder's own weights differ


@pytest.mark.parametrize("param", RUNS, ids=run_id)
def test_text_features_equal_the_official_encoding(param):
    name, index = param
    run = CASES[name]["runs"][index]
    feats, mask = pipeline(name).text_encoder(run["prompts"], system_prompt=system_prompt(run))
    assert torch.equal(mask, results(name)[f"run{index}_mask"])
    want = results(name)[f"run{index}_context"]
    assert ((feats - want).norm() / want.norm()).item() < 1e-5
    assert (~mask).any()  # the prompts are padded: padding is part of what is compared


@pytest.mark.parametrize("param", RUNS, ids=run_id)
def test_greedy_tokens_equal_the_official_code_at_every_scale(param):
    name, index = param
    out = generated(name, index)
    assert len(out.tokens) == len(MANIFEST["schedule"])
    for k, drawn in enumerate(out.tokens):
        want = results(name)[f"run{index}_tokens_{k}"]
        agree = (drawn == want).float().mean().item()
        assert agree == 1.0, f"scale {k}: {agree:.2%} of the tokens agree with the official code"


@pytest.mark.parametrize("param", RUNS, ids=run_id)
def test_diffusion_head_output_from_the_recorded_noise(param):
    name, index = param
    stored = results(name)
    head = pipeline(name).transformer.diffloss
    weight = stored[f"run{index}_diffusion_weight"].item()
    out = head.sample(stored[f"run{index}_diffusion_cond"], weight, stored[f"run{index}_diffusion_noise"])
    want = stored[f"run{index}_diffusion_out"]
    assert out.shape == want.shape
    assert ((out - want).norm() / want.norm()).item() < 1e-5
    assert want.std() > 0.05  # a residual, not zeros


@pytest.mark.parametrize("param", RUNS, ids=run_id)
def test_images_equal_the_official_code(param):
    name, index = param
    pixels = generated(name, index).pixels
    stored = {k.split("_image_")[1]: v.float() for k, v in results(name).items() if k.startswith(f"run{index}_image_")}
    crop = stored.pop("crop")
    h, w = pixels.shape[-2:]
    top, left = (h - crop.shape[-2]) // 2, (w - crop.shape[-1]) // 2
    assert (pixels[..., top:top + crop.shape[-2], left:left + crop.shape[-1]] - crop).abs().max() < 1e-3
    (pool_key, pooled), = stored.items()
    assert (F.avg_pool2d(pixels, int(pool_key.removeprefix("pool"))) - pooled).abs().max() < 1e-3
    assert pooled.std() > 0.05


TF_RUNS = [p for p in RUNS if CASES[p[0]]["runs"][p[1]].get("teacher_forced")]


@pytest.mark.parametrize("param", TF_RUNS, ids=run_id)
@torch.no_grad()
def test_teacher_forced_logits_equal_the_official_code(param):
    """The official training forward (without its random masking of the last scale) over the
    official run's tokens: logits per scale within 1e-4 relative."""
    name, index = param
    run = CASES[name]["runs"][index]
    pipe = pipeline(name)
    schedule = pipe.schedule()
    summed, inputs = None, []
    for k in range(len(schedule) - 1):
        drawn = results(name)[f"run{index}_tokens_{k}"]
        summed = pipe.codes.accumulate(summed, pipe.codes.to_codes(drawn, k, schedule), k, schedule)
        inputs.append(pipe.codes.next_input(summed, k + 1, schedule))
    model = pipe.transformer
    prep = model.prepare(pipe.encode(run["prompts"], system_prompt=system_prompt(run)), guidance=False)
    logits = model.forward_full(inputs, schedule, prep)
    start = 0
    for k, (h, w) in enumerate(schedule.sizes):
        rows, want = results(name)[f"run{index}_rows_{k}"], results(name)[f"run{index}_logits_{k}"]
        error = ((logits[:, start + rows] - want).norm() / want.norm()).item()
        assert error < 1e-4, f"scale {k}: relative error {error:.2e}"
        start += h * w


def test_fixtures_stay_small_and_say_where_they_come_from():
    size = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    assert size <= 2e6
    assert len(MANIFEST["hart_commit"]) == 40
    # the last scale's weight of the w == 1 run: the official diffusion sampler runs unguided there
    assert any(run["cfg"] * (len(MANIFEST["schedule"]) - 2) / (len(MANIFEST["schedule"]) - 1) == 1.0
               for case in CASES.values() for run in case["runs"])

"""Parity with the official Infinity and VAR code, on fixtures it recorded (tools/parity/record.py).

The weights are official-format files of small random models; they load through
`sparvar.load_pipeline` as a user's checkpoints would. For every recorded run: the sampled tokens
equal the official ones at every scale, the decoded images agree within 1e-3, and the
teacher-forced logits within 1e-4 relative, scale by scale.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sparvar.models.registry import get_spec
from sparvar.loading import load_pipeline
from sparvar.schedules import Schedule

FIXTURES = Path(__file__).parent / "data" / "parity"
MANIFEST = json.loads((FIXTURES / "cases.json").read_text())
CASES = MANIFEST["cases"]
RUNS = [(name, i) for name, case in CASES.items() for i in range(len(case["runs"]))]


def run_id(param: tuple[str, int]) -> str:
    name, i = param
    run = CASES[name]["runs"][i]
    extras = [k for k in ("sampler", "negative_prompt", "more_smooth", "init_scales") if run.get(k)]
    if isinstance(run.get("cfg"), list):
        extras.append("cfg-list")
    if run.get("labels", 0) is None:
        extras.append("random-labels")
    where = f"{run['aspect']}@{run['resolution']}" if "aspect" in run else f"{len(run['schedule'])}-scales"
    return "-".join([name, f"run{i}", where, *extras])


@lru_cache(maxsize=None)
def pipeline(name: str):
    case = CASES[name]
    base = get_spec(case["base_model"])
    vae_fields = dict(case["vae"], ch_mult=tuple(case["vae"]["ch_mult"]))
    spec = replace(base, name=f"{name} (parity fixture)", transformer=replace(base.transformer, **case["transformer"]),
                   vae=replace(base.vae, **vae_fields), files={})
    folder = FIXTURES / name
    vae = FIXTURES / case.get("vae_file", f"{name}/vae.pth")
    text = FIXTURES / "t5" if case["family"] == "infinity" else None
    return load_pipeline(spec, weights=str(folder / "transformer.pth"), vae=str(vae),
                         text_encoder=None if text is None else str(text), device="cpu", dtype=torch.float32)


@lru_cache(maxsize=None)
def results(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / name / "results.safetensors"))


def schedule_of(run: dict) -> Schedule:
    """The recorded schedule; Infinity's with the grid its RoPE positions are stretched onto."""
    grid = tuple(run["pos_grid"]) if "pos_grid" in run else None
    return Schedule(tuple(tuple(s) for s in run["schedule"]), grid)


def conditions_of(run: dict) -> list:
    if "prompts" in run:
        return run["prompts"]
    return [None] * run["batch"] if run["labels"] is None else run["labels"]


@lru_cache(maxsize=None)
def generated(name: str, index: int):
    run = CASES[name]["runs"][index]
    pipe = pipeline(name)
    options = dict(seed=run["seed"], cfg=run["cfg"], top_k=run["top_k"], top_p=run["top_p"],
                   schedule=schedule_of(run), progress=False)
    if run.get("sampler"):
        options["sampler"] = run["sampler"]
    if "tau" in run:
        options["tau"] = run["tau"]
    if run.get("negative_prompt"):
        options["negative_prompt"] = run["negative_prompt"]
    if run.get("more_smooth"):
        options["more_smooth"] = True
    if run.get("init_scales"):  # variations of the recorded picture: its first scales are forced
        image = input_image().expand(len(run["prompts"]), -1, -1, -1)
        options.update(init_tokens=pipe.image_tokens(image, schedule_of(run)), init_scales=run["init_scales"])
    return pipe(conditions_of(run), **options)


def expected_tokens(name: str, index: int, scale: int, kind: str = "bits") -> torch.Tensor:
    stored = results(name)
    key = f"run{index}_{kind}_{scale}"
    if key in stored:  # Infinity: bits packed 8 to a byte along the bit axis
        bits = pipeline(name).codes.bits
        return torch.from_numpy(np.unpackbits(stored[key].numpy(), axis=-1, count=bits).astype(np.int64))
    return stored[f"run{index}_tokens_{scale}"]


@pytest.mark.parametrize("param", RUNS, ids=run_id)
def test_tokens_equal_the_official_code_at_every_scale(param):
    name, index = param
    run = CASES[name]["runs"][index]
    out = generated(name, index)
    if run.get("labels", 0) is None:
        assert out.labels == results(name)[f"run{index}_labels"].tolist()
    if run.get("more_smooth"):
        return  # smoothed codes are soft mixtures of codewords: the image is what is compared
    assert len(out.tokens) == len(run["schedule"])
    for k, drawn in enumerate(out.tokens):
        want = expected_tokens(name, index, k)
        agree = (drawn.cpu() == want).float().mean().item()
        assert agree == 1.0, f"scale {k}: {agree:.2%} of the tokens agree with the official code"


IMAGE_RUNS = [p for p in RUNS if CASES[p[0]]["runs"][p[1]].get("images")]


@pytest.mark.parametrize("param", IMAGE_RUNS, ids=run_id)
def test_images_equal_the_official_code(param):
    name, index = param
    pixels = generated(name, index).pixels
    stored = {k.split("_image_")[1]: v.float() for k, v in results(name).items() if k.startswith(f"run{index}_image_")}
    h, w = pixels.shape[-2:]
    crop = stored.pop("crop")
    top, left = (h - crop.shape[-2]) // 2, (w - crop.shape[-1]) // 2
    assert (pixels[..., top:top + crop.shape[-2], left:left + crop.shape[-1]] - crop).abs().max() < 1e-3
    (pool_key, pooled), = stored.items()
    assert (F.avg_pool2d(pixels, int(pool_key.removeprefix("pool"))) - pooled).abs().max() < 1e-3
    assert pooled.std() > 0.05  # the images are not flat: the comparison means something


TF_RUNS = [p for p in RUNS if CASES[p[0]]["runs"][p[1]].get("teacher_forced")]


@pytest.mark.parametrize("param", TF_RUNS, ids=run_id)
@torch.no_grad()
def test_teacher_forced_logits_equal_the_official_code(param):
    """A full forward pass over the official run's tokens (the next-scale inputs built by our codes
    from them): logits per scale within 1e-4 relative of the official model's."""
    name, index = param
    run = CASES[name]["runs"][index]
    pipe, schedule = pipeline(name), schedule_of(run)
    conditions = conditions_of(run)
    tokens = [expected_tokens(name, index, k) for k in range(len(schedule))]
    summed, inputs = None, []
    for k, drawn in enumerate(tokens):
        summed = pipe.codes.accumulate(summed, pipe.codes.to_codes(drawn, k, schedule), k, schedule)
        if k + 1 < len(schedule):
            inputs.append(pipe.codes.next_input(summed, k + 1, schedule))
    model = pipe.transformer
    logits = model.forward_full(inputs, schedule, model.prepare(pipe.encode(conditions), guidance=False))
    logits = logits.flatten(2)  # Infinity's (bits, 2) pairs in the official head's order
    for k, start in enumerate(schedule.offsets):
        rows = results(name)[f"run{index}_rows_{k}"]
        want = results(name)[f"run{index}_logits_{k}"]
        got = logits[:, start + rows]
        error = ((got - want).norm() / want.norm()).item()
        assert error < 1e-4, f"scale {k}: relative error {error:.2e}"


@pytest.mark.parametrize("param", [p for p in RUNS if "aspect" in CASES[p[0]]["runs"][p[1]]], ids=run_id)
def test_our_schedule_tables_are_the_official_ones(param):
    name, index = param
    run = CASES[name]["runs"][index]
    assert pipeline(name).schedule(run["aspect"], run["resolution"]) == schedule_of(run)


def test_fixtures_stay_small_and_say_where_they_come_from():
    size = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    assert size < 5e6  # HART's own folder has its own budget (test_hart_parity.py)
    assert len(MANIFEST["infinity_commit"]) == 40 and len(MANIFEST["var_commit"]) == 40
    assert any(len(run["schedule"]) == 13 for case in CASES.values() for run in case["runs"])


INIT_RUNS = [p for p in RUNS if CASES[p[0]]["runs"][p[1]].get("init_scales")]


def input_image() -> torch.Tensor:
    """The recorded input picture, (1, 3, H, W) in [-1, 1] as the official image transform makes it."""
    pixels = load_file(str(FIXTURES / "input_image.safetensors"))["image"].permute(2, 0, 1)[None].float().div(255)
    return pixels + pixels - 1


@pytest.mark.parametrize("param", INIT_RUNS, ids=run_id)
def test_image_tokens_equal_the_official_vae_encoding(param):
    name, index = param
    run = CASES[name]["runs"][index]
    pipe = pipeline(name)
    tokens = pipe.image_tokens(input_image(), schedule_of(run))
    for k, bits in enumerate(tokens):
        want = expected_tokens(name, index, k, "init_bits")[:1]
        assert torch.equal(bits, want), f"scale {k}: {(bits == want).float().mean():.2%} of the bits agree"


def test_text_features_padded_to_the_longest_equal_the_official_packed_ones():
    """The official script pads prompts to 512 tokens and packs the real ones; we pad to the longest
    prompt and mask. The features of the real tokens are the same."""
    official = load_file(str(FIXTURES / "t5" / "official_features.safetensors"))
    name = next(n for n, c in CASES.items() if c["family"] == "infinity")
    prompts = CASES[name]["runs"][0]["prompts"]
    feats, mask = pipeline(name).text_encoder(prompts)
    assert mask.sum(1).tolist() == official["lengths"].tolist()
    assert mask.shape[1] == max(official["lengths"].tolist()) < 512
    ours = feats[mask]  # the real tokens, packed in order
    assert ((ours - official["features"]).norm() / official["features"].norm()).item() < 1e-5

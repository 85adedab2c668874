"""Parity with the official code of every family, on fixtures it recorded (tools/parity/record.py
for Infinity and VAR, record_hart.py for HART, record_varedit.py for VAREdit).

The weights are official-format files (HART: the official folders) of small random models; they
load through `sparvar.load_pipeline` as a user's would. One suite runs over every family, each
through a small adapter that says where its fixtures are and how a recorded run is generated.
For every recorded run: the tokens equal the official ones at every scale, the decoded images
agree within 1e-3, and the teacher-forced logits within 1e-4 relative, scale by scale. What one
family alone has (Infinity's aspect tables, init images and packed T5 features; HART's EMA
weights, text features and diffusion head; VAREdit's source input and layouts) follows the suite.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from functools import cache, cached_property
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from PIL import Image

from sparvar import create_model
from sparvar.loading import load_pipeline
from sparvar.models.hart.text import SYSTEM_PROMPT
from sparvar.models.registry import get_spec
from sparvar.pipeline import Pipeline
from sparvar.schedules import Schedule

DATA = Path(__file__).parent / "data"


class Recorded:
    """A family's recorded runs: its fixture folder and how the suite replays them here. An
    adapter gives `about(run)` (its test id), `pipeline(case)`, `results(case)`, `conditions(run)`,
    `options(case, run)` (of the pipeline's call) and `schedule(case, run)`."""

    folder: Path
    family: str  # the fixtures' name for it (cases.json)

    @cached_property
    def manifest(self) -> dict:
        return json.loads((self.folder / "cases.json").read_text())

    @cached_property
    def cases(self) -> dict:
        return {name: case for name, case in self.manifest["cases"].items() if case.get("family", self.family)
                == self.family}

    def runs(self, key: str | None = None) -> list:
        """pytest parameters of every run (that has `key`), with readable ids."""
        return [pytest.param(self, name, i, id=f"{name}-run{i}{self.about(run)}") for name, case in self.cases.items()
                for i, run in enumerate(case["runs"]) if key is None or run.get(key)]

    def run(self, name: str, index: int) -> dict:
        return self.cases[name]["runs"][index]

    def tokens(self, name: str, index: int, scale: int) -> torch.Tensor:
        """The official run's tokens of one scale."""
        return self.results(name)[f"run{index}_tokens_{scale}"]

    @cache
    def generated(self, name: str, index: int):
        return self.pipeline(name)(self.conditions(self.run(name, index)), progress=False,
                                   **self.options(name, index))

    def condition(self, name: str, index: int):
        """What the transformer's prepare takes for the run's conditions (unguided)."""
        return self.pipeline(name).encode(self.conditions(self.run(name, index)))


class InfinityRecorded(Recorded):
    folder, family = DATA / "parity", "infinity"
    text_folder = DATA / "parity" / "t5"

    def about(self, run):
        extras = [k for k in ("sampler", "negative_prompt", "more_smooth", "init_scales") if run.get(k)]
        extras += ["cfg-list"] * isinstance(run.get("cfg"), list) + ["random-labels"] * (run.get("labels", 0) is None)
        where = f"{run['aspect']}@{run['resolution']}" if "aspect" in run else f"{len(run['schedule'])}-scales"
        return "-".join(["", where, *extras])

    @cache
    def pipeline(self, name):
        case = self.cases[name]
        base = get_spec(case["base_model"])
        vae_fields = dict(case["vae"], ch_mult=tuple(case["vae"]["ch_mult"]))
        spec = replace(base, name=f"{name} (parity fixture)", files={}, vae=replace(base.vae, **vae_fields),
                       transformer=replace(base.transformer, **case["transformer"]))
        vae = self.folder / case.get("vae_file", f"{name}/vae.pth")
        text = self.text_folder if spec.text_conditioned else None
        return load_pipeline(spec, weights=str(self.folder / name / "transformer.pth"), vae=str(vae),
                             text_encoder=None if text is None else str(text), device="cpu", dtype=torch.float32)

    @cache
    def results(self, name):
        return load_file(str(self.folder / name / "results.safetensors"))

    def conditions(self, run):
        if "prompts" in run:
            return run["prompts"]
        return [None] * run["batch"] if run["labels"] is None else run["labels"]

    def schedule(self, name, index):
        """The recorded schedule; Infinity's with the grid its RoPE positions are stretched onto."""
        run = self.run(name, index)
        grid = tuple(run["pos_grid"]) if "pos_grid" in run else None
        return Schedule(tuple(tuple(s) for s in run["schedule"]), grid)

    def options(self, name, index):
        run = self.run(name, index)
        options = dict(seed=run["seed"], cfg=run["cfg"], top_k=run["top_k"], top_p=run["top_p"],
                       schedule=self.schedule(name, index))
        options.update({k: run[k] for k in ("sampler", "tau", "negative_prompt", "more_smooth") if run.get(k)})
        if run.get("init_scales"):  # variations of the recorded picture: its first scales are forced
            image = input_image().expand(len(run["prompts"]), -1, -1, -1)
            options.update(init_tokens=self.pipeline(name).image_tokens(image, self.schedule(name, index)),
                           init_scales=run["init_scales"])
        return options

    def tokens(self, name, index, scale, kind="bits"):
        stored = self.results(name)
        key = f"run{index}_{kind}_{scale}"
        if key in stored:  # Infinity: bits packed 8 to a byte along the bit axis
            bits = self.pipeline(name).codes.bits
            return torch.from_numpy(np.unpackbits(stored[key].numpy(), axis=-1, count=bits).astype(np.int64))
        return super().tokens(name, index, scale)


class VARRecorded(InfinityRecorded):
    family = "var"  # recorded by the same harness, into the same folder


class HARTRecorded(Recorded):
    folder, family = DATA / "parity_hart", "hart"

    def about(self, run):
        return f"-cfg{run['cfg']}" + ("-system-prompt" if run["system_prompt"] else "")

    @cache
    def pipeline(self, name):
        base = get_spec("hart-0.7b")  # the architecture comes from the folders' config.json files
        spec = replace(base, name=f"{name} (parity fixture)",
                       vae=replace(base.vae, res_blocks=self.manifest["vae_res_blocks"]))
        return load_pipeline(spec, weights=str(self.folder / self.cases[name]["folder"]),
                             vae=str(self.folder / "tokenizer"), text_encoder=str(self.folder / "text"), device="cpu",
                             dtype=torch.float32)

    @cache
    def results(self, name):
        return load_file(str(self.folder / f"{name}.safetensors"))

    def conditions(self, run):
        return run["prompts"]

    def schedule(self, name, index):
        return self.pipeline(name).schedule()

    def options(self, name, index):
        run = self.run(name, index)
        return dict(seed=run["seed"], cfg=run["cfg"], top_k=1, system_prompt=system_prompt(run))

    def condition(self, name, index):
        run = self.run(name, index)
        return self.pipeline(name).encode(run["prompts"], system_prompt=system_prompt(run))


class VAREditRecorded(InfinityRecorded):
    """Edits of two source pictures; a run's resolution picks its model's schedule, the weights
    are the case's (one pipeline per case, its spec set to the run's resolution)."""

    folder, family = DATA / "parity_varedit", "varedit"  # its prompts go through the Infinity fixtures' T5

    def about(self, run):
        return f"-{run['source']}-picture-at-{run['resolution']}" + ("-official-sampler" if run.get("sampler") else "")

    @cache
    def generated(self, name, index):
        run, pipe = self.run(name, index), self.pipeline(name)
        spec = replace(pipe.spec, transformer=replace(pipe.spec.transformer, resolution=run["resolution"]))
        return Pipeline(spec, pipe.transformer, pipe.vae, pipe.text_encoder)([run["prompt"]], progress=False,
                                                                             **self.options(name, index))

    def picture(self, run) -> Image.Image:
        return Image.open(self.folder / f"source_{run['source']}.png").convert("RGB")

    def schedule(self, name, index):
        cfg = self.pipeline(name).spec.transformer
        return replace(cfg, resolution=self.run(name, index)["resolution"]).schedule

    def options(self, name, index):
        run = self.run(name, index)
        options = {k: run[k] for k in ("seed", "cfg", "tau", "top_k", "top_p") + ("sampler",) * ("sampler" in run)}
        return dict(options, image=self.picture(run))

    def condition(self, name, index):
        run, pipe = self.run(name, index), self.pipeline(name)
        feats, mask = pipe.encode([run["prompt"]])
        return feats, mask, pipe._source((self.picture(run),), 1, self.schedule(name, index))


INFINITY, VAR, HART, VAREDIT = InfinityRecorded(), VARRecorded(), HARTRecorded(), VAREditRecorded()
FAMILIES = (INFINITY, VAR, HART, VAREDIT)


def system_prompt(run: dict) -> str:
    return SYSTEM_PROMPT if run["system_prompt"] else ""


def input_image() -> torch.Tensor:
    """The recorded input picture, (1, 3, H, W) in [-1, 1] as the official image transform makes it."""
    pixels = load_file(str(INFINITY.folder / "input_image.safetensors"))["image"].permute(2, 0, 1)[None]
    pixels = pixels.float().div(255)
    return pixels + pixels - 1


# ---- every family ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family, name, index", [p for f in FAMILIES for p in f.runs()])
@pytest.mark.slow
def test_tokens_equal_the_official_code_at_every_scale(family, name, index):
    run, out = family.run(name, index), family.generated(name, index)
    labels = family.results(name).get(f"run{index}_labels")
    if labels is not None:  # random classes, drawn as the official sampler draws them
        assert out.labels == labels.tolist()
    if run.get("more_smooth"):
        return  # smoothed codes are soft mixtures of codewords: the image is what is compared
    assert len(out.tokens) == len(family.schedule(name, index))
    for k, drawn in enumerate(out.tokens):
        agree = (drawn.cpu() == family.tokens(name, index, k)).float().mean().item()
        assert agree == 1.0, f"scale {k}: {agree:.2%} of the tokens agree with the official code"


@pytest.mark.parametrize("family, name, index",
                         [p for f in (INFINITY, VAR) for p in f.runs("images")] + HART.runs() + VAREDIT.runs())
@pytest.mark.slow
def test_images_equal_the_official_code(family, name, index):
    pixels = family.generated(name, index).pixels
    stored = {k.split("_image_")[1]: v.float() for k, v in family.results(name).items()
              if k.startswith(f"run{index}_image_")}
    h, w = pixels.shape[-2:]
    crop = stored.pop("crop")
    top, left = (h - crop.shape[-2]) // 2, (w - crop.shape[-1]) // 2
    assert (pixels[..., top:top + crop.shape[-2], left:left + crop.shape[-1]] - crop).abs().max() < 1e-3
    (pool_key, pooled), = stored.items()
    assert (F.avg_pool2d(pixels, int(pool_key.removeprefix("pool"))) - pooled).abs().max() < 1e-3
    assert pooled.std() > 0.05  # the images are not flat: the comparison means something


@pytest.mark.parametrize("family, name, index", [p for f in FAMILIES for p in f.runs("teacher_forced")])
@torch.no_grad()
def test_teacher_forced_logits_equal_the_official_code(family, name, index):
    """A full forward pass over the official run's tokens (the next-scale inputs built by our codes
    from them): logits per scale within 1e-4 relative of the official model's (HART: its training
    forward without the random masking of the last scale; scale 0's from the last text position)."""
    pipe, schedule = family.pipeline(name), family.schedule(name, index)
    summed, inputs = None, []
    for k in range(len(schedule) - 1):
        codes = pipe.codes.to_codes(family.tokens(name, index, k), k, schedule)
        summed = pipe.codes.accumulate(summed, codes, k, schedule)
        inputs.append(pipe.codes.next_input(summed, k + 1, schedule))
    model = pipe.transformer
    logits = model.forward_full(inputs, schedule, model.prepare(family.condition(name, index), guidance=False))
    logits = logits.flatten(2)  # Infinity's (bits, 2) pairs in the official head's order
    starts = np.cumsum([0] + [h * w for h, w in schedule.sizes])  # a scale's logits, where the prefix gives one
    for k, start in enumerate(starts[:-1]):
        rows, want = family.results(name)[f"run{index}_rows_{k}"], family.results(name)[f"run{index}_logits_{k}"]
        error = ((logits[:, start + rows] - want).norm() / want.norm()).item()
        assert error < 1e-4, f"scale {k}: relative error {error:.2e}"


@pytest.mark.parametrize("family, budget, commits", [(INFINITY, 5e6, ("infinity_commit", "var_commit")),
                                                     (HART, 2e6, ("hart_commit",)), (VAREDIT, 2e6, ("varedit_commit",))],
                         ids=["infinity-var", "hart", "varedit"])
def test_fixtures_stay_small_and_say_where_they_come_from(family, budget, commits):
    assert sum(f.stat().st_size for f in family.folder.rglob("*") if f.is_file()) < budget
    assert all(len(family.manifest[key]) == 40 for key in commits)


# ---- Infinity ----------------------------------------------------------------------------------
def test_a_recorded_run_has_the_full_13_scales():
    assert any(len(run["schedule"]) == 13 for f in (INFINITY, VAR) for case in f.cases.values() for run in case["runs"])


@pytest.mark.parametrize("family, name, index", INFINITY.runs("aspect") + VAR.runs("aspect"))
def test_our_schedule_tables_are_the_official_ones(family, name, index):
    run = family.run(name, index)
    assert family.pipeline(name).schedule(run["aspect"], run["resolution"]) == family.schedule(name, index)


@pytest.mark.parametrize("family, name, index", INFINITY.runs("init_scales"))
def test_image_tokens_equal_the_official_vae_encoding(family, name, index):
    tokens = family.pipeline(name).image_tokens(input_image(), family.schedule(name, index))
    for k, bits in enumerate(tokens):
        want = family.tokens(name, index, k, "init_bits")[:1]
        assert torch.equal(bits, want), f"scale {k}: {(bits == want).float().mean():.2%} of the bits agree"


def test_text_features_padded_to_the_longest_equal_the_official_packed_ones():
    """The official script pads prompts to 512 tokens and packs the real ones; we pad to the longest
    prompt and mask. The features of the real tokens are the same."""
    official = load_file(str(INFINITY.folder / "t5" / "official_features.safetensors"))
    name = next(iter(INFINITY.cases))
    feats, mask = INFINITY.pipeline(name).text_encoder(INFINITY.run(name, 0)["prompts"])
    assert mask.sum(1).tolist() == official["lengths"].tolist()
    assert mask.shape[1] == max(official["lengths"].tolist()) < 512
    ours = feats[mask]  # the real tokens, packed in order
    assert ((ours - official["features"]).norm() / official["features"].norm()).item() < 1e-5


# ---- HART --------------------------------------------------------------------------------------
def test_the_hart_folders_load_with_their_config_and_the_ema_weights():
    for name, case in HART.cases.items():
        cfg = HART.pipeline(name).transformer.cfg
        assert cfg.patch_nums == tuple(HART.manifest["schedule"])
        assert cfg.context_tokens == HART.manifest["context_tokens"]
        assert cfg.cosine_attention == case["config"].get("attn_l2_norm", False)
        assert cfg.pooling == case["config"].get("sep_aln_pooling_mode", "max")
        ema = torch.load(HART.folder / case["folder"] / "ema_model.bin")
        own = load_file(str(HART.folder / case["folder"] / "model.safetensors"))
        loaded = HART.pipeline(name).transformer.head.weight
        assert torch.equal(loaded, ema["head.weight"].float())
        assert not torch.equal(loaded, own["head.weight"].float())  # the folder's own weights differ


@pytest.mark.parametrize("family, name, index", HART.runs())
def test_hart_text_features_equal_the_official_encoding(family, name, index):
    feats, mask = family.condition(name, index)
    assert torch.equal(mask, family.results(name)[f"run{index}_mask"])
    want = family.results(name)[f"run{index}_context"]
    assert ((feats - want).norm() / want.norm()).item() < 1e-5
    assert (~mask).any()  # the prompts are padded: padding is part of what is compared


@pytest.mark.parametrize("family, name, index", HART.runs())
def test_hart_diffusion_head_output_from_the_recorded_noise(family, name, index):
    stored = family.results(name)
    head = family.pipeline(name).transformer.diffloss
    weight = stored[f"run{index}_diffusion_weight"].item()
    out = head.sample(stored[f"run{index}_diffusion_cond"], weight, stored[f"run{index}_diffusion_noise"])
    want = stored[f"run{index}_diffusion_out"]
    assert out.shape == want.shape
    assert ((out - want).norm() / want.norm()).item() < 1e-5
    assert want.std() > 0.05  # a residual, not zeros


def test_a_hart_run_has_an_unguided_last_scale():
    """The last scale's weight of the w == 1 run: the official diffusion sampler runs unguided there."""
    scales = len(HART.manifest["schedule"])
    assert any(run["cfg"] * (scales - 2) / (scales - 1) == 1.0 for case in HART.cases.values() for run in case["runs"])


# ---- VAREdit -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family, name, index", VAREDIT.runs())
def test_varedit_source_input_equals_the_official_one(family, name, index):
    """The picture padded and resized as infer.py does, encoded by the VAE (its continuous features,
    patchified for the 8B) at the last scale's grid: what the official code feeds word_embed."""
    source = family.condition(name, index)[2]
    stored = family.results(name)
    want = stored[f"run{index}_source"]
    got = source[:, stored[f"run{index}_source_rows"]]
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_varedit_runs_cover_a_padded_picture_both_position_tables_and_the_official_sampler():
    """A wide picture (white padding), 1024 (every token its own RoPE place) and 512 (the official
    table read by sequence index), the 2B's bits and the 8B's patchified ones, the official sampler."""
    runs = [(name, run) for name, case in VAREDIT.cases.items() for run in case["runs"]]
    assert {VAREDIT.picture(run).width != VAREDIT.picture(run).height for _, run in runs} == {True, False}
    assert {512, 1024} <= {run["resolution"] for _, run in runs}
    assert {VAREDIT.cases[name]["base_model"] for name, _ in runs} == {"varedit-2b-512", "varedit-8b-1024"}
    assert any(run.get("sampler") == "official" for _, run in runs)


@pytest.mark.parametrize("family, name, index", VAREDIT.runs())
def test_varedit_schedules_are_the_official_ones(family, name, index):
    schedule = family.schedule(name, index)
    assert [list(s) for s in schedule.sizes] == family.run(name, index)["schedule"]
    assert schedule.source == schedule.sizes[-1]


@pytest.mark.parametrize("size, name", [("2b", "varedit-2b-512"), ("8b", "varedit-8b-1024"), ("8b", "varedit-8b-512")])
def test_varedit_layouts_equal_the_official_models(size, name):
    """The recorder built the official 2B and 8B on the meta device and kept a digest of their
    (name, shape) lists: sparvar's modules have the same, so official files load strictly."""
    layout = {k: list(v.shape) for k, v in create_model(name, device="meta").state_dict().items()}
    text = json.dumps(sorted(layout.items()))
    digest = {"sha256": hashlib.sha256(text.encode()).hexdigest(), "tensors": len(layout),
              "elements": int(sum(np.prod(shape) for shape in layout.values()))}
    assert digest == VAREDIT.manifest["official_layouts"][size]

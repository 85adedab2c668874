"""The demo models: emoji data, tokenizer quantiser, training in resumable calls, export, shipped weights."""

import dataclasses
import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from sparvar.cli import main
from sparvar.demo import checkpoint, data, score, train
from sparvar.demo.step import BlockCausalFlex, TeacherForcing
from sparvar.demo.tokenizer import Encoder, quantize
from sparvar.errors import SparvarError
from sparvar.models.infinity.bitwise import BitwiseCodes
from sparvar.models.infinity.text import ByteTokenizer, build_t5
from sparvar.models.infinity.transformer import PrefixAttend
from sparvar.models.registry import MODELS, create_model, create_vae
from sparvar.loading import load_pipeline
from sparvar.schedules import parse_schedule

DEMO = "infinity-demo"
EMOJI_TEST_LINES = """\
# group: Smileys & Emotion
1F600                                  ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                   ; unqualified         # ☺ E0.6 smiling face
1F44D 1F3FD                            ; fully-qualified     # 👍🏽 E1.0 thumbs up: medium skin tone
1F468 200D 1F469 200D 1F467            ; fully-qualified     # 👨‍👩‍👧 E2.0 family: man, woman, girl
1F1EF 1F1F5                            ; fully-qualified     # 🇯🇵 E0.6 flag: Japan
1F3FB                                  ; component           # 🏻 E1.0 light skin tone
"""


@pytest.fixture(scope="module")
def emoji_file(tmp_path_factory):
    """A data file in `prepare`'s format: 12 random 'emoji' of the font's glyph size, 3 held out."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (128, 136, 3), dtype=np.uint8) // 64 * 64) for _ in range(12)]
    path = tmp_path_factory.mktemp("emoji") / "emoji.npz"
    data.write(path, images, [f"emoji number {i}" for i in range(12)], [i % 4 == 3 for i in range(12)],
               [f"{0x1F600 + i // 2:X}" for i in range(12)])  # pairs of variants of one design
    return path


def test_emoji_names_keep_fully_qualified_sequences(tmp_path):
    names = tmp_path / "emoji-test.txt"
    names.write_text(EMOJI_TEST_LINES, encoding="utf-8")
    rows = data.read_emoji_names(names)
    assert [name for _, name in rows] == ["grinning face", "smiling face", "thumbs up: medium skin tone",
                                          "family: man, woman, girl", "flag: Japan"]
    assert rows[3][0] == [0x1F468, 0x200D, 0x1F469, 0x200D, 0x1F467]


def test_held_out_rule_keeps_variants_together():
    thumbs = [0x1F44D]
    assert all(data.is_held_out(thumbs + [tone]) == data.is_held_out(thumbs) for tone in range(0x1F3FB, 0x1F400))
    assert data.is_held_out([0x261D, 0xFE0F]) == data.is_held_out([0x261D, 0x1F3FB])
    share = np.mean([data.is_held_out([c]) for c in range(0x1F300, 0x1F300 + 2000)])
    assert 0.02 < share < 0.07


def test_data_file_round_trip(emoji_file):
    emoji = data.load(emoji_file)
    assert emoji.images.shape == (12, 136, 136, 3) and emoji.images.dtype == np.uint8
    assert (emoji.images[:, :4] == 255).all() and (emoji.images[:, -4:] == 255).all()  # padded with white
    assert emoji.prompts[5] == "emoji number 5" and emoji.held_out.sum() == 3
    held = emoji.split(held_out=True)
    assert held.prompts == ["emoji number 3", "emoji number 7", "emoji number 11"] and len(held.images) == 3
    pixels = data.to_pixels(torch.from_numpy(emoji.images[:2]), 32)
    assert pixels.shape == (2, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1


def test_loaders_say_what_to_install(tmp_path):
    with pytest.raises(SparvarError, match="apt-get install fonts-noto-color-emoji"):
        data.prepare(tmp_path / "e.npz", font_path=tmp_path / "missing.ttf")
    with pytest.raises(SparvarError, match="apt-get install unicode-data"):
        data.read_emoji_names(tmp_path / "missing.txt")
    with pytest.raises(SparvarError, match="sparvar train-demo prepare"):
        data.load(tmp_path / "missing.npz")


@pytest.mark.skipif(not data.EMOJI_FONT.is_file(), reason="needs `apt-get install fonts-noto-color-emoji`")
def test_prepare_draws_sequences_from_the_installed_font(tmp_path):
    names = tmp_path / "emoji-test.txt"
    names.write_text(EMOJI_TEST_LINES, encoding="utf-8")
    summary = data.prepare(tmp_path / "e.npz", names_path=names)
    assert summary["emoji"] == 5 and not summary["missing_from_font"]
    emoji = data.load(tmp_path / "e.npz")
    drawn = (emoji.images < 250).any(-1).mean((1, 2))  # share of pixels that are not background
    assert (drawn > 0.05).all() and emoji.images.astype(int).std(-1).max() > 50  # colour, not only grey
    assert len({image.tobytes() for image in emoji.images}) == 5
    assert emoji.designs[1] == "263A" and emoji.designs[2] == "1F44D"  # without U+FE0F and the skin tone


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


def test_demo_model_is_shaped_like_infinity():
    spec = MODELS[DEMO]
    cfg, schedule = spec.transformer, spec.schedule()
    assert cfg.text_conditioned and cfg.head_dim >= 64 and cfg.depth >= 12
    assert len(schedule) == 13 and schedule.sizes[-1] == (64, 64) and 64 * spec.vae.patch == 256
    encoder, decoder = Encoder(cfg.vae_channels), create_vae(spec, "meta")
    assert encoder(torch.zeros(1, 3, 32, 32)).shape == (1, cfg.vae_channels, 8, 8)  # the decoder's patch 4, inverted
    params = sum(p.numel() for p in create_model(DEMO, "meta").parameters())
    with torch.device("meta"):
        params += sum(p.numel() for p in [*decoder.parameters(), *build_t5(spec.text).parameters()])
    assert 2 * params <= 48e6  # bf16 weights in sparvar/assets
    assert spec.default_condition == "grinning face"


def _smoke(out, data_file, *extra):
    """The full-size model on three scales (16x16 px), its prefix phase on two (8x8 px), a few steps each."""
    return ["--out", str(out), "--data", str(data_file), "--schedule", "1,2,4", "--prefix-scales", "2",
            "--encoder-width", "32", "--tokenizer-steps", "3", "--prefix-steps", "3", "--full-steps", "2",
            "--tokenizer-batch", "4", "--prefix-batch", "2", "--full-batch", "2", "--device", "cpu", *extra]


def test_training_in_calls_resumes_like_one_run(emoji_file, tmp_path):
    one = train.main(_smoke(tmp_path / "one", emoji_file))
    assert all(one[p]["done"] for p in train.PHASES) and one["prefix"]["steps"] == 3 and one["full"]["steps"] == 2
    assert one["tokenizer"]["held_out_psnr_16px"] > 0 and one["tokenizer"]["held_out_psnr_8px"] > 0
    assert one["data"] == {"source": str(emoji_file), "train_emoji": 9, "held_out_emoji": 3,
                           "image_sizes": {"prefix": 8, "full": 16}}
    assert one["calls"][0]["command"].startswith("sparvar train-demo --out")
    assert (tmp_path / "one" / "preview.png").is_file()

    train.main(_smoke(tmp_path / "two", emoji_file, "--phase", "tokenizer"))
    with pytest.raises(SparvarError, match="--resume"):
        train.main(_smoke(tmp_path / "two", emoji_file))
    train.main(["--out", str(tmp_path / "two"), "--data", str(emoji_file), "--resume", "--device", "cpu",
                "--phase", "prefix"])
    two = train.main(["--out", str(tmp_path / "two"), "--data", str(emoji_file), "--resume", "--device", "cpu"])
    assert len(two["calls"]) == 3 and two["prefix"]["steps"] == 3 and two["full"]["steps"] == 2
    a, _ = checkpoint.load(tmp_path / "one")
    b, _ = checkpoint.load(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_call_near_its_end_keeps_the_next_phase_for_the_next_call(emoji_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "NEXT_PHASE_SECONDS", 10**6)
    state = train.main(_smoke(tmp_path / "run", emoji_file))
    assert state["prefix"]["done"] and state["full"]["steps"] == 0
    assert "[full] not started" in capsys.readouterr().out
    _, saved = checkpoint.load(tmp_path / "run")
    assert saved["prefix"]["done"] and saved["full"]["steps"] == 0


def test_replan_moves_a_phases_end_and_refuses_what_cannot_be(emoji_file, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "NEXT_PHASE_SECONDS", 10**6)  # the first call ends after the prefix phase
    train.main(_smoke(tmp_path / "run", emoji_file))
    monkeypatch.undo()
    base = ["--out", str(tmp_path / "run"), "--data", str(emoji_file), "--device", "cpu"]
    with pytest.raises(SparvarError, match="--resume"):
        train.main(_smoke(tmp_path / "other", emoji_file, "--replan", "full=5"))
    for bad, says in (("prefix=2", "at step"), ("mid=9", "takes prefix=STEPS"), ("full=x", "takes prefix=STEPS")):
        with pytest.raises(SparvarError, match=says):
            train.main(base + ["--resume", "--replan", bad])
    state = train.main(base + ["--resume", "--phase", "full", "--replan", "full=3"])
    assert state["full"]["steps"] == 3 and state["full"]["done"]
    assert state["full"]["replanned"] == [{"at_step": 0, "from": None, "to": 3}]
    with pytest.raises(SparvarError, match="has ended"):
        train.main(base + ["--resume", "--replan", "full=9"])


def test_checkpoint_shards_and_export_load_as_a_pipeline(emoji_file, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 4 * 2**20)
    out = tmp_path / "run"
    train.main(_smoke(out, emoji_file))
    state = json.loads((out / checkpoint.STATE).read_text())
    assert len(state["shards"]) > 1 and all((out / s).stat().st_size <= 5 * 2**20 for s in state["shards"])
    assert sorted(p.name for p in out.iterdir()) == sorted(state["shards"] + [checkpoint.STATE, "preview.png"])

    assets, log = tmp_path / "assets", tmp_path / "log.json"
    train.main(["export", "--out", str(out), "--assets", str(assets), "--log", str(log)])
    files = {option: str(assets / name) for option, name in MODELS[DEMO].bundled.items()}
    assert all(t.dtype == torch.bfloat16 for f in files.values() for t in load_file(f).values())
    assert json.loads(log.read_text())["prefix"]["steps"] == 3
    spec = dataclasses.replace(MODELS[DEMO], schedules=())  # the smoke run's schedule is none of the model's
    pipe = load_pipeline(spec, weights=files["--weights"], vae=files["--vae"], text_encoder=files["--text-encoder"],
                         device="cpu")
    tensors, _ = checkpoint.load(out)
    assert torch.equal(pipe.transformer.head.weight, tensors["transformer.head.weight"].bfloat16().float())
    images = pipe(["emoji number 1"], seed=0, schedule=parse_schedule("1,2,4"), progress=False).images
    assert images[0].size == (16, 16)

    # a new session continues from the export alone (weights in bf16, fresh random streams)
    again = train.main(["--resume-from-export", "--out", str(tmp_path / "again"), "--assets", str(assets),
                        "--log", str(log), "--data", str(emoji_file), "--device", "cpu", "--phase", "tokenizer"])
    assert again["prefix"]["steps"] == 3 and len(again["calls"]) == 2
    resumed, _ = checkpoint.load(tmp_path / "again")
    assert set(resumed) - {"rng.cuda"} == set(tensors) - {"rng.cuda"}
    assert all(torch.equal(resumed[k], tensors[k].bfloat16().to(resumed[k].dtype)) for k in tensors
               if not k.startswith("rng."))
    with pytest.raises(SparvarError, match="--resume"):  # it never overwrites a checkpoint
        train.main(["--resume-from-export", "--out", str(tmp_path / "again"), "--assets", str(assets),
                    "--log", str(log), "--data", str(emoji_file), "--device", "cpu"])

    prompts = tmp_path / "held_out.txt"
    train.main(["prompts", "--data", str(emoji_file), "--prompts-out", str(prompts)])
    assert prompts.read_text().splitlines() == ["emoji number 3", "emoji number 7", "emoji number 11"]


def test_generate_without_a_prompt_draws_the_example(tmp_path, capsys):
    argv = ["generate", "--model", DEMO, "--random-weights", "--skip-last", "11", "--attention", "dense",
            "--out", str(tmp_path), "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    assert [p.name for p in tmp_path.glob("*.png")] == ["000_grinning-face.png"]


def test_the_demo_vae_is_its_trained_decoder_alone():
    """The shipped VAE file also holds InfinityVAE's encoder, untrained (the tokenizer has its own):
    it is not loaded, so nothing encodes pictures with it."""
    spec = MODELS[DEMO]
    shipped = load_file(str(spec.bundled_path("--vae")))
    assert any(k.startswith("encoder.") for k in shipped)
    vae = load_pipeline(DEMO, device="cpu").vae
    assert vae.encoder is None and not spec.vae_encodes
    assert torch.equal(vae.decoder.conv_in.weight, shipped["decoder.conv_in.weight"].float())


def test_demo_pipeline_loads_the_shipped_weights(capsys):
    spec = MODELS[DEMO]
    pipe = load_pipeline(DEMO, device="cpu")
    shipped = load_file(str(spec.bundled_path("--weights")))
    assert torch.equal(pipe.transformer.head.weight, shipped["head.weight"].float())
    assert sum(spec.bundled_path(option).stat().st_size for option in spec.bundled) <= 48e6
    assert [len(spec.schedule(resolution=r)) for r in (1024, 512)] == [13, 10]
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "trained on Noto's colour emoji" in out and str(spec.bundled_path("--weights")) in out
    assert "prompt when none is given: grinning face" in out


def test_default_generate_compares_dense_and_default(tmp_path, capsys):
    """The README's command (demo model, example prompt, dense and the default policy, same seed) on
    the 10-scale prefix: the full schedule takes about 20 s on 2 cores (its time is in the README)."""
    assert main(["generate", "--resolution", "512", "--out", str(tmp_path), "--quiet", "--device", "cpu"]) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["000_grinning-face_compare.png", "000_grinning-face_default.png", "000_grinning-face_dense.png"]
    out = capsys.readouterr().out
    assert "infinity-demo on cpu, 10 scales" in out
    assert "dense:" in out and "default:" in out and "attention density 100.0%" in out
    density = float(out.split("default:")[1].split("attention density ")[1].split("%")[0])
    assert 0 < density < 100


def test_prompts_train_the_text_encoder_and_the_empty_prompt(emoji_file, tmp_path):
    args = train.parse_args(_smoke(tmp_path, emoji_file))
    run = train.Run(args, torch.device("cpu"), train._new_state(args, torch.device("cpu")))
    run.latent_set, run.batch = run.latents("full"), 2
    run.teacher = TeacherForcing(run.model, run.text, run.codes, run.schedules["full"])
    for dropout in (0.0, 1.0):
        run.args.text_dropout = dropout
        run.model.zero_grad(set_to_none=True)
        run.text.zero_grad(set_to_none=True)
        run.transformer_step()["loss"].backward()
        text_grad = run.text.shared.weight.grad
        assert (text_grad is not None and text_grad.abs().sum() > 0) == (dropout == 0.0)
        assert (run.model.cfg_uncond.grad is not None and run.model.cfg_uncond.grad.abs().sum() > 0) == (dropout == 1.0)


def _teacher_inputs(schedule, batch=3):
    spec = MODELS[DEMO]
    cfg = dataclasses.replace(spec.transformer, width=64, heads=1, depth=2)
    model = create_model(dataclasses.replace(spec, transformer=cfg), "cpu", torch.float32, seed=0)
    text = build_t5(spec.text).eval()  # no dropout: two runs see the same features
    ids, mask = ByteTokenizer(spec.text["vocab_size"])(["cat face", "flag: Japan", "x"][:batch], cfg.text_max_len)
    latents = torch.randn(batch, cfg.vae_channels, *schedule.sizes[-1])
    return model, text, BitwiseCodes(cfg.vae_channels, patchify=False), latents, ids, mask


def test_step_loss_is_the_weighted_bit_cross_entropy():
    """The step's loss (BCE on logit differences, step.py) against the 2-way softmax cross-entropy
    of the logits, scale k weighing sqrt(n_k), with dropped prompts taking the learned empty one."""
    schedule = parse_schedule("1,2,3,5")
    model, text, codes, latents, ids, mask = _teacher_inputs(schedule)
    with torch.no_grad():
        model.cfg_uncond.normal_()
    flip, drop = torch.tensor([0.0, 0.1, 0.2]), torch.tensor([False, True, False])
    metrics = TeacherForcing(model, text, codes, schedule)(latents, ids, mask, flip, drop, torch.Generator().manual_seed(0))

    bits, inputs, _ = quantize(latents, schedule, codes, flip, torch.Generator().manual_seed(0))
    bits = torch.cat(bits, dim=1)
    feats = text(input_ids=ids, attention_mask=mask).last_hidden_state
    feats[1] = model.cfg_uncond[: feats.shape[1]]
    logits = model.forward_full(inputs, schedule, model.prepare((feats, mask), guidance=False))
    ce = F.cross_entropy(logits.flatten(0, 2), bits.flatten(), reduction="none").view(bits.shape).mean(-1)
    weights = torch.cat([torch.full((n,), n**-0.5) for n in schedule.lengths])
    expected = (ce * weights / weights.sum()).sum(-1).mean()
    assert torch.allclose(metrics["loss"], expected, rtol=1e-5)
    last = logits[:, -25:].argmax(-1) == bits[:, -25:]
    assert torch.allclose(metrics["acc3"], last.float().mean())


@pytest.mark.parametrize("sizes", ["1,2,3,5", "1,2,4,6,8,12,16"])
def test_block_causal_flex_mask_is_the_per_scale_prefix(sizes):
    """One FlexAttention call with the block-causal BlockMask computes what one SDPA per scale does
    (schedules of one and of several 128-token blocks, lengths no multiple of 128)."""
    schedule = parse_schedule(sizes)
    q, k, v = (torch.randn(2, 2, schedule.total, 16) for _ in range(3))
    flex = BlockCausalFlex(schedule, "cpu")(0, q, k, v)
    assert torch.allclose(flex, PrefixAttend(schedule)(0, q, k, v), atol=1e-5)


@pytest.mark.slow
def test_compiled_blocks_step_matches_the_eager_step():
    """torch.compile per block (one graph every block shares) changes no loss and no gradient."""
    schedule = parse_schedule("1,2,3,5")
    model, text, codes, latents, ids, mask = _teacher_inputs(schedule)
    flip, drop = torch.tensor([0.0, 0.1, 0.2]), torch.tensor([False, True, False])
    results = []
    for compile in ("off", "blocks"):
        model.zero_grad(set_to_none=True)
        metrics = TeacherForcing(model, text, codes, schedule, compile=compile)(
            latents, ids, mask, flip, drop, torch.Generator().manual_seed(0))
        metrics["loss"].backward()
        results.append((metrics["loss"].detach(), [p.grad.clone() for p in model.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert torch.allclose(compiled, eager, rtol=1e-5)
    assert all(torch.allclose(c, e, rtol=1e-4, atol=1e-7) for c, e in zip(compiled_grads, eager_grads))


class _Drawer:
    """A stand-in pipeline that draws, for each prompt, the training emoji `pick` names."""

    def __init__(self, train_set, pick):
        self.train_set, self.pick = train_set, pick

    def __call__(self, prompts, seed, attention, schedule, progress):
        images = [self.train_set.images[self.pick(self.train_set.prompts.index(p))] for p in prompts]
        return types.SimpleNamespace(images=[Image.fromarray(i) for i in images])


@pytest.mark.parametrize("pick, expected", [
    (lambda i: i, 1.0),  # its own emoji
    (lambda i: i ^ 1, 1.0),  # its skin-tone variant (designs pair up in the fixture)
    (lambda i: i + 2, 0.0),  # another design
])
def test_retrieval_counts_the_prompts_own_design(emoji_file, pick, expected):
    train_set = data.load(emoji_file).split(held_out=False)
    train_set = dataclasses.replace(train_set, images=train_set.images[:8], prompts=train_set.prompts[:8],
                                    designs=[f"design {i // 2}" for i in range(8)], held_out=train_set.held_out[:8])
    result = score.retrieval_top1(_Drawer(train_set, lambda i: pick(i) % 8), train_set, samples=6, batch=4,
                                  progress=lambda _: None)
    assert result["samples"] == 6 and result["train_prompt_retrieval_top1"] == expected


def test_score_sample_is_fixed_and_distinct():
    a, b = score.sample(3461, 500), score.sample(3461, 500)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 500 and a.max() < 3461
    assert np.array_equal(score.sample(5, 500), np.arange(5))


def test_sheet_lays_out_sections_of_captioned_images(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    from sparvar.demo.grid import section, sheet

    calls = []

    def pipe(prompts, seed, attention, progress):
        calls.append((list(prompts), seed, attention))
        return SimpleNamespace(images=[Image.new("RGB", (16, 16), "red") for _ in prompts])

    titled = tmp_path / "train.txt"
    titled.write_text("# Training prompts\ncat face\nflag: Japan\nrainbow\n", encoding="utf-8")
    plain = tmp_path / "held.txt"
    plain.write_text("kiss: man, man\n", encoding="utf-8")
    sections = [section(str(titled)), section(str(plain))]
    assert sections == [("Training prompts", ["cat face", "flag: Japan", "rainbow"]), ("held", ["kiss: man, man"])]
    picture = sheet(pipe, sections, seed=3, columns=2, batch=2)
    assert calls == [(["cat face", "flag: Japan"], 3, "dense"), (["rainbow"], 3, "dense"), (["kiss: man, man"], 3, "dense")]
    assert picture.size == (32, 3 * (16 + 30) + 2 * 30)  # two rows, then one, under two titles
    assert picture.getpixel((0, 30)) == (255, 0, 0) and picture.getpixel((16, 30 + 46)) == (255, 255, 255)
    (tmp_path / "title_only.txt").write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(SparvarError, match="no prompts"):
        section(str(tmp_path / "title_only.txt"))


@pytest.mark.parametrize("argv, says", [(["--columns", "0"], "--columns must be 1 or more"),
                                        (["--prompts", "missing.txt"], "prompts file not found")])
def test_grid_command_refuses_bad_input_in_one_line(argv, says, tmp_path):
    import subprocess
    import sys

    prompts = tmp_path / "p.txt"
    prompts.write_text("cat face\n", encoding="utf-8")
    base = argv if "--prompts" in argv else ["--prompts", str(prompts)] + argv
    done = subprocess.run([sys.executable, "-m", "sparvar.demo.grid", *base, "--out", str(tmp_path / "g.png")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("error: ") and says in done.stderr
    assert not (tmp_path / "g.png").exists()

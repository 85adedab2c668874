"""The VAREdit family: its source slot in the KV cache (generation equals teacher forcing), the
official positions and pooling, the official picture preparation, and what a generation needs."""

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import cli_error, edit_pipeline, teacher_forced_logits
from sparvar import create_model
from sparvar.cli import main as cli_main
from sparvar.errors import SparvarError
from sparvar.models.infinity.transformer import InfinityTransformer
from sparvar.models.varedit.source import EditImages
from sparvar.models.varedit.transformer import edit_positions, pool_source
from sparvar.schedules import Schedule, infinity_schedule

PROMPTS = ["make the sky purple", "add a red hat"]


def picture(width: int = 30, height: int = 20, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize("overrides", [{}, {"patchify": True}], ids=["2b-style", "8b-style-patchified"])
@pytest.mark.slow
def test_kv_cache_generation_equals_teacher_forcing(overrides):
    pipe = edit_pipeline(**overrides)
    seen, source = [], picture()
    out = pipe(PROMPTS, image=source, seed=3, cfg=2.5, tau=1.0, progress=False,
               on_scale=lambda k, logits, bits: seen.append(logits))
    full = teacher_forced_logits(pipe, PROMPTS, out.schedule, out.tokens, 2.5, image=source)
    step = torch.cat(seen, dim=1)
    assert ((full - step).norm() / full.norm()).item() < 1e-4
    assert [im.size for im in out.images] == [source.size] * 2  # in the source's shape
    side = pipe.codes.latent_size(out.schedule.sizes[-1])[0] * pipe.spec.vae.patch
    assert out.pixels.shape == (2, 3, side, side) == (2, 3, 64 if overrides else 32, 64 if overrides else 32)


@torch.no_grad()
def test_the_source_steers_the_edit_and_each_prompt_may_have_its_own():
    pipe = edit_pipeline()
    schedule = pipe.schedule()
    a, b = pipe._source((picture(seed=1),), 1, schedule), pipe._source((picture(seed=2),), 1, schedule)
    both = pipe._source((picture(seed=1), picture(seed=2)), 2, schedule)
    assert torch.allclose(both, torch.cat([a, b]), atol=1e-5)  # batched convolutions round apart
    assert a.shape == (1, schedule.source_length, pipe.codes.bits)
    feats, mask = pipe.encode(PROMPTS[:1])
    logits = [pipe.transformer.forward_full([], schedule.truncated(1), pipe.transformer.prepare((feats, mask, s), False))
              for s in (a, b)]
    assert not torch.allclose(*logits)  # scale 0 already sees the source


def test_positions_are_the_official_table_read_by_sequence_index():
    at_1024 = infinity_schedule("1:1", 1024)
    schedule = Schedule(at_1024.sizes, source=(64, 64))
    rows, cols = edit_positions(schedule)
    assert len(rows) == 4096 + 10521
    t = 5 * 64 + 7  # source token (5, 7): on the grid twice as large, offset by the 64x64 grid
    assert (rows[t], cols[t]) == (64 + 5, 64 + 7)
    own_rows, own_cols = InfinityTransformer.positions(at_1024)  # the scales at their stretched places
    assert torch.equal(rows[4096:], own_rows) and torch.equal(cols[4096:], own_cols)
    at_512 = infinity_schedule("1:1", 512)
    rows, cols = edit_positions(Schedule(at_512.sizes, at_512.pos_grid, source=(32, 32)))
    index = torch.arange(1024 + 2521)  # source and target alike fall on the source grid's first rows
    assert torch.equal(rows, (64 + index // 64).float()) and torch.equal(cols, (64 + index % 64).float())


@pytest.mark.parametrize("side", [8, 6, 3, 1])
def test_the_pooled_source_is_the_area_mean_of_its_cells(side):
    """Keys over [source 8x8; scales] with the source pooled to a side x side scale: each pooled
    cell is the mean of the source cells it covers (cells i*8//side .. ceil((i+1)*8/side))."""
    schedule = Schedule(((1, 1), (side, side)), source=(8, 8))
    keys = torch.randn(2, 3, 64 + 1 + side * side, 4)
    pooled = pool_source(keys, schedule, 1).numpy()
    grid = keys[:, :, :64].numpy().reshape(2, 3, 8, 8, 4)
    spans = [(i * 8 // side, -(-(i + 1) * 8 // side)) for i in range(side)]
    want = np.stack([np.stack([grid[:, :, a:b, c:d].mean((2, 3)) for c, d in spans], 2) for a, b in spans], 2)
    assert np.allclose(pooled[:, :, : side * side], want.reshape(2, 3, side * side, 4), atol=1e-6)
    assert np.array_equal(pooled[:, :, side * side :], keys[:, :, 64:].numpy())  # the scales as they were


def test_pictures_are_padded_white_at_the_top_left_and_edits_cropped_back():
    red = Image.new("RGB", (6, 4), (255, 0, 0))
    pixels = EditImages.pixels([red], 6)[0]
    assert pixels.shape == (3, 6, 6)
    assert torch.equal(pixels[:, :4], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 4, 6))
    assert torch.equal(pixels[:, 4:], torch.ones(3, 2, 6))  # the white padding below
    edited = Image.new("RGB", (12, 12), (0, 0, 255))
    assert EditImages.restore(edited, (6, 4)).size == (6, 4)


def test_a_picture_per_prompt_or_one_for_all():
    pipe = edit_pipeline()
    with pytest.raises(SparvarError, match="3 source pictures for 2 prompts"):
        pipe(PROMPTS, image=[picture()] * 3, progress=False)
    with pytest.raises(SparvarError, match="image takes a PIL image"):
        pipe(PROMPTS, image=torch.zeros(3, 8, 8), progress=False)


@pytest.mark.parametrize("name, base", [("varedit-2b-512", "infinity-2b"), ("varedit-8b-512", "infinity-8b"),
                                        ("varedit-8b-1024", "infinity-8b")])
def test_the_layout_is_the_official_infinitys(name, base, official_layouts):
    mine = {k: list(v.shape) for k, v in create_model(name, device="meta").state_dict().items()}
    assert mine == official_layouts[base]


def test_each_model_generates_its_own_square_schedule_after_its_source():
    from sparvar.models.registry import MODELS

    schedule = MODELS["varedit-8b-1024"].schedule()
    assert schedule.source == (64, 64) and schedule.total == 4096 + 10521 and schedule.offsets[0] == 4096
    assert MODELS["varedit-8b-512"].schedule().source == (32, 32)
    with pytest.raises(SparvarError, match="only 1:1 images at 512x512"):
        MODELS["varedit-2b-512"].schedule("4:3")


# ---- the command line ---------------------------------------------------------------------------
@pytest.fixture
def source_file(tmp_path):
    path = tmp_path / "in.png"
    picture(24, 16).save(path)
    return path


@pytest.mark.parametrize("case", ["no picture", "missing", "unreadable", "a picture for a model that edits none"])
def test_bad_pictures_fail_in_one_line_and_write_nothing(capsys, tmp_path, source_file, case):
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    model, image = {"no picture": ("varedit-tiny", None), "missing": ("varedit-tiny", tmp_path / "none.png"),
                    "unreadable": ("varedit-tiny", bad),
                    "a picture for a model that edits none": ("infinity-tiny", source_file)}[case]
    out = tmp_path / "out"
    argv = ["generate", "--model", model, "--prompt", "make it blue", "--out", str(out), "--device", "cpu"]
    err = cli_error(capsys, argv + (["--image", str(image)] if image else []))
    expected = {"no picture": "edits a picture: give it one", "missing": "image not found",
                "unreadable": "cannot read", "a picture for a model that edits none": "takes no source image"}[case]
    assert expected in err
    assert not out.exists()


def test_a_batch_job_refuses_a_picture_in_one_line(capsys, tmp_path, source_file):
    out = tmp_path / "job"
    argv = ["generate", "--model", "varedit-tiny", "--prompt", "make it blue", "--image", str(source_file),
            "--batch-size", "1", "--out", str(out), "--device", "cpu"]
    assert "batch jobs do not take a source picture yet" in cli_error(capsys, argv)
    assert not out.exists()


@pytest.mark.slow
def test_generate_edits_a_picture_from_the_command_line(tmp_path, source_file, capsys):
    out = tmp_path / "edit.png"
    argv = ["generate", "--model", "varedit-tiny", "--image", str(source_file), "--prompt", "make it blue",
            "--attention", "default", "--out", str(out), "--device", "cpu", "--quiet"]
    assert cli_main(argv) == 0
    assert Image.open(out).size == (24, 16)


@pytest.mark.slow
def test_every_kv_cache_kind_keeps_the_source():
    """The source slot is written once, before scale 0, and read at every scale: the lean cache (no
    last scale) and the official-style concatenated one draw the static cache's tokens, FP8 close."""
    pipe = edit_pipeline()
    outs = {kind: pipe(PROMPTS[:1], image=picture(), seed=5, kv_cache=kind, progress=False)
            for kind in ("static", "lean", "concat", "fp8")}
    for kind in ("lean", "concat"):
        assert all(torch.equal(a, b) for a, b in zip(outs[kind].tokens, outs["static"].tokens)), kind
    agree = torch.cat([(a == b).flatten() for a, b in zip(outs["fp8"].tokens, outs["static"].tokens)])
    assert agree.float().mean() > 0.9

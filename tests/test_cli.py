"""The command line: the default job, the listing, and one-line errors with exit status 2."""

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sparvar.loading
from helpers import cli_error
from sparvar import create_model, generation
from sparvar.cli import main


def test_generate_writes_images(tmp_path, capsys):
    argv = ["generate", "--model", "infinity-tiny", "--prompt", "a cat", "--prompt", "a dog",
            "--schedule", "1,2,4", "--attention", "dense", "--out", str(tmp_path), "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    files = sorted(tmp_path.glob("*.png"))
    assert [f.name for f in files] == ["000_a-cat.png", "001_a-dog.png"]
    assert Image.open(files[0]).size == (8, 8)
    out = capsys.readouterr().out
    assert "infinity-tiny on cpu, 3 scales (1 2 4), 2 images in one batch" in out
    assert "for the batch (" in out and " s per image)" in out  # times of a batch say what they are


@pytest.mark.parametrize("extra", [[], ["--batch-size", "1"]], ids=["one-pass", "batch-job"])
@pytest.mark.slow
def test_generate_checks_each_generation_once(tmp_path, capsys, monkeypatch, extra):
    """validation.validate resolves each --attention entry's config once, before the model loads;
    the loop (and a batch job's batches) run it as checked."""
    resolved = []
    real = generation.GenerationConfig.resolved
    monkeypatch.setattr(generation.GenerationConfig, "resolved", lambda self, spec: resolved.append(1) or real(self, spec))
    argv = ["generate", "--model", "var-tiny", "--class", "1", "--class", "2", "--attention", "dense", "--random-weights",
            "--out", str(tmp_path), "--quiet", "--device", "cpu", *extra]
    assert main(argv) == 0
    assert len(resolved) == 1 and len(list(tmp_path.glob("*.png"))) == 2


@pytest.mark.slow
def test_generate_one_png_path(tmp_path, capsys):
    target = tmp_path / "sub" / "img.png"
    argv = ["generate", "--model", "var-tiny", "--class", "3", "--attention", "dense", "--out", str(target), "--quiet",
            "--device", "cpu"]
    assert main(argv) == 0 and target.is_file()
    one = Image.open(target).width
    argv[argv.index("dense")] = "dense,paper,csla"  # several presets: a comparison at --out, one image each beside it
    assert main(argv) == 0
    names = {"img.png", "img_dense.png", "img_paper.png", "img_csla.png"}
    assert names == {p.name for p in target.parent.iterdir()}
    assert Image.open(target).width > 5 * one  # 3 images and 2 difference maps
    assert f"wrote {target} and one image per preset beside it" in capsys.readouterr().out


def test_models_lists_configs_and_files(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("infinity-2b", "infinity-8b", "infinity-demo", "infinity-tiny"):
        assert name in out
    assert "infinity_2b_reg.pth" in out and "infinity_vae_d56_f8_14_patchify.pth" in out


def test_missing_files(tmp_path, capsys):
    err = cli_error(capsys, ["generate", "--model", "infinity-2b", "--prompt", "x"])
    assert "needs --weights (infinity_2b_reg.pth)" in err
    err = cli_error(
        capsys, ["generate", "--model", "infinity-2b", "--prompt", "x", "--weights", str(tmp_path / "w.pth"),
                 "--vae", "v.pth", "--text-encoder", "t5"])
    assert "checkpoint not found" in err
    assert "prompts file not found" in cli_error(capsys, ["generate", "--prompts", str(tmp_path / "p.txt")])


def test_checkpoint_of_another_model(tmp_path, capsys):
    torch.save(create_model("infinity-tiny").state_dict(), tmp_path / "tiny.pth")
    err = cli_error(
        capsys, ["generate", "--model", "infinity-2b", "--prompt", "x", "--weights", str(tmp_path / "tiny.pth"),
                 "--vae", "v.pth", "--text-encoder", "t5"])
    assert "does not fit infinity-2b" in err and "looks like a checkpoint of infinity-tiny" in err


def test_bad_values(tmp_path, capsys):
    assert "unknown aspect ratio '16:9'" in cli_error(capsys, ["generate", "--aspect", "16:9", "--out", str(tmp_path)])
    assert "unknown model" in cli_error(capsys, ["generate", "--model", "infinity-3b"])
    assert "class-conditional" in cli_error(
        capsys, ["generate", "--model", "var-tiny", "--class", "dog", "--out", str(tmp_path)])
    assert cli_error(capsys, ["generate", "--class", "3", "--out", str(tmp_path)]) == \
        "error: infinity-demo is text-conditioned: give --prompt TEXT, not --class"
    assert "names one file" in cli_error(
        capsys, ["generate", "--prompt", "a", "--prompt", "b", "--out", str(tmp_path / "a.png")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_but_absent(capsys):
    assert "no usable CUDA GPU" in cli_error(capsys, ["generate", "--device", "cuda"])


def test_plan_json_without_weights(capsys):
    import json

    assert main(["plan", "--model", "infinity-8b", "--attention", "paper", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_layers"] == 40 and report["decision_scale"] == 10
    modes = [[s["mode"] for s in layer["scales"]] for layer in report["layers"]]
    assert modes[0][10:] == ["decision", "cs4a", "cs4a"] and modes[11][10:] == ["csla"] * 3
    assert abs(report["layers"][20]["scales"][12]["block_density"] - 0.165) < 0.005


def test_plan_text_and_presets(capsys):
    assert main(["plan", "--model", "infinity-2b", "--attention", "default", "--aspect", "3:4"]) == 0
    out = capsys.readouterr().out
    assert "scale 12 (72x54)" in out and "csla" in out and "attention pairs saved" in out
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "paper" in out and "fastvar" in out and "adaptive" in out
    assert "unknown attention preset" in cli_error(capsys, ["plan", "--attention", "fastest"])


@pytest.mark.slow
def test_generate_var(tmp_path, capsys):
    argv = ["generate", "--model", "var-tiny", "--class", "3", "--class", "7", "--seed", "0",
            "--attention", "dense", "--out", str(tmp_path), "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    files = sorted(tmp_path.glob("*.png"))
    assert [f.name for f in files] == ["000_3.png", "001_7.png"] and Image.open(files[0]).size == (32, 32)
    assert "var-tiny on cpu, 10 scales (1 2 3 4 5 6 8 10 13 16)" in capsys.readouterr().out
    first = [np.asarray(Image.open(f)) for f in files]
    assert main(argv + ["--top-k", "900", "--top-p", "0.95", "--cfg", "4"]) == 0  # the model's defaults
    assert all(np.array_equal(a, np.asarray(Image.open(f))) for a, f in zip(first, files))


def test_models_lists_var_configs_and_files(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for depth in (16, 20, 24, 30, 36):
        assert f"var-d{depth}\n" in out and f"var_d{depth}.pth" in out
    assert "vae_ch160v4096z32.pth" in out and "512x512" in out and "680 tokens" in out


def test_var_errors(tmp_path, capsys):
    assert "needs --weights (var_d30.pth), --vae (vae_ch160v4096z32.pth)" in cli_error(
        capsys, ["generate", "--model", "var-d30", "--class", "207"])
    assert "only 1:1 images at 32x32, not 4:3" in cli_error(
        capsys, ["generate", "--model", "var-tiny", "--aspect", "4:3"])
    assert "class indices 0..9, or 'random', not 10" in cli_error(
        capsys, ["generate", "--model", "var-tiny", "--class", "10", "--out", str(tmp_path), "--device", "cpu"])
    assert "only the schedule it was trained on (1 2 3 4 5 6 8 10 13 16), not 1 2" in cli_error(
        capsys, ["generate", "--model", "var-tiny", "--schedule", "1,2", "--out", str(tmp_path), "--device", "cpu", "--quiet"])


@pytest.mark.slow
def test_generate_with_skipping_and_pruning(tmp_path, capsys):
    argv = ["generate", "--model", "infinity-tiny", "--prompt", "a cat", "--schedule", "1,2,3,4,5,6",
            "--attention", "dense,paper", "--skip-last", "1", "--prune", "fastvar", "--adaptive-skip",
            "--out", str(tmp_path), "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "dense+skip1+fastvar+adaptive:" in out and "paper+skip1+fastvar+adaptive:" in out and "scales used" in out
    assert (tmp_path / "000_a-cat_compare.png").is_file()
    argv = ["generate", "--model", "infinity-tiny", "--prompt", "a cat", "--schedule", "1,2,3,4,5,6",
            "--attention", "default+skip2", "--out", str(tmp_path / "one.png"), "--quiet", "--device", "cpu"]
    assert main(argv) == 0 and (tmp_path / "one.png").is_file()


def test_skipping_option_errors(tmp_path, capsys):
    base = ["generate", "--model", "infinity-tiny", "--prompt", "x", "--schedule", "1,2,3,4,5,6", "--out", str(tmp_path),
            "--quiet"]
    assert "--skip-last must be 0 or more" in cli_error(capsys, base + ["--skip-last", "-1"])
    assert "unknown --prune 'fast'" in cli_error(capsys, base + ["--prune", "fast"])
    assert "cannot read 'skip'" in cli_error(capsys, base + ["--attention", "default+skip"])
    assert "skip_last must be in 0..5" in cli_error(capsys, base + ["--skip-last", "6"])
    assert "cannot read 'skip2'" in cli_error(capsys, base + ["--attention", "default+skip1", "--skip-last", "2"])
    assert "token pruning needs at least 5 scales" in cli_error(
        capsys, base[:6] + ["1,2,3,4"] + base[7:] + ["--prune", "fastvar"])


# ---- every mistake of issue 15's table: one line, exit status 2, before the model loads ----------
@pytest.fixture()
def no_loading(monkeypatch):
    """Loading a model fails the test: the mistake must be caught before."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was caught")

    monkeypatch.setattr(sparvar.loading, "load_pipeline", load)


def _read_only_folder(tmp_path) -> Path:
    """A folder no file can be written in: chmod 555, or for root (who may write there anyway) /sys."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        return folder
    try:
        tempfile.TemporaryFile(dir="/sys").close()
    except OSError:
        return Path("/sys")
    pytest.skip("no read-only folder on this machine")


def test_out_under_a_file_or_in_a_read_only_folder(tmp_path, capsys, no_loading):
    (tmp_path / "notes.txt").write_text("x")
    err = cli_error(capsys, ["generate", "--out", str(tmp_path / "notes.txt" / "x")])
    assert err == f"error: cannot write to {tmp_path / 'notes.txt' / 'x'}: {tmp_path / 'notes.txt'} is a file, not a folder"
    folder = _read_only_folder(tmp_path)
    assert f"error: cannot write to {folder}: " in cli_error(capsys, ["generate", "--out", str(folder)])
    assert f"error: cannot write to {folder}: " in cli_error(capsys, ["generate", "--out", str(folder / "one.png")])


def test_unknown_device(capsys, no_loading):
    tpu = cli_error(capsys, ["generate", "--device", "tpu"])
    assert tpu == "error: unknown device 'tpu'; use auto, cpu, cuda or cuda:N"
    assert "sparvar runs on cpu or cuda, not meta" in cli_error(capsys, ["generate", "--device", "meta"])


def test_seed_beyond_64_bits(tmp_path, capsys, no_loading):
    base = ["generate", "--out", str(tmp_path)]
    assert "seed must be in 0..9223372036854775807, got 99999999999999999999999" in cli_error(
        capsys, base + ["--seed", "99999999999999999999999"])
    assert "seed must be in 0..9223372036854775807, got -1" in cli_error(capsys, base + ["--seed", "-1"])
    assert "leaves no room for 2 images" in cli_error(
        capsys, base + ["--seed", str(2**63 - 1), "--prompt", "a", "--prompt", "b"])


def test_schedule_beyond_the_position_grid_or_the_memory(tmp_path, capsys, no_loading, monkeypatch):
    base = ["generate", "--schedule", "1,2,100000", "--out", str(tmp_path)]
    assert "infinity-demo generates only the schedules it was trained on" in cli_error(capsys, base)
    assert "scale 100000x100000 of schedule 1 2 100000 is beyond infinity-tiny's position grid of 128x128" in cli_error(
        capsys, base + ["--model", "infinity-tiny", "--prompt", "x"])
    # within the grid but far beyond the machine: Infinity-8B's KV cache, 15 scales, float32 on the CPU
    monkeypatch.setattr(generation, "device_memory", lambda device: 64 * 10**9)
    schedule = ",".join(["1"] + ["128"] * 14)
    need = 2 * 40 * 2 * (1 + 14 * 128 * 128) * 3584 * 4  # k and v, 40 layers, cond + uncond, width, bytes
    err = cli_error(capsys, ["generate", "--model", "infinity-8b", "--random-weights", "--prompt", "x", "--schedule",
                          schedule, "--device", "cpu", "--out", str(tmp_path)])
    assert f"(KV cache {need / 1e9:.1f} GB, activations " in err and "more than the 64.0 GB available on cpu" in err


@pytest.mark.parametrize("device,dtype,size", [("cpu", "float32", 4), ("cuda", "bfloat16", 2)])
def test_a_batch_beyond_the_memory_is_refused_with_the_number(tmp_path, capsys, monkeypatch, device, dtype, size):
    """The demo's --batch-size 64 took 10.7-16.2 GB of RAM unannounced: activations and the decoder
    count too, and a batch that does not fit the memory is refused before the model loads."""
    import sparvar.validation

    class Loaded(Exception):
        pass

    def load(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(sparvar.loading, "load_pipeline", load)
    if device == "cuda":  # the check as on a GPU, without one
        monkeypatch.setattr(sparvar.validation, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(generation, "device_memory", lambda device: 8 * 10**9)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("cat face\n" * 64)
    argv = ["generate", "--prompts", str(prompts), "--batch-size", "64", "--device", device, "--out", str(tmp_path / "o")]
    err = cli_error(capsys, argv)
    kv = 12 * 10521 * 2 * 128 * 256  # the demo's KV cache: layers, tokens, k and v, rows (64 with guidance), width
    act = 128 * 4096 * 256 * 24  # rows, last scale, width, 24
    dec = 64 * 4 * 32 * 256 * 256  # images, 4 maps, 32 channels, 256x256
    need = (kv + act + dec) * size
    where = "of cuda" if device == "cuda" else "available on cpu"
    assert err == f"error: 64 image(s) of schedule 1 2 4 6 8 12 16 20 24 32 40 48 64 with guidance in {dtype} need " \
                  f"about {need / 1e9:.1f} GB besides the weights (KV cache {kv * size / 1e9:.1f} GB, activations " \
                  f"{act * size / 1e9:.1f} GB, decoder {dec * size / 1e9:.1f} GB), more than the 8.0 GB {where}; " \
                  "generate fewer images at once"
    assert not (tmp_path / "o").exists()
    if device == "cpu":
        argv[argv.index("64")] = "8"  # 6.0 GB: it fits
        with pytest.raises(Loaded):
            main(argv)


@pytest.mark.parametrize("schedule", ["64,1", "1,2,4,8"])
def test_the_demo_refuses_a_schedule_it_was_not_trained_on(tmp_path, capsys, no_loading, schedule):
    err = cli_error(capsys, ["generate", "--schedule", schedule, "--out", str(tmp_path)])
    assert f"generates only the schedules it was trained on (1 2 4 6 8 12 16 20 24 32 40 48 64 or 1 2 4 6 8 12 16 " \
           f"20 24 32), not {schedule.replace(',', ' ')}" in err


def test_empty_prompts_file(tmp_path, capsys, no_loading):
    (tmp_path / "empty.txt").write_text("\n  \n")
    err = cli_error(capsys, ["generate", "--prompts", str(tmp_path / "empty.txt"), "--out", str(tmp_path)])
    assert err == f"error: prompts file {tmp_path / 'empty.txt'} is empty: give one prompt (or class) a line"
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("option,value,message", [
    ("--top-p", "5", "top_p must be in [0, 1], got 5.0"),
    ("--top-k", "-3", "top_k must be 0 or more, got -3"),
    ("--cfg", "-5", "cfg must be at least 0, got -5.0"),
    ("--tau", "0", "tau must be above 0, got 0.0"),
])
def test_sampling_values_out_of_range(tmp_path, capsys, no_loading, option, value, message):
    assert cli_error(capsys, ["generate", option, value, "--out", str(tmp_path)]) == f"error: {message}"


def test_eval_with_no_seeds(tmp_path, capsys, no_loading):
    assert "--seeds and --batch must be at least 1, got 0 and 10" in cli_error(
        capsys, ["eval", "--seeds", "0", "--out", str(tmp_path)])


def test_eval_reports_a_bad_preset_before_any_image(tmp_path, capsys, no_loading):
    err = cli_error(capsys, ["eval", "--presets", "dense,turbo", "--out", str(tmp_path / "q")])
    assert "cannot read 'turbo' in 'turbo'" in err and not (tmp_path / "q").exists()


def test_every_help_shows_the_defaults(monkeypatch, capsys):
    shown = []
    format_help = argparse.ArgumentParser.format_help

    def record(parser):
        shown.append(parser)
        return format_help(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "format_help", record)
    monkeypatch.setenv("COLUMNS", "10000")  # no line breaks inside the help texts
    commands = [[], ["generate"], ["plan"], ["eval"], ["analyze"], ["calibrate-skip"], ["bench", "e2e"],
                ["bench", "baseline"], ["bench", "kernels"], ["bench", "profile"], ["bench", "multigpu"],
                ["bench", "fp8"]]
    for command in commands:
        with pytest.raises(SystemExit):
            main(command + ["--help"])
        parser = shown[-1]
        text = format_help(parser)
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            assert action.help, f"{command}: {action.option_strings} has no help"
            if action.default is not None and action.default is not False:
                default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
                assert f"(default: {action.default})" in text or f"(default: {default})" in text, (command, action)
    capsys.readouterr()


@pytest.mark.parametrize("args,message", [
    (["--model", "var-tiny", "--class", "random", "--class", "3", "--sampler", "official"],
     "the official sampler draws random classes for the whole batch: ask for all or none"),
    (["--model", "var-tiny", "--more-smooth", "--tau", "0.5", "--sampler", "official"],
     "the official VAR sampler has no temperature: use tau 1, not 0.5"),
    (["--model", "var-tiny", "--negative-prompt", "x"], "var-tiny is class-conditional: a negative prompt needs a text model"),
    (["--model", "infinity-tiny", "--prompt", "a", "--more-smooth", "--schedule", "1,2"],
     "infinity-tiny (Infinity) takes no more_smooth"),
    (["--model", "infinity-tiny", "--prompt", "a", "--cfg", "1,2", "--schedule", "1,2,4"],
     "cfg gives 2 values, one per scale, for 3 scales"),
    (["--model", "infinity-tiny", "--prompt", "a", "--negative-prompt", "b", "--cfg", "1", "--schedule", "1,2"],
     "a negative prompt takes the unconditional half's place: it needs guidance"),
    (["--model", "infinity-tiny", "--prompt", "a", "--init-scales", "2", "--schedule", "1,2"],
     "--init-image and --init-scales go together"),
    (["--model", "infinity-tiny", "--prompt", "a", "--init-image", "nope.png", "--init-scales", "1", "--schedule", "1,2"],
     "image not found: nope.png"),
    (["--model", "infinity-tiny", "--prompt", "a", "--init-image", "nope.png", "--init-scales", "3", "--schedule", "1,2"],
     "--init-scales 3 is more than the 2 scales generated"),
])
def test_official_generation_options_are_checked_before_loading(tmp_path, capsys, no_loading, args, message):
    assert message in cli_error(capsys, ["generate", "--random-weights", "--out", str(tmp_path), *args])


def test_per_scale_values_that_are_not_numbers(capsys):
    assert cli_error(capsys, ["generate", "--cfg", "3,x"]) == \
        "error: argument --cfg: expected a number or numbers separated by commas, got '3,x' " \
        "(see sparvar generate --help)"


# ---- issue 23's table: one line, exit status 2, before the model loads ----------------------------
@pytest.mark.parametrize("argv,message", [
    (["generate", "--seed", "1.5"], "argument --seed: invalid int value: '1.5' (see sparvar generate --help)"),
    (["eval", "--seeds", "x"], "argument --seeds: invalid int value: 'x' (see sparvar eval --help)"),
    (["bench", "e2e", "--repeats", "x"], "argument --repeats: invalid int value: 'x' (see sparvar bench e2e --help)"),
    ([], "the following arguments are required: command (see sparvar --help)"),
])
def test_option_mistakes_are_one_line_without_the_usage_block(capsys, argv, message):
    assert cli_error(capsys, argv) == f"error: {message}"


def test_an_empty_preset_entry_is_refused(tmp_path, capsys, no_loading):
    err = cli_error(capsys, ["generate", "--attention", "dense,,default", "--out", str(tmp_path)])
    assert err == "error: --attention 'dense,,default' has an empty entry; separate presets with single commas"
    assert "--presets 'dense,' has an empty entry" in cli_error(capsys, ["eval", "--presets", "dense,"])
    assert list(tmp_path.iterdir()) == []


def test_an_empty_or_too_long_out(tmp_path, capsys, no_loading, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_error(capsys, ["generate", "--out", ""]) == \
        "error: --out is empty: give a folder, or a .png path for one image"
    long = "x" * 300
    assert cli_error(capsys, ["generate", "--out", str(tmp_path / long / "y")]) == \
        f"error: cannot write to {tmp_path / long / 'y'}: File name too long"
    name = "x" * 250 + ".png"  # fits, but not with the preset's name and the write's .part added
    err = cli_error(capsys, ["generate", "--attention", "dense,default", "--out", str(tmp_path / name)])
    assert err.startswith(f"error: cannot write {tmp_path / name[:-4]}_dense.png: its name is longer than the 255 "
                          "bytes")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("option,message", [
    (["--precision", "fp8"], "--precision fp8 needs a GPU with FP8 matmuls (Ada or Hopper); on the CPU it would only "
                             "be emulated, slower and with other images"),
    (["--offload", "blocks"], "--offload blocks keeps weights in CPU memory for a GPU; on the CPU they are there "
                              "already: leave it out"),
])
@pytest.mark.parametrize("command", ["generate", "eval", "analyze", "calibrate-skip"])
def test_gpu_settings_on_the_cpu_are_refused(tmp_path, capsys, no_loading, option, message, command):
    err = cli_error(capsys, [command, "--device", "cpu", "--out", str(tmp_path / "out"), *option])
    assert err == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_outside_a_batch_job_is_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sparvar.loading, "load_pipeline", interrupted)
    assert main(["generate", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "stopped by Ctrl+C\n"


def test_a_picture_to_vary_needs_a_vae_with_an_encoder(tmp_path, capsys, no_loading):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "picture.png")
    err = cli_error(capsys, ["generate", "--init-image", str(tmp_path / "picture.png"), "--init-scales", "2",
                             "--out", str(tmp_path / "out")])
    assert err == "error: infinity-demo's VAE has no encoder, so it cannot make variations of a picture (--init-image)"


@pytest.mark.slow
def test_variations_of_a_picture_from_the_command_line(tmp_path, capsys):
    from PIL import Image

    picture = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(picture)
    base = ["generate", "--model", "infinity-tiny", "--random-weights", "--prompt", "a cat", "--schedule", "1,2,4",
            "--attention", "dense", "--quiet", "--init-image", str(picture)]
    for scales, seed in [(3, 0), (3, 5), (1, 0), (1, 5)]:
        assert main(base + ["--init-scales", str(scales), "--seed", str(seed), "--out", str(tmp_path / f"{scales}-{seed}.png")]) == 0
    pixels = {name: np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("3-0", "3-5", "1-0", "1-5")}
    assert pixels["3-0"].shape == (8, 8, 3)
    assert np.array_equal(pixels["3-0"], pixels["3-5"])  # every scale is the picture's: the seed does not matter
    assert not np.array_equal(pixels["1-0"], pixels["1-5"])  # only the first scale is

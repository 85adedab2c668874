"""The `sparvar` command: generate images, list models and presets, show plans, run benchmarks.

Errors the user can fix (missing files, wrong checkpoint, bad option values, no GPU) end in one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from sparvar import batch, files
from sparvar.errors import SparvarError, Stopped
from sparvar.generation import GenerationConfig
from sparvar.generation import SAMPLERS
from sparvar.options import (ArgumentParser, HelpFormatter, add_model_options, device_of, output_folder, per_scale,
                             preset_list, read_conditions, read_image)
from sparvar.pruning import PRUNE_PRESETS
from sparvar.sparsity import combination


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:40] or "image"


def _conditions(args, spec) -> list:
    if args.label and spec.text_conditioned:
        raise SparvarError(f"{spec.name} is text-conditioned: give --prompt TEXT, not --class")
    conditions = list(args.prompt or []) + list(args.label or [])
    if args.prompts:
        conditions += read_conditions(args.prompts)
    if not conditions and spec.default_condition is None:
        raise SparvarError(f"{spec.name} is text-conditioned: give --prompt TEXT or --prompts FILE")
    return conditions or [spec.default_condition]


COMPARISON = "compare"  # the side-by-side's key among an item's files


def _output_files(out: str, conditions: list, presets: list[str], room: int) -> list[dict[str, Path]]:
    """Per condition, the file of each preset's image and, with several presets, of their
    comparison: --out x.png is then the comparison, each preset's image beside it (x_dense.png);
    in a folder they are NNN_slug_PRESET.png and NNN_slug_compare.png. Checked before any work:
    the folder takes `room` bytes and each name fits its filesystem."""
    if not out.strip():
        raise SparvarError("--out is empty: give a folder, or a .png path for one image")
    target = Path(out)
    named = target.suffix.lower() == ".png"
    if named:
        if len(conditions) != 1:
            raise SparvarError(f"--out {out} names one file but there are {len(conditions)} images; give a folder")
        paths = [output_folder(target.parent, room) / target.name]
    else:
        folder = output_folder(target, room)
        paths = [folder / f"{i:03d}_{_slug(c)}.png" for i, c in enumerate(conditions)]
    if len(presets) == 1:
        items = [{presets[0]: path} for path in paths]
    else:
        items = [{**{p: path.with_name(f"{path.stem}_{p}.png") for p in presets},
                  COMPARISON: path if named else path.with_name(f"{path.stem}_{COMPARISON}.png")} for path in paths]
    for item in items:
        for path in item.values():
            files.check_name(path)
    return items


def _generation_config(args) -> GenerationConfig:
    """The sampling and schedule options of `generate` (and `plan`'s schedule), checked."""
    return GenerationConfig(
        seed=args.seed, cfg=args.cfg, tau=args.tau, top_k=args.top_k, top_p=args.top_p, aspect=args.aspect,
        resolution=args.resolution, schedule=args.schedule, cuda_graphs=args.cuda_graphs, sampler=args.sampler,
        negative_prompt=args.negative_prompt, more_smooth=args.more_smooth, image=args.image,
        kv_cache=args.kv_cache, system_prompt=getattr(args, "system_prompt", None))


def _with_init_image(args, conditions: list, config: GenerationConfig, pipe) -> GenerationConfig:
    """--init-image: its tokens force the first --init-scales scales (the official gt_leak); the
    config with them is checked again, as they come from the loaded model's VAE."""
    if not args.init_image:
        return config
    h, w = pipe.codes.latent_size(config.schedule.sizes[-1])
    image = read_image(args.init_image, (h * pipe.spec.vae.patch, w * pipe.spec.vae.patch))
    tokens = pipe.image_tokens(image, config.schedule)
    return pipe.validate(conditions, GenerationConfig.build(config, init_tokens=tokens, init_scales=args.init_scales))


def _check_init_image(args, spec, configs: dict) -> None:
    """--init-image and --init-scales go together and fit the model and schedule (checked before loading)."""
    spec.family.refuse(spec.name, init_images=bool(args.init_image))
    if args.init_image and not spec.vae_encodes:
        raise SparvarError(f"{spec.name}'s VAE has no encoder, so it cannot make variations of a picture "
                           "(--init-image)")
    if bool(args.init_image) != bool(args.init_scales):
        raise SparvarError("--init-image and --init-scales go together: the picture's first N scales are kept")
    if not args.init_image:
        return
    if args.init_scales < 1:
        raise SparvarError(f"--init-scales must be 1 or more, got {args.init_scales}")
    for config in configs.values():
        scales = len(config.schedule) - config.skip_last
        if args.init_scales > scales:
            raise SparvarError(f"--init-scales {args.init_scales} is more than the {scales} scales generated")
    if not Path(args.init_image).is_file():
        raise SparvarError(f"image not found: {args.init_image}")


def cmd_generate(args) -> None:
    """Everything is checked (conditions, presets, settings against the model and the machine,
    the output folder) before the model loads, once (validation.validate)."""
    from sparvar.loading import load_pipeline
    from sparvar.models.registry import get_spec
    from sparvar.validation import default_dtype, validate

    spec = get_spec(args.model)
    conditions = _conditions(args, spec)
    job = args.batch_size is not None or batch.under_torchrun()
    if args.batch_size is not None and args.batch_size < 1:
        raise SparvarError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.attention is None:  # the demo shows the comparison; official models and batch jobs run SparVAR
        args.attention = "default" if spec.files or job else "dense,default"
    entries = preset_list(args.attention, "--attention")
    if job and len(entries) > 1:
        raise SparvarError(f"a batch job (--batch-size or torchrun) runs one --attention preset, not {len(entries)}; "
                           "run one job per preset, each with its own --out")
    accelerators, suffix = _accelerators(args)
    device = device_of(args, spec)
    batch_size = (args.batch_size or 1) if job else len(conditions)
    base = _generation_config(args)
    configs = {}  # name (the entry with the accelerator options, as written) -> its checked config
    for entry in entries:
        combo = combination(entry).with_accelerators(**accelerators)
        config = GenerationConfig.build(base, attention=combo.attention, **combo.options())
        configs[entry + suffix] = validate(spec, conditions, config, device, default_dtype(device), args.precision,
                                           args.offload, batch_size)
    presets = list(configs)
    _check_init_image(args, spec, configs)
    if job and args.init_image:
        raise SparvarError("--init-image makes variations in one pass; it is not an option of batch jobs")
    if job and args.image:
        raise SparvarError("--image edits in one pass; batch jobs do not take a source picture yet")
    seeds = base.seeds(len(conditions))
    h, w = spec.image_size(configs[presets[0]].schedule)
    for picture in configs[presets[0]].image or ():  # edits come back in their pictures' shapes
        h, w = max(h, picture.height), max(w, picture.width)
    png = 3 * h * w + h + 4096  # at most: its raw pixels, a filter byte a row, its chunks
    # a batch job needs room for one batch (a full disk later ends it in one line); a comparison
    # writes each preset's image and a side-by-side of them and their differences
    pngs = batch_size if job else len(conditions) * (1 if len(presets) == 1 else 3 * len(presets))
    outputs = _output_files(args.out, conditions, presets, pngs * png)
    load = lambda device: load_pipeline(  # noqa: E731
        spec.name, args.weights, args.vae, args.text_encoder, device=device, random_weights=args.random_weights,
        precision=args.precision, offload=args.offload)
    if job:
        weights = batch.weights_identity(spec, args.weights, args.vae, args.text_encoder, args.random_weights)
        if args.precision != "auto":  # FP8 makes other images (older jobs recorded no precision)
            weights["precision"] = args.precision
        items = [batch.Item(i, c, s, out[presets[0]]) for i, (c, s, out) in enumerate(zip(conditions, seeds, outputs))]
        job = batch.Job(spec.name, presets[0], configs[presets[0]], weights)
        batch.run(job, items, load, batch_size, args.device, overwrite=args.overwrite, progress=not args.quiet)
        return
    pipe = load(device)
    schedule, n = configs[presets[0]].schedule, len(conditions)
    print(f"{spec.name} on {pipe.device}, {len(schedule)} scales ({schedule.describe()})"
          + (f", {n} images in one batch" if n > 1 else ""))
    runs = {}
    for name, config in configs.items():
        out = runs[name] = pipe.generate(conditions, _with_init_image(args, conditions, config, pipe),
                                         progress=not args.quiet)
        stages = ", ".join(f"{k} {v:.2f} s" for k, v in out.stage_seconds.items())
        if n > 1:
            stages += f" for the batch ({out.stage_seconds['total'] / n:.2f} s per image)"
        used = f"; scales used {out.scales_used}" if config.adaptive_skip else ""
        print(f"  {name}: {stages}; attention density {_density(out, spec):.1%}{used}")
    for i, item in enumerate(outputs):
        for name, out in runs.items():
            files.save_image(out.images[i], item[name])
        if len(presets) == 1:
            print(f"wrote {item[presets[0]]}")
        else:
            files.save_image(_comparison(runs, i, spec), item[COMPARISON])
            print(f"wrote {item[COMPARISON]} and one image per preset beside it")


def _accelerators(args) -> tuple[dict, str]:
    """--skip-last, --prune and --adaptive-skip: what they add to every --attention entry
    (Combination.with_accelerators), and the suffix that names it ("+skip2") in outputs."""
    if args.skip_last is not None and args.skip_last < 0:
        raise SparvarError(f"--skip-last must be 0 or more, got {args.skip_last}")
    if args.prune is not None and args.prune not in PRUNE_PRESETS:
        raise SparvarError(f"unknown --prune {args.prune!r}; choose one of {', '.join(PRUNE_PRESETS)}")
    suffix = f"+skip{args.skip_last}" if args.skip_last else ""
    suffix += f"+{args.prune}" if args.prune else ""
    suffix += "+adaptive" if args.adaptive_skip else ""
    return dict(skip_last=args.skip_last or 0, prune=args.prune, adaptive=args.adaptive_skip), suffix


def _density(out, spec) -> float:
    """The attention a generation computed, of a full dense generation's (skipped scales count 0)."""
    from sparvar.eval.flops import attention_share

    return attention_share(out, spec.transformer.depth)


def _comparison(runs: dict, item: int, spec):
    """Every preset's image, then the difference of each to the first, captioned with time,
    attention density and PSNR."""
    from sparvar.eval.draw import difference_map, side_by_side
    from sparvar.eval.metrics import psnr, to_tensor

    names = list(runs)
    first = runs[names[0]].images[item]
    panels = [
        (out.images[item], f"{name}\n{out.stage_seconds['total'] / len(out.images):.2f} s per image, "
         f"density {_density(out, spec):.1%}")
        for name, out in runs.items()
    ]
    for name in names[1:]:
        image = runs[name].images[item]
        db = float(psnr(to_tensor([image]), to_tensor([first]))[0])
        panels.append((difference_map(first, image), f"|{names[0]} - {name}| x4\nPSNR {db:.1f} dB"))
    return side_by_side(panels)


def cmd_models(args) -> None:
    from sparvar.models.registry import MODELS
    from sparvar.schedules import INFINITY_ASPECTS, INFINITY_RESOLUTIONS

    for spec in MODELS.values():
        print(f"{spec.name}\n  {spec.about}")
        if spec.files:
            for option, file in spec.files.items():
                print(f"  {option:15s} {file}")
        elif spec.bundled:
            shipped = all(spec.bundled_path(option).is_file() for option in spec.bundled)
            print("  needs no files; its weights ship with the package:" if shipped else
                  "  its weights are not in this install yet (sparvar train-demo makes them):")
            for option in spec.bundled:
                print(f"  {option:15s} {spec.bundled_path(option)}")
        else:
            print("  needs no files")
        if not spec.text_conditioned:
            print(f"  classes: indices 0..{spec.num_classes - 1} (--class)")
        if spec.example:
            print(f"  prompt when none is given: {spec.example}")
        m = spec.transformer
        top_k = m.top_k if isinstance(m.top_k, int) else f"{m.top_k[0]} (per scale: {','.join(map(str, m.top_k))})"
        print(f"  sampling defaults: --cfg {m.cfg} --tau {m.tau} --top-k {top_k} --top-p {m.top_p}")
        if spec.only_schedules:
            trained = " or ".join(s.describe() for s in spec.only_schedules)
            which = "schedule" if len(spec.only_schedules) == 1 else "schedules"
            print(f"  generates only the {which} it was trained on: {trained}")
    print(f"Infinity aspect ratios (--aspect W:H): {', '.join(INFINITY_ASPECTS)}")
    print(f"Infinity resolutions (--resolution): {', '.join(map(str, INFINITY_RESOLUTIONS))}")
    print("VAR models generate 1:1 images at their own resolution and scales only")


def cmd_presets(args) -> None:
    from sparvar.sparsity import PRESETS

    for name, preset in PRESETS.items():
        print(f"{name:12s} {preset.description}")
    print("Accelerators an entry can add with '+' (e.g. default+fastvar+skip2; docs/skipping.md):")
    print(f"{'skipN':12s} stop N scales early")
    for name, preset in PRUNE_PRESETS.items():
        print(f"{name:12s} {preset.description}")
    print(f"{'adaptive':12s} per image, skip the last 1-2 scales when its estimate holds little fine detail")


def _ranges(layers: list[int]) -> str:
    out, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(out)


def cmd_plan(args) -> None:
    import json

    from sparvar.models.registry import get_spec
    from sparvar.sparsity import plan_report

    spec = get_spec(args.model)
    scales = GenerationConfig(aspect=args.aspect, resolution=args.resolution, schedule=args.schedule)
    schedule = scales.resolved(spec).schedule
    report = plan_report(spec.transformer.depth, schedule, args.attention,
                         pooled_layers=spec.transformer.pooled_source_layers)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{spec.name}, preset {report['preset']}: {report['description']}")
    if schedule.source:
        window = report["source_window"]
        seen = "all of it" if window is None else f"a {window}x{window} window around each query's place"
        print(f"  the {schedule.source[0]}x{schedule.source[1]} source ({schedule.source_length} keys, before scale 0): "
              f"dense passes see all of it, sparse ones {seen}; in layer(s) {_ranges(report['pooled_source_layers'])} "
              "it is pooled to the query scale's grid")
    for k, size in enumerate(report["schedule"]["sizes"]):
        groups: dict[tuple, list[int]] = {}
        for layer in report["layers"]:
            entry = layer["scales"][k]
            groups.setdefault((entry["mode"], entry["block_density"], entry["exact"]), []).append(layer["layer"])
        parts = [
            f"{mode} {density:.1%}{'' if exact else ' (budget)'} in layers {_ranges(layers)}"
            for (mode, density, exact), layers in groups.items()
        ]
        print(f"  scale {k:2d} ({size[0]}x{size[1]}): " + "; ".join(parts))
    print(f"attention pairs saved: {report['pairs']['saved_fraction']:.1%}")


def cmd_eval(args) -> None:
    from sparvar.eval import quality

    quality.main(args.rest)


def cmd_analyze(args) -> None:
    from sparvar.eval import analyze

    analyze.main(args.rest)


def cmd_train_demo(args) -> None:
    from sparvar.demo import train

    train.main(args.rest)


# `sparvar bench NAME` -> (module of sparvar.bench, what it measures)
BENCHES = {
    "baseline": ("e2e", "dense generation time of 2B and 8B"),
    "e2e": ("e2e", "all modes side by side"),
    "kernels": ("kernels", "attention kernels on the 1024x1024 shapes"),
    "kernel-variants": ("kernel_variants", "tile shapes and variants of the Triton kernels (JSON lines)"),
    "cpu-attention": ("cpu_attention", "the CPU attention backends on a small Infinity's shapes"),
    "profile": ("profile", "GPU time by kernel kind"),
    "multigpu": ("multigpu", "images/s of a torchrun batch job on 1 and 2 GPUs"),
    "memory": ("memory", "latency and peak memory of the precision / offload / KV cache settings"),
    "fp8-fidelity": ("fp8_fidelity", "what FP8 costs in logits and images"),
    "fp8": ("fp8", "FP8 matmuls per layer and scale against bf16 and torchao, and the scales of a generation"),
    "train-step": ("train_step", "the demo model's training step per variant"),
}


def cmd_bench(args) -> None:
    import importlib

    module = importlib.import_module(f"sparvar.bench.{BENCHES[args.what][0]}")
    options = {"which": args.what} if args.what in ("baseline", "e2e") else {}  # e2e.py serves both
    module.main(args.rest, **options)


def _add_schedule_options(parser) -> None:
    parser.add_argument("--aspect", default="1:1", help="width:height, one of Infinity's ratios (see `sparvar models`)")
    parser.add_argument("--resolution", type=int, help="Infinity's pixel budget: 256, 512, 768 or 1024 "
                        "(default: the model's)")
    parser.add_argument("--schedule", help='custom scales, e.g. "1,2,4,8" or "1x1,2x3", instead of --aspect and '
                        "--resolution (default: theirs; the demo and VAR models generate only their own)")


def cmd_calibrate_skip(args) -> None:
    from sparvar.eval import skip_calibration

    skip_calibration.main(args.rest)


def cmd_serve(args) -> None:
    from sparvar import serve

    serve.main(args.rest)


_PASS_THROUGH = {"eval": cmd_eval, "analyze": cmd_analyze, "train-demo": cmd_train_demo,
                 "calibrate-skip": cmd_calibrate_skip, "serve": cmd_serve}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="sparvar", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images (default: the demo model)", formatter_class=HelpFormatter)
    add_model_options(gen)
    gen.add_argument("--prompt", action="append", help="a text prompt (repeatable)")
    gen.add_argument("--prompts", help="file with one condition per line: a prompt, or a class index for "
                     "class-conditional models (VAR); without --batch-size or torchrun all of them run "
                     "in one pass per preset (a comparison), not as a resumable batch job")
    gen.add_argument("--class", dest="label", action="append",
                     help="class index, or 'random' for a class drawn from the seed; repeatable (default, "
                     "without prompts: class 0)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i (0..2^63-1)")
    gen.add_argument("--cfg", type=per_scale, help="classifier-free guidance, 0 or more, or one value per scale "
                     "separated by commas (default: the model's, see `sparvar models`)")
    gen.add_argument("--tau", type=per_scale, help="sampling temperature, above 0, or one per scale separated by "
                     "commas (default: the model's)")
    gen.add_argument("--top-k", type=int, help="keep the k likeliest tokens, 0: all (default: the model's)")
    gen.add_argument("--top-p", type=float, help="nucleus sampling mass in [0, 1], 0 or 1: off (default: the model's)")
    gen.add_argument("--system-prompt", help="text put before every prompt in the text model's pass, '' for none "
                     "(HART models; default: the official sampler's prompt-enhancement text)")
    gen.add_argument("--sampler", default="sparvar", choices=SAMPLERS,
                     help="sparvar: each image draws from its own seed; official: draws as the official scripts do "
                     "(one generator for the batch), so a seed gives their images")
    gen.add_argument("--negative-prompt", help="text models: a prompt to steer away from (it replaces the empty "
                     "prompt of guidance)")
    gen.add_argument("--image", help="the source picture of an edit (VAREdit models): every prompt is an "
                     "instruction applied to it; the edited images come back in its shape")
    gen.add_argument("--init-image", help="a picture whose first --init-scales scales every image keeps: variations "
                     "of it (the official gt_leak)")
    gen.add_argument("--init-scales", type=int, default=0, help="how many first scales --init-image fixes")
    gen.add_argument("--more-smooth", action="store_true",
                     help="VAR: smoother images from soft mixtures of codewords (the official more_smooth)")
    _add_schedule_options(gen)
    gen.add_argument(
        "--attention",
        help="attention preset, or several separated by commas: each runs with the same seeds, and a "
        "side-by-side with difference maps is written (see `sparvar presets`); default: dense,default "
        "for the demo model, default for official checkpoints and batch jobs. An entry may add accelerators: "
        "default+skip2, default+fastvar, dense+adaptive (see --skip-last, --prune, --adaptive-skip)",
    )
    gen.add_argument("--skip-last", type=int, help="stop this many scales early (every --attention entry; default: 0)")
    gen.add_argument("--prune", help=f"token pruning at the large scales, one of {', '.join(PRUNE_PRESETS)} "
                     "(every --attention entry; default: none)")
    gen.add_argument("--adaptive-skip", action="store_true",
                     help="per image, skip the last 1-2 scales when the estimate holds little fine detail")
    gen.add_argument("--out", default="out", help="output folder, or a .png path for one image")
    gen.add_argument(
        "--batch-size", type=int,
        help="images per forward pass in each process; makes this a batch job, as does running under torchrun "
        "(each process then takes cuda:LOCAL_RANK): one preset, OUT/job.json records the settings, images already "
        "made are skipped (rerun to resume), OUT/manifest.jsonl gets one line per image (default: all images in "
        "one pass; 1 in a batch job)",
    )
    gen.add_argument("--overwrite", action="store_true",
                     help="a batch job whose OUT holds another job's images makes them all again with these settings "
                     "(without it such a job is refused)")
    gen.add_argument("--cuda-graphs", action="store_true",
                     help="replay each scale as a CUDA graph: faster for many batches of one shape (the first "
                     "two batches of a shape warm up and capture)")
    gen.add_argument("--kv-cache", default="static",
                     help="static: every scale's keys in one buffer; lean: without the last scale's (none reads "
                     "them; 39%% less at 1024x1024, one copy per layer); fp8: lean and stored in FP8 (half again)")
    gen.add_argument("--random-weights", action="store_true",
                     help="random weights for every part, no files needed (for benchmarks: the images are noise)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    models = sub.add_parser("models", help="list the model configs and the files each needs")
    models.set_defaults(func=cmd_models)

    presets = sub.add_parser("presets", help="list the attention presets")
    presets.set_defaults(func=cmd_presets)

    plan = sub.add_parser("plan", help="what an attention preset does to a model, per layer and scale (no weights)",
                          formatter_class=HelpFormatter)
    plan.add_argument("--model", default="infinity-demo", help="model name, see `sparvar models`")
    plan.add_argument("--attention", default="default", help="attention preset (see `sparvar presets`)")
    _add_schedule_options(plan)
    plan.add_argument("--json", action="store_true", help="the whole plan as JSON")
    plan.set_defaults(func=cmd_plan)

    for name, text in (
        ("eval", "image and attention fidelity of presets against dense, same seeds (JSON + markdown)"),
        ("analyze", "attention sinks, cross-scale similarity, locality, block tables (JSON + pictures)"),
        ("train-demo", "the demo model: prepare its emoji data, train it in resumable calls, export its weights"),
        ("calibrate-skip", "thresholds of the adaptive skip rule on a model's own samples (JSON + markdown)"),
        ("serve", "a local web page to generate and compare dense with a preset (Gradio: pip install -e .[ui])"),
    ):
        sub.add_parser(name, help=text + "; see its --help")  # main() hands its options to its own parser

    bench = sub.add_parser("bench", help="benchmarks written under benchmarks/ (see --help of each)",
                           formatter_class=HelpFormatter)
    bench.add_argument("what", choices=list(BENCHES),
                       help="; ".join(f"{name}: {about}" for name, (_, about) in BENCHES.items()))
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in _PASS_THROUGH:  # their own parsers take every option, --help included
            args = argparse.Namespace(func=_PASS_THROUGH[argv[0]], rest=argv[1:])
        else:
            args = build_parser().parse_args(argv)
        args.func(args)
    except SparvarError as err:
        print(err if isinstance(err, Stopped) else f"error: {err}", file=sys.stderr)
        return err.status
    except KeyboardInterrupt:  # outside a batch job: every file written is whole (files.py)
        print("stopped by Ctrl+C", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

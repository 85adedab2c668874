"""The `sparvar` command: generate images, list models and presets, show plans, run benchmarks.

Errors the user can fix (missing files, wrong checkpoint, bad option values, no GPU) end in one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from sparvar import batch
from sparvar.errors import SparvarError
from sparvar.skipping import PRUNE_PRESETS, combination


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:40] or "image"


def _conditions(args) -> list:
    conditions = list(args.prompt or []) + list(args.label or [])
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise SparvarError(f"prompts file not found: {path}")
        conditions += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return conditions


def _output_paths(out: str, conditions: list) -> list[Path]:
    target = Path(out)
    if target.suffix.lower() == ".png":
        if len(conditions) != 1:
            raise SparvarError(f"--out {out} names one file but there are {len(conditions)} images; give a folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        return [target]
    target.mkdir(parents=True, exist_ok=True)
    return [target / f"{i:03d}_{_slug(c)}.png" for i, c in enumerate(conditions)]


def cmd_generate(args) -> None:
    from sparvar.models.registry import get_spec
    from sparvar.pipeline import load_pipeline

    spec = get_spec(args.model)
    conditions = _conditions(args)
    if not conditions and not spec.text_conditioned:
        conditions = [spec.classes[0] if spec.classes else 0]
    if not conditions:
        raise SparvarError(f"{spec.name} is text-conditioned: give --prompt TEXT or --prompts FILE")
    job = args.batch_size is not None or batch.under_torchrun()
    if args.attention is None:  # the demo shows the comparison; official models and batch jobs run SparVAR
        args.attention = "default" if spec.files or job else "dense,default"
    presets = [p.strip() + _accelerators(args) for p in args.attention.split(",") if p.strip()]
    if not presets:
        raise SparvarError("--attention names no preset; see `sparvar presets`")
    combos = {name: combination(name) for name in presets}
    schedule = _schedule(args, spec)
    paths = _output_paths(args.out, conditions)
    load = lambda device: load_pipeline(  # noqa: E731
        spec.name, args.weights, args.vae, args.text_encoder, device=device, random_weights=args.random_weights)
    if job:
        _batch_job(args, spec, conditions, paths, schedule, presets, load)
        return
    pipe = load(args.device)
    print(f"{spec.name} on {pipe.device}, {len(schedule)} scales ({schedule.describe()})")
    runs = {}
    for name, combo in combos.items():
        out = pipe(
            conditions, seed=args.seed, cfg=args.cfg, tau=args.tau, top_k=args.top_k, top_p=args.top_p,
            schedule=schedule, attention=combo.attention, cuda_graphs=args.cuda_graphs, progress=not args.quiet,
            **combo.options(),
        )
        runs[name] = out
        stages = ", ".join(f"{k} {v:.2f} s" for k, v in out.stage_seconds.items())
        used = f"; scales used {out.scales_used}" if combo.adaptive else ""
        print(f"  {name}: {stages}; attention density {_density(out.policy):.1%}{used}")
    if len(presets) == 1:
        for path, image in zip(paths, runs[presets[0]].images):
            image.save(path)
            print(f"wrote {path}")
        return
    for i, path in enumerate(paths):
        for name, out in runs.items():
            out.images[i].save(path.with_name(f"{path.stem}_{name}.png"))
        target = path.with_name(f"{path.stem}_compare.png")
        _comparison(runs, i).save(target)
        print(f"wrote {target} and one image per preset beside it")


def _batch_job(args, spec, conditions, paths, schedule, presets, load) -> None:
    """One preset over many images, resumable, sharded over torchrun's processes (sparvar/batch.py)."""
    if len(presets) > 1:
        raise SparvarError(f"a batch job (--batch-size or torchrun) runs one --attention preset, not {len(presets)}; "
                           "run one job per preset, each with its own --out")
    if args.batch_size is not None and args.batch_size < 1:
        raise SparvarError(f"--batch-size must be at least 1, got {args.batch_size}")
    model = spec.transformer
    job = batch.Job(
        spec.name, presets[0], model.cfg if args.cfg is None else args.cfg, model.tau if args.tau is None else args.tau,
        model.top_k if args.top_k is None else args.top_k, model.top_p if args.top_p is None else args.top_p,
        schedule, args.cuda_graphs, args.random_weights,
    )
    items = [batch.Item(i, c, args.seed + i, path) for i, (c, path) in enumerate(zip(conditions, paths))]
    batch.run(job, items, load, args.batch_size or 1, args.device, progress=not args.quiet)


def _accelerators(args) -> str:
    """--skip-last, --prune and --adaptive-skip as a suffix of every --attention entry ("+skip2")."""
    if args.skip_last is not None and args.skip_last < 0:
        raise SparvarError(f"--skip-last must be 0 or more, got {args.skip_last}")
    if args.prune is not None and args.prune not in PRUNE_PRESETS:
        raise SparvarError(f"unknown --prune {args.prune!r}; choose one of {', '.join(PRUNE_PRESETS)}")
    suffix = f"+skip{args.skip_last}" if args.skip_last else ""
    suffix += f"+{args.prune}" if args.prune else ""
    return suffix + ("+adaptive" if args.adaptive_skip else "")


def _density(policy) -> float:
    from sparvar.eval.quality import attention_density

    return attention_density(policy)


def _comparison(runs: dict, item: int):
    """Every preset's image, then the difference of each to the first, captioned with time,
    attention density and PSNR."""
    from sparvar.eval.draw import difference_map, side_by_side
    from sparvar.eval.metrics import psnr, to_tensor

    names = list(runs)
    first = runs[names[0]].images[item]
    panels = [
        (out.images[item], f"{name}\n{out.stage_seconds['total']:.2f} s, density {_density(out.policy):.1%}")
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
            print("  needs no files; its weights ship with the package:")
            for option in spec.bundled:
                print(f"  {option:15s} {spec.bundled_path(option)}")
        else:
            print("  needs no files")
        if spec.classes:
            print(f"  classes: {', '.join(spec.classes)}")
        elif not spec.text_conditioned:
            print(f"  classes: indices 0..{spec.num_classes - 1} (--class)")
    print(f"Infinity aspect ratios (--aspect W:H): {', '.join(INFINITY_ASPECTS)}")
    print(f"Infinity resolutions (--resolution): {', '.join(map(str, INFINITY_RESOLUTIONS))}")
    print("VAR models generate 1:1 images at their own resolution and scales only")


def _schedule(args, spec):
    from sparvar.schedules import parse_schedule

    return parse_schedule(args.schedule) if args.schedule else spec.schedule(args.aspect, args.resolution)


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
    report = plan_report(spec.transformer.depth, _schedule(args, spec), args.attention)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{spec.name}, preset {report['preset']}: {report['description']}")
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


def cmd_bench(args) -> None:
    if args.what == "kernels":
        from sparvar.bench import kernels

        kernels.main(args.rest, prog="sparvar bench kernels")
    elif args.what == "multigpu":
        from sparvar.bench import multigpu

        multigpu.main(args.rest)
    elif args.what == "profile":
        from sparvar.bench import profile

        profile.main(args.rest)
    else:
        from sparvar.bench import e2e

        e2e.main(args.rest, which=args.what)


def _add_schedule_options(parser) -> None:
    parser.add_argument("--aspect", default="1:1", help="width:height, one of Infinity's ratios (see `sparvar models`)")
    parser.add_argument("--resolution", type=int, help="Infinity's pixel budget: 256, 512, 768 or 1024")
    parser.add_argument("--schedule", help='custom scales, e.g. "1,2,4,8" or "1x1,2x3"')


def cmd_calibrate_skip(args) -> None:
    from sparvar.eval import skip_calibration

    skip_calibration.main(args.rest)


def cmd_serve(args) -> None:
    from sparvar import serve

    serve.main(args.rest)


_PASS_THROUGH = {"eval": cmd_eval, "analyze": cmd_analyze, "train-demo": cmd_train_demo,
                 "calibrate-skip": cmd_calibrate_skip, "serve": cmd_serve}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparvar", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images (default: the demo model)")
    gen.add_argument("--model", default="infinity-demo", help="model name, see `sparvar models`")
    gen.add_argument("--weights", help="transformer checkpoint (file or sharded folder)")
    gen.add_argument("--vae", help="VAE checkpoint (.pth)")
    gen.add_argument("--text-encoder", help="local folder of the T5 text encoder")
    gen.add_argument("--prompt", action="append", help="a text prompt (repeatable)")
    gen.add_argument("--prompts", help="file with one condition per line: a prompt, or a class name or index "
                     "for class-conditional models (demo, VAR)")
    gen.add_argument("--class", dest="label", action="append", help="class index or name (repeatable)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i")
    gen.add_argument("--cfg", type=float, help="classifier-free guidance (default: the model's)")
    gen.add_argument("--tau", type=float, help="sampling temperature (default: the model's)")
    gen.add_argument("--top-k", type=int, help="keep the k likeliest tokens, 0: all (default: the model's)")
    gen.add_argument("--top-p", type=float, help="nucleus sampling mass, 0: off (default: the model's)")
    _add_schedule_options(gen)
    gen.add_argument(
        "--attention",
        help="attention preset, or several separated by commas: each runs with the same seeds, and a "
        "side-by-side with difference maps is written (see `sparvar presets`); default: dense,default "
        "for the demo model, default for official checkpoints and batch jobs. An entry may add accelerators: "
        "default+skip2, default+fastvar, dense+adaptive (see --skip-last, --prune, --adaptive-skip)",
    )
    gen.add_argument("--skip-last", type=int, help="stop this many scales early (every --attention entry)")
    gen.add_argument("--prune", help=f"token pruning at the large scales, one of {', '.join(PRUNE_PRESETS)} "
                     "(every --attention entry)")
    gen.add_argument("--adaptive-skip", action="store_true",
                     help="per image, skip the last 1-2 scales when the estimate holds little fine detail")
    gen.add_argument("--device", default="auto", help="auto, cpu or cuda (under torchrun: each process takes "
                     "cuda:LOCAL_RANK)")
    gen.add_argument("--out", default="out", help="output folder, or a .png path for one image")
    gen.add_argument(
        "--batch-size", type=int,
        help="images per forward pass in each process; makes this a batch job, as does running under torchrun: "
        "one preset, images whose file exists are skipped (rerun to resume), OUT/manifest.jsonl gets one line "
        "per image (default: all images in one pass; 1 in a batch job)",
    )
    gen.add_argument("--cuda-graphs", action="store_true",
                     help="replay each scale as a CUDA graph: faster for many batches of one shape (the first "
                     "two batches of a shape warm up and capture)")
    gen.add_argument("--random-weights", action="store_true",
                     help="random weights for every part, no files needed (for benchmarks: the images are noise)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    models = sub.add_parser("models", help="list the model configs and the files each needs")
    models.set_defaults(func=cmd_models)

    presets = sub.add_parser("presets", help="list the attention presets")
    presets.set_defaults(func=cmd_presets)

    plan = sub.add_parser("plan", help="what an attention preset does to a model, per layer and scale (no weights)")
    plan.add_argument("--model", default="infinity-demo")
    plan.add_argument("--attention", default="default", help="attention preset (see `sparvar presets`)")
    _add_schedule_options(plan)
    plan.add_argument("--json", action="store_true", help="the whole plan as JSON")
    plan.set_defaults(func=cmd_plan)

    for name, text in (
        ("eval", "image and attention fidelity of presets against dense, same seeds (JSON + markdown)"),
        ("analyze", "attention sinks, cross-scale similarity, locality, block tables (JSON + pictures)"),
        ("train-demo", "train the demo model (Fashion-MNIST, tokenizer + transformer)"),
        ("calibrate-skip", "thresholds of the adaptive skip rule on a model's own samples (JSON + markdown)"),
        ("serve", "a local web page to generate and compare dense with a preset (Gradio: pip install -e .[ui])"),
    ):
        sub.add_parser(name, help=text + "; see its --help")  # main() hands its options to its own parser

    bench = sub.add_parser("bench", help="GPU benchmarks written under benchmarks/ (see --help of each)")
    bench.add_argument("what", choices=["baseline", "e2e", "kernels", "profile", "multigpu"],
                       help="baseline: dense generation time of 2B and 8B; e2e: all modes side by side; "
                       "kernels: attention kernels on the 1024x1024 shapes; profile: GPU time by kernel kind; "
                       "multigpu: images/s of a torchrun batch job on 1 and 2 GPUs")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and argv[0] in _PASS_THROUGH:  # their own parsers take every option, --help included
        args = argparse.Namespace(func=_PASS_THROUGH[argv[0]], rest=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        args.func(args)
    except SparvarError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

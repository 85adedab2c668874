"""A local web page (Gradio) to generate images and compare dense attention with a preset.

`sparvar serve` generates each image twice from the same seed, with dense attention and with a
chosen preset, and shows both, their difference map, the time of each, the attention density
and the PSNR against dense.

Gradio is an optional extra (`pip install -e ".[ui]"`); it is imported only when serving.
"""

from __future__ import annotations

import argparse
import socket
from typing import Callable

from sparvar.errors import SparvarError
from sparvar.generation import GenerationConfig
from sparvar.options import ArgumentParser
from sparvar.sparsity import Combination, combination

# small images (the demo's 128x128 or 256x256) fill their box, enlarged with sharp pixels
CSS = ".pixels img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


def _config(pipe, condition, seed: int, cfg: float, aspect: str, combo: Combination) -> GenerationConfig:
    """The settings of one image of `condition` with an attention combination, checked (validate)."""
    config = GenerationConfig(seed=seed, cfg=cfg, aspect=aspect, attention=combo.attention, **combo.options())
    return pipe.validate([condition], config)


def compare(pipe, condition, seed: int, cfg: float, aspect: str, preset: str,
            progress: Callable[[float, str], None] = lambda done, what: None, last_dense: dict | None = None):
    """Dense and `preset` from the same seed -> (dense image, preset image, difference map,
    markdown table of time, attention density and PSNR; the density is of a full dense
    generation, so skipped scales count 0). `progress(share done, what)` is called after every
    scale. Bad input raises SparvarError before any scale runs. `last_dense`, a dict kept between
    calls, holds the last dense result, so that trying another preset on the same image runs only
    that preset."""
    from sparvar.eval.draw import difference_map
    from sparvar.eval.flops import attention_share
    from sparvar.eval.metrics import psnr, to_tensor

    key = (condition, seed, cfg, aspect)
    cached = (last_dense or {}).get(key)
    # both checked before either runs, so bad input costs nothing
    plans = [combination(preset)] + ([] if cached else [Combination()])
    configs = [_config(pipe, condition, seed, cfg, aspect, c) for c in plans]
    scales = [len(c.schedule) - c.skip_last for c in configs]  # adaptive skip may stop earlier
    results = []  # (image, seconds, attention density) of the preset, then of dense
    for i, config in enumerate(configs):
        def on_scale(k, logits, tokens):  # called during this iteration's run only
            what = f"{preset if i == 0 else 'dense'}: scale {k + 1} of {scales[i]}"
            progress((sum(scales[:i]) + k + 1) / sum(scales), what)

        out = pipe.generate([condition], config, progress=False, on_scale=on_scale)
        results.append((out.images[0], out.stage_seconds["total"], attention_share(out, pipe.spec.transformer.depth)))
    other, dense = results[0], cached or results[1]
    if last_dense is not None:
        last_dense.clear()
        last_dense[key] = dense
    db = float(psnr(to_tensor([other[0]]), to_tensor([dense[0]]))[0])
    rows = [f"| {name} | {seconds:.2f} s | {density:.1%} | {psnr_text} |"
            for name, (_, seconds, density), psnr_text in (("dense", dense, "-"), (preset, other, f"{db:.2f} dB"))]
    table = "\n".join(["| attention | time | attention density (of a full dense generation) | PSNR against dense |",
                       "|---|---|---|---|", *rows])
    return dense[0], other[0], difference_map(dense[0], other[0]), table


def _aspects(spec) -> list[str]:
    """The aspect ratios the model generates at its resolution (VAR, HART and the demo: 1:1 only)."""
    from sparvar.schedules import INFINITY_ASPECTS

    fits = []
    for aspect in INFINITY_ASPECTS:
        try:
            GenerationConfig(aspect=aspect).resolved(spec)
            fits.append(aspect)
        except SparvarError:
            pass
    return fits


def build_app(pipe):
    """The page: condition, seed, cfg, aspect and preset in; dense, preset, difference and a
    table out. Its one endpoint, /generate, takes (condition, seed, cfg, aspect, preset)."""
    import gradio as gr

    from sparvar.sparsity import PRESETS

    spec, last_dense = pipe.spec, {}

    def refuse(message: str):  # a message on the page; the server's log keeps no traceback of it
        return gr.Error(message, print_exception=False)

    def generate(condition, seed, cfg, aspect, preset, progress=gr.Progress()):
        if condition is None or not str(condition).strip():
            raise refuse("give a prompt" if spec.text_conditioned else "pick a class")
        if seed is None or cfg is None:
            raise refuse("give a seed and a cfg")
        condition = str(condition).strip()
        try:
            return compare(pipe, condition, seed, cfg, aspect, preset or "default",
                           lambda done, what: progress(done, desc=what), last_dense)
        except SparvarError as err:
            raise refuse(str(err)) from None

    with gr.Blocks(title="sparvar", analytics_enabled=False) as app:
        gr.Markdown(f"## sparvar: dense attention against SparVAR\n`{spec.name}` on {pipe.device}: {spec.about}. "
                    "Each generation runs twice from the same seed, with dense attention and with the chosen preset.")
        with gr.Row():
            if spec.text_conditioned:
                condition = gr.Textbox(spec.example, label="prompt", placeholder="a prompt", scale=2,
                                       elem_id="condition")
            else:
                indices = [str(i) for i in range(spec.num_classes)]
                condition = gr.Dropdown(indices, value=indices[0], label="class", allow_custom_value=True, scale=2,
                                        info=f"an index 0..{spec.num_classes - 1}", elem_id="condition")
            preset = gr.Dropdown(list(PRESETS), value="default", label="attention against dense",
                                 allow_custom_value=True, scale=2,
                                 info="a preset, or a combination: default+skip2, default+fastvar, dense+adaptive "
                                 "(sparvar presets)")
        with gr.Row():
            # no minimum or maximum: Gradio's own refusal of them writes a traceback to the log; ours is a message
            seed = gr.Number(0, label="seed", precision=0)
            cfg = gr.Number(spec.transformer.cfg, label="cfg (classifier-free guidance)")
            aspect = gr.Dropdown(_aspects(spec), value="1:1", label="aspect (width:height)")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row(elem_id="outputs"):
            images = [gr.Image(label=label, type="pil", format="png", interactive=False, height=256,
                               elem_classes="pixels") for label in ("dense", "preset", "difference |dense - preset| x4")]
        table = gr.Markdown(label="time, density, PSNR", elem_id="table")
        # one generation at a time on the device; the others wait in Gradio's queue
        button.click(generate, [condition, seed, cfg, aspect, preset], [*images, table], api_name="generate",
                     concurrency_limit=1)
    return app


def _gradio():
    try:
        import gradio
    except ImportError:
        raise SparvarError('sparvar serve needs Gradio: pip install -e ".[ui]"') from None
    return gradio


def _port(text: str) -> int:
    """--port: a TCP port, 1..65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number in 1..65535, not {text!r}")
    return int(text)


def _check_address(host: str, port: int) -> None:
    """That the page could listen on host:port, found before the model loads (Gradio finds it after)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server: TIME_WAIT is no obstacle
            probe.bind((host, port))
    except OSError as err:
        reason = err.strerror or str(err)
        raise SparvarError(f"cannot serve on {host}:{port} ({reason}); choose another --port or --host") from None


def main(argv: list[str] | None = None) -> None:
    """Every option, the model's name and the address are checked before the model loads."""
    from sparvar.loading import load_pipeline
    from sparvar.models.registry import get_spec

    parser = ArgumentParser(prog="sparvar serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="infinity-demo", help="model name, see `sparvar models`")
    parser.add_argument("--weights", help="transformer checkpoint (file or sharded folder)")
    parser.add_argument("--vae", help="VAE checkpoint (.pth)")
    parser.add_argument("--text-encoder", help="local folder of the T5 text encoder")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=_port, default=7860, help="port to listen on (default 7860)")
    parser.add_argument("--share", action="store_true", help="also make a public link through Gradio's share servers")
    args = parser.parse_args(argv)

    spec = get_spec(args.model)
    gr = _gradio()
    _check_address(args.host, args.port)
    pipe = load_pipeline(spec, args.weights, args.vae, args.text_encoder, device=args.device)
    app = build_app(pipe)
    # system fonts: the page needs nothing from the internet
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    try:
        _, local, public = app.launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False,
                                      theme=theme, css=CSS, quiet=True, prevent_thread_lock=True)
    except OSError:  # Gradio's message is about its own launch() arguments
        raise SparvarError(f"cannot serve on {args.host}:{args.port} (in use, or not an address of this machine); "
                           "choose another --port or --host") from None
    print(f"{pipe.spec.name} on {pipe.device}: open {local}" + (f" or {public}" if public else "") + " (Ctrl+C stops)")
    app.block_thread()

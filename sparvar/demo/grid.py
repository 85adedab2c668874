"""A picture of what the demo model draws: `python -m sparvar.demo.grid --prompts FILE --out docs/demo_grid.png`.

One row per prompt, one column per seed, dense attention; the README shows it so a reader can
judge the trained model before running anything, and training writes one as its preview.
"""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

from sparvar import files
from sparvar.loading import load_pipeline
from sparvar.options import ArgumentParser, read_conditions

LABEL_WIDTH = 150


def grid(pipe, conditions: list, seeds: list[int], scale: int = 1, schedule=None) -> Image.Image:
    """Rows of samples per condition (its text at the left), each image enlarged `scale` times."""
    rows = [
        pipe([c] * len(seeds), seed=seeds, attention="dense", schedule=schedule, progress=False).images
        for c in conditions
    ]
    w, h = rows[0][0].width * scale, rows[0][0].height * scale
    picture = Image.new("RGB", (LABEL_WIDTH + w * len(seeds), h * len(rows)), "white")
    draw, font = ImageDraw.Draw(picture), ImageFont.load_default()
    for r, (condition, images) in enumerate(zip(conditions, rows)):
        lines = textwrap.wrap(str(condition), 22)[: max(1, h // 12)]
        draw.multiline_text((4, r * h + max(0, h - 12 * len(lines)) // 2), "\n".join(lines), fill="black", font=font)
        for c, image in enumerate(images):
            picture.paste(image.resize((w, h), Image.NEAREST), (LABEL_WIDTH + c * w, r * h))
    return picture


def main(argv=None) -> None:
    p = ArgumentParser(prog="python -m sparvar.demo.grid", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="infinity-demo")
    p.add_argument("--out", default="docs/demo_grid.png")
    p.add_argument("--prompts", required=True, help="file with one prompt a line")
    p.add_argument("--seeds", type=int, default=8, help="images per row (seeds 0..N-1)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    prompts = read_conditions(args.prompts)
    pipe = load_pipeline(args.model, device=args.device)
    picture = grid(pipe, prompts, list(range(args.seeds)))
    small = picture.quantize(colors=64)  # a 64-colour palette keeps the README's picture small
    files.whole(args.out, lambda part: small.save(part, format="PNG", optimize=True))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

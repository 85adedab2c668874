"""Pictures of what the demo model draws, dense: `grid` (a row of seeds per prompt: training's
preview) and `sheet` (one image per prompt under section titles: the README's picture,
`python -m sparvar.demo.grid --prompts docs/demo_grid_train.txt --prompts docs/demo_grid_held_out.txt`),
so a reader can judge the trained model before running anything.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sparvar import files
from sparvar.errors import SparvarError, run_module
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


def sheet(pipe, sections: list[tuple[str, list[str]]], seed: int = 0, columns: int = 8, batch: int = 8) -> Image.Image:
    """One image per prompt, `columns` a row with its prompt below it, under each section's title:
    the README's view of what the model draws for training and for held-out prompts."""
    font, title_font = ImageFont.load_default(size=11), ImageFont.load_default(size=18)
    tiles = []  # (section title, its images, its prompts)
    for title, prompts in sections:
        images = [image for i in range(0, len(prompts), batch) for image in
                  pipe(prompts[i:i + batch], seed=seed, attention="dense", progress=False).images]
        tiles.append((title, images, prompts))
    w, h = tiles[0][1][0].size
    caption, heading = 30, 30
    rows = sum(-(-len(images) // columns) for _, images, _ in tiles)
    picture = Image.new("RGB", (w * columns, rows * (h + caption) + heading * len(tiles)), "white")
    draw, y = ImageDraw.Draw(picture), 0
    for title, images, prompts in tiles:
        draw.text((6, y + 5), title, fill="black", font=title_font)
        y += heading
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            x, top = (i % columns) * w, y + (i // columns) * (h + caption)
            picture.paste(image, (x, top))
            text = "\n".join(textwrap.wrap(prompt, w // 6)[:2])
            draw.multiline_text((x + 4, top + h + 2), text, fill="black", font=font, spacing=1)
        y += -(-len(images) // columns) * (h + caption)
    return picture


def main(argv=None) -> None:
    p = ArgumentParser(prog="python -m sparvar.demo.grid", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="infinity-demo")
    p.add_argument("--out", default="docs/demo_grid.png")
    p.add_argument("--prompts", required=True, action="append",
                   help="file with one prompt a line; give it again for another section (its first line "
                        "starting with '#' is the section's title)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--columns", type=int, default=8)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.columns < 1:
        p.error("--columns must be 1 or more")
    sections = [section(path) for path in args.prompts]
    pipe = load_pipeline(args.model, device=args.device)
    picture = sheet(pipe, sections, args.seed, args.columns)
    small = picture.quantize(colors=128)  # a palette keeps the README's picture small
    files.whole(args.out, lambda part: small.save(part, format="PNG", optimize=True))
    print(f"wrote {args.out}")


def section(path: str) -> tuple[str, list[str]]:
    """(title, prompts) of a prompts file: its '# title' line, else its name."""
    lines = read_conditions(path)
    title = lines[0][1:].strip() if lines[0].startswith("#") else Path(path).stem
    prompts = [line for line in lines if not line.startswith("#")]
    if not prompts:
        raise SparvarError(f"prompts file {path} holds a title and no prompts")
    return title, prompts


if __name__ == "__main__":
    run_module(main)

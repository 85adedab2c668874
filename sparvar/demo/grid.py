"""A picture of the demo model's classes: `python -m sparvar.demo.grid --out docs/demo_grid.png`.

One row per class, one column per seed, dense attention; the README shows it so a reader can
judge what the trained model draws before running anything.
"""

from __future__ import annotations

import argparse

from PIL import Image, ImageDraw, ImageFont

from sparvar.pipeline import load_pipeline


def class_grid(pipe, seeds: list[int], scale: int = 1) -> Image.Image:
    """Rows of samples per class (the class name at the left), each image enlarged `scale` times."""
    classes = pipe.spec.classes
    rows = [pipe([name] * len(seeds), seed=seeds, attention="dense", progress=False).images for name in classes]
    w, h = rows[0][0].width * scale, rows[0][0].height * scale
    left = 80
    grid = Image.new("RGB", (left + w * len(seeds), h * len(rows)), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for r, (name, images) in enumerate(zip(classes, rows)):
        draw.text((4, r * h + h // 2 - 6), name, fill="black", font=font)
        for c, image in enumerate(images):
            grid.paste(image.resize((w, h), Image.NEAREST), (left + c * w, r * h))
    return grid


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/demo_grid.png")
    p.add_argument("--seeds", type=int, default=8, help="images per class (seeds 0..N-1)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    pipe = load_pipeline("infinity-demo", device=args.device)
    grid = class_grid(pipe, list(range(args.seeds)))
    grid.quantize(colors=64).save(args.out, optimize=True)  # a 64-colour palette keeps the README's picture small
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

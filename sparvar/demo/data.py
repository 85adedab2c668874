"""The demo model's data set, built offline from two Debian packages: Noto's colour emoji
(`fonts-noto-color-emoji`) and their names in Unicode's emoji-test.txt (`unicode-data`).

Every fully-qualified emoji listed there (3,655 in Unicode 15.0) is drawn from the font's 136x128
colour bitmaps onto white, and its CLDR name is its prompt ("grinning face", "flag: Japan",
"woman health worker: medium skin tone"). Pillow shapes the sequences (flags, skin tones, ZWJ
families) with its raqm layout. A fixed rule on the sequence without skin tones or variation
selectors holds out about one design in 25 for evaluation (194 emoji of 3,655), every variant of it.

`prepare` writes the set as one .npz of palette PNGs (about 10 MB), the form the training command
carries to a machine without the packages; `load` decodes it with Pillow and NumPy alone.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, features

from sparvar import files
from sparvar.errors import SparvarError

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_NAMES = Path("/usr/share/unicode/emoji/emoji-test.txt")
GLYPH_SIZE = 109  # the font's one bitmap strike: glyphs of 136x128 pixels
HELD_OUT_EVERY = 25  # a design is held out when its CRC is a multiple of this
_VARIANT_CODEPOINTS = {0xFE0F, *range(0x1F3FB, 0x1F400)}  # emoji presentation selector, skin tones


@dataclass
class EmojiSet:
    images: np.ndarray  # (N, S, S, 3) uint8 on white, S the padded glyph side (136)
    prompts: list[str]
    held_out: np.ndarray  # (N,) bool
    designs: list[str]  # each emoji's design: its sequence without skin tones (`design`)

    def split(self, held_out: bool) -> "EmojiSet":
        keep = self.held_out == held_out
        pick = lambda items: [item for item, k in zip(items, keep) if k]  # noqa: E731
        return EmojiSet(self.images[keep], pick(self.prompts), self.held_out[keep], pick(self.designs))


def design(codepoints: list[int]) -> str:
    """The sequence without its variant code points (skin tones, U+FE0F), in hex: what an emoji
    shares with its skin-tone variants."""
    return " ".join(f"{c:X}" for c in codepoints if c not in _VARIANT_CODEPOINTS)


def is_held_out(codepoints: list[int]) -> bool:
    """The fixed evaluation rule: a CRC of the design, so every variant of a design is held out with it."""
    return zlib.crc32(design(codepoints).encode()) % HELD_OUT_EVERY == 0


def read_emoji_names(path: Path = EMOJI_NAMES) -> list[tuple[list[int], str]]:
    """(code points, CLDR name) of every fully-qualified emoji in emoji-test.txt, in its order."""
    if not path.is_file():
        raise SparvarError(f"emoji names not found at {path}; install them with `apt-get install unicode-data` "
                           "(Debian/Ubuntu) or give the path of Unicode's emoji-test.txt")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields, _, comment = line.partition("#")
        if fields.split(";")[-1].strip() != "fully-qualified":
            continue
        # comment: "<emoji> E<version> <name>"
        rows.append(([int(c, 16) for c in fields.split(";")[0].split()], comment.strip().split(" ", 2)[2]))
    return rows


def render(font: ImageFont.FreeTypeFont, text: str) -> Image.Image | None:
    """One emoji glyph drawn on white, (136, 128) RGB; None when the font has no single glyph for it."""
    left, top, right, bottom = font.getbbox(text)
    if right - left > 1.5 * (bottom - top):  # shaped into several glyphs: the font lacks this sequence
        return None
    glyph = Image.new("RGBA", (right, bottom), (0, 0, 0, 0))
    ImageDraw.Draw(glyph).text((0, 0), text, font=font, embedded_color=True)
    return Image.alpha_composite(Image.new("RGBA", glyph.size, "white"), glyph).convert("RGB")


def prepare(out: str | Path, font_path: Path = EMOJI_FONT, names_path: Path = EMOJI_NAMES) -> dict:
    """Draw every named emoji and write them with their prompts to one .npz; returns counts."""
    if not font_path.is_file():
        raise SparvarError(f"emoji font not found at {font_path}; install it with "
                           "`apt-get install fonts-noto-color-emoji` (Debian/Ubuntu)")
    if not features.check("raqm"):
        raise SparvarError("Pillow's raqm text layout, needed to draw emoji sequences, is off: its wheels load "
                           "FriBiDi from the system (`apt-get install libfribidi0`)")
    font = ImageFont.truetype(str(font_path), GLYPH_SIZE, layout_engine=ImageFont.Layout.RAQM)
    images, prompts, designs, missing = [], [], [], []
    for codepoints, name in read_emoji_names(names_path):
        image = render(font, "".join(map(chr, codepoints)))
        if image is None:
            missing.append(name)
            continue
        images.append(image)
        prompts.append(name)
        designs.append(codepoints)
    held_out = [is_held_out(c) for c in designs]
    size = write(out, images, prompts, held_out, [design(c) for c in designs])
    return {"emoji": len(prompts), "held_out": sum(held_out), "missing_from_font": missing, "bytes": size}


def write(out: str | Path, images: list[Image.Image], prompts: list[str], held_out: list[bool],
          designs: list[str]) -> int:
    """RGB images with their prompts as one .npz of PNGs (what `load` reads); returns the PNG bytes."""
    blobs = []
    for image in images:
        buffer = io.BytesIO()
        # emoji have few colours: a 256-colour palette held every one checked exactly, at half the size of RGB
        palette = image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        palette.save(buffer, "PNG", optimize=True)
        blobs.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    arrays = dict(png=np.concatenate(blobs), offsets=offsets, prompts=np.array(prompts),
                  held_out=np.array(held_out, dtype=bool), designs=np.array(designs))
    npz = io.BytesIO()  # in memory: given a path, numpy would add ".npz" to the temporary name
    np.savez_compressed(npz, **arrays)
    files.whole(out, lambda part: part.write_bytes(npz.getvalue()))
    return int(offsets[-1])


def load(path: str | Path) -> EmojiSet:
    """The emoji of a `prepare` file, each padded to a white square."""
    path = Path(path)
    if not path.is_file():
        raise SparvarError(f"emoji data not found: {path}; build it with `sparvar train-demo prepare --data {path}` "
                           "(needs `apt-get install fonts-noto-color-emoji unicode-data`)")
    with np.load(path) as f:
        if "designs" not in f:
            raise SparvarError(f"{path} was made by an older `prepare`: make it again with "
                               f"`sparvar train-demo prepare --data {path}`")
        png, offsets, prompts, held_out = f["png"], f["offsets"], [str(p) for p in f["prompts"]], f["held_out"]
        designs = [str(d) for d in f["designs"]]
    images = [np.asarray(Image.open(io.BytesIO(png[a:b].tobytes())).convert("RGB"))
              for a, b in zip(offsets, offsets[1:])]
    side = max(max(i.shape[:2]) for i in images)
    square = np.full((len(images), side, side, 3), 255, dtype=np.uint8)
    for n, image in enumerate(images):
        h, w = image.shape[:2]
        top, left = (side - h) // 2, (side - w) // 2
        square[n, top : top + h, left : left + w] = image
    return EmojiSet(square, prompts, held_out.astype(bool), designs)


def to_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, h, w, 3) -> float (N, 3, size, size) in [-1, 1] (bicubic)."""
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
    return x.clamp(-1, 1)

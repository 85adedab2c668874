"""Pictures drawn with PIL alone (no plotting dependency): comparisons, heat maps, masks."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# dark blue -> teal -> yellow, a viridis-like ramp: readable in grey print and for most colour blindness
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (shape + (3,))."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_RAMP) - 2)
    t = (v - lo)[..., None]
    return (_RAMP[lo] * (1 - t) + _RAMP[lo + 1] * t).round().astype(np.uint8)


def _font():
    return ImageFont.load_default()


def difference_map(a: Image.Image, b: Image.Image, gain: float = 4.0) -> Image.Image:
    """|a - b| averaged over channels, times `gain`, in the colour ramp (black-blue: equal)."""
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean(-1) / 255 * gain
    return Image.fromarray(colormap(d))


def side_by_side(panels: list[tuple[Image.Image, str]], scale: int = 4) -> Image.Image:
    """Images in a row, each enlarged `scale` times (nearest), a caption line under each."""
    font, pad, line = _font(), 6, 14
    w, h = panels[0][0].width * scale, panels[0][0].height * scale
    lines = max(len(caption.split("\n")) for _, caption in panels)
    out = Image.new("RGB", (len(panels) * (w + pad) + pad, h + 2 * pad + lines * line), "white")
    draw = ImageDraw.Draw(out)
    for i, (image, caption) in enumerate(panels):
        x = pad + i * (w + pad)
        out.paste(image.resize((w, h), Image.NEAREST), (x, pad))
        for j, text in enumerate(caption.split("\n")):
            draw.text((x, h + pad + 2 + j * line), text, fill="black", font=font)
    return out


def heatmap(values: np.ndarray, rows: list[str], cols: list[str], title: str, cell: int = 34) -> Image.Image:
    """A (rows x cols) grid of values in [0, 1], coloured, each cell with its value; NaN cells blank."""
    font = _font()
    values = np.asarray(values, dtype=np.float64)
    left, top = 64, 36
    out = Image.new("RGB", (left + cell * len(cols) + 8, top + cell * len(rows) + 8), "white")
    draw = ImageDraw.Draw(out)
    draw.text((4, 4), title, fill="black", font=font)
    colours = colormap(values)
    for j, name in enumerate(cols):
        draw.text((left + j * cell + 3, top - 14), name, fill="black", font=font)
    for i, name in enumerate(rows):
        draw.text((4, top + i * cell + cell // 2 - 6), name, fill="black", font=font)
        for j in range(len(cols)):
            if np.isnan(values[i, j]):
                continue
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 2, top + (i + 1) * cell - 2)
            draw.rectangle(box, fill=tuple(int(c) for c in colours[i, j]))
            ink = "black" if values[i, j] > 0.6 else "white"
            draw.text((box[0] + 3, box[1] + cell // 2 - 7), f"{values[i, j]:.2f}", fill=ink, font=font)
    return out


def mask_picture(mask: torch.Tensor, boundaries: list[int], title: str, max_side: int = 512) -> Image.Image:
    """A (q_len, kv_len) bool mask as a picture: the share kept per cell (pooled to at most
    `max_side` pixels a side), white = kept; red lines where key scales start."""
    q_len, kv_len = mask.shape
    rows, cols = min(q_len, max_side // 2), min(kv_len, max_side)
    pooled = torch.nn.functional.adaptive_avg_pool2d(mask.float()[None, None], (rows, cols))[0, 0].numpy()
    image = Image.fromarray((pooled * 255).round().astype(np.uint8)).convert("RGB")
    out = Image.new("RGB", (cols + 8, rows + 24), "white")
    out.paste(image, (4, 20))
    draw = ImageDraw.Draw(out)
    draw.text((4, 4), title, fill="black", font=_font())
    for b in boundaries:
        x = 4 + round(b * cols / kv_len)
        draw.line([(x, 20), (x, 20 + rows - 1)], fill=(220, 40, 40))
    return out

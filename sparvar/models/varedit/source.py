"""The source picture of an edit, as the official VAREdit script prepares it and shapes its output.

The official `infer.py` pastes the picture at the top-left corner of a white square as wide as its
longer side, resizes that square to the model's pixel size (Lanczos) and encodes it; the edited
square is resized back to the padded square's side (Lanczos) and cropped to the picture's own
width and height.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class EditImages:
    @staticmethod
    def pixels(images: list[Image.Image], side: int) -> torch.Tensor:
        """Pictures -> (N, 3, side, side) in [-1, 1], each padded to a white square and resized."""
        out = []
        for image in images:
            image = image.convert("RGB")
            square = Image.new("RGB", (max(image.size),) * 2, (255, 255, 255))
            square.paste(image, (0, 0))
            square = square.resize((side, side), resample=Image.LANCZOS)
            out.append(torch.from_numpy(np.array(square)).permute(2, 0, 1).float().div(255))
        pixels = torch.stack(out)
        return pixels + pixels - 1

    @staticmethod
    def restore(edited: Image.Image, size: tuple[int, int]) -> Image.Image:
        """An edited square back to the shape of the picture of `size` (width, height)."""
        side = max(size)
        return edited.resize((side, side), resample=Image.LANCZOS).crop((0, 0, *size))

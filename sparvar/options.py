"""What the commands' options share: help that shows every default, the model options, and the
files they read and write, checked before any work so that a mistake costs one line, not a run."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from sparvar.errors import SparvarError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes end in one line (`error: ...`, exit status 2: a SparvarError), not
    in the usage block and the reason under it."""

    def error(self, message: str):
        raise SparvarError(f"{message} (see {self.prog} --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default; an option without one (None, or a switch that is off) says in
    its own text what happens when it is not given."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model and the files it loads from (`sparvar models` lists which file goes where), --device."""
    parser.add_argument("--model", default="infinity-demo", help="model name, see `sparvar models`")
    parser.add_argument("--weights", help="transformer checkpoint, a file or a sharded folder (default: the "
                        "weights shipped with the model, where it has some)")
    parser.add_argument("--vae", help="VAE checkpoint (default: the shipped one, where the model has one)")
    parser.add_argument("--text-encoder", help="local folder of the text model (T5 for Infinity, Qwen2 for HART)")
    parser.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", help="auto: matmuls in the model dtype (bf16 on GPU); fp8: "
                        "the transformer blocks' matmuls in FP8 (Ada/Hopper GPUs; weights quantised as they load)")
    parser.add_argument("--offload", help="text: the text encoder waits in CPU memory between encodings; blocks: "
                        "that, and the transformer blocks stream from CPU memory (for cards too small for the "
                        "weights; slow) (default: everything on the device)")


def device_of(args: argparse.Namespace, spec):
    """The device of add_model_options' --device, once --precision and --offload are values the
    model takes that pay off there. Both pay off on a GPU only (on the CPU, FP8 is emulated, slower
    and with other images, and every weight is in CPU memory already), so the commands refuse them
    there; the library keeps both on the CPU, where tests check their arithmetic."""
    from sparvar.validation import check_offload, check_precision, default_dtype, resolve_device

    device = resolve_device(args.device)
    check_offload(args.offload, spec)
    check_precision(args.precision, device, default_dtype(device))
    if device.type == "cpu" and args.precision == "fp8":
        raise SparvarError("--precision fp8 needs a GPU with FP8 matmuls (Ada or Hopper); on the CPU it would only "
                           "be emulated, slower and with other images")
    if device.type == "cpu" and args.offload:
        raise SparvarError(f"--offload {args.offload} keeps weights in CPU memory for a GPU; on the CPU they are "
                           "there already: leave it out")
    return device


def preset_list(text: str, option: str) -> list[str]:
    """The presets of a comma-separated option (--attention, --presets): at least one, none empty."""
    entries = [entry.strip() for entry in text.split(",")]
    if not any(entries):
        raise SparvarError(f"{option} names no preset; see `sparvar presets`")
    if not all(entries):
        raise SparvarError(f"{option} {text!r} has an empty entry; separate presets with single commas")
    return entries


def read_conditions(path: str | Path) -> list[str]:
    """The non-empty lines of a file of prompts (or class indices), stripped."""
    file = Path(path)
    if not file.is_file():
        raise SparvarError(f"prompts file not found: {file}")
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise SparvarError(f"prompts file {file} is not UTF-8 text") from None
    if not lines:
        raise SparvarError(f"prompts file {file} is empty: give one prompt (or class) a line")
    return lines


def output_folder(path: str | Path, need: int = 1) -> Path:
    """The folder at `path`, created, once a file could be written in it and its filesystem has
    `need` bytes free (by default: is not full), so that a full disk costs one line, not a run."""
    folder = Path(path)
    try:
        for part in (folder, *folder.parents):
            if part.exists() and not part.is_dir():
                raise SparvarError(f"cannot write to {folder}: {part} is a file, not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        free = shutil.disk_usage(folder).free
    except OSError as err:
        raise SparvarError(f"cannot write to {folder}: {err.strerror or err}") from None
    if free < need:
        needed = f", {need / 1e6:.1f} MB needed" if need > 1 else ""
        raise SparvarError(f"cannot write to {folder}: its filesystem is full ({free / 1e6:.1f} MB free{needed})")
    return folder


def per_scale(text: str) -> float | tuple[float, ...]:
    """--cfg / --tau: one number, or one per scale separated by commas (the official cfg_list)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or numbers separated by commas, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def read_picture(path: str | Path):
    """An image file's picture in RGB, read whole now (a bad file fails here, not mid-generation)."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path)
    if not file.is_file():
        raise SparvarError(f"image not found: {file}")
    try:
        with Image.open(file) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise SparvarError(f"cannot read {file} as an image: {err}") from None


def read_image(path: str | Path, size: tuple[int, int]):
    """A picture as (1, 3, H, W) in [-1, 1] at `size` (H, W): resized to cover it, then centre-cropped,
    as the official scripts prepare the image of a variation."""
    import numpy as np
    import torch
    from PIL import Image

    image = read_picture(path)
    h, w = size
    scale = max(h / image.height, w / image.width)
    image = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))), Image.LANCZOS)
    top, left = (image.height - h) // 2, (image.width - w) // 2
    pixels = torch.from_numpy(np.array(image.crop((left, top, left + w, top + h)))).permute(2, 0, 1)[None]
    pixels = pixels.float().div(255)
    return pixels + pixels - 1

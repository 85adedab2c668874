"""What every benchmark and eval writer shares: where a run's numbers come from, the prompt the
GPU benchmarks draw (and the picture they edit, for models that edit one), the first lines of
their markdown and the writer of NAME.json and NAME.md.

A result is a dict whose provenance keys (`provenance`) sit beside its own: which card, when
(ISO 8601, UTC), which torch, Triton and CUDA, which commit of sparvar and which command.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from sparvar import files
from sparvar.options import output_folder

PROMPT = "a photo of a red fox sitting in fresh snow at dawn, highly detailed"
EDIT_PROMPT = "make the fox's fur white and add falling snow"


def edit_picture(side: int = 1024):
    """The picture the benchmarks edit (VAREdit): a square of colour gradients, the same every run."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side] / side
    return Image.fromarray((np.stack([x, y, 1 - x * y], axis=-1) * 255).round().astype(np.uint8))


def generation_inputs(spec) -> tuple[str, dict]:
    """The prompt a benchmark generation of `spec` draws, and what it passes besides (the picture
    to edit, for a model that edits one)."""
    return (EDIT_PROMPT, {"image": edit_picture()}) if spec.family.source_image else (PROMPT, {})
PROVENANCE = ("card", "date", "torch", "triton", "cuda", "commit", "command")


def card(device: str | torch.device | None = None) -> str:
    """The GPU's name, or the CPU's with the threads torch uses; default: the GPU if there is one."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def commit() -> str | None:
    """The git commit of this checkout of sparvar ("+dirty" with uncommitted changes to tracked
    files); None for an install outside its own repository."""
    root = Path(__file__).resolve().parents[2]
    git = ["git", "-C", str(root)]
    try:
        top = subprocess.run(git + ["rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        if Path(top.stdout.strip()).resolve() != root:
            return None
        head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if changed else "")


def command_line(prog: str, argv: list[str] | None) -> str:
    """The command a run records: `prog` and its options (the shell's, where argv is None)."""
    return " ".join([prog, *(sys.argv[1:] if argv is None else argv)])


def provenance(command: str, device: str | torch.device | None = None) -> dict:
    """The record a result starts with (PROVENANCE's keys)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"card": card(device), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda, "commit": commit(),
            "command": command}


def header(title: str, result: dict) -> list[str]:
    """A result's markdown begins: its title, then where its numbers come from."""
    return [f"# {title}", "",
            f"Card: {result['card']}; date: {result['date']}; torch {result['torch']}, triton {result['triton']}, "
            f"CUDA {result['cuda']}; commit {result['commit']}.",
            f"Command: `{result['command']}`", ""]


def write(out_dir: str | Path, name: str, result: dict, markdown: str) -> list[Path]:
    """NAME.json (strict JSON: no NaN) and NAME.md under out_dir, made if missing, each whole or
    not at all (files.py); the markdown is printed too, as the run's report."""
    out = output_folder(out_dir)
    text = json.dumps(result, indent=1, allow_nan=False) + "\n"
    written = [files.write_text(out / f"{name}.json", text), files.write_text(out / f"{name}.md", markdown)]
    print(markdown)
    return written

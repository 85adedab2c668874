"""Reading official checkpoints from local paths and loading them strictly, with readable errors.

Accepted: one .pth/.pt/.bin/.safetensors file, or a folder of shards with an index json
(HF style, .bin or .safetensors shards). A file may wrap its state dict in one container key
({'vae': ...}, {'model': ...}, ...). Nothing is ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from sparvar.errors import SparvarError

_CONTAINER_KEYS = ("vae", "model", "state_dict", "module", "gpt_fsdp", "trainer")


def _read_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):  # old (non-zip) format files cannot be memory-mapped
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap(obj) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = [k for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)]
        if not inner:
            break
        obj = obj[inner[0]]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SparvarError("the file holds no state dict (no tensors found)")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file or sharded folder, on the CPU (memory-mapped where possible)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SparvarError(f"checkpoint not found: {path}")
    try:
        if path.is_dir():
            indexes = sorted(path.glob("*.index.json"))
            if indexes:
                shards = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
                files = [path / s for s in shards]
            else:
                files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
            if not files:
                raise SparvarError(f"{path} is a folder without an index json or weight files")
            missing = [f for f in files if not f.exists()]
            if missing:
                raise SparvarError(f"{path}: shard {missing[0].name} named in the index is missing")
            state = {}
            for f in files:
                state.update(_unwrap(_read_file(f)))
            return state
        return _unwrap(_read_file(path))
    except SparvarError as err:
        raise SparvarError(f"cannot read checkpoint {path}: {err}") from None
    except Exception as err:  # corrupt or foreign files: say which file, not a traceback
        raise SparvarError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None


def layout(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def layout_mismatch(expected: dict[str, tuple], state: dict[str, torch.Tensor]) -> tuple[list, list, list]:
    """(missing keys, unexpected keys, keys with other shapes)."""
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != expected[k])
    return missing, unexpected, wrong


def _listing(keys: list, expected=None, state=None, limit: int = 5) -> str:
    shown = []
    for k in keys[:limit]:
        shown.append(f"{k} {tuple(state[k].shape)} vs {expected[k]}" if expected else k)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str, hint: str = "") -> None:
    """Load `state` into `module` (built on any device, meta included) or say exactly what differs.

    Tensors are assigned, not copied, so a model built on the meta device takes the checkpoint's
    storage; move it afterwards with `.to(device, dtype)`.
    """
    expected = layout(module)
    missing, unexpected, wrong = layout_mismatch(expected, state)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_listing(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_listing(unexpected)})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape ({_listing(wrong, expected, state)})")
        raise SparvarError(f"checkpoint does not fit {what}: " + "; ".join(parts) + (f". {hint}" if hint else ""))
    module.load_state_dict(state, strict=True, assign=True)

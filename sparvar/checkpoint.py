"""Reading official checkpoints from local paths and loading them strictly, with readable errors.

Accepted: one .pth/.pt/.bin/.safetensors file, or a folder of shards with an index json
(HF style, .bin or .safetensors shards). A file may wrap its state dict in one container key
({'vae': ...}, {'model': ...}, ...). Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from sparvar.errors import SparvarError

_CONTAINER_KEYS = ("vae", "model", "state_dict", "module", "gpt_fsdp", "trainer")
_SAMPLES, _MIB = 32, 2**20  # what `fingerprint` reads of each file


# how each kind of checkpoint file begins
_ZIP = b"PK\x03\x04"  # torch.save's archive (PyTorch >= 1.6)
_LEGACY = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # older torch.save: a pickled magic number


def _kind(path: Path) -> str:
    """"zip", "legacy" or "safetensors", from the file's first bytes (not its name)."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY))
    if not head:
        raise SparvarError("the file is empty (0 bytes)")
    if head.startswith(_ZIP):
        return "zip"
    if head.startswith(_LEGACY):
        return "legacy"
    if head[8:9] == b"{":  # safetensors: the header's length, then the header as JSON
        return "safetensors"
    raise SparvarError("not a PyTorch checkpoint: neither torch.save's archive nor a safetensors file")


def _read_file(path: Path) -> dict:
    kind = _kind(path)
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        # weights_only: unpickling may build tensors and containers only, never run code from the file
        return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise SparvarError(f"holds objects other than tensors{what}: refused for safety") from None
    except Exception:  # torch's and safetensors' readers raise many kinds for a damaged file
        name = {"zip": "torch.save archive", "legacy": "torch.save file (legacy format)"}.get(kind, "safetensors file")
        raise SparvarError(f"a {name} that is cut short or damaged") from None


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
                index = json.loads(indexes[0].read_text())
                if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
                    raise SparvarError(f"its index {indexes[0].name} has no weight_map")
                shards = sorted(set(index["weight_map"].values()))
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
                try:
                    state.update(_unwrap(_read_file(f)))
                except SparvarError as err:
                    raise SparvarError(f"shard {f.name}: {err}") from None
            return state
        return _unwrap(_read_file(path))
    except SparvarError as err:
        raise SparvarError(f"cannot read checkpoint {path}: {err}") from None
    except Exception as err:  # corrupt or foreign files: say which file, not a traceback
        raise SparvarError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None


def fingerprint(path: str | Path) -> str:
    """A quick identity of a checkpoint file or folder: its size and a SHA-256 of 32 evenly spaced
    MiB of each file (hashing all of a 16 GB checkpoint would hold up every job's start). Files
    shorter than 32 MiB are hashed whole; longer ones that differ only between the samples look alike."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SparvarError(f"checkpoint not found: {path}")
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    digest, total = hashlib.sha256(), 0
    for file in files:
        size = file.stat().st_size
        total += size
        digest.update(f"{file.name if path.is_dir() else ''}:{size}:".encode())
        with open(file, "rb") as f:
            for i in range(_SAMPLES):
                f.seek(max(0, size - _MIB) * i // (_SAMPLES - 1))
                digest.update(f.read(_MIB))
    return f"{total} bytes, sampled sha256 {digest.hexdigest()[:16]}"


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
    _check_dtypes(module, state, what)
    module.load_state_dict(state, strict=True, assign=True)


def _check_dtypes(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Integers or booleans where the module takes floats are refused (no weights hold them);
    floats of another precision are converted as they load, with one line on stderr that says so
    (the images differ from those of the checkpoint at the model's own precision)."""
    expected = {k: v.dtype for k, v in module.state_dict().items()}
    floats = [k for k, dtype in expected.items() if dtype.is_floating_point]
    wrong = [k for k in floats if not state[k].is_floating_point()]
    if wrong:
        shown = ", ".join(f"{k} {_name(state[k].dtype)}" for k in wrong[:3])
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise SparvarError(f"checkpoint does not fit {what}: {len(wrong)} tensors hold integers or booleans where "
                           f"it takes floats ({shown}{more})")
    converted = Counter((_name(state[k].dtype), _name(expected[k])) for k in floats if state[k].dtype != expected[k])
    if converted:
        parts = ", ".join(f"{n} {a} tensors to {b}" for (a, b), n in converted.items())
        print(f"note: {what}: converted {parts}", file=sys.stderr)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

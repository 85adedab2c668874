"""Resumable training checkpoints of the demo model, small enough to travel.

Training runs in calls of a few minutes on a lent GPU machine that receives the working tree plus
a few carried paths (64 MiB in all) and returns at most 8 files of 16 MiB. So a checkpoint is a
folder of safetensors shards of at most 15 MiB plus one JSON file of the training state (steps,
step budgets, history) that names its shards. The shards of a save get new names and the state is
replaced last, each file written whole or not at all (files.py), so an interrupted save leaves the
previous checkpoint whole.
The optimiser's moments are not kept (they would double the size); a resumed phase re-warms its
learning rate instead (train.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sparvar import files
from sparvar.errors import SparvarError

SHARD_BYTES = 15 * 2**20
STATE = "state.json"
_PREFIX = "weights-"


def write(folder: str | Path, tensors: dict[str, torch.Tensor], state: dict, tag: str) -> list[Path]:
    """Write the tensors (as they are, on the CPU) in shards named after `tag`, then the state;
    returns the files of this checkpoint."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().to("cpu", copy=True).contiguous()
        size += nbytes
    names = [f"{_PREFIX}{tag}-{i}.safetensors" for i in range(len(shards))]
    for shard, name in zip(shards, names):
        files.whole(folder / name, lambda part, shard=shard: save_file(shard, str(part)))
    files.write_text(folder / STATE, json.dumps(dict(state, shards=names), indent=1))
    for old in folder.glob(f"{_PREFIX}*.safetensors"):  # earlier checkpoints' shards
        if old.name not in names:
            old.unlink()
    return [folder / n for n in names] + [folder / STATE]


def exists(folder: str | Path) -> bool:
    return (Path(folder) / STATE).is_file()


def load(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a checkpoint folder."""
    folder = Path(folder)
    if not exists(folder):
        raise SparvarError(f"no training checkpoint in {folder} (no {STATE})")
    state = json.loads((folder / STATE).read_text())
    tensors: dict[str, torch.Tensor] = {}
    for name in state["shards"]:
        path = folder / name
        if not path.is_file():
            raise SparvarError(f"training checkpoint {folder} is incomplete: {path.name} is missing")
        tensors.update(load_file(str(path)))
    return tensors, state

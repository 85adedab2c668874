"""Batch jobs: many images, resumable, in one process or in several under torchrun.

A job is a list of items (index, condition, seed = --seed + index, file). Items whose file
exists are skipped, so rerunning a job resumes it. The rest are cut into batches of
`batch_size` in item order and batch j goes to process j % world_size: a batch holds the same
items whatever the number of processes, so an image comes out the same with 1 or N GPUs (the
sampled tokens of an item can depend on what else is in its batch, through the last bits of
batched matrix products). Every finished batch appends one JSON line per image to
`manifest.jsonl` beside the images, under an exclusive file lock so processes never mix lines.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sparvar.errors import SparvarError
from sparvar.pipeline import Pipeline, resolve_device
from sparvar.schedules import Schedule
from sparvar.skipping import combination

MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class Item:
    index: int
    condition: str | int
    seed: int
    path: Path


@dataclass(frozen=True)
class Job:
    """The settings every image of a job shares; each manifest line repeats them."""

    model: str
    attention: str
    cfg: float
    tau: float
    top_k: int
    top_p: float
    schedule: Schedule
    cuda_graphs: bool = False
    random_weights: bool = False

    def settings(self) -> dict:
        out = {k: v for k, v in vars(self).items() if k != "schedule"}
        return {**out, "schedule": self.schedule.describe()}

    def generate(self, pipe: Pipeline, batch: list[Item]):
        combo = combination(self.attention)  # a preset, possibly with accelerators ("default+skip2")
        return pipe(
            [item.condition for item in batch], seed=[item.seed for item in batch], cfg=self.cfg, tau=self.tau,
            top_k=self.top_k, top_p=self.top_p, schedule=self.schedule, attention=combo.attention,
            cuda_graphs=self.cuda_graphs, progress=False, **combo.options(),
        )


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def join(device: str) -> torch.device:
    """Join torchrun's process group (NCCL on GPU, gloo on CPU); each process takes cuda:LOCAL_RANK."""
    if resolve_device(device).type != "cuda":
        dist.init_process_group("gloo")
        return torch.device("cpu")
    local, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if local >= count:
        raise SparvarError(f"process {local} of this node needs cuda:{local} but there are {count} GPUs; "
                           f"start at most --nproc-per-node {count}")
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    return device


def pending(items: list[Item], folder: Path) -> list[Item]:
    """Items whose image is missing. The manifest keeps one line per existing image: lines of
    deleted images (to be made again) and repeated lines go, so a rerun adds no duplicates."""
    manifest = folder / MANIFEST
    if manifest.exists():
        lines = manifest.read_text().splitlines()
        kept: dict[str, str] = {}
        for line in lines:
            try:
                name = json.loads(line)["file"]
            except (ValueError, KeyError, TypeError):  # a line cut short when a job was killed
                continue
            if (folder / name).exists():
                kept[name] = line
        if list(kept.values()) != lines:
            part = manifest.with_name(MANIFEST + ".part")
            part.write_text("".join(line + "\n" for line in kept.values()))
            os.replace(part, manifest)
    return [item for item in items if not item.path.exists()]


def append_lines(path: Path, lines: list[str]) -> None:
    """Append whole lines under an exclusive lock: processes never interleave their writes."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, "".join(line + "\n" for line in lines).encode())
    finally:
        os.close(fd)  # releases the lock


def save_png(image, path: Path) -> None:
    """Written under another name, then renamed: an existing file is always a whole image."""
    part = path.with_name(path.name + ".part")
    image.save(part, format="PNG")
    os.replace(part, path)


def run(job: Job, items: list[Item], load: Callable[[torch.device], Pipeline], batch_size: int,
        device: str = "auto", progress: bool = True) -> None:
    """Generate the items' missing images, sharded over torchrun's processes (or in this one)."""
    folder = items[0].path.parent
    distributed = under_torchrun()
    device = join(device) if distributed else resolve_device(device)
    try:
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        todo = [pending(items, folder) if rank == 0 else None]
        if distributed:
            dist.broadcast_object_list(todo, src=0)
        todo = todo[0]
        if not todo:
            if rank == 0:
                print(f"nothing to do: all {len(items)} images are in {folder}")
            return
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        mine = batches[rank::world]
        if rank == 0:
            skipped = f" ({len(items) - len(todo)} already there)" if len(todo) < len(items) else ""
            print(f"{job.model}, {job.attention}: images to make {len(todo)}{skipped}, batches {len(batches)} "
                  f"of up to {batch_size}, processes {world}", flush=True)
        pipe = load(device) if mine else None
        if pipe is not None and not pipe.spec.text_conditioned:
            pipe.encode([item.condition for item in todo])  # a bad class fails now, not hours later
        if distributed:
            dist.barrier()  # every process starts generating together
        _generate(job, pipe, mine, folder / MANIFEST, rank, progress)
        if distributed:
            dist.barrier()
        if rank == 0:
            print(f"images written to {folder}: {len(todo)}, one line each in {folder / MANIFEST}")
    finally:
        if distributed:
            dist.destroy_process_group()


def _generate(job: Job, pipe: Pipeline | None, batches: list[list[Item]], manifest: Path, rank: int,
              progress: bool) -> None:
    """This process's batches; a thread writes the PNGs and manifest lines of one batch while
    the next one generates."""
    bar = tqdm(total=sum(map(len, batches)), desc=f"rank {rank}", unit="image", position=rank,
               disable=not progress)
    settings = job.settings()

    def finish(batch: list[Item], images, seconds: float) -> None:
        for item, image in zip(batch, images):
            save_png(image, item.path)
        done = round(time.time(), 3)
        append_lines(manifest, [json.dumps({
            "item": item.index, "condition": item.condition, "seed": item.seed, "file": item.path.name,
            "rank": rank, "seconds": round(seconds / len(batch), 4), "finished": done, "settings": settings,
        }) for item in batch])
        bar.update(len(batch))

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as writer:
        saving: Future | None = None
        for batch in batches:
            began = time.perf_counter()
            images = job.generate(pipe, batch).images
            seconds = time.perf_counter() - began
            if saving is not None:
                saving.result()  # at most one batch of images waits in memory; errors surface here
            saving = writer.submit(finish, batch, images, seconds)
        if saving is not None:
            saving.result()
    bar.close()
    count = sum(map(len, batches))
    print(f"rank {rank}: images {count} in {time.perf_counter() - start:.1f} s", flush=True)

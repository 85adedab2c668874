"""Batch jobs: many images, resumable, in one process or in several under torchrun.

A job is a list of items (index, condition, seed = --seed + index, file) and the settings every
image shares, recorded in `job.json` beside the images before the first one is made: a rerun
into the same folder must repeat them (or pass --overwrite), so a folder never mixes settings.

Every batch writes its images, each under another name and renamed (files.py), then appends one
JSON line per image to `manifest.jsonl` (under an exclusive file lock, so processes never mix
lines). An item is done when its line is there and its file is a whole PNG; anything else is made
again, so a process killed or a disk full at any point leaves no line without its image, and a
rerun resumes the job. Ctrl+C and SIGTERM end a job between two writes, in one line.

One job writes into a folder at a time: it holds an exclusive lock on `job.lock` there for its
whole run (under torchrun, rank 0 does), and a second one refuses at once, naming the first's pid.

The missing items are cut into batches of `batch_size` in item order and batch j goes to process
j % world_size: a batch holds the same items whatever the number of processes, so an image comes
out the same with 1 or N GPUs (the sampled tokens of an item can depend on what else is in its
batch, through the last bits of batched matrix products).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sparvar import files
from sparvar.checkpoint import fingerprint
from sparvar.errors import SparvarError, Stopped
from sparvar.generation import GenerationConfig
from sparvar.models.registry import ModelSpec
from sparvar.pipeline import Pipeline
from sparvar.validation import resolve_device

MANIFEST = "manifest.jsonl"
SETTINGS = "job.json"
LOCK = "job.lock"  # held by the job running in the folder; it holds that job's pid
_PNG_START = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk that closes every PNG


@dataclass(frozen=True)
class Item:
    index: int
    condition: str | int
    seed: int
    path: Path


@dataclass(frozen=True)
class Job:
    """What every image of a job shares."""

    model: str
    preset: str  # the --attention entry, accelerators included ("default+skip2")
    config: GenerationConfig  # as validation.validate returned it for the job; its seed is the job's seed base
    weights: dict  # part -> identity (weights_identity)

    def settings(self) -> dict:
        """The job's record in OUT/job.json: what a rerun into the same folder must repeat."""
        c = self.config
        settings = {
            "model": self.model, **self.weights, "attention": c.attention, "skip_last": c.skip_last,
            "prune": c.prune, "adaptive_skip": c.adaptive_skip, "cfg": c.cfg, "tau": c.tau,
            "top_k": list(c.top_k) if isinstance(c.top_k, tuple) else c.top_k, "top_p": c.top_p, "seed_base": c.seed,
            "schedule": c.schedule.describe(), "cuda_graphs": c.cuda_graphs,
            "sampler": c.sampler, "negative_prompt": c.negative_prompt, "more_smooth": c.more_smooth,
            **({"system_prompt": c.system_prompt} if c.system_prompt is not None else {}),  # text models that take one
        }
        if c.kv_cache == "fp8":  # moves the images (older jobs recorded no cache; the others keep them)
            settings["kv_cache"] = c.kv_cache
        return settings

    def generate(self, pipe: Pipeline, batch: list[Item]):
        """One batch of the job's items: the loop itself, the job's settings checked already."""
        config = GenerationConfig.build(self.config, seed=[item.seed for item in batch])
        return pipe.generate([item.condition for item in batch], config, progress=False)


def weights_identity(spec: ModelSpec, weights: str | None, vae: str | None, text_encoder: str | None,
                     random_weights: bool) -> dict[str, str]:
    """Each part's weights as load_pipeline picks them: the given or shipped file's fingerprint,
    or random (seed 0) where a part has no file."""
    given = {"weights": weights, "vae": vae, "text_encoder": text_encoder}
    parts = ["weights", "vae"] + (["text_encoder"] if spec.text_conditioned else [])
    out = {}
    for part in parts:
        path = None if random_weights else given[part] or spec.bundled_path("--" + part.replace("_", "-"))
        out[part] = fingerprint(path) if path else "random (seed 0)"
    return out


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


def whole_png(path: Path) -> bool:
    """Whether `path` begins with PNG's signature and ends with its closing chunk (an empty, cut
    short or foreign file does not; the data between is not read, to keep resuming quick)."""
    try:
        with open(path, "rb") as f:
            start = f.read(len(_PNG_START))
            f.seek(max(0, os.fstat(f.fileno()).st_size - len(_PNG_END)))
            end = f.read()
    except OSError:
        return False
    return start == _PNG_START and end == _PNG_END


def prepare(settings: dict, items: list[Item], folder: Path, overwrite: bool) -> list[Item]:
    """Check the folder's record against this job's settings, record them, and return the items
    still to make. With `overwrite` the folder's old job (its images and lines) goes first."""
    record = folder / SETTINGS
    if overwrite:
        _remove_job(folder)
    elif record.exists():
        try:
            before = json.loads(record.read_text())
        except ValueError:
            raise SparvarError(f"{record} is damaged; give --overwrite to make the job's images again") from None
        changed = [f"{k} {before.get(k)!r} there, {settings.get(k)!r} now"
                   for k in dict.fromkeys([*settings, *before]) if before.get(k) != settings.get(k)]
        if changed:
            raise SparvarError(f"{folder} holds a job with other settings ({'; '.join(changed)}): give another "
                               "--out, or --overwrite to make its images again with these")
    elif (folder / MANIFEST).exists():
        raise SparvarError(f"{folder} holds images of a job whose settings were not recorded (no {SETTINGS}): "
                           "give another --out, or --overwrite to make them again")
    files.write_text(record, json.dumps(settings, indent=1) + "\n")
    return pending(items, folder)


def _remove_job(folder: Path) -> None:
    """The images a folder's manifest lists, the manifest and the job's record."""
    manifest = folder / MANIFEST
    if manifest.exists():
        for line in manifest.read_text().splitlines():
            name = _record(line).get("file")
            if isinstance(name, str):
                (folder / Path(name).name).unlink(missing_ok=True)
        manifest.unlink()
    (folder / SETTINGS).unlink(missing_ok=True)


def _record(line: str) -> dict:
    """One manifest line; {} for a line cut short when a job was killed."""
    try:
        record = json.loads(line)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def pending(items: list[Item], folder: Path) -> list[Item]:
    """Items not done: done is a manifest line of this condition and seed for a whole PNG. The
    manifest keeps one line per whole image (lines whose image never came or is damaged go, and
    of repeated lines the last), so a rerun adds no duplicates."""
    manifest = folder / MANIFEST
    lines = manifest.read_text().splitlines() if manifest.exists() else []
    wanted = {item.path.name: item for item in items}
    kept: dict[str, str] = {}
    for line in lines:
        record = _record(line)
        name = record.get("file")
        if not isinstance(name, str) or not whole_png(folder / name):
            continue
        item = wanted.get(name)
        if item is not None and (record.get("condition"), record.get("seed")) != (item.condition, item.seed):
            continue  # a line of an earlier condition at this file name: the image is made again
        kept[name] = line
    if list(kept.values()) != lines:
        files.write_text(manifest, "".join(line + "\n" for line in kept.values()))
    return [item for item in items if item.path.name not in kept]


def lock(folder: Path) -> int:
    """An exclusive lock on the folder's job.lock, with this process's pid in it; it is held
    until the returned descriptor is closed (or the process ends). Taken by another process: refused."""
    path = folder / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise SparvarError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SparvarError(f"another job (pid {_holder(path)}) is writing into {folder}: wait for it to end, "
                           "or give another --out") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as err:
        os.close(fd)
        raise SparvarError(f"cannot write {path}: {err.strerror or err}") from None
    return fd


def _holder(path: Path) -> str:
    """The pid in a lock file, given a moment to be written by the process that just took it."""
    for _ in range(20):
        pid = path.read_text().strip()
        if pid:
            return pid
        time.sleep(0.05)
    return "unknown"


class _Signal(BaseException):
    """Ctrl+C (SIGINT) or SIGTERM during a batch job, raised in the main thread."""

    def __init__(self, number: int):
        super().__init__(number)
        self.number = number


@contextmanager
def _signals_stop_the_job():
    """SIGINT and SIGTERM raise _Signal while the job runs (in the main thread, where Python
    runs signal handlers); the writer thread finishes the write it is in."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(number, frame):
        raise _Signal(number)

    before = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def _stopped(number: int, made: int, rank: int) -> Stopped:
    what = "Ctrl+C" if number == signal.SIGINT else signal.Signals(number).name
    return Stopped(f"stopped by {what}: {_made(made, rank)}; the same command resumes the job", number)


def run(job: Job, items: list[Item], load: Callable[[torch.device], Pipeline], batch_size: int,
        device: str = "auto", overwrite: bool = False, progress: bool = True) -> None:
    """Generate the items' missing images, sharded over torchrun's processes (or in this one)."""
    distributed = under_torchrun()
    device = join(device) if distributed else resolve_device(device)
    try:
        with _signals_stop_the_job():
            _run(job, items, load, batch_size, device, distributed, overwrite, progress)
    except _Signal as signal_:
        raise _stopped(signal_.number, 0, dist.get_rank() if distributed else 0) from None
    finally:
        if distributed:
            dist.destroy_process_group()


def _run(job: Job, items: list[Item], load: Callable[[torch.device], Pipeline], batch_size: int,
         device: torch.device, distributed: bool, overwrite: bool, progress: bool) -> None:
    folder = items[0].path.parent
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    settings = {**job.settings(), "device": device.type}
    plan, held = [None, None], None  # rank 0 locks and checks the folder; its error or its items reach every process
    try:
        if rank == 0:
            try:
                held = lock(folder)
                plan = [None, prepare(settings, items, folder, overwrite)]
            except SparvarError as err:
                plan = [str(err), None]
        if distributed:
            dist.broadcast_object_list(plan, src=0)
        error, todo = plan
        if error:
            raise SparvarError(error)
        if not todo:
            if rank == 0:
                print(f"all {len(items)} images of this job are in {folder} already, made with these settings")
            return
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        mine = batches[rank::world]
        if rank == 0:
            skipped = f" ({len(items) - len(todo)} already there)" if len(todo) < len(items) else ""
            print(f"{job.model}, {job.preset}: images to make {len(todo)}{skipped}, batches {len(batches)} "
                  f"of up to {batch_size}, processes {world}", flush=True)
        pipe = load(device) if mine else None
        if distributed:
            dist.barrier()  # every process starts generating together
        _generate(job, pipe, mine, folder / MANIFEST, rank, progress)
        if distributed:
            dist.barrier()
        if rank == 0:
            print(f"images written to {folder}: {len(todo)}, one line each in {folder / MANIFEST}")
    finally:
        if held is not None:
            os.close(held)  # the lock goes with it


def _generate(job: Job, pipe: Pipeline | None, batches: list[list[Item]], manifest: Path, rank: int,
              progress: bool) -> None:
    """This process's batches; a thread writes the PNGs and lines of one batch while the next
    one generates. A failed write ends the job in one line that says how far it got."""
    bar = tqdm(total=sum(map(len, batches)), desc=f"rank {rank}", unit="image", position=rank,
               disable=not progress)
    made = 0  # images written and recorded by this process

    def finish(batch: list[Item], images, seconds: float) -> None:
        nonlocal made
        for item, image in zip(batch, images):
            files.save_image(image, item.path)
        done = round(time.time(), 3)
        files.append_lines(manifest, [json.dumps({
            "item": item.index, "condition": item.condition, "seed": item.seed, "file": item.path.name,
            "rank": rank, "seconds": round(seconds / len(batch), 4), "finished": done,
        }) for item in batch])  # the images first: a kill before the lines leaves images that are made again
        made += len(batch)
        bar.update(len(batch))

    start = time.perf_counter()
    try:
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
    except SparvarError as err:
        raise SparvarError(f"{err} ({_made(made, rank)}; the same command resumes the job)") from None
    except _Signal as signal_:  # the executor has let the write under way finish
        raise _stopped(signal_.number, made, rank) from None
    finally:
        bar.close()
    count, elapsed = sum(map(len, batches)), time.perf_counter() - start
    print(f"rank {rank}: {count} images in {elapsed:.1f} s ({elapsed / max(count, 1):.2f} s per image, "
          "generation and writing)", flush=True)


def _made(count: int, rank: int) -> str:
    """How many images this process wrote, for the line that ends a job early."""
    return f"{count} image{'' if count == 1 else 's'} made{f' by rank {rank}' if under_torchrun() else ''}"

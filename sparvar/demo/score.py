"""Does the demo model draw what its prompts name? `sparvar train-demo score` (issue 22).

A fixed sample of training prompts (seed i for the i-th) is generated with dense attention; each
image is compared by pixel MSE at 64x64 with every training emoji, and counts as recognised when
the nearest one is the prompt's own emoji or one of its skin-tone variants (the same design, as
the held-out split defines it). The share recognised is `train_prompt_retrieval_top1`. Nothing
here was tuned on the model: retrieval against all 3,461 training emoji is a plain, strict test
(faces of one shape but another expression count as misses).
"""

from __future__ import annotations

import numpy as np
import torch

from sparvar.demo.data import EmojiSet, to_pixels

SIDE = 64  # pixels of the comparison


def _small(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, h, w, 3) -> (N, 3 * SIDE * SIDE) float, the space nearest neighbours are taken in."""
    return torch.cat([to_pixels(torch.from_numpy(c), SIDE).flatten(1) for c in np.array_split(images, 1 + len(images) // 256)])


def nearest(images: np.ndarray, references: torch.Tensor) -> np.ndarray:
    """Index of the reference (N, 3 * SIDE * SIDE) nearest each uint8 image by pixel MSE."""
    return torch.cdist(_small(images).double(), references.double()).argmin(1).numpy()


def sample(count: int, samples: int, seed: int = 0) -> np.ndarray:
    """The fixed sample of `samples` prompt indices out of `count` (all of them when fewer)."""
    if samples >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, samples, replace=False))


def retrieval_top1(pipe, train: EmojiSet, samples: int = 500, batch: int = 16, schedule=None,
                   progress=print) -> dict:
    """Generate the sampled training prompts and score them (see the module's docstring)."""
    references = _small(train.images)
    picked = sample(len(train.prompts), samples)
    hits, misses = 0, []
    for start in range(0, len(picked), batch):
        idx = picked[start : start + batch]
        out = pipe([train.prompts[i] for i in idx], seed=[int(i) for i in idx], attention="dense",
                   schedule=schedule, progress=False)
        found = nearest(np.stack([np.asarray(image.convert("RGB")) for image in out.images]), references)
        for i, j in zip(idx, found):
            if train.designs[j] == train.designs[i]:
                hits += 1
            else:
                misses.append((train.prompts[i], train.prompts[j]))
        progress(f"{start + len(idx)}/{len(picked)}: {hits} recognised")
    return {"train_prompt_retrieval_top1": hits / len(picked), "samples": len(picked),
            "misses_shown": [f"{a} -> {b}" for a, b in misses[:20]]}

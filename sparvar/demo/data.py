"""The demo model's data set, built offline from installed package files: Fashion-MNIST.

Debian's `dataset-fashion-mnist` installs the four IDX files (gzip) under
/usr/share/datasets/fashion-mnist: 60,000 training and 10,000 test images, 28x28 grey, in 10
classes. Fashion-MNIST was chosen over the emoji and photo packages because its classes are few,
balanced and recognisable at a glance, which a small model learns in minutes.

`load_images` also reads an .npz written by `export_npz` (both splits), the compact form the
training command takes to a machine without the package.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparvar.errors import SparvarError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)
_FILES = {"train": "train-{}-idx{}-ubyte.gz", "test": "t10k-{}-idx{}-ubyte.gz"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format: magic, dims as big-endian uint32, then uint8 data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise SparvarError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def load_fashion_mnist(root: str | Path = FASHION_MNIST_DIR, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of one split, from the IDX files in `root`."""
    root = Path(root)
    images, labels = (root / _FILES[split].format(kind, n) for kind, n in (("images", 3), ("labels", 1)))
    if not images.is_file() or not labels.is_file():
        raise SparvarError(
            f"Fashion-MNIST not found in {root} (no {images.name}); install it with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or give the folder holding the IDX files"
        )
    x, y = read_idx(images), read_idx(labels).astype(np.int64)
    if len(x) != len(y):
        raise SparvarError(f"{root}: {len(x)} images but {len(y)} labels in the {split} split")
    return x, y


def export_npz(path: str | Path, root: str | Path = FASHION_MNIST_DIR) -> None:
    """Both splits of Fashion-MNIST in one compressed .npz (about 30 MB) for `load_images`."""
    arrays = {}
    for split in _FILES:
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = load_fashion_mnist(root, split)
    np.savez_compressed(path, **arrays)


def load_images(source: str | Path = FASHION_MNIST_DIR, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a split, from an .npz (export_npz) or a Fashion-MNIST folder."""
    source = Path(source)
    if source.suffix == ".npz":
        if not source.is_file():
            raise SparvarError(f"data file not found: {source}")
        with np.load(source) as f:
            return f[f"{split}_images"], f[f"{split}_labels"].astype(np.int64)
    return load_fashion_mnist(source, split)


def to_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, h, w) grey or (N, h, w, 3) colour -> float (N, 3, size, size) in [-1, 1] (bilinear)."""
    x = images.float() / 127.5 - 1
    x = x[:, None].expand(-1, 3, -1, -1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x.clamp(-1, 1)

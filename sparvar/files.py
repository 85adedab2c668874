"""Writing files whole or not at all.

Every file sparvar writes (images, comparisons, job records, manifests, eval, analyze and bench
results) goes to a temporary name beside it and is renamed into place: a full disk, a quota or a
killed process never leaves a cut-short file under the real name. A failed write removes its
temporary file and ends in one line that says which file and why.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Callable

from sparvar.errors import SparvarError

def _part(path: Path) -> Path:
    """Where `whole` writes `path` before renaming it: NAME.part beside it."""
    return path.with_name(path.name + ".part")


def check_name(path: Path) -> None:
    """Refuse a file name (with its temporary suffix) longer than the folder's filesystem takes,
    before any work; the folder exists."""
    limit = os.pathconf(path.parent, "PC_NAME_MAX")
    if len(os.fsencode(_part(path).name)) > limit:
        raise SparvarError(f"cannot write {path}: its name is longer than the {limit} bytes a file name may have "
                           "there (with the .part suffix of the write)")


def whole(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(temporary path)`, then the temporary file renamed to `path`; on an error nothing
    stays behind and the error is one line."""
    path = Path(path)
    part = _part(path)
    try:
        write(part)
        os.replace(part, path)
    except BaseException as err:
        with contextlib.suppress(OSError):  # the write's own error says more
            part.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise SparvarError(f"cannot write {path}: {err.strerror or err}") from None
        raise
    return path


def save_image(image, path: str | Path) -> Path:
    """A PIL image as PNG at `path`."""
    return whole(path, lambda part: image.save(part, format="PNG"))


def write_text(path: str | Path, text: str) -> Path:
    return whole(path, lambda part: part.write_text(text, encoding="utf-8"))


def append_lines(path: str | Path, lines: list[str]) -> None:
    """Append whole lines under an exclusive lock, all or none: processes never interleave their
    lines, and a failed write is cut off again, so the file never ends in half a line."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as err:
        raise SparvarError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        try:
            data = "".join(line + "\n" for line in lines).encode()
            while data:
                data = data[os.write(fd, data):]
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise SparvarError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        os.close(fd)  # releases the lock

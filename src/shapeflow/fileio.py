"""Atomic file writes: a killed process never leaves a partial file under the final name.

Every writer goes to a temporary file in the destination directory, flushes and fsyncs it, then
``os.replace``s it onto the final path (atomic on POSIX and Windows within one filesystem).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on clean exit move it onto ``path``.

    The temporary keeps ``path``'s suffix (or ``suffix``) so libraries that pick a format by
    extension (trimesh, PIL) still work. On an exception the temporary is removed and ``path`` is
    left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix if suffix is None else suffix,
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the final file the usual mode
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_npz(path: str | os.PathLike, compressed: bool = False, **arrays: np.ndarray) -> None:
    """Atomically write arrays to an ``.npz`` file (uncompressed by default: it loads fastest)."""
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    write_bytes(path, buf.getvalue())


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a log-like file (e.g. ``manifest.jsonl``) with a single ``write`` call.

    A single ``write`` of a short line to a file opened in append mode is not interleaved with
    other writers on POSIX, so several processes can share one manifest.
    """
    if "\n" in line:
        raise ValueError("append_line writes exactly one line")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())

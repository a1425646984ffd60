"""Shared by the benchmark scripts: rewrite one marked section of BENCHMARKS.md in place."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, key: str, text: str) -> None:
    """Replace (or append) the block between ``<!-- key:start -->`` and ``<!-- key:end -->``."""
    from shapeflow import fileio

    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n\n"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end) + 1:]
    else:
        new = old.rstrip("\n") + "\n\n" + block
    fileio.write_text(path, new)

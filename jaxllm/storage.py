"""Where files go: the one module that knows what a path is. Today local paths only; every writer that must
leave its destination whole or absent goes through here (a staging directory renamed into place, a file
written beside its target and replaced in one step)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def staging_dir(dst: str | os.PathLike) -> Path:
    """A new empty directory beside `dst` (same filesystem), to be renamed onto `dst` once complete."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` through a file beside it: a reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_lines_atomic(path: str | os.PathLike, lines) -> int:
    """Write an iterable of text lines (newline added) to `path` as `write_atomic` does; the count written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
                count += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count

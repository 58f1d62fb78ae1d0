"""Stamps of the input files a batch job read (size, modification time, sha256), so that a resumed
`generate`, `eval` or `pairs` run notices an image or video edited in place under the same path.

A resume compares stats first: the same size and mtime_ns means unchanged, without reading the file
(a job of 100k images resumes in seconds). Other stats (a file edited, or a folder copied without
keeping times, or a file touched) are settled by the sha256, so a copied folder keeps its answers
while an edit is still caught. What stats cannot see is an edit that keeps both the size and the
mtime (a clock set back with `touch -d`, or a rewrite within one tick of a coarse filesystem clock).
A folder (a video given as frames) gets one stamp of constant size: digests of its visible files'
names and stats, and of their names and contents. Take a stamp before the files are read: an edit
after it then shows on resume.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


@functools.lru_cache(maxsize=4096)
def _hash(path: str, size: int, mtime_ns: int) -> str:
    """Keyed by the stats too: a file that many requests share (a video asked about often) is read once."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256(path: Path, st: os.stat_result) -> str:
    return _hash(str(path), st.st_size, st.st_mtime_ns)


def _digest(lines: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def _frames(folder: Path) -> list[tuple[Path, os.stat_result]]:
    return [(p, p.stat()) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]


def _stats(path: Path) -> dict[str, Any]:
    """What stats tell without reading: a file's size and mtime, a digest of a folder's names, sizes and mtimes."""
    if path.is_dir():
        return {"stats": _digest(f"{p.name}\t{st.st_size}\t{st.st_mtime_ns}" for p, st in _frames(path))}
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _content(path: Path) -> str:
    if path.is_dir():
        return _digest(f"{p.name}\t{_sha256(p, st)}" for p, st in _frames(path))
    return _sha256(path, path.stat())


def stamp(path: str | os.PathLike) -> dict[str, Any] | None:
    """{"size", "mtime_ns", "sha256"} of a file, {"stats", "sha256"} of a folder; None when it cannot
    be read (the job reports that file itself)."""
    path = Path(path)
    try:  # stats before contents: an edit in between leaves older stats, so a resume reads the file again
        return {**_stats(path), "sha256": _content(path)}
    except OSError:
        return None


def stamps(paths: Sequence[str | os.PathLike]) -> list[dict[str, Any] | None]:
    return [stamp(path) for path in paths]


def _same(path: Path, recorded: Any) -> bool:
    if not isinstance(recorded, dict):  # None: the file could not be read then
        return False
    try:
        stats = _stats(path)
        return {k: recorded.get(k) for k in stats} == stats or _content(path) == recorded.get("sha256")
    except OSError:
        return False


def unchanged(paths: Sequence[str | os.PathLike], recorded: Any) -> bool:
    """Whether the files at `paths` still hold what `recorded` (their `stamps`, taken by an earlier run)
    saw. True when nothing was recorded: a line written before stamps were kept is not compared."""
    if recorded is None:
        return True
    return (isinstance(recorded, list) and len(recorded) == len(paths)
            and all(_same(Path(p), r) for p, r in zip(paths, recorded)))

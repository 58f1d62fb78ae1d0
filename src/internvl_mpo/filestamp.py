"""Stamps of the input files a batch job read (size, modification time, sha256), so that a resumed
`generate`, `eval` or `pairs` run notices an image or video edited in place under the same path.

A resume compares stats first: the same size and mtime_ns means unchanged, without reading the file
(a job of 100k images resumes in seconds); another size means changed. The same size with another
mtime (a folder copied without keeping times, a file touched) is settled by the sha256, so a copied
folder keeps its answers while an edit is still caught. What stats cannot see is an edit that keeps
both the size and the mtime (a clock set back with `touch -d`, or a rewrite within one tick of a
coarse filesystem clock). Take a stamp before the file is read: an edit after it then shows on resume.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_files(folder: Path) -> dict[str, Path]:
    """A folder's visible files by name (a video given as a folder of frames)."""
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def stamp(path: str | os.PathLike) -> dict[str, Any] | None:
    """{"size", "mtime_ns", "sha256"} of a file, {"files": {name: stamp}} of a folder, None when it
    cannot be read (the job reports that file itself)."""
    path = Path(path)
    try:
        if path.is_dir():
            return {"files": {name: stamp(p) for name, p in _folder_files(path).items()}}
        st = path.stat()  # before hashing: an edit in between leaves an older mtime, so a resume hashes again
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(path)}
    except OSError:
        return None


def stamps(paths: Sequence[str | os.PathLike]) -> list[dict[str, Any] | None]:
    return [stamp(path) for path in paths]


def _same(path: Path, recorded: Any) -> bool:
    try:
        if not isinstance(recorded, dict):  # None: the file could not be read then
            return False
        if "files" in recorded:
            files = _folder_files(path) if path.is_dir() else {}
            return (isinstance(recorded["files"], dict) and files.keys() == recorded["files"].keys()
                    and all(_same(files[name], recorded["files"][name]) for name in files))
        st = path.stat()
        if st.st_size != recorded.get("size") or path.is_dir():
            return False
        return st.st_mtime_ns == recorded.get("mtime_ns") or _sha256(path) == recorded.get("sha256")
    except OSError:
        return False


def unchanged(paths: Sequence[str | os.PathLike], recorded: Any) -> bool:
    """Whether the files at `paths` still hold what `recorded` (their `stamps`, taken by an earlier run)
    saw. True when nothing was recorded: a line written before stamps were kept is not compared."""
    if recorded is None:
        return True
    return (isinstance(recorded, list) and len(recorded) == len(paths)
            and all(_same(Path(p), r) for p, r in zip(paths, recorded)))

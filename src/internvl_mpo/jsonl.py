"""Reading JSONL files of user records, with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError


def read_objects(path: str | Path, what: str = "file") -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each non-blank line; a line that is not a JSON object raises InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object")
        yield where, row

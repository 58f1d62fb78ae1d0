"""Reading JSONL files of user records, with errors that name the file and line."""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError


def read_objects(path: str | Path, what: str = "file") -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each non-blank line; a line that is not UTF-8 or not a JSON object raises
    InputError. Lines end at LF only (CRLF works too): JSON strings may hold U+2028, U+2029 or U+0085
    unescaped, which str.splitlines() would take for line ends. A leading byte order mark (Windows
    editors' "UTF-8 with BOM") is dropped."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give the {what}")
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    for number, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{where}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object")
        yield where, row


def rewrite_in_order(path: Path, ids: list) -> None:
    """Rewrite a JSONL file of {"id", ...} lines (each ending with LF) with one line per id, the last
    one written, in the order of `ids`; lines of other ids follow. For files written as answers finish."""
    lines = {}
    for line in path.read_bytes().split(b"\n")[:-1]:
        lines[json.loads(line)["id"]] = line + b"\n"
    ordered = [lines.pop(rid) for rid in ids if rid in lines] + list(lines.values())
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(b"".join(ordered))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

"""Reading JSONL files of user records, with errors that name the file and line."""

from __future__ import annotations

import codecs
import difflib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import InputError

# other names that input files give the input fields (after `_plain_name`'s other changes): refused as those
FIELD_ALIASES = {"img": "image", "picture": "image", "photo": "image", "prompt": "question", "query": "question",
                 "instruction": "question", "choice": "option"}


def too_many_digits() -> str:
    """What json.loads's plain ValueError means: an integer past Python's limit on the digits read from text."""
    return f"an integer of more than {sys.get_int_max_str_digits()} digits"


def read_json_object(path: Path, error: type[Exception], missing: str, what: str) -> dict:
    """The JSON object in the file `path`; where it is missing (`missing` says so), cannot be read, is not UTF-8
    JSON that Python can read (`json_problem`), or holds another JSON type (not an object of `what`), an
    `error` naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except OSError as e:  # a folder of that name, no permission
        raise error(f"{path}: cannot read it ({e.strerror})") from None
    except (ValueError, RecursionError) as e:
        raise error(f"{path}: {json_problem(e)}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: not a JSON object of {what} (a JSON {type(value).__name__})")
    return value


def json_problem(error: ValueError | RecursionError) -> str:
    """Why json.load(s) could not read a text, for a one-line error: bytes that are not UTF-8, JSON it cannot
    parse, nesting past Python's recursion limit, or an integer past its digit limit."""
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text ({error.reason} at byte {error.start})"
    if isinstance(error, json.JSONDecodeError):  # a line of a JSONL file (named by its caller) is its line 1
        at = f"line {error.lineno} column" if error.lineno > 1 else "column"
        return f"not valid JSON ({error.msg} at {at} {error.colno})"
    if isinstance(error, RecursionError):
        return "its JSON is nested too deeply to read"
    return f"its JSON holds {too_many_digits()}"


def check_input_file(path: str | Path, what: str) -> Path:
    """`path` as a Path, if it names a regular file; a folder, a missing path or another kind of file (a pipe
    such as a shell's `<(...)`, a device) raises InputError naming it as such."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give the {what}")
    if not path.exists():
        raise InputError(f"{path}: {what} not found")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file (a pipe or a device); give the {what} as a file")
    return path


def read_input_bytes(path: Path) -> bytes:
    """The bytes of an input file less a leading byte order mark; one that cannot be read (no permission, an
    I/O error) raises InputError naming it."""
    try:
        return path.read_bytes().removeprefix(codecs.BOM_UTF8)
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e})") from None


def read_objects(path: str | Path, what: str = "file") -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each non-blank line; a line that is not UTF-8 or not a JSON object, or holds an
    unpaired surrogate escape ("\\ud800"), raises InputError. Lines end at LF only (CRLF works too): JSON strings
    may hold U+2028, U+2029 or U+0085 unescaped, which str.splitlines() would take for line ends. A leading byte
    order mark (Windows editors' "UTF-8 with BOM") is dropped."""
    path = check_input_file(path, what)
    data = read_input_bytes(path)
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
        except (ValueError, RecursionError) as e:
            raise InputError(f"{where}: {json_problem(e)}") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object")
        if problem := lone_surrogate(line, row):
            raise InputError(f"{where}: {problem}")
        yield where, row


def lone_surrogate(line: str, value: object) -> str | None:
    """What is wrong, if a string in `value` (keys too), read from the JSON text `line`, holds a lone surrogate
    (U+D800-U+DFFF), which JSON's \\uD800 escape gives without its pair: no Unicode character, it fails later when
    the text is written or encoded (after a model has loaded and answered). None otherwise."""
    if "\\ud" not in line.lower():  # no \\uD800-\\uDFFF escape: nothing to look for
        return None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        char = e.object[e.start]
        return f"a string holds \\u{ord(char):04x} without its surrogate pair, which is no Unicode character"
    return None


def in_order(path: Path, ids: list) -> bytes:
    """A JSONL file of {"id", ...} lines (each ending with LF) with one line per id, the last one written, in the
    order of `ids`; lines of other ids follow. For files written as answers finish."""
    lines = {}
    for line in path.read_bytes().split(b"\n")[:-1]:
        lines[json.loads(line)["id"]] = line + b"\n"
    return b"".join([lines.pop(rid) for rid in ids if rid in lines] + list(lines.values()))


def _plain_name(key: str) -> str:
    """A field name as `unread_field` compares it: lower case, letters and digits only, without a
    trailing s, path, file or url (`Image_Paths`, `image-file`, `images` -> `image`), then its alias if it
    has one (`img` -> `image`, `prompt` -> `question`)."""
    name = "".join(c for c in key.lower() if c.isalnum()).removesuffix("s")
    for suffix in ("path", "file", "url"):
        name = name.removesuffix(suffix)
    name = name.removesuffix("s")
    return FIELD_ALIASES.get(name, name)


def unread_field(row: dict, fields: Sequence[str]) -> str | None:
    """Why `row` is refused, if a field's name looks like one of the input `fields` that the row lacks: a
    misspelling (`imgae`, `Image`: a difflib close match of its lower-case name) or another name for it
    (`image_path`, `img`, `video_file`, `prompt`: the same `_plain_name`). It would be ignored, and the
    question asked without its image or hint. Fields with other names (ids, metadata) are ignored."""
    lacking = [name for name in fields if name not in row]
    for key in row:
        if key in fields:
            continue
        meant = difflib.get_close_matches(key.lower(), lacking, n=1, cutoff=0.75)
        meant = meant or [name for name in lacking if _plain_name(name) == _plain_name(key)]
        if meant:
            return f"field {key!r} is not read; did you mean {meant[0]!r}?"
    return None


def refuse_misspelt_fields(row: dict, fields: Sequence[str], where: str) -> None:
    """Refuse (naming `where`, the file:line) a row with a field that looks like an input field it lacks
    (`unread_field`). An id is not among the `fields`: `idx` and `qid` are fields of their own, and a row
    without an id gets its number."""
    problem = unread_field(row, fields)
    if problem:
        raise InputError(f"{where}: {problem}")

"""Reading MMPR-format preference data (and InternVL SFT conversations), without tokenization.

Mirrors the data side of `internvl_chat/internvl/train/internvl_chat_mpo.py` (`build_datasets`,
`LazySupervisedDataset.__init__`, `get_image_path`, `__getitem__`'s branch choice):

- `meta.json` maps dataset name -> {root, annotation (.jsonl), repeat_time, data_augment, length,
  optional max_dynamic_patch}. Relative paths are taken against the working directory, as the
  official script does (or against `base_dir` when given).
- Per dataset, in meta order with index i: the annotation's lines are read; `repeat_time < 1` keeps
  `random.sample(lines, k=int(len(lines) * repeat_time))` from Python's `random` (the official code
  draws from the global generator seeded by `set_seed(42)`, consumed dataset after dataset:
  `read_datasets(sample_seed=42)` reproduces that, assuming nothing else drew from it first);
  `repeat_time > 1` repeats the list `int(repeat_time)` times — the fractional part is dropped, as
  there; then `numpy.random.default_rng(seed=i).shuffle(lines)`. Datasets are concatenated.
- Image paths: `s3://` paths are prefixed with the root as strings, others joined with
  `os.path.join(root, path)`. An `image` that is a list (even of one path) selects the official
  multi-image branch (tiles split across images), so records keep `multi_image`; a question without
  placeholders gets `Image-k: <image>` lines (`data.py`; the official branch asserts and swaps in another
  record). An empty `image` ("" or []) means text-only; then `video` if non-empty. A `video` that is a
  folder is its frame images, as `load_video` reads one (the official `TCSLoader` reads frames from a
  path that ends in '/', and decodes any other as a video file); one without frame images is refused.

Deliberate differences: the official loader parses lines lazily and silently replaces a record
that fails (bad JSON, missing image) by a random other one. Here every selected line is parsed and
checked up front: by default the first problem raises `InputError` naming `file:line`; with a
`SkipReport` the bad lines are dropped and counted instead. Lines that subsampling leaves out are
never parsed (as in the official code), so a bad line there goes unnoticed. Sampling and
shuffling run over all raw lines before dropping, so the order of the good records is the
official one. Blank (whitespace-only) lines are skipped, counted as lines but not as records or bad
lines (the official reader counts them as records, and its JSON parse of one drawn stops training). An empty
(or all-whitespace) `chosen` or `rejected` answer or SFT `gpt` turn, and a pair whose `chosen` and
`rejected` are the same text, are refused too; the official readers accept them. So are an SFT record
with an image or video but no `human` turn to show it in, a field that looks like a misspelling or another
name of an `image` or `video` the line lacks ("images", "image_path": `jsonl.unread_field`), which the
official reader ignores and trains the record without its image, and a dataset
name (or any key) given twice in meta.json, of which `json.load` keeps the last silently.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import functools
import json
import os
import random
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from internvl_mpo.config import MAX_TILES
from internvl_mpo.errors import InputError
from internvl_mpo.jsonl import json_problem, lone_surrogate, too_many_digits, unread_field
from internvl_mpo.processor.video import frame_files

MAX_REPORTED_MESSAGES = 5
MAX_REPEAT_TIME = 10_000  # copies of a dataset's lines at most (1e300 asked for more records than memory holds)
SFT_ROLES = ("human", "gpt", "system")


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of meta.json. `root` and `annotation` are absolute (or `s3://` for root)."""

    name: str
    root: str
    annotation: str
    repeat_time: float = 1.0
    data_augment: bool = False
    max_dynamic_patch: int | None = None
    length: int | None = None


@dataclass(frozen=True)
class Source:
    """Where a record came from: annotation file and 1-based line number."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class PreferenceRecord:
    question: str
    chosen: str
    rejected: str
    images: tuple[str, ...]  # absolute paths (root-prefixed for s3://); empty for text/video items
    multi_image: bool  # `image` was a list: the official multi-image branch
    video: str | None
    dataset: str
    source: Source


@dataclass(frozen=True)
class SFTRecord:
    conversations: tuple[dict[str, str], ...]  # {"from": "human"|"gpt"|"system", "value": str}
    images: tuple[str, ...]
    multi_image: bool
    video: str | None
    source: Source


@dataclass
class SkipReport:
    """Counts of dropped lines by problem kind, plus the first few messages."""

    counts: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, kind: str, message: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.messages) < MAX_REPORTED_MESSAGES:
            self.messages.append(message)


class _BadLine(Exception):
    def __init__(self, kind: str, problem: str) -> None:
        super().__init__(problem)
        self.kind = kind
        self.problem = problem


# ----------------------------------------------------------------------------- meta.json


def _absolute(path: str) -> str:
    """`path` made absolute as the OS opens it. `os.path.abspath` drops a `..` with the name before it, which
    is another file where that name is a symlink (`link/../x` is `x` beside the link's target, as the official
    `os.path.join` path opens it): such a path keeps its `..`. Where the collapse names the same place (no
    symlink before a `..`), the path is normalised as before 2026-12-07: file:line sources and media paths are
    what a resume (`share_sha256`) and the --precompute-ref cache compare."""
    normal = os.path.abspath(path)
    if os.pardir not in path.split(os.sep):
        return normal
    joined = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    head, tail = os.path.split(joined)
    if tail == os.pardir:
        head = joined
    return normal if _collapses_alike(head) else joined


@functools.lru_cache(maxsize=4096)
def _collapses_alike(folder: str) -> bool:
    """Whether the absolute `folder`, spelt with `..`, is the folder its lexical collapse names (a name before a
    `..` that does not exist makes the path open nothing, as the official reader's open fails on it)."""
    try:
        return os.path.realpath(folder, strict=True) == os.path.realpath(os.path.normpath(folder), strict=True)
    except OSError:
        return False


def _resolve(path: str, base_dir: str) -> str:
    if path.startswith("s3://"):
        return path
    return _absolute(os.path.join(base_dir, os.path.expanduser(path)))


def _meta_field(entry: dict, key: str, types: tuple[type, ...], where: str, required: bool) -> Any:
    if key not in entry:
        if required:
            raise InputError(f"{where}: missing required field {key!r}")
        return None
    value = entry[key]
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise InputError(f"{where}: field {key!r} must be {names}, got {_type_name(value)}")
    return value


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def load_meta(meta_path: str, base_dir: str | None = None) -> list[DatasetSpec]:
    """Read a meta.json into specs, in file order. Relative paths resolve against `base_dir` (cwd)."""
    try:
        with open(meta_path, encoding="utf-8-sig") as f:  # a byte order mark (Windows editors) is dropped
            meta = json.load(f, object_pairs_hook=_unique_keys)
    except FileNotFoundError:
        raise InputError(f"{meta_path}: meta file not found") from None
    except IsADirectoryError:
        raise InputError(f"{meta_path}: is a folder; give the meta.json file") from None
    except OSError as e:  # no permission, an I/O error
        raise InputError(f"{meta_path}: cannot read the meta file ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:
        raise InputError(f"{meta_path}: {json_problem(e)}") from None
    except _DuplicateKey as e:
        raise InputError(f"{meta_path}: {e.args[0]!r} appears twice in one object (JSON keeps only the last)") from None
    if not isinstance(meta, dict):
        raise InputError(f"{meta_path}: expected a JSON object mapping dataset names to entries")
    base = os.getcwd() if base_dir is None else base_dir
    specs = []
    for name, entry in meta.items():
        where = f"{meta_path}: dataset {name!r}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected an object, got {_type_name(entry)}")
        if "min_dynamic_patch" in entry:  # no misspelling of max_dynamic_patch, as the close match would say
            raise InputError(f"{where}: field 'min_dynamic_patch' is not read: a meta.json entry sets "
                             "max_dynamic_patch only (as in the official reader); remove it")
        misspelt = unread_field(entry, ("data_augment", "max_dynamic_patch"))  # it would be ignored
        if misspelt:
            raise InputError(f"{where}: {misspelt}")
        root = _meta_field(entry, "root", (str,), where, required=True)
        annotation = _meta_field(entry, "annotation", (str,), where, required=True)
        repeat_time = _meta_field(entry, "repeat_time", (int, float), where, required=True)
        data_augment = _meta_field(entry, "data_augment", (bool,), where, required=False)
        max_patch = _meta_field(entry, "max_dynamic_patch", (int,), where, required=False)
        length = _meta_field(entry, "length", (int,), where, required=False)
        if not annotation.endswith("jsonl"):
            raise InputError(f"{where}: annotation must be a .jsonl file, got {annotation!r}")
        if not 0 <= repeat_time <= MAX_REPEAT_TIME:  # NaN too
            raise InputError(f"{where}: repeat_time must be a number from 0 to {MAX_REPEAT_TIME}, got {repeat_time}")
        if max_patch is not None and not 1 <= max_patch <= MAX_TILES:
            raise InputError(f"{where}: max_dynamic_patch must be from 1 to {MAX_TILES}, got {max_patch}")
        specs.append(
            DatasetSpec(
                name=name,
                root=_resolve(root, base),
                annotation=_resolve(annotation, base),
                repeat_time=float(repeat_time),
                data_augment=bool(data_augment),
                max_dynamic_patch=max_patch,
                length=length,
            )
        )
    return specs


def write_meta(path: str, datasets: list[DatasetSpec]) -> None:
    """Write specs as a meta.json that `load_meta` (and the official loader) reads back. Missing folders on
    the way to `path` are made, as `mkdir -p` makes them; a path that cannot be written is an InputError."""
    meta: dict[str, dict[str, Any]] = {}
    for spec in datasets:
        if spec.name in meta:
            raise InputError(f"{path}: dataset name {spec.name!r} given twice")
        entry: dict[str, Any] = {
            "root": spec.root,
            "annotation": spec.annotation,
            "data_augment": spec.data_augment,
            "repeat_time": spec.repeat_time,
        }
        if spec.length is not None:
            entry["length"] = spec.length
        if spec.max_dynamic_patch is not None:
            entry["max_dynamic_patch"] = spec.max_dynamic_patch
        meta[spec.name] = entry
    try:
        with contextlib.suppress(FileExistsError):  # a file where a folder goes: open below says "Not a directory"
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
            f.write("\n")
    except OSError as e:
        raise InputError(f"{path}: cannot write the meta file ({e.strerror})") from None


# ----------------------------------------------------------------------------- line parsing


def _read_lines(path: str) -> list[bytes]:
    """Raw lines as the official reader's `readlines()` in text mode splits them: at LF, CRLF or a lone CR (a
    trailing line end adds no line; a leading byte order mark, which Windows editors write, is dropped, as
    `jsonl.read_objects` drops it). A JSON line holds no raw CR, so none is cut inside a record."""
    try:
        # opened without blocking: a named pipe without a writer would wait in open() for good (SIGTERM too), and
        # a pipe or device (/dev/zero) is no file to read twice (the run hashes its data files again)
        with open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK)) as f:
            mode = os.fstat(f.fileno()).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError
            if not stat.S_ISREG(mode):
                raise InputError(f"{path}: is not a regular file (a pipe or a device); give the annotation file")
            os.set_blocking(f.fileno(), True)
            data = f.read().removeprefix(codecs.BOM_UTF8)
    except FileNotFoundError:
        raise InputError(f"{path}: annotation file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not an annotation file") from None
    except OSError as e:  # no permission, an I/O error
        raise InputError(f"{path}: cannot read the annotation file ({e.strerror or e})") from None
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


# the fields a record is read by, and those of its conversation turns: JSON keeps the last of two equal keys, so
# one given twice is refused (in other objects, such as MMPR's chosen_meta, which nothing reads, a repeat is left be)
READ_FIELDS = frozenset({"image", "video", "question", "chosen", "rejected", "conversations"})
TURN_FIELDS = frozenset({"from", "value"})


class _Object(dict):
    """A parsed JSON object that knows its keys given twice (the last value kept, as json.loads keeps it)."""

    twice: frozenset = frozenset()


def _type_name(value: Any) -> str:
    """The name of a parsed JSON value's type, as Python names it (an object is a dict, not an _Object)."""
    return "dict" if isinstance(value, dict) else type(value).__name__


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    out = _Object(pairs)
    if len(out) < len(pairs):
        counts = collections.Counter(key for key, _ in pairs)
        out.twice = frozenset(key for key, n in counts.items() if n > 1)
    return out


def _repeated_field(item: dict) -> str | None:
    """A field the reader reads that `item` (parsed with `_object`) or one of its conversation turns gives twice."""
    repeated = getattr(item, "twice", frozenset()) & READ_FIELDS
    turns = item.get("conversations")
    for turn in turns if isinstance(turns, list) else ():
        repeated |= getattr(turn, "twice", frozenset()) & TURN_FIELDS
    return min(repeated) if repeated else None


def _blank(raw: bytes) -> bool:
    """Whether a line holds nothing but whitespace (a blank line between records, or after the last): skipped."""
    return not raw.decode("utf-8", "replace").strip()


def _parse_object(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadLine("json", f"not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        item = json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError as e:
        raise _BadLine("json", f"malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise _BadLine("json", "malformed JSON (nested too deeply to read)") from None
    except ValueError:  # Python's limit on the digits of an integer read from text
        raise _BadLine("json", f"malformed JSON ({too_many_digits()})") from None
    if not isinstance(item, dict):
        raise _BadLine("json", f"expected a JSON object, got {_type_name(item)}")
    if field := _repeated_field(item):
        raise _BadLine("json", f"field {field!r} appears twice (JSON keeps only the last)")
    if problem := lone_surrogate(text, item):
        raise _BadLine("json", problem)
    return item


def _require_str(item: dict, key: str) -> str:
    if key not in item:
        raise _BadLine("missing_field", f"missing required field {key!r}")
    value = item[key]
    if not isinstance(value, str):
        raise _BadLine("wrong_type", f"field {key!r} must be a string, got {_type_name(value)}")
    return value


def _image_path(root: str, path: str) -> str:
    if path.startswith("s3://"):
        return root + path
    return _absolute(os.path.join(root, path))


def _paths(value: Any) -> bool:
    """Whether a field's value reads as a file path or a list of them."""
    return isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)


def _holds_a_path(value: Any) -> bool:
    """Whether a field's value holds something that could be a file path: a string with a folder or a file
    extension ("a/b", "x.jpg"), or a list or object holding one. Numbers, booleans, null and other strings (ids
    such as "v_abc", flags) cannot. Read from the text alone: a file check per field of every record would stat
    millions of names on a large dataset."""
    if isinstance(value, str):
        return "/" in value or "\\" in value or os.path.splitext(value)[1] != ""
    if isinstance(value, list):
        return any(_holds_a_path(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_a_path(v) for v in value.values())
    return False


def _names_a_file(value: Any, root: str) -> bool:
    """Whether a string (or a list holding one) with no folder or extension names a file or folder under `root`: a
    video's folder of frames ("v_abc"), an image saved without an extension."""
    if isinstance(value, str):
        return value != "" and os.path.exists(_image_path(root, value))
    if isinstance(value, list):
        return any(_names_a_file(v, root) for v in value)
    return False


def _media(item: dict, root: str) -> tuple[tuple[str, ...], bool, str | None]:
    """(images, multi_image, video) with the official branch order: image, then video, else text; a record
    with both is refused (the official reader drops its video). A field that looks like an `image` or `video`
    the line lacks ("images", "image_path") is refused: the record would train without its image."""
    # a misnamed field that names nothing ("videos": [] beside an image) loses no image or video: not refused, and
    # neither is one that cannot name a file (metadata such as "image_id": 4 or "video_id": "v_abc"); one
    # that holds a path in another form (datasets' [{"bytes": null, "path": "a.png"}]) is refused
    # a plain name (no folder, no extension) is a path where it names a file or folder under the root ("videos":
    # "v_abc", a folder of frames); looked up only for a field whose name reads as an image's or a video's, so a
    # record's other fields cost no file check
    plain = {key for key, value in item.items() if key not in ("image", "video") and _paths(value)
             and not _holds_a_path(value) and unread_field({key: value}, ("image", "video"))
             and _names_a_file(value, root)}
    named = {key: value for key, value in item.items()
             if key in ("image", "video") or key in plain or _holds_a_path(value)}
    problem = unread_field(named, ("image", "video"))
    if problem is None and any(item.get(key) in ("", []) for key in ("image", "video")):
        # an empty image or video is none given: a field of paths beside it ("images": [...]) is another name for
        # it, and the record would train without them (metadata such as "image_id": 4 stays ignored)
        paths = {key: value for key, value in item.items()
                 if item[key] not in ("", []) and _paths(value) and (key in plain or _holds_a_path(value))}
        problem = unread_field(paths, ("image", "video"))
    if problem:
        raise _BadLine("unread_field", problem)
    if "image" in item:
        image = item["image"]
        if isinstance(image, str):
            paths, multi = ([image] if image else []), False
        elif isinstance(image, list) and all(isinstance(p, str) for p in image):
            paths, multi = image, True
        else:
            raise _BadLine("wrong_type", f"field 'image' must be a string or a list of strings, got {image!r:.80}")
        if "" in paths:  # it would name the images' root folder
            raise _BadLine("wrong_type", f"field 'image' lists an empty path: {image!r:.80}")
        if paths and item.get("video") not in (None, ""):
            raise _BadLine("image_and_video", "the record gives both 'image' and 'video', and a sample shows one of"
                           " them (the official reader trains the image and drops the video without a word)")
        if paths:
            resolved = tuple(_image_path(root, p) for p in paths)
            for name, p in zip(paths, resolved):
                if not os.path.isfile(p):
                    raise _BadLine("missing_file", _not_a_file("image", p, None if os.path.isabs(name) else root))
            return resolved, multi, None
    video = item.get("video")
    if video is None or video == "":
        return (), False, None
    if not isinstance(video, str):
        raise _BadLine("wrong_type", f"field 'video' must be a string, got {_type_name(video)}")
    path = _absolute(os.path.join(root, video))
    if os.path.isdir(path):
        _check_frames_folder(path)
    elif not os.path.isfile(path):
        raise _BadLine("missing_file", _not_a_file("video", path, None if os.path.isabs(video) else root))
    return (), False, path


def _check_frames_folder(path: str) -> None:
    """A video given as a folder of frame images (as `load_video` reads one) must hold some."""
    try:
        frame_files(Path(path))
    except InputError:
        raise _BadLine("missing_file", f"video folder has no image files to use as video frames: {path}") from None
    except OSError as e:
        raise _BadLine("missing_file", f"video folder cannot be read: {path} ({e.strerror})") from None


def _not_a_file(kind: str, path: str, root: str | None) -> str:
    """Why a record's image or video `path`, read from the folder `root` (None: an absolute path), is no file: a
    folder (given as an image) is named as such rather than as not found, and a `root` that is no folder (a wrong
    meta.json `root` or --image-root, which fails every record) is named too."""
    if os.path.isdir(path):
        return f"{kind} is a folder, not a file: {path}"
    if os.path.exists(path):  # a device (/dev/zero), a pipe or a socket
        return f"{kind} is not a regular file: {path}"
    if root is not None and not root.startswith("s3://") and not os.path.isdir(root):
        why = "is a file, not a folder" if os.path.exists(root) else "does not exist"
        return f"{kind} file not found: {path} (the folder it is read from, {root}, {why})"
    return f"{kind} file not found: {path}"


def _answer(item: dict, key: str) -> str:
    value = _require_str(item, key)
    if not value.strip():
        raise _BadLine("empty_answer", f"field {key!r} is empty: an answer needs text to score")
    return value


def _preference(item: dict, spec: DatasetSpec, source: Source) -> PreferenceRecord:
    if "question" not in item and "conversations" in item:
        raise _BadLine("missing_field", "missing required field 'question' (a conversation record: train sft reads those)")
    question = _require_str(item, "question")
    chosen = _answer(item, "chosen")
    rejected = _answer(item, "rejected")
    if chosen == rejected:
        raise _BadLine("same_answers", "'chosen' and 'rejected' are the same text: the pair states no preference")
    images, multi, video = _media(item, spec.root)
    return PreferenceRecord(question, chosen, rejected, images, multi, video, spec.name, source)


def _conversations(item: dict) -> tuple[dict[str, str], ...]:
    if "conversations" not in item:
        pair = " (a preference pair: train mpo and train dpo read those)" if "chosen" in item else ""
        raise _BadLine("missing_field", f"missing required field 'conversations'{pair}")
    turns = item["conversations"]
    if not isinstance(turns, list) or not turns:
        raise _BadLine("wrong_type", "field 'conversations' must be a non-empty list")
    out = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _BadLine("wrong_type", f"conversations[{k}] must be an object, got {_type_name(turn)}")
        for key in ("from", "value"):
            if key not in turn:
                raise _BadLine("missing_field", f"conversations[{k}] is missing {key!r}")
            if not isinstance(turn[key], str):
                raise _BadLine("wrong_type", f"conversations[{k}].{key} must be a string, got {_type_name(turn[key])}")
        if turn["from"] not in SFT_ROLES:
            raise _BadLine("wrong_type", f"conversations[{k}].from must be one of {SFT_ROLES}, got {turn['from']!r}")
        if turn["from"] == "gpt" and not turn["value"].strip():
            raise _BadLine("empty_answer", f"conversations[{k}].value is empty: an answer needs text to score")
        out.append({"from": turn["from"], "value": turn["value"]})
    return tuple(out)


def _fail_or_count(e: _BadLine, source: Source, report: SkipReport | None) -> None:
    message = f"{source}: {e.problem}"
    if report is None:
        raise InputError(message)
    report.add(e.kind, message)


# ----------------------------------------------------------------------------- readers


def select_lines(n_lines: int, repeat_time: float, seed: int, sample_rng: random.Random) -> list[int]:
    """Line indices in training order: subsample or repeat, then the per-dataset numpy shuffle."""
    order = list(range(n_lines))
    if repeat_time < 1:
        order = sample_rng.sample(order, k=int(n_lines * repeat_time))
    if repeat_time > 1:
        order = order * int(repeat_time)
    np.random.default_rng(seed=seed).shuffle(order)
    return order


def read_records(
    spec: DatasetSpec,
    seed: int,
    *,
    report: SkipReport | None = None,
    sample_rng: random.Random | None = None,
) -> list[PreferenceRecord]:
    """One dataset's preference records in training order (`seed` = its index in the meta file).

    Without `report` the first bad selected line raises InputError("file:line: problem"); with one,
    bad lines are dropped and counted there. `sample_rng` draws the `repeat_time < 1` subsample
    (default `random.Random(seed)`).
    """
    lines = _read_lines(spec.annotation)
    rng = random.Random(seed) if sample_rng is None else sample_rng
    order = select_lines(len(lines), spec.repeat_time, seed, rng)
    parsed: dict[int, PreferenceRecord | None] = {}
    for i in sorted(set(order)):
        if _blank(lines[i]):
            parsed[i] = None
            continue
        source = Source(spec.annotation, i + 1)
        try:
            parsed[i] = _preference(_parse_object(lines[i]), spec, source)
        except _BadLine as e:
            _fail_or_count(e, source, report)
            parsed[i] = None
    return [rec for rec in (parsed[i] for i in order) if rec is not None]


def read_datasets(
    specs: list[DatasetSpec], *, skip_bad: bool = False, sample_seed: int = 42
) -> tuple[list[PreferenceRecord], SkipReport]:
    """All datasets concatenated in meta order, seeds = indices, one shared subsample generator."""
    report = SkipReport() if skip_bad else None
    sample_rng = random.Random(sample_seed)
    records: list[PreferenceRecord] = []
    for index, spec in enumerate(specs):
        records += read_records(spec, index, report=report, sample_rng=sample_rng)
    return records, report if report is not None else SkipReport()


def read_sft_records(
    jsonl_path: str, image_root: str, *, report: SkipReport | None = None, repeat_time: float = 1.0
) -> list[SFTRecord]:
    """Official SFT conversation lines, in file order, with the same validation as `read_records`.

    `repeat_time` as the official fine-tuning reader (`internvl_chat_finetune.py`) applies it: below 1
    only the first `int(lines * repeat_time)` lines are read (not a random sample, unlike MMPR), above 1
    the records repeat `int(repeat_time)` times; no per-dataset shuffle (the trainer shuffles them all).
    """
    if repeat_time > 1 and repeat_time != int(repeat_time):
        raise InputError(f"{jsonl_path}: repeat_time {repeat_time} is above 1 and not a whole number, which the "
                         "official fine-tuning reader refuses (it repeats a dataset a whole number of times)")
    lines = _read_lines(jsonl_path)
    if repeat_time < 1:
        lines = lines[: int(len(lines) * repeat_time)]
    records = []
    for i, raw in enumerate(lines):
        if _blank(raw):
            continue
        source = Source(jsonl_path, i + 1)
        try:
            item = _parse_object(raw)
            conversations = _conversations(item)
            images, multi, video = _media(item, image_root)
            if (images or video) and not any(turn["from"] == "human" for turn in conversations):
                media = "a video" if video else "an image" if len(images) == 1 else f"{len(images)} images"
                raise _BadLine("missing_field", f"the record has {media} but no 'human' turn to show "
                               f"{'them' if len(images) > 1 else 'it'}: a conversation with media needs the "
                               'question as a human turn, {"from": "human", "value": "<question>"}')
        except _BadLine as e:
            _fail_or_count(e, source, report)
            continue
        records.append(SFTRecord(conversations, images, multi, video, source))
    return records * max(1, int(repeat_time))

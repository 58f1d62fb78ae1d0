"""The output folder of a resumable run (`pairs`, `eval`; `generate` keeps its settings beside its answers file).

A run records its settings in `settings.json` and refuses a folder holding another run's (`check_settings`);
it holds the folder locked while it writes (`hold_output`), appends each finished item to a JSONL
(`Progress`) that a rerun reads to skip them, and replaces whole files atomically (`atomic_write`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from internvl_mpo.errors import ConfigError, InputError, SaveError
from internvl_mpo.jsonl import lone_surrogate
from internvl_mpo.locks import lock_output, no_lock_note


class Progress:
    """Append-only JSONL of finished items, keyed by id; a last line cut by an interruption is dropped."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        try:
            data = self.path.read_bytes()
        except OSError as e:  # a folder of that name, no permission
            raise InputError(f"{self.path}: cannot read it ({e.strerror}); delete it to start over") from None
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            with open(self.path, "r+b") as f:
                f.truncate(len(data))
        rows = {}
        # Lines end at LF only: answers may hold U+2028 and the like, which str.splitlines() splits at.
        for number, line in enumerate(data.split(b"\n")[:-1], 1):
            try:
                text = line.decode("utf-8")
                row = json.loads(text)
                rows[row["id"]] = row
                if lone_surrogate(text, row):  # no text can hold it: writing the file again would fail
                    raise ValueError
            except (ValueError, RecursionError, KeyError, TypeError):  # not UTF-8 or JSON, damaged, no "id"
                raise InputError(f"{self.path}:{number}: corrupt progress line; delete the folder to start over") from None
        return rows

    def append(self, rows: Iterable[dict]) -> None:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        with writing(self.path, RESUME):  # a line cut by a full disk is dropped by the next load
            append_synced(self.path, text.encode("utf-8"))


# What a run that could not write its progress says: what it finished is on disk
RESUME = "the items finished before are kept: make room and run the same command again to resume"


@contextlib.contextmanager
def writing(path: Path, outcome: str) -> Iterator[None]:
    """An OSError in the block (a full disk, a read-only folder) is a one-line SaveError naming `path` and
    saying `outcome`, not a traceback."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:  # room would not help: the name (or one made from it) is too long
            outcome = "the name, with the suffix added to it, is too long for this file system: give a shorter one"
        raise SaveError(path, " ".join(str(e).split()), outcome) from None


def append_synced(path: Path, data: bytes) -> None:
    """Append `data` to `path` and fsync it. Unbuffered: a write that fails leaves nothing for close() to
    write again (its error would replace the first)."""
    with open(path, "ab", buffering=0) as f:
        view = memoryview(data)
        while view:
            view = view[f.write(view):]
        os.fsync(f.fileno())


def atomic_write(path: Path, data: str | bytes, outcome: str | None = None) -> None:
    """Replace `path` with `data` (text is written as UTF-8) in one rename through `path`.tmp; a write that fails
    (a SaveError saying `outcome`, by default that the file is as it was) leaves `path` as it was and no .tmp."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with writing(path, outcome or f"{path.name} is as it was: make room and run the same command again"):
            with open(tmp, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except SaveError:
        with contextlib.suppress(OSError):  # a .tmp name past the file-name limit (ENAMETOOLONG) was never made
            tmp.unlink(missing_ok=True)
        raise


def check_output_folder(path: Path) -> None:
    """Refuse an output path that is, or lies under, an existing file; creates nothing (run before a model loads)."""
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"{path}: exists and is not a folder" if existing == path.absolute() else
                         f"{path}: {existing} is a file, not a folder")


def no_folder(path: Path) -> str:
    """Why the folder of output file `path` cannot take it: a file in its way, or the folder does not exist."""
    above = next(p for p in path.parents if p.exists())  # "." or "/" at the latest
    return f"{above} is a file, not a folder" if not above.is_dir() else f"the folder {path.parent} does not exist"


def make_output_folder(path: Path) -> None:
    check_output_folder(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{path}: cannot create the output folder ({e.strerror})") from None


@contextlib.contextmanager
def hold_output(path: Path, identity: dict, writes: Sequence[str], kind: tuple[str, str, str]) -> Iterator[None]:
    """Make the output folder `path` and hold it for this run: locked (`locks.lock_output`,
    `kind`: `pairs.PAIRS_LOCK` or `evaluate.EVAL_LOCK`; ConfigError when a live run holds it), its settings
    checked by `check_settings`, which records them in a new folder. They are checked before the lock too,
    so that a folder refused for them (the user's own, say) gets no lock file. On a filesystem without
    locks it says so (on stderr) and goes on, as train does."""
    make_output_folder(path)
    check_settings(path / "settings.json", identity, writes, record=False)
    lock = lock_output(path, kind)
    if lock is None:
        print(no_lock_note(path), file=sys.stderr)
    with lock or contextlib.nullcontext():
        check_settings(path / "settings.json", identity, writes)  # under the lock: no run records others meanwhile
        with writing(path, "nothing was asked yet"):  # what `atomic_write` of a killed run left, which a rerun
            for name in ("settings.json", *writes):   # need not write again (its other files it writes again)
                (path / f"{name}.tmp").unlink(missing_ok=True)
        yield


def read_settings(path: Path, kind: str, output: str) -> dict:
    """The settings a `kind` run recorded at `path`; ConfigError (naming the `output` to change) when the
    file holds no JSON object."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:  # a folder of that name, no permission
        raise ConfigError(f"{path}: cannot read it ({e.strerror}); use another {output}") from None
    except (ValueError, RecursionError):  # not UTF-8 or JSON, nested too deeply, a 5000-digit integer
        earlier = None
    if not isinstance(earlier, dict):
        raise ConfigError(f"{path}: not the settings of {'an' if kind[0] in 'aeiou' else 'a'} {kind} run; use another "
                          f"{output}")
    return earlier


def recorded_weights(path: Path) -> Any:
    """What the run whose settings are at `path` recorded of its weights (`checkpoint.weights_identity`), for
    this run's to take where the files are unchanged; None where there is none (`check_settings` says why)."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # `check_settings` says what is wrong with the file
        return None
    return earlier.get("weights") if isinstance(earlier, dict) else None


def changed_settings(earlier: dict, now: dict, ignore: Sequence[str] = ()) -> list[str]:
    """The keys, other than `ignore`, whose values differ between two runs' settings, sorted; weights as
    `checkpoint.weights_change` names them. Weights are not compared where this run has none (its load fails,
    saying why), nor where an older version did not record them: no key (before 2026-12-04), or null for
    weights without a save id, which now record their files' stamps."""
    from internvl_mpo.checkpoint import weights_change

    before, weights = earlier.get("weights"), now.get("weights")
    if "weights" not in earlier or weights is None or (before is None and isinstance(weights, dict)):
        ignore = (*ignore, "weights")
    return sorted(weights_change(earlier.get(k), now.get(k)) if k == "weights" else k
                  for k in earlier.keys() | now.keys() if k not in ignore and earlier.get(k) != now.get(k))


def check_settings(path: Path, identity: dict, writes: Sequence[str], record: bool = True) -> None:
    """Refuse a folder that holds a run with other settings, or without settings one of the files the run
    `writes` there (the user's own: they would be overwritten); a new folder gets these (`record`: False
    before a model loads, so that a load that fails leaves nothing behind). The model is compared by
    `checkpoint.model_key`; files written by older versions record the model as typed, which is read against
    the current folder. A correctness run's start_ratio, which such files may hold though the run never reads
    it, is left out, and so are weights an older version did not record (`changed_settings`)."""
    found = [name for name in writes if (path.parent / name).exists()]
    if found and not path.exists():
        raise ConfigError(f"{path.parent} holds {', '.join(found)} but no {path.name} of a pairs or eval run; "
                          "use another output folder")
    if path.exists():
        earlier = read_settings(path, "pairs or eval", "output folder")
        if isinstance(earlier.get("model"), str):
            from internvl_mpo.checkpoint import model_key

            earlier["model"] = model_key(earlier["model"])
        if earlier.get("method") == "correctness":  # a pairs.CORRECTNESS run: older files hold its unread start_ratio
            earlier.pop("start_ratio", None)
        changed = changed_settings(earlier, identity)
        if changed:
            raise ConfigError(
                f"{path.parent} holds a run with other settings ({', '.join(changed)}); "
                "use another output folder or the same settings"
            )
    elif record:
        atomic_write(path, json.dumps(identity, indent=2, ensure_ascii=False) + "\n")

"""Checkpoint I/O in the official InternVL layout: config.json + (sharded) safetensors.

Reading resolves every tensor through `model.safetensors.index.json` (or the single
`model.safetensors`), checks each key and shape against the model before reading any data, and
reports all missing, unexpected and mis-shaped keys in one `CheckpointError`. Tensors are read one
by one straight into the target dtype and device, so peak memory stays near the size of the weights,
and each read is checked there for NaN and inf (`check_finite`): a broken checkpoint is refused, not run.
Only safetensors are read: pickle-based files (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`) are refused,
never unpickled. Writing produces the same layout, with tokenizer, generation and remote-code files
(`companions`) copied from the source folder so the official code, vLLM and lmdeploy can load the
result. Each save stamps one fresh id (`SAVE_ID`) into all its weight files and its index, and shards
of two saves under one index (a save killed between its renames) are refused. A save holds its folder
with a flock (`save_lock`); a run holds its output folder with `locks.lock_output`. The `--device`
and `--dtype` a checkpoint loads in are read by `devices`.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import socket
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .companions import COMPANION_FILES, broken_link
from .config import ModelConfig, adapter_message
from .errors import CheckpointError, InputError, SaveError
from .jsonl import json_problem
from .locks import LOCKS_UNSUPPORTED

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
MAX_HEADER = 100_000_000  # safetensors' own limit on a header's size
# safetensors' names of the floating-point dtypes (every weight of the model is one of them) -> torch's.
_FLOAT_KINDS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Held by a save while it writes into a folder (see `save_lock`).
SAVE_LOCK = ".internvl-mpo-save.lock"
# Key of the id that one save stamps into the header metadata of each of its weight files and into the index's
# "metadata" (beside total_size), so that a folder mixing the shards of two saves is told apart (`open_weights`).
# transformers, vLLM and the official code ignore keys they do not read in both places (README).
SAVE_ID = "internvl_mpo_save_id"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.py", "*.model", "*.jinja", "*.md"]


def auto_dtype(folder: Path | None, config_dtype: str | None, weights: Weights | None = None) -> str | None:
    """The dtype name `dtype="auto"` loads `folder` in, resolved as transformers' from_pretrained does: the
    config's torch_dtype (or dtype); without one the index metadata's "dtype", else the first floating-point
    weight by name of the single file or the first shard (weights of mixed dtypes included), read from the
    header alone. None: no folder (random weights from a config) and no config dtype, or no float weight.
    `weights`: the folder's, where the caller has opened them (`open_weights`)."""
    if config_dtype is not None or folder is None:
        return config_dtype
    weights = open_weights(folder) if weights is None else weights
    if "dtype" in weights.metadata:
        return weights.metadata["dtype"]
    first = weights.handles[min(weights.handles)]
    for key in sorted(first.keys()):
        kind = first.get_slice(key).get_dtype()
        if kind in _FLOAT_KINDS:
            return _FLOAT_KINDS[kind]
    return None


def resolve_checkpoint(path_or_id: str | Path, revision: str | None = None) -> Path:
    """A local folder as it is, or a hub id ("OpenGVLab/InternVL2_5-4B-MPO") downloaded to the cache."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; give the checkpoint folder that holds config.json")
        return path
    text = str(path_or_id)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text) or text.startswith((".", "/")):
        raise CheckpointError(f"{text}: no such checkpoint folder (and not a hub id like 'org/name')")
    named = text if revision is None else f"{text} (revision {revision!r})"
    try:
        from huggingface_hub import HfApi, constants

        # a hub found unreachable once in this process is not waited for again (a command resolves its model
        # more than once: each wait was HF_HUB_ETAG_TIMEOUT seconds)
        key = (text, revision, str(constants.HF_HUB_CACHE))
        if key in _SERVED_FROM_CACHE:
            return _SERVED_FROM_CACHE[key]
        try:  # snapshot_download asks the hub without a timeout: one that never answers would hang there
            HfApi().repo_info(text, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        except Exception as e:  # offline, not found, ...: snapshot_download below knows what to do
            # A hub that does not answer, cannot be reached or answers 5xx or 429 (busy): a copy in the cache
            # serves, as it does offline (asked online, snapshot_download retries for a commit's files list with
            # backoff: 20 s and more)
            unreachable = None if _hub_offline() else _unreachable(e)  # offline, snapshot_download reads the cache
            if unreachable:
                try:
                    folder = _snapshot(text, revision, local_files_only=True)
                except Exception:
                    # a busy hub (5xx, 429: often the API's rate limit alone) may still serve the files: without a
                    # cached copy the download below is tried, with huggingface_hub's retries, as before
                    if unreachable != "busy":
                        detail = " ".join(str(e).split())
                        why = (f"did not answer within {constants.HF_HUB_ETAG_TIMEOUT} s (HF_HUB_ETAG_TIMEOUT)"
                               if unreachable == "timeout" else f"could not be reached ({detail})")
                        raise CheckpointError(f"{named}: not a local folder, not in the hub cache, and the hub "
                                              f"{why}") from None
                else:
                    _SERVED_FROM_CACHE[key] = folder
                    return folder
        # offline, snapshot_download of a commit whose file listing is cached would fetch each file it lacks
        return _snapshot(text, revision, **({"local_files_only": True} if _hub_offline() else {}))
    except CheckpointError:
        raise
    except Exception as e:  # network, auth, missing repo: one clear message, on one line
        reason = " ".join(str(e).split())
        if _hub_offline():
            if type(e).__name__ == "LocalEntryNotFoundError":  # its text speaks of local_files_only
                reason = f"no snapshot of it in {constants.HF_HUB_CACHE}; unset HF_HUB_OFFLINE to download it"
            raise CheckpointError(f"{named}: not a local folder, and not in the hub cache (HF_HUB_OFFLINE is set, "
                                  f"so the hub was not asked): {reason}") from None
        raise CheckpointError(f"{named}: not a local folder, and downloading it from the hub failed: "
                              f"{reason.rstrip('.')}; give a local folder, or download it where the hub can be "
                              "reached") from None


# (hub id, revision, hub cache) -> the cached snapshot served while the hub could not be reached (`resolve_checkpoint`)
_SERVED_FROM_CACHE: dict[tuple[str, str | None, str], Path] = {}


def _snapshot(repo_id: str, revision: str | None, **kwargs: Any) -> Path:
    """`snapshot_download`'s folder. A cached snapshot that the cached file listing of its commit (huggingface_hub's
    `trees/<commit>.json`) calls incomplete, read without the hub, is taken as it is (the error's `snapshot_path`):
    the files missing there are often ones no load reads (README.md, remote code, examples/ that `hf download
    --include` or another tool's download left out), and the loader names a file it needs that is missing."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS, **kwargs))
    except Exception as e:
        if type(e).__name__ == "IncompleteSnapshotError" and getattr(e, "snapshot_path", None):
            return Path(e.snapshot_path)
        raise


def _hub_offline() -> bool:
    """Whether huggingface_hub reads HF_HUB_OFFLINE as set (it reads the variable once, at import)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def model_key(path_or_id: str) -> str:
    """How a run's settings.json records its model: a local folder (as `resolve_checkpoint` tells one)
    as its resolved path, so that ./m, m/ and /abs/m agree and two folders named m in other places
    differ; a hub id, or no model (""), as typed."""
    path = Path(path_or_id).expanduser()
    return str(path.resolve()) if path_or_id and path.exists() else path_or_id


def _unreachable(error: BaseException) -> str | None:
    """"timeout" for a timeout of any HTTP stack huggingface_hub has used (requests, httpx, httpx2), "busy" for an
    answer with a 5xx or 429 status, "network" for a connection they could not make (refused, no route, no name), else
    None."""
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & {"Timeout", "TimeoutException"}:
        return "timeout"
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(status, int) and (status >= 500 or status == 429):  # down, overloaded, rate limiting (or a proxy)
        return "busy"
    return "network" if names & {"ConnectionError", "ConnectError", "NetworkError"} else None


class Weights(NamedTuple):
    """A checkpoint's weight files as one load opens them, each once (its header read; tensors are read on
    access): each key's file, each file's open safetensors handle, the index's metadata ({} without), and each
    file's `Reader` (the same file as the handle's: a save renaming new files into the folder meanwhile changes
    neither)."""

    files: dict[str, Path]
    handles: dict[Path, Any]
    metadata: dict[str, Any]
    readers: dict[Path, Reader]

    @property
    def save_id(self) -> str | None:
        """The `SAVE_ID` of the save that wrote these files (`open_weights` checks they share one): weights
        saved again into a folder (a retrained model) have another. None for weights without one (official
        checkpoints)."""
        return (next(iter(self.handles.values())).metadata() or {}).get(SAVE_ID)


_LAYERS = {"llm": re.compile(r"language_model\.model\.layers\.(\d+)\."),
           "vision": re.compile(r"vision_model\.encoder\.layers\.(\d+)\.")}


def check_layer_counts(folder: Path, config: ModelConfig, weights: Weights) -> None:
    """Refuse a config.json that asks for more decoder or vision layers than the weights hold, before a model
    that size is built (a typo of 10**9 layers took minutes and gigabytes, only to be refused for the missing
    weights)."""
    for part, wanted in (("llm", config.llm.num_hidden_layers), ("vision", config.vision.num_hidden_layers)):
        held = {int(m[1]) for key in weights.files if (m := _LAYERS[part].match(key))}
        if 0 < len(held) < wanted:  # none under these names (another prefix): the key check names what differs
            raise CheckpointError(f"{folder}: config.json's {part}_config.num_hidden_layers is {wanted}, but the "
                                  f"weights hold {len(held)} {part} layers; the config does not match its weights")


def weights_identity(weights: Weights | None, recorded: Any = None) -> str | dict[str, Any] | None:
    """How a resumable run (generate, eval, pairs) records the weights it runs, so that a resume after other
    weights took their place is refused: their save id; without one (official checkpoints, a hub download)
    the `filestamp` stamps of their files by name. `recorded`, an earlier run's, comes back as it is where
    the files still hold what it saw, told by their stats alone where those agree: an unchanged resume
    hashes nothing, a folder copied with other times is hashed and matches."""
    from .filestamp import stamps, unchanged

    if weights is None:
        return None
    if weights.save_id is not None:
        return weights.save_id
    files = {file.name: file for file in sorted(weights.handles)}
    if (isinstance(recorded, dict) and sorted(recorded) == list(files)
            and unchanged(list(files.values()), [recorded[name] for name in files])):
        return recorded
    return dict(zip(files, stamps(list(files.values()))))


def weights_change(earlier: Any, now: Any) -> str:
    """How a refusal names the difference of two `weights_identity`: the weight files whose contents differ
    (or that one run has alone) where both are stamps, else "weights" (another save)."""
    def sha256(stamps: Any, name: str) -> Any:
        stamp = stamps.get(name)
        return stamp.get("sha256") if isinstance(stamp, dict) else None

    if not (isinstance(earlier, dict) and isinstance(now, dict)):
        return "weights"
    names = sorted(name for name in earlier.keys() | now.keys() if sha256(earlier, name) != sha256(now, name))
    if not names:
        return "weights"
    return f"weights: the model's {_describe(names)} {'is' if len(names) == 1 else 'are'} not what the run read"


def open_weights(folder: Path) -> Weights:
    """The weights of the index, or of the single file, checked (one save, shards as the index lists them);
    or a refusal."""
    index, single = folder / INDEX_FILE, folder / SINGLE_FILE
    for path in (index, single):  # read as absent below, for a message about a missing index
        if why := broken_link(path):
            raise CheckpointError(why)
    # transformers reads the single file, vLLM the index's shards: the same weights only where the index names the
    # single file alone (mlx-lm's saves write such an index beside it)
    if index.exists() and single.exists() and not _indexes_single_file(index):
        raise CheckpointError(
            f"{folder} holds both {SINGLE_FILE} and {INDEX_FILE}: the weights of two saves (one cut short, or "
            "files copied together), and loaders differ on which they read; delete the one that is not this "
            "config.json's")
    if index.exists():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            mapping = data["weight_map"]
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deeply, a 5000-digit integer
            raise CheckpointError(f"{index}: not a valid safetensors index ({json_problem(e)})") from None
        except OSError as e:  # a folder of that name, no permission to read it
            raise CheckpointError(f"{index}: cannot read the index ({e.strerror})") from None
        if not isinstance(mapping, dict):
            raise CheckpointError(f"{index}: weight_map is not an object of tensor name -> shard file")
        for key, name in mapping.items():  # shards are files of this folder (an index may not reach elsewhere)
            if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
                raise CheckpointError(
                    f"{index}: weight_map gives {key} the shard {name!r}, not a file name in the folder")
        files = {name: folder / name for name in sorted(set(mapping.values()))}  # the first missing one is named
        for name, file in files.items():
            if why := broken_link(file):
                raise CheckpointError(why)
            if not file.exists():
                raise CheckpointError(f"{index} names {name}, which is not in {folder}")
        opened = {files[name]: open_file(files[name]) for name in sorted(files)}
        handles = {file: handle for file, (handle, _) in opened.items()}
        metadata = data.get("metadata")
        _check_one_save(index, metadata, handles)
        listed: dict[str, set[str]] = {name: set() for name in files}
        for key, name in mapping.items():
            listed[name].add(key)
        for name in sorted(files):  # transformers and vLLM read every tensor of a shard, not the index's only
            held = set(handles[files[name]].keys())
            for keys, what in ((listed[name] - held, "lacks {} the index lists there"),
                               (held - listed[name], "holds {} the index does not list there")):
                if keys:
                    count = f"{len(keys)} tensor{'s' * (len(keys) > 1)}"
                    raise CheckpointError(
                        f"{files[name]} {what.format(count)} ({_describe(sorted(keys))}): the index and its shards "
                        "disagree; rewrite the index from the shards, or replace the folder with a complete copy")
        return Weights({key: files[name] for key, name in mapping.items()}, handles,
                       metadata if isinstance(metadata, dict) else {},
                       {file: reader for file, (_, reader) in opened.items()})
    if single.exists():
        handle, reader = open_file(single)
        return Weights(dict.fromkeys(handle.keys(), single), {single: handle}, {}, {single: reader})
    if (folder / "zero_to_fp32.py").is_file() or any(p.is_dir() for p in folder.glob("global_step*")):
        raise CheckpointError(
            f"{folder} is a DeepSpeed checkpoint without gathered weights (only the global_step* shards); "
            "write them with the zero_to_fp32.py it holds (--safe_serialization), or save with "
            "stage3_gather_16bit_weights_on_model_save")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle-based weights ({', '.join(pickles)}); we read safetensors only and "
            "never unpickle a file. Convert them with a tool you trust, then save as safetensors."
        )
    if (folder / "adapter_config.json").is_file():  # beside a base model's config.json, as some tools save it
        raise CheckpointError(adapter_message(folder))
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if shards:  # a download or copy that left the index behind
        raise CheckpointError(
            f"{folder} holds {_describe(shards)} but no {INDEX_FILE}, which says which tensor each shard holds; "
            "copy the index from where the shards came from")
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")


def save_metadata() -> dict[str, str]:
    """The header metadata of every weight file of one save: safetensors' "format" and a fresh `SAVE_ID`."""
    return {"format": "pt", SAVE_ID: uuid.uuid4().hex}


def _check_one_save(index: Path, metadata: Any, shards: dict[Path, Any]) -> None:
    """Refuse shards of two saves under one index, as a save killed between its renames leaves them (same
    names and keys, other weights): each shard's `SAVE_ID` (read from its header, not its tensors) must be
    the index's. Official checkpoints carry no id anywhere and load as before.

    An index without an id (an official one, or one rewritten by a tool that keeps only total_size) says
    nothing of its shards, yet they must still agree with one another, the first standing in for the
    index: a save killed over a checkpoint without ids leaves its new shards, with an id, beside old ones
    without, and shards of one save load under any index.
    """
    expected = metadata.get(SAVE_ID) if isinstance(metadata, dict) else None
    reference = index if expected is not None else None
    for shard, handle in shards.items():
        save_id = (handle.metadata() or {}).get(SAVE_ID)
        if reference is None:
            reference, expected = shard, save_id
        elif save_id != expected:
            raise CheckpointError(
                f"{index.parent}: {shard.name} was written by another save than {reference.name} (save id "
                f"{save_id or 'none'}, not {expected or 'none'}): the folder mixes the files of two saves, as a save "
                "cut short between its renames leaves it; save the model into it again, or replace the folder "
                "with a complete copy of the checkpoint")


class Reader:
    """A weight file held open for reads at byte offsets (`read_at`): the file as it was opened, also after a
    save renames another into its place (reads by path would then mix the two saves' tensors)."""

    _lock = threading.Lock()  # where the OS has no positional reads: seek + read, one at a time

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        weakref.finalize(self, os.close, self.fd)

    def read_at(self, buffer: memoryview, offset: int) -> int:
        """Fill `buffer` from byte `offset`; the bytes read (fewer only at the end of the file). A read that returns
        fewer bytes than asked (network and FUSE filesystems may) is followed by another, as buffered reads do."""
        done = 0
        while done < len(buffer):
            got = self._read(buffer[done:], offset + done)
            if not got:
                break
            done += got
        return done

    def _read(self, buffer: memoryview, offset: int) -> int:
        if hasattr(os, "preadv"):
            return os.preadv(self.fd, [buffer], offset)
        with self._lock:
            os.lseek(self.fd, offset, os.SEEK_SET)
            data = os.read(self.fd, len(buffer))
            buffer[: len(data)] = data
            return len(data)

    def is_at_path(self) -> bool:
        """Whether the path still names this file."""
        try:
            now = os.stat(self.path)
        except OSError:
            return False
        held = os.fstat(self.fd)
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def open_file(file: Path, tries: int = 3) -> tuple[Any, Reader]:
    """The safetensors handle of `file` and a `Reader` of the same file: a save into the folder that renames a new
    file into place between the two opens is seen (the path no longer names the reader's file) and both are opened
    again; after `tries` such saves, a CheckpointError."""
    for _ in range(tries):
        try:
            reader = Reader(file)
        except OSError as e:
            open_safetensors(file)  # raises, saying why (permission, a Git LFS pointer, ...)
            raise CheckpointError(f"{file}: cannot open it ({e.strerror})") from None
        handle = open_safetensors(file)
        if reader.is_at_path():
            return handle, reader
    raise CheckpointError(f"{file} was replaced {tries} times while it was being opened: another process is saving "
                          "into the folder; load it once that save has finished")


def open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        if file.exists() and not os.access(file, os.R_OK):  # safetensors reports it as "No such file or directory"
            raise CheckpointError(f"{file}: permission denied") from None
        if _is_lfs_pointer(file):
            raise CheckpointError(
                f"{file}: a Git LFS pointer, not the weights (the repository was cloned without git-lfs); "
                "fetch them with `git lfs pull` in the clone, or download with `hf download`") from None
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def _is_lfs_pointer(file: Path) -> bool:
    """The small text file git leaves in place of a large one when git-lfs is not installed."""
    try:
        with open(file, "rb") as f:
            return f.read(40).startswith(b"version https://git-lfs.github.com/spec/")
    except OSError:
        return False


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def mismatch_report(missing: list[str], unexpected: list[str], wrong: list[str]) -> str:
    """Missing, unexpected and mis-shaped (or mis-typed) keys in one clause, each list cut short when long."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {_describe(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_describe(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} with the wrong shape or dtype: {_describe(wrong, 4)}")
    return "; ".join(parts)


class LazyTensor:
    """One checkpoint tensor, read on indexing: `t[a:b]` reads rows a..b-1 of the memory-mapped file only.
    `start`: the byte of the file where its data begins (`data_starts`), or None where unknown; `reader`: the
    file's `Reader` (the view's file), which reads it there."""

    def __init__(self, reader: Reader, key: str, view, start: int | None = None):
        self.reader, self.file, self.key, self.view, self.start = reader, reader.path, key, view, start

    def __getitem__(self, index) -> torch.Tensor:
        """The rows as stored, refused where they hold NaN or inf (`check_finite`)."""
        return self.read(index)

    def read(self, index=..., dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
        """`self[index]` read into `dtype` on `device` (default: as stored, on the CPU) and checked there: NaN or
        inf is a `CheckpointError`; a value past a narrower dtype's range (float16's largest is 65504), which became
        inf there (and the logits NaN), an `InputError`.

        A whole tensor kept as stored on the CPU is the memory mapping itself; one cast or moved is read from the
        file a chunk at a time (`_read_into`), so its stored bytes never become resident in the process beside it."""
        whole = index is ...
        stored = (getattr(torch, _FLOAT_KINDS.get(self.view.get_dtype(), ""), None)
                  if whole and self.start is not None else None)
        cpu = device is None or torch.device(device).type == "cpu"
        if stored is not None and not (cpu and dtype in (None, stored)):
            out = torch.empty(self.view.get_shape(), dtype=dtype or stored, device=device or "cpu")
            _read_into(self.reader, self.start, out, stored)
            finite = all_finite(out)
        else:
            source = self._mapped(index)
            out = source.to(device=device, dtype=dtype)
            if whole and self.start is not None and out.data_ptr() == source.data_ptr():
                finite = _finite_in_file(self.reader, self.start, out)  # `out` is the mapping itself: left untouched
            else:
                finite = all_finite(out)
        if not finite:
            source = self._mapped(index)
            check_finite(source, self.file, self.key)
            raise InputError(f"{self.file}: {self.key} holds values up to {source.abs().max().item():.4g}, past "
                             f"{str(dtype).removeprefix('torch.')}'s largest ({torch.finfo(dtype).max:.4g}); load it "
                             f"in a wider dtype ({_wider(dtype)})")
        return out

    def _mapped(self, index) -> torch.Tensor:
        """`self[index]` as stored: the memory mapping itself (safetensors 0.8 and later) where it is whole."""
        try:  # safetensors before 0.8 refuses the Ellipsis: `[:]` where the tensor has rows
            return self.view[slice(None) if index is ... and self.view.get_shape() else index]
        except SafetensorError as e:
            raise CheckpointError(f"{self.file}: tensor {self.key} is corrupt ({e})") from None


def _wider(dtype: torch.dtype) -> str:
    """The float dtypes whose range is wider than `dtype`'s, for a message ("float32" past bfloat16's range)."""
    wider = [d for d in (torch.bfloat16, torch.float32, torch.float64) if torch.finfo(d).max > torch.finfo(dtype).max]
    return " or ".join(str(d).removeprefix("torch.") for d in wider) or "none holds it"


def check_finite(tensor: torch.Tensor, file: Path, key: str) -> None:
    """Refuse the weight `key` of `file` where it holds NaN or inf: a model loaded with it answers garbage."""
    if not all_finite(tensor):
        raise CheckpointError(f"{file}: {key} holds NaN or inf values; the checkpoint is broken (a diverged run or "
                              "a damaged file)")


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, in one pass without a copy: the min and the max are both finite exactly
    then (NaN carries through both, and unlike a sum they cannot overflow). One sync on CUDA."""
    if tensor.numel() == 0:
        return True
    if tensor.element_size() == 1:  # float8: torch has no aminmax (nor isfinite) for it; a bfloat16 copy holds it
        tensor = tensor.to(torch.bfloat16)
    return bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all())


def _finite_in_file(reader: Reader, start: int, tensor: torch.Tensor, chunk: int = 1 << 23) -> bool:
    """`all_finite` of the tensor whose data lie in `reader`'s file from byte `start`, read `chunk` bytes at a time
    with file reads: checking a memory-mapped tensor through its mapping makes every page of it resident in this
    process, so weights a run never touches (an embedding table's unused rows, a ViT in text-only chat) would
    count in its memory as if used."""
    return all(all_finite(piece) for _, piece in _file_pieces(reader, start, tensor.dtype, tensor.numel(), chunk))


def _read_into(reader: Reader, start: int, out: torch.Tensor, stored: torch.dtype, chunk: int = 1 << 23) -> None:
    """Fill the contiguous `out` (any dtype and device) with the tensor stored as `stored` in `reader`'s file from
    byte `start`, read `chunk` bytes at a time with file reads, each piece cast and moved on its own. Read through the
    memory mapping, the stored tensor's pages would stay resident in the process beside `out` until the file is
    closed: loading a bf16 checkpoint in fp32 would peak at 1.5 times the model's size, on a GPU at the whole
    checkpoint's size in host memory."""
    flat = out.view(-1)
    for done, piece in _file_pieces(reader, start, stored, out.numel(), chunk):
        flat[done:done + piece.numel()].copy_(piece)


def _file_pieces(reader: Reader, start: int, dtype: torch.dtype, count: int,
                 chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """The `count` values of `dtype` stored in `reader`'s file from byte `start`, as (offset, piece) of at most
    `chunk` bytes each; a piece lives in one buffer that the next overwrites."""
    size = dtype.itemsize
    chunk -= chunk % size
    left = count * size
    buffer = bytearray(min(chunk, left))
    done = 0
    while left:
        got = reader.read_at(memoryview(buffer)[: min(chunk, left)], start + done * size)
        if not got or got % size:
            raise CheckpointError(f"{reader.path}: ends inside its tensor data; the file is cut short")
        yield done, torch.frombuffer(buffer, dtype=dtype, count=got // size)
        done += got // size
        left -= got


def read_header(f: BinaryIO) -> dict | None:
    """The JSON header of the safetensors file open in `f` at its start (`f` is left where the tensor data
    begin), or None where it holds none: a size past safetensors' own limit, not JSON, not an object."""
    size = int.from_bytes(f.read(8), "little")
    if size > MAX_HEADER:
        return None
    try:
        header = json.loads(f.read(size))
    except ValueError:  # not JSON, or not UTF-8
        return None
    return header if isinstance(header, dict) else None


def data_starts(reader: Reader) -> dict[str, int]:
    """The byte of `reader`'s safetensors file where each tensor's data begin ({} where its header cannot be
    read: the tensors are then checked through their mapping)."""
    try:
        size = bytearray(8)
        reader.read_at(memoryview(size), 0)
        length = int.from_bytes(size, "little")
        if length > MAX_HEADER:  # before its buffer is made
            return {}
        start = bytearray(8 + length)  # the size and the header, read as `read_header` reads a file
        reader.read_at(memoryview(start), 0)
        header = read_header(io.BytesIO(start))  # a file cut short leaves zeros: not JSON
        return {key: len(start) + int(entry["data_offsets"][0]) for key, entry in (header or {}).items()
                if key != "__metadata__"}
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        return {}


def open_state_dict(
    folder: Path, expected: dict[str, torch.Size], optional: tuple[str, ...] = (), weights: Weights | None = None
) -> dict[str, LazyTensor]:
    """Exactly the `expected` keys (name -> shape) as `LazyTensor`s, checked before any tensor data is read.

    Keys in `optional` may be present or absent (a tied head written out by some tools). `weights`: the
    folder's, where the caller has opened them (`open_weights`).
    """
    weights = open_weights(folder) if weights is None else weights
    mapping, handles, readers = weights.files, weights.handles, weights.readers
    present = set(mapping)
    missing = sorted(set(expected) - present - set(optional))
    unexpected = sorted(present - set(expected) - set(optional))
    views, wrong, starts, float8 = {}, [], {}, []
    for key in sorted(present & set(expected)):
        try:
            view = handles[mapping[key]].get_slice(key)
            shape, kind = tuple(view.get_shape()), view.get_dtype()
        except SafetensorError as e:
            raise CheckpointError(f"{mapping[key]}: cannot read {key} ({e})") from None
        if shape != tuple(expected[key]):
            wrong.append(f"{key}: checkpoint {list(shape)} vs model {list(expected[key])}")
        elif kind not in _FLOAT_KINDS:
            wrong.append(f"{key}: checkpoint dtype {kind} in {mapping[key].name}, not floating point")
        elif kind.startswith("F8"):
            float8.append((key, _FLOAT_KINDS[kind]))
        if mapping[key] not in starts:
            starts[mapping[key]] = data_starts(readers[mapping[key]])
        views[key] = LazyTensor(readers[mapping[key]], key, view, starts[mapping[key]].get(key))
    if float8:
        key, dtype = float8[0]
        raise float8_error(mapping[key], key, dtype, len(float8) - 1)
    if missing or unexpected or wrong:
        raise CheckpointError(f"{folder}: the weights do not match config.json "
                              f"({mismatch_report(missing, unexpected, wrong)})")
    return {key: views[key] for key in expected if key in views}


def float8_error(file: Path, key: str, dtype: str, more: int = 0) -> CheckpointError:
    """The refusal of weight `key` of `file` stored as float8 (`more`: how many others are), a quantized
    checkpoint's (FP8) without the quantization_config that gives its scales (that one is refused by
    `ModelConfig`): cast to the model's dtype as stored, its values would be wrong."""
    others = f" (and {more} more float8 weight{'s' * (more > 1)})" if more else ""
    return CheckpointError(
        f"{file}: {key} is stored as {dtype}{others}, a quantized dtype, and config.json has no "
        "quantization_config giving its scales: cast as stored its values would be wrong; only unquantized "
        "weights (float32, bfloat16, float16) are read: use the unquantized release")


def read_state_dict(
    folder: Path,
    expected: dict[str, torch.Size],
    dtype: torch.dtype,
    device: torch.device | Callable[[str], torch.device],
    weights: Weights | None = None,
) -> dict[str, torch.Tensor]:
    """Read exactly the `expected` keys (name -> shape), checked before any tensor data is read.

    `device` is one device, or a function of the key (a device map). `weights` as for `open_state_dict`.
    """
    device_of = device if callable(device) else (lambda key: device)
    return {key: tensor.read(dtype=dtype, device=device_of(key))
            for key, tensor in open_state_dict(folder, expected, weights=weights).items()}


def parse_size(size: int | str) -> int:
    """"5GB", "500MB", "2GiB" or a byte count (at least 1)."""
    if isinstance(size, (bool, float)):
        raise InputError(f"max_shard_size {size!r} is a {type(size).__name__}; give a whole number of bytes or a "
                         "string such as '5GB' or '500MB'")
    if isinstance(size, int):
        number = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
        if not match:
            raise InputError(f"cannot read the size {size!r}; write e.g. '5GB' or '500MB'")
        unit = match[2] or "B"
        number = int(float(match[1]) * (1024 if "I" in unit else 1000) ** "BKMGT".index(unit[0]))
    if number < 1:
        raise InputError(f"the shard size {size!r} is not a positive size; write e.g. '5GB' or '500MB'")
    return number


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read from /proc where Linux shows it (setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:  # elsewhere: set and restore (the strictest mask in between), one thread at a time
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def honour_umask(path: str | Path) -> None:
    """Give `path` the mode a plain `open(path, "w")` would: 0666 less the umask (0644 as a rule).

    safetensors creates its files 0600, and copies keep their source's mode; other users (a vLLM
    server) then could not read what we wrote. Best effort: a file system that refuses chmod keeps the
    file as written.
    """
    try:
        os.chmod(path, 0o666 & ~_umask())
    except OSError:
        pass


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, with the file mode every other file we write gets."""
    save_file(tensors, str(path), metadata=metadata)
    honour_umask(path)


def copy_file(source: Path, target: Path) -> None:
    """Copy contents and times; the mode is the umask's (see `honour_umask`), not the source's."""
    shutil.copy2(source, target)
    honour_umask(target)


# What fsync of a folder gives on filesystems without that operation (CIFS/SMB, sshfs, some Ceph volumes):
# the files in it are synced already and nothing more can be asked for, so the save goes on.
FOLDER_FSYNC_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (its entries: a rename in it) where the filesystem can."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if not (e.errno in FOLDER_FSYNC_UNSUPPORTED and path.is_dir()):
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file, then every folder bottom-up, so the data is on disk before the rename."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def make_folder(folder: Path) -> None:
    """Create `folder` (and its parents) to save into; a failure (a parent that is a file, no permission) is
    a one-line `SaveError`, as a failed write is."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SaveError(folder, write_failure(e), "nothing was written") from None


@contextmanager
def save_lock(folder: Path) -> Iterator[None]:
    """Hold `folder` for one save: an exclusive flock on its `SAVE_LOCK` file, removed when the save ends.

    A second save into the folder meanwhile (another process, or another thread) is a `SaveError` naming
    the lock and its holder instead of files of two models interleaved. The kernel drops the lock of a
    process that dies, so the file a killed save leaves blocks nothing. On a filesystem without locks
    the save goes on unlocked.
    """
    import fcntl

    path = folder / SAVE_LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise SaveError(folder, write_failure(e), "nothing was written") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "its process unknown"
            os.close(fd)
            raise SaveError(folder, f"another save into it is running: {holder}, holding {path.name}",
                            "nothing was written") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in LOCKS_UNSUPPORTED:
                raise SaveError(folder, write_failure(e), "nothing was written") from None
            fd = None
            break
        try:  # locked; but a save that ended meanwhile may have removed the file: then lock the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    if fd is not None:
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock goes, so no save can take a file about to vanish
        if fd is not None:
            os.close(fd)


def save_state_dict(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str = "5GB",
                    texts: dict[str, str] | None = None, files: dict[str, Path] | None = None,
                    replaces: Iterable[str] = ()) -> None:
    """Write `state` as model.safetensors, or as numbered shards plus the index when it is too large,
    the text files `texts` (name -> content: config.json) and copies of `files` (name -> source file:
    the tokenizer) that must go in with the weights. The caller holds the folder's `save_lock`.

    Every file, the index included, is written under a temporary name first, synced to disk, and renamed
    into place once all are written, so a save that fails part way (a full disk) leaves the folder's earlier
    files as they were (and a crash leaves whole files, of one save or the other), and says so in a `SaveError`
    naming the folder and the cause. After the renames, weight files of an earlier save (model.safetensors,
    model-NNNNN-of-NNNNN.safetensors, the index and the shards it named) and the names in `replaces` (an earlier
    checkpoint's tokenizer and code) that this save did not write are removed; other files are left alone.
    Temporary files a killed save left go first.
    """
    limit = parse_size(max_shard_size)
    for old in folder.iterdir():
        if _is_temporary(old.name):
            old.unlink(missing_ok=True)
    replaces = [*replaces, *_indexed_shards(folder)]  # an earlier index's shards, whatever their names
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    stored: set[int] = set()
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in stored:  # a tied weight: safetensors wants its own copy
            tensor = tensor.clone()
        stored.add(tensor.untyped_storage().data_ptr())
        shards[-1][key] = tensor
        size += nbytes
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    temps: list[Path] = []
    metadata = save_metadata()
    try:
        for name, shard in zip(names, shards):
            temps.append(folder / f".{name}.tmp")
            save_tensors(shard, temps[-1], metadata=metadata)
        if len(shards) > 1:
            mapping = {key: name for name, shard in zip(names, shards) for key in shard}
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total, SAVE_ID: metadata[SAVE_ID]},
                     "weight_map": dict(sorted(mapping.items()))}
            names.append(INDEX_FILE)
            temps.append(folder / f".{INDEX_FILE}.tmp")
            temps[-1].write_text(json.dumps(index, indent=2) + "\n")
        for name, text in (texts or {}).items():
            names.append(name)
            temps.append(folder / f".{name}.tmp")
            temps[-1].write_text(text, encoding="utf-8")
        for name, source in (files or {}).items():
            names.append(name)
            temps.append(folder / f".{name}.tmp")
            copy_file(source, temps[-1])
        for temp in temps:  # on disk before the renames: a crash then leaves whole files, old or new
            fsync_path(temp)
    except BaseException as e:
        for temp in temps:
            temp.unlink(missing_ok=True)
        reason = write_failure(e)
        if reason is None:
            raise
        raise SaveError(folder, reason, "its earlier files are unchanged") from None
    for name, temp in zip(names, temps):
        os.replace(temp, folder / name)
    fsync_path(folder)
    replaced = set(replaces)
    for old in folder.iterdir():  # only names a save writes: other files (model-ema.safetensors) are the user's
        if old.name not in names and (old.name in (SINGLE_FILE, INDEX_FILE) or SHARD_NAME.fullmatch(old.name)
                                      or old.name in replaced):
            old.unlink(missing_ok=True)


def _indexes_single_file(index: Path) -> bool:
    """Whether the index names model.safetensors and nothing else (False where it cannot be read: `open_weights`
    then refuses the folder holding both)."""
    try:
        mapping = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return bool(mapping) and set(mapping.values()) == {SINGLE_FILE}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return False


def _indexed_shards(folder: Path) -> list[str]:
    """The shard files the index in `folder` names, when it names plain file names of the folder ending in
    .safetensors (another tool's save may number them otherwise: "model-0001-of-0002.safetensors"); none where
    there is no readable index."""
    try:
        mapping = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        names = set(mapping.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return sorted(name for name in names if isinstance(name, str) and name.endswith(".safetensors")
                  and Path(name).name == name and "\\" not in name and (folder / name).is_file())


def _is_temporary(name: str) -> bool:
    """A name `save_state_dict` writes first: ".model.safetensors.tmp", ".config.json.tmp", ..."""
    inner = name[1:-len(".tmp")] if name.startswith(".") and name.endswith(".tmp") else ""
    return (inner in (SINGLE_FILE, INDEX_FILE, "config.json", *COMPANION_FILES) or bool(SHARD_NAME.fullmatch(inner))
            or inner.endswith(".py"))


def write_failure(error: BaseException) -> str | None:
    """Why a write failed, in one line, for an OSError, a SafetensorError (safetensors' word for a full disk)
    or a `SaveError`; None for any other error."""
    if isinstance(error, SaveError):
        return error.reason
    if isinstance(error, (OSError, SafetensorError)):
        return " ".join(str(error).split())
    return None

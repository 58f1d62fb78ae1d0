"""What a run's reference cache and checkpoints were computed from, as digests a later run compares.

- `files_digest`: one sha256 over some files' names, sizes and contents (the model's weights,
  config and tokenizer files; hashing runs at about 1.7 GB/s on one core, about 5 s for the 8 GB of
  InternVL2.5-4B, which the model load has just read into the page cache), less the id each save
  stamps into its weight files and index (`checkpoint.SAVE_ID`): the same model saved again matches;
- `media_digest`: one sha256 over the images and videos the records name (a folder of frames by its
  frame files), each process reading its share of the files (one more read of the images, far less than
  the pass's forward);
- `share_digest`: which records (dataset index and file:line) one process reads in one epoch, in order.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

from internvl_mpo.checkpoint import INDEX_FILE, SAVE_ID, read_header
from internvl_mpo.errors import InputError
from internvl_mpo.processor.video import frame_files
from internvl_mpo.train.distributed import DistEnv, all_gather_lists, epoch_order, rank_share

# The files of a model folder that decide what it computes: weights, configs, tokenizer files.
MODEL_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".tiktoken")
TOKENIZER_SUFFIXES = (".json", ".txt", ".model", ".tiktoken")
# Media files per chunk of `media_digest` (the unit processes share out).
MEDIA_CHUNK = 1024


def file_sha256(path: str | Path, without_save_id: bool = False) -> str:
    """sha256 of a file's bytes; `without_save_id`: of a weight file or index (`INDEX_FILE`) that holds a
    `SAVE_ID`, its header or JSON with the id left out (sorted keys), then its tensor data."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        head = _without_save_id(f, Path(path).name) if without_save_id else None
        if head is None:
            f.seek(0)
        else:
            digest.update(head)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _without_save_id(f: BinaryIO, name: str) -> bytes | None:
    """The safetensors header (f then at the tensor data) or the index `f` holds, as JSON without its
    `SAVE_ID`; None when it holds none, or is not such a file."""
    if name == INDEX_FILE:
        key = "metadata"
        try:
            data = json.loads(f.read())
        except ValueError:  # not JSON, or not UTF-8
            return None
    elif name.endswith(".safetensors"):
        data, key = read_header(f), "__metadata__"
    else:
        return None
    metadata = data.get(key) if isinstance(data, dict) else None
    if not isinstance(metadata, dict) or SAVE_ID not in metadata:
        return None
    data[key] = {k: v for k, v in metadata.items() if k != SAVE_ID}
    return json.dumps(data, sort_keys=True).encode()


def folder_files(folder: str | Path, suffixes: Sequence[str]) -> list[Path]:
    """The regular files directly in `folder` whose names end with one of `suffixes`, sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(tuple(suffixes)))


def files_digest(paths: Iterable[str | Path]) -> str:
    """sha256 over each file's name (not its folder: a moved copy matches), size and sha256 without a save
    id (a file without one, an official checkpoint's, digests as before 2026-12-03)."""
    digest = hashlib.sha256()
    for path in paths:
        sha = file_sha256(path, without_save_id=True)
        digest.update(f"{Path(path).name}\t{os.path.getsize(path)}\t{sha}\n".encode())
    return digest.hexdigest()


def _media_entry(path: str) -> str:
    """A file's size and sha256; for a folder (a video's frames), a sha256 over the name, size and sha256 of
    each frame file `load_video` reads from it, in its order."""
    if os.path.isdir(path):
        frames = "".join(f"{p.name}\t{p.stat().st_size}\t{file_sha256(p)}\n" for p in frame_files(Path(path)))
        return f"frames\t{hashlib.sha256(frames.encode('utf-8', 'surrogateescape')).hexdigest()}"
    return f"{os.path.getsize(path)}\t{file_sha256(path)}"


def _media_digest(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        try:
            entry = _media_entry(path)
        except (OSError, InputError):  # missing, unreadable, s3:// or no frames: the record is bad to the pass too
            entry = "unreadable"
        digest.update(f"{path}\t{entry}\n".encode())
    return digest.hexdigest()


def media_digest(records: Sequence, env: DistEnv) -> str:
    """sha256 over every image and video path the records name, with its size and sha256 (a folder of frames:
    its frame files' names, sizes and sha256s; or "unreadable"). The sorted paths are hashed in chunks of
    `MEDIA_CHUNK`, each process taking every W-th chunk; the chunk digests are gathered (collective), so any
    process count gives the same digest."""
    paths = sorted({p for r in records for p in (*r.images, *([r.video] if r.video else []))})
    starts = range(0, len(paths), MEDIA_CHUNK)[env.rank :: env.world_size]
    chunks = sorted(all_gather_lists([(s, _media_digest(paths[s : s + MEDIA_CHUNK])) for s in starts], env))
    return hashlib.sha256("".join(digest for _, digest in chunks).encode()).hexdigest()


def share_digest(records: Sequence, epoch: int, seed: int, shuffle: bool, rank: int, world_size: int) -> str:
    """sha256 of the records process `rank` of `world_size` reads in `epoch`: index and file:line, in order."""
    share = rank_share(epoch_order(len(records), epoch, seed, shuffle), rank, world_size, epoch)
    return hashlib.sha256("".join(f"{i}\t{records[i].source}\n" for i in share).encode()).hexdigest()

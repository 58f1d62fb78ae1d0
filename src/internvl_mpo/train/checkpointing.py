"""Training checkpoints: official-layout weights plus the full training state, written atomically.

A checkpoint is a folder `checkpoint-<step:06d>/` in the run's output folder:

    model/                    config.json + safetensors in the official layout, tokenizer files
    optimizer.safetensors     every optimizer state tensor, keyed "<param name>::<state name>"
    optimizer.json            param groups (hyper-parameters and parameter names), non-tensor state
    extra.safetensors         LoRA adapters, when the run has them
    rank<r>.safetensors       that rank's RNG states (torch CPU, CUDA, numpy key array)
    rank<r>.json              that rank's data position, python/numpy RNG scalars
    trainer_state.json        step, BCO running mean, skip counts, settings (written last)

A running job also holds `.train.lock` in the output folder (`locks.lock_output`).

The JSON is strict: a NaN or infinite number (the BCO std after one update) is written as null.

Only safetensors and JSON are written; nothing is pickled. The folder is first written as
`.tmp-checkpoint-<step>` inside the output folder, every file and folder is fsynced (a folder only
where the filesystem can: CIFS, sshfs and some Ceph volumes cannot), then the folder is renamed into
place, so a save that dies halfway leaves the last good checkpoint untouched and a `.tmp-*` folder
that `latest_checkpoint` ignores (and the next save of that step replaces).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from internvl_mpo.checkpoint import fsync_path, fsync_tree, save_tensors, write_failure
from internvl_mpo.errors import CheckpointError, SaveError
from internvl_mpo.jsonl import read_json_object
from internvl_mpo.model import InternVL
from internvl_mpo.train.distributed import DistEnv, ranks_together

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
STATE_FILE = "trainer_state.json"
EXTRA_FILE = "extra.safetensors"
TMP_PREFIX = ".tmp-"
KEY_SEP = "::"


def checkpoint_dir(output: Path, step: int) -> Path:
    return Path(output) / f"checkpoint-{step:06d}"


def checkpoints(output: Path, complete: bool = True) -> list[Path]:
    """The complete checkpoints in `output`, oldest step first (folders being written are ignored); with
    `complete` False, the `checkpoint-<step>` folders without their trainer_state.json instead (a partial copy:
    a save writes a `.tmp-` folder and renames it whole)."""
    output = Path(output)
    if not output.is_dir():
        return []
    found = []
    for path in output.iterdir():
        match = CHECKPOINT_RE.fullmatch(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file() == complete:
            found.append((int(match[1]), path))
    return [path for _, path in sorted(found)]


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_RE.fullmatch(path.name)[1])


def latest_checkpoint(output: Path) -> Path | None:
    """The complete checkpoint with the highest step."""
    found = checkpoints(output)
    return found[-1] if found else None


def prune_checkpoints(output: Path, keep: int) -> None:
    """Delete all but the `keep` (>= 1) newest complete checkpoints, as the HF Trainer's save_total_limit.
    Each is renamed out of the way first, so a kill midway leaves a `.tmp-` folder, never half a checkpoint;
    such leftovers (and those of a killed save) go too: called between saves, no `.tmp-checkpoint-*` is live."""
    path = Path(output)
    try:
        for path in Path(output).glob(TMP_PREFIX + "checkpoint-*"):
            shutil.rmtree(path)
        for path in checkpoints(output)[:-keep]:
            os.replace(path, temp_dir(path))
            shutil.rmtree(temp_dir(path))
    except OSError as e:  # a folder made read-only, say: one line, and the newest checkpoint is whole
        raise CheckpointError(f"{path}: cannot delete it to keep --save-total-limit {keep} ({write_failure(e)});"
                              f" {latest_checkpoint(output)} is saved, --resume goes on from it") from None


# ----------------------------------------------------------------------------- files


def strict_json(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None (JSON null): strict readers (jq,
    JavaScript, Go) refuse the NaN and Infinity that Python's json writes by default."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(strict_json(data), indent=2, sort_keys=True, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file, which holds one object; a missing, unreadable or damaged one is a CheckpointError."""
    return read_json_object(path, CheckpointError, "missing from the checkpoint", "a checkpoint's state")


MAX_COUNT = 2**53  # past any step, epoch or record count a run reaches; torch's seeds (seed + epoch) stop at 2**64


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _damaged(path: Path, what: str, value: Any, problem: str = "") -> CheckpointError:
    problem = problem or f"{what} is {value!r:.80}"
    return CheckpointError(f"{path}: {problem}; the file is damaged (edited by hand, or not one this program"
                           " wrote): resume from another checkpoint, or start a new run")


def read_trainer_state(path: Path) -> dict:
    """The checkpoint's trainer_state.json, its fields checked (a CheckpointError names the first damaged one)."""
    file = path / STATE_FILE
    state = read_json(file)
    if not _is_count(state.get("step")):
        raise _damaged(file, "step", state.get("step"))
    for key in ("total_steps", "world_size", "records"):
        if key in state and not _is_count(state[key]):
            raise _damaged(file, key, state[key])
    for key, nullable in (("config", False), ("skipped", False), ("running_mean", True), ("model_fingerprint", True)):
        if key in state and not isinstance(state[key], dict) and not (nullable and state[key] is None):
            raise _damaged(file, key, state[key])
    if not all(_is_count(n) for n in state.get("skipped", {}).values()):
        raise _damaged(file, "skipped", state["skipped"])
    if not all(isinstance(v, str) for v in (state.get("model_fingerprint") or {}).values()):
        raise _damaged(file, "model_fingerprint", state["model_fingerprint"])
    prints = state.get("data_fingerprint")
    if prints is not None and not (isinstance(prints, list) and prints
                                   and all(isinstance(p, dict) and isinstance(p.get("file"), str) for p in prints)):
        raise _damaged(file, "data_fingerprint", prints)
    return state


def read_rank_state(path: Path, rank: int) -> dict:
    """rank<r>.json: the process's data position (checked here) and RNG scalars (checked as they are set)."""
    file = path / f"rank{rank}.json"
    state = read_json(file)
    data = state.get("data")
    if not isinstance(data, dict):
        raise _damaged(file, "data", data)
    for key in ("epoch", "cursor"):
        if not _is_count(data.get(key)):
            raise _damaged(file, f"data.{key}", data.get(key))
    if not (isinstance(data.get("bad", []), list) and all(_is_count(i) for i in data.get("bad", []))):
        raise _damaged(file, "data.bad", data["bad"])
    if not isinstance(data.get("share_sha256", ""), str):
        raise _damaged(file, "data.share_sha256", data["share_sha256"])
    if not isinstance(state.get("rng"), dict):
        raise _damaged(file, "rng", state.get("rng"))
    return state


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_tensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    try:
        return load_file(str(path))
    except SafetensorError as e:  # a truncated copy, say
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def temp_dir(final: Path) -> Path:
    return final.parent / (TMP_PREFIX + final.name)


def publish(tmp: Path, final: Path) -> None:
    """Make `tmp` appear as `final` in one rename (an existing `final` is replaced). A failure (a full disk, a folder
    made read-only) is a `SaveError` naming `final`: `tmp` is removed and an existing `final` stays as it was."""
    old = final.parent / (TMP_PREFIX + final.name + ".old")
    try:
        with saving(final):
            fsync_tree(tmp)
            if final.exists() and not final.is_dir():  # a file in the way, not a folder to replace: one line too
                raise SaveError(final, "a file, not a folder, is in the way", "nothing there was replaced")
            shutil.rmtree(old, ignore_errors=True)  # also what a publish killed between its renames left
            if old.is_file() or old.is_symlink():  # rmtree leaves a file of that name
                old.unlink()
            if final.exists():
                os.replace(final, old)
                try:
                    os.replace(tmp, final)
                except OSError:
                    os.replace(old, final)
                    raise
            else:
                os.replace(tmp, final)
    except SaveError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with saving(final, "its files are in place but may not be on the disk yet"):
        shutil.rmtree(old, ignore_errors=True)
        fsync_path(final.parent)


@contextlib.contextmanager
def saving(final: Path, outcome: str = "nothing there was replaced") -> Iterator[None]:
    """A full disk or another OS error in the block (the model's save inside included) is a `SaveError`
    naming `final` and `outcome`, one line."""
    try:
        yield
    except BaseException as e:
        reason = write_failure(e)
        if reason is None:
            raise
        raise SaveError(final, reason, outcome) from None


def write_temp(tmp: Path, final: Path, write: Callable[..., None], *args: Any) -> None:
    """Make the temporary folder `tmp` of `final` (an earlier one removed) and `write(*args)` into it;
    a failure removes `tmp`, and is a `SaveError` naming `final` (`saving`)."""
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with saving(final):
            tmp.mkdir(parents=True)
            write(*args)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_folder(final: Path, write: Callable[[Path], None]) -> Path:
    """Single-process helper: `write(tmp)` fills a temporary folder, which is then published."""
    tmp = temp_dir(final)
    write_temp(tmp, final, write, tmp)
    publish(tmp, final)
    return final


# ----------------------------------------------------------------------------- optimizer


def _json_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    return value


def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A name-keyed optimizer state dict (torch.distributed.checkpoint.state_dict layout) -> tensors, JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}{KEY_SEP}{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{k: _json_value(v) for k, v in group.items()} for group in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict, file: Path) -> dict:
    """The optimizer state dict from its tensors and the JSON `file`'s `meta` (its layout checked)."""
    groups, scalars = meta.get("param_groups"), meta.get("scalars", {})
    if not (isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                             and all(isinstance(n, str) for n in g["params"]) for g in groups)):
        raise _damaged(file, "param_groups", groups)
    if not (isinstance(scalars, dict) and all(isinstance(v, dict) for v in scalars.values())):
        raise _damaged(file, "scalars", scalars)
    state: dict[str, dict[str, Any]] = {}
    for flat, value in tensors.items():
        name, _, key = flat.rpartition(KEY_SEP)
        state.setdefault(name, {})[key] = value
    for name, entries in scalars.items():
        state.setdefault(name, {}).update(entries)
    groups = [{**g, "betas": tuple(g["betas"])} if isinstance(g.get("betas"), list) else dict(g) for g in groups]
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------- RNG


def rng_state(device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """torch (CPU and this rank's CUDA device), numpy and python RNG states as tensors + JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, internal, gauss = random.getstate()
    meta = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss": gauss},
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict, device: torch.device) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"], device)
    n = meta["numpy"]
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# ----------------------------------------------------------------------------- model weights


def full_model_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy's whole state dict on CPU, names relative to the InternVL (rank 0 only under FSDP2).

    `module` is the wrapper whose `model` attribute is the InternVL, itself possibly inside DDP or
    sharded by FSDP2; torch.distributed.checkpoint gathers and un-prefixes it.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in state.items()}


def export_model(state: dict[str, torch.Tensor], like: InternVL, folder: Path) -> None:
    """An official-layout model folder from a plain state dict, written by `InternVL.save_pretrained`.

    The tensors are attached (not copied) to a meta-built model with `like`'s config, image token
    and source and tokenizer folders, whose files are copied along.
    """
    tied = like.config.llm.tie_word_embeddings
    with torch.device("meta"):
        plain = InternVL(like.config, image_token_id=like.image_token_id)
    if tied:
        state = {k: v for k, v in state.items() if k != "language_model.lm_head.weight"}
    plain.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        plain.language_model.lm_head.weight = plain.language_model.model.embed_tokens.weight
    plain.source_dir, plain.tokenizer_dir = like.source_dir, like.tokenizer_dir
    plain.save_pretrained(folder)


def open_model_weights(path: Path, model: InternVL, skip: set[str] = frozenset()) -> dict:
    """A checkpoint's official weights as `LazyTensor`s (nothing read yet), except the keys in `skip`."""
    from internvl_mpo import checkpoint as weights_io

    expected = {k: v for k, v in model.expected_keys().items() if k not in skip}
    head = "language_model.lm_head.weight"
    optional = (*skip, head) if model.config.llm.tie_word_embeddings else tuple(skip)
    state = weights_io.open_state_dict(path / "model", expected, optional=optional)
    if model.config.llm.tie_word_embeddings:  # saved untied (a copy of the embeddings); ours stays tied
        state.pop(head, None)
    return state


def load_model_weights(path: Path, model: InternVL, skip: set[str] = frozenset()) -> None:
    """A checkpoint's official weights into a plain model, in float32, except the keys in `skip`."""
    state = {k: v[...].to(model.device, torch.float32) for k, v in open_model_weights(path, model, skip).items()}
    model.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------- whole checkpoints


def _write_weights_and_optimizer(tmp: Path, state: dict[str, torch.Tensor], optim_state: dict,
                                 write_weights: Callable[[dict[str, torch.Tensor], Path], None]) -> None:
    write_weights(state, tmp)
    tensors, meta = flatten_optimizer_state(optim_state)
    write_tensors(tmp / "optimizer.safetensors", tensors)
    write_json(tmp / "optimizer.json", meta)


def save_checkpoint(
    final: Path,
    env: DistEnv,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    write_weights: Callable[[dict[str, torch.Tensor], Path], None],
    trainer_state: dict,
    rank_state: dict,
) -> Path:
    """Write a checkpoint folder atomically. Every rank calls this (the state gathers are collective).

    Rank 0 writes the weights (`write_weights(full state dict, folder)`), the optimizer and
    `trainer_state`; every rank writes its RNG states and `rank_state`; rank 0 then publishes.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    tmp = temp_dir(final)
    state = full_model_state(module)
    optim_state = get_optimizer_state_dict(
        module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    with ranks_together(env):  # a failed save stops every rank, not process 0 alone
        if env.is_main:
            write_temp(tmp, final, _write_weights_and_optimizer, tmp, state, optim_state, write_weights)
    del state, optim_state
    try:
        with ranks_together(env), saving(final):
            rng_tensors, rng_meta = rng_state(env.device)
            write_tensors(tmp / f"rank{env.rank}.safetensors", rng_tensors)
            write_json(tmp / f"rank{env.rank}.json", {**rank_state, "rng": rng_meta})
        with ranks_together(env):
            if env.is_main:
                with saving(final):
                    write_json(tmp / STATE_FILE, trainer_state)
                publish(tmp, final)
    except BaseException:  # every rank is past its writes: no half-written copy of the model is left on the disk
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_training_state(
    path: Path, env: DistEnv, module: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict, dict]:
    """Load the optimizer and this rank's RNG states; returns (trainer_state, this rank's state)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    state = read_trainer_state(path)
    meta = read_json(path / "optimizer.json")
    optim = unflatten_optimizer_state(read_tensors(path / "optimizer.safetensors"), meta, path / "optimizer.json")
    # Not strict: a trainable parameter that never had a gradient (the vision tower of text-only data) has no
    # AdamW state in the checkpoint, and has none in the run that wrote it either.
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_optimizer_state_dict(module, optimizer, optim, options=options)
    with ranks_together(env):  # files of this rank's own: one that is missing or cut short stops every rank
        rank_state = read_rank_state(path, env.rank)
        tensors = read_tensors(path / f"rank{env.rank}.safetensors")
        try:  # numpy's and python's setters check the values they are given
            set_rng_state(tensors, rank_state["rng"], env.device)
        except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as e:  # -1 or 2**70: OverflowError
            raise _damaged(path / f"rank{env.rank}.json", "rng", None, f"its RNG state is refused ({e})") from None
    return state, rank_state

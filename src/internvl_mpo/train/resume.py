"""Saving a run and resuming it: the checks on the output folder, the checkpoints a run writes (settings,
fingerprints of its data and model files, the data position), the checks that refuse a resume whose settings,
data, model files or records read differ from its checkpoint's, and the state a resume loads back (with the
metrics lines it keeps: `rewrite_metrics`)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from internvl_mpo.checkpoint import fsync_path
from internvl_mpo.config import ModelConfig
from internvl_mpo.errors import CheckpointError, ConfigError, ResumeSettingsError
from internvl_mpo.model import InternVL
from internvl_mpo.train import checkpointing as ckpt
from internvl_mpo.train.distributed import DistEnv, ranks_together
from internvl_mpo.train.fingerprints import MODEL_SUFFIXES, TOKENIZER_SUFFIXES, file_sha256, files_digest, folder_files
from internvl_mpo.train.lora import lora_state, lora_target_names, merge_lora_state
from internvl_mpo.train.losses import RunningMean
from internvl_mpo.train.mmpr import load_meta
from internvl_mpo.train.settings import LOSS_WEIGHT_KEYS, MODE_WEIGHTS, TrainConfig, flag
from internvl_mpo.train.stream import SampleStream

METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"

# Settings that must not change between a checkpoint and its resumption (data order and which
# parameters are trained and how).
RESUME_KEYS = ("mode", "data", "batch_size", "grad_accum", "seed", "shuffle", "freeze_vision", "freeze_projector",
               "freeze_llm", "lora_rank", "lora_alpha", "lora_vision")
# Nor may the objective, the shaping of the examples, or the optimizer and LR-schedule settings: torch's
# `load_state_dict` would silently put the checkpoint's betas, eps and weight decay back, and a new lr or
# warmup would bend the schedule mid-run. A checkpoint whose config lacks one of these keys is not checked
# on it (unknown). Free to change on resume: save_every, save_total_limit, output, progress, num_workers, device, precision,
# grad_checkpointing, skip_bad and max_pixels (to get past a record that stopped the run), and the paths of the model,
# tokenizer and images (a moved folder).
RUN_RESUME_KEYS = ("beta", "pref_weight", "quality_weight", "gen_weight", "label_smoothing", "rejected_span",
                   "max_seq_length", "max_dynamic_patch", "video_frames", "drop_path_rate",
                   "lr", "warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "max_grad_norm")


def effective_setting(config: dict, key: str):
    """A recorded or given setting as the run uses it: a loss weight left out is its mode's
    (`MODE_WEIGHTS`), a LoRA alpha left out is 2 x rank; so a resume compares values, not spellings."""
    value = config.get(key)
    if value is None and key in LOSS_WEIGHT_KEYS and config.get("mode") in MODE_WEIGHTS:
        return MODE_WEIGHTS[config["mode"]][LOSS_WEIGHT_KEYS.index(key)]
    if value is None and key == "lora_alpha" and config.get("lora_rank"):
        return 2.0 * config["lora_rank"]
    return value


def dataset_tiles(cfg: TrainConfig, flag: int | None, model: ModelConfig) -> int | dict[str, int]:
    """The tiles per image a run uses with --max-dynamic-patch `flag` (as `stream.build_dataset` and
    `data.load_media`): 1 when the model config's dynamic_image_size is off (whatever the flag or meta.json say),
    else the flag for every dataset, else each meta.json dataset's own max_dynamic_patch, else the model config's;
    one number when every dataset uses the same."""
    if not model.dynamic_image_size:
        return 1
    if flag is not None or (cfg.mode == "sft" and cfg.single_jsonl):
        return model.max_dynamic_patch if flag is None else flag
    tiles = {spec.name: spec.max_dynamic_patch or model.max_dynamic_patch for spec in load_meta(cfg.data)}
    return tiles.popitem()[1] if len(set(tiles.values())) == 1 else tiles


def official_state(state: dict[str, torch.Tensor], cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The policy's state dict in official keys: LoRA adapters merged into their base weights."""
    return merge_lora_state(state, cfg.lora_scale) if cfg.lora_rank else state


def _weights_writer(cfg: TrainConfig, policy: InternVL) -> Callable[[dict[str, torch.Tensor], Path], None]:
    """Writes model/ in the official layout (LoRA merged) and, with LoRA, the adapters as extra tensors."""

    def write(state: dict[str, torch.Tensor], folder: Path) -> None:
        ckpt.export_model(official_state(state, cfg), policy, folder / "model")
        if cfg.lora_rank:
            ckpt.write_tensors(folder / ckpt.EXTRA_FILE, lora_state(state))

    return write


def save_checkpoint(
    cfg: TrainConfig,
    env: DistEnv,
    step: int,
    module: nn.Module,
    policy: InternVL,
    optimizer: torch.optim.Optimizer,
    running: RunningMean | None,
    stream: SampleStream,
    total_steps: int,
    fingerprint: list[dict] | None = None,
    model_print: dict | None = None,
) -> Path:
    trainer_state = {
        "step": step,
        "total_steps": total_steps,
        "data_fingerprint": fingerprint,
        "model_fingerprint": model_print,
        "records": len(stream.dataset),
        "world_size": env.world_size,
        "running_mean": running.state_dict() if running is not None else None,
        "skipped": stream.report.counts,
        "config": dataclasses.asdict(cfg),
    }
    metrics = Path(cfg.output) / METRICS_FILE
    with ranks_together(env), ckpt.saving(metrics):  # the rows of the steps saved reach the disk before the checkpoint
        if env.is_main and metrics.is_file():
            fsync_path(metrics)
    saved = ckpt.save_checkpoint(
        ckpt.checkpoint_dir(Path(cfg.output), step), env, module, optimizer, _weights_writer(cfg, policy),
        trainer_state, {"data": stream.state()},
    )
    with ranks_together(env):
        if cfg.save_total_limit and env.is_main:
            ckpt.prune_checkpoints(Path(cfg.output), cfg.save_total_limit)
    return saved


def resume_weights(path: Path, policy: InternVL, cfg: TrainConfig) -> None:
    """Checkpoint weights into the plain policy; with LoRA, the adapted linears keep their base weights."""
    ckpt.load_model_weights(path, policy, skip=_lora_base_keys(policy, cfg))


def resumed_weights(path: Path, policy: InternVL, cfg: TrainConfig) -> dict:
    """`resume_weights` for a meta-built policy (FSDP2): the checkpoint's weights as `LazyTensor`s."""
    return ckpt.open_model_weights(path, policy, skip=_lora_base_keys(policy, cfg))


def _lora_base_keys(policy: InternVL, cfg: TrainConfig) -> set[str]:
    lora_names = lora_target_names(policy, vision=cfg.lora_vision) if cfg.lora_rank else []
    return {n + ".weight" for n in lora_names}


def data_files(cfg: TrainConfig) -> list[str]:
    """The files a run reads its records from: the SFT .jsonl, or meta.json and its annotations."""
    if cfg.mode == "sft" and cfg.single_jsonl:
        return [cfg.data]
    return [cfg.data, *(spec.annotation for spec in load_meta(cfg.data))]


def data_fingerprint(cfg: TrainConfig) -> list[dict]:
    """Size and sha256 of every data file, so that a resume can refuse changed data (images are not read).
    A file is named by its resolved path: the same file through a symlink is the same data, a copy is not."""
    return [{"file": os.path.realpath(name), "size": os.path.getsize(name), "sha256": file_sha256(name)}
            for name in data_files(cfg)]


def model_fingerprint(cfg: TrainConfig, model: InternVL) -> dict[str, str]:
    """Digests of the files the initial model (the policy's start and the reference) is built from:
    its folder's weights, configs and tokenizer files (or --init-from-config's file), and --tokenizer's."""
    files = [cfg.init_from_config] if cfg.init_from_config is not None else folder_files(model.source_dir, MODEL_SUFFIXES)
    tokenizer = folder_files(cfg.tokenizer or model.source_dir, TOKENIZER_SUFFIXES)
    return {"model": files_digest(files), "tokenizer": files_digest(tokenizer)}


def check_output(output: Path, resume: bool) -> None:
    """ConfigError when the run would overwrite an earlier run's checkpoints or results: without
    --resume, a folder holding any of them; with --resume, a finished run's final/ and no checkpoint
    (with neither, --resume starts from the beginning, so one command line serves a job that may be
    preempted before its first checkpoint). Also when the folder cannot be made: it or a parent is a file."""
    existing = next((p for p in (output, *output.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"--output {output}: {existing} is a file, not a folder")
    checkpoint = ckpt.latest_checkpoint(output)
    if checkpoint is not None:
        if not resume:
            raise ConfigError(f"{output} already holds {checkpoint.name} of an earlier run: pass --resume to"
                              " continue that run, or choose another --output")
    elif (output / FINAL_DIR).exists():
        raise ConfigError(f"{output} already holds the {FINAL_DIR}/ of a finished run (and no checkpoint to"
                          " resume from): choose another --output")
    elif (output / METRICS_FILE).exists() and not resume:
        raise ConfigError(f"{output} already holds {METRICS_FILE} of an earlier run that saved no checkpoint:"
                          " pass --resume to start it over there, or choose another --output")


def _same_file(a: str | None, b: str) -> bool:
    """Whether two spellings of --data (relative and absolute, say) name one existing file."""
    try:
        return a is not None and os.path.samefile(a, b)
    except OSError:
        return False


def check_resume_settings(
    path: Path, cfg: TrainConfig, env: DistEnv, total_steps: int, fingerprint: list[dict] | None = None,
    model_print: dict | None = None, stream: SampleStream | None = None, model: ModelConfig | None = None,
) -> None:
    """ResumeSettingsError naming every setting that differs from the checkpoint's (before anything is loaded).

    Compared too, where the checkpoint recorded them: the data files' contents, the model's files (the
    reference model is rebuilt from --model), and the records each process reads from its position
    on (`stream`), which a change in how records are selected would alter even with the same files and
    settings. Checkpoints written before the data fingerprint was recorded are compared by the --data path only.
    ConfigError when the run finished after this checkpoint (its final/ is there).
    """
    state = ckpt.read_trainer_state(path)
    saved = state.get("config", {})
    saved_print = state.get("data_fingerprint")
    if saved_print is not None:  # recorded as spelled before 2026-12-03: through a symlink, the link's own path
        saved_print = [{**p, "file": os.path.realpath(p["file"])} for p in saved_print]
    # a relative --data named a file from the checkpoint run's folder: the fingerprint has its absolute path
    saved_data = saved_print[0]["file"] if saved_print else saved.get("data")
    same_data = saved.get("data") == cfg.data or _same_file(saved_data, cfg.data)
    keys = [*RESUME_KEYS, *(k for k in RUN_RESUME_KEYS if k in saved)]
    now = dataclasses.asdict(cfg)
    values = {k: (effective_setting(saved, k), effective_setting(now, k)) for k in keys}
    for frozen, adapted in (("freeze_vision", "lora_vision"), ("freeze_llm", "lora_rank")):
        if saved.get(adapted) and now.get(adapted):  # LoRA froze that tower in both runs, flag or not (`policy.freeze`)
            del values[frozen]
    if model is not None and "max_dynamic_patch" in values:  # the tiles per image the runs use (the model's config)
        values["max_dynamic_patch"] = tuple(dataset_tiles(cfg, v, model) for v in values["max_dynamic_patch"])
    changed = [f"{k if k == 'mode' else flag(k)} (checkpoint {then}, now {new})" for k, (then, new) in values.items()
               if not (same_data if k == "data" else then == new)]
    if saved_print is not None and fingerprint is not None and saved_print != fingerprint and same_data:
        files = [p["file"] for p in saved_print + fingerprint if (p in saved_print) != (p in fingerprint)]
        changed.append(f"data (files changed since the checkpoint: {', '.join(dict.fromkeys(files))})")
    saved_model = state.get("model_fingerprint")
    if saved_model is not None and model_print is not None and saved_model != model_print:
        which = " and ".join(k for k in model_print if saved_model.get(k) != model_print[k])
        changed.append(f"{which} files (not the ones the checkpoint's run started from; the reference model and"
                       " the tokenizer come from --model and --tokenizer)")
    if state.get("world_size") != env.world_size:
        changed.append(f"world_size (checkpoint {state.get('world_size')}, now {env.world_size})")
    elif stream is not None and not changed:
        changed += _selection_changes(path, cfg, env, state, stream)
    if state.get("total_steps") != total_steps:
        changed.append(f"total steps (--epochs / --max-steps; checkpoint {state.get('total_steps')},"
                       f" now {total_steps})")
    if changed:
        raise ResumeSettingsError(f"{path}: cannot resume, these settings differ from the checkpoint: "
                                  f"{', '.join(changed)}")
    # final/ is written (atomically) only at the end of a run: beside an earlier checkpoint, that run went on past it
    step = state["step"]
    if step < total_steps and (path.parent / FINAL_DIR).exists():
        raise ConfigError(f"{path.parent} holds the {FINAL_DIR}/ of the finished run, written after {path.name} (step"
                          f" {step} of {total_steps}): resuming would train its last steps again and overwrite it;"
                          f" choose another --output (or delete {FINAL_DIR}/ to train them again)")


def _selection_changes(path: Path, cfg: TrainConfig, env: DistEnv, state: dict, stream: SampleStream) -> list[str]:
    """What differs in the records the processes would read from the checkpoint's positions (every rank
    reads every rank's file, so all reach the same decision). A checkpoint that did not record them
    (before 2026-12-03) is refused only where the selection changed since: a process count that does
    not divide the records (each share was cut to records // processes before 2026-12-02) and an SFT
    meta.json with a repeat_time below 1 (a random sample before 2026-12-02, the first lines since)."""
    n = len(stream.dataset)
    positions = [ckpt.read_rank_state(path, r)["data"] for r in range(env.world_size)]
    if all("share_sha256" in p for p in positions):
        ranks = [r for r, p in enumerate(positions) if p["share_sha256"] != stream.share_sha256(p["epoch"], r)]
        if not ranks:
            return []
        counts = f"{state.get('records')} records then, {n} now" if state.get("records") != n else f"{n} records"
        return [f"the records read (process {ranks[0]} would read other records than the checkpoint's run from its"
                f" position on: {counts}; the data, or how records are selected from it, changed)"]
    old = []
    if env.world_size > 1 and n % env.world_size:
        old.append(f"{env.world_size} processes do not divide the {n} records")
    if cfg.mode == "sft" and not cfg.single_jsonl and any(s.repeat_time < 1 for s in load_meta(cfg.data)):
        old.append("a dataset's repeat_time is below 1")
    if not old:
        return []
    return [f"the records read (the checkpoint does not record them, and {' and '.join(old)}: versions before"
            " 2026-12-02 read other records there; resume with the version that wrote it, or start a new run)"]


def resume_training_state(
    path: Path,
    env: DistEnv,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    running: RunningMean | None,
    stream: SampleStream,
) -> int:
    """Optimizer, RNG, BCO running mean and data position from a checkpoint; returns its step.

    The optimizer's moments and step counts come from the checkpoint, its hyper-parameters stay this
    run's (`load_state_dict` would put the checkpoint's back; `check_resume_settings` has refused any
    recorded difference, so this matters only for a checkpoint that did not record one).
    """
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    state, rank_state = ckpt.load_training_state(path, env, module, optimizer)
    for group, own in zip(optimizer.param_groups, hyper):
        group.update(own)
    if running is not None and state.get("running_mean") is not None:
        try:
            running.load_state_dict(state["running_mean"])
        except ValueError as e:
            raise CheckpointError(f"{path / ckpt.STATE_FILE}: {e}") from None
    stream.report.counts.update(state.get("skipped", {}))
    stream.restore(rank_state["data"])
    return state["step"]


def rewrite_metrics(path: Path, last_step: int) -> int:
    """Drop metric lines past the resumed step (a killed run may have logged steps it never saved) and
    lines that do not parse (a kill during the append leaves a half-written last line). Returns the samples
    the kept steps counted as cut to --max-seq-length (their `truncated`)."""
    if not path.is_file():
        return 0
    kept, cut = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):  # LF only, as `read_metrics`
        try:  # a line that is no metrics row (damaged, or edited by hand) is dropped as a half-written one is
            row = json.loads(line)
            if row["step"] <= last_step:
                cut += int(row.get("truncated", 0))  # absent in the lines of versions before it was counted
                kept.append(line)
        except (ValueError, RecursionError, KeyError, TypeError, OverflowError):
            continue
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    fsync_path(tmp)  # a crash after the rename leaves these rows, not an empty file
    os.replace(tmp, path)
    return cut

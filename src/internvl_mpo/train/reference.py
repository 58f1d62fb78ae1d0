"""Reference log-probs computed once before training (`--precompute-ref`): one pass of the frozen initial model
over the data, cached in the output folder, and the check that keeps a run on augmented data inside the epoch
that pass saw."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from internvl_mpo.errors import CheckpointError, ConfigError, InputError
from internvl_mpo.train import checkpointing as ckpt
from internvl_mpo.train.data import BadExample, PairDataset, collate_pairs
from internvl_mpo.train.distributed import DistEnv, all_reduce_sum, epoch_order, print0, rank_share, ranks_together
from internvl_mpo.train.fingerprints import media_digest
from internvl_mpo.train.policy import SequenceLogps
from internvl_mpo.train.settings import TrainConfig
from internvl_mpo.train.stopping import stop_if_requested

REF_FILE = "ref_logps.safetensors"


def _ref_fingerprint(cfg: TrainConfig, env: DistEnv, dataset, data_print: list[dict], model_print: dict,
                     tiles: int | dict[str, int]) -> dict:
    return {
        **model_print,  # the reference's weights, config and tokenizer files (names, sizes, sha256)
        "data": os.path.realpath(cfg.data),  # as a resume knows it: the same file through a symlink is the same data
        "data_files": data_print,  # size and sha256: an edited annotation keeps its records and file:line sources
        "media": media_digest(dataset.records, env),  # an image edited in place keeps its path
        "records": len(dataset),
        "sources": [str(r.source) for r in dataset.records[:1000]],
        "max_seq_length": cfg.max_seq_length,
        "max_dynamic_patch": tiles,  # as the run uses them: the flag spelling out the value it had anyway is no change
        "video_frames": cfg.video_frames,
        "seed": cfg.seed,
        "rejected_span": cfg.rejected_span,
        # tiles of augmented datasets depend on the seed (above) and on which datasets augment
        **({"data_augment": sorted(dataset.augment_datasets)} if dataset.augments else {}),
        # which records the pass could encode (a record over the limit has no reference log-probs)
        **({"max_pixels": cfg.max_pixels} if cfg.max_pixels is not None else {}),
    }


def precompute_reference(
    cfg: TrainConfig, env: DistEnv, module: SequenceLogps, dataset: PairDataset, pad_id: int, autocast,
    data_print: list[dict], model_print: dict, lockstep: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference (chosen, rejected) log-probs of every record, computed once and cached in the output.

    Stored as `ref_logps.safetensors` (chosen, rejected, valid) + `ref_logps.json` (what they were
    computed from: the model's and tokenizer's files (`model_print`), the data files (`data_print`),
    the images and videos, the example settings, the weights' dtype and autocast); a cache whose
    description matches the run is reused, any other is computed again, with a note naming what
    differs. Records are encoded as in the first epoch (augmented tiles included;
    `check_reference_epoch` keeps the run inside it). Returns (chosen, rejected, valid).

    `lockstep` (an FSDP2-sharded `module`, which needs every rank in each forward's collectives): every
    rank runs as many forwards, one on a row of padding where it has no records left.
    """
    output = Path(cfg.output)
    path, meta_path = output / REF_FILE, output / (Path(REF_FILE).stem + ".json")
    with autocast():  # the weights' dtype and the autocast decide what the reference computes
        compute = {"weights": str(module.model.dtype), "bf16_autocast": torch.is_autocast_enabled(env.device.type)}
    from internvl_mpo.train.resume import dataset_tiles  # resume imports stream, which imports this module

    config = module.model.config
    tiles = dataset_tiles(cfg, cfg.max_dynamic_patch, config)
    fingerprint = {**_ref_fingerprint(cfg, env, dataset, data_print, model_print, tiles), **compute}
    if path.is_file() and meta_path.is_file():
        cached = ckpt.read_json(meta_path)
        # written before 2026-12-07: the data's path as given (made absolute), --max-dynamic-patch as given
        if isinstance(cached.get("data"), str):
            cached["data"] = os.path.realpath(cached["data"])
        if cached.get("max_dynamic_patch") is None or type(cached.get("max_dynamic_patch")) is int:
            cached["max_dynamic_patch"] = dataset_tiles(cfg, cached.get("max_dynamic_patch"), config)
        if cached == fingerprint:
            table = ckpt.read_tensors(path)
            shapes = {k: tuple(v.shape) for k, v in table.items()}
            if shapes != dict.fromkeys(("chosen", "rejected", "valid"), (len(dataset),)):
                raise CheckpointError(f"{path}: holds {shapes}, not the chosen, rejected and valid values of the"
                                      f" {len(dataset)} records its {meta_path.name} describes; delete both files"
                                      " to compute them again")
            return table["chosen"], table["rejected"], table["valid"].bool()
        changed = [k for k in fingerprint if cached.get(k) != fingerprint[k]] + [k for k in cached if k not in fingerprint]
        if cfg.tokenizer is None and "model" in changed and "tokenizer" in changed:
            # the tokenizer's files are the model folder's .json and .txt files, which "model" counts already: an edited
            # config.json changes both digests, and naming the tokenizer then would blame files that did not change
            changed.remove("tokenizer")
        print0(f"note: {path} was computed from other inputs ({', '.join(changed)}): computing it again")
    dataset = dataset.at_epoch(0)
    n = len(dataset)
    values = torch.zeros(n, 2, dtype=torch.float64)
    valid = torch.zeros(n, dtype=torch.float64)
    mine = list(range(env.rank, n, env.world_size))
    size = module.model.config.image_size
    with torch.no_grad():
        # every rank as many batches (the longest share's), each read within `ranks_together`: a bad record
        # in one rank's share stops all of them at once
        for start in range(0, -(-n // env.world_size), cfg.batch_size):
            stop_if_requested(env)  # a SIGTERM stops the pass between two batches (it saves nothing)
            examples = []
            with ranks_together(env):
                for i in mine[start : start + cfg.batch_size]:
                    item = dataset[i]
                    if isinstance(item, BadExample):
                        if not cfg.skip_bad:
                            raise InputError(item.message + " (pass --skip-bad to skip such records)")
                        continue
                    examples.append(item)
            if not examples and lockstep:
                padding = torch.full((2, 1), pad_id, device=env.device)
                no_tiles = torch.zeros(0, 3, size, size, device=env.device)
                with autocast():
                    module(padding, torch.full_like(padding, -100), no_tiles, True)
            if not examples:
                continue
            batch = collate_pairs(examples, pad_id).to(env.device)
            with autocast():
                logps, _ = module(batch.input_ids, batch.labels, batch.pixel_values, True)
            b = batch.num_samples
            values[batch.indices] = torch.stack([logps[:b], logps[b:]], dim=1).double().cpu()
            valid[batch.indices] = 1.0
    values = all_reduce_sum(values.to(env.device), env).cpu()
    valid = all_reduce_sum(valid.to(env.device), env).cpu()
    chosen, rejected = values[:, 0].float(), values[:, 1].float()
    with ranks_together(env), ckpt.saving(path):
        if env.is_main:
            # The old description goes first and the new one lands whole, so a kill in between leaves values
            # without one (computed again) rather than new values under an old description (reused for the old inputs).
            meta_path.unlink(missing_ok=True)
            tmp = path.with_name(".tmp-" + path.name)
            ckpt.write_tensors(tmp, {"chosen": chosen, "rejected": rejected, "valid": valid.to(torch.uint8)})
            os.replace(tmp, path)
            tmp = meta_path.with_name(".tmp-" + meta_path.name)
            ckpt.write_json(tmp, fingerprint)
            os.replace(tmp, meta_path)
    return chosen, rejected, valid.bool()


def check_reference_epoch(
    cfg: TrainConfig, env: DistEnv, dataset: PairDataset, needed: int, valid: torch.Tensor | None = None
) -> None:
    """ConfigError when precomputed reference log-probs meet augmented data and some rank would read
    past the first epoch: the first pass saw epoch 0's JPEG draws, a later epoch draws others. `needed`
    is the samples per rank the run trains on; `valid` (from the pass) leaves out records that
    `--skip-bad` will skip. Every rank reaches the same decision."""
    if not dataset.augments:
        return
    order = epoch_order(len(dataset), 0, cfg.seed, cfg.shuffle)
    for rank in range(env.world_size):
        share = rank_share(order, rank, env.world_size, 0)
        usable = len(share) if valid is None else int(valid[share].sum())
        if usable < needed:
            raise ConfigError(
                f"--precompute-ref with data_augment datasets needs the run to stay in its first epoch, but it"
                f" trains on {needed} samples per process and the first epoch holds {usable} usable ones; the"
                " reference pass sees the first epoch's randomly JPEG-compressed tiles and later epochs draw"
                " others. Lower --max-steps (or --epochs 1), or drop --precompute-ref (the live reference model"
                " always sees the policy's tiles)"
            )

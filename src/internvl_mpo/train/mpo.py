"""The MPO / DPO / SFT training loop, readable top to bottom.

Mirrors the InternVL2.5-MPO recipe: `internvl_chat/internvl/train/internvl_chat_mpo.py` (model and
data set-up) driving `trainer_dpo.py` (`MultimodalDPOTrainer`, TRL 0.10.1 `DPOTrainer`) under the HF
Trainer (AdamW, cosine schedule with warmup ratio, gradient accumulation, clipping at 1.0, bf16).
`losses.py` holds the maths, `settings.py` the run's settings (`TrainConfig`), `policy.py` the model pieces,
`stream.py` the data stream, `reference.py` the precomputed reference log-probs and `resume.py` the
checkpoints and the resume checks; this file holds the order of operations:

1. load the policy (or build it from a config.json with random weights) and the tokenizer; under
   FSDP2 the policy and the reference are built on the meta device, sharded, and then each rank reads
   only its own shards from the memory-mapped checkpoint (`fill_fsdp2`): no rank holds the whole model;
2. read the data (MMPR meta.json for mpo/dpo, conversations for sft);
3. reference log-probs: a frozen copy of the initial model run under `torch.no_grad()` every step,
   or (`precompute_ref`) one pass over the data before training, cached as safetensors + JSON;
4. training set-up applied from outside the model: ViT drop-path rates, LoRA adapters, freezing,
   activation checkpointing per ViT layer and decoder block (`torch.distributed._composable
   .checkpoint`, i.e. `torch.utils.checkpoint` without changing parameter names), then DDP or FSDP2;
5. per optimizer step: `grad_accum` micro-batches, each one forward over [chosen; rejected] with
   each pair's images encoded once, `mpo_loss`, backward; clip, AdamW step, metrics, checkpoint; after a
   SIGTERM (`stopping.py`) every process stops there, with a checkpoint of that step.

Differences from the reference trainer, on purpose:
- images are encoded once per pair (the reference repeats `pixel_values` for the rejected half);
- right-padded rows run with a plain causal mask: pads come after every real token, so no real
  token can see them (the collator still builds the true mask from lengths; pitfall 13.3);
- label log-probs come from the final hidden states chunk by chunk; full fp32 logits are never built;
- text-only samples carry no dummy image; with several ranks, a rank whose micro-batch has no tile
  encodes one zero tile and adds 0 x its features to the loss, so every rank runs the vision tower
  (DDP needs every parameter used; FSDP2 needs every rank in the same collectives); so does any
  process when the LLM is frozen (else such a micro-batch's loss reaches no trainable weight);
- on CUDA with bf16, the trainable weights stay float32 under bf16 autocast (DeepSpeed's bf16
  keeps bf16 weights plus an fp32 master copy); the reference copy is float32 too, under the same
  autocast, so at step 0 it computes exactly what the policy does (FSDP2 computes with bf16 weights:
  its reference copy, and the `precompute_ref` pass, use bf16 weights without autocast);
- weight decay skips biases and the weights of LayerNorm / RMSNorm modules (the reference's DeepSpeed AdamW
  gets every trainable tensor in one group and decays them all);
- epochs reshuffle with a generator seeded by seed + epoch; the stream of samples runs on across
  epochs, and the step count is `max_steps`, else `epochs * (samples per rank // (batch * accum))`.

Kept from the reference: the BCO running mean folds in every micro-batch; the SFT term is a token
mean per micro-batch and rank. Logged metrics are averaged over the micro-batches of a step and over
ranks (`tokens` is summed; `skipped` counts the records every rank skipped, each once). Resuming
needs the same world size, batch size, accumulation, step count and trained parameters
(`RESUME_KEYS`: freeze and LoRA flags among them) and the same loss, example and optimizer
settings (`RUN_RESUME_KEYS`: beta and the loss weights, sequence length and tiles, lr, warmup,
AdamW, clipping), the same data files, model files (the reference model is rebuilt from `--model`)
and records read by each process from its position on (`check_resume_settings`, in `resume.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from internvl_mpo.checkpoint import check_finite
from internvl_mpo.devices import parse_dtype
from internvl_mpo.errors import CheckpointError, ConfigError, InputError, TrainingError
from internvl_mpo.locks import check_not_in_use, lock_output, no_lock_note
from internvl_mpo.train import checkpointing as ckpt
from internvl_mpo.train.data import Batch
from internvl_mpo.train.distributed import (
    DistEnv,
    all_gather_lists,
    all_reduce_mean,
    all_reduce_sum,
    destroy_distributed,
    fill_fsdp2,
    fsdp_mesh,
    init_distributed,
    print0,
    ranks_together,
    shard_fsdp2,
    transformer_blocks,
    wrap_ddp,
)
from internvl_mpo.train.lora import apply_lora, check_lora_rank, lora_state, lora_target_names
from internvl_mpo.train.losses import RunningMean, mpo_loss, sft_nll
from internvl_mpo.train.mmpr import SkipReport
from internvl_mpo.train.policy import (
    SequenceLogps,
    build_optimizer,
    disable_dropout,
    freeze,
    initial_weight,
    load_initial_model,
    make_reference,
    set_drop_path,
)
from internvl_mpo.train.reference import check_reference_epoch, precompute_reference
from internvl_mpo.train.resume import (
    FINAL_DIR,
    METRICS_FILE,
    check_output,
    check_resume_settings,
    data_fingerprint,
    model_fingerprint,
    official_state,
    resume_training_state,
    resume_weights,
    resumed_weights,
    rewrite_metrics,
    save_checkpoint,
)
from internvl_mpo.train.settings import MPOWeights, TrainConfig, count, loss_weights, max_seq_length
from internvl_mpo.train.stopping import Stopped, sigterm_stops, stop_if_requested, stop_requested
from internvl_mpo.train.stream import SampleStream, build_dataset


def lr_at(step: int, total_steps: int, warmup_ratio: float, base_lr: float) -> float:
    """HF `get_cosine_schedule_with_warmup` at optimizer step `step` (0-based), warmup = ceil(ratio * total)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return base_lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, total_steps - warmup)
    return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class TrainResult:
    final_dir: Path
    steps: int
    skipped: SkipReport
    metrics: dict[str, float] = field(default_factory=dict)
    truncation_note: str | None = None  # samples whose answers --max-seq-length cut, when there were any
    resumed_after: int = 0  # the step of the checkpoint a --resume went on from (0: none)


# ----------------------------------------------------------------------------- one micro-batch


def micro_batch_loss(
    module: nn.Module,
    ref_module: nn.Module | None,
    ref_table: tuple[torch.Tensor, torch.Tensor] | None,
    batch: Batch,
    weights: MPOWeights,
    running: RunningMean | None,
    autocast,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy (and reference) log-probs of one micro-batch and its MPO / DPO / SFT loss."""
    with autocast():
        logps, n_tokens = module(batch.input_ids, batch.labels, batch.pixel_values, batch.pairs)
    if not batch.pairs:
        return mpo_loss(logps, None, None, None, sft_nll(logps, n_tokens), weights, None)
    b = batch.num_samples
    chosen, rejected = logps[:b], logps[b:]
    ref_chosen = ref_rejected = None
    if ref_table is not None:
        ref_chosen = ref_table[0][batch.indices].to(chosen.device)
        ref_rejected = ref_table[1][batch.indices].to(chosen.device)
    elif ref_module is not None:
        with torch.no_grad(), autocast():
            ref_logps, _ = ref_module(batch.input_ids, batch.labels, batch.pixel_values, True)
        ref_chosen, ref_rejected = ref_logps[:b], ref_logps[b:]
    return mpo_loss(chosen, rejected, ref_chosen, ref_rejected, sft_nll(chosen, n_tokens[:b]), weights, running)


def _sync_context(module: nn.Module, sync: bool):
    """Reduce gradients across ranks in the last micro-batch's backward only (DDP and FSDP2 alike)."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2: set before every micro-batch's backward
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# ----------------------------------------------------------------------------- the loop


def train(config: TrainConfig, on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Run one training job; returns where the final model (official layout) was written."""
    config.validate()
    env = init_distributed(config.device)
    mesh = None
    try:
        mesh = fsdp_mesh(env) if config.fsdp and env.distributed else None  # one per run, released below
        # SIGTERM stops the run at its next step boundary (`stopping`); the output folder's lock, once taken
        with sigterm_stops(), contextlib.ExitStack() as held:
            return _train(config, env, mesh, on_step, held)
    except BaseException as e:
        # The error's frames hold the DDP / FSDP2 module, and through it the process group: freed only after the
        # group is destroyed below, gloo's destructor waits for a thread that waits for the GIL (the process hangs).
        # One process keeps them (a debugger's post-mortem reads them).
        if env.distributed:
            traceback.clear_frames(e.__traceback__)
            if lost_peer(e):  # another process died (killed, out of memory): gloo's error deep in a collective
                last = ckpt.latest_checkpoint(Path(config.output))
                kept = f"--resume goes on from {last}" if last else "no checkpoint was saved"
                raise TrainingError(f"process {env.rank}: lost contact with another process of the run (it ended or"
                                    f" was killed: see its own output); {kept} ({str(e).split('. ')[0]})") from None
        raise
    finally:
        if env.distributed:
            destroy_distributed(mesh)


_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused")


def lost_peer(e: BaseException) -> bool:
    """Whether `e` is torch's error (gloo's RuntimeError, a DistError) for a peer process that went away."""
    if isinstance(e, TrainingError) or not isinstance(e, RuntimeError):
        return False
    return isinstance(e, torch.distributed.DistNetworkError) or any(text in str(e) for text in _PEER_LOST)


def _train(cfg: TrainConfig, env: DistEnv, mesh, on_step, held: contextlib.ExitStack) -> TrainResult:
    from tqdm import tqdm

    output = Path(cfg.output)
    with ranks_together(env):  # a live run there is named first
        if env.is_main:
            check_not_in_use(output)
    check_output(output, cfg.resume)
    weights = loss_weights(cfg)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")
    fsdp = cfg.fsdp and env.distributed  # --fsdp means nothing to a single process (see its help)
    # A fresh context per use (FSDP2 casts to bf16 through its own mixed-precision policy instead).
    autocast = functools.partial(torch.autocast, env.device.type, dtype=torch.bfloat16, enabled=bf16 and not fsdp)

    # 1. model and tokenizer (the seed makes random init and LoRA adapters equal on every rank)
    torch.manual_seed(cfg.seed)
    # each process reads the model and the data itself (a copy on each node, say): one that fails stops all
    with ranks_together(env):
        # meta under FSDP2 (filled in 3, 4)
        tokenizer, policy, initial, start_dtype = load_initial_model(cfg, env.device, lazy=fsdp)
        if cfg.lora_rank:  # before the reference pass and before any adapter is made
            check_lora_rank(policy, cfg.lora_rank, cfg.lora_vision)
        final_dtype = parse_dtype("auto", env.device, start_dtype)  # refused now
    stop_if_requested(env)  # a SIGTERM during the set-up stops the run between its stages
    # from here on the run's settings hold the length it uses (checkpoints and resumes compare it)
    cfg = dataclasses.replace(cfg, max_seq_length=max_seq_length(cfg, policy.config))

    # 2. data
    with ranks_together(env):
        dataset, report = build_dataset(cfg, tokenizer, policy.config)
    stop_if_requested(env)
    stream = SampleStream(dataset, env, cfg, report)
    held.callback(stream.close)  # its loader workers end with the run, however it ends
    samples_per_step = cfg.batch_size * cfg.grad_accum
    # Every process reads all records (each keeps its share): a count that differs (a copy of the data on each
    # node that does not match) gives the processes other steps and shares, and one would wait for the others.
    counts = all_gather_lists([len(dataset)], env)
    if len(set(counts)) > 1:
        read = ", ".join(f"process {r}: {n} records" for r, n in enumerate(counts))
        raise InputError(f"{cfg.data}: the processes read different data ({read}); every process must read the same"
                         " files (a copy of them on each node that differs?)")
    total_steps = cfg.max_steps or cfg.epochs * (stream.per_rank() // samples_per_step)
    if total_steps < 1 or stream.per_rank() < 1:
        raise InputError(
            f"{cfg.data}: {count(len(dataset), 'record')}, fewer than one step takes"
            f" ({samples_per_step} per rank x {count(env.world_size, 'rank')})"
        )
    unread = 0 if cfg.max_steps else cfg.epochs * len(dataset) - total_steps * samples_per_step * env.world_size
    if unread:  # the HF Trainer would train them in a smaller last batch
        print0(f"note: {count(total_steps, 'step')} of {samples_per_step * env.world_size} samples leave"
               f" {count(unread, 'record')} of the last epoch untrained (steps take whole batches)")
    if cfg.save_every > total_steps:  # a run that asked to be resumable would find no checkpoint to resume from
        print0(f"note: --save-every {cfg.save_every} is more than the run's {count(total_steps, 'step')}: it saves "
               "no checkpoint before final/")
    needs_ref = cfg.mode != "sft" and (weights.pref_weight != 0 or weights.quality_weight != 0)
    precompute = needs_ref and cfg.precompute_ref
    if precompute:
        check_reference_epoch(cfg, env, dataset, total_steps * samples_per_step)
    # Hashing the data files (GBs for MMPR) and the model's files (8 GB for a 4B model) is needed only to
    # write checkpoints, to check a resume, or to tell whether cached reference log-probs were computed from them.
    fingerprint = data_fingerprint(cfg) if cfg.resume or cfg.save_every or precompute else None
    model_print = model_fingerprint(cfg, policy) if fingerprint is not None else None
    # Created only now, so that a bad model or data path leaves no empty run folder behind. Process 0 locks it
    # for the run (another run started on it since the check above is refused), then every process checks again.
    with ranks_together(env):
        if env.is_main:
            try:
                output.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # an unwritable parent, say
                raise ConfigError(f"--output {output}: cannot make the folder ({e.strerror})") from None
            lock = lock_output(output)
            if lock is None:
                print0(no_lock_note(output))
            else:
                held.enter_context(lock)
    check_output(output, cfg.resume)

    # a resume that would continue otherwise is refused before the reference pass (hours for MMPR)
    resume_from = ckpt.latest_checkpoint(output) if cfg.resume else None
    skipped = [path for path in ckpt.checkpoints(output, complete=False) if cfg.resume and
               (resume_from is None or ckpt.checkpoint_step(path) > ckpt.checkpoint_step(resume_from))]
    if skipped:  # a partial copy of the run folder, say: said, not passed over in silence
        names = ", ".join(p.name for p in skipped)
        has, is_ = ("has", "is") if len(skipped) == 1 else ("have", "are")
        went_on = f"goes on from {resume_from.name}" if resume_from is not None else "starts from the beginning"
        print0(f"note: {names} in {output} {has} no {ckpt.STATE_FILE} (an incomplete copy?) and {is_} not resumed "
               f"from; the run {went_on}")
    if resume_from is not None:
        check_resume_settings(resume_from, cfg, env, total_steps, fingerprint, model_print, stream, policy.config)

    # 3. reference log-probs: a frozen copy of the initial model, or a cached first pass, which outside FSDP2 the
    # policy itself runs (still the initial model, in eval mode): no second model in memory
    ref_module, ref_table = None, None
    if needs_ref:
        reference = policy.eval() if cfg.precompute_ref and not fsdp else make_reference(policy, bf16 and fsdp)
        # sharded, the pass's ranks run the vision tower on every forward (as training's do)
        ref_module = SequenceLogps(reference, encode_empty=fsdp or (env.distributed and not cfg.precompute_ref))
        if fsdp:
            shard_fsdp2(ref_module, transformer_blocks(reference), bf16, mesh)
            with ranks_together(env):  # each rank reads (and checks: NaN, inf) its own rows only
                fill_fsdp2(ref_module, env.device, lambda name: initial[name.removeprefix("model.")])
        if cfg.precompute_ref:
            ref_chosen, ref_rejected, valid = precompute_reference(
                cfg, env, ref_module, dataset, tokenizer.pad_id, autocast, fingerprint, model_print, lockstep=fsdp
            )
            ref_table = (ref_chosen, ref_rejected)
            stream.ref_valid = valid
            check_reference_epoch(cfg, env, dataset, total_steps * samples_per_step, valid)  # --skip-bad's skips
            ref_module = None
        del reference
        policy.train()

    # 4. training set-up, applied from outside the model
    if resume_from is not None and fsdp:
        initial |= resumed_weights(resume_from, policy, cfg)
    elif resume_from is not None:
        resume_weights(resume_from, policy, cfg)
    set_drop_path(policy, cfg.drop_path_rate)
    if cfg.mode != "sft":  # the official MPO trainer (TRL's DPOTrainer) trains with nn.Dropout at p = 0
        disable_dropout(policy)
    if cfg.max_dynamic_patch is not None:  # saved in the model's config.json, as the official trainers save the tile
        config = policy.config                # budget they trained with (servers read it as their default)
        policy.config = config.replace(max_dynamic_patch=cfg.max_dynamic_patch,
                                       min_dynamic_patch=min(config.min_dynamic_patch, cfg.max_dynamic_patch))
    freeze(policy, cfg)
    if cfg.lora_rank:
        names = lora_target_names(policy, vision=cfg.lora_vision)
        # on the device also under FSDP2: the adapters are drawn as they always were
        apply_lora(policy, names, cfg.lora_rank, cfg.lora_scale * cfg.lora_rank, device=env.device)
        if resume_from is not None:
            adapters = ckpt.read_tensors(resume_from / ckpt.EXTRA_FILE)
            for key, value in adapters.items():
                check_finite(value, resume_from / ckpt.EXTRA_FILE, key)
            own = lora_state(policy.state_dict())  # their names and shapes, checked before load_state_dict raises
            if {k: v.shape for k, v in adapters.items()} != {k: v.shape for k, v in own.items()}:
                raise CheckpointError(f"{resume_from / ckpt.EXTRA_FILE}: LoRA adapters do not match this run's "
                                      "--lora-* settings")
            policy.load_state_dict(adapters, strict=False)
    if cfg.grad_checkpointing:
        from torch.distributed._composable import checkpoint as activation_checkpoint

        for block in transformer_blocks(policy):
            activation_checkpoint(block)
    vision_trains = any(p.requires_grad for p in [*policy.vision_model.parameters(), *policy.mlp1.parameters()])
    llm_trains = any(p.requires_grad for p in policy.language_model.parameters())
    # With the LLM frozen, a micro-batch without images reaches a trainable weight only through the zero tile.
    encode_empty = (env.distributed and (fsdp or vision_trains)) or not llm_trains
    module: nn.Module = SequenceLogps(policy, encode_empty=encode_empty)
    if fsdp:
        adapters = lora_state(policy.state_dict())
        module = shard_fsdp2(module, transformer_blocks(policy), bf16, mesh)
        with ranks_together(env):
            module = fill_fsdp2(module, env.device, functools.partial(initial_weight, initial, adapters))
        del initial, adapters
    elif env.distributed:
        module = wrap_ddp(module, env)
    optimizer = build_optimizer(policy, cfg)
    params = [p for p in policy.parameters() if p.requires_grad]
    running = RunningMean() if weights.quality_weight != 0 else None

    # Per-rank random streams (drop-path); a checkpoint replaces them with its saved states.
    torch.manual_seed(cfg.seed + env.rank)
    np.random.seed(cfg.seed + env.rank)
    random.seed(cfg.seed + env.rank)
    start_step = 0
    if resume_from is not None:
        start_step = resume_training_state(resume_from, env, module, optimizer, running, stream)
        with ranks_together(env):  # what a run killed while it pruned left, where no save of this run would prune it
            if cfg.save_total_limit and env.is_main:
                ckpt.prune_checkpoints(output, cfg.save_total_limit)
    metrics_path = output / METRICS_FILE
    cut_total = 0  # samples cut to --max-seq-length, the resumed run's steps included (counted on process 0)
    with ranks_together(env), ckpt.saving(metrics_path):  # a full disk at a resume, say
        if env.is_main and resume_from is not None:
            cut_total = rewrite_metrics(metrics_path, start_step)
        elif env.is_main:
            metrics_path.unlink(missing_ok=True)
    stop_if_requested(env)

    def save(done: int) -> Path:
        return save_checkpoint(cfg, env, done, module, policy, optimizer, running, stream, total_steps, fingerprint,
                               model_print)

    # 5. the loop
    # closed however the loop ends: a Ctrl-C's line (`train.cli`) comes below the bar, not on its line
    bar = held.enter_context(tqdm(total=total_steps, initial=start_step, disable=not (cfg.progress and env.is_main),
                                  desc=cfg.mode))
    metrics: dict[str, float] = {}
    for step in range(start_step, total_steps):
        lr = lr_at(step, total_steps, cfg.warmup_ratio, cfg.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        sums: dict[str, float] = {}
        tokens = 0
        for micro in range(cfg.grad_accum):
            with ranks_together(env):  # a bad sample (or a whole epoch of them) in one rank's share stops all
                batch = stream.next_batch(cfg.batch_size, tokenizer.pad_id).to(env.device)
            with _sync_context(module, micro == cfg.grad_accum - 1):
                loss, micro_metrics = micro_batch_loss(module, ref_module, ref_table, batch, weights, running, autocast)
                (loss / cfg.grad_accum).backward()
            for key, value in micro_metrics.items():
                sums[key] = sums.get(key, 0.0) + value / cfg.grad_accum
            tokens += batch.num_tokens
        stream.share_bad()
        grad_norm = _grad_norm(params, cfg.max_grad_norm)
        if not math.isfinite(grad_norm):  # the same global norm on every rank: all stop together
            raise TrainingError(f"step {step + 1}: the gradient norm is {grad_norm}: the run diverged (try a lower"
                                f" --lr); it stopped before the update, so {output}'s checkpoints keep finite weights")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        keys = sorted(sums)
        values = all_reduce_mean(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=env.device), env)
        counts = all_reduce_sum(torch.tensor([tokens, stream.cut], dtype=torch.float64, device=env.device), env)
        tokens, cut = (int(x) for x in counts.tolist())
        stream.cut, cut_total = 0, cut_total + cut
        elapsed = time.perf_counter() - started
        metrics = {"step": step + 1, **dict(zip(keys, values.tolist())), "lr": lr, "grad_norm": grad_norm,
                   "epoch": stream.epochs_read(), "tokens": tokens, "truncated": cut,
                   "tokens_per_s": tokens / elapsed, "step_time_s": elapsed, "skipped": stream.report.total}
        with ranks_together(env), ckpt.saving(metrics_path):
            if env.is_main:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(ckpt.strict_json(metrics), allow_nan=False) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics.get('rewards/accuracies', 0.0):.2f}")
        saved = save(step + 1) if cfg.save_every and (step + 1) % cfg.save_every == 0 else None
        if on_step is not None:
            on_step(step + 1, metrics)
        # After a SIGTERM every process stops here, after the same whole step, with its checkpoint. One in the
        # last step lets the run end as usual: final/ takes less time to write than a checkpoint.
        if step + 1 < total_steps and stop_requested(env):
            if saved is None:
                if fingerprint is None:  # hashed only now: a run without --save-every had no checkpoint to write
                    fingerprint, model_print = data_fingerprint(cfg), model_fingerprint(cfg, policy)
                saved = save(step + 1)
            bar.close()
            raise Stopped(step + 1, saved)
    bar.close()

    # 6. the final model, official layout, in the starting checkpoint's dtype (bf16 for the official ones, as
    # the official trainer saves them; the checkpoints above keep the float32 weights for an exact resume)
    final_dir = output / FINAL_DIR
    state = ckpt.full_model_state(module)
    with ranks_together(env):
        if env.is_main:
            state = {k: v.to(final_dtype) for k, v in official_state(state, cfg).items()}
            ckpt.atomic_folder(final_dir, lambda tmp: ckpt.export_model(state, policy, tmp))
    note = None
    # the first cut sample of the whole run, whichever process read it (process 0 prints the note)
    cuts = [c for c in all_gather_lists([(stream.first_cut_at, stream.first_cut)], env) if c[1] is not None]
    first_cut = min(cuts)[1] if cuts else None
    if cut_total:  # a tail of an answer that did not fit was never trained, a final answer often
        first = f" (the first since the run started or resumed: {first_cut})" if first_cut else ""
        had = "had its answer" if cut_total == 1 else "had their answers"
        note = (f"note: {count(cut_total, 'sample')} {had} cut to fit --max-seq-length"
                f" {cfg.max_seq_length}{first}; the cut tails were not trained (metrics.jsonl: truncated)")
    return TrainResult(final_dir, total_steps, stream.report, metrics, note, start_step)

"""`internvl-mpo train` and `internvl-mpo plot`.

`train`'s parameters are `TrainConfig`'s fields one to one (a test checks names and defaults).
Multi-GPU: `torchrun --nproc-per-node N -m internvl_mpo.cli train mpo ...`.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

from internvl_mpo.errors import InputError, Interrupted
from internvl_mpo.jsonl import json_problem, read_input_bytes


def train(
    mode: str,
    model: str | None = None,
    data: str | None = None,
    output: str | None = None,
    image_root: str | None = None,
    init_from_config: str | None = None,
    tokenizer: str | None = None,
    beta: float = 0.1,
    pref_weight: float | None = None,
    quality_weight: float | None = None,
    gen_weight: float | None = None,
    label_smoothing: float = 0.0,
    rejected_span: str = "full",
    lr: float = 1e-6,
    weight_decay: float = 0.05,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    adam_eps: float = 1e-8,
    warmup_ratio: float = 0.03,
    epochs: int = 1,
    max_steps: int = 0,
    batch_size: int = 1,
    grad_accum: int = 1,
    max_grad_norm: float = 1.0,
    max_seq_length: int | None = None,
    max_dynamic_patch: int | None = None,
    video_frames: int = 8,
    max_pixels: int | None = None,
    save_every: int = 0,
    save_total_limit: int = 0,
    seed: int = 42,
    shuffle: bool = True,
    freeze_vision: bool = False,
    freeze_projector: bool = False,
    freeze_llm: bool = False,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    lora_vision: bool = False,
    drop_path_rate: float = 0.1,
    grad_checkpointing: bool = True,
    precompute_ref: bool = False,
    skip_bad: bool = False,
    resume: bool = False,
    precision: str = "auto",
    device: str | None = None,
    fsdp: bool = False,
    num_workers: int = 0,
    progress: bool = True,
) -> int:
    """Train with MPO (sigmoid DPO + BCO-pair + SFT), plain DPO, or SFT on conversations.

    mode: mpo, dpo or sft
    model: checkpoint folder (official layout) or hub id (OpenGVLab/InternVL2_5-4B) to start from and to use as the reference (required unless --init-from-config)
    data: meta.json (MMPR for mpo/dpo; conversation annotations for sft) or, for sft, one .jsonl (required)
    output: run folder: metrics.jsonl, checkpoint-N/, final/ (required; without --resume it must hold none of them, a finished run's final/ is never trained over, and a live run there refuses a second one)
    image_root: image folder for a single sft .jsonl (default: the file's folder)
    init_from_config: start from random weights built from this config.json instead of --model
    tokenizer: tokenizer folder (default: the model's folder, downloaded for a hub id; required with --init-from-config)
    beta: DPO / BCO temperature
    pref_weight: weight of the sigmoid DPO term (default: mpo 0.8, dpo 1, sft 0)
    quality_weight: weight of the BCO-pair term (default: mpo 0.2, dpo 0, sft 0)
    gen_weight: weight of the SFT NLL term on chosen answers (default: mpo 1, dpo 0, sft 1)
    label_smoothing: conservative-DPO label smoothing
    rejected_span: full (official: the whole rejected answer is scored) or divergent-line (only up to the end of its first line that differs from the chosen answer)
    lr: peak learning rate
    weight_decay: AdamW weight decay (not on biases and norm weights)
    adam_beta1: AdamW beta1
    adam_beta2: AdamW beta2
    adam_eps: AdamW epsilon (> 0)
    warmup_ratio: share of the steps with linear warmup before the cosine decay
    epochs: passes over the data (ignored when --max-steps is given)
    max_steps: optimizer steps (0: from --epochs)
    batch_size: pairs (or conversations) per micro-batch per process
    grad_accum: micro-batches per optimizer step
    max_grad_norm: gradient-norm clipping (0: no clipping)
    max_seq_length: longest sequence, at most the model's context (llm_config.max_position_embeddings); answers are cut at the tail, never the prompt or image tokens (default: the smaller of 8192 and the context)
    max_dynamic_patch: tiles per image; when given it wins over meta.json's max_dynamic_patch (default: meta.json's value, else the model config's)
    video_frames: frames sampled per video
    max_pixels: refuse images (and frames) with more pixels (default: Pillow's limit, about 89 M)
    save_every: write a resumable checkpoint every N steps (0: only the final model)
    save_total_limit: keep only the N newest checkpoints, deleting older ones after each save (0: keep all)
    seed: seed of the data order, initialisation and drop-path (0 to 2**32 minus the number of processes)
    shuffle: reshuffle the data every epoch
    freeze_vision: freeze the vision tower
    freeze_projector: freeze the projector (mlp1)
    freeze_llm: freeze the language model
    lora_rank: LoRA rank on the LLM's linear layers (0: full fine-tuning)
    lora_alpha: LoRA alpha (default 2 x rank)
    lora_vision: also put LoRA adapters on the vision tower's linear layers
    drop_path_rate: ViT stochastic depth (policy only)
    grad_checkpointing: recompute activations per ViT layer and decoder block in the backward
    precompute_ref: compute reference log-probs in a first pass and cache them (no reference model in memory; with data_augment datasets, one epoch at most)
    skip_bad: count and skip bad records instead of stopping at the first
    resume: continue from the latest checkpoint in --output (data files and the records each process reads, model and tokenizer files, batch, steps, freeze, LoRA, loss, example, lr, schedule and AdamW settings must be the checkpoint's)
    precision: auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32
    device: cpu, cuda (each torchrun process its cuda:LOCAL_RANK) or cuda:N (one process per node only; default: cuda:LOCAL_RANK when available)
    fsdp: shard with FSDP2 instead of DDP when several processes run
    num_workers: data-loading worker processes
    progress: show a progress bar
    """
    settings = dict(locals())
    from internvl_mpo.train.settings import TrainConfig, count, env_int

    config = TrainConfig(**settings)
    with _said_by_process_0():
        config.validate()  # the flags are checked before torch loads with what follows (about 2 s)
    from internvl_mpo.convert import remote_code_note
    from internvl_mpo.processor.image import let_pillow_open
    from internvl_mpo.train.checkpointing import latest_checkpoint
    from internvl_mpo.train.distributed import print0
    from internvl_mpo.train.mpo import train as run
    from internvl_mpo.train.stopping import EXIT_CODE, Stopped

    let_pillow_open(max_pixels)
    if fsdp and env_int("WORLD_SIZE", 1) < 2:
        print0("note: --fsdp shards only when several processes run (torchrun); this single process trains unsharded")
    try:
        with _said_by_process_0():
            result = run(config)
    except Stopped as e:  # by SIGTERM: 143 (128 + 15), the code a shell gives a process that SIGTERM ended
        print0(f"internvl-mpo train: {e}", file=sys.stderr)
        return EXIT_CODE
    except KeyboardInterrupt:  # Ctrl-C stops at once, without a save: what a resume goes on from
        last = latest_checkpoint(Path(output))
        kept = (f"the steps after {last} were not saved: run the same command with --resume to go on from it"
                if last else "no checkpoint was saved: run the same command with --resume to start over")
        print0(f"internvl-mpo train: interrupted by Ctrl-C; {kept}", file=sys.stderr)
        raise Interrupted from None
    done = f"trained {count(result.steps, 'step')}"
    if result.resumed_after == result.steps:  # a checkpoint of the last step: only final/ was written again
        done = f"resumed after the last step, {result.steps}: no step left to train"
    elif result.resumed_after:
        done = f"trained steps {result.resumed_after + 1} to {result.steps} (resumed after step {result.resumed_after})"
    print0(f"{done}; final model: {result.final_dir}")
    note = remote_code_note(result.final_dir) if env_int("RANK", 0) == 0 else None  # process 0 wrote final/
    if note:  # the files the official code and vLLM load it with
        print0(note)
    if result.truncation_note:
        print0(result.truncation_note)
    if result.skipped.total:
        kinds = ", ".join(f"{kind}: {n}" for kind, n in result.skipped.counts.items())
        print0(f"skipped {count(result.skipped.total, 'bad record')} ({kinds})")
        for message in result.skipped.messages:
            print0(f"  {message}")
    return 0


@contextlib.contextmanager
def _said_by_process_0():
    """A ConfigError (a flag or setting) or ResumeSettingsError (a resume's settings that differ from the
    checkpoint's), which every torchrun process finds alike and refuses with the same line, is printed by process 0
    alone: the others end with exit code 1 and no line, not N copies of it. A process whose own RANK is out of range
    says so itself."""
    from internvl_mpo.errors import ConfigError, ResumeSettingsError
    from internvl_mpo.train.settings import env_int

    try:
        yield
    except (ConfigError, ResumeSettingsError):
        with contextlib.suppress(ConfigError):
            rank, world = env_int("RANK", 0), env_int("WORLD_SIZE", 1)
            if 0 < rank < world:
                raise SystemExit(1) from None
        raise


PLOT_PANELS = (
    ("losses", ("loss", "loss/pref", "loss/quality", "nll")),
    ("rewards", ("rewards/chosen", "rewards/rejected", "rewards/margins")),
    ("accuracy", ("rewards/accuracies",)),
    ("delta", ("delta",)),
)
PLOTTED = [key for _, keys in PLOT_PANELS for key in keys]


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl, less a last line without its newline (a run killed during the append);
    InputError at a line that is not a metrics row (another JSONL given to plot)."""
    rows = []
    try:
        text = read_input_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:  # a picture, a binary file
        raise InputError(f"{path}: not a metrics.jsonl file (not UTF-8 text, byte {e.start + 1})") from None
    # lines end at LF only: a JSON string may hold U+2028 or U+0085 unescaped, which splitlines() takes for line
    # ends; the piece after the last LF (a line cut by a kill, or nothing) is left out
    for number, line in enumerate(text.split("\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise InputError(f"{path}:{number}: {json_problem(e)}") from None
        if not (isinstance(row, dict) and isinstance(row.get("step"), int | float)):
            raise InputError(f"{path}:{number}: not a metrics.jsonl row (an object with a numeric 'step')")
        for key in PLOTTED:  # missing or null: a gap in the curve
            value = row.get(key)
            if isinstance(value, bool) or not (value is None or isinstance(value, int | float)):
                raise InputError(f"{path}:{number}: {key!r} is {json.dumps(value)[:40]}, not a number or null")
            try:
                float(value or 0)
            except OverflowError:  # an integer past float's range (JSON's integers have no bound)
                raise InputError(f"{path}:{number}: {key!r} is an integer of {len(str(value))} digits, past what a "
                                 "plot can draw") from None
        rows.append(row)
    return rows


def plot(run_dir: str, output: str | None = None) -> int:
    """Plot the training curves of a run (losses, rewards, accuracy, BCO delta) to a PNG.

    run_dir: run folder holding metrics.jsonl (or the metrics.jsonl file itself)
    output: PNG path (default: <run_dir>/curves.png; .png is appended to a name without a suffix)
    """
    path = Path(run_dir)
    metrics = path if path.is_file() else path / "metrics.jsonl"
    if not metrics.is_file():
        raise InputError(f"{metrics}: no metrics file")
    rows = read_metrics(metrics)
    if not rows:
        raise InputError(f"{metrics}: no metrics recorded yet")
    from internvl_mpo.processor.preview import png_output  # with torch (the processor package): after the checks

    target = png_output(output if output else metrics.parent / "curves.png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        if e.name == "matplotlib":
            raise InputError("plotting needs matplotlib: pip install 'internvl-mpo[plot]'") from None
        # installed but broken: matplotlib 3.7.0 to 3.7.2 install beside NumPy 2, which they were not built for
        raise InputError(f"matplotlib cannot be imported ({e}): pip install -U 'internvl-mpo[plot]'") from None

    panels = [(title, [k for k in keys if any(k in r for r in rows)]) for title, keys in PLOT_PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:  # plt.subplots(0, 1) raises ValueError
        raise InputError(f"{metrics}: no row holds a value to plot (one of {', '.join(PLOTTED)})")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for key in keys:
            steps = [r["step"] for r in rows if key in r]
            values = [math.nan if r[key] is None else r[key] for r in rows if key in r]  # null: a gap
            (line,) = ax.plot(steps, values, label=key)
            shown = [math.isfinite(v) for v in values]
            # a value with a gap (or the end) on both sides makes no line segment: a dot shows it
            alone = [i for i, ok in enumerate(shown) if ok and not any(shown[i - 1:i]) and not any(shown[i + 1:i + 2])]
            ax.plot([steps[i] for i in alone], [values[i] for i in alone], ".", color=line.get_color())
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))  # no ticks at step 1.5 on a short run
    steps = sorted({r["step"] for r in rows})
    if steps[-1] - steps[0] < 1:  # one step: the locator would tick fractions around it
        axes[-1, 0].set_xticks(steps)
    fig.tight_layout()
    from internvl_mpo.run_folder import writing

    try:
        with writing(target, "no picture was written; give --output a path where one can be"):  # read-only, full
            fig.savefig(target, dpi=100, format="png")
    finally:
        plt.close(fig)
    print(f"wrote {target}")
    return 0

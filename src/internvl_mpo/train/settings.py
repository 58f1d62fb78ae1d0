"""A training run's settings: `TrainConfig` (the `internvl-mpo train` flags one to one) and its checks, and
what a run derives from them: the loss weights (`MPOWeights` from `loss_weights`) and the sequence length
(`max_seq_length`). It imports no torch: `internvl-mpo train` checks its flags before torch loads (about 2 s)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from internvl_mpo.config import MAX_TILES, ModelConfig
from internvl_mpo.errors import ConfigError

MODES = ("mpo", "dpo", "sft")
REJECTED_SPANS = ("full", "divergent-line")
# (pref_weight, quality_weight, gen_weight) when the flag is not given.
LOSS_WEIGHT_KEYS = ("pref_weight", "quality_weight", "gen_weight")
MODE_WEIGHTS = {"mpo": (0.8, 0.2, 1.0), "dpo": (1.0, 0.0, 0.0), "sft": (0.0, 0.0, 1.0)}
# Each float setting's valid values (checked with "finite"); the optional ones only when given.
FLOAT_RANGES = {
    "beta": (lambda v: v > 0, "> 0"),
    "label_smoothing": (lambda v: 0 <= v <= 0.5, "in [0, 0.5]"),
    "lr": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_eps": (lambda v: v > 0, "> 0 (at 0 AdamW turns a gradient of exactly 0 into a NaN weight)"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
    "drop_path_rate": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "pref_weight": (lambda v: v >= 0, ">= 0"),
    "quality_weight": (lambda v: v >= 0, ">= 0"),
    "gen_weight": (lambda v: v >= 0, ">= 0"),
    "lora_alpha": (lambda v: v > 0, "> 0"),
}
# The whole-number settings that must be >= 1 (the optional ones only when given), and those >= 0.
POSITIVE_INTS = ("batch_size", "grad_accum", "epochs", "video_frames", "max_seq_length", "max_dynamic_patch")
COUNTS = ("max_steps", "save_every", "save_total_limit", "lora_rank", "num_workers")
# The settings that name files or folders: a pathlib.Path given from Python is kept as its text.
PATH_FIELDS = ("model", "data", "output", "image_root", "init_from_config", "tokenizer")
# --max-seq-length when not given (the official MPO recipe's), capped by the model's context.
DEFAULT_MAX_SEQ_LENGTH = 8192


def flag(name: str) -> str:
    """The `internvl-mpo train` flag of a `TrainConfig` field: max_steps -> --max-steps."""
    return "--" + name.replace("_", "-")


def count(n: int, noun: str) -> str:
    """'1 step', '2 steps'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not a whole number") from None


@dataclass(frozen=True)
class MPOWeights:
    """Weights of the MPO sum. Defaults are the InternVL2.5-MPO recipe (section 9.5)."""

    beta: float = 0.1
    pref_weight: float = 0.8  # sigmoid DPO, reference `sigmoid_loss_weight`
    quality_weight: float = 0.2  # BCO-pair, reference `bco_pair_loss_weight`
    gen_weight: float = 1.0  # SFT NLL, reference `rpo_alpha`
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run; the fields are the `internvl-mpo train` flags one to one, and errors name a
    field by its flag (`max_steps` is --max-steps)."""

    mode: str = "mpo"
    model: str | None = None
    data: str | None = None
    output: str | None = None
    image_root: str | None = None
    init_from_config: str | None = None
    tokenizer: str | None = None
    beta: float = 0.1
    pref_weight: float | None = None
    quality_weight: float | None = None
    gen_weight: float | None = None
    label_smoothing: float = 0.0
    rejected_span: str = "full"
    lr: float = 1e-6
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.03
    epochs: int = 1
    max_steps: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    max_seq_length: int | None = None
    max_dynamic_patch: int | None = None
    video_frames: int = 8
    max_pixels: int | None = None
    save_every: int = 0
    save_total_limit: int = 0
    seed: int = 42
    shuffle: bool = True
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_llm: bool = False
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_vision: bool = False
    drop_path_rate: float = 0.1
    grad_checkpointing: bool = True
    precompute_ref: bool = False
    skip_bad: bool = False
    resume: bool = False
    precision: str = "auto"
    device: str | None = None
    fsdp: bool = False
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        # `train()` from Python may get pathlib.Path objects: the run reads them as text (".jsonl" suffix checks,
        # trainer_state.json), so they are stored as their text, as the command line gives them
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))

    @property
    def single_jsonl(self) -> bool:
        """Whether --data names one .jsonl file (an SFT file; any case of the suffix) rather than a meta.json."""
        return self.data is not None and self.data.lower().endswith(".jsonl")

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be {', '.join(MODES[:-1])} or {MODES[-1]}, got {self.mode!r}")
        # No default model (chat and serve start the demo model): a forgotten --model must not train it.
        missing = [flag for flag, given in (
            ("--model (a checkpoint folder or hub id to train from; or --init-from-config config.json for random"
             " weights)", self.model is not None or self.init_from_config is not None),
            ("--data", self.data), ("--output", self.output)) if not given]
        if missing:
            names = ", ".join(missing[:-1]) + " and " + missing[-1] if len(missing) > 1 else missing[0]
            raise ConfigError(f"{names} {'are' if len(missing) > 1 else 'is'} required")
        if self.mode != "sft" and self.single_jsonl:
            raise ConfigError(f"--data {self.data}: {self.mode} reads a meta.json (MMPR layout) that lists the"
                              " annotation .jsonl files with their image root; only sft takes a single .jsonl")
        if self.image_root is not None and not (self.mode == "sft" and self.single_jsonl):
            raise ConfigError("--image-root applies to a single sft .jsonl; a meta.json gives each dataset its root")
        if self.model is not None and self.init_from_config is not None:
            raise ConfigError("give only one of --model and --init-from-config")
        if self.init_from_config is not None and self.tokenizer is None:
            raise ConfigError("--init-from-config needs --tokenizer DIR (the folder with the tokenizer files)")
        if self.rejected_span not in REJECTED_SPANS:
            raise ConfigError(f"--rejected-span must be {' or '.join(REJECTED_SPANS)}, got {self.rejected_span!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"--precision must be auto, bf16 or fp32, got {self.precision!r}")
        for names, lowest in (POSITIVE_INTS, 1), (COUNTS, 0):
            for name in names:
                value = getattr(self, name)
                if value is not None and value < lowest:
                    raise ConfigError(f"{flag(name)} must be >= {lowest}, got {value}")
        if self.max_dynamic_patch is not None and self.max_dynamic_patch > MAX_TILES:  # before the model loads
            raise ConfigError(f"--max-dynamic-patch must be at most {MAX_TILES} tiles, got {self.max_dynamic_patch}")
        if self.max_pixels is not None and self.max_pixels < 1:  # worded as every command's --max-pixels
            raise ConfigError(f"--max-pixels must be a whole number of pixels >= 1, got {self.max_pixels}")
        for name, (valid, expected) in FLOAT_RANGES.items():
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and valid(value)):
                raise ConfigError(f"{flag(name)} must be {expected}, got {value}")
        highest_seed = 2**32 - env_int("WORLD_SIZE", 1)
        if not 0 <= self.seed <= highest_seed:
            raise ConfigError(
                f"--seed must be in [0, {highest_seed}] (numpy seeds process r with seed + r), got {self.seed}"
            )
        if self.lora_vision and not self.lora_rank:
            raise ConfigError("--lora-vision needs --lora-rank > 0")
        if self.lora_alpha is not None and not self.lora_rank:
            raise ConfigError("--lora-alpha needs --lora-rank > 0 (without it the run is full fine-tuning)")
        # settings of the preference and quality terms, refused where no such term is computed
        given = [flag(name) for name in ("beta", "label_smoothing", "rejected_span", "precompute_ref")
                 if getattr(self, name) != TrainConfig.__dataclass_fields__[name].default]
        if given and self.mode == "sft":
            raise ConfigError(f"{', '.join(given)}: for the preference modes (mpo, dpo); sft has no preference loss")
        weights = loss_weights(self)
        if given and not (weights.pref_weight or weights.quality_weight):
            raise ConfigError(f"{', '.join(given)}: for the preference and quality terms, which --pref-weight 0 and"
                              " --quality-weight 0 turn off (only the --gen-weight NLL term trains)")
        if self.label_smoothing and not weights.pref_weight:  # BCO-pair (the quality term) has none
            raise ConfigError("--label-smoothing: for the sigmoid DPO term alone, which --pref-weight 0 turns off")

    @property
    def lora_scale(self) -> float:
        alpha = 2.0 * self.lora_rank if self.lora_alpha is None else self.lora_alpha
        return alpha / self.lora_rank if self.lora_rank else 0.0


def loss_weights(cfg: TrainConfig) -> MPOWeights:
    """The MPO weights of a run: the flags where given, else the mode's (mpo 0.8/0.2/1, dpo 1/0/0, sft 0/0/1)."""
    given = (cfg.pref_weight, cfg.quality_weight, cfg.gen_weight)
    pref, quality, gen = (g if g is not None else d for g, d in zip(given, MODE_WEIGHTS[cfg.mode]))
    for name, value in ("pref_weight", pref), ("quality_weight", quality):
        if cfg.mode == "sft" and value:
            raise ConfigError(f"{flag(name)} must be 0 in sft (it trains on conversations only, without a"
                              f" preference loss), got {value}")
    if not (pref or quality or gen):
        defaults = ", ".join(f"{w:g}" for w in MODE_WEIGHTS[cfg.mode])
        raise ConfigError(f"--pref-weight, --quality-weight and --gen-weight are all 0 ({cfg.mode}'s defaults:"
                          f" {defaults}): nothing to train")
    return MPOWeights(beta=cfg.beta, pref_weight=pref, quality_weight=quality, gen_weight=gen,
                      label_smoothing=cfg.label_smoothing)


def max_seq_length(cfg: TrainConfig, config: ModelConfig) -> int:
    """The run's sequence length: the flag, at most the model's context, else min(8192, context).

    RoPE is computed for any position, so a longer sequence would train silently on positions the
    model never saw (the official trainer does not check; its Qwen2.5 models have 32768)."""
    context = config.llm.max_position_embeddings
    if cfg.max_seq_length is None:
        return min(DEFAULT_MAX_SEQ_LENGTH, context)
    if cfg.max_seq_length > context:
        raise ConfigError(
            f"--max-seq-length {cfg.max_seq_length} is longer than the model's context of {context} tokens"
            f" (llm_config.max_position_embeddings); give at most {context} or leave the flag out"
        )
    return cfg.max_seq_length

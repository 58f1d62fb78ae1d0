"""The policy's model pieces: the forward training runs (`SequenceLogps`), the initial model (and, under FSDP2, each
sharded parameter's starting value: `initial_weight`), its frozen reference copy, and the set-up applied from
outside the model (drop-path rates, freezing, the optimizer)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

from internvl_mpo.chat.template import get_template
from internvl_mpo.chat.tokenizer import Tokenizer, check_vocabulary, load_tokenizer
from internvl_mpo.checkpoint import auto_dtype, open_state_dict, open_weights, resolve_checkpoint
from internvl_mpo.config import ModelConfig
from internvl_mpo.errors import ConfigError
from internvl_mpo.model import InternVL
from internvl_mpo.train.losses import label_logps_from_hidden
from internvl_mpo.train.settings import TrainConfig, max_seq_length
from internvl_mpo.vision import RMSNorm, layers_run

# Label log-probs are computed this many logits at a time (rows x vocabulary): 32 MiB in float32.
LOGPS_CHUNK_ELEMENTS = 2**23


class SequenceLogps(nn.Module):
    """InternVL -> summed label log-probs per row: the one forward that DDP and FSDP2 wrap.

    For a pair batch (rows [chosen; rejected]) the tiles of each pair are encoded once and the
    same features fill the context tokens of its chosen row and its rejected row.
    """

    def __init__(self, model: InternVL, encode_empty: bool = False):
        super().__init__()
        self.model = model
        self.encode_empty = encode_empty

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, pixel_values: torch.Tensor, pairs: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        vit_embeds = None
        if pixel_values.shape[0]:
            vit_embeds = model.extract_feature(pixel_values)  # (N, P, C)
            if pairs:
                vit_embeds = torch.cat([vit_embeds, vit_embeds])  # chosen rows' slots, then rejected rows'
        embeds = model.embed(input_ids, vit_embeds=vit_embeds)  # (R, T, C)
        if vit_embeds is None and self.encode_empty:
            # A zero that depends on the vision tower, added to the embeddings: every rank runs the same
            # backward (vision tower and projector, and the LLM blocks even when the LLM is frozen).
            size = model.config.image_size
            embeds = embeds + model.extract_feature(pixel_values.new_zeros(1, 3, size, size)).sum() * 0
        # Right padding: a causal mask alone keeps every pad out of every real token's view.
        hidden = model.hidden_states(embeds)  # (R, T, C)
        weight = model.language_model.output_head().weight
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        chunk = max(16, LOGPS_CHUNK_ELEMENTS // weight.shape[0])
        with torch.autocast(device_type, enabled=False):
            logps, n_tokens = label_logps_from_hidden(hidden.to(dtype), weight.to(dtype), labels, chunk_size=chunk)
        return logps, n_tokens


def load_initial_model(
    cfg: TrainConfig, device: torch.device, lazy: bool = False
) -> tuple[Tokenizer, InternVL, dict | None, str | None]:
    """The policy's starting point in float32 (a checkpoint, or random weights from a config.json), and the
    dtype name `dtype="auto"` gives it (`auto_dtype`, from the weight headers the load opened).

    With `lazy` (FSDP2) the model is built on the meta device and its weights come back apart, name ->
    a `LazyTensor` of the checkpoint (nothing read yet) or, for random weights, a host-memory tensor,
    for `fill_fsdp2` to read each rank's shard from; else they are in the model, on `device`.
    """
    folder = None if cfg.init_from_config is not None else resolve_checkpoint(cfg.model)
    config_path = cfg.init_from_config if folder is None else folder / "config.json"
    config = ModelConfig.from_json(config_path)
    get_template(config.template, config_path)  # the data is rendered with it: refused before the weights if unknown
    max_seq_length(cfg, config)  # and so is a --max-seq-length longer than the model's context
    initial = None
    weights = None if folder is None else open_weights(folder)  # each file's header read once, for all below
    if folder is None:
        tokenizer = load_tokenizer(cfg.tokenizer)
        if config.llm.vocab_size < len(tokenizer):
            raise ConfigError(
                f"{cfg.init_from_config}: vocab_size {config.llm.vocab_size} is smaller than the tokenizer's"
                f" {len(tokenizer)} tokens"
            )
        torch.manual_seed(cfg.seed)
        # drawn where they always were: a seed gives the same weights with or without FSDP2
        with torch.device(device):
            model = InternVL(config, image_token_id=tokenizer.img_context_id)
        model.init_weights()
        if lazy:
            initial = {key: value.cpu() for key, value in model.state_dict().items()}
            del model
            with torch.device("meta"):
                model = InternVL(config, image_token_id=tokenizer.img_context_id)
        model.source_dir = Path(cfg.tokenizer)
    else:
        tokenizer = load_tokenizer(cfg.tokenizer or folder)  # the resolved folder, also for a hub id
        check_vocabulary(tokenizer, config.llm.vocab_size)  # before the weights are read
        if lazy:
            with torch.device("meta"):
                model = InternVL(config)
            model.source_dir = folder
            initial = open_state_dict(folder, model.expected_keys(), weights=weights)
        else:
            model = InternVL.from_pretrained(folder, dtype=torch.float32, device=device, weights=weights)
        # the data's image context id is the tokenizer's; final/ gets --tokenizer's files, as the run used them
        model.image_token_id = tokenizer.img_context_id
        model.tokenizer_dir = Path(cfg.tokenizer) if cfg.tokenizer else None
    return tokenizer, model.train(), initial, auto_dtype(folder, config.torch_dtype, weights)


def initial_weight(initial: dict, adapters: dict, name: str):
    """The starting value of the sharded `SequenceLogps` parameter `name`: a LoRA adapter (made on the
    device), else the initial (or resumed) weight, under its official name."""
    key = name.removeprefix("model.")
    return adapters[key] if key in adapters else initial[key.replace(".base.", ".")]


def set_drop_path(model: InternVL, rate: float) -> None:
    """ViT stochastic depth rising linearly 0 -> rate over the layers (the official `linspace`)."""
    layers = model.vision_model.encoder.layers
    n = len(layers)
    for i, layer in enumerate(layers):
        layer.drop_path.rate = rate * i / (n - 1) if n > 1 else 0.0
    model.config = model.config.replace(vision=dataclasses.replace(model.config.vision, drop_path_rate=rate))


def disable_dropout(model: InternVL) -> None:
    """What TRL's `DPOTrainer` (`disable_dropout=True`, the official MPO trainer's default) does: every `nn.Dropout`
    to p = 0. In InternVL that is the ViT attention's `proj_drop` (`vision_config.dropout`); the attention dropouts
    are floats passed to the attention kernels (flash attention in the ViT, Qwen2's attention), which it leaves."""
    for layer in model.vision_model.encoder.layers:
        layer.attn.proj_dropout = 0.0


def make_reference(model: InternVL, bf16: bool) -> InternVL:
    """A frozen eval-mode copy of the initial model, stored in the dtype the policy computes with: bf16
    under FSDP2's bf16 mixed precision, else float32 (run under the policy's autocast, if any)."""
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    return ref.to(torch.bfloat16) if bf16 else ref


def freeze(model: InternVL, cfg: TrainConfig) -> None:
    """Freeze flags; LoRA freezes the base weights it adapts (and the rest of that tower)."""
    if cfg.freeze_vision or cfg.lora_vision:
        model.vision_model.requires_grad_(False)
    if cfg.freeze_projector:
        model.mlp1.requires_grad_(False)
    if cfg.freeze_llm or cfg.lora_rank:
        model.language_model.requires_grad_(False)
    layers = model.vision_model.encoder.layers  # those after select_layer never run: DDP would wait for their gradients
    layers[layers_run(model.config.select_layer, len(layers)):].requires_grad_(False)


def build_optimizer(model: InternVL, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on every trainable tensor except biases and norm weights."""
    no_decay = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.LayerNorm, RMSNorm)):
            no_decay.update(f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False))
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if name in no_decay or name.endswith("bias") else decay).append(param)
    if not decay and not plain:
        raise ConfigError("--freeze-vision, --freeze-projector and --freeze-llm without --lora-rank freeze every"
                          " parameter: nothing to train")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps
    )

"""Low-rank adapters (LoRA) on linear layers, merged into plain weights for saving.

`LoRALinear` wraps a frozen `nn.Linear` as `base` and adds `scale * B(A(x))` with A (r, in) drawn
like PEFT's default (Kaiming-uniform, a = sqrt(5)) and B (out, r) zero, so a fresh adapter changes
nothing; `scale = alpha / r`. The official wrappers use alpha = 2r (our default too) and adapter
dropout 0.05, which the official MPO trainer never applies: TRL's `DPOTrainer` (`disable_dropout=True`,
the default) sets every `nn.Dropout` to p = 0. There is no adapter dropout here (the official SFT
trainer, the plain HF Trainer, keeps 0.05).

The official InternVL code applies PEFT LoRA to the LLM's attention and MLP projections
(`wrap_llm_lora`: q/k/v/o and gate/up/down for Qwen2, wqkv/wo/w1/w2/w3 for InternLM2) and to the ViT's `attn.qkv`,
`attn.proj`, `mlp.fc1`, `mlp.fc2` (`wrap_backbone_lora`); the same modules are targeted here. The
head and the embeddings are not.

Checkpoints stay in the official layout: `merge_lora_state` turns a state dict with `x.base.weight`,
`x.lora_A`, `x.lora_B` into `x.weight = base + scale * B @ A` (computed in float32, cast back) and
`x.bias`, so the plain loader reads it with no adapter code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from internvl_mpo.errors import ConfigError
from internvl_mpo.vision import layers_run

# Qwen2 and InternLM2 projections (the official `wrap_llm_lora` target lists).
LLM_TARGETS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
)
VISION_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, device: torch.device | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        w = base.weight
        device = w.device if device is None else device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


def lora_target_names(model: nn.Module, vision: bool = False) -> list[str]:
    """Names of the nn.Linear modules of an InternVL that get adapters: the LLM's, and with `vision` the ViT's (none
    in ViT layers that select_layer leaves unrun)."""
    layers = model.vision_model.encoder.layers
    unrun = tuple(f"vision_model.encoder.layers.{i}." for i in
                  range(layers_run(model.config.select_layer, len(layers)), len(layers)))
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or unrun and name.startswith(unrun):
            continue
        llm = name.startswith("language_model.model.layers.") and name.endswith(LLM_TARGETS)
        if llm or vision and name.startswith("vision_model.encoder.layers.") and name.endswith(VISION_TARGETS):
            names.append(name)
    return names


def check_lora_rank(model: nn.Module, rank: int, vision: bool) -> None:
    """Refuse a rank that no adapted layer can use, before any adapter is made: `B @ A` has rank at most
    min(in_features, out_features), so past the largest such bound a rank only adds memory (`--lora-rank 10**9`
    asked for 256 GB per layer and ended in the allocator's traceback, or the kernel's OOM kill)."""
    names = lora_target_names(model, vision=vision)
    useful = max((min(m.in_features, m.out_features) for m in map(model.get_submodule, names)), default=0)
    if rank > useful:
        raise ConfigError(f"--lora-rank {rank} is more than any adapted layer can use: an adapter's update B @ A has"
                          f" rank at most min(in, out) of its layer, {useful} at the largest in this model")


def apply_lora(model: nn.Module, names: list[str], rank: int, alpha: float, device: torch.device | None = None) -> None:
    """Replace each named nn.Linear by a LoRALinear around it (parameter names gain `.base`); the adapters
    are made on `device` (default: their base weight's; a meta-built base under FSDP2 needs a real one)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name} is a {type(base).__name__}, not nn.Linear")
        setattr(parent, child, LoRALinear(base, rank, alpha, device))


def lora_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the adapter tensors of a state dict."""
    return {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))}


def merge_lora_state(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Official-layout state dict: adapters folded into their base weights, `.base.` removed."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        if key.endswith(".base.weight"):
            prefix = key[: -len(".base.weight")]
            a, b = state[prefix + ".lora_A"], state[prefix + ".lora_B"]
            merged = value.float() + scale * (b.float() @ a.float())
            out[prefix + ".weight"] = merged.to(value.dtype)
        elif key.endswith(".base.bias"):
            out[key[: -len(".base.bias")] + ".bias"] = value
        else:
            out[key] = value
    return out

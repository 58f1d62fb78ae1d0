"""Convert checkpoints between the official InternVL layout and transformers' native InternVL layout.

The official layout (`InternVLChatModel`, remote code) is what this package loads; transformers'
`InternVLForConditionalGeneration` (the `-hf` ports) renames keys and splits fused projections.
The rules are those of transformers' `models/internvl/convert_internvl_weights_to_hf.py`; the names
are the ones transformers writes to disk (and the hub `-hf` checkpoints hold):
- vision: `vision_model` -> `vision_tower`, `layers` -> `layer`, `class_embedding` -> `cls_token`,
  `position_embedding` -> `position_embeddings`, `patch_embedding` -> `patch_embeddings.projection`,
  `ls1/ls2` -> `lambda_1/lambda_2`, `attn.proj` -> `attention.projection_layer`, `attn` -> `attention`,
  `norm1/norm2` -> `layernorm_before/layernorm_after`; the fused `qkv` rows [Q | K | V] become
  `q_proj`, `k_proj`, `v_proj`;
- projector: `mlp1.0/1/3` -> `multi_modal_projector.layer_norm/linear_1/linear_2`;
- Qwen2 LLM: unchanged (`language_model.model.*`, `language_model.lm_head`);
- InternLM2 LLM -> Llama: `tok_embeddings` -> `embed_tokens`, `attention.wo` -> `self_attn.o_proj`,
  `feed_forward.w1/w3/w2` -> `mlp.gate_proj/up_proj/down_proj`, `attention_norm/ffn_norm` ->
  `input_layernorm/post_attention_layernorm`, `output` -> `lm_head`, and `wqkv` (grouped per kv head:
  H/K query heads, then k, then v) split into `q_proj`, `k_proj`, `v_proj`.
Reading also accepts transformers' in-memory names (`model.vision_tower.*`, `model.language_model.*`,
`lm_head.*`). Only one table is written (official -> transformers); the other direction is its exact
inverse, so a round trip gives back every tensor bit for bit. Tensors keep their dtype and are
streamed one at a time into shards, so memory stays near one shard. Config fields that change the
maths are carried both ways; the tiling (dynamic_image_size as crop_to_patches, the tile limits) goes
to preprocessor_config.json and comes back from it; the template is not part of transformers' files and
comes back as the InternVL2.5 one, the thumbnail always where tiling is on (transformers' processor adds it,
so use_thumbnail false with tiling on is refused). config.json's `system_message` (the official chat()'s
default system message) and a use_thumbnail false without tiling are kept in transformers' config.json
(transformers keeps keys it does not know) and come back.

The head: the official code never ties it (InternVLChatConfig forces tie_word_embeddings False), so
official configs say untied both ways. transformers 5 ties `lm_head` to the input embeddings when the
top-level `tie_word_embeddings` of an InternVLConfig is true (its default) and then saves no head; such
a folder converts with the head written out as a copy of the embedding matrix. A stored head is used
as it is (transformers unties a head that differs from the embeddings).

Other files: the tokenizer and generation files are copied unchanged, but to transformers
generation_config.json gets `<|im_end|>` among its eos ids (the hub `-hf` InternLM2 ports
ship a re-made Llama tokenizer; that is not done here), with the code files that tokenizer_config.json's
`auto_map` names (InternLM2's tokenization_internlm2*.py) and the modules they import from the folder. To transformers, the processor files are
written too: preprocessor_config.json (GotOcr2 tiling with the official tile size, ImageNet mean/std and
tile limits; it always adds the thumbnail, as InternVL2.5 does), processor_config.json (image tokens per
tile), chat_template.jinja (the official template: its default system message or config.json's, each image
item as `<IMG_CONTEXT>\n`, which the processor expands into `<img>` + tokens + `</img>`, and first the BOS
where the tokenizer adds one, as InternLM2's does) and the image tokens
named in tokenizer_config.json's `extra_special_tokens`. The official files this replaces
(tokenizer_config.json with its chat template, chat_template.jinja/.json) are kept, as text, in
`OFFICIAL_FILES`, which transformers does not read; to the official layout they are put back byte for byte
(a tokenizer_config.json changed since keeps its changes, with the official chat template back in it), so
official -> hf -> official gives back the official template, not transformers'. A folder without that file
(saved again by transformers elsewhere) whose template is still the one `--to hf` writes gets its official
form, image items as `<image>`, the placeholder the official chat() writes and vLLM expands; another
template (a hub `-hf` port's) is kept. To the official layout, the official remote code
(`auto_map`: modeling_internvl_chat.py and the files it imports) is not written: OpenGVLab's code
is not ours to ship; `remote_code_note` says where to get it, and (both ways) where to get tokenizer code
that tokenizer_config.json's `auto_map` names and the source lacked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from . import checkpoint, companions
from .chat.template import get_template
from .chat.tokenizer import adds_bos
from .config import FAMILY_SIZES, LLMConfig, ModelConfig, family_config, official_rope, read_config_json
from .errors import CheckpointError, ConfigError, InputError, SaveError, SettingError
from .jsonl import read_json_object
from .model import InternVL, context_token_id
from .processor.image import IMAGENET_MEAN, IMAGENET_STD

HF_ARCHITECTURE = "InternVLForConditionalGeneration"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
OFFICIAL_IMAGE = "<image>"  # an image in the official layout's prompts, before it is expanded
TOKENIZER_FILES = tuple(name for name in companions.COMPANION_FILES if name != "preprocessor_config.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# The official folder's files that `--to hf` replaces; the transformers folder keeps their text in
# OFFICIAL_FILES (a file transformers does not read) and `--to official` puts them back.
REPLACED_FILES = ("tokenizer_config.json", *CHAT_TEMPLATE_FILES, "generation_config.json", "preprocessor_config.json")
# files of REPLACED_FILES that conversions of an earlier date did not keep (they left them as they were)
LATER_KEPT = {"generation_config.json": "2026-12-04", "preprocessor_config.json": "2026-12-06"}
OFFICIAL_FILES = "internvl_official_files.json"
HEAD, EMBEDDINGS = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"  # transformers names

# Module renames inside one layer (official -> transformers), matched on the module path before
# ".weight" / ".bias" (or the whole name for parameters such as ls1).
_VISION_LAYER = {
    "ls1": "lambda_1", "ls2": "lambda_2", "attn.proj": "attention.projection_layer",
    "attn.q_norm": "attention.q_norm", "attn.k_norm": "attention.k_norm",
    "norm1": "layernorm_before", "norm2": "layernorm_after", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_VISION_TOP = {
    "embeddings.class_embedding": "embeddings.cls_token",
    "embeddings.position_embedding": "embeddings.position_embeddings",
    "embeddings.patch_embedding": "embeddings.patch_embeddings.projection",
}
_INTERNLM2_LAYER = {
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_PROJECTOR = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}


@dataclass(frozen=True)
class KeyMap:
    """One official tensor and the transformers tensor(s) it becomes: one renamed, or q/k/v of a fused one."""

    official: str
    hf: tuple[str, ...]
    fused: str | None = None  # None, "qkv" (vision rows [Q|K|V]) or "wqkv" (InternLM2 grouped rows)
    shape: tuple[int, ...] = ()  # of the official tensor


def _split_module(name: str) -> tuple[str, str]:
    """'a.b.weight' -> ('a.b', '.weight'); 'ls1' -> ('ls1', '')."""
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def _map_key(key: str, llm_arch: str) -> KeyMap:
    """The official key -> its transformers key(s) (shape left empty)."""
    if key.startswith("vision_model."):
        rest = key[len("vision_model."):]
        match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", rest)
        if match:
            module, suffix = _split_module(match[2])
            base = f"vision_tower.encoder.layer.{match[1]}."
            if module == "attn.qkv":
                return KeyMap(key, tuple(f"{base}attention.{p}_proj{suffix}" for p in "qkv"), "qkv")
            if module in _VISION_LAYER:
                return KeyMap(key, (base + _VISION_LAYER[module] + suffix,))
        module, suffix = _split_module(rest)
        if module in _VISION_TOP:
            return KeyMap(key, ("vision_tower." + _VISION_TOP[module] + suffix,))
    elif key.startswith("mlp1."):
        index, _, param = key[len("mlp1."):].partition(".")
        if index in _PROJECTOR:
            return KeyMap(key, (f"multi_modal_projector.{_PROJECTOR[index]}.{param}",))
    elif llm_arch == "Qwen2ForCausalLM":
        if key.startswith(("language_model.model.", "language_model.lm_head.")):
            return KeyMap(key, (key,))
    else:  # InternLM2
        fixed = {
            "language_model.output.weight": "language_model.lm_head.weight",
            "language_model.model.tok_embeddings.weight": "language_model.model.embed_tokens.weight",
            "language_model.model.norm.weight": "language_model.model.norm.weight",
        }
        if key in fixed:
            return KeyMap(key, (fixed[key],))
        match = re.fullmatch(r"language_model\.model\.layers\.(\d+)\.(.+)", key)
        if match:
            module, suffix = _split_module(match[2])
            base = f"language_model.model.layers.{match[1]}."
            if module == "attention.wqkv":
                return KeyMap(key, tuple(f"{base}self_attn.{p}_proj{suffix}" for p in "qkv"), "wqkv")
            if module in _INTERNLM2_LAYER:
                return KeyMap(key, (base + _INTERNLM2_LAYER[module] + suffix,))
    raise CheckpointError(f"no conversion rule for the official key {key!r}")


def key_maps(config: ModelConfig) -> list[KeyMap]:
    """The conversion table of every tensor of a model with this config."""
    with torch.device("meta"):
        expected = InternVL(config).expected_keys()
    maps = [_map_key(key, config.llm.architectures[0]) for key in expected]
    return [dataclasses.replace(m, shape=tuple(expected[m.official])) for m in maps]


def split_fused(tensor: torch.Tensor, fused: str | None, llm: LLMConfig) -> list[torch.Tensor]:
    if fused is None:
        return [tensor]
    if fused == "qkv":  # rows [Q all heads | K all heads | V all heads]
        return [t.contiguous() for t in tensor.chunk(3, dim=0)]
    kv, groups = llm.num_key_value_heads, llm.num_attention_heads // llm.num_key_value_heads
    rows = tensor.view(kv, groups + 2, llm.head_dim, *tensor.shape[1:])  # (K, H/K + 2, D, ...)
    q = rows[:, :groups].reshape(-1, *tensor.shape[1:])
    return [q.contiguous(), rows[:, -2].reshape(-1, *tensor.shape[1:]).contiguous(),
            rows[:, -1].reshape(-1, *tensor.shape[1:]).contiguous()]


def merge_fused(parts: list[torch.Tensor], fused: str | None, llm: LLMConfig) -> torch.Tensor:
    if fused is None:
        return parts[0]
    if fused == "qkv":
        return torch.cat(parts, dim=0)
    q, k, v = parts
    rest = q.shape[1:]
    grouped = [t.reshape(llm.num_key_value_heads, -1, llm.head_dim, *rest) for t in (q, k, v)]  # (K, n, D, ...)
    return torch.cat(grouped, dim=1).reshape(-1, *rest)


# ---- configs -------------------------------------------------------------------------------------


# transformers' InternVL builds the ViT's q_norm / k_norm (InternViT-6B's qk-normalisation) with its RMSNorm's
# default eps, whatever layer_norm_eps says; the official InternAttention gives them layer_norm_eps.
HF_QK_NORM_EPS = 1e-6


def _check_qk_norm_eps(qk_normalization: bool, eps: float, key: str) -> None:
    if qk_normalization and eps != HF_QK_NORM_EPS:
        raise ConfigError(f"{key} {eps} with qk-normalisation has no equivalent in transformers' InternVL, whose "
                          f"q_norm and k_norm always use eps {HF_QK_NORM_EPS} (the official code gives them "
                          "layer_norm_eps): the converted model would give other logits")


def hf_config_dict(config: ModelConfig, image_token_id: int) -> dict[str, Any]:
    """transformers' InternVLConfig (as config.json) for an official ModelConfig."""
    v, l = config.vision, config.llm
    _check_qk_norm_eps(v.qk_normalization, v.layer_norm_eps, "vision_config.layer_norm_eps")
    internlm2 = l.architectures[0] == "InternLM2ForCausalLM"
    vision = {
        "model_type": "internvl_vision", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
        "attention_bias": v.qkv_bias, "use_qk_norm": v.qk_normalization, "norm_type": v.norm_type,
        "layer_norm_eps": v.layer_norm_eps, "image_size": [v.image_size, v.image_size],
        "patch_size": [v.patch_size, v.patch_size], "num_channels": v.num_channels, "hidden_act": v.hidden_act,
        # the official proj_drop (`dropout`) follows the attention's output projection: transformers'
        # projection_dropout; its hidden_dropout_prob (embeddings and MLP outputs) has no official counterpart
        "hidden_dropout_prob": 0.0, "attention_dropout": v.attention_dropout,
        "projection_dropout": v.dropout, "layer_scale_init_value": v.initializer_factor,
        "initializer_range": v.initializer_range, "drop_path_rate": v.drop_path_rate,
        "use_absolute_position_embeddings": True, "use_mask_token": False, "use_mean_pooling": True,
    }
    text = {
        "model_type": "llama" if internlm2 else "qwen2",
        "architectures": ["LlamaForCausalLM" if internlm2 else "Qwen2ForCausalLM"],
        "hidden_size": l.hidden_size, "intermediate_size": l.intermediate_size,
        "num_hidden_layers": l.num_hidden_layers, "num_attention_heads": l.num_attention_heads,
        "num_key_value_heads": l.num_key_value_heads, "head_dim": l.head_dim, "vocab_size": l.vocab_size,
        "hidden_act": l.hidden_act, "rms_norm_eps": l.rms_norm_eps, "rope_theta": l.rope_theta,
        "rope_scaling": dict(l.rope_scaling) if l.rope_scaling else None,  # a copy: transformers edits it in place
        "max_position_embeddings": l.max_position_embeddings,
        "attention_dropout": l.attention_dropout, "tie_word_embeddings": l.tie_word_embeddings,
        "bos_token_id": l.bos_token_id, "eos_token_id": l.eos_token_id, "use_cache": True,
    }
    if "pad_token_id" in l.extra:
        text["pad_token_id"] = l.extra["pad_token_id"]
    if internlm2:  # Llama's attention_bias covers q/k/v/o, as InternLM2's `bias` covers wqkv and wo
        text.update(attention_bias=bool(l.extra.get("bias", True)), mlp_bias=False)
    else:
        text["use_sliding_window"] = False
    out = {
        "architectures": [HF_ARCHITECTURE], "model_type": "internvl", "vision_config": vision, "text_config": text,
        "image_token_id": image_token_id, "image_seq_length": config.num_image_token,
        "downsample_ratio": config.downsample_ratio, "projector_hidden_act": "gelu",
        # transformers asks its ViT for hidden states only where vision_feature_layer is true: 0 (the embeddings)
        # failed there ("'NoneType' object is not subscriptable"); the same entry counted from the end runs
        "vision_feature_layer": config.select_layer or -(v.num_hidden_layers + 1),
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": l.tie_word_embeddings,
    }
    if config.torch_dtype is not None:  # written `torch_dtype` or (newer transformers) `dtype`
        out["torch_dtype"] = config.torch_dtype
    # official settings transformers' InternVL has no key for, kept (transformers keeps unknown keys) for the way back
    if system_message(config) is not None:
        out["system_message"] = system_message(config)
    if config.select_layer == 0:  # written as -(layers + 1) above: the official value comes back
        out["select_layer"] = 0
    if not config.use_thumbnail:  # tiling off (--to hf refuses it with tiling on): `max_num` runs tile without one
        out["use_thumbnail"] = False
    if not config.dynamic_image_size:  # transformers' InternVLProcessor tiles whatever crop_to_patches says (its
        # images_kwargs default): preprocessor_config.json allows one tile; the official settings come back from here
        out.update(dynamic_image_size=False, min_dynamic_patch=config.min_dynamic_patch,
                   max_dynamic_patch=config.max_dynamic_patch)
    return out


def system_message(config: ModelConfig) -> str | None:
    """config.json's `system_message`, which the official chat() uses as its default; None: the template's."""
    stored = config.extra.get("system_message")
    return stored if isinstance(stored, str) else None


def _select_layer(d: dict[str, Any], vision: dict[str, Any]) -> Any:
    """The official select_layer of a transformers config: its vision_feature_layer, or 0 where `--to hf` wrote 0
    as -(layers + 1) (`hf_config_dict`) and kept it in `select_layer`."""
    layer = d.get("vision_feature_layer", -1)
    layers = vision.get("num_hidden_layers")
    if d.get("select_layer") == 0 and isinstance(layers, int) and layer == -(layers + 1):
        return 0
    return layer


def config_from_hf(d: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> ModelConfig:
    """The official ModelConfig for a transformers InternVLConfig dict (config.json); the tiling
    (`crop_to_patches`, the tile limits) comes from the GotOcr2 `preprocessor` dict (preprocessor_config.json)
    when given, and is InternVL's (12 tiles and a thumbnail) without one."""
    if d.get("model_type") != "internvl":
        raise ConfigError(f"model_type {d.get('model_type')!r} is not transformers' 'internvl'")
    v, t = d.get("vision_config") or {}, d.get("text_config") or {}
    for where, section in (("", d), ("text_config.", t), ("vision_config.", v)):
        quant = section.get("quantization_config")
        if quant:  # AWQ, GPTQ (packed integer weights), FP8 (float8 weights): each with scales
            method = quant.get("quant_method") if isinstance(quant, dict) else quant
            raise ConfigError(f"{where}quantization_config (quant_method {method!r}): quantized weights are not "
                              "implemented; convert the unquantized release")
    kind = t.get("model_type")
    if kind not in ("llama", "qwen2"):
        raise ConfigError(f"text_config.model_type {kind!r} is not implemented (only 'llama' and 'qwen2')")
    if d.get("vision_feature_select_strategy", "default") != "default" or not isinstance(
            d.get("vision_feature_layer", -1), int):
        raise ConfigError("only vision_feature_select_strategy 'default' with one vision_feature_layer is implemented")
    if d.get("projector_hidden_act", "gelu") != "gelu":
        raise ConfigError(f"projector_hidden_act {d.get('projector_hidden_act')!r} is not implemented (only 'gelu')")

    def square(value, name):
        values = value if isinstance(value, (list, tuple)) else [value]
        if len(set(values)) != 1:
            raise ConfigError(f"vision_config.{name} {value} is not square")
        return values[0]

    image_size = square(v.get("image_size", 448), "image_size")
    vision = {
        "hidden_size": v.get("hidden_size"), "intermediate_size": v.get("intermediate_size"),
        "num_hidden_layers": v.get("num_hidden_layers"), "num_attention_heads": v.get("num_attention_heads"),
        "patch_size": square(v.get("patch_size", 14), "patch_size"), "image_size": image_size,
        "num_channels": v.get("num_channels", 3), "norm_type": v.get("norm_type", "layer_norm"),
        "layer_norm_eps": v.get("layer_norm_eps", 1e-6), "qkv_bias": v.get("attention_bias", False),
        "qk_normalization": v.get("use_qk_norm", False), "hidden_act": v.get("hidden_act", "gelu"),
        "dropout": v.get("projection_dropout", 0.0), "attention_dropout": v.get("attention_dropout", 0.0),
        "drop_path_rate": v.get("drop_path_rate", 0.0), "initializer_factor": v.get("layer_scale_init_value", 0.1),
        "initializer_range": v.get("initializer_range", 1e-10),
    }
    rope = official_rope(t)
    scaling = rope.get("rope_scaling")
    if isinstance(scaling, dict):  # transformers adds rope_type (and its copy of rope_theta); the official
        factor = scaling.get("factor")  # InternLM2Config reads exactly {"type", "factor"}, the factor a float
        copies = ("type", "rope_type") + (("rope_theta",) if scaling.get("rope_theta") == rope.get("rope_theta") else ())
        scaling = {**{k: v for k, v in scaling.items() if k not in copies},
                   "type": scaling.get("type", scaling.get("rope_type"))}
        if isinstance(factor, int) and not isinstance(factor, bool):
            scaling["factor"] = float(factor)
    internlm2 = kind == "llama"
    if internlm2 and t.get("mlp_bias"):
        raise ConfigError("text_config.mlp_bias=true has no InternLM2 equivalent")
    if t.get("use_sliding_window") and t.get("sliding_window") is not None:  # transformers' Qwen2 then uses it
        raise ConfigError("text_config.use_sliding_window=true (sliding-window attention) is not implemented")
    # a key left out means what transformers' LlamaConfig (InternLM2) or Qwen2Config defaults it to
    context, bos, eos = (2048, 1, 2) if internlm2 else (32768, None, None)
    llm = {
        "hidden_size": t.get("hidden_size"), "intermediate_size": t.get("intermediate_size"),
        "num_hidden_layers": t.get("num_hidden_layers"), "num_attention_heads": t.get("num_attention_heads"),
        "num_key_value_heads": t.get("num_key_value_heads") or t.get("num_attention_heads"),
        "vocab_size": t.get("vocab_size"), "hidden_act": t.get("hidden_act", "silu"),
        "rms_norm_eps": t.get("rms_norm_eps", 1e-6), "rope_theta": rope.get("rope_theta", 10000.0),
        "rope_scaling": scaling, "max_position_embeddings": t.get("max_position_embeddings", context),
        "attention_dropout": t.get("attention_dropout", 0.0), "bos_token_id": t.get("bos_token_id", bos),
        "eos_token_id": t.get("eos_token_id", eos),
        "architectures": ["InternLM2ForCausalLM" if internlm2 else "Qwen2ForCausalLM"],
        "model_type": "internlm2" if internlm2 else "qwen2",
    }
    if internlm2:
        llm["bias"] = bool(t.get("attention_bias", False))
    if t.get("pad_token_id") is not None:
        llm["pad_token_id"] = t["pad_token_id"]
    preprocessor = {"crop_to_patches": True} if preprocessor is None else preprocessor  # none: InternVL's tiling
    tiles = {name: preprocessor.get(key, default)
             for name, key, default in (("min_dynamic_patch", "min_patches", 1), ("max_dynamic_patch", "max_patches", 12))}
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in tiles.values()):
        raise ConfigError(f"preprocessor_config.json: min_patches and max_patches must be integers >= 1, got {tiles}")
    cropping = preprocessor.get("crop_to_patches", False)
    if not isinstance(cropping, bool):
        raise ConfigError(f"preprocessor_config.json: crop_to_patches is {json.dumps(cropping)}, not true or false")
    # transformers' InternVLProcessor passes crop_to_patches=True to its image processor whatever
    # preprocessor_config.json says (the hub -hf ports save false, GotOcr2's default): it tiles up to max_patches.
    # Tiling is off only where `--to hf` kept the official dynamic_image_size false in config.json.
    dynamic = d.get("dynamic_image_size") is not False
    if not dynamic:
        tiles = {name: d.get(name, tiles[name]) for name in tiles}
    official = {
        "vision_config": vision, "llm_config": llm, "template": "internvl2_5", "ps_version": "v2",
        "downsample_ratio": d.get("downsample_ratio", 0.5), "select_layer": _select_layer(d, v),
        "force_image_size": image_size, "dynamic_image_size": dynamic,
        # GotOcr2 adds a thumbnail to every tiled image; without tiling, the value --to hf kept (max_num runs tile)
        "use_thumbnail": True if dynamic else d.get("use_thumbnail", True), **tiles,
    }
    if isinstance(d.get("system_message"), str):  # what --to hf keeps of the official config.json
        official["system_message"] = d["system_message"]
    dtype = d.get("dtype", d.get("torch_dtype"))  # transformers reads `dtype` first (ModelConfig.torch_dtype too)
    if dtype is not None:
        official["torch_dtype"] = dtype
    try:  # the official config.json it becomes, read (and each value checked) as loading it reads it
        config = ModelConfig.from_dict(official)
    except ConfigError as e:
        raise ConfigError(f"{e} (the official config.json's name of the key)") from None
    if t.get("head_dim") not in (None, config.llm.head_dim):
        raise ConfigError(f"text_config.head_dim {t['head_dim']} is not hidden_size / num_attention_heads")
    _check_qk_norm_eps(config.vision.qk_normalization, config.vision.layer_norm_eps, "vision_config.layer_norm_eps")
    return config


def _ties_head(d: dict[str, Any]) -> bool:
    """Whether transformers 5 ties lm_head to the embeddings for this InternVLConfig dict: it reads the
    top-level tie_word_embeddings (default true), not text_config's."""
    return bool(d.get("tie_word_embeddings", True))


def _read_json(path: Path, what: str = "settings") -> dict[str, Any]:
    """A JSON file of `what` (an object); missing, unreadable, not JSON or another type: a ConfigError."""
    return read_json_object(path, ConfigError, "no such config file", what)


# ---- tensors -------------------------------------------------------------------------------------


class _ShardWriter:
    """Collects tensors and writes numbered shards of at most `limit` bytes, then the index."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total = 0
        self.metadata = checkpoint.save_metadata()

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.limit:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        path = self.folder / f"partial-{len(self.written):05d}.safetensors"
        checkpoint.save_tensors(self.pending, path, metadata=self.metadata)
        self.written.append((path, list(self.pending)))
        self.pending, self.size = {}, 0

    def close(self) -> None:
        self._flush()
        if len(self.written) == 1:
            self.written[0][0].rename(self.folder / checkpoint.SINGLE_FILE)
            return
        mapping = {}
        n = len(self.written)
        for i, (path, keys) in enumerate(self.written, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / name)
            mapping.update({key: name for key in keys})
        index = {"metadata": {"total_size": self.total, checkpoint.SAVE_ID: self.metadata[checkpoint.SAVE_ID]},
                 "weight_map": dict(sorted(mapping.items()))}
        (self.folder / checkpoint.INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# transformers writes the layout above (that of the hub `-hf` checkpoints); its in-memory names, which
# some tools save, are read too.
_HF_MEMORY_PREFIXES = {
    "model.vision_tower.": "vision_tower.", "model.multi_modal_projector.": "multi_modal_projector.",
    "model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
}


def hf_disk_name(key: str) -> str:
    for memory, disk in _HF_MEMORY_PREFIXES.items():
        if key.startswith(memory):
            return disk + key[len(memory):]
    return key


def _check_keys(folder: Path, present: set[str], expected: set[str]) -> None:
    missing = sorted(expected - present)
    unexpected = sorted(present - expected)
    if missing or unexpected:
        parts = [f"{len(missing)} missing: {', '.join(missing[:8])}"] if missing else []
        parts += [f"{len(unexpected)} unexpected: {', '.join(unexpected[:8])}"] if unexpected else []
        raise CheckpointError(f"{folder}: the weights do not match config.json ({'; '.join(parts)})")


def _check_shape(folder: Path, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{folder}: {name} has shape {list(tensor.shape)}, config.json implies {list(shape)}")


def _check_destination(src: Path, dst: Path) -> None:
    """InputError for a `dst` that cannot be written: `src` (a local folder), a file, a folder that is not
    empty, or one under a file."""
    try:
        resolved = dst.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13)
        raise InputError(f"{dst}: cannot be used as a folder ({e})") from None
    if src.exists() and resolved == src.resolve():
        raise InputError(f"{dst}: the destination must differ from the source folder")
    if dst.exists() and not dst.is_dir():
        raise InputError(f"{dst} is a file; give a new folder")
    above = next(p for p in (dst.absolute(), *dst.absolute().parents) if p.exists())
    if not above.is_dir():
        raise InputError(f"{dst}: {above} is a file, not a folder; give a new folder")
    _check_empty(dst)


def _check_empty(dst: Path) -> None:
    """InputError unless `dst` is missing or holds nothing (but the lock and the `_staging` folder of a
    conversion)."""
    if not dst.is_dir():
        return
    # each entry by its name in the folder, never resolved: an entry that is a symlink loop makes DST not empty
    stage, folder = _staging(dst), dst.resolve()
    if any(path.name != checkpoint.SAVE_LOCK and folder / path.name != stage for path in dst.iterdir()):
        raise InputError(f"{dst} exists and is not empty; give a new folder")


def _staging(dst: Path) -> Path:
    """The folder a conversion into `dst` writes, to appear as `dst` only once complete (`_publish`): beside it,
    `.NAME.convert.tmp`, renamed onto it; inside it where `dst` is a mount point, which no rename replaces, or
    inside it too where its parent cannot be written. The one a killed conversion left is emptied by the next
    conversion into `dst`."""
    dst = dst.resolve()
    inside = dst / ".convert.tmp"
    # inside too where a conversion killed there left its staging folder (one run from DST itself, say)
    if dst.is_dir() and (os.path.ismount(dst) or not os.access(dst.parent, os.W_OK) or _holds_cwd(dst)
                         or inside.is_dir()):
        return inside
    name = f".{dst.name}.convert.tmp"
    try:
        longest = os.pathconf(dst.parent, "PC_NAME_MAX") if dst.parent.is_dir() else 255
    except (OSError, ValueError):
        longest = 255
    if len(os.fsencode(name)) > longest:  # a destination name near the limit: a name of its hash instead
        name = f".{hashlib.sha256(os.fsencode(dst.name)).hexdigest()[:32]}.convert.tmp"
    return dst.parent / name


def _holds_cwd(folder: Path) -> bool:
    """Whether the working directory is `folder` (or under it): a rename onto it would leave this process, and
    the shell it was started from, in the deleted folder it replaced (`convert SRC .` in an empty folder)."""
    try:
        return Path.cwd().resolve().is_relative_to(folder)
    except OSError:  # the working directory was deleted
        return False


def _clear(stage: Path) -> None:
    """Remove all but the save lock from `stage` (the files of a killed conversion)."""
    for path in stage.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.name != checkpoint.SAVE_LOCK:
            path.unlink()


def _publish(stage: Path, dst: Path) -> None:
    """Make the complete `stage` appear as `dst` (missing, or an empty folder this conversion holds locked), its
    files synced to disk first: in one rename, or (a stage inside `dst`) file by file."""
    checkpoint.fsync_tree(stage)
    if stage.parent == dst:
        for path in stage.iterdir():
            if path.name != checkpoint.SAVE_LOCK:
                os.replace(path, dst / path.name)
    else:
        if dst.is_dir():  # the empty folder given gives way, its mode kept
            shutil.copymode(dst, stage)
            (dst / checkpoint.SAVE_LOCK).unlink(missing_ok=True)
        os.replace(stage, dst)
        (dst / checkpoint.SAVE_LOCK).unlink(missing_ok=True)  # the stage's, renamed with it
    checkpoint.fsync_path(dst)
    checkpoint.fsync_path(dst.parent)


def convert(
    src: str | Path, dst: str | Path, to: str, image_token_id: int | None = None, max_shard_size: int | str = "5GB"
) -> Path:
    """Convert the checkpoint folder (or hub id) `src` into `dst`: to="hf" (official -> transformers) or "official".

    `image_token_id` (to="hf" only) defaults to the id of `<IMG_CONTEXT>` in src's tokenizer files.
    """
    if to not in ("hf", "official"):
        raise SettingError("", "to", f"={to!r}: choose 'hf' (official -> transformers) or 'official' "
                           "(transformers -> official)")
    dst = Path(dst).expanduser()
    checkpoint.parse_size(max_shard_size)
    _check_destination(Path(src).expanduser(), dst)  # before a hub id is downloaded (gigabytes)
    src = checkpoint.resolve_checkpoint(src)  # a folder, or a hub id downloaded to the cache
    source_config = read_config_json(src / "config.json")
    # each is read or copied where it is a file: a link leading nowhere would read as absent
    for name in (*companions.COMPANION_FILES, OFFICIAL_FILES):
        if why := companions.broken_link(src / name):
            raise CheckpointError(why)
    if source_config.get("model_type") in {"hf": ("internvl",), "official": (None, "internvl_chat")}[to]:
        raise InputError(f"{src} is already in the {'transformers' if to == 'hf' else 'official'} layout "
                         f"(model_type {source_config.get('model_type')!r}); nothing to convert")
    if to == "hf":
        config = ModelConfig.from_file_dict(source_config, src / "config.json")
        get_template(config.template, src / "config.json")  # its chat template is written last: checked now
        generation = _generation_config(src, config)
        if config.dynamic_image_size and not config.use_thumbnail:
            raise ConfigError(f"{src / 'config.json'}: use_thumbnail false (what a config.json without the key "
                              "means) has no equivalent in transformers' InternVL processor, which adds a thumbnail "
                              "to every image it tiles; set \"use_thumbnail\": true to convert")
        image_token_id = context_token_id(src, config.llm.vocab_size, image_token_id)
        if image_token_id is None:
            raise CheckpointError(
                f"{src}: no {IMG_CONTEXT_TOKEN} in the tokenizer files (tokenizer.json, tokenizer_config.json, "
                "added_tokens.json); copy the model's tokenizer files there (from Python: pass image_token_id=)"
            )
        try:
            out_config = hf_config_dict(config, image_token_id)
        except ConfigError as e:
            raise ConfigError(f"{src / 'config.json'}: {e}") from None
    else:
        if source_config.get("architectures") not in (None, [HF_ARCHITECTURE]):
            raise ConfigError(f"{src / 'config.json'}: architectures {source_config['architectures']} is not "
                              f"[{HF_ARCHITECTURE!r}]")
        preprocessor = src / "preprocessor_config.json"
        tiling = _read_json(preprocessor) if preprocessor.is_file() else None
        if (isinstance(tiling, dict) and tiling.get("crop_to_patches") is False and (src / OFFICIAL_FILES).is_file()
                and "dynamic_image_size" not in source_config):
            # `--to hf` before 2026-12-07 of an official config with tiling off: it wrote dynamic_image_size as
            # crop_to_patches and the limits as min/max_patches (a hub -hf port has no OFFICIAL_FILES)
            source_config = {**source_config, "dynamic_image_size": False,
                             "min_dynamic_patch": tiling.get("min_patches", 1),
                             "max_dynamic_patch": tiling.get("max_patches", 12)}
        vision = source_config.get("vision_config")
        if (isinstance(vision, dict) and vision.get("hidden_dropout_prob") and (src / OFFICIAL_FILES).is_file()):
            # `--to hf` before 2026-12-07 wrote the official dropout (proj_drop) as hidden_dropout_prob, which it
            # now writes 0.0, and attention_dropout as projection_dropout: the dropout comes back from there
            source_config = {**source_config,
                             "vision_config": {**vision, "projection_dropout": vision["hidden_dropout_prob"]}}
        try:
            config = config_from_hf(source_config, tiling)
        except ConfigError as e:  # its errors name the key (preprocessor_config.json's, or config.json's)
            raise ConfigError(f"{src}: {e}") from None
        out_config = config.to_dict()

    maps = key_maps(config)
    mapping, handles, *_ = checkpoint.open_weights(src)  # each file's header read once, for the keys and the tensors
    names = {key: key for key in mapping}  # the name the table uses -> the name in the files
    tied_head = False
    if to == "official":
        names = {hf_disk_name(key): key for key in mapping}
        tied_head = HEAD not in names and EMBEDDINGS in names and _ties_head(source_config)
        if tied_head:
            names[HEAD] = names[EMBEDDINGS]  # the tied head is the embedding matrix
    source_keys = [k for m in maps for k in ((m.official,) if to == "hf" else m.hf)]
    _check_keys(src, set(names), set(source_keys))
    target = dst.resolve()  # a link to an empty folder: the folder it names is the one replaced
    stage = _staging(target)
    with contextlib.ExitStack() as held:
        if target.is_dir():  # an empty folder given: another save into it meanwhile is refused, as one into stage
            held.enter_context(checkpoint.save_lock(target))
        checkpoint.make_folder(stage)
        held.enter_context(checkpoint.save_lock(stage))
        try:
            _check_empty(dst)  # again, under the locks: another conversion may have written there meanwhile
            _clear(stage)  # what a conversion killed part way left
            writer = _ShardWriter(stage, checkpoint.parse_size(max_shard_size))
            for m in maps:
                if to == "hf":
                    tensor = _read(handles, mapping[m.official], m.official)
                    _check_shape(src, m.official, tensor, m.shape)
                    for key, part in zip(m.hf, split_fused(tensor, m.fused, config.llm)):
                        writer.add(key, part)
                else:
                    parts = [_read(handles, mapping[names[key]], names[key]) for key in m.hf]
                    try:
                        merged = merge_fused(parts, m.fused, config.llm)
                    except RuntimeError:  # parts of sizes that do not fit together
                        raise CheckpointError(
                            f"{src}: {', '.join(m.hf)} do not fit {m.official} {list(m.shape)}") from None
                    _check_shape(src, ", ".join(m.hf), merged, m.shape)
                    if tied_head and m.hf == (HEAD,):  # InternLM2's official name is language_model.output
                        merged = merged.clone()  # a copy: safetensors refuses to save tensors that share memory
                    writer.add(m.official, merged)
            writer.close()
            _write_json(stage / "config.json", out_config)
            for name in TOKENIZER_FILES + _tokenizer_code(src):
                if (src / name).is_file() and not (to == "hf" and name in CHAT_TEMPLATE_FILES):
                    checkpoint.copy_file(src / name, stage / name)
            if to == "hf":
                originals = {name: _text(src / name) for name in REPLACED_FILES}
                _write_processor_files(stage, config, adds_bos(src))
                if generation is not None:
                    _write_json(stage / "generation_config.json", generation)
                _write_json(stage / OFFICIAL_FILES,
                            {"files": originals, "hf_tokenizer_config": _text(stage / "tokenizer_config.json")})
            else:
                tokenizer = {name: stage / name for name in companions.PROCESSOR_TOKEN_FILES}
                for name, text in companions.without_processor_tokens(tokenizer, config.llm.vocab_size).items():
                    (stage / name).write_text(text, encoding="utf-8")
                ending = official_template_files(src, lambda name: _text(stage / name), config)
                for name, text in ending.items():
                    if text is None:
                        (stage / name).unlink(missing_ok=True)
                    else:
                        (stage / name).write_bytes(text.encode("utf-8"))
            _publish(stage, target)
        except BaseException as e:  # nothing of it is kept: the destination is as it was
            shutil.rmtree(stage, ignore_errors=True)
            reason = checkpoint.write_failure(e)
            if reason is None:
                raise
            raise SaveError(dst, reason, "nothing of the conversion was kept") from None
    if stage.parent == target:  # emptied into the folder
        shutil.rmtree(stage)
    return dst


def _read(handles: dict, file: Path, key: str) -> torch.Tensor:
    """One tensor; a key its file does not hold, integer weights, or NaN or inf, is an error naming the file."""
    try:
        tensor = handles[file].get_tensor(key)
    except SafetensorError as e:
        raise CheckpointError(f"{file}: cannot read {key} ({e})") from None
    if not tensor.is_floating_point():
        raise CheckpointError(f"{file}: {key} is stored as {tensor.dtype}, not floating point")
    if tensor.element_size() == 1:  # float8: a quantized checkpoint's, whose scales are not converted
        raise checkpoint.float8_error(file, key, str(tensor.dtype).removeprefix("torch."))
    checkpoint.check_finite(tensor, file, key)
    return tensor


def _text(path: Path) -> str | None:
    """The text of a file, None if there is none."""
    if not path.is_file():
        return None
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None


def official_template_files(src: Path, ending: Callable[[str], str | None], config: ModelConfig
                            ) -> dict[str, str | None]:
    """The chat template files (`REPLACED_FILES`) of an official-layout folder whose tokenizer files come from
    `src`, a transformers folder: name -> text, None for no such file; `ending(name)` is the text that folder
    would end with otherwise (None: none). `convert --to official` and `InternVL.save_pretrained` (with a
    `tokenizer_dir`) both write them. With `OFFICIAL_FILES` the official files `--to hf` replaced come back
    byte for byte (a tokenizer_config.json changed since keeps its changes, with the official chat template
    back in it). Without it (transformers saved the folder again elsewhere), a template still one that `--to hf`
    writes for `config` (with or without the BOS, the config's system message or the template's: earlier
    conversions wrote neither) gets its official form, image items as `<image>`; a template of another origin
    (a hub `-hf` port's, the user's) stays, as do the files not named."""
    if (src / OFFICIAL_FILES).is_file():
        return _official_files(src, ending)
    official = {chat_template(config.template, system=system, bos=bos):
                chat_template(config.template, OFFICIAL_IMAGE, system, bos)
                for system in {None, system_message(config)} for bos in (False, True)}
    out: dict[str, str | None] = {}
    if _text(src / "chat_template.jinja") in official:
        out["chat_template.jinja"] = official[_text(src / "chat_template.jinja")]
    for name in ("tokenizer_config.json", "chat_template.json"):
        data = _read_json(src / name) if (src / name).is_file() else None
        if isinstance(data, dict) and data.get("chat_template") in official:
            out[name] = _json_text({**json.loads(ending(name) or "{}"),
                                    "chat_template": official[data["chat_template"]]})
    return out


def _official_files(src: Path, ending: Callable[[str], str | None]) -> dict[str, str | None]:
    """The official files kept in `OFFICIAL_FILES`, and tokenizer_config.json as `official_template_files`
    says."""
    kept = _read_json(src / OFFICIAL_FILES)
    files = kept.get("files") if isinstance(kept, dict) else None
    if not (isinstance(files, dict) and set(REPLACED_FILES) - set(LATER_KEPT) <= set(files) <= set(REPLACED_FILES)
            and all(text is None or isinstance(text, str) for text in files.values())):
        raise ConfigError(f"{src / OFFICIAL_FILES}: not the file convert --to hf writes (delete it to convert "
                          "without it)")
    original = files.pop("tokenizer_config.json")
    if _text(src / "tokenizer_config.json") == kept.get("hf_tokenizer_config"):
        files["tokenizer_config.json"] = original
    elif original is not None and (current := ending("tokenizer_config.json")) is not None:  # changed since
        template = json.loads(original).get("chat_template")
        tokenizer_config = json.loads(current)
        tokenizer_config.pop("chat_template", None)
        if template is not None:
            tokenizer_config["chat_template"] = template
        files["tokenizer_config.json"] = _json_text(tokenizer_config)
    return files


def _json_text(value: dict[str, Any]) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(_json_text(value), encoding="utf-8")


def _tokenizer_code(folder: Path) -> tuple[str, ...]:
    path = folder / "tokenizer_config.json"
    return tuple(companions.remote_code(folder, [_read_json(path)])) if path.is_file() else ()


def chat_template(template: str = "internvl2_5", image: str = IMG_CONTEXT_TOKEN, system: str | None = None,
                  bos: bool = False) -> str:
    """The chat template (Jinja) for an official template: the official prompt, with each image item written
    as `image` + `\\n` and each video item as `<video>\\n`. For transformers' layout `image` is `<IMG_CONTEXT>`,
    the placeholder its processor expands; for the official layout `<image>` (`OFFICIAL_IMAGE`), the one the
    official chat() writes and vLLM expands into `<img>` + context tokens + `</img>`. `system`: the default
    system message (config.json's; None: the template's). `bos`: the tokenizer's BOS first, as in the official
    chat()'s prompt where the tokenizer adds one (InternLM2's): transformers' `tokenizer.apply_chat_template`
    and vLLM's chat endpoint add no special tokens to the text rendered (transformers' processor adds none to a
    text that starts with it)."""
    system = json.dumps(get_template(template).system_message if system is None else system, ensure_ascii=False)
    return ("{{ bos_token }}" if bos else "") + (
        "{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n' + " + system + " + '<|im_end|>\\n' }}"
        "{%- endif %}{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string %}{{ message['content'] }}"
        "{%- else %}{%- for item in message['content'] %}"
        "{%- if item['type'] == 'image' %}{{ '" + image + "\\n' }}"
        "{%- elif item['type'] == 'video' %}{{ '<video>\\n' }}"
        "{%- elif item['type'] == 'text' %}{{ item['text'] }}{%- endif %}"
        "{%- endfor %}{%- endif %}{{ '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def _write_processor_files(dst: Path, config: ModelConfig, bos: bool) -> None:
    """What transformers' AutoProcessor reads for InternVLProcessor (GotOcr2 image processor); `bos`: whether the
    tokenizer starts each text with its BOS (`chat_template`)."""
    size = config.image_size
    _write_json(dst / "preprocessor_config.json", {
        "image_processor_type": "GotOcr2ImageProcessorFast", "processor_class": "InternVLProcessor",
        "do_convert_rgb": True, "do_resize": True, "size": {"height": size, "width": size}, "resample": 3,  # bicubic
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
        # tiling off: at most one tile, since InternVLProcessor sets crop_to_patches itself (GotOcr2 tiles only
        # where max_patches > 1); config.json keeps the official limits for the way back
        "crop_to_patches": config.dynamic_image_size,
        "min_patches": config.min_dynamic_patch if config.dynamic_image_size else 1,
        "max_patches": config.max_dynamic_patch if config.dynamic_image_size else 1,
    })
    _write_json(dst / "processor_config.json",
                {"processor_class": "InternVLProcessor", "image_seq_length": config.num_image_token})
    template = chat_template(config.template, system=system_message(config), bos=bos)
    (dst / "chat_template.jinja").write_text(template, encoding="utf-8")
    path = dst / "tokenizer_config.json"
    tokenizer_config = _read_json(path) if path.is_file() else {}
    tokenizer_config["chat_template"] = template  # the same for the tokenizer (it renders text turns alike)
    listed = tokenizer_config.get("extra_special_tokens")
    if isinstance(listed, list):  # transformers 5's spelling of additional_special_tokens
        tokenizer_config["additional_special_tokens"] = listed
    named = listed if isinstance(listed, dict) else {}
    tokenizer_config["extra_special_tokens"] = {**named, **companions.PROCESSOR_TOKENS}
    _write_json(path, tokenizer_config)


def _generation_config(src: Path, config: ModelConfig) -> dict[str, Any] | None:
    """The generation_config.json to write, whose eos_token_id holds the template's stop token (`<|im_end|>`),
    where the official chat() stops: transformers' generate stops at the eos ids of this file only (without
    it, at text_config's eos_token_id: `</s>` for InternLM2, none for the demo model). None: the source's file
    (or none) already stops there."""
    stop = companions.find_token_id(src, get_template(config.template).sep.strip())
    path = src / "generation_config.json"
    settings = _read_json(path, "generation settings") if path.is_file() else {}
    eos = settings.get("eos_token_id", config.llm.eos_token_id)
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    # the file's own ids (config.json's were checked as it was read, and may be any integer): NaN was written on
    if "eos_token_id" in settings and not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos):
        raise ConfigError(f"{path}: eos_token_id must be token ids (whole numbers >= 0), got "
                          f"{json.dumps(settings.get('eos_token_id'))[:60]}")
    if stop is None or stop in eos:
        return None
    return {**settings, "eos_token_id": [*eos, stop] if eos else stop}


def _family_key(config: ModelConfig) -> tuple[int, int, int]:
    return config.vision.hidden_size, config.llm.hidden_size, config.llm.num_hidden_layers


def remote_code_note(folder: str | Path) -> str | None:
    """What to add so that trust_remote_code loading reads `folder` (the official layout, or transformers' from
    `--to hf`), or None: the .py files that the auto_map of its config.json (the official model) or of its
    tokenizer_config.json (InternLM2's tokenizer) names and it lacks."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    tokenizer = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    needs, missing = [], []
    for settings, loader in ((config, "the official code (AutoModel.from_pretrained(..., trust_remote_code=True))"),
                             (tokenizer, "AutoTokenizer.from_pretrained(..., trust_remote_code=True)")):
        # its own auto_map and its nested configs' (InternLM2's llm_config names modeling_internlm2.py)
        maps = [c.get("auto_map") for c in (settings, *settings.values()) if isinstance(c, dict)] \
            if isinstance(settings, dict) else []
        absent = [f for auto_map in maps if isinstance(auto_map, dict) for f in companions.auto_map_files(auto_map)
                  if not (folder / f).is_file()]
        absent = [f for f in dict.fromkeys(absent) if f not in missing]
        if absent:
            needs.append(loader)
            missing += absent
    if not missing:
        return None
    model = config_from_hf(config) if config.get("model_type") == "internvl" else ModelConfig.from_json(folder)
    pattern = "tokenization_*.py" if all(f.startswith("tokenization_") for f in missing) else "*.py"
    return (f"note: {folder} has no {', '.join(missing)}. This package does not need them; {' and '.join(needs)} "
            f"{'do' if len(needs) > 1 else 'does'}. Add the .py files of the matching hub repo:\n"
            f"  {_download(folder, model, pattern)}")


# the tokenizer files of the Qwen2 sizes' hub repos (their tokenizer as vocab.json and merges.txt)
QWEN2_TOKENIZER_FILES = ("tokenizer*", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json")


def tokenizer_note(folder: str | Path) -> str | None:
    """What to add to an official-layout InternLM2 folder without tokenizer.model (converted from a folder that
    holds its tokenizer as tokenizer.json only, as transformers saves one), or to a Qwen2 one without tokenizer
    files at all (converted from what transformers' `model.save_pretrained` writes: config and weights), or None."""
    folder = Path(folder)
    config = ModelConfig.from_json(folder)
    if config.llm.architectures[0] != "InternLM2ForCausalLM":
        if (folder / "tokenizer.json").is_file() or all((folder / n).is_file() for n in ("vocab.json", "merges.txt")):
            return None
        return (f"note: {folder} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt: the "
                "transformers folder held none), which chat, the official code and vLLM read. Add those of the model "
                f"it comes from:\n  {_download(folder, config, *QWEN2_TOKENIZER_FILES)}")
    if (folder / "tokenizer.model").is_file():
        return None
    return (f"note: {folder} has no tokenizer.model, the InternLM2 tokenizer that chat, the official code and vLLM "
            "read (the transformers folder held none). Add the official tokenizer files of the matching hub repo:"
            f"\n  {_download(folder, config, 'tokenizer*')}")


def _download(folder: Path, config: ModelConfig, *patterns: str) -> str:
    """The command that downloads the files `patterns` of the hub repo of this config's size into `folder`; for a
    model of no released size, SIZE stands for the release it came from, among those of its language model."""
    size = next((s for s in FAMILY_SIZES if _family_key(family_config(s)) == _family_key(config)), None)
    included = " ".join(f'"{pattern}"' for pattern in patterns)
    command = (f"hf download OpenGVLab/InternVL2_5-{size or 'SIZE'}-MPO --include {included} "
               f"--local-dir {shlex.quote(str(folder))}")
    if size:
        return command
    kin = [s for s in FAMILY_SIZES if family_config(s).llm.architectures[0] == config.llm.architectures[0]]
    return f"{command}\n  (SIZE: the release this model comes from, one of {', '.join(kin)})"

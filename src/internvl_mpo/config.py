"""Configs of InternVL2.5 checkpoints, read from and written to the official `config.json`.

Mirrors `configuration_internvl_chat.InternVLChatConfig` (top level), `configuration_intern_vit.
InternVisionConfig` (`vision_config`) and transformers' `Qwen2Config` (`llm_config`). Field names are
the config.json keys. A key a config.json leaves out means what those classes default to; the
dataclass defaults (the 4B model's values) serve configs built in Python, and `to_dict` writes every
field. Keys we do not use (`auto_map`, `_name_or_path`, MoE leftovers, ...) are kept in `extra` so that
`to_dict` writes the file back as it came. Settings that would change the maths and that we do not
implement raise `ConfigError` instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, SettingError
from .jsonl import json_problem

# The most tiles an image may be given (max_num, max_dynamic_patch): 10000 tiles are 2.56 million tokens at 448
# pixels, far past any InternVL2.5 context (32768 tokens: 127 tiles). The tiling's candidate grids grow as
# max_num log max_num (1.2 million and 12 s at 100000; at 10**9 they fill the memory), so more is refused.
MAX_TILES = 10_000


def check_tile_budget(max_num: int) -> None:
    """Refuse a `max_num` past MAX_TILES (SettingError: a command names its flag). Commands check their --max-num
    with it before torch and the model load: past it the tiling would refuse every image, each alone."""
    if max_num > MAX_TILES:
        raise SettingError("", "max_num", f" must be at most {MAX_TILES} tiles ({MAX_TILES * 256} tokens at 448 "
                           f"pixels, past any model's context), got {max_num}")


log = logging.getLogger(__name__)

SUPPORTED_LLM_ARCHITECTURES = ("Qwen2ForCausalLM", "InternLM2ForCausalLM")
SUPPORTED_ROPE_SCALING = (None, "linear", "dynamic")


# What a JSON value must be for a field of each annotation (a float field takes 1 as 1.0), and what
# the items of a list must be. `_split` checks every dict read (config.json, and convert's transformers configs)
# and names the JSON value; `__post_init__` checks configs built in Python the same way (a tuple where JSON has a
# list), then the ranges.
_NONE = type(None)
_JSON_TYPES = {"int": (int, "an integer"), "float": ((int, float), "a number"), "bool": (bool, "true or false"),
               "str": (str, "a string"), "int | None": ((int, _NONE), "an integer or null"),
               "dict | None": ((dict, _NONE), "an object or null"),
               "int | list[int] | None": ((int, list, _NONE), "a token id, a list of token ids or null"),
               "tuple[str, ...]": ((list, _NONE), "a list of names")}
_JSON_ITEMS = {"int | list[int] | None": int, "tuple[str, ...]": str}
_PYTHON_TYPES = {**_JSON_TYPES, "tuple[str, ...]": ((tuple, list), "a tuple of names"),
                 "int | list[int] | None": ((int, list, tuple, _NONE), "a token id, a list of token ids or None"),
                 "int | None": ((int, _NONE), "an integer or None"), "dict | None": ((dict, _NONE), "a dict or None"),
                 "bool": (bool, "True or False"), "VisionConfig": (None, "a VisionConfig"),
                 "LLMConfig": (None, "an LLMConfig")}


def _wrong_type(annotation: str, value: Any, table: dict) -> str | None:
    """What `value` should be for a field of `annotation` (`table`: JSON's types or Python's), or None if it is.
    A bool is no number, and no item of a list of ids or names."""
    types, wanted = table.get(annotation, (object, ""))
    if types is None:  # a nested config: its class, defined below
        return None if isinstance(value, globals()[annotation]) else wanted
    items = value if isinstance(value, (list, tuple)) else []
    item = _JSON_ITEMS.get(annotation, object)
    if (not isinstance(value, types) or (isinstance(value, bool) and annotation != "bool")
            or any(not isinstance(v, item) or isinstance(v, bool) for v in items)):
        return wanted
    return None


def _split(cls, d: dict[str, Any], section: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """Known fields (type-checked, `section` names them in errors) and the keys kept in `extra`."""
    fields = {f.name: f.type for f in dataclasses.fields(cls) if f.name != "extra"}
    known = {k: v for k, v in d.items() if k in fields}
    extra = {k: v for k, v in d.items() if k not in fields}
    for key, value in known.items():
        wanted = _wrong_type(fields[key], value, _JSON_TYPES)
        if wanted:
            raise ConfigError(f"{section}{key} is {json.dumps(value)}, not {wanted}")
    return known, extra


def _check_types(obj, section: str) -> None:
    """The fields of a config built in Python have the types config.json would give them (`hidden_size="64"`
    or `1024.0` otherwise fails deep inside the model, or writes a config.json no loader reads)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        wanted = f.name != "extra" and _wrong_type(f.type, value, _PYTHON_TYPES)
        if wanted:
            raise ConfigError(f"{section}{f.name} is {value!r}, not {wanted}")


def _architectures(known: dict[str, Any]) -> None:
    """`architectures` as a tuple; null or [] takes the default (transformers writes the class it saves)."""
    if not known.get("architectures"):
        known.pop("architectures", None)
    else:
        known["architectures"] = tuple(known["architectures"])


def _finite(value) -> bool:
    """Whether a config value is a finite number (JSON's NaN and Infinity, which Python writes and reads, are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_sizes(obj, section: str, names: tuple[str, ...]) -> None:
    """Sizes and counts must be >= 1 (a zero head count would otherwise fail deep inside as a division)."""
    for name in names:
        value = getattr(obj, name)
        if value < 1:
            raise ConfigError(f"{section}{name} is {value}, not >= 1")


def _to_dict(obj, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    out = dict(obj.extra)
    for f in dataclasses.fields(obj):
        if f.name in ("extra", *skip):
            continue
        out[f.name] = getattr(obj, f.name)
    return out


@dataclass(frozen=True)
class VisionConfig:
    """InternViT. Defaults are InternViT-300M-448px-V2_5 (the 4B model's vision tower)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 448
    num_channels: int = 3
    norm_type: str = "layer_norm"  # "layer_norm" (300M) or "rms_norm" (6B)
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_normalization: bool = False
    hidden_act: str = "gelu"
    drop_path_rate: float = 0.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    initializer_factor: float = 0.1
    initializer_range: float = 1e-10
    architectures: tuple[str, ...] = ("InternVisionModel",)
    model_type: str = "intern_vit_6b"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        _check_types(self, "vision_config.")
        _check_sizes(self, "vision_config.", ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "patch_size", "image_size", "num_channels"))
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ConfigError(f"vision_config.norm_type {self.norm_type!r} is not 'layer_norm' or 'rms_norm'")
        if self.hidden_act != "gelu":
            raise ConfigError(f"vision_config.hidden_act {self.hidden_act!r} is not implemented (only 'gelu')")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("vision_config.hidden_size must be divisible by num_attention_heads")
        if self.image_size % self.patch_size:
            raise ConfigError("vision_config.image_size must be a multiple of patch_size")
        if not (_finite(self.layer_norm_eps) and self.layer_norm_eps >= 0):  # a negative eps (or NaN): NaN logits
            raise ConfigError(f"vision_config.layer_norm_eps {self.layer_norm_eps!r} is not a finite number >= 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per side of one tile (448 // 14 = 32)."""
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        d = dict(d)
        for key in ("image_size", "patch_size"):  # some configs write [h, w]
            value = d.get(key)
            if isinstance(value, (list, tuple)):
                if len(set(value)) != 1:
                    raise ConfigError(f"vision_config.{key} {value} is not square")
                d[key] = value[0]
                d[f"_{key}_was_list"] = True
        known, extra = _split(cls, d, "vision_config.")
        _architectures(known)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = _to_dict(self)
        for key in ("image_size", "patch_size"):
            if out.pop(f"_{key}_was_list", False):
                out[key] = [out[key], out[key]]
        out["architectures"] = list(self.architectures)
        return out


@dataclass(frozen=True)
class LLMConfig:
    """The language model. Defaults are Qwen2.5-3B-Instruct with the InternVL vocabulary (151674)."""

    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    vocab_size: int = 151674
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    architectures: tuple[str, ...] = ("Qwen2ForCausalLM",)
    model_type: str = "qwen2"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        archs = self.architectures  # first: a null or a list names the LLM that is not implemented
        listed = archs is None or isinstance(archs, (tuple, list))
        if listed and (archs or [None])[0] not in SUPPORTED_LLM_ARCHITECTURES:
            raise ConfigError(  # (a string or a number there is the type error below, not a list of names)
                f"llm_config.architectures {list(archs or [None])} is not implemented; "
                f"supported: {list(SUPPORTED_LLM_ARCHITECTURES)}"
            )
        _check_types(self, "llm_config.")
        _check_sizes(self, "llm_config.", ("hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads", "vocab_size",
                                           "max_position_embeddings"))
        if self.hidden_act != "silu":
            raise ConfigError(f"llm_config.hidden_act {self.hidden_act!r} is not implemented (only 'silu')")
        # NaN, or positions of no meaning, in every logit
        if not (_finite(self.rms_norm_eps) and self.rms_norm_eps >= 0):
            raise ConfigError(f"llm_config.rms_norm_eps {self.rms_norm_eps!r} is not a finite number >= 0")
        if not (_finite(self.rope_theta) and self.rope_theta > 0):
            raise ConfigError(f"llm_config.rope_theta {self.rope_theta!r} is not a finite number above 0")
        if self.rope_type not in SUPPORTED_ROPE_SCALING:
            raise ConfigError(
                f"llm_config.rope_scaling type {self.rope_type!r} is not implemented; "
                f"supported: none, 'linear', 'dynamic'"
            )
        factor = (self.rope_scaling or {}).get("factor")
        if self.rope_type is not None and not (_finite(factor) and factor > 0):
            raise ConfigError(f"llm_config.rope_scaling {json.dumps(self.rope_scaling)} has no positive number "
                              "'factor' (the scaling it names needs one)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("llm_config.num_attention_heads must be a multiple of num_key_value_heads")
        head_dim = self.extra.get("head_dim")  # transformers' Qwen2 builds its attention with it when given
        if head_dim is not None and head_dim != self.hidden_size // self.num_attention_heads:
            raise ConfigError(f"llm_config.head_dim {json.dumps(head_dim)} is not hidden_size / num_attention_heads "
                              f"({self.hidden_size // self.num_attention_heads}): not implemented")
        if self.extra.get("use_sliding_window"):
            raise ConfigError("llm_config.use_sliding_window=true is not implemented")
        pad = self.extra.get("pad_token_id")  # the embedding's padding_idx (llm.py, internlm2.py)
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad < self.vocab_size):
            raise ConfigError(f"llm_config.pad_token_id {pad!r} is not a token id below {self.vocab_size}")

    @property
    def rope_type(self) -> str | None:
        if not self.rope_scaling:
            return None
        kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
        return None if kind == "default" else kind  # transformers' name for plain RoPE

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LLMConfig":
        known, extra = _split(cls, d, "llm_config.")
        if known.get("architectures") is not None:
            known["architectures"] = tuple(known["architectures"])
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = _to_dict(self)
        out["architectures"] = list(self.architectures)
        return out


@dataclass(frozen=True)
class ModelConfig:
    """Top level of an InternVL chat checkpoint's config.json."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    downsample_ratio: float = 0.5
    select_layer: int = -1
    template: str = "internvl2_5"
    ps_version: str = "v2"
    force_image_size: int | None = 448
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    architectures: tuple[str, ...] = ("InternVLChatModel",)
    model_type: str = "internvl_chat"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        _check_types(self, "")
        if tuple(self.architectures[:1]) != ("InternVLChatModel",):  # vLLM and lmdeploy pick the model class by it
            raise ConfigError(f"architectures {list(self.architectures)} is not the official ['InternVLChatModel']")
        if self.ps_version != "v2":
            raise ConfigError(
                f"ps_version {self.ps_version!r} is not implemented: only 'v2' (the InternVL2.5 pixel shuffle)"
            )
        if self.downsample_ratio != 0.5:
            raise ConfigError(f"downsample_ratio {self.downsample_ratio} is not implemented (only 0.5)")
        if self.vision.grid_size % 2:
            raise ConfigError("the ViT patch grid must be even for pixel shuffle 0.5")
        n = self.vision.num_hidden_layers
        if not -n - 1 <= self.select_layer <= n:
            raise ConfigError(f"select_layer {self.select_layer} is out of range for a {n}-layer ViT")
        _check_sizes(self, "", ("min_dynamic_patch", "max_dynamic_patch"))
        if self.min_dynamic_patch > self.max_dynamic_patch:
            raise ConfigError(f"min_dynamic_patch {self.min_dynamic_patch} is above max_dynamic_patch "
                              f"{self.max_dynamic_patch}")
        if self.max_dynamic_patch > MAX_TILES:  # planning an image's grid would fill the memory, not refuse it
            raise ConfigError(f"max_dynamic_patch {self.max_dynamic_patch} is above {MAX_TILES} tiles "
                              f"({MAX_TILES * 256} tokens at 448 pixels, past any model's context)")
        if self.force_image_size not in (None, self.vision.image_size):
            raise ConfigError(
                f"force_image_size {self.force_image_size} differs from vision_config.image_size "
                f"{self.vision.image_size}; resize the position table first"
            )

    @property
    def torch_dtype(self) -> str | None:
        """The weights' dtype the config.json records: "dtype" where it is there (transformers >= 4.56 writes it, and
        reads it before the older "torch_dtype"), else "torch_dtype"."""
        return self.extra.get("dtype", self.extra.get("torch_dtype"))

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def tiles_per_image(self) -> int:
        """Most tiles per image where a run names no max_num: max_dynamic_patch, or 1 (the whole image,
        resized) with dynamic_image_size off, as vLLM and the official demo tile."""
        return self.max_dynamic_patch if self.dynamic_image_size else 1

    @property
    def num_image_token(self) -> int:
        """LLM tokens per tile: (448 // 14) ** 2 * 0.5 ** 2 = 256."""
        return int(self.vision.grid_size**2 * self.downsample_ratio**2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if d.get("model_type") == "internvl":
            raise ConfigError("model_type 'internvl' is transformers' native InternVL layout (an -hf checkpoint); "
                              "convert it to the official layout first: "
                              "internvl-mpo convert --to official <this checkpoint> <a new folder>")
        if d.get("model_type") not in (None, "internvl_chat"):
            raise ConfigError(f"model_type {d.get('model_type')!r} is not an InternVL chat checkpoint")
        for key in ("vision_config", "llm_config"):
            if not isinstance(d.get(key), dict):
                raise ConfigError(f"config.json has no {key} object")
        for key in ("use_llm_lora", "use_backbone_lora"):  # the official model then wraps PEFT LoRA to load them
            if d.get(key):
                raise ConfigError(
                    f"{key}={d[key]}: the weights hold unmerged PEFT LoRA adapters; merge them first with the "
                    "official internvl_chat/tools/merge_lora.py (it writes use_llm_lora and use_backbone_lora 0)")
        for where, section in (("", d), ("llm_config.", d["llm_config"]), ("vision_config.", d["vision_config"])):
            quant = section.get("quantization_config")
            if quant:  # AWQ (OpenGVLab's -AWQ repos, lmdeploy), GPTQ, FP8: packed integer weights and scales
                method = quant.get("quant_method") if isinstance(quant, dict) else quant
                release = " (the repo name without -AWQ)" if str(method).lower() == "awq" else ""
                raise ConfigError(f"{where}quantization_config (quant_method {method!r}): quantized weights are not "
                                  f"implemented; use the unquantized release{release}")
        if "template" not in d:  # the official model looks its conversation template up by this name
            raise ConfigError("config.json has no template (the conversation format, \"internvl2_5\" for "
                              "InternVL2.5): the official model cannot be built without one")
        d = {**_OFFICIAL_TOP_DEFAULTS, **d}
        vision = VisionConfig.from_dict({**_OFFICIAL_VISION_DEFAULTS, **d.pop("vision_config")})
        # The official InternVLChatConfig always unties the head (the stored lm_head is used), whatever
        # llm_config says; reading it the same way keeps the logits equal to the official ones.
        llm = dataclasses.replace(LLMConfig.from_dict(_official_llm_dict(d.pop("llm_config"))),
                                  tie_word_embeddings=False)
        # "vision" and "llm" name our fields, not config.json keys: a file's keys of those names are its own, kept
        own = {key: d.pop(key) for key in ("vision", "llm") if key in d}
        known, extra = _split(cls, d)
        extra.update(own)
        _architectures(known)
        ignored = sorted(k for k in extra if k not in _QUIET_TOP_KEYS)
        if ignored:
            log.info("config.json keys kept but not used: %s", ", ".join(ignored))
        return cls(vision=vision, llm=llm, **known, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_file_dict(read_config_json(path), path)

    @classmethod
    def from_file_dict(cls, d: dict[str, Any], path: Path) -> "ModelConfig":
        """The config of `d`, the dict read from the config.json at `path`, which its errors name."""
        try:
            return cls.from_dict(d)
        except (ConfigError, TypeError) as e:  # TypeError: a value of the wrong kind (a list of lists for image_size)
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        out = _to_dict(self, skip=("vision", "llm"))
        out["architectures"] = list(self.architectures)
        out["vision_config"] = self.vision.to_dict()
        out["llm_config"] = self.llm.to_dict()
        # The official config class forces these; write them so its loader sees what we ran.
        out["hidden_size"] = self.llm.hidden_size
        out["tie_word_embeddings"] = self.llm.tie_word_embeddings
        out.setdefault("auto_map", _AUTO_MAP)
        if self.llm.architectures[0] == "InternLM2ForCausalLM":  # as the released 2B, 8B and 26B configs name it
            out["llm_config"].setdefault("auto_map", dict(_INTERNLM2_AUTO_MAP))
        return out

    def to_json_text(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json_text(), encoding="utf-8")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# What the official config classes assume for every key a config.json leaves out that we read:
# InternVisionConfig (configuration_intern_vit.py) describes InternViT-6B at 224 pixels,
# InternVLChatConfig (configuration_internvl_chat.py) the first pixel shuffle, no forced tile size and
# one tile per image (dynamic_image_size and use_thumbnail false, at most 6 tiles when tiling is on).
# `template` has no usable default (the official model looks None up and fails): it is refused.
_OFFICIAL_VISION_DEFAULTS = {
    "num_channels": 3, "patch_size": 14, "image_size": 224, "qkv_bias": False, "hidden_size": 3200,
    "num_attention_heads": 25, "intermediate_size": 12800, "qk_normalization": True, "num_hidden_layers": 48,
    "hidden_act": "gelu", "norm_type": "rms_norm", "layer_norm_eps": 1e-6, "dropout": 0.0, "drop_path_rate": 0.0,
    "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 0.1,
}
_OFFICIAL_TOP_DEFAULTS = {
    "select_layer": -1, "force_image_size": None, "downsample_ratio": 0.5, "dynamic_image_size": False,
    "use_thumbnail": False, "ps_version": "v1", "min_dynamic_patch": 1, "max_dynamic_patch": 6,
}
# Those of transformers' Qwen2Config and the official InternLM2Config (a null num_key_value_heads,
# InternLM2's default, means one per query head; InternLM2's pad_token_id and bias live in `extra`).
_OFFICIAL_LLM_DEFAULTS = {
    "Qwen2ForCausalLM": {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None, "attention_dropout": 0.0,
        "bos_token_id": None, "eos_token_id": None, "model_type": "qwen2",
    },
    "InternLM2ForCausalLM": {
        "vocab_size": 103168, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None, "pad_token_id": 0, "bos_token_id": 1,
        "eos_token_id": 2, "bias": True, "model_type": "internlm2",
    },
}


def official_rope(d: dict[str, Any]) -> dict[str, Any]:
    """An LLM config dict with transformers 5's `rope_parameters` ({"rope_theta", "rope_type", ...}, which
    it writes instead of the older keys) turned back into `rope_theta` and `rope_scaling` ({"type", ...})."""
    params = d.get("rope_parameters")
    if not isinstance(params, dict) or not params:
        return d
    d = {k: v for k, v in d.items() if k != "rope_parameters"}
    kind = params.get("rope_type", params.get("type", "default"))
    rest = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type", "type")}
    d["rope_scaling"] = None if kind == "default" else {"type": kind, **rest}
    if "rope_theta" in params:
        d["rope_theta"] = params["rope_theta"]
    return d


def _official_llm_dict(d: dict[str, Any]) -> dict[str, Any]:
    """llm_config as the official config classes read it: their defaults for missing keys, legacy RoPE keys."""
    if "architectures" not in d:  # the official class reads architectures[0] and fails without it
        raise ConfigError("llm_config has no architectures: the official config class picks the LLM by it; "
                          f"supported: {list(SUPPORTED_LLM_ARCHITECTURES)}")
    archs = d["architectures"]
    arch = archs[0] if isinstance(archs, list) and archs else None
    d = {**_OFFICIAL_LLM_DEFAULTS.get(arch, {}), **official_rope(d)}
    if arch in _OFFICIAL_LLM_DEFAULTS and d.get("num_key_value_heads") is None:  # null: one per head, in both
        d["num_key_value_heads"] = d["num_attention_heads"]
    return d


_AUTO_MAP = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
}
# What the official InternLM2 llm_config names (its remote code, which the official modeling file imports too).
_INTERNLM2_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}
# Top-level keys that official files carry and that change nothing at inference.
_QUIET_TOP_KEYS = {
    "auto_map", "_name_or_path", "_commit_hash", "hidden_size", "tie_word_embeddings", "torch_dtype", "dtype",
    "transformers_version", "pad2square", "use_backbone_lora", "use_llm_lora", "use_flash_attn",
    "system_message", "eos_token_id", "bos_token_id", "pad_token_id", "output_attentions",
}


FAMILY_SIZES = ("1B", "2B", "4B", "8B", "26B", "38B", "78B")


def adapter_message(folder: Path) -> str:
    """What a folder holding a PEFT adapter (adapter_config.json: what LoRA fine-tuning tools save) is told."""
    return (f"{folder} holds a PEFT adapter (adapter_config.json), not a model: merge it into its base model first "
            "(PEFT's merge_and_unload) and load the merged folder")


def read_config_json(path: Path) -> dict[str, Any]:
    """A checkpoint's config.json as a dict; a missing one names what the folder holds instead (a PEFT
    adapter, a training run or checkpoint folder), if it is one of those."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        from .companions import broken_link

        if why := broken_link(path):
            raise ConfigError(why) from None
        if (path.parent / "adapter_config.json").is_file():
            raise ConfigError(adapter_message(path.parent)) from None
        snapshots = sorted(p.parent for p in path.parent.glob("snapshots/*/config.json"))
        if snapshots:  # huggingface_hub's cache of a repo, models--org--name
            main = path.parent / "refs" / "main"
            latest = path.parent / "snapshots" / main.read_text().strip() if main.is_file() else None
            repo = path.parent.name.removeprefix("models--").replace("--", "/", 1)
            raise ConfigError(f"{path.parent}: the hub cache of {repo}, not a checkpoint folder; load the hub id "
                              f"{repo} (read from this cache) or a snapshot of it "
                              f"({latest if latest in snapshots else snapshots[0]})") from None
        for inside, what in (("final", "a training run's folder"), ("model", "a training checkpoint")):
            if (path.parent / inside / "config.json").is_file():  # what `train` writes
                raise ConfigError(f"{path.parent}: {what}; its model is {path.parent / inside}") from None
        raise ConfigError(f"{path}: no such config file") from None
    except (ValueError, RecursionError) as e:  # UTF-16, say, as some Windows editors save; bad JSON
        raise ConfigError(f"{path}: {json_problem(e)}") from None
    except OSError as e:  # a folder of that name, no permission to read it
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: not a JSON object of settings")
    return d


def family_config(size: str, layers: int | None = None) -> ModelConfig:
    """The config.json of InternVL2.5-<size>-MPO (shipped in `configs/`; see the README there).

    `layers` cuts both the ViT and the LLM to that many layers (for shape tests and tiny runs).
    """
    name = size.upper() if isinstance(size, str) else None
    if name not in FAMILY_SIZES:
        raise ConfigError(f"unknown InternVL2.5-MPO size {size!r}; known: {', '.join(FAMILY_SIZES)}")
    config = ModelConfig.from_json(Path(__file__).parent / "configs" / f"{name}.json")
    if layers is None:
        return config
    if layers < 1:
        raise ConfigError(f"layers must be at least 1, got {layers}")
    return config.replace(
        vision=dataclasses.replace(config.vision, num_hidden_layers=layers),
        llm=dataclasses.replace(config.llm, num_hidden_layers=layers),
    )

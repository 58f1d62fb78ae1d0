"""Spreading a model over several GPUs the way the official `split_model` recipe does.

The first GPU also holds the vision tower, the projector, the embeddings, the final norm, the head
and the last decoder layer, so it is counted as half a GPU when the decoder layers are shared out:
per_gpu = ceil(L / (n - 0.5)); GPU 0 takes ceil(per_gpu * 0.5) layers, the others per_gpu each,
in order, and the last layer moves to GPU 0. Hidden states hop between devices inside the decoder
loop; each layer's KV cache lives on that layer's device.
"""

from __future__ import annotations

import math
import numbers
import re

import torch

from .config import ModelConfig
from .devices import parse_device
from .errors import InputError, SettingError

DECODER_LAYER = re.compile(r"language_model\.model\.layers\.\d+\.")  # the weights that may sit on other devices


def layers_per_gpu(num_layers: int, num_gpus: int) -> list[int]:
    """How many decoder layers each GPU gets (before the last layer moves to GPU 0). From num_layers + 1 GPUs
    on, the official recipe gives each GPU one layer and the GPUs past the layers none: those are left out."""
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, numbers.Integral) or num_gpus < 1:
        raise SettingError("", "num_gpus", f" must be a whole number >= 1, got {num_gpus!r}")
    num_gpus = min(num_gpus, num_layers + 1)
    if num_gpus == 1:
        return [num_layers]
    per_gpu = math.ceil(num_layers / (num_gpus - 0.5))
    counts = [per_gpu] * num_gpus
    counts[0] = math.ceil(per_gpu * 0.5)
    return counts


def split_model(config: ModelConfig, num_gpus: int) -> dict[str, str]:
    """Module prefix -> "cuda:i", as the official recipe assigns them."""
    llm = "language_model.model."
    num_layers = config.llm.num_hidden_layers
    device_map: dict[str, str] = {}
    layer = 0
    for gpu, count in enumerate(layers_per_gpu(num_layers, num_gpus)):
        for _ in range(count):
            if layer < num_layers:
                device_map[f"{llm}layers.{layer}"] = f"cuda:{gpu}"
            layer += 1
    embeddings = "tok_embeddings" if config.llm.architectures[0] == "InternLM2ForCausalLM" else "embed_tokens"
    head = "language_model.output" if embeddings == "tok_embeddings" else "language_model.lm_head"
    for name in ("vision_model", "mlp1", f"{llm}{embeddings}", f"{llm}norm", head, f"{llm}layers.{num_layers - 1}"):
        device_map[name] = "cuda:0"
    return device_map


def resolve_device_map(device_map, config: ModelConfig) -> dict[str, str] | None:
    """None, "auto" (every visible GPU) or an explicit {prefix: device} map."""
    if device_map is None:
        return None
    if device_map == "auto":
        count = torch.cuda.device_count()
        if count == 0:
            raise InputError('device_map="auto" needs CUDA devices; use device="cpu" instead')
        return split_model(config, count)
    if not isinstance(device_map, dict):
        raise InputError(f"device_map must be None, 'auto' or a dict of module prefix -> device, got {device_map!r}")
    if bad := [prefix for prefix in device_map if not isinstance(prefix, str)]:  # {0: "cuda:0"} for {"": 0}
        raise InputError(f"device_map's keys must be module prefixes (strings; \"\" for the whole model), got "
                         f"{bad[0]!r}")
    return {prefix: str(_indexed(parse_device(device))) for prefix, device in device_map.items()}


def _indexed(device: torch.device) -> torch.device:
    """"cuda" as the GPU its weights land on (the current one), so that it equals "cuda:N" for that N."""
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index is None else device


def _covers(prefix: str, key: str) -> bool:
    return prefix == "" or key == prefix or key.startswith(prefix + ".")


def check_device_map(device_map: dict[str, str], keys) -> None:
    """Refuse a prefix that names no weight (a misspelt one would place nothing), a weight no prefix
    places (as transformers does), and weights outside the decoder layers on different devices, before
    any weight is read."""
    for prefix in device_map:
        if not any(_covers(prefix, key) for key in keys):
            modules = ", ".join(sorted({key.split(".")[0] for key in keys}))
            raise InputError(f"device_map names {prefix!r}, which is no module of this model (top level: {modules}); "
                             "the model card's split_model names modules of every size (both embeddings' names, "
                             "layers past the last): device_map=\"auto\" places the model as it does")
    unplaced = [key for key in keys if not any(_covers(prefix, key) for prefix in device_map)]
    if unplaced:
        shown = ", ".join(unplaced[:3]) + (f", ... ({len(unplaced) - 3} more)" if len(unplaced) > 3 else "")
        raise InputError(f"device_map gives no device for {shown}; add their modules, or \"\" for everything else")
    # Hidden states hop devices between decoder layers only; the rest exchange tensors with one another outside them.
    outside = {key: device_for(key, device_map, None) for key in keys if not DECODER_LAYER.match(key)}
    (first, device), *_ = outside.items()
    for key, other in outside.items():
        if other != device:
            raise InputError(
                f"device_map puts {key} on {other} but {first} on {device}; only the decoder layers"
                " (language_model.model.layers.N) may go to other devices: the vision tower, projector, embeddings,"
                " final norm and head share one")
    # A decoder layer moves its input to its first norm's device only: its parts must share that device.
    layers: dict[str, tuple[str, torch.device]] = {}
    for key in keys:
        if layer := DECODER_LAYER.match(key):
            device = device_for(key, device_map, None)
            first, where = layers.setdefault(layer.group(0), (key, device))
            if device != where:
                raise InputError(
                    f"device_map puts {key} on {device} but {first} on {where}; a decoder layer goes to one device"
                    f" whole: give its prefix ({layer.group(0).rstrip('.')}), not one of its modules")


def device_for(key: str, device_map: dict[str, str], default: torch.device) -> torch.device:
    """The device of the longest prefix of `key` (a weight name) in the map; "" is the prefix of every key."""
    best = None
    for prefix in device_map:
        if _covers(prefix, key) and (best is None or len(prefix) > len(best)):
            best = prefix
    return torch.device(device_map[best]) if best is not None else default

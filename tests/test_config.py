"""Reading the official config.json: a key left out means the official default; refusals are clear;
configs built in Python default to the 4B values."""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import pytest
import torch

from internvl_mpo.config import LLMConfig, ModelConfig, VisionConfig
from internvl_mpo.errors import ConfigError


def test_defaults_are_the_4b_model():
    config = ModelConfig()
    assert config.num_image_token == 256
    assert config.vision.hidden_size * int(1 / config.downsample_ratio) ** 2 == 4096  # mlp1's input width
    assert config.vision.grid_size == 32 and config.vision.head_dim == 64
    assert config.llm.head_dim == 128 and config.llm.vocab_size == 151674
    assert config.llm.tie_word_embeddings is False


def write(tmp_path, change):
    d = ModelConfig().to_dict()
    change(d)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(ps_version="v1"), "ps_version 'v1' is not implemented"),
        (lambda d: d["llm_config"].update(rope_scaling={"type": "yarn", "factor": 4.0}),
         "rope_scaling type 'yarn' is not implemented"),
        (lambda d: d["llm_config"].update(architectures=["LlamaForCausalLM"]),
         r"architectures \['LlamaForCausalLM'\] is not implemented"),
        (lambda d: d["vision_config"].update(norm_type="batch_norm"), "norm_type 'batch_norm'"),
        (lambda d: d.update(downsample_ratio=0.25), "downsample_ratio 0.25 is not implemented"),
        (lambda d: d.pop("llm_config"), "no llm_config object"),
        (lambda d: d["llm_config"].update(use_sliding_window=True), "use_sliding_window"),
        (lambda d: d.update(select_layer=-40), "select_layer -40 is out of range"),
        (lambda d: d.update(select_layer="-1"), 'select_layer is "-1", not an integer'),
        (lambda d: d["llm_config"].update(num_hidden_layers=None), "llm_config.num_hidden_layers is null, not an integer"),
        (lambda d: d["llm_config"].update(num_hidden_layers=True), "llm_config.num_hidden_layers is true, not an integer"),
        (lambda d: d["vision_config"].update(layer_norm_eps="1e-6"), 'vision_config.layer_norm_eps is "1e-6", not a number'),
        (lambda d: d["vision_config"].update(qkv_bias=1), "vision_config.qkv_bias is 1, not true or false"),
        (lambda d: d.update(template=None), "template is null, not a string"),
        (lambda d: d.pop("template"), r"config.json has no template .*the official model cannot be built without one"),
        (lambda d: d["llm_config"].pop("architectures"), r"llm_config has no architectures: .*supported: \['Qwen2"),
        (lambda d: d.update(use_llm_lora=16), r"use_llm_lora=16: .*unmerged .*tools/merge_lora.py"),
        (lambda d: d.update(use_backbone_lora=8), r"use_backbone_lora=8: .*unmerged .*tools/merge_lora.py"),
        (lambda d: d.update(model_type="internvl"),
         r"transformers' native InternVL layout.*internvl-mpo convert --to official <this checkpoint> <a new folder>$"),
        (lambda d: d["llm_config"].update(num_key_value_heads=0), "llm_config.num_key_value_heads is 0, not >= 1"),
        (lambda d: d["vision_config"].update(num_attention_heads=0), "vision_config.num_attention_heads is 0, not >= 1"),
        (lambda d: d["vision_config"].update(patch_size=-14), "vision_config.patch_size is -14, not >= 1"),
        (lambda d: d["llm_config"].update(hidden_size=-8), "llm_config.hidden_size is -8, not >= 1"),
        # hand edits the maths took without a word: NaN logits (a negative eps), meaningless positions (theta 0)
        (lambda d: d["llm_config"].update(rms_norm_eps=-1e-6),
         r"llm_config.rms_norm_eps -1e-06 is not a finite number >= 0"),
        (lambda d: d["vision_config"].update(layer_norm_eps=-1),
         r"vision_config.layer_norm_eps -1 is not a finite number >= 0"),
        (lambda d: d["llm_config"].update(rope_theta=0), r"llm_config.rope_theta 0 is not a finite number above 0"),
        # NaN (Python's json writes and reads it) passed every one of those checks: NaN logits
        (lambda d: d["llm_config"].update(rms_norm_eps=float("nan")),
         r"llm_config.rms_norm_eps nan is not a finite number >= 0"),
        (lambda d: d["vision_config"].update(layer_norm_eps=float("nan")),
         r"vision_config.layer_norm_eps nan is not a finite number >= 0"),
        (lambda d: d["llm_config"].update(rope_theta=float("inf")),
         r"llm_config.rope_theta inf is not a finite number above 0"),
        (lambda d: d["llm_config"].update(rope_scaling={"type": "dynamic", "factor": float("nan")}),
         "has no positive number 'factor'"),
        (lambda d: d["llm_config"].update(architectures=None), r"llm_config.architectures \[None\] is not implemented"),
        # transformers' Qwen2 (the official code's LLM) sizes its attention by head_dim; we took hidden_size / heads
        (lambda d: d["llm_config"].update(head_dim=256), r"llm_config.head_dim 256 is not hidden_size / num_attention_heads"
                                                          r" \(128\): not implemented"),
        # values of the wrong kind in the fields that are not plain numbers (each was an AttributeError,
        # a ZeroDivisionError, a misleading message, or a name spelled out letter by letter)
        (lambda d: d["llm_config"].update(rope_scaling="dynamic"), 'llm_config.rope_scaling is "dynamic", not an object'),
        (lambda d: d["llm_config"].update(rope_scaling={"type": "linear", "factor": 0}),
         "rope_scaling .* has no positive number 'factor'"),
        (lambda d: d["llm_config"].update(rope_scaling={"type": "linear"}), "has no positive number 'factor'"),
        (lambda d: d["llm_config"].update(rope_scaling={"type": "dynamic", "factor": "2"}),
         "has no positive number 'factor'"),
        (lambda d: d["llm_config"].update(architectures="Qwen2ForCausalLM"),
         'llm_config.architectures is "Qwen2ForCausalLM", not a list of names'),
        (lambda d: d["vision_config"].update(architectures=3), "vision_config.architectures is 3, not a list of names"),
        (lambda d: d.update(architectures="InternVLChatModel"), 'architectures is "InternVLChatModel", not a list'),
        # vLLM and lmdeploy pick the model class by it: a save of it would not serve (it loaded and was written back)
        (lambda d: d.update(architectures=["LlavaForConditionalGeneration"]),
         r"^[^ ]*config.json: architectures \['LlavaForConditionalGeneration'\] is not the official \['InternVLChatModel'\]$"),
        (lambda d: d.update(force_image_size="448"), 'force_image_size is "448", not an integer or null'),
        (lambda d: d["llm_config"].update(eos_token_id=["<|im_end|>"]), "eos_token_id is .*, not a token id"),
        (lambda d: d.update(max_dynamic_patch=0), "max_dynamic_patch is 0, not >= 1"),
        (lambda d: d.update(min_dynamic_patch=6, max_dynamic_patch=4), "min_dynamic_patch 6 is above max_dynamic_patch 4"),
        (lambda d: d.update(max_dynamic_patch=10**9), "max_dynamic_patch 1000000000 is above 10000 tiles"),
        (lambda d: d.update(quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128}),
         r"quantization_config \(quant_method 'awq'\): quantized weights are not implemented; .*without -AWQ"),
        (lambda d: d["llm_config"].update(quantization_config={"quant_method": "fp8"}),
         r"llm_config.quantization_config \(quant_method 'fp8'\): .*the unquantized release$"),
    ],
)
def test_unsupported_settings_are_refused(tmp_path, change, message):
    path = write(tmp_path, change)
    with pytest.raises(ConfigError, match=message) as info:
        ModelConfig.from_json(path)
    assert str(path) in str(info.value)


def test_supported_rope_scaling_and_list_sizes(tmp_path):
    path = write(tmp_path, lambda d: (d["llm_config"].update(rope_scaling={"type": "dynamic", "factor": 2.0}),
                                      d["vision_config"].update(image_size=[448, 448], patch_size=[14, 14])))
    config = ModelConfig.from_json(path)
    assert config.llm.rope_type == "dynamic" and config.vision.image_size == 448
    assert config.to_dict()["vision_config"]["image_size"] == [448, 448]


@pytest.mark.parametrize("empty", [None, []])
def test_null_architectures_take_the_defaults_and_rope_type_default_is_plain_rope(tmp_path, empty):
    def change(d):
        d["architectures"] = d["vision_config"]["architectures"] = empty
        d["llm_config"]["rope_scaling"] = {"rope_type": "default"}
    config = ModelConfig.from_json(write(tmp_path, change))
    assert config.llm.rope_type is None
    saved = config.to_dict()  # null ones were kept and made writing the config fail; [] was written back
    assert saved["architectures"] == ["InternVLChatModel"]
    assert saved["vision_config"]["architectures"] == ["InternVisionModel"]


def test_a_json_value_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config.json: not a JSON object of settings"):
        ModelConfig.from_json(tmp_path)


def test_not_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)


def test_a_peft_adapter_folder_is_named(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "base_model_name_or_path": "x"}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"holds a PEFT adapter \(adapter_config.json\), not a model: merge it"):
        ModelConfig.from_json(tmp_path)


def test_a_peft_adapter_beside_its_base_models_config_is_named_too(tmp_path):
    """With the base model's config.json beside the adapter (as some tools save it), the folder was told it holds
    adapter_model.safetensors but no shard index ("copy the index from where the shards came from")."""
    from safetensors.torch import save_file

    from internvl_mpo.errors import CheckpointError
    from internvl_mpo.model import InternVL

    (tmp_path / "config.json").write_text(json.dumps(ModelConfig().to_dict()))
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "base_model_name_or_path": "x"}')
    save_file({"base_model.model.a.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"holds a PEFT adapter \(adapter_config.json\), not a model: merge it"):
        InternVL.from_pretrained(tmp_path)


def test_a_training_run_or_checkpoint_folder_names_the_model_inside(tmp_path):
    """`--model runs/mpo` (the --output of train) or one of its checkpoints said only that config.json was
    missing; the model is the run's final/ and a checkpoint's model/."""
    run = tmp_path / "run"
    for model in (run / "final", run / "checkpoint-000004" / "model"):
        model.mkdir(parents=True)
        ModelConfig().to_json(model / "config.json")
    with pytest.raises(ConfigError, match=f"^{run}: a training run's folder; its model is {run / 'final'}$"):
        ModelConfig.from_json(run)
    checkpoint = run / "checkpoint-000004"
    with pytest.raises(ConfigError, match=f"^{checkpoint}: a training checkpoint; its model is {checkpoint / 'model'}$"):
        ModelConfig.from_json(checkpoint)
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'config.json'}: no such config file$"):
        ModelConfig.from_json(tmp_path)


def test_a_hub_cache_folder_names_the_hub_id_and_its_snapshot(tmp_path):
    """The hub cache folder of a repo (models--org--name, where a download lands) said only that config.json
    was missing; its checkpoints are the snapshots/ inside."""
    cache = tmp_path / "models--OpenGVLab--InternVL2_5-4B-MPO"
    for commit in ("aaa111", "bbb222"):
        (cache / "snapshots" / commit).mkdir(parents=True)
        ModelConfig().to_json(cache / "snapshots" / commit / "config.json")
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("bbb222")
    with pytest.raises(ConfigError, match=f"^{cache}: the hub cache of OpenGVLab/InternVL2_5-4B-MPO, not a checkpoint "
                       rf"folder; load the hub id OpenGVLab/InternVL2_5-4B-MPO \(read from this cache\) or a "
                       rf"snapshot of it \({cache / 'snapshots' / 'bbb222'}\)$"):
        ModelConfig.from_json(cache)


def test_not_utf8(tmp_path):
    """Some Windows editors save UTF-16: an error naming the file, not a UnicodeDecodeError."""
    path = tmp_path / "config.json"
    path.write_bytes(json.dumps(ModelConfig().to_dict()).encode("utf-16"))
    with pytest.raises(ConfigError, match="config.json: not UTF-8 text"):
        ModelConfig.from_json(tmp_path)


def test_a_config_json_that_cannot_be_read_is_named(tmp_path):
    """A folder named config.json (or one without read permission) raised IsADirectoryError from inside."""
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ConfigError, match=r"config.json: cannot read it \(Is a directory\)$"):
        ModelConfig.from_json(tmp_path)


def test_dtype_is_read_before_torch_dtype_as_transformers_reads_it():
    """Where a config holds both (a hand-edited one, or mixed tools), transformers 5 takes "dtype"; we took
    "torch_dtype"."""
    config = ModelConfig.from_dict({**ModelConfig().to_dict(), "torch_dtype": "float32", "dtype": "bfloat16"})
    assert config.torch_dtype == "bfloat16"
    assert ModelConfig.from_dict({**ModelConfig().to_dict(), "torch_dtype": "float16"}).torch_dtype == "float16"


# The defaults of the official config classes' __init__ for the keys we read, checked against OpenGVLab/InternVL
# internvl_chat/internvl/model/internvl_chat/configuration_internvl_chat.py (InternVLChatConfig; its
# ps_version 'v1' is refused, see above, and its template None cannot build the model),
# .../internvl_chat/configuration_intern_vit.py (InternVisionConfig) and
# internvl_chat/internvl/model/internlm2/configuration_internlm2.py (InternLM2Config). Qwen2Config is
# transformers' own, compared directly below.
OFFICIAL_TOP = {"select_layer": -1, "force_image_size": None, "downsample_ratio": 0.5, "dynamic_image_size": False,
                "use_thumbnail": False, "min_dynamic_patch": 1, "max_dynamic_patch": 6}
OFFICIAL_VISION = {
    "num_channels": 3, "patch_size": 14, "image_size": 224, "qkv_bias": False, "hidden_size": 3200,
    "num_attention_heads": 25, "intermediate_size": 12800, "qk_normalization": True, "num_hidden_layers": 48,
    "hidden_act": "gelu", "norm_type": "rms_norm", "layer_norm_eps": 1e-6, "dropout": 0.0, "drop_path_rate": 0.0,
    "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 0.1,
}
OFFICIAL_INTERNLM2 = {
    "vocab_size": 103168, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None, "bos_token_id": 1, "eos_token_id": 2,
    "model_type": "internlm2",
}
LLM_KEYS = [f.name for f in dataclasses.fields(LLMConfig) if f.name not in ("architectures", "extra")]


def stripped(keys, section=None):
    def strip(d):
        for key in keys:
            (d[section] if section else d).pop(key)
    return strip


def test_missing_top_and_vision_keys_read_the_official_config_classes_defaults(tmp_path):
    config = ModelConfig.from_json(write(tmp_path, stripped(OFFICIAL_TOP)))
    assert {key: getattr(config, key) for key in OFFICIAL_TOP} == OFFICIAL_TOP
    assert config.tiles_per_image == 1  # no dynamic tiling: one tile per image
    def strip_vision(d):
        stripped(OFFICIAL_VISION, "vision_config")(d)
        d.pop("force_image_size")  # 448 would not match the default 224
    vision = ModelConfig.from_json(write(tmp_path, strip_vision)).vision
    assert {key: getattr(vision, key) for key in OFFICIAL_VISION} == OFFICIAL_VISION
    with pytest.raises(ConfigError, match="ps_version 'v1' is not implemented"):  # InternVLChatConfig's default
        ModelConfig.from_json(write(tmp_path, lambda d: d.pop("ps_version")))


def test_missing_llm_keys_read_the_official_config_classes_defaults(tmp_path):
    """Every llm_config key we read, left out, is what transformers' Qwen2Config or the official
    InternLM2Config holds for it: rope_theta 10000 and 32 heads change the logits without changing a
    weight shape, and the widths make weights of another shape refused rather than read as the 4B's."""
    from transformers import Qwen2Config

    qwen2 = Qwen2Config()
    rope = getattr(qwen2, "rope_parameters", None) or {}  # transformers >= 5 keeps the theta there
    expected = {key: rope.get("rope_theta", getattr(qwen2, "rope_theta", None)) if key == "rope_theta"
                else getattr(qwen2, key) for key in LLM_KEYS if key != "tie_word_embeddings"}
    expected["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    llm = ModelConfig.from_json(write(tmp_path, stripped(LLM_KEYS, "llm_config"))).llm
    assert {key: getattr(llm, key) for key in expected} == expected
    assert llm.tie_word_embeddings is False  # InternVLChatConfig unties it whatever llm_config says

    def internlm2(d):
        stripped(LLM_KEYS, "llm_config")(d)
        d["llm_config"]["architectures"] = ["InternLM2ForCausalLM"]
    llm = ModelConfig.from_json(write(tmp_path, internlm2)).llm
    assert {key: getattr(llm, key) for key in OFFICIAL_INTERNLM2} == OFFICIAL_INTERNLM2
    assert (llm.extra["pad_token_id"], llm.extra["bias"]) == (0, True)  # InternLM2Config's, read by internlm2.py

    def partial(d):
        stripped(("rope_theta", "num_attention_heads", "num_key_value_heads", "max_position_embeddings"),
                 "llm_config")(d)
        d["llm_config"].update(architectures=["InternLM2ForCausalLM"], num_attention_heads=16)
    llm = ModelConfig.from_json(write(tmp_path, partial)).llm
    assert (llm.rope_theta, llm.num_attention_heads, llm.num_key_value_heads, llm.max_position_embeddings) == (
        10000.0, 16, 16, 2048)
    llm = ModelConfig.from_json(write(tmp_path, lambda d: d["llm_config"].update(num_key_value_heads=None))).llm
    assert llm.num_key_value_heads == llm.num_attention_heads == 16  # null: one kv head per head, in both classes


def test_a_config_read_with_defaults_is_written_with_every_key(tmp_path):
    """What save_pretrained, convert, train and the demo write (`to_dict`) spells out every key, so a
    file we write never depends on a default: read back, each section holds every field."""
    def strip_all(d):
        stripped(OFFICIAL_TOP)(d)
        stripped(OFFICIAL_VISION, "vision_config")(d)
        stripped(LLM_KEYS, "llm_config")(d)
        d["llm_config"]["architectures"] = ["InternLM2ForCausalLM"]
        d["vision_config"]["num_attention_heads"] = 25  # 3200 wide: keep a head count that divides it
    config = ModelConfig.from_json(write(tmp_path, strip_all))
    written = config.to_dict()
    assert {key: written[key] for key in OFFICIAL_TOP} == OFFICIAL_TOP and written["template"] == "internvl2_5"
    assert {key: written["vision_config"][key] for key in OFFICIAL_VISION} == OFFICIAL_VISION
    assert {key: written["llm_config"][key] for key in OFFICIAL_INTERNLM2} == OFFICIAL_INTERNLM2
    assert (written["llm_config"]["pad_token_id"], written["llm_config"]["bias"]) == (0, True)
    for cls, section in ((ModelConfig, written), (VisionConfig, written["vision_config"]),
                         (LLMConfig, written["llm_config"])):
        assert {f.name for f in dataclasses.fields(cls)} - {"extra", "vision", "llm"} <= set(section)
    path = tmp_path / "written.json"
    config.to_json(path)
    assert ModelConfig.from_json(path) == config


def test_a_tied_head_in_llm_config_is_read_untied_as_the_official_config_does(tmp_path):
    def tie(d):
        d["tie_word_embeddings"] = True
        d["llm_config"]["tie_word_embeddings"] = True
    config = ModelConfig.from_json(write(tmp_path, tie))
    assert config.llm.tie_word_embeddings is False
    assert config.to_dict()["tie_word_embeddings"] is False and not config.to_dict()["llm_config"]["tie_word_embeddings"]


def test_rope_written_the_transformers_5_way_is_read(tmp_path):
    """transformers >= 5 saves a Qwen2 llm_config's RoPE as `rope_parameters` only (the official remote code
    re-saved under it does): its theta and scaling must be read, not replaced by defaults."""
    def t5(d, params):
        d["llm_config"].pop("rope_theta")
        d["llm_config"].pop("rope_scaling")
        d["llm_config"]["rope_parameters"] = params
    config = ModelConfig.from_json(write(tmp_path, lambda d: t5(d, {"rope_theta": 5e6, "rope_type": "linear",
                                                                    "factor": 2.0})))
    assert config.llm.rope_theta == 5e6 and config.llm.rope_scaling == {"type": "linear", "factor": 2.0}
    written = config.to_dict()["llm_config"]  # back in the official keys, which every version reads
    assert "rope_parameters" not in written and (written["rope_theta"], written["rope_scaling"]) == (
        5e6, {"type": "linear", "factor": 2.0})
    config = ModelConfig.from_json(write(tmp_path, lambda d: t5(d, {"rope_theta": 20000.0, "rope_type": "default"})))
    assert config.llm.rope_theta == 20000.0 and config.llm.rope_scaling is None
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn' is not implemented"):
        ModelConfig.from_json(write(tmp_path, lambda d: t5(d, {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0})))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: VisionConfig(hidden_size="64"), "vision_config.hidden_size is '64', not an integer"),
        (lambda: VisionConfig(hidden_size=64.0), "vision_config.hidden_size is 64.0, not an integer"),
        (lambda: VisionConfig(num_hidden_layers=True), "vision_config.num_hidden_layers is True, not an integer"),
        (lambda: VisionConfig(qk_normalization=1), "vision_config.qk_normalization is 1, not True or False"),
        (lambda: VisionConfig(architectures=None), "vision_config.architectures is None, not a tuple of names"),
        (lambda: LLMConfig(eos_token_id=[1, True]), r"llm_config.eos_token_id is \[1, True\], not a token id"),
        (lambda: LLMConfig(rope_scaling="linear"), "llm_config.rope_scaling is 'linear', not a dict or None"),
        # not read as the names 'Q', 'w', ... (nor a TypeError for a number)
        (lambda: LLMConfig(architectures="Qwen2ForCausalLM"),
         "^llm_config.architectures is 'Qwen2ForCausalLM', not a tuple of names$"),
        (lambda: LLMConfig(architectures=3), "^llm_config.architectures is 3, not a tuple of names$"),
        (lambda: ModelConfig(vision={}), r"^vision is \{\}, not a VisionConfig$"),
        (lambda: ModelConfig(max_dynamic_patch=6.0), "^max_dynamic_patch is 6.0, not an integer$"),
    ],
)
def test_configs_built_in_python_are_type_checked_as_config_json_is(build, message):
    """A config built in Python took its types as given: `hidden_size="64"` failed deep inside the model
    (a TypeError in nn.Linear), a float size wrote a config.json the official loader refuses."""
    with pytest.raises(ConfigError, match=message):
        build()


def test_python_configs_take_what_json_gives_as_tuples_and_ints_for_floats():
    assert LLMConfig(eos_token_id=(151645, 151643), rope_theta=10000).rope_theta == 10000
    assert VisionConfig(architectures=["InternVisionModel"], layer_norm_eps=0).layer_norm_eps == 0
    assert ModelConfig(force_image_size=None).force_image_size is None


def test_select_layer_takes_each_index_of_the_official_hidden_state_tuple_and_no_other(tiny):
    """The official select_layer indexes the ViT's hidden states (embeddings, then L layers): -(L + 1)..L."""
    n = tiny.vision.num_hidden_layers
    for layer in (-n - 1, -1, 0, n):
        assert tiny.replace(select_layer=layer).select_layer == layer
    for layer in (-n - 2, n + 1):
        with pytest.raises(ConfigError, match=rf"^select_layer {layer} is out of range for a {n}-layer ViT$"):
            tiny.replace(select_layer=layer)


def test_json_files_with_integers_past_pythons_digit_limit_are_named(tmp_path):
    """json.loads raises a plain ValueError for an integer of more than 4300 digits (Python's limit on reading
    them): a request line, config.json, meta.json, MMPR line or metrics line holding one was a traceback."""
    from internvl_mpo.config import read_config_json
    from internvl_mpo.errors import InputError
    from internvl_mpo.jsonl import read_objects
    from internvl_mpo.train.cli import read_metrics
    from internvl_mpo.train.mmpr import load_meta

    huge = "7" * 5000
    path = tmp_path / "big.json"
    path.write_text('{"x": ' + huge + "}")
    lines = tmp_path / "big.jsonl"
    lines.write_text('{"step": 1, "question": ' + huge + "}\n")
    digits = f"an integer of more than {sys.get_int_max_str_digits()} digits"
    cases = [(lambda: read_config_json(path), ConfigError, f"big.json: its JSON holds {digits}"),
             (lambda: load_meta(str(path)), InputError, f"big.json: its JSON holds {digits}"),
             (lambda: list(read_objects(lines)), InputError, f"big.jsonl:1: its JSON holds {digits}"),
             (lambda: read_metrics(lines), InputError, f"big.jsonl:1: its JSON holds {digits}")]
    for call, error, message in cases:
        with pytest.raises(error) as caught:
            call()
        assert message in str(caught.value)
    lines.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 1' + "0" * 400 + "}\n")  # read, past a float
    with pytest.raises(InputError, match="big.jsonl:2: 'loss' is an integer of 401 digits, past what a plot can draw"):
        read_metrics(lines)


def test_other_json_files_with_odd_values_are_named(tmp_path):
    """Tokenizer files, the safetensors index, resumable runs' progress and settings files, training checkpoints'
    JSON and convert's source files: a 5000-digit integer, a lone surrogate, another JSON type or a folder in
    their place was a traceback (ValueError, UnicodeEncodeError, AttributeError, IsADirectoryError)."""
    from internvl_mpo.checkpoint import open_weights
    from internvl_mpo.chat.tokenizer import read_tokenizer_json
    from internvl_mpo.convert import _read_json
    from internvl_mpo.errors import CheckpointError, InputError
    from internvl_mpo.run_folder import Progress, read_settings
    from internvl_mpo.train.checkpointing import read_json

    digits = f"its JSON holds an integer of more than {sys.get_int_max_str_digits()} digits"
    huge, surrogate, listed = tmp_path / "huge.json", tmp_path / "surrogate.json", tmp_path / "list.json"
    huge.write_text('{"x": ' + "7" * 5000 + "}")
    surrogate.write_text('{"eos_token": "<|im_end|>\\udc00"}')
    listed.write_text("[1, 2]")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {}, "n": ' + "7" * 5000 + "}")
    progress = tmp_path / "progress.jsonl"
    cases = [
        (lambda: read_tokenizer_json(huge), CheckpointError, f"cannot read tokenizer file {huge}: {digits}"),
        (lambda: read_tokenizer_json(surrogate), CheckpointError,
         f"cannot read tokenizer file {surrogate}: a string holds \\udc00 without its surrogate pair"),
        (lambda: open_weights(folder), CheckpointError, f"index.json: not a valid safetensors index ({digits})"),
        (lambda: read_json(huge), CheckpointError, f"{huge}: {digits}"),
        (lambda: read_json(listed), CheckpointError, f"{listed}: not a JSON object of a checkpoint's state"),
        (lambda: read_json(tmp_path), CheckpointError, f"{tmp_path}: cannot read it"),
        (lambda: _read_json(huge), ConfigError, f"{huge}: {digits}"),
        (lambda: _read_json(listed), ConfigError, f"{listed}: not a JSON object of settings (a JSON list)"),
        (lambda: read_settings(huge, "eval", "output folder"), ConfigError,
         f"{huge}: not the settings of an eval run; use another output folder"),
        (lambda: read_settings(tmp_path, "pairs", "output folder"), ConfigError, f"{tmp_path}: cannot read it"),
        (lambda: Progress(tmp_path).load(), InputError, f"{tmp_path}: cannot read it"),
    ]
    for line in ('{"id": "1", "n": ' + "7" * 5000 + "}", '{"id": "1", "prediction": "yes\\ud800"}'):
        progress.write_text(line + "\n")
        with pytest.raises(InputError, match=re.escape(f"{progress}:1: corrupt progress line")):
            Progress(progress).load()
    for call, error, message in cases:
        with pytest.raises(error) as caught:
            call()
        assert message in str(caught.value), (message, str(caught.value))


def test_json_files_nested_too_deeply_are_named_not_a_recursion_error(tmp_path):
    """json.loads raises RecursionError (no ValueError) past Python's recursion limit: a config.json, tokenizer file,
    safetensors index, request or metrics line, or --json-schema file holding one was a traceback."""
    from internvl_mpo.checkpoint import open_weights
    from internvl_mpo.chat.tokenizer import read_tokenizer_json
    from internvl_mpo.cli_chat import _read_schema
    from internvl_mpo.config import read_config_json
    from internvl_mpo.errors import CheckpointError, InputError
    from internvl_mpo.jsonl import read_objects

    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "deep.json"
    path.write_text('{"x": ' + deep + "}")
    lines = tmp_path / "deep.jsonl"
    lines.write_text('{"id": 1, "question": ' + deep + "}\n")
    cases = [
        (lambda: read_config_json(path), ConfigError, "deep.json: its JSON is nested too deeply to read"),
        (lambda: read_tokenizer_json(path), CheckpointError, "deep.json: its JSON is nested too deeply"),
        (lambda: _read_schema(str(path)), InputError, "deep.json: its JSON is nested too deeply to read"),
        (lambda: list(read_objects(lines)), InputError, "deep.jsonl:1: its JSON is nested too deeply to read"),
    ]
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ' + deep + "}")
    cases.append((lambda: open_weights(folder), CheckpointError, "index.json: not a valid safetensors index"))
    for call, error, message in cases:
        with pytest.raises(error) as caught:
            call()
        assert message in str(caught.value)


def test_top_level_keys_named_like_our_fields_are_kept_and_written_back(tmp_path):
    from internvl_mpo.config import ModelConfig

    d = ModelConfig().to_dict()
    d.update(vision="a note", llm={"note": 1})
    config = ModelConfig.from_dict(d)
    assert config.to_dict()["vision"] == "a note" and config.to_dict()["llm"] == {"note": 1}
    assert config.vision == ModelConfig().vision

"""Reading the official config.json: defaults equal the 4B values, refusals are clear."""

from __future__ import annotations

import json

import pytest

from internvl_mpo.config import ModelConfig
from internvl_mpo.errors import ConfigError


def test_defaults_are_the_4b_model():
    config = ModelConfig()
    assert config.num_image_token == 256
    assert config.projector_in_features == 4096
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
        (lambda d: d.update(use_llm_lora=16), r"use_llm_lora=16: .*unmerged .*tools/merge_lora.py"),
        (lambda d: d.update(use_backbone_lora=8), r"use_backbone_lora=8: .*unmerged .*tools/merge_lora.py"),
        (lambda d: d.update(model_type="internvl"),
         r"transformers' native InternVL layout.*internvl-mpo convert --to official SRC DST"),
        (lambda d: d["llm_config"].update(num_key_value_heads=0), "llm_config.num_key_value_heads is 0, not >= 1"),
        (lambda d: d["vision_config"].update(num_attention_heads=0), "vision_config.num_attention_heads is 0, not >= 1"),
        (lambda d: d["vision_config"].update(patch_size=-14), "vision_config.patch_size is -14, not >= 1"),
        (lambda d: d["llm_config"].update(hidden_size=-8), "llm_config.hidden_size is -8, not >= 1"),
        (lambda d: d["llm_config"].update(architectures=None), r"llm_config.architectures \[None\] is not implemented"),
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
        (lambda d: d.update(force_image_size="448"), 'force_image_size is "448", not an integer or null'),
        (lambda d: d["llm_config"].update(eos_token_id=["<|im_end|>"]), "eos_token_id is .*, not a token id"),
        (lambda d: d.update(max_dynamic_patch=0), "max_dynamic_patch is 0, not >= 1"),
        (lambda d: d.update(min_dynamic_patch=6, max_dynamic_patch=4), "min_dynamic_patch 6 is above max_dynamic_patch 4"),
        (lambda d: d.update(quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128}),
         r"quantization_config \(quant_method 'awq'\): quantized weights are not implemented; .*without -AWQ"),
        (lambda d: d["llm_config"].update(quantization_config={"quant_method": "fp8"}),
         r"llm_config.quantization_config \(quant_method 'fp8'\)"),
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


def test_not_utf8(tmp_path):
    """Some Windows editors save UTF-16: an error naming the file, not a UnicodeDecodeError."""
    path = tmp_path / "config.json"
    path.write_bytes(json.dumps(ModelConfig().to_dict()).encode("utf-16"))
    with pytest.raises(ConfigError, match="config.json: not UTF-8 text"):
        ModelConfig.from_json(tmp_path)


def test_missing_keys_take_the_official_config_classes_defaults(tmp_path):
    def strip(d):
        for key in ("norm_type", "qk_normalization", "qkv_bias"):
            d["vision_config"].pop(key)
        d.pop("force_image_size")
    config = ModelConfig.from_json(write(tmp_path, strip))  # InternVisionConfig defaults: the 6B tower's
    v = config.vision
    assert (v.norm_type, v.qk_normalization, v.qkv_bias) == ("rms_norm", True, False)
    assert config.force_image_size is None
    with pytest.raises(ConfigError, match="ps_version 'v1' is not implemented"):  # InternVLChatConfig's default
        ModelConfig.from_json(write(tmp_path, lambda d: d.pop("ps_version")))


def test_a_tied_head_in_llm_config_is_read_untied_as_the_official_config_does(tmp_path):
    def tie(d):
        d["tie_word_embeddings"] = True
        d["llm_config"]["tie_word_embeddings"] = True
    config = ModelConfig.from_json(write(tmp_path, tie))
    assert config.llm.tie_word_embeddings is False
    assert config.to_dict()["tie_word_embeddings"] is False and not config.to_dict()["llm_config"]["tie_word_embeddings"]


def test_missing_llm_keys_take_the_official_config_classes_defaults(tmp_path):
    """Qwen2Config and InternLM2Config defaults, not the 4B values: rope_theta 10000 and 32 heads change
    the logits without changing a weight shape."""
    def strip(d):
        for key in ("rope_theta", "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            d["llm_config"].pop(key)
    llm = ModelConfig.from_json(write(tmp_path, strip)).llm
    assert (llm.rope_theta, llm.num_attention_heads, llm.num_key_value_heads, llm.max_position_embeddings) == (
        10000.0, 32, 32, 32768)

    def strip_internlm2(d):
        strip(d)
        d["llm_config"].update(architectures=["InternLM2ForCausalLM"], num_attention_heads=16)
    llm = ModelConfig.from_json(write(tmp_path, strip_internlm2)).llm
    assert (llm.rope_theta, llm.num_attention_heads, llm.num_key_value_heads, llm.max_position_embeddings) == (
        10000.0, 16, 16, 2048)
    llm = ModelConfig.from_json(write(tmp_path, lambda d: d["llm_config"].update(num_key_value_heads=None))).llm
    assert llm.num_key_value_heads == llm.num_attention_heads == 16  # null: one kv head per head, in both classes


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

"""Conversion official <-> transformers InternVL: transformers loads what we write, with our logits;
what transformers writes loads in our model; both round trips are bit-exact."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from internvl_mpo.chat.template import build_prompt_ids, render_prompt
from internvl_mpo.chat.tokenizer import load_tokenizer
from internvl_mpo.checkpoint import SAVE_LOCK, open_weights
from internvl_mpo.cli_convert import convert_command
from internvl_mpo.config import FAMILY_SIZES, ModelConfig, family_config
from internvl_mpo.convert import (
    HEAD, config_from_hf, convert, hf_config_dict, hf_disk_name, key_maps,
    remote_code_note, split_fused,
)
from internvl_mpo.errors import CheckpointError, ConfigError, InputError
from internvl_mpo.model import InternVL
from internvl_mpo.processor.image import image_to_pixel_values

from conftest import (
    IMAGE_TOKEN_ID, hf_config, hf_reference, hf_to_official, modes_other_than, record_header_reads, tiny_chat_folder,
    tiny_config, write_checkpoint,
)
from test_internlm2 import hf_llama_config, hf_llama_reference, hf_llama_to_official, internlm2_config

SIX_B = dict(norm_type="rms_norm", qk_normalization=True, qkv_bias=False)


def official_folder(folder, llm: str, **vision):
    """An official-layout checkpoint with random weights, plus a tokenizer_config naming <IMG_CONTEXT>."""
    if llm == "internlm2":
        config = internlm2_config(**vision)
        state = hf_llama_to_official(hf_llama_reference(config).state_dict(), config)
    else:
        config = tiny_config(**vision)
        state = hf_to_official(hf_reference(config).state_dict())
    write_checkpoint(folder, config, state, shards=2)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {str(IMAGE_TOKEN_ID): {"content": "<IMG_CONTEXT>", "special": True}}}))
    return folder


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for key, file in open_weights(folder).files.items():
        with safe_open(str(file), "pt") as f:
            out[key] = f.get_tensor(key)
    return out


def inputs(config: ModelConfig, tiles: int = 2):
    torch.manual_seed(1)
    ids = torch.tensor([[5, 6] + [IMAGE_TOKEN_ID] * (tiles * config.num_image_token) + [7, 8, 9]])
    return ids, torch.randn(tiles, 3, 56, 56)


def load_hf(folder):
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    model.set_attn_implementation("eager")
    return model


@pytest.mark.parametrize("llm,vision", [("qwen2", {}), ("internlm2", SIX_B)])
def test_to_hf_loads_in_transformers_with_our_logits(tmp_path, llm, vision):
    src = official_folder(tmp_path / "src", llm, **vision)
    dst = convert(src, tmp_path / "hf", to="hf")
    ours = InternVL.from_pretrained(src, dtype=torch.float32)
    ref = load_hf(dst)
    assert ref.config.image_token_id == IMAGE_TOKEN_ID == ours.image_token_id
    assert ref.config.text_config.model_type == ("llama" if llm == "internlm2" else "qwen2")
    ids, pixels = inputs(ours.config)
    with torch.no_grad():
        diff = (ours(ids, pixel_values=pixels) - ref(input_ids=ids, pixel_values=pixels).logits).abs().max()
    assert diff <= 1e-4
    assert (dst / "tokenizer_config.json").exists()


@pytest.mark.parametrize("llm,vision", [("qwen2", {}), ("internlm2", SIX_B)])
def test_official_round_trip_is_lossless(tmp_path, llm, vision):
    src = official_folder(tmp_path / "src", llm, **vision)
    convert(src, tmp_path / "hf", to="hf", max_shard_size=20_000)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    back = convert(tmp_path / "hf", tmp_path / "back", to="official")
    before, after = tensors(src), tensors(back)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    src_config, back_config = ModelConfig.from_json(src), ModelConfig.from_json(back)
    assert back_config == src_config
    assert back_config.llm.extra.get("bias") == src_config.llm.extra.get("bias")
    assert back_config.llm.extra.get("pad_token_id") == src_config.llm.extra.get("pad_token_id")


@pytest.mark.parametrize("to", ["hf", "official"])
def test_a_conversion_reads_each_weight_files_header_and_config_json_once(tmp_path, monkeypatch, to):
    """It checked the source's shards for their keys, then opened each again to read the tensors; --to hf
    read config.json for the layout, then again for errors naming the file."""
    src = official_folder(tmp_path / "src", "qwen2")
    if to == "official":
        src = convert(src, tmp_path / "hf", to="hf", max_shard_size=20_000)
    opened = record_header_reads(monkeypatch)
    read_text, texts = Path.read_text, []
    monkeypatch.setattr(Path, "read_text", lambda path, *args, **kwargs: texts.append(path.resolve())
                        or read_text(path, *args, **kwargs))
    convert(src, tmp_path / "dst", to=to)
    shards = sorted(src.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(opened) == shards
    assert texts.count((src / "config.json").resolve()) == 1


@pytest.mark.parametrize("dynamic", [True, False])
def test_round_trip_keeps_the_tiling(tmp_path, dynamic):
    """The official config's tiling (dynamic_image_size, the tile limits) travels in transformers'
    preprocessor_config.json and comes back (dynamic_image_size false came back true)."""
    src = official_folder(tmp_path / "src", "qwen2")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "min_dynamic_patch": 2, "max_dynamic_patch": 4,
                                                 "dynamic_image_size": dynamic}))
    convert(src, tmp_path / "hf", to="hf")
    preprocessor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    # tiling off: one tile, since transformers' InternVLProcessor sets crop_to_patches itself
    assert (preprocessor["crop_to_patches"], preprocessor["min_patches"], preprocessor["max_patches"]) == (
        (True, 2, 4) if dynamic else (False, 1, 1))
    back = ModelConfig.from_json(convert(tmp_path / "hf", tmp_path / "back", to="official"))
    assert back == ModelConfig.from_json(src) and (back.dynamic_image_size, back.min_dynamic_patch,
                                                   back.max_dynamic_patch) == (dynamic, 2, 4)


def test_tiling_read_from_a_transformers_preprocessor_config():
    """transformers' InternVLProcessor passes crop_to_patches=True to its image processor whatever
    preprocessor_config.json says (the hub -hf ports, written by transformers' conversion script, save
    GotOcr2's default false): such a folder tiles up to max_patches, and so does the official folder made of it
    (it was read as one tile per image). Without the file the tiling is InternVL's; every tiled image gets a
    thumbnail, as transformers' processor adds."""
    hf_dict = hf_config_dict(tiny_config(), image_token_id=IMAGE_TOKEN_ID)
    for crop in ({}, {"crop_to_patches": False}, {"crop_to_patches": True}):
        config = config_from_hf(hf_dict, {"min_patches": 1, "max_patches": 6, **crop})
        assert (config.dynamic_image_size, config.max_dynamic_patch, config.use_thumbnail) == (True, 6, True)
    config = config_from_hf(hf_dict)
    assert (config.dynamic_image_size, config.max_dynamic_patch, config.use_thumbnail) == (True, 12, True)
    with pytest.raises(ConfigError, match='crop_to_patches is "yes", not true or false'):
        config_from_hf(hf_dict, {"crop_to_patches": "yes"})


def test_transformers_processor_tiles_a_converted_folder_as_the_official_config_says(tmp_path):
    """--to hf of a config with dynamic_image_size false wrote crop_to_patches false with max_patches 12, which
    InternVLProcessor overrides (its images_kwargs default crop_to_patches=True): transformers tiled the
    images that the official model sees whole. One tile is allowed (max_patches 1), and the official limits
    travel in config.json."""
    from transformers import AutoImageProcessor

    src = official_folder(tmp_path / "src", "qwen2")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "dynamic_image_size": False, "max_dynamic_patch": 6}))
    hf = convert(src, tmp_path / "hf", to="hf")
    processor = AutoImageProcessor.from_pretrained(hf, backend="pil")
    # crop_to_patches=True: what InternVLProcessor passes its image processor (its images_kwargs default)
    out = processor(images=[a_photo()], return_tensors="pt", crop_to_patches=True)
    assert out["num_patches"].tolist() == [1]
    back = ModelConfig.from_json(convert(hf, tmp_path / "back", to="official"))
    assert (back.dynamic_image_size, back.max_dynamic_patch) == (False, 6) and back == ModelConfig.from_json(src)


def test_a_tiling_off_folder_converted_before_2026_12_07_comes_back_with_tiling_off(tmp_path):
    """`--to hf` before 2026-12-07 wrote an official dynamic_image_size false as crop_to_patches false (its limits as
    min/max_patches) and nothing in config.json; `--to official` now reads crop_to_patches false as the hub ports'
    GotOcr2 default, so such a folder (it holds internvl_official_files.json) came back with tiling on."""
    src = official_folder(tmp_path / "src", "qwen2")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "dynamic_image_size": False, "max_dynamic_patch": 6}))
    hf = convert(src, tmp_path / "hf", to="hf")
    hf_dict = json.loads((hf / "config.json").read_text())  # made as the earlier conversion wrote it
    for key in ("dynamic_image_size", "min_dynamic_patch", "max_dynamic_patch"):
        del hf_dict[key]
    (hf / "config.json").write_text(json.dumps(hf_dict))
    preprocessor = json.loads((hf / "preprocessor_config.json").read_text())
    (hf / "preprocessor_config.json").write_text(json.dumps({**preprocessor, "crop_to_patches": False,
                                                             "min_patches": 1, "max_patches": 6}))
    back = ModelConfig.from_json(convert(hf, tmp_path / "back", to="official"))
    assert (back.dynamic_image_size, back.max_dynamic_patch) == (False, 6) and back == ModelConfig.from_json(src)


def test_a_vision_dropout_folder_converted_before_2026_12_07_comes_back_with_its_dropout(tmp_path):
    """`--to hf` before 2026-12-07 wrote the official vision dropout as hidden_dropout_prob (and attention_dropout as
    projection_dropout); `--to official` now reads the dropout from projection_dropout, so such a folder (it holds
    internvl_official_files.json) came back with the attention's dropout in its place (0.1 -> 0.0, silently)."""
    src = official_folder(tmp_path / "src", "qwen2")
    config = json.loads((src / "config.json").read_text())
    config["vision_config"].update(dropout=0.1, attention_dropout=0.0)
    (src / "config.json").write_text(json.dumps(config))
    hf = convert(src, tmp_path / "hf", to="hf")
    hf_dict = json.loads((hf / "config.json").read_text())  # made as the earlier conversion wrote it
    hf_dict["vision_config"].update(hidden_dropout_prob=0.1, projection_dropout=0.0)
    (hf / "config.json").write_text(json.dumps(hf_dict))
    back = ModelConfig.from_json(convert(hf, tmp_path / "back", to="official"))
    assert (back.vision.dropout, back.vision.attention_dropout) == (0.1, 0.0) and back == ModelConfig.from_json(src)


@pytest.mark.parametrize("scaling", [
    {"factor": 2.5, "rope_type": "dynamic", "type": "dynamic"},  # transformers 4.x adds rope_type to the saved dict
    {"factor": 2.5, "rope_type": "dynamic"},
    {"factor": 2, "type": "dynamic"},
    None,
])
def test_rope_scaling_is_written_as_the_official_internlm2_config_reads_it(scaling):
    """The official InternLM2Config (`_rope_scaling_validation`) takes rope_scaling only as exactly {"type",
    "factor"} with a float factor > 1; `--to official` copied transformers' form (rope_type, an int factor)
    into llm_config, so the official code and vLLM refused the converted folder."""
    hf_dict = hf_config_dict(internlm2_config(), image_token_id=IMAGE_TOKEN_ID)
    hf_dict["text_config"]["rope_scaling"] = scaling
    written = config_from_hf(hf_dict).to_dict()["llm_config"]["rope_scaling"]
    if scaling is None:
        assert written is None
        return
    assert written.keys() == {"type", "factor"} and written["type"] == "dynamic"
    assert isinstance(written["factor"], float) and written["factor"] == scaling["factor"]


def test_a_config_value_of_the_wrong_type_is_refused_naming_the_folder_and_key(tmp_path):
    """--to official wrote a transformers config's "1e-6" or "yes" into an official config.json that loading then
    refused (the conversion "succeeded"); --to hf's config errors did not name the file."""
    src = official_folder(tmp_path / "src", "qwen2")
    hf = convert(src, tmp_path / "hf", to="hf")
    settings = json.loads((hf / "config.json").read_text())
    for section, key, value, message in (
            ("vision_config", "layer_norm_eps", "1e-6", 'vision_config.layer_norm_eps is "1e-6", not a number'),
            ("vision_config", "attention_bias", "yes", 'vision_config.qkv_bias is "yes", not true or false'),
            ("vision_config", "num_channels", "3", 'vision_config.num_channels is "3", not an integer'),
            ("text_config", "rope_theta", "1e6", 'llm_config.rope_theta is "1e6", not a number')):
        (hf / "config.json").write_text(json.dumps({**settings, section: {**settings[section], key: value}}))
        with pytest.raises(ConfigError, match=f"^{re.escape(str(hf))}: {message}"):
            convert(hf, tmp_path / "back", to="official")
        assert not (tmp_path / "back").exists()
    settings = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**settings, "select_layer": "-1"}))
    with pytest.raises(ConfigError, match=f'^{re.escape(str(src / "config.json"))}: select_layer is "-1", not an'):
        convert(src, tmp_path / "hf2", to="hf")


def test_an_unknown_template_is_refused_before_the_weights_naming_the_file(tmp_path, monkeypatch):
    """A config.json whose template has no chat template here (InternVL2's 'internlm2-chat') was refused
    only after every weight was written (minutes for a real size), by an error naming neither the file nor
    the key; it is now refused first, naming both."""
    src = official_folder(tmp_path / "src", "internlm2")
    settings = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**settings, "template": "internlm2-chat"}))
    monkeypatch.setattr(InternVL, "expected_keys", None)  # the conversion table: reached only after the checks
    with pytest.raises(ConfigError, match=re.escape(f"{src / 'config.json'}: unknown conversation template "
                                                    "'internlm2-chat'; known: ['internvl2_5'] (the key \"template\")")):
        convert(src, tmp_path / "hf", to="hf")
    assert not (tmp_path / "hf").exists()


def test_use_thumbnail_false_is_refused_for_transformers(tmp_path):
    """transformers' InternVL processor adds a thumbnail to every tiled image: a config without one
    (use_thumbnail false, or left out, which the official config class reads as false) would convert
    to a model that tiles otherwise, so it is refused before any weight is written."""
    src = official_folder(tmp_path / "src", "qwen2")
    config = json.loads((src / "config.json").read_text())
    config.pop("use_thumbnail")
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config.json: use_thumbnail false .*set \"use_thumbnail\": true"):
        convert(src, tmp_path / "hf", to="hf")
    assert not (tmp_path / "hf").exists()


def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask_022):
    """Shards (safetensors alone makes them 0600) and copied tokenizer files (0600 at the source) alike."""
    src = official_folder(tmp_path / "src", "qwen2")
    (src / "tokenizer_config.json").chmod(0o600)
    convert(src, tmp_path / "hf", to="hf", max_shard_size=20_000)
    convert(tmp_path / "hf", tmp_path / "back", to="official")
    for out in (tmp_path / "hf", tmp_path / "back"):
        assert (out / "tokenizer_config.json").exists() and list(out.glob("model*.safetensors"))
        assert modes_other_than(out, 0o644) == {}


@pytest.mark.parametrize("llm,vision", [("qwen2", SIX_B), ("internlm2", {})])
def test_transformers_checkpoint_to_official(tmp_path, llm, vision):
    """A folder written by transformers' save_pretrained converts, loads in our model, gives its logits,
    and converts back to the same transformers tensors."""
    if llm == "internlm2":
        config = internlm2_config(**vision)
        ref = hf_llama_reference(config)
    else:
        config = tiny_config(**vision)
        ref = hf_reference(config)
    ref.save_pretrained(tmp_path / "hf")
    official = convert(tmp_path / "hf", tmp_path / "official", to="official")
    ours = InternVL.from_pretrained(official, dtype=torch.float32, image_token_id=IMAGE_TOKEN_ID)
    # transformers wrote bos/eos as null (not given) and its own init-only initializer_range; all else comes back.
    llm = dataclasses.replace(
        ours.config.llm, bos_token_id=config.llm.bos_token_id, eos_token_id=config.llm.eos_token_id)
    vision = dataclasses.replace(ours.config.vision, initializer_range=config.vision.initializer_range)
    assert ours.config.replace(llm=llm, vision=vision) == config
    ids, pixels = inputs(config, tiles=1)
    with torch.no_grad():
        diff = (ours(ids, pixel_values=pixels) - ref(input_ids=ids, pixel_values=pixels).logits).abs().max()
    assert diff <= 1e-4
    again = convert(official, tmp_path / "hf2", to="hf", image_token_id=IMAGE_TOKEN_ID)
    first, second = tensors(tmp_path / "hf"), tensors(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_tied_transformers_checkpoint_gets_its_head_written(tmp_path, llm):
    """transformers 5 ties the head when the top-level tie_word_embeddings is true (the InternVLConfig
    default) and saves none; the official folder holds the embeddings as its head, says untied (as the
    official code reads any config) and gives transformers' logits. For a Llama text model (the InternLM2
    sizes, whose official head is `language_model.output`) the head written was the embedding tensor itself,
    and safetensors refused to save the shard holding both ("Some tensors share memory"), a traceback."""
    from transformers import InternVLForConditionalGeneration

    config = internlm2_config() if llm == "internlm2" else tiny_config()
    hf = hf_llama_config(config) if llm == "internlm2" else hf_config(config)
    hf.tie_word_embeddings, hf.text_config.tie_word_embeddings = True, False
    torch.manual_seed(0)
    ref = InternVLForConditionalGeneration(hf).eval()
    assert ref.lm_head.weight is ref.model.language_model.embed_tokens.weight
    ref.save_pretrained(tmp_path / "hf")
    assert not any(key.endswith("lm_head.weight") for key in open_weights(tmp_path / "hf").files)
    official = convert(tmp_path / "hf", tmp_path / "official", to="official")
    saved = json.loads((official / "config.json").read_text())
    assert saved["llm_config"]["tie_word_embeddings"] is False
    weights = tensors(official)
    head, embeddings = (("language_model.output.weight", "language_model.model.tok_embeddings.weight")
                        if llm == "internlm2" else ("language_model.lm_head.weight",
                                                    "language_model.model.embed_tokens.weight"))
    assert torch.equal(weights[head], weights[embeddings])
    ours = InternVL.from_pretrained(official, dtype=torch.float32, image_token_id=IMAGE_TOKEN_ID)
    ids, pixels = inputs(config, tiles=1)
    with torch.no_grad():
        diff = (ours(ids, pixel_values=pixels) - ref(input_ids=ids, pixel_values=pixels).logits).abs().max()
    assert diff <= 1e-4
    untied = json.loads((tmp_path / "hf" / "config.json").read_text())
    untied["tie_word_embeddings"] = False  # then transformers would start from a random head
    (tmp_path / "hf" / "config.json").write_text(json.dumps(untied))
    with pytest.raises(CheckpointError, match=f"1 missing: {HEAD}"):
        convert(tmp_path / "hf", tmp_path / "untied", to="official")
    del untied["tie_word_embeddings"]  # left out: transformers' default, tied
    (tmp_path / "hf" / "config.json").write_text(json.dumps(untied))
    assert type(hf).from_pretrained(tmp_path / "hf").tie_word_embeddings
    weights = tensors(convert(tmp_path / "hf", tmp_path / "default", to="official"))
    assert torch.equal(weights[head], weights[embeddings])


def test_refusals(tmp_path):
    src = official_folder(tmp_path / "src", "qwen2")
    with pytest.raises(InputError, match="to='llama'"):
        convert(src, tmp_path / "x", to="llama")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="exists and is not empty"):
        convert(src, tmp_path / "full", to="hf")
    with pytest.raises(InputError, match="must differ from the source"):
        convert(src, src, to="hf")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="file is a file; give a new folder"):
        convert(src, tmp_path / "file", to="hf")
    with pytest.raises(InputError, match=r"file/new: .*file is a file, not a folder; give a new folder"):
        convert(src, tmp_path / "file" / "new", to="hf")  # was a NotADirectoryError traceback
    with pytest.raises(InputError, match="already in the official layout"):
        convert(src, tmp_path / "w", to="official")
    hf = convert(src, tmp_path / "hf", to="hf")
    with pytest.raises(InputError, match="already in the transformers layout"):
        convert(hf, tmp_path / "w", to="hf")
    assert not (tmp_path / "w").exists()
    (src / "tokenizer_config.json").write_text(json.dumps(  # another model's: was written as the hf image_token_id
        {"added_tokens_decoder": {"151667": {"content": "<IMG_CONTEXT>", "special": True}}}))
    with pytest.raises(CheckpointError, match=r"give <IMG_CONTEXT> the id 151667, outside the model's vocabulary"):
        convert(src, tmp_path / "y", to="hf")
    (src / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no <IMG_CONTEXT> in the tokenizer files .*copy the model's tokenizer"):
        convert(src, tmp_path / "y", to="hf")
    bad = tmp_path / "bad"
    config = tiny_config()
    state = hf_to_official(hf_reference(config).state_dict())
    del state["mlp1.1.bias"]
    write_checkpoint(bad, config, state)
    with pytest.raises(CheckpointError, match="1 missing: mlp1.1.bias"):
        convert(bad, tmp_path / "z", to="hf", image_token_id=IMAGE_TOKEN_ID)
    assert not (tmp_path / "z").exists()
    (bad / "config.json").write_bytes((bad / "config.json").read_text().encode("utf-16"))  # a Windows editor's save
    with pytest.raises(ConfigError, match=r"bad/config.json: not UTF-8 text"):
        convert(bad, tmp_path / "z", to="hf", image_token_id=IMAGE_TOKEN_ID)


def test_a_folder_without_config_says_what_it_holds_as_loading_does(tmp_path):
    """A training run's folder, a PEFT adapter: loading names them (and the model folder to give), convert
    said only "config.json: no such config file"."""
    official_folder(tmp_path / "run" / "final", "qwen2")
    with pytest.raises(ConfigError, match=r"run: a training run's folder; its model is .*run/final"):
        convert(tmp_path / "run", tmp_path / "x", to="hf")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="adapter holds a PEFT adapter"):
        convert(tmp_path / "adapter", tmp_path / "x", to="official")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("to", ["hf", "official"])
def test_unreadable_weights_are_named_and_leave_no_partial_destination(tmp_path, to):
    """A corrupt shard, an index that puts a key in a shard that does not hold it, integer weights, a NaN (it was
    converted without a word): one CheckpointError naming the file, and no half-written destination left to block
    the next try."""
    from safetensors.torch import load_file, save_file

    src = official_folder(tmp_path / "src", "qwen2")
    if to == "official":
        src = convert(src, tmp_path / "hf", to="hf", max_shard_size=20_000)
    first, second = sorted(src.glob("model-*.safetensors"))[:2]
    index = json.loads((src / "model.safetensors.index.json").read_text())
    moved = sorted(k for k, f in index["weight_map"].items() if f == second.name)[-1]  # read late in the run

    def misplaced(folder):
        wrong = json.loads((folder / "model.safetensors.index.json").read_text())
        wrong["weight_map"][moved] = first.name
        (folder / "model.safetensors.index.json").write_text(json.dumps(wrong))

    def integers(folder):
        tensors = load_file(folder / second.name)
        with safe_open(str(folder / second.name), "pt") as f:
            metadata = f.metadata()  # the save id of the conversion: the shard stays one of its files
        save_file({k: v.to(torch.int32) if k == moved else v for k, v in tensors.items()}, folder / second.name,
                  metadata=metadata)

    def nan(folder):  # a diverged run's weight
        tensors = load_file(folder / second.name)
        with safe_open(str(folder / second.name), "pt") as f:
            metadata = f.metadata()
        tensors[moved].view(-1)[-1] = float("nan")
        save_file(tensors, folder / second.name, metadata=metadata)

    cases = [(lambda folder: (folder / second.name).write_bytes(b"garbage"), f"{second.name}: not a readable"),
             (misplaced, f"{first.name} lacks 1 tensor the index lists there ({moved})"), (integers, f"{second.name}: {moved} is stored as"),
             (nan, f"{second.name}: {moved} holds NaN or inf values; the checkpoint is broken")]
    for i, (damage, message) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(src, bad)
        damage(bad)
        with pytest.raises(CheckpointError, match=re.escape(message)):
            convert(bad, tmp_path / f"out{i}", to=to)
        assert not (tmp_path / f"out{i}").exists()
    (tmp_path / "empty").mkdir()  # a destination that existed (empty) stays, empty
    with pytest.raises(CheckpointError, match=re.escape(message)):  # the damage, after weights were written there
        convert(bad, tmp_path / "empty", to=to)
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("to", ["hf", "official"])
def test_float8_weights_and_quantized_checkpoints_are_refused(tmp_path, to):
    """A float8 weight without its scales was converted as it was (and read wrong by every loader after); a
    transformers folder with a quantization_config (an AWQ or FP8 -hf port) converted to the official layout
    without it. Both are refused in one line, naming the weight and its dtype, or the key and the method, and
    nothing is written."""
    from safetensors.torch import load_file, save_file

    src = official_folder(tmp_path / "src", "qwen2")
    if to == "official":
        src = convert(src, tmp_path / "hf", to="hf")
    shard = sorted(src.glob("model*.safetensors"))[-1]
    with safe_open(str(shard), "pt") as f:
        metadata = f.metadata()
    weights = load_file(shard)
    key = sorted(weights)[0]
    save_file({**weights, key: weights[key].to(torch.float8_e4m3fn)}, shard, metadata=metadata)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(shard))}: {re.escape(key)} is stored as "
                       r"float8_e4m3fn, a quantized dtype, and config.json has no quantization_config"):
        convert(src, tmp_path / "out", to=to)
    assert not (tmp_path / "out").exists()
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"quantization_config \(quant_method 'awq'\): quantized weights are not "
                       "implemented") as info:
        convert(src, tmp_path / "out", to=to)
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("to", ["hf", "official"])
def test_a_full_disk_is_one_line_naming_the_destination_and_leaves_nothing(tmp_path, monkeypatch, capsys, to):
    """safetensors reports a full disk as a SafetensorError: the command printed its traceback; it is one
    line naming the destination and the cause, and no half-written destination stays."""
    from safetensors import SafetensorError

    from internvl_mpo import checkpoint
    from internvl_mpo.cli import main

    src = official_folder(tmp_path / "src", "qwen2")
    if to == "official":
        src = convert(src, tmp_path / "hf", to="hf")

    def disk_full(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_tensors", disk_full)
    dst = tmp_path / "out"
    assert main(["convert", str(src), str(dst), "--to", to]) == 1
    assert capsys.readouterr().err == (f"internvl-mpo convert: error: {dst}: saving failed (Error while serializing: "
                                       "I/O error: No space left on device (os error 28)); nothing of the conversion "
                                       "was kept\n")
    assert not dst.exists()


KILLED_CONVERSION = """
import os, signal, sys
from internvl_mpo import checkpoint
from internvl_mpo.convert import convert
src, dst, to, mount = sys.argv[1:]
if mount:
    os.path.ismount = lambda path: str(path) == dst
save_tensors, count = checkpoint.save_tensors, []

def killed_on_the_second_shard(tensors, path, metadata=None):
    count.append(path)
    if len(count) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    save_tensors(tensors, path, metadata=metadata)

checkpoint.save_tensors = killed_on_the_second_shard
convert(src, dst, to=to, max_shard_size=20_000)
"""


@pytest.mark.parametrize("to", ["hf", "official"])
@pytest.mark.parametrize("given", ["new", "empty", "mount point"])
def test_a_killed_conversion_leaves_the_destination_as_it_was_and_the_rerun_converts(tmp_path, monkeypatch, to,
                                                                                       given):
    """A conversion killed part way (SIGKILL, out of memory, a preempted job) left a half-written destination,
    which the rerun refused as not empty: the user had to delete it by hand. It writes into a temporary folder
    beside the destination (inside it where it is a mount point, which no rename replaces) and renames it into
    place when complete: the destination is as it was (missing, or empty), and the rerun clears what the killed
    one left and converts."""
    import subprocess
    import sys

    src = official_folder(tmp_path / "src", "qwen2")
    if to == "official":
        src = convert(src, tmp_path / "hf", to="hf")
    dst = tmp_path / "out"
    if given != "new":
        dst.mkdir()
    mount = "1" if given == "mount point" else ""
    run = subprocess.run([sys.executable, "-c", KILLED_CONVERSION, str(src), str(dst), to, mount])
    assert run.returncode == -9
    if given == "new":
        assert not dst.exists() and (tmp_path / ".out.convert.tmp").is_dir()
    else:
        assert {p.name for p in dst.iterdir()} <= {".convert.tmp", SAVE_LOCK}  # a lock file blocks nothing
    if mount:
        monkeypatch.setattr(os.path, "ismount", lambda path: path == dst)
    assert convert(src, dst, to=to, max_shard_size=20_000) == dst
    assert not (tmp_path / ".out.convert.tmp").exists() and not (dst / ".convert.tmp").exists()
    assert tensors(dst).keys() == tensors(convert(src, tmp_path / "clean", to=to)).keys()
    assert sorted(p.name for p in dst.iterdir() if not p.name.startswith("model")) == sorted(
        p.name for p in (tmp_path / "clean").iterdir() if not p.name.startswith("model"))


@pytest.mark.parametrize("given", ["working directory", "relative mount point"])
def test_a_conversion_into_the_working_directory_or_a_relative_mount_point(tmp_path, monkeypatch, capsys, given):
    """`convert SRC .` in an empty folder renamed the finished conversion onto it: the process (and the shell it
    came from) stayed in the deleted folder it replaced, so the command's closing note could not read
    ./config.json ("error: config.json: no such config file", exit 1) after writing the conversion, and `ls` in
    that shell showed nothing. A mount point (or a folder under an unwritable parent) named by a relative path
    was refused as "not empty": its staging folder inside it, listed relative, was not recognised."""
    from internvl_mpo.cli import main

    src = official_folder(tmp_path / "src", "qwen2")
    dst = tmp_path / "out"
    dst.mkdir()
    if given == "working directory":
        monkeypatch.chdir(dst)
    else:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == dst)
    assert main(["convert", str(src), "." if given == "working directory" else "out", "--to", "hf"]) == 0
    assert capsys.readouterr().err == ""
    assert os.path.samefile(".", dst if given == "working directory" else tmp_path)  # not a deleted folder
    assert (dst / "config.json").is_file() and not (dst / ".convert.tmp").exists()
    assert not (tmp_path / ".out.convert.tmp").exists()


def test_a_destination_name_near_the_length_limit_or_a_symlink_loop(tmp_path, capsys):
    """A destination whose name is valid but within 13 bytes of NAME_MAX (255) was refused: its staging
    folder `.NAME.convert.tmp` is longer ("File name too long"). A destination that is a symlink loop raised
    pathlib's RuntimeError with a traceback."""
    from internvl_mpo.cli import main

    src = official_folder(tmp_path / "src", "qwen2")
    long = tmp_path / ("d" * 250)
    assert main(["convert", str(src), str(long), "--to", "hf"]) == 0
    assert (long / "config.json").is_file() and [p.name for p in tmp_path.iterdir() if "convert" in p.name] == []
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    capsys.readouterr()
    assert main(["convert", str(src), str(loop), "--to", "hf"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"internvl-mpo convert: error: {loop}: cannot be used as a folder") and "Traceback" not in err


def test_a_destination_holding_a_symlink_loop_is_refused_as_not_empty(tmp_path, capsys):
    """Each entry of a destination folder was resolved to tell the staging folder apart: an entry that is a symlink
    loop raised pathlib's RuntimeError ("Symlink loop from ...") with a traceback; such a folder is not empty."""
    from internvl_mpo.cli import main

    src = official_folder(tmp_path / "src", "qwen2")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "loop").symlink_to("loop")
    capsys.readouterr()
    assert main(["convert", str(src), str(dst), "--to", "hf"]) == 1
    assert capsys.readouterr().err == f"internvl-mpo convert: error: {dst} exists and is not empty; give a new folder\n"


@pytest.mark.parametrize("name", ["tokenizer_config.json", "vocab.json"])
def test_a_source_tokenizer_file_that_is_a_broken_link_is_named_by_convert(tmp_path, name):
    """A hub snapshot whose tokenizer blob is gone: convert read the link as no file (tokenizer_config.json: "no
    <IMG_CONTEXT> in the tokenizer files"; vocab.json: left out of the converted folder without a word)."""
    src = official_folder(tmp_path / "src", "qwen2")
    (src / name).unlink(missing_ok=True)
    (src / name).symlink_to("../blobs/gone")
    with pytest.raises(CheckpointError, match=f"{name} is a symbolic link to ../blobs/gone, which leads to no file"):
        convert(src, tmp_path / "hf", to="hf")
    assert not (tmp_path / "hf").exists()


def test_a_staging_folder_left_inside_the_destination_is_cleared_by_a_conversion_from_elsewhere(tmp_path, monkeypatch):
    """`convert SRC .` stages inside DST; killed part way it leaves DST/.convert.tmp, which the next conversion into
    DST removes (README): one started from another directory refused DST as not empty."""
    src = official_folder(tmp_path / "src", "qwen2")
    dst = tmp_path / "out"
    (dst / ".convert.tmp").mkdir(parents=True)
    (dst / ".convert.tmp" / "model.safetensors").write_bytes(b"half a shard")
    monkeypatch.chdir(tmp_path)
    convert(src, dst, to="hf")
    assert (dst / "config.json").is_file() and not (dst / ".convert.tmp").exists()


def test_convert_command(tmp_path, capsys):
    """Both ways; InternLM2's tokenizer code files (named by tokenizer_config's auto_map) travel along; the
    official output says which official code files to add."""
    src = official_folder(tmp_path / "src", "internlm2")
    tokenizer_config = json.loads((src / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}
    (src / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (src / "tokenization_internlm2.py").write_text("# the official tokenizer code\n")
    assert convert_command(str(src), str(tmp_path / "hf"), to="hf") == 0
    assert "transformers layout" in capsys.readouterr().out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["InternVLForConditionalGeneration"]
    assert config["text_config"]["attention_bias"] is False and config["image_token_id"] == IMAGE_TOKEN_ID
    assert (tmp_path / "hf" / "tokenization_internlm2.py").read_text() == "# the official tokenizer code\n"
    assert convert_command(str(tmp_path / "hf"), str(tmp_path / "back"), to="official") == 0
    out = capsys.readouterr().out
    assert "has no configuration_internvl_chat.py, modeling_internvl_chat.py" in out
    assert (f'hf download OpenGVLab/InternVL2_5-SIZE-MPO --include "*.py" --local-dir {tmp_path / "back"}\n'
            "  (SIZE: the release this model comes from, one of 2B, 8B, 26B)") in out
    assert (tmp_path / "back" / "tokenization_internlm2.py").exists()


def test_tokenizer_code_that_tokenizer_config_names_and_the_folder_lacks_is_told_where_to_get_it(tmp_path, capsys):
    """An InternLM2 folder whose tokenizer_config.json's auto_map names tokenization_internlm2*.py it does not hold
    (downloaded without its .py files) converted without a word: AutoTokenizer.from_pretrained(...,
    trust_remote_code=True), which the official code and transformers load the tokenizer with, then fails on the
    missing file. Both ways the command says which files to add and how; a folder holding them gets no note."""
    src = official_folder(tmp_path / "src", "internlm2")
    tokenizer_config = json.loads((src / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                                      "tokenization_internlm2_fast.InternLM2TokenizerFast"]}
    (src / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert convert_command(str(src), str(tmp_path / "hf"), to="hf") == 0
    out = capsys.readouterr().out
    assert (f"note: {tmp_path / 'hf'} has no tokenization_internlm2.py, tokenization_internlm2_fast.py. This package "
            "does not need them; AutoTokenizer.from_pretrained(..., trust_remote_code=True) does. Add the .py files "
            "of the matching hub repo:\n  hf download OpenGVLab/InternVL2_5-SIZE-MPO --include \"tokenization_*.py\" "
            f"--local-dir {tmp_path / 'hf'}\n") in out
    assert convert_command(str(tmp_path / "hf"), str(tmp_path / "back"), to="official") == 0
    out = capsys.readouterr().out
    assert ("has no configuration_internvl_chat.py, modeling_internvl_chat.py, configuration_internlm2.py, "
            "modeling_internlm2.py, tokenization_internlm2.py, tokenization_internlm2_fast.py. This package does not "
            "need them; the official code (AutoModel.from_pretrained(..., trust_remote_code=True)) and "
            "AutoTokenizer.from_pretrained(..., trust_remote_code=True) do.") in out
    for name in ("tokenization_internlm2.py", "tokenization_internlm2_fast.py"):
        (src / name).write_text("# the official tokenizer code\n")
    assert convert_command(str(src), str(tmp_path / "hf2"), to="hf") == 0
    assert "note" not in capsys.readouterr().out


@pytest.mark.parametrize("held", [True, False])
def test_an_internlm2_folder_without_tokenizer_model_is_told_where_to_get_it(tmp_path, capsys, held):
    """transformers saves an InternLM2 tokenizer as tokenizer.json only; `--to official` from such a folder
    wrote, without a word, an official folder whose tokenizer chat, the official code and vLLM could not read
    (chat: 'not a byte-level BPE tokenizer'). The command now says which file is missing and how to get it."""
    src = official_folder(tmp_path / "src", "internlm2")
    (src / "tokenizer.model").write_bytes(b"sentencepiece model")
    convert(src, tmp_path / "hf", to="hf")
    if not held:
        (tmp_path / "hf" / "tokenizer.model").unlink()
    assert convert_command(str(tmp_path / "hf"), str(tmp_path / "back"), to="official") == 0
    out = capsys.readouterr().out
    note = (f"note: {tmp_path / 'back'} has no tokenizer.model, the InternLM2 tokenizer that chat, the official code"
            " and vLLM read (the transformers folder held none). Add the official tokenizer files of the matching"
            f' hub repo:\n  hf download OpenGVLab/InternVL2_5-SIZE-MPO --include "tokenizer*" --local-dir {tmp_path / "back"}'
            "\n  (SIZE: the release this model comes from, one of 2B, 8B, 26B)")
    assert (note in out) != held
    convert(official_folder(tmp_path / "qwen2", "qwen2"), tmp_path / "qwen2_hf", to="hf")  # no tokenizer.model
    convert_command(str(tmp_path / "qwen2_hf"), str(tmp_path / "qwen2_back"), to="official")
    assert "tokenizer.model" not in capsys.readouterr().out  # a Qwen2 tokenizer is never one


def test_a_hub_id_converts_as_other_commands_load_one(tmp_path, fake_hub):
    """Loading a hub -hf port is refused with `convert --to official SRC DST` to run; convert took local
    folders only, so the hub id the user had just given was "no such checkpoint folder". It is downloaded
    (to the hub cache) as `from_pretrained` and every command download one."""
    src = official_folder(tmp_path / "src", "qwen2")
    asked = fake_hub(convert(src, tmp_path / "hf", to="hf"))
    back = convert("OpenGVLab/InternVL2_5-4B-MPO-hf", tmp_path / "back", to="official")
    assert asked == ["OpenGVLab/InternVL2_5-4B-MPO-hf"]
    assert tensors(back).keys() == tensors(src).keys()


def test_a_bad_destination_is_refused_before_a_hub_id_is_downloaded(tmp_path, monkeypatch):
    """A hub id was downloaded (gigabytes) before the destination was checked: a folder that is not empty,
    a file, a folder under a file, or a bad shard size failed only after the download. Nothing is asked of
    the hub for them."""
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: asked.append(repo_id))
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, repo_id, **kw: asked.append(repo_id))
    monkeypatch.chdir(tmp_path)  # no local folder named like the id
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    (tmp_path / "file").write_text("x")
    hub_id = "OpenGVLab/InternVL2_5-4B-MPO-hf"
    with pytest.raises(InputError, match="full exists and is not empty"):
        convert(hub_id, tmp_path / "full", to="official")
    with pytest.raises(InputError, match="file is a file; give a new folder"):
        convert(hub_id, tmp_path / "file", to="official")
    with pytest.raises(InputError, match=r"file/new: .*file is a file, not a folder; give a new folder"):
        convert(hub_id, tmp_path / "file" / "new", to="official")
    with pytest.raises(InputError, match="shard size"):
        convert(hub_id, tmp_path / "new", to="official", max_shard_size=0)
    assert asked == [] and not (tmp_path / "new").exists()


def test_remote_code_note_names_the_matching_repo(tmp_path):
    family_config("4B").to_json(tmp_path / "config.json")
    # `hf`, the CLI huggingface_hub installs: 1.0 removed `huggingface-cli`, which the note named
    assert "\n  hf download OpenGVLab/InternVL2_5-4B-MPO --include" in remote_code_note(tmp_path)
    assert "hf" in {e.name for e in importlib.metadata.distribution("huggingface_hub").entry_points}
    # The command is for copying into a shell: a folder with a space in its name (runs/my run/final)
    # was written bare, so the pasted command downloaded into `runs/my` and took `run/final` as a file.
    spaced = tmp_path / "my run" / "final"
    spaced.mkdir(parents=True)
    family_config("4B").to_json(spaced / "config.json")
    assert remote_code_note(spaced).endswith(f"--local-dir '{spaced}'")
    for name in ("configuration_internvl_chat.py", "modeling_internvl_chat.py"):
        (tmp_path / name).write_text("")
    assert remote_code_note(tmp_path) is None
    internlm2 = tmp_path / "8B"  # its llm_config's auto_map names InternLM2's files, which the note named not
    internlm2.mkdir()
    family_config("8B").to_json(internlm2 / "config.json")
    for name in ("configuration_internvl_chat.py", "modeling_internvl_chat.py"):
        (internlm2 / name).write_text("")
    assert remote_code_note(internlm2).startswith(f"note: {internlm2} has no configuration_internlm2.py, "
                                                  "modeling_internlm2.py.")


def test_an_internlm2_folder_written_by_to_official_or_a_python_config_names_internlm2s_remote_code(tmp_path):
    """The official InternLM2 llm_config names its remote code in its auto_map (the official modeling file imports
    it as well); `--to official` and a save of a config built in Python wrote none, so the note left it out."""
    config = internlm2_config()
    assert config.to_dict()["llm_config"]["auto_map"] == family_config("8B").to_dict()["llm_config"]["auto_map"]
    model = InternVL(config, image_token_id=config.llm.vocab_size - 1)
    saved = model.save_pretrained(tmp_path / "saved")
    convert(saved, tmp_path / "hf", "hf", image_token_id=config.llm.vocab_size - 1)
    back = convert(tmp_path / "hf", tmp_path / "back", "official")
    for folder in (saved, back):
        for name in ("configuration_internvl_chat.py", "modeling_internvl_chat.py"):
            (folder / name).write_text("")
        assert remote_code_note(folder).startswith(f"note: {folder} has no configuration_internlm2.py, "
                                                   "modeling_internlm2.py.")
    assert family_config("4B").to_dict()["llm_config"].get("auto_map") is None  # Qwen2 is transformers' own


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_qk_normalisation_with_an_eps_transformers_cannot_hold_is_refused_both_ways(tmp_path, eps):
    """transformers' InternVL builds the ViT's q_norm / k_norm with eps 1e-6 whatever layer_norm_eps says, where the
    official InternAttention (and ours) gives them layer_norm_eps: the converted model gave other logits."""
    folder, _ = tiny_chat_folder(tmp_path / "src", qk_normalization=True, norm_type="rms_norm", qkv_bias=False)
    convert(folder, tmp_path / "hf", "hf")  # the released eps, 1e-6: both sides agree
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["layer_norm_eps"] = eps
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config.json: vision_config.layer_norm_eps .* qk-normalisation"):
        convert(folder, tmp_path / "hf2", "hf")
    assert not (tmp_path / "hf2").exists()
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf["vision_config"]["layer_norm_eps"] = eps
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="vision_config.layer_norm_eps .* qk-normalisation"):
        convert(tmp_path / "hf", tmp_path / "back", "official")
    assert not (tmp_path / "back").exists()


def a_photo() -> Image.Image:
    """150x70 random pixels: a 2x1 grid of tiles plus the thumbnail."""
    return Image.fromarray(np.random.RandomState(0).randint(0, 256, (70, 150, 3), dtype=np.uint8))


def test_to_hf_writes_what_transformers_processor_reads(tmp_path):
    """transformers' image processor tiles as we do, its tokenizer names the image tokens, the chat
    template gives the official prompt, and processor_config the image tokens per tile."""
    from transformers import AutoImageProcessor, AutoTokenizer

    src, _ = tiny_chat_folder(tmp_path / "src")
    dst = convert(src, tmp_path / "hf", to="hf")
    config = ModelConfig.from_json(src)
    ours = image_to_pixel_values(a_photo(), image_size=config.image_size)
    # The PIL backend resizes with Pillow, as the official recipe does (torchvision's differs by a level or so).
    theirs = AutoImageProcessor.from_pretrained(dst, backend="pil")(images=[a_photo()], return_tensors="pt")
    assert theirs["num_patches"].tolist() == [len(ours)] == [3]
    torch.testing.assert_close(theirs["pixel_values"], ours, rtol=0, atol=1e-6)
    tokenizer = AutoTokenizer.from_pretrained(dst)
    assert tokenizer.context_image_token_id == json.loads((dst / "config.json").read_text())["image_token_id"]
    assert (tokenizer.start_image_token, tokenizer.end_image_token) == ("<img>", "</img>")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == render_prompt("<image>\nDescribe it.").replace("<image>", "<IMG_CONTEXT>")
    assert json.loads((dst / "processor_config.json").read_text())["image_seq_length"] == config.num_image_token


def test_to_hf_processor_output_runs_the_model(tmp_path):
    """AutoProcessor loads the converted folder; its ids are our prompt ids, and both transformers' model
    and ours run on its output with the same logits."""
    pytest.importorskip("torchvision", reason="transformers' InternVLProcessor needs torchvision")
    from transformers import AutoProcessor

    src, _ = tiny_chat_folder(tmp_path / "src")
    dst = convert(src, tmp_path / "hf", to="hf")
    processor = AutoProcessor.from_pretrained(dst)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(text=prompt, images=[a_photo()], return_tensors="pt")
    ours = InternVL.from_pretrained(src, dtype=torch.float32)
    ids = build_prompt_ids(load_tokenizer(src), "Describe it.", num_patches_list=[3],
                           num_image_token=ours.config.num_image_token)
    assert batch["input_ids"][0].tolist() == ids
    assert batch["pixel_values"].shape == (3, 3, ours.config.image_size, ours.config.image_size)
    with torch.no_grad():
        theirs = load_hf(dst)(**batch).logits
        mine = ours(batch["input_ids"], pixel_values=batch["pixel_values"])
    assert (mine - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("size", FAMILY_SIZES)
def test_every_size_maps_onto_transformers_model(size):
    """For each released size (one layer, meta device): transformers' model built from our converted
    config has exactly the tensor names and shapes our table produces, and the config converts back."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = family_config(size, layers=1)
    hf_dict = hf_config_dict(config, image_token_id=92546)
    ours = {}
    for m in key_maps(config):
        for name, part in zip(m.hf, split_fused(torch.empty(m.shape, device="meta"), m.fused, config.llm)):
            ours[name] = tuple(part.shape)
    with torch.device("meta"):
        ref = InternVLForConditionalGeneration(InternVLConfig.from_dict(hf_dict))
    theirs = {hf_disk_name(k): tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs
    back = config_from_hf(hf_dict)
    assert back.vision == config.vision and back.llm == config.llm
    assert back.llm.extra.get("bias") == config.llm.extra.get("bias")


@pytest.mark.parametrize("key", ["torch_dtype", "dtype"])
def test_the_weights_dtype_travels_to_transformers(tmp_path, key):
    """transformers >= 4.56 (and so the official code saving under it) writes `dtype`, older ones
    `torch_dtype`; either way the converted config records it, or transformers would load bf16 weights
    as float32 by default."""
    from transformers import AutoConfig

    src = official_folder(tmp_path / "src", "qwen2")
    config = json.loads((src / "config.json").read_text())
    config.pop("torch_dtype", None)
    (src / "config.json").write_text(json.dumps({**config, key: "bfloat16"}))
    dst = convert(src, tmp_path / "hf", to="hf")
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert AutoConfig.from_pretrained(dst).dtype == torch.bfloat16


def test_the_newer_dtype_key_wins_on_the_way_back_as_in_transformers(tmp_path):
    """A transformers config holding both keys (a stale `torch_dtype` beside the `dtype` newer transformers read
    first): `--to official` took `torch_dtype`, so dtype="auto" loaded in float32 what transformers loads in bf16."""
    from transformers import AutoConfig

    hf_dict = hf_config_dict(tiny_config(), image_token_id=IMAGE_TOKEN_ID)
    hf_dict.update(dtype="bfloat16", torch_dtype="float32")
    assert config_from_hf(hf_dict).torch_dtype == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(hf_dict))
    assert AutoConfig.from_pretrained(tmp_path).dtype == torch.bfloat16


def test_a_transformers_config_without_a_size_is_refused_by_name():
    hf_dict = hf_config_dict(tiny_config(), image_token_id=IMAGE_TOKEN_ID)
    del hf_dict["text_config"]["hidden_size"]
    with pytest.raises(ConfigError, match=r"^llm_config.hidden_size is null, not an integer \(the official "
                                          r"config.json's name of the key\)$"):
        config_from_hf(hf_dict)
    hf_dict = hf_config_dict(tiny_config(), image_token_id=IMAGE_TOKEN_ID)
    hf_dict["vision_config"]["num_attention_heads"] = "4"
    with pytest.raises(ConfigError, match='vision_config.num_attention_heads is "4", not an integer'):
        config_from_hf(hf_dict)


def test_a_transformers_sliding_window_is_refused_by_name(tmp_path):
    """transformers' Qwen2 runs sliding-window attention where text_config has use_sliding_window true and a
    sliding_window; `--to official` dropped both, writing a model with other logits."""
    from transformers import Qwen2Config

    src = convert(official_folder(tmp_path / "src", "qwen2"), tmp_path / "hf", to="hf")
    config = json.loads((src / "config.json").read_text())
    config["text_config"].update(use_sliding_window=True, sliding_window=8, max_window_layers=0)
    (src / "config.json").write_text(json.dumps(config))
    assert "sliding_attention" in Qwen2Config(**config["text_config"]).layer_types
    with pytest.raises(ConfigError, match=r"hf: text_config.use_sliding_window=true \(sliding-window attention\) "
                                          r"is not implemented$"):
        convert(src, tmp_path / "back", to="official")
    assert not (tmp_path / "back").exists()
    config["text_config"]["sliding_window"] = None  # transformers then attends to every position
    (src / "config.json").write_text(json.dumps(config))
    assert "sliding_attention" not in Qwen2Config(**config["text_config"]).layer_types
    convert(src, tmp_path / "back", to="official")


def test_round_trip_through_hf_keeps_a_chat_folder_usable(tmp_path):
    from internvl_mpo.pipeline import InternVLChat

    src, _ = tiny_chat_folder(tmp_path / "src")  # its vocabulary holds exactly the tokenizer's tokens
    convert(src, tmp_path / "hf", "hf")
    convert(tmp_path / "hf", tmp_path / "back", "official")
    assert len(load_tokenizer(tmp_path / "back")) == len(load_tokenizer(src))
    chat = InternVLChat.from_pretrained(tmp_path / "back", dtype=torch.float32)
    original = InternVLChat.from_pretrained(src, dtype=torch.float32)
    kw = dict(max_new_tokens=5, do_sample=False)
    assert chat.chat("Hello", **kw) == original.chat("Hello", **kw)


@pytest.mark.parametrize("source", [None, {"_from_model_config": True, "eos_token_id": 2, "pad_token_id": 2}])
def test_transformers_generate_stops_where_the_official_chat_stops(tmp_path, source):
    """transformers' generate stops at the eos ids of generation_config.json (else text_config's eos_token_id:
    `</s>` for InternLM2, none for the demo model, another model's id here), and `--to hf` wrote none, so a
    converted model answered on past `<|im_end|>` to max_new_tokens; the official chat() stops there. Its id
    is added to the source's ids; the round trip gives back the official folder's file as it was (or none)."""
    from transformers import InternVLForConditionalGeneration

    src, _ = tiny_chat_folder(tmp_path / "src")
    if source is not None:
        (src / "generation_config.json").write_text(json.dumps(source))
    im_end = load_tokenizer(src).im_end_id
    hf = convert(src, tmp_path / "hf", "hf")
    expected = [ModelConfig.from_json(src).llm.eos_token_id if source is None else 2, im_end]
    assert InternVLForConditionalGeneration.from_pretrained(hf).generation_config.eos_token_id == expected
    back = convert(hf, tmp_path / "back", "official")
    assert _bytes_or_none(back / "generation_config.json") == _bytes_or_none(src / "generation_config.json")
    kept = json.loads((hf / "internvl_official_files.json").read_text())  # as conversions before 2026-12-04 wrote it
    del kept["files"]["generation_config.json"]
    (hf / "internvl_official_files.json").write_text(json.dumps(kept))
    assert convert(hf, tmp_path / "older", "official").is_dir()


@pytest.mark.parametrize("official", [True, False])
def test_round_trip_through_hf_gives_back_the_official_preprocessor_config(tmp_path, official, monkeypatch):
    """`--to hf` writes transformers' GotOcr2 preprocessor_config.json over the official folder's (the official
    releases ship a CLIP-style one), which `--to official` dropped: the round trip lost the file. It is kept with
    the other files `--to hf` replaces, and comes back byte for byte (or stays absent); a destination given as
    `~/...` from Python is the home folder's (it was a folder named `~` in the working directory)."""
    src, _ = tiny_chat_folder(tmp_path / "src")
    text = json.dumps({"crop_size": 448, "do_center_crop": True, "image_mean": [0.485, 0.456, 0.406],
                       "image_processor_type": "CLIPImageProcessor", "size": 448}, indent=2) + "\n"
    if official:
        (src / "preprocessor_config.json").write_text(text)
    else:
        (src / "preprocessor_config.json").unlink(missing_ok=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    hf = convert(src, "~/hf", "hf")
    assert hf == tmp_path / "home" / "hf" and not (tmp_path / "~").exists()
    assert json.loads((hf / "preprocessor_config.json").read_text())["image_processor_type"] == \
        "GotOcr2ImageProcessorFast"
    back = convert(hf, tmp_path / "back", "official")
    assert _bytes_or_none(back / "preprocessor_config.json") == (text.encode() if official else None)
    kept = json.loads((hf / "internvl_official_files.json").read_text())  # as conversions before 2026-12-06 wrote it
    del kept["files"]["preprocessor_config.json"]
    (hf / "internvl_official_files.json").write_text(json.dumps(kept))
    assert convert(hf, tmp_path / "older", "official").is_dir()


@pytest.mark.parametrize("text,problem", [("[2]", "not a JSON object of generation settings"), ("{", "not valid JSON"),
                                          ('{"eos_token_id": NaN}', "eos_token_id must be token ids"),  # was written
                                          ('{"eos_token_id": [2, "650"]}', "eos_token_id must be token ids")])
def test_a_broken_generation_config_is_refused_before_the_weights(tmp_path, monkeypatch, text, problem):
    src, _ = tiny_chat_folder(tmp_path / "src")
    (src / "generation_config.json").write_text(text)
    monkeypatch.setattr(InternVL, "expected_keys", None)  # the conversion table: reached only after the checks
    with pytest.raises(ConfigError, match=re.escape(f"{src / 'generation_config.json'}: {problem}")):
        convert(src, tmp_path / "hf", "hf")


def test_config_eos_ids_the_loader_takes_convert_without_a_generation_config(tmp_path):
    """config.json's eos_token_id is checked as it is read (any integer; -1 in some configs): the check of
    generation_config.json's ids took it as that file's, and refused the folder naming a file it does not have."""
    src, _ = tiny_chat_folder(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["llm_config"]["eos_token_id"] = -1
    (src / "config.json").write_text(json.dumps(config))
    assert not (src / "generation_config.json").exists()
    out = convert(src, tmp_path / "hf", "hf")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"][0] == -1


def _bytes_or_none(path):
    return path.read_bytes() if path.exists() else None


def test_a_folder_transformers_saved_again_converts_back_to_a_usable_chat_folder(tmp_path):
    """transformers gives the processor's <video> (not in the vocabulary) an added-token id past the model's
    vocabulary and saves it in tokenizer.json and tokenizer_config.json, as the hub -hf ports hold it;
    `--to official` kept it, so the tokenizer outgrew the model and chat refused the folder. It goes, the
    tokenizer files of transformers' save come back without it, and the model answers as before."""
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    from internvl_mpo.pipeline import InternVLChat

    src, _ = tiny_chat_folder(tmp_path / "src")
    convert(src, tmp_path / "hf", "hf")
    resaved = tmp_path / "resaved"
    InternVLForConditionalGeneration.from_pretrained(tmp_path / "hf").save_pretrained(resaved)
    AutoTokenizer.from_pretrained(tmp_path / "hf").save_pretrained(resaved)
    assert "<video>" in (resaved / "tokenizer.json").read_text()  # what makes the tokenizer outgrow the model
    back = convert(resaved, tmp_path / "back", "official")
    assert len(load_tokenizer(back)) == len(load_tokenizer(src))
    assert len(AutoTokenizer.from_pretrained(back)) == len(load_tokenizer(src))
    kw = dict(max_new_tokens=5, do_sample=False)
    original = InternVLChat.from_pretrained(src, dtype=torch.float32)
    assert InternVLChat.from_pretrained(back, dtype=torch.float32).chat("Hello", **kw) == original.chat("Hello", **kw)


def test_a_conversion_into_a_folder_being_written_is_refused(tmp_path):
    """Two conversions into one new folder both found it empty and wrote their shards into it together:
    the one that finds the folder's save lock held is refused, naming the lock, and writes nothing. A lock
    file a killed conversion left blocks nothing."""
    from internvl_mpo.checkpoint import SAVE_LOCK, save_lock

    src = official_folder(tmp_path / "src", "qwen2")
    dst = tmp_path / "hf"
    dst.mkdir()
    with save_lock(dst):  # another conversion has just begun
        refused = rf"hf: saving failed \(another save into it is running: pid .*{SAVE_LOCK}\); nothing was written"
        with pytest.raises(CheckpointError, match=refused):
            convert(src, dst, to="hf")
        assert [p.name for p in dst.iterdir()] == [SAVE_LOCK]
    assert list(dst.iterdir()) == []
    (dst / SAVE_LOCK).write_text("pid 1 on a host whose process was killed")
    convert(src, dst, to="hf")
    assert not (dst / SAVE_LOCK).exists() and (dst / "processor_config.json").exists()



# A template of the official kind: it begins as the InternVL2.5 hub folders' tokenizer_config.json
# chat_template does (OpenGVLab/InternVL2_5-1B commit 9d423ea: the default system message unless the
# first message is a system one); the rest, not seen in full there, writes images as `<image>\n` as the
# hub's earlier template did, not transformers' `<IMG_CONTEXT>` that `--to hf` writes.
OFFICIAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\n你是书生·万象，英文名是InternVL，是由上海人工智能实验室、"
    "清华大学及多家合作单位联合开发的多模态大语言模型。<|im_end|>\\n' }}{%- endif %}{% for message in messages %}"
    "{%- if messages[0]['role'] != 'system' or not loop.first %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>\\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{%- endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)
TEMPLATE_FILES = ["tokenizer_config.json", "chat_template.jinja", "chat_template.json"]


def official_folder_with_template(folder, files: dict):
    """`official_folder` whose tokenizer_config.json is written as the hub's (indent 2, non-ASCII escaped),
    with `files["chat_template"]` in it and `files`' template files beside it."""
    src = official_folder(folder, "qwen2")
    tokenizer_config = json.loads((src / "tokenizer_config.json").read_text())
    if "chat_template" in files:
        tokenizer_config["chat_template"] = files["chat_template"]
    (src / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    for name in ("chat_template.jinja", "chat_template.json"):
        if name in files:
            (src / name).write_bytes(files[name].encode())
    return src


@pytest.mark.parametrize("files", [
    {"chat_template": OFFICIAL_TEMPLATE},
    {"chat_template": OFFICIAL_TEMPLATE, "chat_template.jinja": "{{ messages }}\r\n",
     "chat_template.json": '{"chat_template": "{{ messages }}"}'},
    {},  # no template at all (our demo model): none comes back
])
def test_round_trip_through_hf_gives_back_the_official_chat_template(tmp_path, files):
    """official -> hf -> official gives back the official folder's template files and tokenizer_config.json
    byte for byte, not the transformers template (`<IMG_CONTEXT>` image items) that the hf folder uses."""
    src = official_folder_with_template(tmp_path / "src", files)
    hf = convert(src, tmp_path / "hf", to="hf")
    assert "<IMG_CONTEXT>" in (hf / "chat_template.jinja").read_text()
    assert "<IMG_CONTEXT>" in json.loads((hf / "tokenizer_config.json").read_text())["chat_template"]
    assert not (hf / "chat_template.json").exists()
    back = convert(hf, tmp_path / "back", to="official")
    assert {n: (src / n).read_bytes() for n in TEMPLATE_FILES if (src / n).exists()} == {
        n: (back / n).read_bytes() for n in TEMPLATE_FILES if (back / n).exists()}


def test_a_folder_transformers_saved_again_converts_back_with_an_official_layout_template(tmp_path):
    """transformers saves a folder again without internvl_official_files.json, so `--to official` kept the
    template `--to hf` writes: image items as `<IMG_CONTEXT>\\n`, which only transformers' processor expands;
    the official layout's loaders expand `<image>` (the official chat(), vLLM). That template comes back in
    the official form, which renders the official prompt; a template of another origin stays as it is."""
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    src = official_folder_with_template(tmp_path / "src", {"chat_template": OFFICIAL_TEMPLATE})
    hf = convert(src, tmp_path / "hf", to="hf")
    resaved = tmp_path / "resaved"
    InternVLForConditionalGeneration.from_pretrained(hf).save_pretrained(resaved)
    AutoTokenizer.from_pretrained(hf).save_pretrained(resaved)
    assert (resaved / "chat_template.jinja").read_text() == (hf / "chat_template.jinja").read_text()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]

    def prompt(folder) -> str:
        return AutoTokenizer.from_pretrained(folder).apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False)

    assert prompt(convert(resaved, tmp_path / "back", to="official")) == render_prompt("<image>\nDescribe it.")
    # transformers 4 kept the template in tokenizer_config.json
    tokenizer_config = json.loads((resaved / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = (resaved / "chat_template.jinja").read_text()
    (resaved / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (resaved / "chat_template.jinja").unlink()
    assert prompt(convert(resaved, tmp_path / "back4", to="official")) == render_prompt("<image>\nDescribe it.")
    (resaved / "chat_template.jinja").write_text("{{ messages }}")  # the user's own
    again = convert(resaved, tmp_path / "again", to="official")
    assert (again / "chat_template.jinja").read_text() == "{{ messages }}"


def test_save_pretrained_with_a_transformers_tokenizer_folder_writes_what_convert_to_official_writes(tmp_path):
    """save_pretrained with `tokenizer_dir` a `convert --to hf` folder copied its transformers template (image
    items `<IMG_CONTEXT>`, which only transformers' processor expands) into the official-layout folder. Its
    template files are now those `convert --to official` of that folder writes: the official ones back, or
    (transformers saved the folder again, without their record) the template's official form, image items
    `<image>`; the folder loads and chats."""
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    from internvl_mpo.pipeline import InternVLChat

    src, _ = tiny_chat_folder(tmp_path / "src")
    hf = convert(src, tmp_path / "hf", "hf")
    resaved = tmp_path / "resaved"
    InternVLForConditionalGeneration.from_pretrained(hf).save_pretrained(resaved)
    AutoTokenizer.from_pretrained(hf).save_pretrained(resaved)
    assert "<IMG_CONTEXT>" in (resaved / "chat_template.jinja").read_text()
    kw = dict(max_new_tokens=5, do_sample=False)
    answer = InternVLChat.from_pretrained(src, dtype=torch.float32).chat("Hello", **kw)
    for tokenizer_dir in (hf, resaved):
        model = InternVL.from_pretrained(src, dtype=torch.float32)
        model.tokenizer_dir = tokenizer_dir
        saved = model.save_pretrained(tmp_path / f"saved-{tokenizer_dir.name}")
        back = convert(tokenizer_dir, tmp_path / f"back-{tokenizer_dir.name}", "official")
        texts = {n: (saved / n).read_text() for n in TEMPLATE_FILES if (saved / n).exists()}
        assert texts == {n: (back / n).read_text() for n in TEMPLATE_FILES if (back / n).exists()}
        templates = [texts.get("chat_template.jinja", ""),
                     json.loads(texts["tokenizer_config.json"]).get("chat_template", "")]
        assert not any("<IMG_CONTEXT>" in template for template in templates)
        assert InternVLChat.from_pretrained(saved, dtype=torch.float32).chat("Hello", **kw) == answer
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    prompt = AutoTokenizer.from_pretrained(saved).apply_chat_template(messages, add_generation_prompt=True,
                                                                      tokenize=False)
    assert prompt == render_prompt("<image>\nDescribe it.")


def test_a_tokenizer_config_changed_after_to_hf_comes_back_with_the_official_template(tmp_path):
    """A transformers folder whose tokenizer_config.json changed after `--to hf` (transformers saved it
    again) keeps that change going back, with the official chat template in place of transformers'; a
    kept-files record that is not what `--to hf` writes is refused by name."""
    src = official_folder_with_template(tmp_path / "src", {"chat_template": OFFICIAL_TEMPLATE})
    hf = convert(src, tmp_path / "hf", to="hf")
    tokenizer_config = json.loads((hf / "tokenizer_config.json").read_text())
    (hf / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 77}))
    back = convert(hf, tmp_path / "back", to="official")
    got = json.loads((back / "tokenizer_config.json").read_text())
    assert got["chat_template"] == OFFICIAL_TEMPLATE and got["model_max_length"] == 77
    assert "extra_special_tokens" not in got and not (back / "chat_template.jinja").exists()
    (hf / "internvl_official_files.json").write_text('{"files": {}}')
    with pytest.raises(ConfigError, match=r"internvl_official_files.json: not the file convert --to hf writes"):
        convert(hf, tmp_path / "back2", to="official")


def test_convert_command_names_a_bad_to_by_its_flag(tmp_path, capsys):
    """`convert --to xx` said "to='xx'", the Python parameter, not the flag the user typed."""
    from internvl_mpo.cli import main

    src = official_folder(tmp_path / "src", "qwen2")
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "xx"]) == 1
    assert capsys.readouterr().err == ("internvl-mpo convert: error: --to='xx': choose 'hf' (official -> transformers) "
                                       "or 'official' (transformers -> official)\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_keys_a_transformers_config_leaves_out_are_read_as_transformers_defaults_them(kind):
    """A transformers config.json written by hand or by an older version may leave keys out: each is read as
    transformers' own config classes (InternVLConfig and its vision and text configs) default it."""
    from transformers import InternVLConfig

    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    d = {"model_type": "internvl", "vision_config": {**sizes, "hidden_size": 32},
         "text_config": {**sizes, "model_type": kind, "vocab_size": 300}}
    ours, ref = config_from_hf(d), InternVLConfig(**d)
    v, t = ref.vision_config, ref.text_config
    assert (ours.vision.qkv_bias, ours.vision.qk_normalization, ours.vision.norm_type, ours.vision.layer_norm_eps,
            ours.vision.image_size, ours.vision.patch_size, ours.vision.num_channels, ours.vision.initializer_factor,
            ours.vision.dropout, ours.vision.attention_dropout) == (
        v.attention_bias, v.use_qk_norm, v.norm_type, v.layer_norm_eps, v.image_size[0], v.patch_size[0],
        v.num_channels, v.layer_scale_init_value, v.projection_dropout, v.attention_dropout)
    assert (ours.llm.rms_norm_eps, ours.llm.rope_theta, ours.llm.rope_scaling, ours.llm.max_position_embeddings,
            ours.llm.attention_dropout, ours.llm.bos_token_id, ours.llm.eos_token_id) == (
        t.rms_norm_eps, t.rope_parameters["rope_theta"], None, t.max_position_embeddings, t.attention_dropout,
        t.bos_token_id, t.eos_token_id)
    assert (ours.downsample_ratio, ours.select_layer) == (ref.downsample_ratio, ref.vision_feature_layer)
    if kind == "llama":  # (Qwen2Config's default of 32 kv heads ignores the head count; ours: one per head)
        assert (ours.llm.num_key_value_heads, ours.llm.extra["bias"]) == (t.num_key_value_heads, t.attention_bias)


def test_the_vision_dropout_goes_where_transformers_drops_after_the_output_projection():
    """The official `vision_config.dropout` is InternAttention's proj_drop, after the output projection:
    transformers' `projection_dropout`. It was written as `hidden_dropout_prob` (which transformers applies to
    the patch embeddings and each MLP output) with `projection_dropout` set to the attention dropout, and
    read back from `hidden_dropout_prob`: training the converted model dropped other activations."""
    config = tiny_config(dropout=0.1, attention_dropout=0.05)
    vision = hf_config_dict(config, IMAGE_TOKEN_ID)["vision_config"]
    assert (vision["projection_dropout"], vision["attention_dropout"], vision["hidden_dropout_prob"]) == (
        0.1, 0.05, 0.0)
    back = config_from_hf(hf_config_dict(config, IMAGE_TOKEN_ID))
    assert (back.vision.dropout, back.vision.attention_dropout) == (0.1, 0.05)


def test_a_conversion_fills_a_shard_up_to_max_shard_size_inclusive(tmp_path):
    """As save_pretrained and huggingface_hub's split: weights of exactly max_shard_size bytes make one file."""
    src = official_folder(tmp_path / "src", "qwen2")
    total = sum(t.numel() * t.element_size() for t in tensors(src).values())
    convert(src, tmp_path / "hf", to="hf", max_shard_size=total)
    assert [p.name for p in (tmp_path / "hf").glob("*.safetensors")] == ["model.safetensors"]
    convert(src, tmp_path / "hf2", to="hf", max_shard_size=total - 1)
    assert not (tmp_path / "hf2" / "model.safetensors").exists()


def rendered(template_file: Path, system: str | None = None) -> str:
    """A template file rendered as transformers renders it, for one user turn (an image and a question), with
    InternLM2's BOS."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = environment.from_string(template_file.read_text())
    return template.render(messages=messages, add_generation_prompt=True, bos_token="<s>")


@pytest.mark.parametrize("add_bos", [True, False])
def test_an_internlm2_chat_template_starts_with_the_bos_its_tokenizer_adds(tmp_path, add_bos):
    """The official chat() tokenizes an InternLM2 size's prompt with the tokenizer's BOS first. transformers'
    tokenizer.apply_chat_template and vLLM's chat endpoint add no special tokens to a rendered template, so the
    template `--to hf` wrote, and the official form it turned back into, gave those prompts without `<s>`."""
    src = official_folder(tmp_path / "src", "internlm2")
    (src / "tokenizer.model").write_bytes(b"")  # the SentencePiece file: whether the tokenizer adds a BOS
    tokenizer_config = json.loads((src / "tokenizer_config.json").read_text())
    tokenizer_config.update(bos_token="<s>", **({} if add_bos else {"add_bos_token": False}))
    (src / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    hf = convert(src, tmp_path / "hf", to="hf")
    official = ("<s>" if add_bos else "") + render_prompt("<image>\nDescribe it.")
    assert rendered(hf / "chat_template.jinja") == official.replace("<image>", "<IMG_CONTEXT>")
    (hf / "internvl_official_files.json").unlink()  # as after transformers saved the folder again elsewhere
    back = convert(hf, tmp_path / "back", to="official")
    assert rendered(back / "chat_template.jinja") == official
    assert json.loads((back / "tokenizer_config.json").read_text())["chat_template"] == (
        back / "chat_template.jinja").read_text()


def test_the_system_message_and_no_thumbnail_without_tiling_come_back_from_transformers(tmp_path):
    """config.json's system_message (the official chat()'s default, ours too) was dropped by `--to hf`: the hf
    template said the template's own, and the official config.json that came back had none. use_thumbnail
    false without tiling (taken by --to hf) came back true, and `max_num` runs then added a thumbnail. Both
    travel in transformers' config.json, which transformers saves again with them."""
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    src, _ = tiny_chat_folder(tmp_path / "src")
    settings = json.loads((src / "config.json").read_text())
    settings.update(system_message="You are terse.", dynamic_image_size=False, use_thumbnail=False)
    (src / "config.json").write_text(json.dumps(settings))
    hf = convert(src, tmp_path / "hf", to="hf")
    official = render_prompt("<image>\nDescribe it.", system_message="You are terse.")
    assert rendered(hf / "chat_template.jinja") == official.replace("<image>", "<IMG_CONTEXT>")
    assert rendered(hf / "chat_template.jinja", system="Be brief.") == render_prompt(
        "<IMG_CONTEXT>\nDescribe it.", system_message="Be brief.")
    resaved = tmp_path / "resaved"
    InternVLForConditionalGeneration.from_pretrained(hf).save_pretrained(resaved)
    AutoTokenizer.from_pretrained(hf).save_pretrained(resaved)
    shutil.copy(hf / "preprocessor_config.json", resaved)  # the tiling (crop_to_patches false)
    for folder in (hf, resaved):
        back = convert(folder, tmp_path / f"back-{folder.name}", to="official")
        config = ModelConfig.from_json(back)
        assert config == ModelConfig.from_json(src) and config.extra["system_message"] == "You are terse."
        assert not config.use_thumbnail
    # the source had no template file: from `hf` none comes back (its record of the official files); from
    # `resaved` (no record) the template in its official form, with the system message
    assert not (tmp_path / "back-hf" / "chat_template.jinja").exists()
    assert rendered(tmp_path / "back-resaved" / "chat_template.jinja") == official


def test_a_transformers_folder_without_tokenizer_files_is_told_where_to_get_them(tmp_path, capsys):
    """`model.save_pretrained` in transformers writes config.json and the weights only; `--to official` of such a
    folder wrote, without a word, an official folder that chat refuses ("has no tokenizer.json and no vocab.json
    or merges.txt"). The command now says so, with the download that adds the official tokenizer files."""
    from conftest import tiny_chat_folder

    convert(tiny_chat_folder(tmp_path / "src")[0], tmp_path / "hf", to="hf")
    assert convert_command(str(tmp_path / "hf"), str(tmp_path / "back"), to="official") == 0
    assert "has no tokenizer files" not in capsys.readouterr().out  # a folder with its tokenizer
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tmp_path / "hf" / name, weights_only / name)
    assert convert_command(str(weights_only), str(tmp_path / "back2"), to="official") == 0
    out = capsys.readouterr().out
    assert (f"note: {tmp_path / 'back2'} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt: the "
            "transformers folder held none), which chat, the official code and vLLM read. Add those of the model it "
            'comes from:\n  hf download OpenGVLab/InternVL2_5-SIZE-MPO --include "tokenizer*" "vocab.json" '
            f'"merges.txt" "added_tokens.json" "special_tokens_map.json" --local-dir {tmp_path / "back2"}') in out


def test_select_layer_0_converts_to_a_transformers_config_that_runs_and_comes_back(tmp_path):
    src = official_folder(tmp_path / "src", "qwen2")
    settings = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**settings, "select_layer": 0}))  # the ViT's embeddings
    dst = convert(src, tmp_path / "hf", to="hf")
    ours = InternVL.from_pretrained(src, dtype=torch.float32)
    ids, pixels = inputs(ours.config)
    with torch.no_grad():
        diff = (ours(ids, pixel_values=pixels) - load_hf(dst)(input_ids=ids, pixel_values=pixels).logits).abs().max()
    assert diff <= 1e-4
    back = convert(dst, tmp_path / "back", to="official")
    assert ModelConfig.from_json(back).select_layer == 0

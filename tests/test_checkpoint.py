"""Checkpoint folders in the official layout: round trips, key accounting, refusals, peak memory."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from internvl_mpo.checkpoint import SAVE_ID, parse_size
from internvl_mpo.config import LLMConfig, ModelConfig, VisionConfig
from internvl_mpo.devices import parse_dtype
from internvl_mpo.errors import CheckpointError, ConfigError, InputError
from internvl_mpo.model import InternVL
from internvl_mpo.pipeline import InternVLChat

from conftest import (
    IMAGE_TOKEN_ID, hf_reference, hf_to_official, modes_other_than, tiny_chat_folder, write_checkpoint,
)


def official_4b_shapes(layers: int = 1) -> ModelConfig:
    """The InternVL2.5-4B widths and vocabulary, with `layers` ViT and LLM layers."""
    return ModelConfig(
        vision=dataclasses.replace(VisionConfig(), num_hidden_layers=layers),
        llm=dataclasses.replace(LLMConfig(), num_hidden_layers=layers),
    )


def expected_4b_keys(layers: int) -> dict[str, tuple]:
    """Key names and shapes of the official 4B checkpoint, written from the reference doc (section 2)."""
    keys = {
        "vision_model.embeddings.class_embedding": (1, 1, 1024),
        "vision_model.embeddings.patch_embedding.weight": (1024, 3, 14, 14),
        "vision_model.embeddings.patch_embedding.bias": (1024,),
        "vision_model.embeddings.position_embedding": (1, 1025, 1024),
        "mlp1.0.weight": (4096,), "mlp1.0.bias": (4096,),
        "mlp1.1.weight": (2048, 4096), "mlp1.1.bias": (2048,),
        "mlp1.3.weight": (2048, 2048), "mlp1.3.bias": (2048,),
        "language_model.model.embed_tokens.weight": (151674, 2048),
        "language_model.model.norm.weight": (2048,),
        "language_model.lm_head.weight": (151674, 2048),
    }
    for i in range(layers):
        v = f"vision_model.encoder.layers.{i}."
        keys.update({
            v + "ls1": (1024,), v + "ls2": (1024,),
            v + "attn.qkv.weight": (3072, 1024), v + "attn.qkv.bias": (3072,),
            v + "attn.proj.weight": (1024, 1024), v + "attn.proj.bias": (1024,),
            v + "mlp.fc1.weight": (4096, 1024), v + "mlp.fc1.bias": (4096,),
            v + "mlp.fc2.weight": (1024, 4096), v + "mlp.fc2.bias": (1024,),
            v + "norm1.weight": (1024,), v + "norm1.bias": (1024,),
            v + "norm2.weight": (1024,), v + "norm2.bias": (1024,),
        })
        q = f"language_model.model.layers.{i}."
        keys.update({
            q + "self_attn.q_proj.weight": (2048, 2048), q + "self_attn.q_proj.bias": (2048,),
            q + "self_attn.k_proj.weight": (256, 2048), q + "self_attn.k_proj.bias": (256,),
            q + "self_attn.v_proj.weight": (256, 2048), q + "self_attn.v_proj.bias": (256,),
            q + "self_attn.o_proj.weight": (2048, 2048),
            q + "mlp.gate_proj.weight": (11008, 2048), q + "mlp.up_proj.weight": (11008, 2048),
            q + "mlp.down_proj.weight": (2048, 11008),
            q + "input_layernorm.weight": (2048,), q + "post_attention_layernorm.weight": (2048,),
        })
    return keys


def test_4b_layout_round_trip(tmp_path):
    config = official_4b_shapes(layers=1)
    with torch.device("meta"):
        meta = InternVL(config)
    assert {k: tuple(v) for k, v in meta.expected_keys().items()} == expected_4b_keys(1)

    model = InternVL(config, image_token_id=151667).to(torch.bfloat16)
    model.init_weights()
    folder = model.save_pretrained(tmp_path / "out", max_shard_size="300MB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in model.state_dict().values())
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == "internvl_chat" and saved["llm_config"]["vocab_size"] == 151674
    assert saved["vision_config"]["model_type"] == "intern_vit_6b" and saved["ps_version"] == "v2"
    assert saved["torch_dtype"] == "bfloat16" and "auto_map" in saved

    loaded = InternVL.from_pretrained(folder, dtype="bf16", image_token_id=151667)
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    ids = torch.tensor([[1, 2, 3] + [151667] * 256 + [4]])
    pixels = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        assert torch.equal(loaded(ids, pixel_values=pixels), model(ids, pixel_values=pixels))


def test_config_round_trip_keeps_unknown_keys(tmp_path, tiny):
    d = tiny.to_dict()
    d["_name_or_path"] = "somewhere"
    d["vision_config"]["use_moe"] = False
    d["llm_config"]["sliding_window"] = 32768
    d["system_message"] = "hi"
    config = ModelConfig.from_dict(d)
    assert config.to_dict() == d


def test_copies_tokenizer_and_remote_code_files(tmp_path, tiny):
    ref = hf_reference(tiny)
    src = write_checkpoint(tmp_path / "src", tiny, hf_to_official(ref.state_dict()))
    names = ("tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json",
             "modeling_internvl_chat.py", "chat_template.jinja")  # newer transformers save the template apart
    for name in names:
        (src / name).write_text("{}" if name.endswith(".json") else "x")
    model = InternVL.from_pretrained(src, image_token_id=IMAGE_TOKEN_ID)
    out = model.save_pretrained(tmp_path / "dst")
    for name in (*names, "model.safetensors"):
        assert (out / name).exists(), name


def official_code(folder: Path, internlm2: bool = False) -> list[str]:
    """Stand-ins for the official remote code of a hub InternVL2.5 folder, importing one another as the hub
    files do (relative imports); returns their names."""
    imports = {
        "modeling_internvl_chat.py": ["configuration_internvl_chat", "conversation", "modeling_intern_vit"],
        "configuration_internvl_chat.py": ["configuration_intern_vit"],
        "modeling_intern_vit.py": ["configuration_intern_vit"], "configuration_intern_vit.py": [],
        "conversation.py": [],
    }
    if internlm2:
        imports["modeling_internvl_chat.py"].append("modeling_internlm2")
        imports["configuration_internvl_chat.py"].append("configuration_internlm2")
        imports.update({"modeling_internlm2.py": ["configuration_internlm2"], "configuration_internlm2.py": [],
                        "tokenization_internlm2.py": [], "tokenization_internlm2_fast.py": ["tokenization_internlm2"]})
    for name, modules in imports.items():
        (folder / name).write_text("import torch\n" + "".join(f"from .{m} import X\n" for m in modules))
    return sorted(imports)


def test_saving_over_another_models_folder_leaves_none_of_its_tokenizer_or_code_files(tmp_path, tiny):
    """A folder that held an InternLM2 checkpoint (sentencepiece tokenizer.model, tokenizer code named by
    tokenizer_config.json's auto_map, InternLM2 modeling code) receives a Qwen2 model's save: the old
    tokenizer and code files must go (a loader would read the stale tokenizer.model or tokenization code
    beside the new tokenizer.json), the user's own files stay, and only the code the new checkpoint names
    is copied (not every .py of the source folder)."""
    old = tmp_path / "old"
    InternVL(tiny).save_pretrained(old)
    config = json.loads((old / "config.json").read_text())
    config["llm_config"]["auto_map"] = {"AutoModel": "modeling_internlm2.InternLM2ForCausalLM"}
    (old / "config.json").write_text(json.dumps(config))
    old_code = official_code(old, internlm2=True)
    (old / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [
        "tokenization_internlm2.InternLM2Tokenizer", "tokenization_internlm2_fast.InternLM2TokenizerFast"]}}))
    for name in ("tokenizer.model", "special_tokens_map.json", "generation_config.json", "README.md",
                 "example.jpg", "my_script.py"):
        (old / name).write_text("{}" if name.endswith(".json") else "old")

    ref = hf_reference(tiny)
    src = write_checkpoint(tmp_path / "src", tiny, hf_to_official(ref.state_dict()))
    new_code = official_code(src)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json"):
        (src / name).write_text("{}" if name.endswith(".json") else "new")
    (src / "setup.py").write_text("not part of the checkpoint")
    model = InternVL.from_pretrained(src, image_token_id=IMAGE_TOKEN_ID)
    model.save_pretrained(old)
    assert sorted(p.name for p in old.iterdir()) == sorted([
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
        "added_tokens.json", *new_code, "README.md", "example.jpg", "my_script.py"])
    assert set(old_code) - set(new_code) and (old / "merges.txt").read_text() == "new"
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(InternVL.from_pretrained(old)(ids), model(ids))
    source_config = json.loads((src / "config.json").read_text())  # an auto_map may not reach out of the folder
    source_config["auto_map"]["AutoProcessor"] = "../outside.Processor"
    (src / "config.json").write_text(json.dumps(source_config))
    (tmp_path / "outside.py").write_text("not the checkpoint's")
    copy = InternVL.from_pretrained(src, image_token_id=IMAGE_TOKEN_ID).save_pretrained(tmp_path / "a" / "copy")
    assert (copy / "conversation.py").exists() and not (tmp_path / "a" / "outside.py").exists()
    before = sorted(p.name for p in old.iterdir())
    bare = InternVL.from_pretrained(InternVL(tiny).save_pretrained(tmp_path / "bare"), image_token_id=IMAGE_TOKEN_ID)
    bare.save_pretrained(old)  # a source without tokenizer or code files has none to put in their place
    assert sorted(p.name for p in old.iterdir()) == before


def test_saving_into_the_folder_the_model_was_loaded_from(tmp_path, tiny):
    """The loaded weights are memory-mapped from the folder's safetensors: a save into that folder replaces
    the files by rename (never writing into them), so the model in memory keeps its weights, the folder
    loads back equal and keeps its tokenizer and code files, whichever the shard layout before and after."""
    model = InternVL(tiny, image_token_id=IMAGE_TOKEN_ID)
    model.init_weights()
    folder = model.save_pretrained(tmp_path / "m")
    code = official_code(folder)
    (folder / "tokenizer.json").write_text("{}")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = model(ids)
    loaded = InternVL.from_pretrained(folder)
    for shard_size in ("20KB", "5GB", "30KB"):
        loaded.save_pretrained(folder, max_shard_size=shard_size)
        with torch.no_grad():
            assert torch.equal(loaded(ids), expected)
            assert torch.equal(InternVL.from_pretrained(folder)(ids), expected)
    names = sorted(p.name for p in folder.iterdir())
    assert [n for n in names if not n.startswith(("model.", "model-"))] == sorted(["config.json", "tokenizer.json", *code])


def test_a_hub_download_fetches_every_file_a_save_copies():
    """A model loaded by hub id is saved with the files of its snapshot: a companion file the download
    leaves out (chat_template.jinja, where newer transformers keep the chat template) would be lost."""
    from fnmatch import fnmatch

    from internvl_mpo.checkpoint import HUB_PATTERNS
    from internvl_mpo.companions import COMPANION_FILES

    for name in (*COMPANION_FILES, "model.safetensors", "model.safetensors.index.json", "config.json",
                 "modeling_internvl_chat.py", "tokenization_internlm2.py"):
        assert any(fnmatch(name, pattern) for pattern in HUB_PATTERNS), name


def test_saved_files_get_the_mode_the_umask_gives(tmp_path, tiny, umask_022):
    """Shards, index, config and copied tokenizer files: 0644 under umask 022 (safetensors alone makes 0600
    files, and a copy would keep a 0600 source's mode), so another user (a vLLM server) can read them."""
    ref = hf_reference(tiny)
    src = write_checkpoint(tmp_path / "src", tiny, hf_to_official(ref.state_dict()))
    for name in ("tokenizer_config.json", "vocab.json", "modeling_internvl_chat.py"):
        (src / name).write_text("{}" if name.endswith(".json") else "x")
        (src / name).chmod(0o600)
    model = InternVL.from_pretrained(src, image_token_id=IMAGE_TOKEN_ID)
    out = model.save_pretrained(tmp_path / "dst", max_shard_size=20_000)
    assert (out / "model.safetensors.index.json").exists() and (out / "vocab.json").exists()
    assert modes_other_than(out, 0o644) == {}
    os.umask(0o027)  # the umask, not a fixed 0644
    single = model.save_pretrained(tmp_path / "single")
    assert (single / "model.safetensors").exists() and modes_other_than(single, 0o640) == {}


def test_file_modes_are_best_effort_and_the_umask_fallback_is_thread_safe(tmp_path, tiny, umask_022, monkeypatch):
    """A file system that refuses chmod keeps the file as written instead of failing the save; where
    /proc does not show the umask, reading it by setting and restoring it never leaves it changed."""
    import threading

    from internvl_mpo import checkpoint

    model = InternVL(tiny)

    def refuse(path, mode):
        raise PermissionError(1, "Operation not permitted", str(path))

    with monkeypatch.context() as m:
        m.setattr(checkpoint.os, "chmod", refuse)
        assert (model.save_pretrained(tmp_path / "nochmod") / "model.safetensors").exists()

    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(checkpoint, "open", no_proc, raising=False)
    threads = [threading.Thread(target=lambda: [checkpoint._umask() for _ in range(300)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert checkpoint._umask() == 0o022 and os.umask(0o022) == 0o022


def test_image_token_id_is_read_from_tokenizer_files(tmp_path, tiny):
    ref = hf_reference(tiny)
    src = write_checkpoint(tmp_path / "src", tiny, hf_to_official(ref.state_dict()))
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"298": {"content": "<img>"}, "299": {"content": "<IMG_CONTEXT>"}}}
    ))
    assert InternVL.from_pretrained(src).image_token_id == 299


def test_an_image_token_id_outside_the_vocabulary_is_refused(tmp_path, tiny, good_state):
    """Another model's tokenizer files (or a wrong image_token_id=) gave an id past the embeddings: the model loaded,
    and its first image prompt failed deep inside the embedding (on CUDA, a device-side assert)."""
    src = write_checkpoint(tmp_path / "src", tiny, good_state)
    (src / "added_tokens.json").write_text(json.dumps({"<IMG_CONTEXT>": 151667}))
    with pytest.raises(CheckpointError, match=r"src: the tokenizer files give <IMG_CONTEXT> the id 151667, outside the "
                       r"model's vocabulary \(llm_config.vocab_size 300\)"):
        InternVL.from_pretrained(src)
    (src / "added_tokens.json").write_text(json.dumps({"<IMG_CONTEXT>": 299}))
    with pytest.raises(InputError, match=r"src: image_token_id 300 \(<IMG_CONTEXT>\) is outside the model's vocabulary \(llm_config"):
        InternVL.from_pretrained(src, image_token_id=300)
    with pytest.raises(InputError, match=r"src: image_token_id -1 \(<IMG_CONTEXT>\) is outside the model's vocabulary"):
        InternVL.from_pretrained(src, image_token_id=-1)
    assert InternVL.from_pretrained(src).image_token_id == 299


@pytest.fixture
def good_state(tiny):
    return hf_to_official(hf_reference(tiny).state_dict())


def test_missing_extra_and_wrong_shape_keys_reported_together(tmp_path, tiny, good_state):
    state = dict(good_state)
    del state["mlp1.1.bias"]
    del state["language_model.model.norm.weight"]
    state["vision_model.extra.weight"] = torch.zeros(3)
    state["mlp1.3.weight"] = torch.zeros(5, 5)
    folder = write_checkpoint(tmp_path / "bad", tiny, state)
    with pytest.raises(CheckpointError) as info:
        InternVL.from_pretrained(folder)
    message = str(info.value)
    assert "2 missing: language_model.model.norm.weight, mlp1.1.bias" in message
    assert "1 unexpected: vision_model.extra.weight" in message
    assert "mlp1.3.weight: checkpoint [5, 5] vs model [64, 64]" in message


def test_config_that_does_not_match_weights(tmp_path, tiny, good_state):
    wider = tiny.replace(llm=dataclasses.replace(tiny.llm, intermediate_size=256))
    folder = write_checkpoint(tmp_path / "bad", wider, good_state)
    with pytest.raises(CheckpointError, match="do not match config.json.*6 with the wrong shape"):
        InternVL.from_pretrained(folder)


def test_a_config_asking_for_more_layers_than_the_weights_hold_is_refused_before_building(tmp_path, tiny, good_state):
    """The model was built (on the meta device) before its keys were compared with the weights: a config.json typo
    of 10**9 decoder layers grew memory for minutes, 10**5 vision layers took gigabytes. Refused from the
    weights' names first."""
    import resource

    for part, field in (("llm", "llm"), ("vision", "vision")):
        deep = tiny.replace(**{field: dataclasses.replace(getattr(tiny, field), num_hidden_layers=10**9)})
        folder = write_checkpoint(tmp_path / part, deep, good_state)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(CheckpointError, match=rf"config.json's {part}_config.num_hidden_layers is 1000000000, "
                                                  rf"but the weights hold 2 {part} layers"):
            InternVL.from_pretrained(folder)
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KB: nothing built
    # keys under another prefix (DDP's module.) hold no layers under these names: the key report says what differs
    prefixed = write_checkpoint(tmp_path / "prefixed", tiny, {f"module.{k}": v for k, v in good_state.items()})
    with pytest.raises(CheckpointError, match=r"the weights do not match config.json .*missing.*unexpected: module\."):
        InternVL.from_pretrained(prefixed)


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path, tiny):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny.to_dict()))
    # A file that would run code if it were ever unpickled.
    (folder / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR.")
    with pytest.raises(CheckpointError, match="pickle-based weights .*pytorch_model.bin.*never unpickle"):
        InternVL.from_pretrained(folder)
    assert not Path("pwned").exists()


def test_a_deepspeed_checkpoint_without_gathered_weights_is_named(tmp_path, tiny):
    """What the HF Trainer leaves under ZeRO-3 when the weights are not gathered on save."""
    folder = tmp_path / "checkpoint-500"
    (folder / "global_step500").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(tiny.to_dict()))
    (folder / "training_args.bin").write_bytes(b"not weights")
    (folder / "zero_to_fp32.py").write_text("# DeepSpeed's script")
    with pytest.raises(CheckpointError, match="a DeepSpeed checkpoint without gathered weights .*zero_to_fp32.py"):
        InternVL.from_pretrained(folder)


@pytest.mark.parametrize("keep", [100, -10, 0])  # cut in the header, in the data (a copy or save killed), empty
def test_corrupt_shard(tmp_path, tiny, good_state, keep):
    folder = write_checkpoint(tmp_path / "bad", tiny, good_state, shards=2)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: not a readable safetensors"):
        InternVL.from_pretrained(folder)


@pytest.mark.parametrize("single", [True, False])
def test_a_git_lfs_pointer_in_place_of_the_weights_is_named(tmp_path, tiny, good_state, single):
    """A repository cloned without git-lfs holds small text pointers where the shards should be."""
    folder = write_checkpoint(tmp_path / "clone", tiny, good_state, shards=1 if single else 2)
    for shard in folder.glob("*.safetensors"):
        shard.write_text("version https://git-lfs.github.com/spec/v1\n"
                         "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 4994563624\n")
    with pytest.raises(CheckpointError, match=r"\.safetensors: a Git LFS pointer, not the weights .*git lfs pull.*`hf download`"):
        InternVL.from_pretrained(folder)


def test_index_naming_a_missing_shard(tmp_path, tiny, good_state):
    folder = write_checkpoint(tmp_path / "bad", tiny, good_state, shards=2)
    (folder / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names model-00001-of-00002.safetensors, which is not in"):
        InternVL.from_pretrained(folder)


def test_index_naming_two_missing_shards_names_the_first(tmp_path, tiny, good_state):
    """The shards were checked in the order of a set of their names: which one the error named changed with the
    hash seed (PYTHONHASHSEED, random in each process)."""
    folder = write_checkpoint(tmp_path / "bad", tiny, good_state, shards=3)
    for n in (3, 1):
        (folder / f"model-0000{n}-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names model-00001-of-00003.safetensors, which is not in"):
        InternVL.from_pretrained(folder)


@pytest.mark.parametrize("duplicate", [False, True])
def test_a_shard_holding_a_tensor_its_index_does_not_list_there_is_refused(tmp_path, tiny, good_state, duplicate):
    """It was ignored: an extra tensor silently, a second copy of a tensor the index puts in another shard
    too, though transformers and vLLM read every tensor of every shard (which copy wins is theirs to pick)."""
    from safetensors.torch import load_file, save_file

    folder = write_checkpoint(tmp_path / "ck", tiny, good_state, shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    key = next(k for k, name in sorted(index.items()) if name == "model-00002-of-00002.safetensors")
    shard = folder / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    if duplicate:
        tensors[key] = good_state[key] + 1
    else:
        key = "language_model.model.layers.0.mlp.extra.weight"
        tensors[key] = torch.zeros(2)
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=rf"model-00001-of-00002.safetensors holds 1 tensor the index does not "
                                              rf"list there \({re.escape(key)}\)"):
        InternVL.from_pretrained(folder)


@pytest.mark.parametrize("name", ["../outside.safetensors", "sub/model.safetensors", "/tmp/model.safetensors", ".."])
def test_index_naming_a_shard_outside_the_folder_is_refused(tmp_path, tiny, good_state, name):
    """Shards are files of the checkpoint's own folder; an index may not reach elsewhere."""
    folder = write_checkpoint(tmp_path / "bad", tiny, good_state, shards=2)
    (tmp_path / "outside.safetensors").write_bytes((folder / "model-00001-of-00002.safetensors").read_bytes())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: name if v.startswith("model-00001") else v for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"the shard {re.escape(repr(name))}, not a file name in the folder"):
        InternVL.from_pretrained(folder)


def test_shards_without_their_index_are_named(tmp_path, tiny, good_state):
    """The error said only that the folder held no model.safetensors or index, as if it held no weights."""
    folder = write_checkpoint(tmp_path / "ck", tiny, good_state, shards=2)
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"holds model-00001-of-00002.safetensors, model-00002-of-00002.safetensors "
                                              r"but no model.safetensors.index.json"):
        InternVL.from_pretrained(folder)


@pytest.mark.parametrize("name", ["model.safetensors", "model.safetensors.index.json",
                                  "model-00002-of-00002.safetensors"])
@pytest.mark.parametrize("loop", [False, True])
def test_a_weight_file_that_is_a_broken_link_is_named_as_one(tmp_path, tiny, good_state, name, loop):
    """A hub cache's snapshot whose blob is gone (a cleaned cache, a download cut short) keeps a link that leads
    nowhere: a single file's was reported as shards without an index ("holds model.safetensors but no
    model.safetensors.index.json"), an index's as no weights at all, a shard's as missing from the folder."""
    folder = write_checkpoint(tmp_path / "ck", tiny, good_state, shards=1 if name == "model.safetensors" else 2)
    link = folder / name
    target = name if loop else "../blobs/0123abcd"
    link.unlink()
    link.symlink_to(target)
    why = "Too many levels of symbolic links" if loop else \
        "No such file or directory): a download cut short or a cache cleaned; fetch the file again"
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(link))} is a symbolic link to {re.escape(target)}, "
                                              rf"which leads to no file \({re.escape(why)}"):
        InternVL.from_pretrained(folder)


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "vocab.json", "added_tokens.json"])
def test_a_config_or_tokenizer_file_that_is_a_broken_link_is_named_as_one(tmp_path, name):
    """A tokenizer file linking nowhere read as absent: the tokenizer loaded from the other files without a word
    (tokenizer_config.json's token flags and eos/pad names dropped); config.json's read as "no such config file"."""
    folder, _ = tiny_chat_folder(tmp_path / "ck")
    link = folder / name
    link.unlink()
    link.symlink_to("../../blobs/0123abcd")
    with pytest.raises((CheckpointError, ConfigError), match=rf"^{re.escape(str(link))} is a symbolic link to "
                                                             r"\.\./\.\./blobs/0123abcd, which leads to no file"):
        InternVLChat.from_pretrained(folder)


@pytest.mark.parametrize("kind", [torch.int64, torch.bool])
def test_integer_weights_are_refused_by_name_before_loading(tmp_path, tiny, good_state, kind):
    state = dict(good_state)
    state["mlp1.1.weight"] = state["mlp1.1.weight"].to(kind)
    folder = write_checkpoint(tmp_path / "bad", tiny, state, shards=2)
    with pytest.raises(CheckpointError) as info:
        InternVL.from_pretrained(folder)
    message = str(info.value)
    assert "\n" not in message
    assert "mlp1.1.weight: checkpoint dtype" in message and "-of-00002.safetensors, not floating point" in message


@pytest.mark.parametrize("kind", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_weights_without_their_scales_are_refused_by_name(tmp_path, tiny, good_state, kind):
    """Weights stored as float8 (an FP8 checkpoint's, its quantization_config and scales gone from it) were cast
    to the model's dtype without a word, every value off; the first such weight is named, with its dtype and how
    many more there are, and the dtypes that are read."""
    state = dict(good_state)
    for key in ("mlp1.1.weight", "mlp1.3.weight"):
        state[key] = state[key].to(kind)
    folder = write_checkpoint(tmp_path / "fp8", tiny, state, shards=2)
    name = str(kind).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}/fp8/model-0000\d-of-00002.safetensors: mlp1.1.weight is "
                       rf"stored as {name} \(and 1 more float8 weight\), a quantized dtype, and config.json has no "
                       r"quantization_config giving its scales: .*only unquantized weights \(float32, bfloat16, "
                       r"float16\) are read"):
        InternVL.from_pretrained(folder, dtype=torch.float32)


def test_a_quantized_checkpoint_is_refused_by_its_config_in_one_line(tmp_path, tiny, good_state):
    """FP8, AWQ and GPTQ checkpoints (a quantization_config in config.json, at the top or in llm_config) are refused
    before a weight is read, naming the key and the method."""
    folder = write_checkpoint(tmp_path / "q", tiny, {k: v.to(torch.float8_e4m3fn) for k, v in good_state.items()})
    config = json.loads((folder / "config.json").read_text())
    for where, method in (("", "fp8"), ("llm_config.", "awq"), ("llm_config.", "gptq")):
        section = config["llm_config"] if where else config
        section["quantization_config"] = {"quant_method": method, "bits": 4}
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(ConfigError, match=rf"^{folder}/config.json: {re.escape(where)}quantization_config "
                           rf"\(quant_method '{method}'\): quantized weights are not implemented") as info:
            InternVL.from_pretrained(folder)
        assert "\n" not in str(info.value)
        section.pop("quantization_config")


@pytest.mark.parametrize("weight_map", [["mlp1.1.weight"], {"mlp1.1.weight": None}])
def test_index_whose_weight_map_is_malformed(tmp_path, tiny, good_state, weight_map):
    folder = write_checkpoint(tmp_path / "bad", tiny, good_state, shards=2)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: weight_map (is not an object|gives mlp1.1.weight)"):
        InternVL.from_pretrained(folder)


def test_no_folder_and_not_a_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        InternVL.from_pretrained(tmp_path / "nothing" / "here")


def test_hub_id_without_network_gives_clear_error(monkeypatch, tmp_path):
    from huggingface_hub import constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # the env var is read at import
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=r"^OpenGVLab/InternVL2_5-4B-MPO: not a local folder, and not in the hub "
                                              r"cache \(HF_HUB_OFFLINE is set, so the hub was not asked\): "):
        InternVL.from_pretrained("OpenGVLab/InternVL2_5-4B-MPO")  # it said "downloading it from the hub failed"


def test_hub_failure_is_one_line(fake_hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants as hub_constants

    fake_hub(OSError("Got: ConnectError: Name or service not known\nAn error happened while trying to locate the "
                     "files on the Hub.\n  Please check your internet connection."))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)  # online: the probe fails as the network does
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda *args, **kwargs: (_ for _ in ()).throw(OSError()))
    with pytest.raises(CheckpointError) as error:
        InternVL.from_pretrained("OpenGVLab/InternVL2_5-4B-MPO")
    assert str(error.value) == (
        "OpenGVLab/InternVL2_5-4B-MPO: not a local folder, and downloading it from the hub failed: Got: ConnectError: "
        "Name or service not known An error happened while trying to locate the files on the Hub. Please check your "
        "internet connection; give a local folder, or download it where the hub can be reached"
    )


@pytest.fixture
def silent_hub():
    """An HF_ENDPOINT that accepts connections and never answers."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.shutdown(socket.SHUT_RDWR)  # wakes the accept() above (close() alone does not, on Linux)
    server.close()
    thread.join(timeout=10)
    assert not thread.is_alive()
    for conn in held:
        conn.close()


@pytest.mark.parametrize("cached", [False, True])
def test_a_hub_that_never_answers_is_an_error_or_the_cached_copy(tmp_path, silent_hub, cached):
    """snapshot_download asks the hub without a timeout; the resolver must not hang on a silent one."""
    snapshot = tmp_path / "hf" / "hub" / "models--org--name" / "snapshots" / ("a" * 40)
    if cached:
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text("{}")
        (snapshot.parents[1] / "refs").mkdir()
        (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    env = dict(os.environ, HF_ENDPOINT=silent_hub, HF_HUB_ETAG_TIMEOUT="1", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE", None)
    code = ("from internvl_mpo.checkpoint import resolve_checkpoint\n"
            "from internvl_mpo.errors import CheckpointError\n"
            "try:\n    print('PATH', resolve_checkpoint('org/name'))\n"
            "except CheckpointError as e:\n    print('ERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    if cached:
        assert out.strip() == f"PATH {snapshot}"
    else:
        assert out.strip() == ("ERROR org/name: not a local folder, not in the hub cache, and the hub did not answer "
                               "within 1 s (HF_HUB_ETAG_TIMEOUT)")


@pytest.mark.parametrize("cached", [False, True])
def test_a_hub_that_refuses_connections_is_an_error_or_the_cached_copy_at_once(tmp_path, cached):
    """Connection refused (no network, a firewall): the cached copy, or one line. A commit revision went on to
    snapshot_download online, which retried the hub's files list with backoff for 20 s and more before it
    read the cache."""
    import socket

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connections are refused
    commit = "a" * 40
    snapshot = tmp_path / "hf" / "hub" / "models--org--name" / "snapshots" / commit
    if cached:
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text("{}")
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE", None)
    code = ("from internvl_mpo.checkpoint import resolve_checkpoint\n"
            "from internvl_mpo.errors import CheckpointError\n"
            f"try:\n    print('PATH', resolve_checkpoint('org/name', revision={commit!r}))\n"
            "except CheckpointError as e:\n    print('ERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=15).stdout
    if cached:
        assert out.strip() == f"PATH {snapshot}"
    else:
        assert out.startswith(f"ERROR org/name (revision {commit!r}): not a local folder, not in the hub cache, and "
                              "the hub could not be reached ("), out


def _cached_snapshot(home: Path, commit: str, listed: list[str]) -> Path:
    """A hub cache (HF_HOME=home) holding org/name at `commit` (refs/main) as huggingface_hub writes it: files in
    blobs/, snapshot links to them, and the commit's cached file listing (trees/<commit>.json), which also names
    `listed` files the snapshot lacks (a README.md, remote code: what `hf download --include` or another tool's
    download leaves out)."""
    import hashlib

    repo = home / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    files = {}
    for name, data in {"config.json": b"{}"}.items():
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))
        files[name] = {"size": len(data), "blob_id": blob}
    files.update({name: {"size": 1, "blob_id": "0" * 40} for name in listed})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "trees").mkdir()
    (repo / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": files}))
    return snapshot


def _resolve_in_subprocess(env: dict, *args, timeout: float = 60) -> str:
    code = ("import sys, huggingface_hub\n"
            "from internvl_mpo.checkpoint import resolve_checkpoint\n"
            "from internvl_mpo.errors import CheckpointError\n"
            "probe, probes = huggingface_hub.HfApi.repo_info, []\n"
            "huggingface_hub.HfApi.repo_info = lambda *a, **k: probes.append(1) or probe(*a, **k)\n"
            "for revision in sys.argv[1:] or [None]:\n"
            "    try:\n        print('PATH', resolve_checkpoint('org/name', revision))\n"
            "    except CheckpointError as e:\n        print('ERROR', e)\n"
            "print('PROBES', len(probes))\n")
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=timeout).stdout


def _closed_port() -> int:
    import socket

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connections are refused
    return port


@pytest.mark.parametrize("hub", ["offline", "refused"])
def test_a_cached_snapshot_whose_listing_names_files_no_load_reads_is_served(tmp_path, hub):
    """huggingface_hub >= 2 refuses, without the hub, a snapshot that its cached file listing calls incomplete
    (IncompleteSnapshotError); a cache that lacks only a README.md or remote code (left out by `hf download
    --include`, or by another tool's download) was "not in the hub cache". The snapshot is served, as
    transformers serves its files offline; a file the load needs and lacks is named by the loader."""
    commit = "a" * 40
    snapshot = _cached_snapshot(tmp_path / "hf", commit, ["README.md", "modeling_internvl_chat.py"])
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_OFFLINE", None)
    if hub == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    assert _resolve_in_subprocess(env, "main", commit).splitlines()[:2] == [f"PATH {snapshot}"] * 2


@pytest.mark.parametrize("status", [503, 429])
def test_a_hub_answering_a_server_error_serves_the_cached_copy_at_once(tmp_path, status):
    """A hub that answers 503 (down, overloaded, or a proxy before it) or 429 (rate limiting): the probe's answer came
    back at once, but the resolver went on to snapshot_download online, which for a commit revision retried the hub's
    file list with backoff for 20 s and more before reading the cache (as a refused connection did before)."""
    import http.server
    import threading

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        commit = "a" * 40
        snapshot = _cached_snapshot(tmp_path / "hf", commit, [])
        env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}")
        env.pop("HF_HUB_OFFLINE", None)
        out = _resolve_in_subprocess(env, commit, timeout=15)
    finally:
        server.shutdown()
        server.server_close()
    assert out.splitlines()[0] == f"PATH {snapshot}"


@pytest.mark.parametrize("status", [503, 429])
def test_a_busy_hub_without_a_cached_copy_is_still_downloaded_from(tmp_path, monkeypatch, status):
    """A 5xx or 429 on the probe (the hub's API rate limit, a passing 503) with nothing cached: the download was
    not even tried ("not in the hub cache, and the hub answered with an error"), where the files (and
    huggingface_hub's retries) may well serve; it is tried, as before the cache fallback."""
    import httpx
    import huggingface_hub
    from huggingface_hub import constants as hub_constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from internvl_mpo.checkpoint import resolve_checkpoint

    def repo_info(self, repo_id, revision=None, timeout=None, **kwargs):
        response = httpx.Response(status, request=httpx.Request("GET", f"https://hub/api/models/{repo_id}"))
        raise HfHubHTTPError(f"{status} from the API", response=response)

    asked = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False):
        asked.append(local_files_only)
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(tmp_path)

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("org/busy-name") == tmp_path
    assert asked == [True, False]  # the cache first, then the download


def test_an_unreachable_hub_is_asked_once_a_process(tmp_path):
    """A command resolves its model more than once (its dtype and weights, then the load): each asked the hub again,
    so a hub that never answers cost HF_HUB_ETAG_TIMEOUT seconds each time (`generate`: twice)."""
    snapshot = _cached_snapshot(tmp_path / "hf", "a" * 40, [])
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    env.pop("HF_HUB_OFFLINE", None)
    assert _resolve_in_subprocess(env, "main", "main").splitlines() == [f"PATH {snapshot}"] * 2 + ["PROBES 1"]


def test_an_unusable_device_or_dtype_is_refused_before_the_hub_is_asked(fake_hub):
    """A hub id with device="cuda" on a CPU machine must not download the checkpoint first."""
    asked = fake_hub(AssertionError("the checkpoint was fetched before the device and dtype were checked"))
    cases = [(dict(device="meta"), "device 'meta' holds no data"),
             (dict(device="xla"), "device 'xla' asked for, but this PyTorch cannot use it"),
             (dict(device="bogus"), "unknown device 'bogus'"),
             (dict(dtype="float8_e4m3fn"), "unknown dtype 'float8_e4m3fn'"),
             (dict(dtype=torch.int8), "dtype torch.int8 cannot run the model"),
             # loaded, then failed deep in the first forward ('"add_stub" not implemented for Float8_e4m3fn')
             (dict(dtype=torch.float8_e4m3fn), "dtype torch.float8_e4m3fn cannot run the model; use one of "
                                               "bf16, bfloat16")]
    if not torch.cuda.is_available():
        cases.append((dict(device="cuda"), "sees no CUDA device"))
    for load in (InternVL.from_pretrained, InternVLChat.from_pretrained):
        for kwargs, message in cases:
            with pytest.raises(InputError, match=message):
                load("OpenGVLab/InternVL2_5-4B-MPO", **kwargs)
    assert asked == []


def test_commands_refuse_an_unusable_device_before_the_hub_is_asked(fake_hub, tmp_path, capsys):
    """generate, eval and pairs read the model's dtype and weight stamps (`run_dtype`) before the load checked the
    device: `--device cuda` on a CPU machine (or "meta", "bogus") downloaded a hub checkpoint first, and generate left
    an `<output>.settings.json` recording the dtype the device would have run in (bfloat16)."""
    from internvl_mpo.cli import main

    asked = fake_hub(AssertionError("the checkpoint was fetched before the device was checked"))
    (tmp_path / "q.jsonl").write_text('{"id": 1, "question": "hi"}\n')
    (tmp_path / "bench.jsonl").write_text('{"id": "1", "question": "hi", "answer": "a"}\n')
    (tmp_path / "items.jsonl").write_text('{"id": "1", "question": "hi", "answer": "a"}\n')
    commands = [["generate", "--input", "q.jsonl", "--output", "a.jsonl"],
                ["eval", "--data", "bench.jsonl", "--output", "ev"],
                ["pairs", "correctness", "--input", "items.jsonl", "--output", "pr"]]
    devices = [("meta", "device 'meta' holds no data"), ("bogus", "unknown device 'bogus'")]
    if not torch.cuda.is_available():
        devices.append(("cuda", "sees no CUDA device"))
    for command in commands:
        for device, message in devices:
            assert main([*command, "--model", "OpenGVLab/InternVL2_5-4B-MPO", "--device", device]) == 1
            assert message in capsys.readouterr().err
    assert asked == []
    assert not (tmp_path / "a.jsonl.settings.json").exists()


def test_a_load_while_another_process_saves_into_the_folder_reads_one_model(tmp_path, tiny, monkeypatch):
    """Tensors cast on loading (a bf16 folder loaded in fp32) were read from the files by path, after the checks
    made on the files as opened: a save renaming new files into place meanwhile gave a model mixing the two saves'
    weights, with no error. They are read from the files as opened."""
    from internvl_mpo import checkpoint

    old = InternVL(tiny).to(torch.bfloat16)
    new = InternVL(tiny).to(torch.bfloat16)
    with torch.no_grad():
        for param in new.parameters():
            param.add_(1.0)
    folder = tmp_path / "m"
    old.save_pretrained(folder)
    real, reads = checkpoint._read_into, []

    def read_into(*args, **kwargs):  # another process's save lands after the first few tensors were read
        reads.append(1)
        if len(reads) == 5:
            new.save_pretrained(folder)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "_read_into", read_into)
    loaded = InternVL.from_pretrained(folder, dtype=torch.float32).state_dict()
    assert len(reads) > 5
    for key, value in old.state_dict().items():
        assert torch.equal(loaded[key], value.float()), key
    monkeypatch.setattr(checkpoint, "_read_into", real)
    assert torch.equal(InternVL.from_pretrained(folder).state_dict()[key], new.state_dict()[key].float())


def test_a_weight_file_replaced_between_its_two_opens_is_opened_again(tmp_path, monkeypatch):
    """The safetensors handle (whose header the checks read) and the file the data are read from must be the same
    file: one replaced between the two opens is opened again, and one replaced every time is refused."""
    from safetensors.torch import save_file

    from internvl_mpo import checkpoint

    file = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(3)}, str(file))
    real, opened = checkpoint.open_safetensors, []

    def replaced_first(path):
        opened.append(path)
        if len(opened) == 1:
            save_file({"w": torch.ones(3)}, str(tmp_path / "new.safetensors"))
            os.replace(tmp_path / "new.safetensors", path)
        return real(path)

    monkeypatch.setattr(checkpoint, "open_safetensors", replaced_first)
    handle, reader = checkpoint.open_file(file)
    assert len(opened) == 2 and torch.equal(handle.get_tensor("w"), torch.ones(3))
    lazy = checkpoint.LazyTensor(reader, "w", handle.get_slice("w"), checkpoint.data_starts(reader)["w"])
    assert torch.equal(lazy.read(dtype=torch.float64), torch.ones(3, dtype=torch.float64))

    def replaced_always(path):
        save_file({"w": torch.ones(3)}, str(tmp_path / "new.safetensors"))
        os.replace(tmp_path / "new.safetensors", path)
        return real(path)

    monkeypatch.setattr(checkpoint, "open_safetensors", replaced_always)
    with pytest.raises(CheckpointError, match=re.escape(f"{file} was replaced 3 times while it was being opened: "
                                                        "another process is saving into the folder")):
        checkpoint.open_file(file)


def test_short_reads_of_a_weight_file_are_read_on_not_called_a_cut_file(tmp_path):
    """A network or FUSE filesystem may return fewer bytes than asked: the read goes on (as buffered reads did),
    and only the file's end is a cut file."""
    from safetensors.torch import save_file

    from internvl_mpo import checkpoint

    class Trickle(checkpoint.Reader):  # at most 3 bytes a read: fewer than a float32
        def _read(self, buffer, offset):
            return super()._read(buffer[:3], offset)

    file = tmp_path / "w.safetensors"
    w = torch.randn(37, 29)
    save_file({"w": w}, str(file))
    reader = Trickle(file)
    out = torch.empty(37, 29, dtype=torch.float64)
    checkpoint._read_into(reader, checkpoint.data_starts(reader)["w"], out, torch.float32, chunk=64)
    assert torch.equal(out, w.double())
    with pytest.raises(CheckpointError, match="ends inside its tensor data"):
        checkpoint._read_into(reader, file.stat().st_size - 8, out, torch.float32, chunk=64)


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("500MB") == 500_000_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot read the size"):
        parse_size("lots")
    for size in ("5iB", "5IB", "5 ib"):  # a binary mark without its unit letter: "BKMGT".index("I") raised
        with pytest.raises(InputError, match=f"^cannot read the size {size!r}"):
            parse_size(size)
    assert parse_size("3B") == parse_size("3") == 3 and parse_size("1kib") == 1024
    for size in (0, -5, "0MB"):
        with pytest.raises(InputError, match="not a positive size|cannot read the size"):
            parse_size(size)
    assert parse_size("0.5KB") == 500
    for size in (1.5, 2.0, True, False):  # 1.5 was taken as 1 byte
        with pytest.raises(InputError, match=f"max_shard_size {size!r} is a {type(size).__name__}"):
            parse_size(size)


@pytest.mark.parametrize("failing", ["shard", "tokenizer"])
def test_a_save_that_fails_part_way_leaves_the_earlier_save(tmp_path, tiny, monkeypatch, failing):
    """A full disk part way through a save over an earlier one (safetensors reports it as a SafetensorError,
    a copy as an OSError): the folder keeps its earlier weights, config and tokenizer files, byte for
    byte, no temporary file stays, and the error is one line naming the folder and the cause."""
    from safetensors import SafetensorError

    from internvl_mpo import checkpoint

    sources = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = InternVL(tiny, image_token_id=IMAGE_TOKEN_ID)
        model.init_weights()
        source = model.save_pretrained(tmp_path / f"src{seed}")
        for name in ("tokenizer.json", "vocab.json"):
            (source / name).write_text(f'{{"seed": {seed}}}')
        sources.append(InternVL.from_pretrained(source, image_token_id=IMAGE_TOKEN_ID))
    folder = sources[0].save_pretrained(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    save_tensors, copy_file, written = checkpoint.save_tensors, checkpoint.copy_file, []

    def disk_full_on_a_shard(tensors, path, metadata=None):
        if written:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        written.append(path)
        save_tensors(tensors, path, metadata)

    def disk_full_on_a_copy(source, target):
        if source.name == "vocab.json":
            raise OSError(28, "No space left on device")
        copy_file(source, target)

    if failing == "shard":
        monkeypatch.setattr(checkpoint, "save_tensors", disk_full_on_a_shard)
    else:
        monkeypatch.setattr(checkpoint, "copy_file", disk_full_on_a_copy)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(folder))}: .*No space left on device") as error:
        sources[1].save_pretrained(folder, max_shard_size="10KB")
    assert "\n" not in str(error.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(InternVL.from_pretrained(folder)(ids), sources[0](ids))


@pytest.mark.parametrize("failing", ["index.json", "config.json"])
def test_a_save_whose_index_or_config_cannot_be_written_leaves_the_earlier_save(tmp_path, tiny, monkeypatch, failing):
    """The index and config.json go in with the shards: the earlier index and shards must not be gone before
    the new index is written, nor new weights in place beside the earlier config.json."""
    model = InternVL(tiny, image_token_id=IMAGE_TOKEN_ID)
    model.init_weights()
    folder = model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    write_text = Path.write_text

    def disk_full(path, *args, **kwargs):
        if failing in path.name:
            raise OSError(28, "No space left on device")
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(CheckpointError, match=f"{folder}: .*No space left"):
        model.save_pretrained(folder, max_shard_size="40KB")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(InternVL.from_pretrained(folder)(ids), model(ids))


def test_a_save_syncs_each_file_to_disk_before_renaming_it_into_place(tmp_path, tiny, monkeypatch):
    """A rename is atomic, but a crash (a power cut) after it could leave a file of the new name holding
    nothing, the data still in the page cache: each file is fsynced before its rename, then the folder."""
    model = InternVL(tiny, image_token_id=IMAGE_TOKEN_ID)
    model.init_weights()
    events, fsync, replace = [], os.fsync, os.replace

    def synced(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def renamed(source, target):
        events.append(("rename", str(source)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", renamed)
    folder = model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    assert len(renames) >= 4  # shards, index, config.json
    for i in renames:
        assert ("fsync", events[i][1]) in events[:renames[0]], events[i][1]
    assert ("fsync", str(folder)) in events[renames[-1]:]


def test_saving_over_an_earlier_save_removes_its_weight_files_and_no_others(tmp_path, tiny):
    model = InternVL(tiny, image_token_id=IMAGE_TOKEN_ID)
    model.init_weights()
    folder = model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 2
    mine = ["model-ema.safetensors", "model_best.safetensors", "model-00001-of-00002.safetensors.bak"]
    for name in mine:
        (folder / name).write_bytes(b"the user's")
    model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", "model.safetensors", *mine])
    model.save_pretrained(folder, max_shard_size="20KB")
    assert not (folder / "model.safetensors").exists() and (folder / "model.safetensors.index.json").exists()
    with pytest.raises(InputError, match="model-ema.safetensors is a file; give the folder to save into"):
        model.save_pretrained(folder / "model-ema.safetensors")
    with pytest.raises(CheckpointError, match=r"safetensors/m: saving failed \(\[Errno 20\] Not a directory"):
        model.save_pretrained(folder / "model-ema.safetensors" / "m")  # was a NotADirectoryError traceback
    with pytest.raises(InputError, match="cannot read the size 'lots'"):
        model.save_pretrained(tmp_path / "new", max_shard_size="lots")
    with torch.device("meta"):
        empty = InternVL(tiny)
    with pytest.raises(InputError, match=r"^\d+ weights hold no data \(built on the meta device: vision_model\."):
        empty.save_pretrained(tmp_path / "new")  # was torch's NotImplementedError, after making the folder
    assert not (tmp_path / "new").exists()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(InternVL.from_pretrained(folder)(ids), model(ids))


def test_saving_over_shards_another_tool_numbered_removes_them_as_its_index_names_them(tmp_path, tiny):
    """Shards numbered otherwise ("model-0001-of-0002.safetensors") stayed beside the new model.safetensors once the
    index that named them was gone: vLLM, reading every *.safetensors of a folder without an index, would load the
    earlier weights with the new ones."""
    model = InternVL(tiny, image_token_id=IMAGE_TOKEN_ID)
    model.init_weights()
    folder = model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    renamed = {}
    for name in sorted(set(index["weight_map"].values())):
        number, total = re.fullmatch(r"model-(\d+)-of-(\d+)\.safetensors", name).groups()
        renamed[name] = f"model-{int(number):04d}-of-{int(total):04d}.safetensors"
        (folder / name).rename(folder / renamed[name])
    index["weight_map"] = {key: renamed[name] for key, name in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model-0009-of-0009.safetensors").write_bytes(b"the user's: no index names it")
    InternVL.from_pretrained(folder).save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model-0009-of-0009.safetensors",
                                                        "model.safetensors"]


def test_a_head_tied_by_hand_is_saved_as_a_tensor_of_its_own(tmp_path, tiny):
    model = InternVL(tiny, image_token_id=IMAGE_TOKEN_ID)
    model.init_weights()
    lm = model.language_model
    lm.lm_head.weight = lm.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "m")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(InternVL.from_pretrained(tmp_path / "m")(ids), model(ids))


# wrapping a module in torch.compile imports dynamo, whose torch.jit imports warn that script_method is deprecated
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_weights_that_do_not_fit_the_config_are_not_saved(tmp_path, tiny):
    """A resized embedding, or a submodule swapped for torch.compile's wrapper (its keys gain `_orig_mod.`), was
    saved without a word into a folder no loader could read (its keys or shapes are not config.json's)."""
    model = InternVL(tiny, image_token_id=IMAGE_TOKEN_ID)
    model.init_weights()
    model.language_model.model.embed_tokens = torch.nn.Embedding(310, tiny.llm.hidden_size)
    with pytest.raises(InputError, match=r"do not fit its config \(1 with the wrong shape or dtype: language_model\.model"
                       r"\.embed_tokens\.weight: model \[310, 64\] vs config \[300, 64\]\).*nothing was written"):
        model.save_pretrained(tmp_path / "resized")
    model = InternVL(tiny, image_token_id=IMAGE_TOKEN_ID)
    model.init_weights()
    model.vision_model = torch.compile(model.vision_model)
    with pytest.raises(InputError, match=r"\d+ missing: vision_model\.embeddings.*unexpected: vision_model\._orig_mod\."
                       r".*a torch.compile'd submodule"):
        model.save_pretrained(tmp_path / "compiled")
    assert not (tmp_path / "resized").exists() and not (tmp_path / "compiled").exists()
    model.vision_model = model.vision_model._orig_mod
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(InternVL.from_pretrained(model.save_pretrained(tmp_path / "plain"))(ids), model(ids))


def test_weights_holding_inf_or_nan_are_not_saved(tmp_path, tiny):
    """A weight past fp16's range becomes inf when a model is cast to fp16 (train writes final/ in the starting
    checkpoint's dtype): it was saved without a word, into a folder the loader then refuses as broken."""
    model = InternVL(tiny, image_token_id=IMAGE_TOKEN_ID)
    model.init_weights()
    with torch.no_grad():
        model.language_model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e5
    model = model.to(torch.float16)
    with pytest.raises(InputError, match=r"hold NaN or inf values \(language_model\.model\.layers\.0\.mlp\.up_proj\."
                                         r"weight\); .*nothing was written"):
        model.save_pretrained(tmp_path / "inf")
    assert not (tmp_path / "inf").exists()


def test_the_saved_dtype_is_recorded_in_the_vision_and_llm_configs_too(tmp_path, tiny):
    """An official config.json records torch_dtype in llm_config and vision_config as well (TensorRT-LLM's
    InternVL builder reads the vision one); a bf16 checkpoint loaded and saved as float32 must say float32
    in all three places, not keep the source's bfloat16 below the top level."""
    d = tiny.to_dict()
    d["torch_dtype"] = d["llm_config"]["torch_dtype"] = d["vision_config"]["torch_dtype"] = "bfloat16"
    d["llm_config"]["dtype"] = "bfloat16"  # as transformers >= 4.56 writes it
    model = InternVL(ModelConfig.from_dict(d))
    model.init_weights()
    InternVL.from_pretrained(model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16"), dtype=torch.float32
                             ).save_pretrained(tmp_path / "fp32")
    saved = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert saved["torch_dtype"] == saved["vision_config"]["torch_dtype"] == "float32"
    assert saved["llm_config"]["torch_dtype"] == saved["llm_config"]["dtype"] == "float32"
    with safe_open(str(tmp_path / "fp32" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("mlp1.1.weight").dtype == torch.float32


@pytest.mark.parametrize("content", [b"{bad", '{"<IMG_CONTEXT>": 299}'.encode("utf-16")], ids=["not-json", "utf-16"])
@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "added_tokens.json"])
def test_a_tokenizer_file_that_is_not_json_is_named(tmp_path, tiny, name, content):
    InternVL(tiny).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=f"cannot read tokenizer file .*{name}"):
        InternVL.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.json", "[1]", "it holds a JSON list, not an object"),
    ("tokenizer.json", '{"added_tokens": null, "x": 1}', None),  # null: none, as transformers reads it
    ("tokenizer.json", '{"added_tokens": [1]}', "added_tokens is not a list of objects"),
    ("tokenizer.json", '{"added_tokens": [{"content": "<IMG_CONTEXT>", "id": "9"}]}', "has the id '9'"),
    ("tokenizer_config.json", '{"added_tokens_decoder": []}', "added_tokens_decoder is not an object of objects"),
    ("added_tokens.json", '{"<IMG_CONTEXT>": 2.5}', "has the id 2.5"),
])
def test_a_tokenizer_file_of_the_wrong_shape_is_named(tmp_path, tiny, name, content, message):
    """Valid JSON of another shape (a list, a null or misshapen added_tokens) was an AttributeError or a TypeError
    from deep inside the loader."""
    InternVL(tiny).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / name).write_text(content)
    if message is None:
        assert InternVL.from_pretrained(tmp_path / "m", image_token_id=299).config == tiny
        return
    with pytest.raises(CheckpointError, match=rf"tokenizer file .*{name}: .*{re.escape(message)}"):
        InternVL.from_pretrained(tmp_path / "m")


def test_single_file_written_when_small(tmp_path, tiny):
    model = InternVL(tiny)
    model.init_weights()
    folder = model.save_pretrained(tmp_path / "one")
    assert (folder / "model.safetensors").exists() and not (folder / "model.safetensors.index.json").exists()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", SAVE_ID: f.metadata()[SAVE_ID]}


PEAK_SCRIPT = """
import sys, torch
from internvl_mpo.model import InternVL
def peak():  # VmHWM: ru_maxrss would carry over the parent's resident set, whatever this process loads
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) * 1024
before = peak()
model = InternVL.from_pretrained(sys.argv[1], dtype=torch.float32)
print(peak() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_loading_peak_memory_stays_near_weight_size(tmp_path):
    """2.3 GB of fp32 weights, stored in bf16 as the hub's are, must load in about that much memory (cast from the
    memory mapping, the stored 1.2 GB stayed resident too: 1.5 times)."""
    config = ModelConfig(
        vision=dataclasses.replace(VisionConfig(), num_hidden_layers=1),
        llm=dataclasses.replace(LLMConfig(), num_hidden_layers=4, vocab_size=60000),
    )
    with torch.device("meta"):
        meta = InternVL(config)
    state = {k: (torch.randn(v.shape) * 0.02).to(torch.bfloat16) for k, v in meta.state_dict().items()}
    size = sum(t.numel() * 4 for t in state.values())  # in fp32
    write_checkpoint(tmp_path / "big", config, state, shards=3)
    del state
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "big")],
                         capture_output=True, text=True, check=True)
    growth = int(out.stdout.strip())
    assert size > 0.9e9
    assert growth < 1.3 * size, f"loading {size / 1e9:.2f} GB grew the process by {growth / 1e9:.2f} GB"


@pytest.mark.parametrize("name, expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16), (None, torch.float32)])
def test_dtype_auto_takes_the_configs_dtype(tmp_path, tiny, good_state, name, expected):
    folder = write_checkpoint(tmp_path / "ck", tiny, good_state)
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None)
    config["torch_dtype"] = name
    (folder / "config.json").write_text(json.dumps(config))
    assert InternVL.from_pretrained(folder, dtype="auto").dtype == expected


def test_dtype_auto_without_a_config_dtype_reads_the_first_shard_as_transformers(tmp_path, tiny, good_state):
    """transformers takes the first floating-point weight of the first shard (by file name), not of another."""
    keys = sorted(good_state)  # write_checkpoint deals them out: keys[0::2] to shard 1, keys[1::2] to shard 2
    for first, second in ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)):
        state = {key: good_state[key].to(second if i % 2 else first) for i, key in enumerate(keys)}
        folder = write_checkpoint(tmp_path / str(first), tiny, state, shards=2)
        assert InternVL.from_pretrained(folder, dtype="auto").dtype == first


def test_a_weight_past_the_range_of_the_dtype_asked_for_is_refused(tmp_path, tiny, good_state):
    """A weight over 65504 read as float16 became inf (and the logits NaN) without a word."""
    good_state["mlp1.1.weight"][0, 0] = 1e6
    src = write_checkpoint(tmp_path / "src", tiny, good_state)
    with pytest.raises(InputError, match=r"src/model.safetensors: mlp1\.1\.weight holds values up to 1e\+06, past "
                       r"float16's largest \(6\.55e\+04\); load it in a wider dtype"):
        InternVL.from_pretrained(src, dtype=torch.float16, image_token_id=IMAGE_TOKEN_ID)
    model = InternVL.from_pretrained(src, dtype=torch.bfloat16, image_token_id=IMAGE_TOKEN_ID)
    assert model.mlp1[1].weight[0, 0].item() == 1e6 - 576  # bf16's nearest
    good_state["mlp1.1.weight"] = good_state["mlp1.1.weight"].double()
    good_state["mlp1.1.weight"][0, 0] = 1e300
    src = write_checkpoint(tmp_path / "f64", tiny, good_state)
    with pytest.raises(InputError, match=r"past float32's largest \(3\.403e\+38\); load it in a wider dtype "
                                         r"\(float64\)$"):
        InternVL.from_pretrained(src, dtype=torch.float32, image_token_id=IMAGE_TOKEN_ID)  # not "bfloat16 or float32"


def test_an_index_that_cannot_be_read_is_named(tmp_path, tiny, good_state):
    """An index in UTF-16, or a folder of its name, raised UnicodeDecodeError or IsADirectoryError from inside."""
    src = write_checkpoint(tmp_path / "src", tiny, good_state, shards=2)
    index = src / "model.safetensors.index.json"
    index.write_bytes(index.read_text().encode("utf-16"))
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: not a valid safetensors index \(not"
                                              r" UTF-8 text \(invalid start byte at byte 0\)\)"):
        InternVL.from_pretrained(src, image_token_id=IMAGE_TOKEN_ID)
    index.unlink()
    index.mkdir()
    with pytest.raises(CheckpointError, match=r"index.json: cannot read the index \(Is a directory\)"):
        InternVL.from_pretrained(src, image_token_id=IMAGE_TOKEN_ID)


def broken_message(file: Path, key: str) -> str:
    return re.escape(f"{file}: {key} holds NaN or inf values; the checkpoint is broken (a diverged run or a damaged "
                     "file)")


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("which, value", [(8, float("nan")), (4, float("inf")), (28, float("-inf"))])
def test_a_weight_holding_nan_or_inf_is_refused_naming_the_file_and_the_weight(tmp_path, tiny, good_state, shards,
                                                                              which, value):
    """Such a checkpoint (a diverged run, a damaged file) loaded without a word, and the model answered garbage
    (argmax over NaN logits); float16 took an inf for a value past its range (or let it through)."""
    key = sorted(good_state)[1::2][which]  # a weight of the second shard where there are two
    good_state[key].view(-1)[-1] = value  # its last value: the whole tensor is checked
    folder = write_checkpoint(tmp_path / "ck", tiny, good_state, shards=shards)
    file = folder / ("model.safetensors" if shards == 1 else "model-00002-of-00002.safetensors")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        with pytest.raises(CheckpointError, match=broken_message(file, key)):
            InternVL.from_pretrained(folder, dtype=dtype, image_token_id=IMAGE_TOKEN_ID)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nan_or_inf_and_the_float16_overflow_are_told_apart_on_cuda(tmp_path, tiny, good_state):
    """The check runs where the weights land, on the GPU too, in bfloat16 and float16."""
    large, broken = dict(good_state), dict(good_state)
    large["mlp1.1.weight"] = large["mlp1.1.weight"].clone()
    large["mlp1.1.weight"][0, 0] = 1e6
    broken["mlp1.3.weight"] = broken["mlp1.3.weight"].clone()
    broken["mlp1.3.weight"][-1, -1] = float("-inf")
    large_folder = write_checkpoint(tmp_path / "large", tiny, large)
    broken_folder = write_checkpoint(tmp_path / "broken", tiny, broken)
    model = InternVL.from_pretrained(large_folder, dtype=torch.bfloat16, device="cuda", image_token_id=IMAGE_TOKEN_ID)
    assert model.mlp1[1].weight[0, 0].item() == 1e6 - 576
    with pytest.raises(InputError, match=r"mlp1\.1\.weight holds values up to 1e\+06, past float16's largest"):
        InternVL.from_pretrained(large_folder, dtype=torch.float16, device="cuda", image_token_id=IMAGE_TOKEN_ID)
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(CheckpointError, match=broken_message(broken_folder / "model.safetensors", "mlp1.3.weight")):
            InternVL.from_pretrained(broken_folder, dtype=dtype, device="cuda", image_token_id=IMAGE_TOKEN_ID)


def test_rows_read_lazily_are_checked_as_they_are_read(tmp_path, tiny, good_state):
    """Training under FSDP2 reads each process's rows of a weight, and a resume reads the weights whole, through
    `LazyTensor`: NaN there went into the run."""
    from internvl_mpo.checkpoint import open_state_dict

    key = "language_model.model.embed_tokens.weight"
    good_state[key][200, 5] = float("nan")
    folder = write_checkpoint(tmp_path / "ck", tiny, good_state)
    lazy = open_state_dict(folder, {k: v.shape for k, v in good_state.items()})[key]
    assert torch.equal(lazy[:200], good_state[key][:200])  # rows without it read as they are
    for index in (slice(150, 300), ...):
        with pytest.raises(CheckpointError, match=broken_message(folder / "model.safetensors", key)):
            lazy[index]


def test_large_finite_weights_still_load(tmp_path, tiny, good_state):
    """The check is no sum, which values near float32's largest overflow: such weights are finite and load; float16
    still refuses them as past its range."""
    good_state["mlp1.1.weight"][0] = 3e38
    good_state["mlp1.1.weight"][1] = -3e38
    assert not torch.isfinite(good_state["mlp1.1.weight"].sum())
    src = write_checkpoint(tmp_path / "src", tiny, good_state)
    model = InternVL.from_pretrained(src, dtype=torch.float32, image_token_id=IMAGE_TOKEN_ID)
    assert torch.equal(model.mlp1[1].weight, good_state["mlp1.1.weight"])
    model = InternVL.from_pretrained(src, dtype=torch.bfloat16, image_token_id=IMAGE_TOKEN_ID)
    assert torch.isfinite(model.mlp1[1].weight).all() and model.mlp1[1].weight[1, 0].item() < -2.9e38
    with pytest.raises(InputError, match=r"mlp1\.1\.weight holds values up to 3e\+38, past float16's largest"):
        InternVL.from_pretrained(src, dtype=torch.float16, image_token_id=IMAGE_TOKEN_ID)


def test_chat_refuses_a_broken_checkpoint_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = tiny_chat_folder(tmp_path / "model")
    state = load_file(folder / "model.safetensors")
    state["language_model.model.norm.weight"][3] = float("inf")
    save_file(state, folder / "model.safetensors")
    out = subprocess.run([sys.executable, "-m", "internvl_mpo.cli", "chat", "--model", str(folder), "Hi"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == (f"internvl-mpo chat: error: {folder / 'model.safetensors'}: language_model.model.norm.weight "
                          "holds NaN or inf values; the checkpoint is broken (a diverged run or a damaged file)\n")


@pytest.mark.parametrize("name", ["float8_e4m3fn", "int8", "complex64"])
def test_dtype_auto_refuses_a_config_dtype_it_cannot_load_in(tmp_path, tiny, good_state, name):
    """It read as fp32 without a word."""
    folder = write_checkpoint(tmp_path / "ck", tiny, good_state)
    config = json.loads((folder / "config.json").read_text())
    config["torch_dtype"] = name
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=f"^dtype 'auto': the checkpoint's dtype is {name!r}.*; give dtype as one of "
                                         ) as refused:
        InternVL.from_pretrained(folder, dtype="auto")
    # the command line names its flag (it said "pass dtype=", a Python parameter, and offered 'auto' again)
    from internvl_mpo.cli import flagged
    from internvl_mpo.cli_chat import chat

    shown = str(flagged(refused.value, chat))
    assert shown.startswith(f"--dtype 'auto': the checkpoint's dtype is {name!r}")
    assert "; give --dtype as one of b" in shown


@pytest.mark.parametrize("shards", [1, 3])
def test_a_load_reads_each_weight_files_header_once(tmp_path, tiny, good_state, monkeypatch, shards):
    """dtype="auto" without a config dtype checked the folder's shards (save ids, keys) for the dtype and again
    for the tensors, reading each header five times (the first shard six) in one load."""
    from internvl_mpo import checkpoint

    state = {key: tensor.to(torch.bfloat16) for key, tensor in good_state.items()}
    folder = write_checkpoint(tmp_path / "ck", tiny, state, shards=shards)
    opened = []
    read = checkpoint.open_safetensors
    monkeypatch.setattr(checkpoint, "open_safetensors", lambda file: opened.append(file.name) or read(file))
    loaded = InternVL.from_pretrained(folder, dtype="auto")
    assert loaded.dtype == torch.bfloat16  # the dtype came from a header
    assert sorted(opened) == sorted(p.name for p in folder.glob("*.safetensors")) and len(opened) == shards
    for key, tensor in state.items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


# A save of another model (seed 1) that stops after writing its first shard until a line comes on stdin.
PAUSED_SAVE = """
import sys
import torch
from internvl_mpo import checkpoint
from internvl_mpo.model import InternVL
from conftest import tiny_config

save_tensors = checkpoint.save_tensors

def paused(tensors, path, metadata=None):
    save_tensors(tensors, path, metadata)
    if not paused.done:
        paused.done = True
        print("writing", flush=True)
        sys.stdin.readline()

paused.done = False
checkpoint.save_tensors = paused
torch.manual_seed(1)
model = InternVL(tiny_config())
model.init_weights()
model.save_pretrained(sys.argv[1], max_shard_size="20KB")
print("saved", flush=True)
"""


def paused_save(folder: Path) -> subprocess.Popen:
    """Another process part way through a save into `folder` (its first shard written)."""
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", PAUSED_SAVE, str(folder)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout.readline() == "writing\n"
    return child


def test_a_save_into_a_folder_another_process_is_saving_into_is_refused(tmp_path, tiny):
    """Two saves into one folder at once interleaved their files (a model whose index names the other's
    shards, temporary files of one renamed by the other): the second is refused, naming the folder, the
    lock and the process that holds it, and the first ends as it would alone. A save killed part way
    leaves its lock file and temporary shards: the next save is not blocked, and removes them."""
    torch.manual_seed(0)
    mine = InternVL(tiny, image_token_id=IMAGE_TOKEN_ID)
    mine.init_weights()
    folder = tmp_path / "m"
    other = paused_save(folder)
    with pytest.raises(CheckpointError) as error:
        mine.save_pretrained(folder, max_shard_size="30KB")
    assert str(error.value).startswith(f"{folder}: saving failed (another save into it is running: pid {other.pid} on ")
    assert ".internvl-mpo-save.lock" in str(error.value) and "nothing was written" in str(error.value)
    other.stdin.close()
    assert other.stdout.read() == "saved\n" and other.wait() == 0
    other.stdout.close()  # left to the garbage collector, its ResourceWarning came in a later test
    torch.manual_seed(1)
    theirs = InternVL(tiny)
    theirs.init_weights()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(InternVL.from_pretrained(folder)(ids), theirs(ids))
    assert not any(p.name.startswith(".") for p in folder.iterdir())

    killed = paused_save(folder)
    killed.kill()
    killed.wait()
    killed.stdin.close(), killed.stdout.close()
    left = sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
    assert ".internvl-mpo-save.lock" in left and any(name.endswith(".safetensors.tmp") for name in left)
    (folder / ".notes.tmp").write_text("the user's")
    mine.save_pretrained(folder, max_shard_size="30KB")
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == [".notes.tmp"]
    with torch.no_grad():
        assert torch.equal(InternVL.from_pretrained(folder)(ids), mine(ids))


def test_saving_over_a_transformers_layout_folder_removes_its_processor_files(tmp_path):
    """`convert --to hf` writes transformers' processor files (processor_config.json, a
    preprocessor_config.json naming InternVLProcessor); an official-layout save over such a folder left
    them, so the folder claimed both layouts and AutoProcessor built a processor for the other one. They
    go, whatever the model brings, and are not copied from a transformers folder used as the tokenizer's;
    the tokenizer files and the user's own files stay, without the processor's tokens in
    tokenizer_config.json (its <video> is not in the vocabulary: the tokenizer outgrew the model)."""
    from internvl_mpo.chat.tokenizer import load_tokenizer
    from internvl_mpo.convert import convert

    src, _ = tiny_chat_folder(tmp_path / "src")
    hf = convert(src, tmp_path / "hf", to="hf")
    assert json.loads((hf / "processor_config.json").read_text())["processor_class"] == "InternVLProcessor"
    (hf / "notes.txt").write_text("mine")
    tokenizer_names = {p.name for p in hf.iterdir()} & {"tokenizer.json", "tokenizer_config.json", "vocab.json"}
    assert tokenizer_names
    bare = InternVL.from_pretrained(src)
    bare.source_dir = None  # nothing to bring: the folder's tokenizer stays
    bare.save_pretrained(hf)
    names = {p.name for p in hf.iterdir()}
    assert not names & {"processor_config.json", "preprocessor_config.json"}
    assert tokenizer_names | {"notes.txt", "config.json", "model.safetensors"} <= names
    assert len(load_tokenizer(hf)) == bare.config.llm.vocab_size  # without the processor's <video> token

    hf2 = convert(src, tmp_path / "hf2", to="hf")
    official = {"image_processor_type": "CLIPImageProcessor", "crop_size": 448, "size": 448}
    (src / "preprocessor_config.json").write_text(json.dumps(official))
    InternVL.from_pretrained(src).save_pretrained(hf2)
    assert not (hf2 / "processor_config.json").exists()
    assert json.loads((hf2 / "preprocessor_config.json").read_text()) == official

    model = InternVL.from_pretrained(src)
    model.tokenizer_dir = convert(src, tmp_path / "hf3", to="hf")  # a tokenizer with transformers' processor files
    out = model.save_pretrained(tmp_path / "out")
    assert not (out / "processor_config.json").exists()
    # the official preprocessor_config.json and tokenizer_config.json `--to hf` kept, as `convert --to official` gives it back (no <IMG_CONTEXT> template)
    assert (out / "tokenizer_config.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
    assert (out / "preprocessor_config.json").read_bytes() == (src / "preprocessor_config.json").read_bytes()
    InternVLChat.from_pretrained(out)  # the tokenizer fits the vocabulary


def test_a_tokenizer_transformers_saved_again_is_saved_without_its_video_token(tmp_path):
    """transformers' InternVL processor gives `<video>` (not in the official vocabulary) an id past the
    vocabulary, and a tokenizer it saves keeps it in tokenizer.json and tokenizer_config.json; a model saved
    with such a tokenizer folder copied it, so the official code, vLLM and lmdeploy saw a tokenizer one token
    larger than the model (and chat refused the folder). It goes, as `convert --to official` drops it."""
    from transformers import AutoTokenizer

    from internvl_mpo.chat.tokenizer import load_tokenizer
    from internvl_mpo.convert import convert

    src, _ = tiny_chat_folder(tmp_path / "src")
    resaved = tmp_path / "resaved"
    AutoTokenizer.from_pretrained(convert(src, tmp_path / "hf", to="hf")).save_pretrained(resaved)
    assert "<video>" in (resaved / "tokenizer.json").read_text()
    assert "<video>" in (resaved / "tokenizer_config.json").read_text()  # its video_token, and more keys
    model = InternVL.from_pretrained(src)
    model.tokenizer_dir = resaved
    out = model.save_pretrained(tmp_path / "out")
    vocab = model.config.llm.vocab_size
    assert [name for name in ("tokenizer.json", "tokenizer_config.json") if "<video>" in (out / name).read_text()] == []
    assert len(load_tokenizer(out)) == len(AutoTokenizer.from_pretrained(out)) == vocab
    InternVLChat.from_pretrained(out)  # the tokenizer fits the vocabulary


def test_a_tokenizer_folder_gives_its_tokenizer_files_and_the_model_its_generation_and_processor_files(tmp_path):
    """With a `tokenizer_dir` (train's --tokenizer), the saved folder took the tokenizer folder's
    generation_config.json (a Qwen2.5-Instruct folder's sampling defaults would become the trained model's in vLLM
    and transformers), or none where it had none: those files are the model folder's."""
    src, _ = tiny_chat_folder(tmp_path / "src")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    (src / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
    tok, tok2 = tmp_path / "tok", tmp_path / "tok2"
    for folder in (tok, tok2):
        folder.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
            if (src / name).exists():
                shutil.copy(src / name, folder / name)
    (tok / "tokenizer_config.json").write_text(
        (src / "tokenizer_config.json").read_text().replace("{", '{"model_max_length": 1234, ', 1))
    (tok2 / "generation_config.json").write_text(json.dumps({"eos_token_id": 7, "temperature": 0.7}))
    for folder in (tok, tok2):
        model = InternVL.from_pretrained(src)
        model.tokenizer_dir = folder
        out = model.save_pretrained(tmp_path / f"out-{folder.name}")
        for name in ("generation_config.json", "preprocessor_config.json"):
            assert (out / name).read_bytes() == (src / name).read_bytes(), (folder.name, name)
        assert (out / "tokenizer_config.json").read_bytes() == (folder / "tokenizer_config.json").read_bytes()


def test_a_folder_with_both_a_single_file_and_an_index_is_refused(tmp_path, tiny, good_state):
    """What a save cut short between its renames and its clean-up leaves, or two checkpoints copied into
    one folder: transformers reads model.safetensors, vLLM the index's shards, and we read the index;
    the weights loaded depended on the loader, silently."""
    folder = write_checkpoint(tmp_path / "m", tiny, good_state, shards=2)
    write_checkpoint(tmp_path / "other", tiny, {k: v + 1 for k, v in good_state.items()})
    shutil.copy(tmp_path / "other" / "model.safetensors", folder)
    with pytest.raises(CheckpointError, match="holds both model.safetensors and model.safetensors.index.json"):
        InternVL.from_pretrained(folder)


def test_an_index_naming_only_the_single_file_beside_it_loads(tmp_path, tiny, good_state):
    """mlx-lm's saves write model.safetensors.index.json beside a single model.safetensors, naming it alone: every
    loader reads that one file, so the folder loads; the index must still list exactly its tensors."""
    folder = write_checkpoint(tmp_path / "m", tiny, good_state)
    mapping = dict.fromkeys(sorted(good_state), "model.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": mapping}))
    model = InternVL.from_pretrained(folder)
    for key, value in model.state_dict().items():
        assert torch.equal(value, good_state[key]), key
    del mapping[sorted(mapping)[0]]
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": mapping}))
    with pytest.raises(CheckpointError, match="model.safetensors holds 1 tensor the index does not list there"):
        InternVL.from_pretrained(folder)


def save_ids(folder: Path) -> dict[str, str | None]:
    """The save id of the index ("index") and of each shard (by file name), None where there is none."""
    ids = {"index": json.loads((folder / "model.safetensors.index.json").read_text())["metadata"].get(SAVE_ID)}
    for shard in sorted(folder.glob("model-*-of-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            ids[shard.name] = (f.metadata() or {}).get(SAVE_ID)
    return ids


def test_a_folder_mixing_shards_of_two_saves_is_refused_naming_the_shard(tmp_path, tiny):
    """A save killed between its renames leaves its new shards beside old ones of the same names and keys
    (before, that mixture of two models loaded without a word); every loader of the folder refuses it."""
    from safetensors.torch import load, load_file

    from internvl_mpo.checkpoint import open_state_dict
    from internvl_mpo.convert import convert

    first, second = InternVL(tiny, image_token_id=IMAGE_TOKEN_ID), InternVL(tiny, image_token_id=IMAGE_TOKEN_ID)
    torch.manual_seed(0)
    first.init_weights()
    torch.manual_seed(1)
    second.init_weights()
    folder = first.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    shard = sorted(folder.glob("model-*-of-*.safetensors"))[1]
    old = shard.read_bytes()
    ids = save_ids(folder)
    assert len(ids) > 3 and len(set(ids.values())) == 1 and None not in ids.values()
    second.save_pretrained(folder, max_shard_size="20KB")
    again = save_ids(folder)
    assert again.keys() == ids.keys() and len(set(again.values())) == 1 and again["index"] != ids["index"]
    ids_in = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(InternVL.from_pretrained(folder)(ids_in), second(ids_in))

    newer, older = load_file(shard), load(old)
    assert newer.keys() == older.keys() and any(not torch.equal(newer[k], older[k]) for k in newer)
    shard.write_bytes(old)  # what a save killed before renaming this shard leaves
    message = (rf"{re.escape(str(folder))}: {re.escape(shard.name)} was written by another save than "
               r"model\.safetensors\.index\.json")
    with pytest.raises(CheckpointError, match=message + r".*mixes the files of two saves") as info:
        InternVL.from_pretrained(folder)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match=message):
        open_state_dict(folder, second.expected_keys())  # training's resume and initial weights
    with pytest.raises(CheckpointError, match=message):
        convert(folder, tmp_path / "hf", to="hf", image_token_id=IMAGE_TOKEN_ID)


def test_shards_under_an_index_without_a_save_id_must_come_from_one_save(tmp_path, tiny):
    """An index another tool rewrote (only total_size kept) over shards of one save loads; over shards of
    two (a save killed over a checkpoint without ids: new shards beside old ones) it is refused."""
    from safetensors.torch import load_file, save_file

    model = InternVL(tiny, image_token_id=IMAGE_TOKEN_ID)
    model.init_weights()
    folder = model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["metadata"] = {"total_size": index["metadata"]["total_size"]}
    index_file.write_text(json.dumps(index))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(InternVL.from_pretrained(folder)(ids), model(ids))

    shard = sorted(folder.glob("model-*-of-*.safetensors"))[-1]
    save_file(load_file(shard), shard, metadata={"format": "pt"})  # a shard of a save without ids
    first = sorted(folder.glob("model-*-of-*.safetensors"))[0].name
    with pytest.raises(CheckpointError, match=rf"{re.escape(shard.name)} was written by another save than {first}"):
        InternVL.from_pretrained(folder)


def test_an_official_folder_without_save_ids_loads(tmp_path, tiny, good_state):
    folder = write_checkpoint(tmp_path / "m", tiny, good_state, shards=3)  # no metadata in shards, none but total_size
    assert set(save_ids(folder).values()) == {None}
    loaded = InternVL.from_pretrained(folder)
    for key, tensor in good_state.items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_convert_stamps_one_save_id_into_its_shards_and_index(tmp_path):
    """transformers ignores the id in both places: the sharded conversion still loads there."""
    from transformers import InternVLForConditionalGeneration

    from internvl_mpo.convert import convert

    src, _ = tiny_chat_folder(tmp_path / "src")
    hf = convert(src, tmp_path / "hf", to="hf", max_shard_size=20_000)
    back = convert(hf, tmp_path / "back", to="official", max_shard_size=20_000)
    hf_ids, back_ids = save_ids(hf), save_ids(back)
    assert len(hf_ids) > 3 and len(set(hf_ids.values())) == 1 and None not in hf_ids.values()
    assert len(back_ids) > 3 and len(set(back_ids.values())) == 1 and None not in back_ids.values()
    assert hf_ids["index"] != back_ids["index"]
    InternVLForConditionalGeneration.from_pretrained(hf, dtype=torch.float32)
    InternVL.from_pretrained(back)


def test_dtype_names_and_torch_dtypes_accept_the_same_set():
    """torch.float64 loaded while "float64" was refused; one message lists what is accepted."""
    cpu = torch.device("cpu")
    for name, dtype in (("float64", torch.float64), ("double", torch.float64), ("fp16", torch.float16)):
        assert parse_dtype(name, cpu) == parse_dtype(dtype, cpu) == dtype
    choices = "bf16, bfloat16, double, float, float16, float32, float64, fp16, fp32, fp64, half, the torch dtypes of those, or 'auto'"
    for bad in ("int8", torch.int8, torch.float8_e4m3fn, torch.complex64):
        with pytest.raises(InputError, match=re.escape(choices)):
            parse_dtype(bad, cpu)


def test_the_weight_check_reads_the_file_in_chunks_and_finds_nan_in_any(tmp_path):
    from safetensors.torch import save_file

    from internvl_mpo.checkpoint import Reader, _finite_in_file, data_starts

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        values = torch.randn(1000).to(dtype)
        for where, bad in ((None, None), (0, float("nan")), (517, float("inf")), (999, float("-inf"))):
            w = values.clone()
            if where is not None:
                w[where] = bad
            file = tmp_path / "w.safetensors"
            save_file({"a": torch.ones(3), "w": w}, str(file))
            reader = Reader(file)
            start = data_starts(reader)["w"]
            for chunk in (64, 1 << 23):  # many chunks, one
                assert _finite_in_file(reader, start, w, chunk=chunk) is (where is None), (dtype, where, chunk)
    (tmp_path / "short.safetensors").write_bytes(b"\x10\x00")
    assert data_starts(Reader(tmp_path / "short.safetensors")) == {}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssFile from /proc")
def test_loading_leaves_the_pages_of_unused_weights_out_of_the_process(tmp_path):
    """The NaN check went through the memory mapping, so every page of every weight became resident in the
    process (on the 0.5B-sized benchmark model, peak memory above transformers' by the embedding table's 0.5 GB,
    which decoding never reads whole). It reads the file instead: the mapping stays untouched until used."""
    from safetensors.torch import save_file

    file = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 1 << 20)}, str(file))  # 256 MB
    script = f"""
import sys
from pathlib import Path
from internvl_mpo.checkpoint import open_state_dict
def rss_file():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssFile:")) // 1024
before = rss_file()
w = open_state_dict(Path({str(tmp_path)!r}), {{"w": (64, 1 << 20)}})["w"].read()
assert w.shape == (64, 1 << 20)
print(rss_file() - before)
"""
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert grown < 64, f"RssFile grew by {grown} MB for a 256 MB weight"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssFile from /proc")
def test_a_weight_cast_on_loading_leaves_its_stored_pages_out_of_the_process(tmp_path):
    """A bf16 checkpoint loaded in fp32 (the default on the CPU) was cast from its memory mapping, whose pages
    stayed resident beside the fp32 copy until the load ended: a peak of 1.5 times the model (5.5 GiB for the
    3.5 GiB of InternVL2.5-1B). The cast reads the file a piece at a time instead."""
    from safetensors.torch import save_file

    save_file({"w": torch.randn(64, 1 << 20).to(torch.bfloat16)}, str(tmp_path / "model.safetensors"))  # 128 MB
    script = f"""
import torch
from pathlib import Path
from internvl_mpo.checkpoint import open_state_dict
def rss_file():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssFile:")) // 1024
before = rss_file()
lazy = open_state_dict(Path({str(tmp_path)!r}), {{"w": (64, 1 << 20)}})  # its file stays open, as in a load
w = lazy["w"].read(dtype=torch.float32)
assert w.dtype == torch.float32 and w.shape == (64, 1 << 20)
print(rss_file() - before)
"""
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert grown < 32, f"RssFile grew by {grown} MB casting a 128 MB weight"


def test_a_weight_cast_or_moved_is_read_piece_by_piece_into_the_same_values(tmp_path):
    from safetensors.torch import save_file

    from internvl_mpo.checkpoint import Reader, _read_into, data_starts, open_state_dict

    for stored, target in ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                           (torch.float16, torch.float32), (torch.bfloat16, torch.float16)):
        state = {"a": torch.ones(3, dtype=stored), "w": torch.randn(37, 29).to(stored),
                 "scalar": torch.tensor(2.5, dtype=stored), "empty": torch.empty(0, 4, dtype=stored)}
        save_file(state, str(tmp_path / "model.safetensors"))
        for chunk in (64, 1 << 23):  # many pieces, one
            out = torch.empty(37, 29, dtype=target)
            reader = Reader(tmp_path / "model.safetensors")
            _read_into(reader, data_starts(reader)["w"], out, stored, chunk=chunk)
            assert torch.equal(out, state["w"].to(target)), (stored, target, chunk)
        lazy = open_state_dict(tmp_path, {key: value.shape for key, value in state.items()})
        for key, value in state.items():
            read = lazy[key].read(dtype=target)
            assert read.dtype == target and torch.equal(read, value.to(target)), (stored, target, key)


def test_whole_tensor_read_through_a_view_that_takes_no_ellipsis(tmp_path):
    """safetensors before 0.8 refuses `view[...]` (a TypeError from its argument parsing), which reading a
    whole tensor used: on safetensors 0.4 - 0.7 no checkpoint loaded. It reads `view[:]`, which all take."""
    from safetensors.torch import save_file

    from internvl_mpo.checkpoint import LazyTensor, Reader

    class NoEllipsis:  # safetensors 0.4 - 0.7's slice object
        def __init__(self, view):
            self.view = view

        def get_shape(self):
            return self.view.get_shape()

        def __getitem__(self, index):
            if index is ... and self.get_shape() or isinstance(index, tuple) and ... in index:
                raise TypeError("argument 'slices': 'ellipsis' object cannot be converted to 'PySlice'")
            return self.view[index]

    file = tmp_path / "w.safetensors"
    w, b = torch.randn(3, 5), torch.randn(4)
    save_file({"w": w, "b": b}, str(file))
    with safe_open(str(file), "pt") as handle:
        for key, value in (("w", w), ("b", b)):
            lazy = LazyTensor(Reader(file), key, NoEllipsis(handle.get_slice(key)))
            assert torch.equal(lazy.read(), value) and torch.equal(lazy.read(dtype=torch.float64), value.double())
            assert torch.equal(lazy[1:3], value[1:3])


def test_shards_fill_up_to_the_size_limit_inclusive_as_huggingface_hubs_split(tmp_path):
    """A shard holds weights up to max_shard_size bytes, the limit included, as huggingface_hub (which
    transformers' save_pretrained calls) splits them."""
    from huggingface_hub import split_torch_state_dict_into_shards

    from internvl_mpo.checkpoint import save_state_dict

    state = {f"w{i}": torch.full((25,), float(i)) for i in range(4)}  # 100 bytes each
    for limit in (199, 200, 201, 400):
        folder = tmp_path / str(limit)
        folder.mkdir()
        save_state_dict(state, folder, limit)
        expected = split_torch_state_dict_into_shards(state, max_shard_size=limit).filename_to_tensors
        assert len(list(folder.glob("*.safetensors"))) == len(expected), limit

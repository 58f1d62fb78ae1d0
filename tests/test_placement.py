"""Layer placement over several GPUs (the official split_model recipe), as pure functions."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from internvl_mpo.config import LLMConfig, ModelConfig
from internvl_mpo.errors import InputError
from internvl_mpo.model import InternVL
from internvl_mpo.placement import check_device_map, device_for, layers_per_gpu, resolve_device_map, split_model


def test_official_example_two_gpus_36_layers():
    """Reference section 11: per_gpu 24 -> GPU0 layers 0-11 + 35, GPU1 layers 12-34."""
    assert layers_per_gpu(36, 2) == [12, 24]
    device_map = split_model(ModelConfig(), 2)
    on = {g: sorted(int(k.split(".")[-1]) for k, v in device_map.items() if ".layers." in k and v == g)
          for g in ("cuda:0", "cuda:1")}
    assert on["cuda:0"] == list(range(12)) + [35]
    assert on["cuda:1"] == list(range(12, 35))
    for name in ("vision_model", "mlp1", "language_model.model.embed_tokens", "language_model.model.norm",
                 "language_model.lm_head"):
        assert device_map[name] == "cuda:0"


@pytest.mark.parametrize("gpus", [2.0, 1.5, 0, -1, True, None, "2"])
def test_a_gpu_count_that_is_not_a_whole_number_of_at_least_one_is_refused_naming_it(gpus):
    """`split_model(config, 2.0)` failed with "can't multiply sequence by non-int of type 'float'" from inside."""
    with pytest.raises(InputError, match=rf"^num_gpus must be a whole number >= 1, got {re.escape(repr(gpus))}$"):
        split_model(ModelConfig(), gpus)


@pytest.mark.parametrize("layers, gpus", [(24, 1), (24, 3), (32, 4), (48, 8), (80, 8), (36, 5)])
def test_every_layer_placed_once(layers, gpus):
    config = ModelConfig(llm=dataclasses.replace(LLMConfig(), num_hidden_layers=layers))
    device_map = split_model(config, gpus)
    placed = [k for k in device_map if ".layers." in k]
    assert sorted(int(k.split(".")[-1]) for k in placed) == list(range(layers))
    assert device_map[f"language_model.model.layers.{layers - 1}"] == "cuda:0"


def test_more_gpus_than_layers_places_as_the_official_recipe_does_without_a_list_that_long():
    """`split_model(config, 10**9)` built a list of 10**9 layer counts. From num_layers + 1 GPUs on, the official
    recipe gives each GPU one layer and the GPUs past the layers none: the same map for any larger count."""
    config = ModelConfig(llm=dataclasses.replace(LLMConfig(), num_hidden_layers=4))
    assert layers_per_gpu(4, 10**9) == [1] * 5
    device_map = split_model(config, 10**9)
    assert device_map == split_model(config, 5)
    assert {f"language_model.model.layers.{i}": device_map[f"language_model.model.layers.{i}"] for i in range(4)} == {
        "language_model.model.layers.0": "cuda:0", "language_model.model.layers.1": "cuda:1",
        "language_model.model.layers.2": "cuda:2", "language_model.model.layers.3": "cuda:0"}


def test_longest_prefix_wins():
    device_map = {"language_model.model.layers.1": "cuda:1", "language_model.model.layers.10": "cuda:2"}
    default = torch.device("cuda:0")
    assert device_for("language_model.model.layers.10.mlp.up_proj.weight", device_map, default) == torch.device("cuda:2")
    assert device_for("language_model.model.layers.1.mlp.up_proj.weight", device_map, default) == torch.device("cuda:1")
    assert device_for("mlp1.0.weight", device_map, default) == default


def test_explicit_cpu_map_loads_and_runs(tmp_path, tiny):
    model = InternVL(tiny, image_token_id=299)
    model.init_weights()
    model.save_pretrained(tmp_path / "m")
    device_map = {name: "cpu" for name in split_model(tiny, 2)}
    loaded = InternVL.from_pretrained(tmp_path / "m", device_map=device_map, image_token_id=299)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_auto_without_gpus_is_a_clear_error(tmp_path, tiny):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    InternVL(tiny).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="needs CUDA devices"):
        InternVL.from_pretrained(tmp_path / "m", device_map="auto")


def test_the_empty_prefix_places_the_whole_model(tmp_path, tiny):
    assert device_for("mlp1.1.weight", {"": "cpu"}, torch.device("cuda:0")) == torch.device("cpu")
    assert device_for("mlp1.1.weight", {"": "cpu", "mlp1": "meta"}, torch.device("cuda:0")) == torch.device("meta")
    model = InternVL(tiny, image_token_id=299)
    model.init_weights()
    model.save_pretrained(tmp_path / "m")
    loaded = InternVL.from_pretrained(tmp_path / "m", device_map={"": "cpu"}, image_token_id=299)
    assert loaded.device == torch.device("cpu")


def test_a_device_map_naming_an_unusable_device_is_a_clear_error(tmp_path, tiny):
    InternVL(tiny).save_pretrained(tmp_path / "m")
    for device, message in [("bogus", "unknown device 'bogus'"), ("meta", "device 'meta' holds no data")]:
        with pytest.raises(InputError, match=message):
            InternVL.from_pretrained(tmp_path / "m", device_map={"": "cpu", "mlp1": device})


def test_a_gpu_index_without_cuda_says_there_is_no_cuda(tmp_path, tiny):
    """`device_map={"": 0}` said "unknown device 0" where CUDA is missing: a bare index is that CUDA GPU, and
    without CUDA the error says so, as `device="cuda"` does."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    InternVL(tiny).save_pretrained(tmp_path / "m")
    for placement in [dict(device_map={"": 0}), dict(device_map={"": "cpu", "mlp1": 1}), dict(device=0)]:
        with pytest.raises(InputError, match=r"^device 'cuda:\d' asked for, but this PyTorch sees no CUDA device$"):
            InternVL.from_pretrained(tmp_path / "m", **placement)
    for index in (-1, True):
        with pytest.raises(InputError, match=f"^unknown device {index}; use e.g. 'cpu', 'cuda' or 'cuda:1'$"):
            InternVL.from_pretrained(tmp_path / "m", device_map={"": index})


@pytest.mark.parametrize("prefix", ["vision_modle", "language_model.model.layers.99", "mlp"])
def test_a_device_map_prefix_that_names_no_module_is_refused(tmp_path, tiny, prefix):
    InternVL(tiny).save_pretrained(tmp_path / "m")
    with pytest.raises(InputError, match=f"device_map names '{prefix}', which is no module of this model .*"
                                         "device_map=\"auto\" places the model as it does$"):
        InternVL.from_pretrained(tmp_path / "m", device_map={"": "cpu", prefix: "cpu"})


@pytest.mark.parametrize("key", [0, None, ("mlp1",)])
def test_a_device_map_key_that_is_no_string_is_refused_by_name(tmp_path, tiny, key):
    """{0: "cuda:0"}, typed for {"": 0}, raised a TypeError from inside the package."""
    InternVL(tiny).save_pretrained(tmp_path / "m")
    with pytest.raises(InputError, match=rf"^device_map's keys must be module prefixes \(strings; \"\" for the whole "
                                         rf"model\), got {re.escape(repr(key))}$"):
        InternVL.from_pretrained(tmp_path / "m", device_map={"": "cpu", key: "cpu"})


def test_a_device_map_that_leaves_weights_unplaced_is_refused(tmp_path, tiny):
    InternVL(tiny).save_pretrained(tmp_path / "m")
    with pytest.raises(InputError, match=r'device_map gives no device for mlp1.0.weight, .*more\); add their modules, or ""'):
        InternVL.from_pretrained(tmp_path / "m", device_map={"vision_model": "cpu", "language_model": "cpu"})


@pytest.mark.parametrize("moved", ["language_model.lm_head", "language_model.model.norm", "mlp1",
                                   "language_model.model.embed_tokens", "vision_model.encoder.layers.1"])
def test_a_device_map_that_splits_what_sits_outside_the_decoder_layers_is_refused(tiny, moved):
    """Only decoder layers hop devices (the engine keeps its batch state beside the embeddings and the head, and
    the image features meet the embeddings outside the layers): the rest on two devices is refused up front."""
    with torch.device("meta"):
        keys = InternVL(tiny).state_dict()
    device_map = {"": "cuda:0", "language_model.model.layers.1": "cuda:1", moved: "cuda:1"}
    with pytest.raises(InputError, match=rf"device_map puts {moved}\S* on cuda:1 but .* on cuda:0; only the decoder"
                                         r" layers \(language_model.model.layers.N\) may go to other devices"):
        check_device_map(device_map, keys)
    check_device_map({"": "cuda:0", "language_model.model.layers.1": "cuda:1"}, keys)  # the layers alone may move
    check_device_map(split_model(tiny, 2), keys)


@pytest.mark.parametrize("part", ["mlp", "self_attn.q_proj", "post_attention_layernorm"])
def test_a_device_map_that_splits_a_decoder_layer_is_refused(tiny, part):
    """A layer moves its input to its first norm's device and no further: a map putting one of its modules on
    another device passed the check and failed in the first forward on a device mismatch."""
    with torch.device("meta"):
        keys = InternVL(tiny).state_dict()
    with pytest.raises(InputError, match=rf"^device_map puts language_model\.model\.layers\.1\.{re.escape(part)}\.\S+ "
                                         r"on cuda:1 but language_model\.model\.layers\.1\.\S+ on cuda:0; a decoder "
                                         r"layer goes to one device whole"):
        check_device_map({"": "cuda:0", f"language_model.model.layers.1.{part}": "cuda:1"}, keys)
    check_device_map({"": "cuda:0", "language_model.model.layers.1": "cuda:1",
                      f"language_model.model.layers.1.{part}": "cuda:1"}, keys)  # the same device: one layer


def test_cuda_without_an_index_is_the_current_gpu_in_a_device_map(tiny, monkeypatch):
    """"cuda" beside "cuda:0" is one device (the weights land on the current GPU): not refused as two."""
    import internvl_mpo.placement as placement

    monkeypatch.setattr(placement, "parse_device", torch.device)  # no GPU here: the names stand as given
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    device_map = resolve_device_map({"vision_model": "cuda", "mlp1": "cuda:0", "language_model": "cuda:0",
                                     "language_model.model.layers.1": "cuda:1"}, tiny)
    assert device_map["vision_model"] == "cuda:0"
    with torch.device("meta"):
        check_device_map(device_map, InternVL(tiny).state_dict())

"""Tiny configs, and transformers' InternVL as the independent reference implementation.

The reference model is built with random weights, its state dict is renamed to the official
InternVL keys (the rename rules of transformers' conversion script, run backwards) and written as
an official-layout checkpoint folder; our model then loads that folder through our own loader.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from internvl_mpo.config import LLMConfig, ModelConfig, VisionConfig

IMAGE_TOKEN_ID = 299  # the last id of the tiny vocabulary plays <IMG_CONTEXT>

# Every test starts from the same random state (torch, random, numpy), whatever ran before it: a test's draws do not
# change when tests are added, reordered or picked with -k, and Python's and numpy's generators (seeded from the OS
# at start-up) do not differ from run to run. INTERNVL_MPO_TEST_SEED=<n> runs the suite with other draws, to look for
# tests that pass only for lucky ones.
TEST_SEED = int(os.environ.get("INTERNVL_MPO_TEST_SEED", "0"))


def seed_everything(seed: int = TEST_SEED) -> None:
    import random

    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    seed_everything()  # before the item's fixtures are set up: a module-scoped one made for it draws the same numbers


@pytest.fixture(autouse=True)
def _seeded():
    seed_everything()  # again after the wider fixtures: the test's own draws do not depend on which of them it made


@pytest.fixture(scope="session", autouse=True)
def _matplotlib_folders_in_tmp(tmp_path_factory):
    """matplotlib writes its font cache and makes its config folder in the home folder on its first import: in the
    session's temporary folder instead, for this process and the commands it starts."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MPLCONFIGDIR", str(tmp_path_factory.mktemp("matplotlib")))
        yield


def tiny_config(**vision_changes) -> ModelConfig:
    vision = dataclasses.replace(
        VisionConfig(), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=56, **vision_changes,
    )
    llm = dataclasses.replace(
        LLMConfig(), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300,
    )
    return ModelConfig(vision=vision, llm=llm, force_image_size=56)


def hf_config(config: ModelConfig, image_token_id: int = IMAGE_TOKEN_ID):
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    v, l = config.vision, config.llm
    vision = InternVLVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        attention_bias=v.qkv_bias, use_qk_norm=v.qk_normalization, norm_type=v.norm_type,
        layer_norm_eps=v.layer_norm_eps, use_mean_pooling=True,
    )
    text = Qwen2Config(
        hidden_size=l.hidden_size, intermediate_size=l.intermediate_size, num_hidden_layers=l.num_hidden_layers,
        num_attention_heads=l.num_attention_heads, num_key_value_heads=l.num_key_value_heads,
        vocab_size=l.vocab_size, rms_norm_eps=l.rms_norm_eps, rope_theta=l.rope_theta,
        max_position_embeddings=l.max_position_embeddings, tie_word_embeddings=l.tie_word_embeddings,
    )
    return InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        image_seq_length=config.num_image_token, downsample_ratio=config.downsample_ratio,
        vision_feature_layer=config.select_layer, tie_word_embeddings=l.tie_word_embeddings,
    )


def hf_reference(config: ModelConfig, seed: int = 0, image_token_id: int = IMAGE_TOKEN_ID):
    """transformers' InternVLForConditionalGeneration with random, non-trivial weights (eager attention)."""
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(hf_config(config, image_token_id)).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lambda_1", "lambda_2")) or "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def hf_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename transformers' native InternVL keys to the official InternVL checkpoint keys."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        new = key
        if key == "lm_head.weight":
            new = "language_model.lm_head.weight"
        elif key.startswith("model.language_model."):
            new = "language_model.model." + key[len("model.language_model."):]
        elif key.startswith("model.multi_modal_projector."):
            new = key.replace("model.multi_modal_projector.", "mlp1.")
            new = new.replace("layer_norm", "0").replace("linear_1", "1").replace("linear_2", "3")
        elif key.startswith("model.vision_tower."):
            new = key.replace("model.vision_tower.", "vision_model.")
            new = new.replace("embeddings.cls_token", "embeddings.class_embedding")
            new = new.replace("embeddings.position_embeddings", "embeddings.position_embedding")
            new = new.replace("embeddings.patch_embeddings.projection", "embeddings.patch_embedding")
            new = new.replace("encoder.layer.", "encoder.layers.")
            new = new.replace("lambda_1", "ls1").replace("lambda_2", "ls2")
            new = new.replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
            new = new.replace("attention.projection_layer", "attn.proj").replace("attention.", "attn.")
            for proj in ("q_proj", "k_proj", "v_proj"):
                if f"attn.{proj}." in new:
                    prefix, kind = new.split(f"attn.{proj}.")
                    qkv.setdefault(f"{prefix}attn.qkv.{kind}", {})[proj] = value
                    new = None
                    break
        if new is not None:
            out[new] = value
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


def write_checkpoint(folder: Path, config: ModelConfig, state: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """Write config.json and safetensors in the official layout, sharded by hand when shards > 1."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    keys = sorted(state)
    if shards == 1:
        save_file({k: state[k].contiguous() for k in keys}, str(folder / "model.safetensors"))
        return folder
    mapping = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k].contiguous() for k in part}, str(folder / name))
        mapping.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": mapping})
    )
    return folder


def tiny_chat_folder(folder: Path, seed: int = 0, **vision_changes):
    """A tiny chat checkpoint: Qwen2-layout tokenizer files, config sized to them, random weights.

    Returns (folder, transformers reference model holding the same weights).
    """
    from internvl_mpo.chat.tokenizer import load_tokenizer
    from tokenizer_fixture import write_qwen2_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    write_qwen2_tokenizer(folder)
    tokenizer = load_tokenizer(folder)
    base = tiny_config(**vision_changes)
    config = base.replace(llm=dataclasses.replace(base.llm, vocab_size=len(tokenizer)))
    ref = hf_reference(config, seed=seed, image_token_id=tokenizer.img_context_id)
    write_checkpoint(folder, config, hf_to_official(ref.state_dict()))
    return folder, ref


@pytest.fixture
def tiny():
    return tiny_config()


@pytest.fixture
def umask_022():
    """The usual umask 022 for the test (restored after): files a plain open() creates get mode 0644."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """`fake_hub(answer)`: hub downloads go nowhere near the network; `snapshot_download` gives the folder
    `answer` (or raises it, an exception). Returns the list of repo ids it was asked for. The working folder
    is `tmp_path`, so no local folder is named like the id."""
    import huggingface_hub
    from huggingface_hub import constants as hub_constants

    def serve(answer: Path | BaseException) -> list[str]:
        asked = []

        def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False):
            asked.append(repo_id)
            if isinstance(answer, BaseException):
                raise answer
            return str(answer)

        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # the resolver's own probe fails at once
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        monkeypatch.chdir(tmp_path)
        return asked

    return serve


def bf16_shards_without_dtype(source: Path, folder: Path) -> Path:
    """The checkpoint at `source` saved again into `folder` in bf16 over several shards, its config.json without
    torch_dtype: a load with dtype "auto" then takes the dtype from the shards' headers."""
    from internvl_mpo.model import InternVL

    model = InternVL.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(folder, max_shard_size=20_000)
    settings = json.loads((model / "config.json").read_text())
    del settings["torch_dtype"]
    (model / "config.json").write_text(json.dumps(settings))
    return model


def record_header_reads(monkeypatch) -> list:
    """The weight files whose safetensors headers are read from now on (`checkpoint.open_safetensors`), in order."""
    from internvl_mpo import checkpoint

    opened, read = [], checkpoint.open_safetensors
    monkeypatch.setattr(checkpoint, "open_safetensors", lambda file: opened.append(file) or read(file))
    return opened


def check_resave_refuses_resume(run, model: Path, out: Path) -> None:
    """`run()` (a command writing into `out` with the model folder `model`, whose weights carry no save id, as
    official ones) records the weights' save id in out/settings.json: a model saved again into `model` is refused
    as other settings (weights), the same weights resume, and a settings file from before the id resumes."""
    import shutil

    from internvl_mpo import InternVL
    from internvl_mpo.errors import ConfigError

    assert run() == 0
    assert list(json.loads((out / "settings.json").read_text())["weights"]) == ["model.safetensors"]  # no save id
    InternVL.from_pretrained(model).save_pretrained(model)
    with pytest.raises(ConfigError, match=r"holds a run with other settings \(weights\)"):
        run()
    shutil.rmtree(out)
    assert run() == 0
    settings = json.loads((out / "settings.json").read_text())
    assert len(settings["weights"]) == 32
    assert run() == 0  # the same weights resume
    del settings["weights"]  # recorded before the save id was: nothing to compare
    (out / "settings.json").write_text(json.dumps(settings))
    InternVL.from_pretrained(model).save_pretrained(model)
    assert run() == 0


def official_shards(folder: Path) -> Path:
    """The checkpoint at `folder` (its weights written without a save id, as official ones are) rewritten in place
    as two shards and an index."""
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    return write_checkpoint(folder, ModelConfig.from_json(folder / "config.json"), state, shards=2)


def replace_shard(file: Path) -> None:
    """Other weights in place of the shard `file` (same tensors and shapes, halved), without a save id."""
    from safetensors.torch import load_file, save_file

    save_file({key: value * 0.5 for key, value in load_file(file).items()}, str(file))


def check_replaced_weights_refuse_resume(run, model: Path, settings: Path, refused: str) -> None:
    """`run()` (a command with its settings in `settings`) on `model`, two shards without a save id (`official_shards`),
    records their stamps: an unchanged resume reads none of them, the folder copied back with other times resumes, a
    shard replaced by other weights is refused (`refused`: the message up to the settings), naming it, and settings
    of 2026-12-04, which held null for weights without a save id, resume under any weights."""
    import shutil

    from internvl_mpo import filestamp
    from internvl_mpo.errors import ConfigError

    assert run() == 0
    recorded = json.loads(settings.read_text())
    assert sorted(recorded["weights"]) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    filestamp._hash.cache_clear()
    assert run() == 0
    assert filestamp._hash.cache_info().misses == 0  # an unchanged resume hashes no weight file
    copy = shutil.copytree(model, model.with_name(model.name + "-copy"))
    shutil.rmtree(model)
    shutil.copytree(copy, model, copy_function=shutil.copy)
    for file in model.glob("*.safetensors"):
        os.utime(file, ns=(10**18, 10**18))
    assert run() == 0
    replace_shard(model / "model-00002-of-00002.safetensors")
    with pytest.raises(ConfigError, match=refused + r" other settings \(weights: the model's "
                                          r"model-00002-of-00002.safetensors is not what the run read\)"):
        run()
    settings.write_text(json.dumps({**recorded, "weights": None}))
    assert run() == 0


def modes_other_than(folder: Path, mode: int) -> dict[str, str]:
    """Files under `folder` whose permission bits are not `mode` (relative path -> octal mode)."""
    return {p.relative_to(folder).as_posix(): oct(p.stat().st_mode & 0o777)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.stat().st_mode & 0o777 != mode}


@pytest.fixture
def reference_pair(tmp_path):
    """(transformers model, our model loaded from an official-layout folder written from it)."""
    from internvl_mpo.model import InternVL

    def make(config: ModelConfig, shards: int = 2):
        ref = hf_reference(config)
        folder = write_checkpoint(tmp_path / "ckpt", config, hf_to_official(ref.state_dict()), shards=shards)
        ours = InternVL.from_pretrained(folder, dtype=torch.float32, image_token_id=IMAGE_TOKEN_ID)
        return ref, ours

    return make


class ScriptedEngine:
    """An engine whose every request produces `tokens` (then finishes for length)."""

    def __init__(self, tokens):
        self.tokens = tokens

    def generate(self, requests):
        from internvl_mpo.generate.engine import Event

        tokens, finished = self.tokens, set()

        class Generation:  # the engine's Generation as its callers use it: truth, step, iteration, finish
            steps = 0

            def __bool__(self):
                return self.steps < len(tokens) and len(finished) < len(requests)

            def step(self):
                i, self.steps = self.steps, self.steps + 1
                return [Event(rid, tokens[i], "length" if i == len(tokens) - 1 else None)
                        for rid in range(len(requests)) if rid not in finished]

            def __iter__(self):
                while self:
                    yield self.step()

            def finish(self, rid):
                finished.add(rid)

        return Generation()


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a server subprocess: SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def refuse_reading(monkeypatch, path: Path) -> None:
    """`path.read_bytes()` raises PermissionError, as for a file without read permission (tests run as root)."""
    real = Path.read_bytes

    def refusing(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", refusing)


def cli(*args, stdin=None, cwd=None):
    """The command line run in a subprocess: `python -m internvl_mpo.cli ARGS` (text out, 120 s at most)."""
    return subprocess.run([sys.executable, "-m", "internvl_mpo.cli", *map(str, args)], capture_output=True,
                          text=True, input=stdin, timeout=120, cwd=cwd)


# ---- constrained decoding: automata (regex, grammar) walked byte by byte, answers of a batch, masks against the
# token-by-token oracle

def after(automaton, state, data: bytes):
    """The state of `automaton` after `data` from `state`, or None."""
    from internvl_mpo.generate.json_mode import advance_bytes

    return advance_bytes(state, data, advance=automaton.advance)


def states(automaton, data: bytes):
    """The states after each byte of `data` (None from the first refused one on)."""
    state, found = automaton.initial, []
    for byte in data:
        state = None if state is None else automaton.advance(state, byte)
        found.append(state)
    return found


def engine_answers(chat, requests) -> list[tuple[list[int], str]]:
    """(tokens, finish) of each request, run in one batch by the chat's engine."""
    out = [([], None) for _ in requests]
    for events in chat.engine.generate(requests):
        for event in events:
            out[event.rid][0].append(event.token)
            if event.finish:
                out[event.rid] = (out[event.rid][0], event.finish)
    return out


def assert_automaton_masks(tokenizer, extra: list, compile_text, cases, what: str) -> None:
    """automaton_mask over the tokenizer's pieces and `extra` ones (plus 3 ids past them) equals the token-by-token
    oracle, fresh and cached, on every state that the texts of `cases` ((source, texts): compile_text(source) takes
    the texts) pass through; then an AutomatonConstraint of compile_text(a source taking "ab" alone) allows a stop id
    only once its text is accepted and refuses a token past it ("does not continue the `what`")."""
    import numpy

    from internvl_mpo.generate.automaton import AutomatonConstraint, automaton_mask
    from internvl_mpo.generate.json_mode import JsonVocabulary

    pieces = [None if tokenizer.is_special(i) else tokenizer.token_bytes(i) for i in range(len(tokenizer))] + extra
    vocabulary = JsonVocabulary(pieces, len(pieces) + 3)
    for source, texts in cases:
        automaton = compile_text(source)
        seen = {automaton.initial}
        for text in texts:
            seen.update(states(automaton, text.encode()))
        for state in seen:
            expected = numpy.array([bool(piece) and after(automaton, state, piece) is not None for piece in pieces]
                                   + [False] * 3)
            assert (automaton_mask(vocabulary, automaton, state) == expected).all(), (source, state)
            assert (automaton_mask(vocabulary, automaton, state) == expected).all(), (source, state)  # cached
    done = AutomatonConstraint(vocabulary, compile_text("ab" if what == "regex" else 'root ::= "a" "b"'))
    done.advance(pieces.index(b"a"))
    assert not done.complete and not done.allowed([5])[5]  # a stop id only where the text is accepted
    done.advance(pieces.index(b"b"))
    assert done.complete and numpy.flatnonzero(done.allowed([5])).tolist() == [5]
    with pytest.raises(ValueError, match=f"does not continue the {what}"):
        done.advance(pieces.index(b"a"))

"""The training loop (train/mpo.py and the parts it runs: settings.py, policy.py, stream.py, reference.py,
resume.py), checkpoints (train/checkpointing.py), LoRA (train/lora.py), the CLI.

Everything runs on the tiny chat checkpoint of conftest.py with a tiny generated MMPR set (small PNGs).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import ANY

import pytest
import torch
from safetensors.torch import load_file
from conftest import bf16_shards_without_dtype, record_header_reads, refuse_reading
from test_train_data import color_pairs, write_mmpr, write_noise_images

from internvl_mpo.chat.tokenizer import load_tokenizer
from internvl_mpo.config import ModelConfig
from internvl_mpo.errors import CheckpointError, ConfigError, InputError, TrainingError
from internvl_mpo.locks import TRAIN_LOCK
from internvl_mpo.model import InternVL
from internvl_mpo.processor.image import load_image
from internvl_mpo.train import checkpointing as ckpt
from internvl_mpo.train import mpo
from internvl_mpo.train import stream as sample_stream
from internvl_mpo.train.data import BadExample, MediaSettings, PairDataset, collate_pairs
from internvl_mpo.train.distributed import DistEnv
from internvl_mpo.train.lora import apply_lora, lora_target_names
from internvl_mpo.train.losses import MPOWeights, RunningMean, mpo_loss, sft_nll
from internvl_mpo.train.mmpr import SkipReport, load_meta, read_datasets
from internvl_mpo.train.mpo import train
from internvl_mpo.train.policy import SequenceLogps, build_optimizer, set_drop_path
from internvl_mpo.train.resume import check_resume_settings, official_state
from internvl_mpo.train.settings import TrainConfig, max_seq_length
from internvl_mpo.train.stopping import Stopped
from internvl_mpo.train.stream import SampleStream, build_dataset

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    from conftest import tiny_chat_folder

    folder, _ = tiny_chat_folder(tmp_path_factory.mktemp("tiny") / "model")
    return folder


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    return write_mmpr(tmp_path_factory.mktemp("mmpr"), color_pairs(8, text_only=2))


@pytest.fixture(scope="module")
def noisy_metas(tmp_path_factory) -> tuple[Path, Path]:
    """The `meta` records over noise pictures (which JPEG always changes): (data_augment true, false)."""
    root = tmp_path_factory.mktemp("noisy")
    augmented = write_mmpr(root, color_pairs(8, text_only=2), data_augment=True)
    write_noise_images(root / "images")
    plain = json.loads(augmented.read_text())
    plain["toy"]["data_augment"] = False
    (root / "plain.json").write_text(json.dumps(plain))
    return augmented, root / "plain.json"


def config(chat_folder, meta, output, **changes) -> TrainConfig:
    base = TrainConfig(
        model=str(chat_folder), data=str(meta), output=str(output), max_steps=2, batch_size=2, lr=1e-3,
        warmup_ratio=0.0, drop_path_rate=0.0, grad_checkpointing=False, progress=False,
    )
    return dataclasses.replace(base, **changes)


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    return InternVL.from_pretrained(folder, dtype=torch.float32).state_dict()


def strict_json(text: str):
    """json.loads as strict readers (jq, JavaScript, Go) parse: NaN and Infinity are not JSON."""

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def metric_rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def pair_batch(chat_folder, meta):
    tokenizer = load_tokenizer(chat_folder)
    model = InternVL.from_pretrained(chat_folder, dtype=torch.float32)
    records, _ = read_datasets(load_meta(str(meta)))
    dataset = PairDataset(records, tokenizer, MediaSettings.from_model_config(model.config), 4096)
    picks = [i for i in range(len(dataset)) if dataset.records[i].images][:2]
    picks += [i for i in range(len(dataset)) if not dataset.records[i].images][:1]
    return model, collate_pairs([dataset[i] for i in picks], tokenizer.pad_id)


# ----------------------------------------------------------------------------- forward


def plain_logps(model: InternVL, ids: torch.Tensor, labels: torch.Tensor, pixel_values) -> tuple[torch.Tensor, int]:
    """Two-pass reference: the model's full logits, log-softmax, gather the next label, sum."""
    logits = model(ids[None], pixel_values=pixel_values if pixel_values.shape[0] else None)[0]
    logp = torch.log_softmax(logits.float(), dim=-1)[:-1]
    target = labels[1:]
    keep = target != -100
    return logp[keep].gather(1, target[keep, None]).sum(), int(keep.sum())


def test_one_encoding_per_pair_equals_two_passes(chat_folder, meta):
    model, batch = pair_batch(chat_folder, meta)
    b = batch.num_samples
    ref_chosen = torch.randn(b) - 30
    ref_rejected = torch.randn(b) - 30
    weights = MPOWeights()

    logps, n_tokens = SequenceLogps(model)(batch.input_ids, batch.labels, batch.pixel_values, True)
    ours, _ = mpo_loss(logps[:b], logps[b:], ref_chosen, ref_rejected, sft_nll(logps[:b], n_tokens[:b]), weights,
                       RunningMean())
    ours.backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    tiles = torch.split(batch.pixel_values, batch.num_tiles.tolist())
    chosen, rejected, n_chosen = [], [], 0
    for i in range(b):
        for row, out in ((i, chosen), (b + i, rejected)):
            n = int(batch.attention_mask[row].sum())
            value, count = plain_logps(model, batch.input_ids[row, :n], batch.labels[row, :n], tiles[i])
            out.append(value)
            n_chosen += count if row < b else 0
    chosen, rejected = torch.stack(chosen), torch.stack(rejected)
    nll = -chosen.sum() / n_chosen
    plain, _ = mpo_loss(chosen, rejected, ref_chosen, ref_rejected, nll, weights, RunningMean())
    plain.backward()

    torch.testing.assert_close(logps[:b].detach(), chosen.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.detach(), plain.detach(), rtol=1e-5, atol=1e-5)
    assert batch.pixel_values.shape[0] > 0 and ours_grads["vision_model.embeddings.patch_embedding.weight"].abs().sum() > 0
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- learning


def reward_stats(policy: InternVL, reference: InternVL, batch, beta: float = 0.1) -> tuple[float, float, float]:
    """(reward accuracy, reward margin, policy's own chosen-minus-rejected log-prob margin)."""
    b = batch.num_samples
    with torch.no_grad():
        pol, _ = SequenceLogps(policy.eval())(batch.input_ids, batch.labels, batch.pixel_values, True)
        ref, _ = SequenceLogps(reference.eval())(batch.input_ids, batch.labels, batch.pixel_values, True)
    chosen, rejected = beta * (pol[:b] - ref[:b]), beta * (pol[b:] - ref[b:])
    return float((chosen > rejected).float().mean()), float((chosen - rejected).mean()), float((pol[:b] - pol[b:]).mean())


def test_training_raises_reward_accuracy_and_margin(tmp_path, chat_folder, meta):
    tokenizer = load_tokenizer(chat_folder)
    initial = InternVL.from_pretrained(chat_folder, dtype=torch.float32)
    records, _ = read_datasets(load_meta(str(meta)))
    dataset = PairDataset(records, tokenizer, MediaSettings.from_model_config(initial.config), 4096)
    batch = collate_pairs([dataset[i] for i in range(len(dataset))], tokenizer.pad_id)
    acc0, margin0, own0 = reward_stats(initial, initial, batch)

    result = train(config(chat_folder, meta, tmp_path / "run", max_steps=30, batch_size=5, lr=2e-3))
    trained = InternVL.from_pretrained(result.final_dir, dtype=torch.float32)
    acc1, margin1, own1 = reward_stats(trained, initial, batch)
    assert (acc0, margin0) == (0.0, 0.0)  # policy == reference before training
    assert acc1 >= 0.9 and margin1 > 0.5
    assert own1 > own0 + 5.0
    rows = metric_rows(tmp_path / "run")
    assert len(rows) == 30 and rows[-1]["loss"] < rows[0]["loss"]
    for key in ("loss/pref", "loss/quality", "nll", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "delta", "grad_norm", "lr", "tokens_per_s"):
        assert key in rows[0]


# ----------------------------------------------------------------------------- checkpoints


CHILD = """
import sys, time, torch
sys.path[:0] = [{src!r}]
torch.set_num_threads({threads})
from internvl_mpo.train.mpo import TrainConfig, train  # a user's script: the import CHANGELOG.md keeps working
cfg = TrainConfig(**{cfg!r})
def hang_after_third(step, metrics):
    if step == 3:
        time.sleep(600)
train(cfg, on_step=hang_after_third)
"""


def test_resume_after_sigkill_is_exact(tmp_path, chat_folder, meta):
    common = {"max_steps": 6, "save_every": 3, "batch_size": 3, "drop_path_rate": 0.1, "grad_checkpointing": True,
              "lr": 1e-3, "warmup_ratio": 0.2}
    straight = train(config(chat_folder, meta, tmp_path / "straight", **common))

    killed = config(chat_folder, meta, tmp_path / "killed", **common)
    script = CHILD.format(src=str(SRC), threads=torch.get_num_threads(), cfg=dataclasses.asdict(killed))
    child = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
    marker = tmp_path / "killed" / "checkpoint-000003" / ckpt.STATE_FILE
    deadline = time.time() + 120
    while not marker.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the child never wrote its step-3 checkpoint"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    # A save that died halfway: a partial temp folder and a folder without its state file.
    partial = tmp_path / "killed" / ".tmp-checkpoint-000006"
    (partial / "model").mkdir(parents=True)
    (partial / "optimizer.safetensors").write_bytes(b"\x00" * 10)
    (tmp_path / "killed" / "checkpoint-000009").mkdir()
    assert ckpt.latest_checkpoint(tmp_path / "killed") == tmp_path / "killed" / "checkpoint-000003"

    trained = []
    resumed = train(dataclasses.replace(killed, resume=True), on_step=lambda step, _: trained.append(step))
    assert trained == [4, 5, 6]  # a run from the start would give the same weights
    a, b = load_weights(straight.final_dir), load_weights(resumed.final_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["loss"] for r in metric_rows(tmp_path / "straight")] == [r["loss"] for r in metric_rows(tmp_path / "killed")]
    for name in ("optimizer.safetensors", "rank0.safetensors"):
        first = load_file(tmp_path / "straight" / "checkpoint-000006" / name)
        second = load_file(tmp_path / "killed" / "checkpoint-000006" / name)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


CHILD_MID_ACCUMULATION = """
import sys, time, torch
sys.path[:0] = [{src!r}]
torch.set_num_threads({threads})
from internvl_mpo.train import mpo
from internvl_mpo.train.settings import TrainConfig
calls = 0
loss = mpo.micro_batch_loss
def hang_in_step_3s_second_micro_batch(*args):
    global calls
    calls += 1
    if calls == 6:
        open("hanging", "w").close()
        time.sleep(600)
    return loss(*args)
mpo.micro_batch_loss = hang_in_step_3s_second_micro_batch
mpo.train(TrainConfig(**{cfg!r}))
"""


def test_lora_resume_after_a_kill_mid_accumulation_and_after_the_last_step_is_exact(tmp_path, chat_folder, meta):
    """LoRA adapters come back from extra.safetensors and their base weights from --model; a kill inside a step's
    accumulation redoes that step from the last checkpoint; a checkpoint of the last step only writes final/."""
    common = {"max_steps": 4, "save_every": 2, "batch_size": 1, "grad_accum": 2, "drop_path_rate": 0.1,
              "lora_rank": 2, "lora_vision": True, "quality_weight": 0.2}
    straight = train(config(chat_folder, meta, tmp_path / "straight", **common))

    killed = config(chat_folder, meta, tmp_path / "killed", **common)
    script = CHILD_MID_ACCUMULATION.format(src=str(SRC), threads=torch.get_num_threads(), cfg=dataclasses.asdict(killed))
    child = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
    deadline = time.time() + 120
    while not (tmp_path / "hanging").exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "hanging").exists(), "the child never reached the third step's second micro-batch"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert ckpt.latest_checkpoint(tmp_path / "killed").name == "checkpoint-000002"
    trained = []
    resumed = train(dataclasses.replace(killed, resume=True), on_step=lambda step, _: trained.append(step))
    assert trained == [3, 4]  # a run from the start would give the same weights
    finals = {"resumed": load_weights(resumed.final_dir)}  # read before the run below writes final/ again
    shutil.rmtree(tmp_path / "killed" / "final")
    after_the_last = train(dataclasses.replace(killed, resume=True),  # from checkpoint-000004: no step to train
                           on_step=lambda step, _: trained.append(step))
    assert trained == [3, 4]
    finals["resumed after the last step"] = load_weights(after_the_last.final_dir)

    expected = load_weights(straight.final_dir)
    for label, got in finals.items():
        # what differs, and each run's losses by step (the child's for steps 1-2), should this ever fail again: it
        # failed twice in long full runs (once under pytest-xdist) and never alone
        differ = {k: float((expected[k] - got[k]).abs().max())
                  for k in expected if not torch.equal(expected[k], got[k])}
        assert not differ, (label, len(differ), sorted(differ.items(), key=lambda kv: -kv[1])[:5],
                            [row["loss"] for row in metric_rows(tmp_path / "straight")],
                            [row["loss"] for row in metric_rows(tmp_path / "killed")])
    assert metric_rows(tmp_path / "killed") == [{**r, "tokens_per_s": ANY, "step_time_s": ANY}
                                                for r in metric_rows(tmp_path / "straight")]
    for name in ("optimizer.safetensors", "extra.safetensors", "rank0.safetensors"):
        first = load_file(tmp_path / "straight" / "checkpoint-000004" / name)
        second = load_file(tmp_path / "killed" / "checkpoint-000004" / name)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


CHILD_SIGTERM = """
import pathlib, sys, time, torch
sys.path[:0] = [{src!r}]
torch.set_num_threads({threads})
from internvl_mpo.cli import main
from internvl_mpo.train import mpo
calls = 0
loss = mpo.micro_batch_loss
def wait_for_sigterm_in_step_3(*args):
    global calls
    calls += 1
    if calls == 5:  # step 3's first micro-batch: its second one is still to come when SIGTERM lands
        pathlib.Path("in_step_3").touch()
        deadline = time.time() + 60
        while not pathlib.Path("sent").exists() and time.time() < deadline:
            time.sleep(0.01)
    return loss(*args)
mpo.micro_batch_loss = wait_for_sigterm_in_step_3
sys.exit(main({argv!r}))
"""


def test_sigterm_mid_step_saves_that_step_and_exits_143_and_resume_is_exact(tmp_path, chat_folder, meta):
    """SIGTERM to the command's process group (the loader worker too, as SLURM sends it) within step 3 of 4: the step
    ends, its checkpoint is written (without --save-every too), one line says so and the exit code is 143; a resume
    gives the uninterrupted run's weights and optimizer state, bit for bit."""
    common = {"max_steps": 4, "save_every": 2, "batch_size": 1, "grad_accum": 2, "drop_path_rate": 0.1,
              "warmup_ratio": 0.2}
    straight = train(config(chat_folder, meta, tmp_path / "straight", **common))

    out = tmp_path / "stopped"
    argv = ["train", "mpo", "--model", str(chat_folder), "--data", str(meta), "--output", str(out), "--max-steps", "4",
            "--batch-size", "1", "--grad-accum", "2", "--lr", "1e-3", "--warmup-ratio", "0.2",
            "--no-grad-checkpointing", "--no-progress", "--num-workers", "1"]
    script = CHILD_SIGTERM.format(src=str(SRC), threads=torch.get_num_threads(), argv=argv)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (tmp_path / "in_step_3").exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert (tmp_path / "in_step_3").exists(), "the child never reached step 3"
    assert len(metric_rows(out)) == 2
    os.killpg(child.pid, signal.SIGTERM)
    (tmp_path / "sent").touch()
    _, err = child.communicate(timeout=120)
    assert child.returncode == 143, err
    saved = out / "checkpoint-000003"
    assert err.splitlines() == [f"internvl-mpo train: stopped by SIGTERM after step 3; checkpoint saved to {saved}; "
                                "run the same command with --resume to go on"]  # no traceback, no leaked semaphores
    assert ckpt.latest_checkpoint(out) == saved and len(metric_rows(out)) == 3

    trained = []  # with --save-every 2 (free to change on a resume): checkpoint-000004 to compare
    resumed = train(config(chat_folder, meta, out, **common, resume=True), on_step=lambda step, _: trained.append(step))
    assert trained == [4]
    expected, got = load_weights(straight.final_dir), load_weights(resumed.final_dir)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    whole = straight.final_dir.parent
    assert metric_rows(out) == [{**r, "tokens_per_s": ANY, "step_time_s": ANY} for r in metric_rows(whole)]
    for name in ("optimizer.safetensors", "rank0.safetensors"):
        first = load_file(whole / "checkpoint-000004" / name)
        second = load_file(out / "checkpoint-000004" / name)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture
def sigterm_handler():
    """A SIGTERM handler of the test's own in place of the default, which would end pytest; it records the signals
    that reach it (none should: train() takes SIGTERM while it runs, and puts this handler back)."""
    reached = []

    def record(signum, frame):
        reached.append(signum)

    previous = signal.signal(signal.SIGTERM, record)
    yield record, reached
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("save_every", [2, 0])
def test_ctrl_c_names_the_checkpoint_a_resume_goes_on_from(tmp_path, chat_folder, meta, monkeypatch, capsys,
                                                          save_every):
    """Ctrl-C (which stops at once, without a save) ended train without a word: it names the last checkpoint,
    or says there is none, and that --resume goes on."""
    from internvl_mpo.cli import main

    loss, calls = mpo.micro_batch_loss, []

    def ctrl_c_in_step_3(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return loss(*args)

    monkeypatch.setattr(mpo, "micro_batch_loss", ctrl_c_in_step_3)
    out = tmp_path / "run"
    assert main(["train", "mpo", "--model", str(chat_folder), "--data", str(meta), "--output", str(out),
                 "--max-steps", "4", "--save-every", str(save_every), "--batch-size", "1", "--no-progress"]) == 130
    kept = (f"the steps after {out / 'checkpoint-000002'} were not saved: run the same command with --resume "
            "to go on from it") if save_every else \
        "no checkpoint was saved: run the same command with --resume to start over"
    assert capsys.readouterr().err == f"internvl-mpo train: interrupted by Ctrl-C; {kept}\n"


def test_sigterm_after_a_save_every_checkpoint_writes_no_second_one_and_keeps_the_save_limit(
        tmp_path, chat_folder, meta, monkeypatch, sigterm_handler):
    import multiprocessing

    handler, reached = sigterm_handler
    saves = []
    save = mpo.save_checkpoint
    monkeypatch.setattr(mpo, "save_checkpoint", lambda *args: saves.append(args[2]) or save(*args))

    def sigterm_at(step):
        return lambda done, _: done == step and os.kill(os.getpid(), signal.SIGTERM)

    cfg = config(chat_folder, meta, tmp_path / "run", max_steps=6, save_every=2, save_total_limit=1, num_workers=1)
    children = multiprocessing.active_children()
    with pytest.raises(Stopped, match=r"^stopped by SIGTERM after step 2; checkpoint saved to .*checkpoint-000002;"
                                      r" run the same command with --resume to go on$") as stopped:
        train(cfg, on_step=sigterm_at(2))
    assert stopped.value.step == 2 and stopped.value.checkpoint == tmp_path / "run" / "checkpoint-000002"
    assert saves == [2]  # the --save-every checkpoint of that step, not a second one
    assert multiprocessing.active_children() == children  # the loader's worker ended with the run
    assert signal.getsignal(signal.SIGTERM) is handler

    with pytest.raises(Stopped, match="after step 3"):
        train(dataclasses.replace(cfg, resume=True, num_workers=0), on_step=sigterm_at(3))
    assert saves == [2, 3]
    assert ckpt.checkpoints(tmp_path / "run") == [tmp_path / "run" / "checkpoint-000003"]  # --save-total-limit 1
    assert signal.getsignal(signal.SIGTERM) is handler and reached == []


def test_sigterm_in_the_last_step_lets_the_run_write_final_and_end_as_usual(tmp_path, chat_folder, meta,
                                                                           sigterm_handler):
    handler, reached = sigterm_handler
    result = train(config(chat_folder, meta, tmp_path / "run", save_every=1),
                   on_step=lambda done, _: done == 2 and os.kill(os.getpid(), signal.SIGTERM))
    assert result.steps == 2 and (result.final_dir / "config.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is handler and reached == []


@pytest.mark.parametrize("stage", ["data", "precompute_ref"])
def test_sigterm_before_the_first_step_stops_with_nothing_saved(tmp_path, chat_folder, meta, monkeypatch, stage,
                                                               sigterm_handler):
    """While the data is read, or during the --precompute-ref pass (after its first batch): the run stops there."""
    from internvl_mpo.train import reference

    handler, reached = sigterm_handler
    module, name = (mpo, "build_dataset") if stage == "data" else (reference, "collate_pairs")
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args: os.kill(os.getpid(), signal.SIGTERM) or original(*args))
    cfg = config(chat_folder, meta, tmp_path / "run", save_every=1, batch_size=1, precompute_ref=True)
    with pytest.raises(Stopped, match="^stopped by SIGTERM before training started; nothing was trained or saved$"):
        train(cfg)
    assert [p.name for p in (tmp_path / "run").glob("*") if p.name != TRAIN_LOCK[0]] == []
    assert signal.getsignal(signal.SIGTERM) is handler and reached == []


def test_rng_states_hold_the_cuda_generator_where_the_run_used_cuda_and_restore_what_is_there(tmp_path, monkeypatch):
    """No GPU here: torch.cuda's get/set_rng_state stand in for the device. A CUDA run saves its CUDA state and
    a CUDA resume restores it; a CPU run saves none, and a CUDA resume of its checkpoint (or a CPU resume of
    a CUDA one) restores the states that exist (torch CPU, numpy, python) and leaves the rest alone."""
    import random

    import numpy as np

    cuda_state, restored = torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")

    def saved(device):  # through the files a checkpoint keeps
        tensors, meta = ckpt.rng_state(device)
        ckpt.write_tensors(tmp_path / "rank0.safetensors", tensors)
        return ckpt.read_tensors(tmp_path / "rank0.safetensors"), json.loads(json.dumps(meta))

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    on_cuda, on_cpu = saved(cuda), saved(cpu)
    assert torch.equal(on_cuda[0]["torch_cuda"], cuda_state) and "torch_cuda" not in on_cpu[0]
    expected = draws()
    for states, device, restores_cuda in [(on_cuda, cuda, True), (on_cuda, cpu, False), (on_cpu, cuda, False),
                                          (on_cpu, cpu, False)]:
        restored.clear()
        ckpt.set_rng_state(*states, device)
        assert draws() == expected
        assert len(restored) == restores_cuda and all(torch.equal(s, cuda_state) and d == cuda for s, d in restored)


def test_checkpoints_save_where_folders_cannot_be_fsynced(tmp_path, chat_folder, meta, monkeypatch):
    """CIFS/SMB, sshfs and some Ceph volumes refuse fsync on a folder (EINVAL): the first checkpoint stopped
    the run with an OSError. A file's fsync error still stops it, as a SaveError naming the folder."""
    import errno
    import stat

    real_fsync = os.fsync
    failing = {"folders": errno.EINVAL, "files": None}

    def fsync(fd):
        kind = "folders" if stat.S_ISDIR(os.fstat(fd).st_mode) else "files"
        if failing[kind] is not None:
            raise OSError(failing[kind], os.strerror(failing[kind]))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    train(config(chat_folder, meta, tmp_path / "run", max_steps=1, save_every=1))
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "checkpoint-000001"
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    failing["files"] = errno.EIO  # one line naming the folder (it was a traceback), and no temporary folder left
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'other'}: saving failed ([Errno 5] Input/output")):
        ckpt.atomic_folder(tmp_path / "other", lambda folder: (folder / "a.json").write_text("{}"))
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_model_folder_without_tokenizer_files_trains_with_tokenizer_and_final_gets_its_files(
        tmp_path, chat_folder, meta):
    """--model holding only config.json and the weights, --tokenizer the tokenizer files: the model took its
    <IMG_CONTEXT> id from the model folder (none), so the first image stopped the run ("this model has no
    image_token_id"); and final/ took the tokenizer files of --model, not those the run used."""
    model, tokenizer = tmp_path / "weights", tmp_path / "tokenizer"
    model.mkdir()
    tokenizer.mkdir()
    for path in chat_folder.iterdir():
        shutil.copy(path, (model if path.name in ("config.json", "model.safetensors") else tokenizer) / path.name)
    result = train(config(model, meta, tmp_path / "run", max_steps=1, tokenizer=str(tokenizer)))
    names = sorted(p.name for p in tokenizer.iterdir())
    assert set(names) <= {p.name for p in result.final_dir.iterdir()}
    for name in names:
        assert (result.final_dir / name).read_bytes() == (tokenizer / name).read_bytes(), name
    from internvl_mpo.pipeline import InternVLChat

    bot = InternVLChat.from_pretrained(result.final_dir)
    assert bot.model.image_token_id == load_tokenizer(tokenizer).img_context_id is not None


def test_a_full_disk_while_saving_is_one_line_and_leaves_no_temporary_folder(tmp_path, chat_folder, meta, monkeypatch):
    """safetensors reports a full disk as a SafetensorError: a checkpoint or final/ save stopped the run with
    its traceback and left the half-written .tmp-* folder on the full disk; it is one line naming the folder
    and the cause, the temporary folder is removed, and a final/ already there stays as it was."""
    from safetensors import SafetensorError

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    from internvl_mpo import checkpoint

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_tensors", disk_full)  # the weights, in the checkpoint's model/
        with pytest.raises(CheckpointError, match=re.escape(f"{run / 'checkpoint-000001'}: saving failed (Error while "
                                                            "serializing: I/O error: No space left on device")):
            train(config(chat_folder, meta, run, max_steps=1, save_every=1))
    assert sorted(p.name for p in run.iterdir()) == [TRAIN_LOCK[0], "metrics.jsonl"]
    with monkeypatch.context() as m:
        m.setattr(ckpt, "write_tensors", disk_full)  # the optimizer state
        with pytest.raises(CheckpointError, match=re.escape(f"{run / 'checkpoint-000001'}: saving failed (Error")):
            train(config(chat_folder, meta, run, max_steps=1, save_every=1, resume=True))
    assert sorted(p.name for p in run.iterdir()) == [TRAIN_LOCK[0], "metrics.jsonl"]
    write_tensors = ckpt.write_tensors

    def rank_files_full(path, tensors):  # the process's RNG states, written after the model: its copy stayed
        return disk_full() if path.name.startswith("rank") else write_tensors(path, tensors)

    with monkeypatch.context() as m:
        m.setattr(ckpt, "write_tensors", rank_files_full)
        with pytest.raises(CheckpointError, match=re.escape(f"{run / 'checkpoint-000001'}: saving failed (Error")):
            train(config(chat_folder, meta, run, max_steps=1, save_every=1, resume=True))
    assert sorted(p.name for p in run.iterdir()) == [TRAIN_LOCK[0], "metrics.jsonl"]
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")

    def half_written(folder):
        (folder / "model.safetensors").write_bytes(b"part")
        disk_full()

    with pytest.raises(CheckpointError, match=re.escape(f"{run / 'final'}: saving failed")):
        ckpt.atomic_folder(run / "final", half_written)
    assert not list(run.glob(".tmp-*")) and [p.name for p in (run / "final").iterdir()] == ["config.json"]


def test_a_file_in_the_way_of_a_checkpoint_is_one_line(tmp_path, chat_folder, meta):
    """A file named as the checkpoint folder: the save moved it aside, published the checkpoint, then stopped
    the run with rmtree's NotADirectoryError traceback and left the file as .tmp-checkpoint-000001.old."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-000001").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=re.escape(f"{run / 'checkpoint-000001'}: saving failed (a file, not a"
                                                        " folder, is in the way); nothing there was replaced")):
        train(config(chat_folder, meta, run, max_steps=1, save_every=1))
    assert sorted(p.name for p in run.iterdir()) == [TRAIN_LOCK[0], "checkpoint-000001", "metrics.jsonl"]
    assert (run / "checkpoint-000001").read_text() == "not a checkpoint"


def test_checkpoint_folder_holds_only_safetensors_and_json(tmp_path, chat_folder, meta, umask_022):
    from conftest import modes_other_than

    train(config(chat_folder, meta, tmp_path / "run", max_steps=1, save_every=1, quality_weight=0.2,
                 precompute_ref=True))
    assert modes_other_than(tmp_path / "run", 0o644) == {}  # readable by others, as the umask says
    folder = tmp_path / "run" / "checkpoint-000001"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert all(f.endswith((".safetensors", ".json", ".txt")) for f in files), files
    assert {"model/config.json", "model/model.safetensors", "model/tokenizer_config.json", "optimizer.json",
            "optimizer.safetensors", "rank0.json", "rank0.safetensors", "trainer_state.json"} <= set(files)
    state = strict_json((folder / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["running_mean"]["count"] == pytest.approx(1.0)
    assert state["running_mean"]["std"] is None  # undefined after one update (TRL's is inf or NaN)
    for name in ("optimizer.json", "rank0.json", "model/config.json"):
        strict_json((folder / name).read_text())
    assert not list((tmp_path / "run").glob(".tmp-*"))


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path, chat_folder, meta):
    """As the HF Trainer's save_total_limit: after each save only the N newest checkpoints stay (0 keeps all);
    a resume may set it, and the newest (the one resumed from) is never deleted."""
    run = tmp_path / "run"
    cfg = config(chat_folder, meta, run, max_steps=4, save_every=1, save_total_limit=2)
    train(cfg)
    assert sorted(p.name for p in run.iterdir()) == [TRAIN_LOCK[0], "checkpoint-000003", "checkpoint-000004",
                                                     "final", "metrics.jsonl"]
    shutil.rmtree(run)
    train(dataclasses.replace(cfg, save_total_limit=0))
    assert len(list(run.glob("checkpoint-*"))) == 4
    killed_after_step_1(run)
    (run / "checkpoint-000000").mkdir()  # not a complete checkpoint (no state file): left alone
    (run / ".tmp-checkpoint-000003" / "model").mkdir(parents=True)  # what a save killed midway leaves
    assert train(dataclasses.replace(cfg, resume=True, save_every=2, save_total_limit=1)).steps == 4
    assert sorted(p.name for p in run.glob("*checkpoint-*")) == ["checkpoint-000000", "checkpoint-000004"]
    assert not list(run.glob(".tmp-*"))


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path, chat_folder, meta):
    cfg = config(chat_folder, meta, tmp_path / "run", max_steps=1, save_every=1)
    train(cfg)
    message = rf"{tmp_path / 'run'} already holds checkpoint-000001 of an earlier run: pass --resume"
    with pytest.raises(ConfigError, match=message):
        train(dataclasses.replace(cfg, lr=1e-4))
    assert train(dataclasses.replace(cfg, resume=True)).steps == 1


def test_a_finished_run_without_checkpoints_is_never_overwritten(tmp_path, chat_folder, meta):
    """Neither a fresh run nor --resume (which has no checkpoint to start from) trains over final/; a run
    stopped before its first checkpoint starts over there with --resume only."""
    cfg = config(chat_folder, meta, tmp_path / "run", max_steps=1)
    train(cfg)
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    finished = rf"{tmp_path / 'run'} already holds the final/ of a finished run \(and no checkpoint to resume from\)"
    for resume in (False, True):
        with pytest.raises(ConfigError, match=finished):
            train(dataclasses.replace(cfg, resume=resume))
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before
    shutil.rmtree(tmp_path / "run" / "final")
    with pytest.raises(ConfigError, match="already holds metrics.jsonl of an earlier run that saved no checkpoint: "
                                          "pass --resume to start it over there"):
        train(cfg)
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before
    assert train(dataclasses.replace(cfg, resume=True)).steps == 1


def test_resume_does_not_train_the_last_steps_of_a_finished_run_again(tmp_path, chat_folder, meta):
    """A finished run whose last steps were not checkpointed: --resume (a job script that always passes it, run
    once more) trained them again from the last checkpoint and overwrote final/. A checkpoint of the last step
    only writes final/ again, which changes nothing."""
    cfg = config(chat_folder, meta, tmp_path / "run", max_steps=3, save_every=2)
    train(cfg)
    final = (tmp_path / "run" / "final" / "model.safetensors").stat().st_mtime_ns
    rows = metric_rows(tmp_path / "run")
    message = (rf"{tmp_path / 'run'} holds the final/ of the finished run, written after checkpoint-000002 \(step 2 of"
               r" 3\): resuming would train its last steps again and overwrite it; choose another --output \(or delete"
               r" final/ to train them again\)$")
    with pytest.raises(ConfigError, match=message):
        train(dataclasses.replace(cfg, resume=True))
    assert (tmp_path / "run" / "final" / "model.safetensors").stat().st_mtime_ns == final
    assert metric_rows(tmp_path / "run") == rows
    shutil.rmtree(tmp_path / "run" / "final")  # killed during the final save: the resume finishes the run
    assert train(dataclasses.replace(cfg, resume=True)).steps == 3


HOLD_LOCK = """
import fcntl, sys, time
f = open(sys.argv[1], "a")
fcntl.flock(f, fcntl.LOCK_EX)
f.write("pid 123 on elsewhere\\n")
f.flush()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_run_is_refused_while_another_live_run_holds_its_output(tmp_path, chat_folder, meta):
    """A second `train` (a job resubmitted while the first still runs) would interleave checkpoints and metrics;
    a run that died (SIGKILL) holds no lock any more, whatever file it left."""
    cfg = config(chat_folder, meta, tmp_path / "run", max_steps=1, save_every=1)
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run" / TRAIN_LOCK[0])],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        in_use = re.escape(f"{tmp_path / 'run'} is in use by another training run (pid 123 on elsewhere)")
        for resume in (False, True):
            with pytest.raises(ConfigError, match=in_use):
                train(dataclasses.replace(cfg, resume=resume))
        # said first, before the model loads (and before a checkpoint there suggests --resume)
        with pytest.raises(ConfigError, match=in_use):
            train(dataclasses.replace(cfg, model=str(tmp_path / "no-model")))
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [TRAIN_LOCK[0]]
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()  # left to the garbage collector, its ResourceWarning came in a later test
    assert train(cfg).steps == 1
    assert (tmp_path / "run" / "final").is_dir()


def test_bad_model_or_data_creates_no_output_folder(tmp_path, chat_folder, meta):
    from internvl_mpo.errors import CheckpointError

    with pytest.raises(CheckpointError, match=f"^{re.escape(str(tmp_path / 'no-model'))}: no such checkpoint folder"):
        train(config(tmp_path / "no-model", meta, tmp_path / "a"))
    with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path / 'no-meta.json'))}: meta file not found$"):
        train(config(chat_folder, tmp_path / "no-meta.json", tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("output", ["a-file", "a-file/run"])
def test_an_output_under_a_file_is_refused_before_loading(tmp_path, meta, output):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match=f"--output {tmp_path / output}: {tmp_path / 'a-file'} is a file"):
        train(config(tmp_path / "no-model", meta, tmp_path / output))


def test_an_output_folder_that_cannot_be_made_is_one_line(chat_folder, meta):
    # /proc takes no new folders, also from root (whom an unwritable parent does not stop): a FileNotFoundError
    # traceback once the model and data had loaded
    with pytest.raises(ConfigError, match=r"--output /proc/internvl-mpo-run: cannot make the folder \(No such file"):
        train(config(chat_folder, meta, Path("/proc/internvl-mpo-run"), max_steps=1))


# Each message names the flag (a TrainConfig field is its flag: max_steps is --max-steps) and the value given.
@pytest.mark.parametrize("change, message", [
    ({"lr": -1.0}, "^--lr must be >= 0, got -1.0$"),
    ({"lr": math.nan}, "^--lr must be >= 0, got nan$"),
    ({"beta": 0.0}, "^--beta must be > 0, got 0.0$"),
    ({"beta": math.inf}, "^--beta must be > 0, got inf$"),
    ({"label_smoothing": 0.6}, r"^--label-smoothing must be in \[0, 0.5\], got 0.6$"),  # TRL: at most 0.5
    ({"adam_beta1": 1.5}, r"^--adam-beta1 must be in \[0, 1\), got 1.5$"),
    ({"adam_eps": -1e-8}, "^--adam-eps must be > 0"),
    # AdamW divides by sqrt(v) + eps: an element whose gradient is exactly 0 (the embedding row of a token no
    # sample holds) became NaN, saved silently, as no loss or gradient norm reads that row
    ({"adam_eps": 0.0},
     r"^--adam-eps must be > 0 \(at 0 AdamW turns a gradient of exactly 0 into a NaN weight\), got 0.0$"),
    ({"weight_decay": -0.1}, "^--weight-decay must be >= 0, got -0.1$"),
    ({"max_grad_norm": -1.0}, r"^--max-grad-norm must be >= 0 \(0: no clipping\), got -1.0$"),
    ({"drop_path_rate": 1.5}, r"^--drop-path-rate must be in \[0, 1\), got 1.5$"),
    ({"pref_weight": -1.0}, "^--pref-weight must be >= 0, got -1.0$"),
    ({"lora_rank": 2, "lora_alpha": 0.0}, "^--lora-alpha must be > 0, got 0.0$"),
    ({"lora_alpha": 16.0}, "--lora-alpha needs --lora-rank > 0"),
    ({"max_dynamic_patch": 0}, "^--max-dynamic-patch must be >= 1, got 0$"),
    ({"max_dynamic_patch": 10**9}, "^--max-dynamic-patch must be at most 10000 tiles, got 1000000000$"),
    ({"batch_size": 0}, "^--batch-size must be >= 1, got 0$"),
    ({"max_seq_length": -5}, "^--max-seq-length must be >= 1, got -5$"),
    # these five shared one message that named none of them
    ({"max_steps": -1}, "^--max-steps must be >= 0, got -1$"),
    ({"save_every": -2}, "^--save-every must be >= 0, got -2$"),
    ({"save_total_limit": -1}, "^--save-total-limit must be >= 0, got -1$"),
    ({"lora_rank": -4}, "^--lora-rank must be >= 0, got -4$"),
    ({"num_workers": -1}, "^--num-workers must be >= 0, got -1$"),
    ({"seed": -1}, r"^--seed must be in \[0, 4294967295\] \(numpy seeds process r with seed \+ r\), got -1$"),
    ({"seed": 2**32}, r"^--seed must be in \[0, 4294967295\]"),
    ({"rejected_span": "divergent"}, "^--rejected-span must be full or divergent-line, got 'divergent'$"),
    ({"precision": "fp16"}, "^--precision must be auto, bf16 or fp32, got 'fp16'$"),
    ({"mode": "ppo"}, "^mode must be mpo, dpo or sft, got 'ppo'$"),  # the positional `train MODE`
    # sft computes no preference loss: its settings were ignored without a word
    ({"mode": "sft", "beta": 0.5}, r"^--beta: for the preference modes \(mpo, dpo\); sft has no preference loss$"),
    ({"mode": "sft", "precompute_ref": True, "rejected_span": "divergent-line"}, "^--rejected-span, --precompute-ref: for the"),
    ({"mode": "sft", "quality_weight": 0.2},
     r"^--quality-weight must be 0 in sft \(it trains on conversations only, without a preference loss\), got 0.2$"),
    ({"mode": "dpo", "pref_weight": 0.0},
     r"^--pref-weight, --quality-weight and --gen-weight are all 0 \(dpo's defaults: 1, 0, 0\): nothing to train$"),
    # with the preference and quality terms off only the NLL trains: these settings were ignored without a word
    ({"pref_weight": 0.0, "quality_weight": 0.0, "beta": 0.5, "precompute_ref": True},
     r"^--beta, --precompute-ref: for the preference and quality terms, which --pref-weight 0 and --quality-weight 0"
     r" turn off \(only the --gen-weight NLL term trains\)$"),
    ({"mode": "dpo", "pref_weight": 0.0, "gen_weight": 1.0, "label_smoothing": 0.1, "rejected_span": "divergent-line"},
     "^--label-smoothing, --rejected-span: for the preference and quality terms"),
    # label smoothing enters the sigmoid DPO term only: with the quality term alone it was ignored
    ({"mode": "dpo", "pref_weight": 0.0, "quality_weight": 1.0, "label_smoothing": 0.2},
     r"^--label-smoothing: for the sigmoid DPO term alone, which --pref-weight 0 turns off$"),
])
def test_out_of_range_settings_are_refused_before_loading(tmp_path, meta, change, message):
    """Values torch would reject with a traceback after the model loads, or train on silently (NaN, no-ops)."""
    with pytest.raises(ConfigError, match=message):
        train(config(tmp_path / "no-model", meta, tmp_path / "run", **change))
    assert not (tmp_path / "run").exists()


def test_freezing_every_part_names_the_flags(tmp_path, chat_folder, meta):
    with pytest.raises(ConfigError, match=r"^--freeze-vision, --freeze-projector and --freeze-llm without --lora-rank"
                                          r" freeze every parameter: nothing to train$"):
        train(config(chat_folder, meta, tmp_path / "run", freeze_vision=True, freeze_projector=True, freeze_llm=True))


def test_too_little_data_for_one_step_counts_in_the_singular(tmp_path, chat_folder):
    meta = write_mmpr(tmp_path / "data", color_pairs(1))  # it said "1 records are ... (2 per rank x 1 ranks)"
    with pytest.raises(InputError, match=r": 1 record, fewer than one step takes \(2 per rank x 1 rank\)$"):
        train(config(chat_folder, meta, tmp_path / "run", max_steps=0))


def test_the_seed_range_leaves_room_for_every_process(tmp_path, meta, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"^--seed must be in \[0, 4294967292\]"):
        train(config(tmp_path / "no-model", meta, tmp_path / "run", seed=2**32 - 2))


def test_a_diverging_run_stops_before_a_non_finite_update(tmp_path, chat_folder, meta):
    cfg = config(chat_folder, meta, tmp_path / "run", lr=1e6, max_grad_norm=0.0, max_steps=6, save_every=1)
    with pytest.raises(TrainingError, match=r"^step (\d+): the gradient norm is (nan|inf): the run diverged"):
        train(cfg)
    assert not (tmp_path / "run" / "final").exists()
    last = ckpt.latest_checkpoint(tmp_path / "run")
    assert all(torch.isfinite(w).all() for w in load_weights(last / "model").values())
    assert all(math.isfinite(row["loss"]) for row in metric_rows(tmp_path / "run"))


def test_non_finite_metrics_are_written_as_json_null(tmp_path, chat_folder, meta, monkeypatch):
    """A metric that is NaN or infinite (a reference log-prob of -inf makes the rewards infinite while the loss
    saturates) is null in metrics.jsonl, which strict readers parse and `plot` draws as a gap."""
    loss = mpo.micro_batch_loss

    def infinite_margin(*args):
        value, metrics = loss(*args)
        return value, {**metrics, "rewards/margins": math.inf, "delta": math.nan}

    monkeypatch.setattr(mpo, "micro_batch_loss", infinite_margin)
    train(config(chat_folder, meta, tmp_path / "run", max_steps=2))
    rows = [strict_json(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["rewards/margins"], r["delta"]) for r in rows] == [(None, None)] * 2
    assert all(math.isfinite(r["loss"]) for r in rows)
    pytest.importorskip("matplotlib")
    from internvl_mpo.train.cli import plot

    assert plot(str(tmp_path / "run")) == 0


def test_image_root_with_a_meta_json_is_refused(tmp_path, chat_folder, meta):
    """meta.json gives each dataset its root: an --image-root there would be ignored without a word."""
    with pytest.raises(ConfigError, match="^--image-root applies to a single sft .jsonl"):
        train(config(chat_folder, meta, tmp_path / "run", image_root=str(tmp_path)))


@pytest.mark.parametrize("mode", ["mpo", "dpo"])
def test_preference_modes_refuse_a_bare_jsonl(tmp_path, chat_folder, meta, mode):
    """An annotation .jsonl passed straight to --data names the meta.json it needs, not a JSON parse error."""
    annotation = meta.parent / "toy.jsonl"
    with pytest.raises(ConfigError, match=f"^--data {re.escape(str(annotation))}: {mode} reads a meta.json"):
        train(config(chat_folder, annotation, tmp_path / "run", mode=mode))
    assert not (tmp_path / "run").exists()


def killed_after_step_1(run: Path) -> None:
    """Make a finished run's folder what a run killed after its step-1 checkpoint leaves: no later checkpoint
    and no final/ (written only at the end)."""
    for folder in [*run.glob("checkpoint-*"), run / "final"]:
        if folder.name != "checkpoint-000001":
            shutil.rmtree(folder)


def test_resume_refuses_changed_data_contents(tmp_path, chat_folder):
    meta = write_mmpr(tmp_path / "data", color_pairs(4, text_only=1))
    cfg = config(chat_folder, meta, tmp_path / "run", max_steps=2, save_every=1)
    train(dataclasses.replace(cfg, max_steps=2))
    killed_after_step_1(tmp_path / "run")
    annotation = tmp_path / "data" / "toy.jsonl"
    original = annotation.read_text()
    annotation.write_text(original.replace("It is purple.", "It is pink."))
    message = (r"checkpoint-000001: cannot resume, these settings differ from the checkpoint: data \(files changed"
               f" since the checkpoint: {re.escape(str(annotation))}\\)$")
    with pytest.raises(CheckpointError, match=message):
        train(dataclasses.replace(cfg, resume=True))
    # A checkpoint from before the fingerprint was recorded still resumes (compared by the --data path only).
    state_file = tmp_path / "run" / "checkpoint-000001" / ckpt.STATE_FILE
    state = json.loads(state_file.read_text())
    del state["data_fingerprint"]
    state_file.write_text(json.dumps(state))
    annotation.write_text(original)
    assert train(dataclasses.replace(cfg, resume=True)).steps == 2


def test_resume_takes_the_same_data_file_spelled_another_way(tmp_path, chat_folder, meta, monkeypatch):
    """--data given relative to the working folder, then as an absolute path: the same data, so it resumes."""
    monkeypatch.chdir(meta.parent)
    cfg = config(chat_folder, meta.name, tmp_path / "run", max_steps=2, save_every=1)
    train(cfg)
    killed_after_step_1(tmp_path / "run")
    assert train(dataclasses.replace(cfg, data=str(meta.resolve()), resume=True)).steps == 2
    # Resumed from another folder: the checkpoint's relative --data was read from there, named no file
    # and the resume was refused as other data.
    killed_after_step_1(tmp_path / "run")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert train(dataclasses.replace(cfg, data=os.path.relpath(meta, tmp_path / "elsewhere"), resume=True)).steps == 2


def test_resume_takes_the_same_data_files_through_a_symlink_and_refuses_a_copy(tmp_path, chat_folder, meta):
    """--data through a linked folder, then by its real path (and back): the same files, so it resumes; the
    fingerprint compared the paths as spelled, so the resume was refused as "files changed". A copy of the
    files elsewhere is other data, even with the same contents."""
    (tmp_path / "linked").symlink_to(meta.parent, target_is_directory=True)
    linked = tmp_path / "linked" / meta.name
    cfg = config(chat_folder, linked, tmp_path / "run", max_steps=2, save_every=1)
    train(cfg)
    killed_after_step_1(tmp_path / "run")
    assert train(dataclasses.replace(cfg, data=str(meta), resume=True)).steps == 2
    killed_after_step_1(tmp_path / "run")
    assert train(dataclasses.replace(cfg, data=str(linked), resume=True)).steps == 2
    killed_after_step_1(tmp_path / "run")
    # a checkpoint from before 2026-12-03 recorded the files as spelled: the link's own path
    state_file = tmp_path / "run" / "checkpoint-000001" / ckpt.STATE_FILE
    state = json.loads(state_file.read_text())
    state["data_fingerprint"][0]["file"] = str(linked)
    state_file.write_text(json.dumps(state))
    assert train(dataclasses.replace(cfg, data=str(meta), resume=True)).steps == 2
    killed_after_step_1(tmp_path / "run")
    copy = shutil.copytree(meta.parent, tmp_path / "copy")
    with pytest.raises(CheckpointError, match="cannot resume, these settings differ from the checkpoint: --data"):
        train(dataclasses.replace(cfg, data=str(copy / meta.name), resume=True))


def test_resume_drops_a_half_written_metrics_line(tmp_path, chat_folder, meta):
    cfg = config(chat_folder, meta, tmp_path / "run", max_steps=2, save_every=1)
    train(cfg)
    killed_after_step_1(tmp_path / "run")  # while appending step 2's metrics
    path = tmp_path / "run" / "metrics.jsonl"
    path.write_text(path.read_text()[:-40])
    train(dataclasses.replace(cfg, resume=True))
    assert [r["step"] for r in metric_rows(tmp_path / "run")] == [1, 2]


def test_a_metrics_file_that_cannot_be_rewritten_at_a_resume_is_one_line(tmp_path, chat_folder, meta):
    # the resume rewrites metrics.jsonl through a temporary file: an OSError traceback on process 0 alone
    cfg = config(chat_folder, meta, tmp_path / "run", max_steps=2, save_every=1)
    train(cfg)
    killed_after_step_1(tmp_path / "run")
    (tmp_path / "run" / ".tmp-metrics.jsonl").mkdir()  # in the way of the temporary file
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'run' / 'metrics.jsonl'}: saving failed ([Errno 21]")):
        train(dataclasses.replace(cfg, resume=True))


def sft_meta(folder: Path, lines: int, repeat_time: float) -> Path:
    """An SFT meta.json of one text-only conversation file of `lines` lines."""
    convos = [{"conversations": [{"from": "human", "value": f"q{k}"}, {"from": "gpt", "value": f"a{k}"}]}
              for k in range(lines)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convos))
    meta = {"toy": {"root": str(folder), "annotation": str(folder / "sft.jsonl"), "repeat_time": repeat_time}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder / "meta.json"


def test_resume_refuses_a_run_that_would_read_other_records(tmp_path, chat_folder, monkeypatch):
    """Same files and settings, but the records are selected otherwise (as a version of the reader that cut or
    sampled differently would): the resumed steps would read other records than the checkpoint's run."""
    cfg = config(chat_folder, sft_meta(tmp_path / "data", 10, 0.5), tmp_path / "run", mode="sft", max_steps=2,
                 save_every=1, freeze_vision=True, freeze_projector=True)  # text-only: no vision gradient
    with monkeypatch.context() as patch:
        read = sample_stream.read_sft_records
        patch.setattr(sample_stream, "read_sft_records", lambda *a, **k: read(*a, **k)[::-1])
        train(cfg)
    killed_after_step_1(tmp_path / "run")
    message = (r"checkpoint-000001: cannot resume, these settings differ from the checkpoint: the records read"
               r" \(process 0 would read other records than the checkpoint's run from its position on: 5 records;")
    with pytest.raises(CheckpointError, match=message):
        train(dataclasses.replace(cfg, resume=True))
    # A checkpoint that did not record them: refused where versions before 2026-12-02 selected otherwise.
    rank_file = tmp_path / "run" / "checkpoint-000001" / "rank0.json"
    position = json.loads(rank_file.read_text())
    del position["data"]["share_sha256"]
    rank_file.write_text(json.dumps(position))
    with pytest.raises(CheckpointError, match=r"the records read \(the checkpoint does not record them, and a"
                                              r" dataset's repeat_time is below 1: versions before 2026-12-02"):
        train(dataclasses.replace(cfg, resume=True))


DAMAGED = [  # (file, path to the field, value written there, what the error names)
    ("trainer_state.json", ["step"], math.nan, "step is nan"),
    ("trainer_state.json", ["step"], "1", "step is '1'"),
    ("trainer_state.json", ["skipped"], {"bad_image": "a"}, "skipped is {'bad_image': 'a'}"),
    ("trainer_state.json", ["config"], [1], "config is [1]"),
    ("trainer_state.json", ["data_fingerprint"], [1], "data_fingerprint is [1]"),
    ("trainer_state.json", ["model_fingerprint"], ["x"], "model_fingerprint is ['x']"),
    ("rank0.json", ["data", "epoch"], 1.5, "data.epoch is 1.5"),
    ("rank0.json", ["data", "cursor"], None, "data.cursor is None"),
    ("rank0.json", ["data", "bad"], 5, "data.bad is 5"),
    ("rank0.json", ["data"], None, "data is None"),
    ("rank0.json", ["rng", "numpy", "pos"], "x", "its RNG state is refused"),
    ("rank0.json", ["rng", "python", "state"], [1, 2], "its RNG state is refused"),
    ("rank0.json", ["rng", "python", "state"], [-1] * 625, "its RNG state is refused"),  # OverflowError
    ("rank0.json", ["rng", "numpy", "pos"], 2**70, "its RNG state is refused"),  # OverflowError
    ("rank0.json", ["data", "epoch"], 2**64, f"data.epoch is {2**64}"),  # torch's manual_seed: ValueError
    ("optimizer.json", ["param_groups"], [{"lr": 1.0}], "param_groups is [{'lr': 1.0}]"),
    ("optimizer.json", ["scalars"], [1], "scalars is [1]"),
]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, chat_folder, meta):
    """A run killed after its step-1 checkpoint, and its config."""
    root = tmp_path_factory.mktemp("saved_run")
    cfg = config(chat_folder, meta, root / "run", max_steps=2, save_every=1)
    train(cfg)
    killed_after_step_1(root / "run")
    return cfg


@pytest.mark.parametrize("file, keys, value, named", DAMAGED, ids=[f"{d[0]}:{'.'.join(d[1])}" for d in DAMAGED])
def test_resume_names_a_damaged_checkpoint_field(tmp_path, saved_run, file, keys, value, named):
    """A checkpoint's JSON edited by hand (or not one this program wrote) stopped the resume with a bare
    ValueError, TypeError or KeyError from deep inside, or resumed from a step given as a string."""
    shutil.copytree(saved_run.output, tmp_path / "run")
    path = tmp_path / "run" / "checkpoint-000001" / file
    data = json.loads(path.read_text())
    parent = functools.reduce(lambda d, k: d[k], keys[:-1], data)
    parent[keys[-1]] = value
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"checkpoint-000001/{file}: {re.escape(named)}.*the file is damaged"):
        train(dataclasses.replace(saved_run, output=str(tmp_path / "run"), resume=True))


def test_resume_of_a_text_only_run_whose_vision_tower_has_no_optimizer_state(tmp_path, chat_folder):
    """Text-only conversations never give the (trainable) vision tower a gradient, so AdamW holds no state
    for it; the checkpoint is complete without one, and resuming gives the uninterrupted run's weights."""
    cfg = config(chat_folder, sft_meta(tmp_path / "data", 6, 1), tmp_path / "run", mode="sft", max_steps=3,
                 save_every=1)
    straight = train(dataclasses.replace(cfg, output=str(tmp_path / "straight")))
    train(cfg)
    killed_after_step_1(tmp_path / "run")
    trained = []
    resumed = train(dataclasses.replace(cfg, resume=True), on_step=lambda step, _: trained.append(step))
    assert trained == [2, 3]  # from the step-1 checkpoint: a run from the start would give the same weights
    a, b = load_weights(straight.final_dir), load_weights(resumed.final_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_an_unrecorded_selection_that_processes_do_not_divide(tmp_path, chat_folder, meta):
    """Two processes over 10 records, from a checkpoint that did not record what each read: before 2026-12-02
    each share was cut to 10 // 2, since then they are dealt round-robin. Checked without starting processes."""
    cfg = config(chat_folder, meta, tmp_path / "run", max_steps=1, save_every=1)
    train(cfg)
    path = tmp_path / "run" / "checkpoint-000001"
    position = json.loads((path / "rank0.json").read_text())
    del position["data"]["share_sha256"]
    for rank in (0, 1):
        (path / f"rank{rank}.json").write_text(json.dumps(position))
    state = json.loads((path / ckpt.STATE_FILE).read_text())
    (path / ckpt.STATE_FILE).write_text(json.dumps({**state, "world_size": 2}))
    tokenizer = load_tokenizer(chat_folder)
    cfg = dataclasses.replace(cfg, max_seq_length=8192)
    dataset, report = build_dataset(cfg, tokenizer, ModelConfig.from_json(chat_folder / "config.json"))
    for n, refused in ((10, False), (9, True)):
        env = DistEnv(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))
        part = PairDataset(dataset.records[:n], tokenizer, dataset.settings, 8192)
        stream = SampleStream(part, env, cfg, report)
        check = functools.partial(check_resume_settings, path, cfg, env, 1, None, None, stream)
        if refused:
            with pytest.raises(CheckpointError, match=r"the checkpoint does not record them, and 2 processes do"
                                                      r" not divide the 9 records: versions before 2026-12-02"):
                check()
        else:
            check()


def test_resume_refuses_other_model_files(tmp_path, chat_folder, meta):
    """The reference model and the tokenizer are rebuilt from --model / --tokenizer on a resume: another
    checkpoint (or one edited in place) would change the DPO reference mid-run. A moved copy resumes."""
    shutil.copytree(chat_folder, tmp_path / "model")
    cfg = config(tmp_path / "model", meta, tmp_path / "run", max_steps=2, save_every=1, precompute_ref=True)
    train(cfg)
    killed_after_step_1(tmp_path / "run")
    cache = (tmp_path / "run" / "ref_logps.safetensors").stat().st_mtime_ns
    shutil.copytree(tmp_path / "model", tmp_path / "other")
    scale_weight(tmp_path / "other")
    message = (r"checkpoint-000001: cannot resume, these settings differ from the checkpoint: model files \(not the"
               r" ones the checkpoint's run started from; the reference model and the tokenizer come from --model")
    with pytest.raises(CheckpointError, match=message):
        train(dataclasses.replace(cfg, resume=True, model=str(tmp_path / "other")))
    assert (tmp_path / "run" / "ref_logps.safetensors").stat().st_mtime_ns == cache  # refused before the pass
    (tmp_path / "model").rename(tmp_path / "moved")
    assert train(dataclasses.replace(cfg, resume=True, model=str(tmp_path / "moved"))).steps == 2


def test_resume_takes_the_model_saved_again_unchanged_in_the_model_fingerprint(tmp_path, chat_folder, meta):
    """Each save stamps a fresh save id into its weight files and index, and the model fingerprint hashed
    them whole: the same weights and config saved again were "model files (not the ones the checkpoint's run
    started from)" on a resume. The fingerprint leaves the id out; other weights saved are still refused."""
    model = tmp_path / "model"
    InternVL.from_pretrained(chat_folder).save_pretrained(model, max_shard_size="40KB")  # shards and an index
    assert (model / "model.safetensors.index.json").is_file()
    cfg = config(model, meta, tmp_path / "run", max_steps=2, save_every=1)
    train(cfg)
    killed_after_step_1(tmp_path / "run")
    other = InternVL.from_pretrained(model)
    with torch.no_grad():
        other.language_model.model.norm.weight.mul_(1.5)
    other.save_pretrained(tmp_path / "other", max_shard_size="40KB")
    with pytest.raises(CheckpointError, match=r"differ from the checkpoint: model files \(not the ones"):
        train(dataclasses.replace(cfg, resume=True, model=str(tmp_path / "other")))  # its tokenizer files are the same
    saved = {p.name: p.read_bytes() for p in model.iterdir()}
    InternVL.from_pretrained(model).save_pretrained(model, max_shard_size="40KB")  # the same, under a new save id
    assert {p.name: p.read_bytes() for p in model.iterdir()}.keys() == saved.keys()
    assert (model / "model.safetensors.index.json").read_bytes() != saved["model.safetensors.index.json"]
    assert train(dataclasses.replace(cfg, resume=True)).steps == 2


def test_a_resume_names_a_checkpoint_without_its_state_file_that_it_passes_over(tmp_path, chat_folder, meta, capsys):
    """A checkpoint folder whose trainer_state.json is missing (a partial copy of the run folder: saves write it last)
    is not resumed from; a run that thus starts over (dropping metrics.jsonl) says so rather than in silence."""
    cfg = config(chat_folder, meta, tmp_path / "run", max_steps=3, save_every=2)

    class Stop(Exception):
        pass

    def stop_at_three(step, metrics):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, on_step=stop_at_three)
    (tmp_path / "run" / "checkpoint-000002" / ckpt.STATE_FILE).unlink()
    capsys.readouterr()
    assert train(dataclasses.replace(cfg, resume=True)).resumed_after == 0
    assert ("note: checkpoint-000002 in " + str(tmp_path / "run") + " has no trainer_state.json (an incomplete copy?)"
            " and is not resumed from; the run starts from the beginning") in capsys.readouterr().out


def test_resume_from_a_truncated_checkpoint_file_names_it(tmp_path, chat_folder, meta):
    cfg = config(chat_folder, meta, tmp_path / "run", max_steps=1, save_every=1)
    train(cfg)
    shutil.rmtree(tmp_path / "run" / "final")
    for name in ("optimizer.safetensors", "rank0.safetensors"):
        path = tmp_path / "run" / "checkpoint-000001" / name
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])  # a copy cut short
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: not a readable safetensors file"):
            train(dataclasses.replace(cfg, resume=True))
        path.write_bytes(whole)
    state_file = tmp_path / "run" / "checkpoint-000001" / ckpt.STATE_FILE
    state = json.loads(state_file.read_text())
    state["running_mean"]["mean"] = None  # a hand-edited or damaged state: one line, not a ValueError traceback
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(state_file))}: RunningMean state: mean is None, not a number$"):
        train(dataclasses.replace(cfg, resume=True))


def resume_refusal(cfg: TrainConfig, change: dict) -> str:
    """The CheckpointError message (a regex) that resuming `cfg`'s checkpoint-000001 with `change` must give
    (the checkpoint holds the sequence length the run used: the tiny model's default is 8192; a loss weight left
    out is named with mpo's default, the tiles with the tiny model config's 12, as meta.json sets none)."""
    defaults = {"pref_weight": 0.8, "quality_weight": 0.2, "gen_weight": 1.0, "max_dynamic_patch": 12}
    saved = dataclasses.replace(cfg, max_seq_length=cfg.max_seq_length or 8192,
                                **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})
    listed = ", ".join(f"--{k.replace('_', '-')} (checkpoint {getattr(saved, k)}, now {v})" for k, v in change.items())
    return re.escape(f"checkpoint-000001: cannot resume, these settings differ from the checkpoint: {listed}") + "$"


def test_resume_refuses_changed_training_settings(tmp_path, chat_folder, meta):
    cfg = config(chat_folder, meta, tmp_path / "run", max_steps=1, save_every=1)
    train(cfg)
    for change in ({"freeze_vision": True}, {"freeze_projector": True}, {"freeze_llm": True},
                   {"lora_rank": 2, "lora_alpha": 4.0}, {"batch_size": 1, "freeze_vision": True}):
        with pytest.raises(CheckpointError, match=resume_refusal(cfg, change)):
            train(dataclasses.replace(cfg, resume=True, **change))


def test_resume_refuses_changed_optimizer_and_schedule_settings(tmp_path, chat_folder, meta):
    cfg = config(chat_folder, meta, tmp_path / "run", max_steps=2, save_every=1)
    train(cfg)
    killed_after_step_1(tmp_path / "run")
    for change in ({"lr": 1e-4}, {"warmup_ratio": 0.5}, {"weight_decay": 0.0}, {"adam_beta1": 0.8},
                   {"adam_beta2": 0.99}, {"adam_eps": 1e-6}, {"max_grad_norm": 0.5}, {"beta": 0.2},
                   {"pref_weight": 0.5}, {"quality_weight": 0.5}, {"gen_weight": 0.5}, {"label_smoothing": 0.1},
                   {"rejected_span": "divergent-line"}, {"max_seq_length": 4096}, {"max_dynamic_patch": 2},
                   {"video_frames": 4}, {"drop_path_rate": 0.2},
                   {"batch_size": 1, "lr": 1e-4, "adam_eps": 1e-6}):
        with pytest.raises(CheckpointError, match=resume_refusal(cfg, change)):
            train(dataclasses.replace(cfg, resume=True, **change))
    steps = re.escape(": total steps (--epochs / --max-steps; checkpoint 2, now 3)") + "$"
    with pytest.raises(CheckpointError, match=steps):
        train(dataclasses.replace(cfg, resume=True, max_steps=3))
    # An older checkpoint that did not record a setting resumes with this run's value (not torch's restored one).
    state_file = tmp_path / "run" / "checkpoint-000001" / ckpt.STATE_FILE
    state = json.loads(state_file.read_text())
    del state["config"]["adam_eps"], state["config"]["weight_decay"]
    state_file.write_text(json.dumps(state))
    # Saving, progress, precision and skipping bad records may change.
    assert train(dataclasses.replace(cfg, resume=True, adam_eps=1e-6, weight_decay=0.01, save_every=2,
                                     progress=True, precision="fp32", skip_bad=True)).steps == 2
    groups = json.loads((tmp_path / "run" / "checkpoint-000002" / "optimizer.json").read_text())["param_groups"]
    assert [(g["eps"], g["weight_decay"]) for g in groups] == [(1e-6, 0.01), (1e-6, 0.0)]


def test_resume_compares_effective_values_not_spellings(tmp_path, chat_folder, meta):
    """A loss weight, LoRA alpha or tile count spelled out with the value it had by default is the same setting;
    a real change is still refused, naming the values the runs use."""
    cfg = config(chat_folder, meta, tmp_path / "run", max_steps=2, save_every=1, lora_rank=2)
    train(cfg)
    killed_after_step_1(tmp_path / "run")
    with pytest.raises(CheckpointError, match=re.escape("--lora-alpha (checkpoint 4.0, now 3.0), --pref-weight"
                                                        " (checkpoint 0.8, now 0.5)") + "$"):
        train(dataclasses.replace(cfg, resume=True, lora_alpha=3.0, pref_weight=0.5))
    spelled = dataclasses.replace(cfg, resume=True, lora_alpha=4, pref_weight=0.8, quality_weight=0.2, gen_weight=1,
                                  max_dynamic_patch=12)  # meta.json sets none: the model config's 12 applies
    assert train(spelled).steps == 2
    killed_after_step_1(tmp_path / "run")  # and the other way round: the checkpoint spelled them out
    state_file = tmp_path / "run" / "checkpoint-000001" / ckpt.STATE_FILE
    state = json.loads(state_file.read_text())
    state["config"].update(lora_alpha=4.0, pref_weight=0.8, quality_weight=0.2, gen_weight=1.0)
    state_file.write_text(json.dumps(state))
    assert train(dataclasses.replace(cfg, resume=True)).steps == 2


def test_resume_takes_a_freeze_flag_spelled_out_for_a_tower_lora_freezes_anyway(tmp_path, chat_folder, meta):
    """LoRA freezes the base weights of the towers it adapts (--lora-rank the LLM, --lora-vision the ViT), so
    --freeze-llm and --freeze-vision beside them train the same parameters; a resume that added or dropped
    them was refused. Where the tower is not adapted, the flag still changes what trains and is refused."""
    cfg = config(chat_folder, meta, tmp_path / "run", max_steps=2, save_every=1, lora_rank=2, lora_vision=True)
    train(cfg)
    killed_after_step_1(tmp_path / "run")
    assert train(dataclasses.replace(cfg, resume=True, freeze_vision=True, freeze_llm=True)).steps == 2
    cfg = dataclasses.replace(cfg, output=str(tmp_path / "other"), freeze_vision=True, freeze_llm=True)
    train(cfg)
    killed_after_step_1(tmp_path / "other")
    resumed = dataclasses.replace(cfg, resume=True, freeze_vision=False, freeze_llm=False)
    with pytest.raises(CheckpointError, match=re.escape("--freeze-vision (checkpoint True, now False), --lora-vision "
                                                        "(checkpoint True, now False)") + "$"):
        train(dataclasses.replace(resumed, lora_vision=False))
    assert train(resumed).steps == 2


def test_resume_compares_tiles_with_meta_jsons_per_dataset_value(tmp_path, chat_folder):
    meta = write_mmpr(tmp_path / "data", color_pairs(4, text_only=1), max_dynamic_patch=4)
    cfg = config(chat_folder, meta, tmp_path / "run", max_steps=2, save_every=1)
    train(cfg)
    killed_after_step_1(tmp_path / "run")
    with pytest.raises(CheckpointError, match=re.escape("--max-dynamic-patch (checkpoint 4, now 12)") + "$"):
        train(dataclasses.replace(cfg, resume=True, max_dynamic_patch=12))
    assert train(dataclasses.replace(cfg, resume=True, max_dynamic_patch=4)).steps == 2


def test_the_saved_config_records_the_tile_budget_the_run_trained_with(tmp_path, chat_folder, meta):
    """--max-dynamic-patch goes into the saved config.json (final and checkpoints), as the official trainers write
    it before training: servers read it as their default tile budget. A resume from such a checkpoint goes on."""
    assert json.loads((chat_folder / "config.json").read_text())["max_dynamic_patch"] != 1
    cfg = config(chat_folder, meta, tmp_path / "run", max_steps=2, save_every=1, max_dynamic_patch=1)
    result = train(cfg)
    for folder in (result.final_dir, tmp_path / "run" / "checkpoint-000001" / "model"):
        saved = json.loads((folder / "config.json").read_text())
        assert (saved["max_dynamic_patch"], saved["min_dynamic_patch"]) == (1, 1), folder
    killed_after_step_1(tmp_path / "run")
    assert train(dataclasses.replace(cfg, resume=True)).steps == 2
    plain = train(config(chat_folder, meta, tmp_path / "plain", max_steps=1))  # without the flag: the model's own
    assert json.loads((plain.final_dir / "config.json").read_text())["max_dynamic_patch"] == \
        json.loads((chat_folder / "config.json").read_text())["max_dynamic_patch"]


def test_resume_takes_another_tile_limit_where_dynamic_tiling_is_off(tmp_path, chat_folder, meta):
    """With the config's dynamic_image_size false every image is one tile, whatever --max-dynamic-patch says: a resume
    that changed only that was refused although the run's data stayed the same."""
    model = tmp_path / "model"
    shutil.copytree(chat_folder, model)
    config_file = model / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "dynamic_image_size": False}))
    cfg = config(model, meta, tmp_path / "run", max_steps=2, save_every=1, max_dynamic_patch=4)
    train(cfg)
    killed_after_step_1(tmp_path / "run")
    with pytest.raises(CheckpointError, match=re.escape("settings differ from the checkpoint: --lr (checkpoint")):
        train(dataclasses.replace(cfg, resume=True, max_dynamic_patch=12, lr=1e-4))  # a real change still is
    assert train(dataclasses.replace(cfg, resume=True, max_dynamic_patch=12)).steps == 2


def test_resume_with_data_augment_is_exact_across_an_epoch(tmp_path, chat_folder, noisy_metas):
    """The JPEG draws follow (seed, epoch, record): a run resumed inside its second epoch sees the tiles
    an uninterrupted run saw, and they are not the un-augmented ones."""
    augmented, plain = noisy_metas
    common = {"max_steps": 8, "save_every": 3}  # 5 steps per epoch: the step-6 checkpoint is in epoch 1

    class Stop(Exception):
        pass

    def stop_at_six(step, metrics):
        if step == 6:
            raise Stop

    straight = train(config(chat_folder, augmented, tmp_path / "straight", **common))
    stopped = config(chat_folder, augmented, tmp_path / "stopped", **common)
    with pytest.raises(Stop):
        train(stopped, on_step=stop_at_six)
    trained = []
    resumed = train(dataclasses.replace(stopped, resume=True), on_step=lambda step, _: trained.append(step))
    assert trained == [7, 8]  # from the step-6 checkpoint: a run from the start would give the same weights
    a, b = load_weights(straight.final_dir), load_weights(resumed.final_dir)
    assert all(torch.equal(a[key], b[key]) for key in a)
    losses = [r["loss"] for r in metric_rows(tmp_path / "straight")]
    assert losses == [r["loss"] for r in metric_rows(tmp_path / "stopped")]
    train(config(chat_folder, plain, tmp_path / "plain", **common))
    assert losses != [r["loss"] for r in metric_rows(tmp_path / "plain")]


# ----------------------------------------------------------------------------- reference, modes


def test_precomputed_reference_gives_the_live_reference_losses(tmp_path, chat_folder, meta):
    live = train(config(chat_folder, meta, tmp_path / "live", max_steps=3))
    cached = train(config(chat_folder, meta, tmp_path / "cached", max_steps=3, precompute_ref=True))
    table = load_file(tmp_path / "cached" / "ref_logps.safetensors")
    assert set(table) == {"chosen", "rejected", "valid"} and bool(table["valid"].all())
    assert json.loads((tmp_path / "cached" / "ref_logps.json").read_text())["records"] == 10
    for a, b in zip(metric_rows(tmp_path / "live"), metric_rows(tmp_path / "cached"), strict=True):
        for key in ("loss", "loss/pref", "loss/quality", "rewards/chosen", "rewards/rejected", "delta"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for key, value in load_weights(live.final_dir).items():
        torch.testing.assert_close(value, load_weights(cached.final_dir)[key], rtol=1e-4, atol=1e-6)


def test_precomputed_reference_pass_runs_on_the_policy_without_a_copy(tmp_path, chat_folder, meta, monkeypatch):
    """--precompute-ref holds no second model: the policy runs the pass itself (in eval mode) and trains after it in
    train mode (drop path applies: the same weights as a live-reference run that draws it)."""
    live = train(config(chat_folder, meta, tmp_path / "live", max_steps=2, batch_size=1, drop_path_rate=0.5))

    def no_copy(*args, **kwargs):
        raise AssertionError("a second model was made")

    monkeypatch.setattr(mpo, "make_reference", no_copy)
    cached = train(config(chat_folder, meta, tmp_path / "cached", max_steps=2, batch_size=1, drop_path_rate=0.5,
                          precompute_ref=True))
    for key, value in load_weights(live.final_dir).items():
        torch.testing.assert_close(value, load_weights(cached.final_dir)[key], rtol=1e-4, atol=1e-6)
    eval_run = train(config(chat_folder, meta, tmp_path / "no_drop", max_steps=2, batch_size=1, precompute_ref=True))
    assert any(not torch.equal(value, load_weights(eval_run.final_dir)[key])
               for key, value in load_weights(cached.final_dir).items())  # drop path did change the training


def test_a_resume_reuses_the_reference_cache_for_the_same_data_and_tiles_spelled_otherwise(
        tmp_path, chat_folder, meta, monkeypatch):
    """A resume takes the same meta.json through a symlink and --max-dynamic-patch spelled with the value the run
    used (the model config's 12) as no change; so must the --precompute-ref cache (a pass of hours for MMPR)."""
    cfg = config(chat_folder, meta, tmp_path / "run", max_steps=3, save_every=1, precompute_ref=True)

    class Stop(Exception):
        pass

    def stop_at_one(step, metrics):
        raise Stop

    with pytest.raises(Stop):
        train(cfg, on_step=stop_at_one)
    (tmp_path / "link").symlink_to(meta.parent)

    def no_pass(*args, **kwargs):
        raise AssertionError("the reference pass ran again")

    monkeypatch.setattr("internvl_mpo.train.reference.collate_pairs", no_pass)
    resumed = train(dataclasses.replace(cfg, data=str(tmp_path / "link" / meta.name), max_dynamic_patch=12,
                                        resume=True))
    assert resumed.resumed_after == 1


def test_precomputed_reference_sees_the_augmented_tiles(tmp_path, chat_folder, noisy_metas):
    """The first pass encodes each record with the JPEG draws of the epoch that trains on it."""
    augmented, plain = noisy_metas
    runs = {"live": (augmented, False), "cached": (augmented, True), "plain": (plain, True)}
    for name, (meta, precompute) in runs.items():  # batch 1: the cached pass is exact (same shapes)
        train(config(chat_folder, meta, tmp_path / name, max_steps=4, batch_size=1, precompute_ref=precompute))
    live, cached, plain_rows = (metric_rows(tmp_path / name) for name in runs)
    assert (cached[0]["rewards/chosen"], cached[0]["rewards/rejected"]) == (0.0, 0.0)
    for a, b in zip(live, cached, strict=True):
        for key in ("loss", "loss/pref", "loss/quality", "rewards/chosen", "rewards/rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert [r["loss"] for r in plain_rows] != [r["loss"] for r in cached]
    fingerprint = json.loads((tmp_path / "cached" / "ref_logps.json").read_text())
    assert fingerprint["data_augment"] == ["toy"] and "data_augment" not in json.loads(
        (tmp_path / "plain" / "ref_logps.json").read_text())


def test_precomputed_reference_with_data_augment_refuses_a_second_epoch(tmp_path, chat_folder, noisy_metas):
    augmented, plain = noisy_metas
    message = (r"--precompute-ref with data_augment datasets needs the run to stay in its first epoch, but it trains"
               r" on 12 samples per process and the first epoch holds 10 usable ones")
    with pytest.raises(ConfigError, match=message):
        train(config(chat_folder, augmented, tmp_path / "run", max_steps=6, precompute_ref=True))
    assert not (tmp_path / "run").exists()
    assert train(config(chat_folder, plain, tmp_path / "plain", max_steps=6, precompute_ref=True)).steps == 6
    # Records that --skip-bad will skip count too: the pass finds them, before any training step.
    root = tmp_path / "bad"
    records = color_pairs(8, text_only=2)
    records[3] = {"image": "grey.png", "question": "long " * 400, "chosen": "a", "rejected": "b"}
    meta = write_mmpr(root, records, data_augment=True)
    write_noise_images(root / "images")
    cfg = config(chat_folder, meta, tmp_path / "skip", max_steps=5, max_seq_length=400, skip_bad=True,
                 precompute_ref=True)
    with pytest.raises(ConfigError, match=r"on 10 samples per process and the first epoch holds 9 usable ones"):
        train(cfg)
    assert not (tmp_path / "skip" / "metrics.jsonl").exists()
    assert train(dataclasses.replace(cfg, output=str(tmp_path / "fits"), max_steps=4)).steps == 4


def test_precomputed_reference_is_recomputed_after_the_annotations_change(tmp_path, chat_folder):
    # The same number of lines, so records and file:line sources match: only the contents tell.
    meta = write_mmpr(tmp_path / "data", color_pairs(4))
    run = config(chat_folder, meta, tmp_path / "run", max_steps=1, batch_size=1, precompute_ref=True)
    train(run)
    shutil.rmtree(tmp_path / "run" / "final")  # keep the cache, drop what a fresh run may not overwrite
    (tmp_path / "run" / "metrics.jsonl").unlink()
    annotation = tmp_path / "data" / "toy.jsonl"
    annotation.write_text(annotation.read_text().replace("It is purple.", "It is a deep purple, surely."))
    train(run)
    row = metric_rows(tmp_path / "run")[0]
    assert (row["rewards/chosen"], row["rewards/rejected"]) == (0.0, 0.0)  # the reference is the initial policy


def rerun_keeping_the_cache(run: TrainConfig, capsys) -> tuple[list[dict], str]:
    """Train `run` again in its folder, whose ref_logps.* stay: (its metric rows, what it printed)."""
    shutil.rmtree(Path(run.output) / "final")  # drop what a fresh run may not overwrite
    (Path(run.output) / "metrics.jsonl").unlink()
    capsys.readouterr()
    train(run)
    return metric_rows(Path(run.output)), capsys.readouterr().out


def scale_weight(folder: Path, key: str = "language_model.model.norm.weight") -> None:
    """Edit one tensor of the folder's model.safetensors in place."""
    from safetensors.torch import save_file

    tensors = load_file(folder / "model.safetensors")
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("change", ["weights", "other_model", "tokenizer", "images", "video_frames"])
def test_precomputed_reference_is_recomputed_when_its_inputs_change(tmp_path, chat_folder, change, capsys):
    """Whatever decides the reference log-probs keys the cache: the model's files (edited in place or another
    folder), the tokenizer's, the images (edited in place), the example settings; a stale cache would give
    step-1 rewards other than 0."""
    model, tokenizer = tmp_path / "model", tmp_path / "tokenizer"
    shutil.copytree(chat_folder, model)
    shutil.copytree(chat_folder, tokenizer)
    meta = write_mmpr(tmp_path / "data", color_pairs(4))
    run = config(model, meta, tmp_path / "run", max_steps=2, batch_size=1, precompute_ref=True, tokenizer=str(tokenizer))
    train(run)
    if change == "weights":
        scale_weight(model)
    elif change == "other_model":
        shutil.copytree(model, tmp_path / "other")
        scale_weight(tmp_path / "other")
        run = dataclasses.replace(run, model=str(tmp_path / "other"))
    elif change == "tokenizer":
        settings = json.loads((tokenizer / "tokenizer_config.json").read_text())
        (tokenizer / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 77}))
    elif change == "images":
        write_noise_images(tmp_path / "data" / "images")  # the same names, other pixels
    else:
        run = dataclasses.replace(run, video_frames=4)
    rows, printed = rerun_keeping_the_cache(run, capsys)
    key = {"weights": "model", "other_model": "model"}.get(change, change.replace("images", "media"))
    assert f"ref_logps.safetensors was computed from other inputs ({key}): computing it again" in printed
    assert [(r["rewards/chosen"], r["rewards/rejected"]) for r in rows][:1] == [(0.0, 0.0)]


def test_a_config_edit_is_not_named_a_tokenizer_change(tmp_path, chat_folder, capsys):
    """Without --tokenizer the tokenizer is the model folder's files, which the model's digest covers: an edited
    config.json (tokenizer files unchanged) is a change of the model, and the note does not name the tokenizer."""
    model = tmp_path / "model"
    shutil.copytree(chat_folder, model)
    meta = write_mmpr(tmp_path / "data", color_pairs(4))
    run = config(model, meta, tmp_path / "run", max_steps=1, batch_size=1, precompute_ref=True)
    train(run)
    settings = json.loads((model / "config.json").read_text())
    settings["llm_config"]["rms_norm_eps"] = 2e-6
    (model / "config.json").write_text(json.dumps(settings))
    _, printed = rerun_keeping_the_cache(run, capsys)
    assert "ref_logps.safetensors was computed from other inputs (model): computing it again" in printed


def test_a_pass_killed_before_describing_its_values_leaves_no_stale_description(tmp_path, chat_folder, monkeypatch):
    """The values of a second pass (other weights) were in place and the first pass's description still beside
    them when the process died: going back to the first weights reused the second pass's values silently."""
    model = tmp_path / "model"
    shutil.copytree(chat_folder, model)
    first_weights = (model / "model.safetensors").read_bytes()
    meta = write_mmpr(tmp_path / "data", color_pairs(4))
    run = config(model, meta, tmp_path / "run", max_steps=1, batch_size=1, precompute_ref=True)
    train(run)
    shutil.rmtree(tmp_path / "run" / "final")
    (tmp_path / "run" / "metrics.jsonl").unlink()
    scale_weight(model)
    write_json = ckpt.write_json

    def killed_at_the_description(path, data):
        if Path(path).name.endswith("ref_logps.json"):
            raise KeyboardInterrupt
        write_json(path, data)

    monkeypatch.setattr(ckpt, "write_json", killed_at_the_description)
    with pytest.raises(KeyboardInterrupt):
        train(run)
    monkeypatch.setattr(ckpt, "write_json", write_json)
    (model / "model.safetensors").write_bytes(first_weights)
    train(run)
    row = metric_rows(tmp_path / "run")[0]
    assert (row["rewards/chosen"], row["rewards/rejected"]) == (0.0, 0.0)  # the reference is the initial policy


def test_precomputed_reference_is_reused_from_a_moved_model_folder(tmp_path, chat_folder, capsys):
    meta = write_mmpr(tmp_path / "data", color_pairs(4))
    shutil.copytree(chat_folder, tmp_path / "model")
    run = config(tmp_path / "model", meta, tmp_path / "run", max_steps=1, batch_size=1, precompute_ref=True)
    train(run)
    cached = (tmp_path / "run" / "ref_logps.safetensors").stat().st_mtime_ns
    (tmp_path / "model").rename(tmp_path / "moved")
    _, printed = rerun_keeping_the_cache(dataclasses.replace(run, model=str(tmp_path / "moved")), capsys)
    assert "computing it again" not in printed
    assert (tmp_path / "run" / "ref_logps.safetensors").stat().st_mtime_ns == cached


def test_a_reference_cache_of_other_records_is_refused(tmp_path, chat_folder, capsys):
    """Values whose description matches the run but which hold another count of records (a file swapped in by
    hand) would index past their end or give records other records' log-probs: named, not used."""
    meta = write_mmpr(tmp_path / "data", color_pairs(4))
    run = config(chat_folder, meta, tmp_path / "run", max_steps=1, batch_size=1, precompute_ref=True)
    train(run)
    table = load_file(tmp_path / "run" / "ref_logps.safetensors")
    ckpt.write_tensors(tmp_path / "run" / "ref_logps.safetensors", {k: v[:3] for k, v in table.items()})
    with pytest.raises(CheckpointError, match=r"ref_logps.safetensors: holds \{'chosen': \(3,\), .* not the chosen,"
                                              r" rejected and valid values of the 4 records its ref_logps.json"):
        rerun_keeping_the_cache(run, capsys)


def test_a_record_without_precomputed_reference_log_probs_is_skipped(tmp_path, chat_folder, capsys):
    # The pass (--skip-bad) could not read one image: the cache holds no values for that record. Once the
    # image is mended the cache is computed again (the images key it); a cache whose pass failed on a record
    # for another reason (a read error on a network filesystem, say) keeps it a bad record, which must not
    # train against a reference log-prob of 0.
    meta = write_mmpr(tmp_path / "data", color_pairs(4))
    image = tmp_path / "data" / "images" / "red.png"  # line 1's picture
    good = image.read_bytes()
    image.write_bytes(b"not a png")
    run = config(chat_folder, meta, tmp_path / "run", max_steps=4, batch_size=1, lr=0.0, precompute_ref=True,
                 skip_bad=True)  # lr 0: the policy stays the reference, so every reward is exactly 0
    train(run)
    assert load_file(tmp_path / "run" / "ref_logps.safetensors")["valid"].tolist().count(0) == 1
    image.write_bytes(good)
    rows, _ = rerun_keeping_the_cache(run, capsys)
    table = load_file(tmp_path / "run" / "ref_logps.safetensors")
    assert bool(table["valid"].all()) and rows[-1]["skipped"] == 0
    table["valid"][0] = 0  # the first record (not line 1: MMPR datasets are shuffled)
    ckpt.write_tensors(tmp_path / "run" / "ref_logps.safetensors", table)
    rows, _ = rerun_keeping_the_cache(run, capsys)
    assert [(r["rewards/chosen"], r["rewards/rejected"]) for r in rows] == [(0.0, 0.0)] * 4
    assert rows[-1]["skipped"] == 1
    (tmp_path / "strict").mkdir()
    for name in ("ref_logps.safetensors", "ref_logps.json"):
        shutil.copy(tmp_path / "run" / name, tmp_path / "strict" / name)
    with pytest.raises(InputError, match=r"toy.jsonl:\d: no reference log-probs: .*\(pass --skip-bad"):
        train(dataclasses.replace(run, output=str(tmp_path / "strict"), skip_bad=False))


@pytest.mark.parametrize("precompute_ref", [False, True])
def test_bf16_reference_is_the_initial_policy(tmp_path, chat_folder, meta, precompute_ref):
    # One pair per micro-batch, so the precomputed pass sees the same shapes as the training step.
    run = config(chat_folder, meta, tmp_path / "run", max_steps=1, batch_size=1, precompute_ref=precompute_ref)
    if precompute_ref:  # a float32 cache in the folder is not reused by a bf16 run
        train(run)
        shutil.rmtree(tmp_path / "run" / "final")  # keep the cache, drop what a fresh run may not overwrite
        (tmp_path / "run" / "metrics.jsonl").unlink()
    train(dataclasses.replace(run, precision="bf16", device="cpu"))
    row = metric_rows(tmp_path / "run")[0]
    assert (row["rewards/chosen"], row["rewards/rejected"]) == (0.0, 0.0)
    assert row["loss/pref"] == pytest.approx(math.log(2), abs=1e-7)


def test_dpo_mode_is_the_sigmoid_term_alone(tmp_path, chat_folder, meta):
    train(config(chat_folder, meta, tmp_path / "run", mode="dpo", max_steps=1))
    row = metric_rows(tmp_path / "run")[0]
    assert "loss/quality" not in row and "delta" not in row
    assert row["loss"] == pytest.approx(row["loss/pref"], rel=1e-6)


def test_logged_delta_is_the_mean_shift_of_the_steps_micro_batches(tmp_path, chat_folder, meta, monkeypatch):
    """As TRL's BCOTrainer logs it: each micro-batch's shift (the running mean after its own update), averaged
    over the micro-batches logged together; not the running mean after the step, which the checkpoint holds."""
    shifts = []
    micro_batch_loss = mpo.micro_batch_loss

    def recording(*args):
        loss, metrics = micro_batch_loss(*args)
        shifts.append(metrics["delta"])
        return loss, metrics

    monkeypatch.setattr(mpo, "micro_batch_loss", recording)
    train(config(chat_folder, meta, tmp_path / "run", max_steps=2, batch_size=1, grad_accum=2, save_every=2))
    rows = metric_rows(tmp_path / "run")
    assert [r["delta"] for r in rows] == pytest.approx([sum(shifts[:2]) / 2, sum(shifts[2:]) / 2], rel=1e-12)
    state = json.loads((tmp_path / "run" / "checkpoint-000002" / "trainer_state.json").read_text())
    assert state["running_mean"]["mean"] == shifts[-1] != pytest.approx(rows[-1]["delta"])


@pytest.mark.parametrize("total", [1, 7, 1500])
@pytest.mark.parametrize("ratio", [0.0, 0.03, 0.5, 1.0])
def test_lr_schedule_is_transformers_cosine_with_warmup(total, ratio):
    """`lr_at` against transformers' scheduler driven as the HF Trainer drives it: one scheduler step after each
    optimizer step, ceil(ratio * total) warmup steps (`TrainingArguments.get_warmup_steps`)."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-6)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(ratio * total), total)
    for step in range(total):
        assert mpo.lr_at(step, total, ratio, 1e-6) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12, abs=1e-22)
        optimizer.step()
        schedule.step()


def test_max_grad_norm_0_reports_the_norm_and_clips_nothing():
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([3.0, 4.0])
    assert mpo._grad_norm([param], 0.0) == pytest.approx(5.0) and param.grad.tolist() == [3.0, 4.0]
    assert mpo._grad_norm([param], 1.0) == pytest.approx(5.0)
    assert param.grad.tolist() == pytest.approx([0.6, 0.8], rel=1e-5)


def test_vit_drop_path_rises_as_the_official_linspace(chat_folder):
    """InternViT's `dpr = torch.linspace(0, drop_path_rate, num_hidden_layers)`: the last layer gets the full rate."""
    model = InternVL.from_pretrained(chat_folder, dtype=torch.float32)
    layers = model.vision_model.encoder.layers
    set_drop_path(model, 0.1)
    assert [layer.drop_path.rate for layer in layers] == pytest.approx(torch.linspace(0, 0.1, len(layers)).tolist())
    assert model.config.vision.drop_path_rate == 0.1


def test_weight_decay_skips_biases_and_norm_weights_only(chat_folder):
    model = InternVL.from_pretrained(chat_folder, dtype=torch.float32)
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.05))
    name = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: {name[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    # the projector's LayerNorm is mlp1.0; ViT norm1/norm2, the LLM's input/post-attention norms and final norm
    plain = {n for n in name.values()
             if n.endswith(".bias") or re.search(r"norm\w*\.weight$", n) or n == "mlp1.0.weight"}
    assert groups == {0.05: set(name.values()) - plain, 0.0: plain}
    assert "vision_model.encoder.layers.0.ls1" in groups[0.05]  # layer scales are no norm: decayed


def test_a_lora_rank_no_layer_can_use_is_refused_before_any_adapter_is_made(tmp_path, chat_folder, meta):
    """A huge --lora-rank asked torch for adapters of that many rows: a traceback from the allocator (10**9: 256 GB
    per layer) or from torch.empty (10**20), or the kernel's OOM kill where each allocation fits but not all. B @ A
    has rank at most min(in, out) of its layer, so a rank past every adapted layer's is refused in one line (64 is the
    tiny LLM's hidden size), before the run folder is made."""
    with pytest.raises(ConfigError, match=r"^--lora-rank 100000000000000000000 is more than any adapted layer can"
                                          r" use: .*, 64 at the largest in this model$"):
        train(config(chat_folder, meta, tmp_path / "run", lora_rank=10**20))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"^--lora-rank 65 is more"):
        train(config(chat_folder, meta, tmp_path / "run", lora_rank=65, lora_vision=True))
    assert train(config(chat_folder, meta, tmp_path / "ok", lora_rank=64, max_steps=1)).steps == 1


def test_lora_alpha_defaults_to_twice_the_rank():
    """The official `wrap_llm_lora` / `wrap_backbone_lora` use lora_alpha = 2 * r: the adapters' scale is 2."""
    assert TrainConfig(lora_rank=4).lora_scale == 2.0 and TrainConfig(lora_rank=16).lora_scale == 2.0
    assert TrainConfig(lora_rank=4, lora_alpha=2.0).lora_scale == 0.5 and TrainConfig().lora_scale == 0.0


def test_train_takes_pathlib_paths_from_python(tmp_path, chat_folder, meta):
    """train() from Python with pathlib.Path settings (as tmp_path gives them) trains as with their text; an SFT
    file whose suffix is upper case was read as a meta.json ("not valid JSON")."""
    cfg = TrainConfig(model=chat_folder, data=meta, output=tmp_path / "run", max_steps=1, batch_size=2,
                      warmup_ratio=0.0, grad_checkpointing=False, progress=False, save_every=1)
    assert (cfg.model, cfg.data, cfg.output) == (str(chat_folder), str(meta), str(tmp_path / "run"))
    result = train(cfg)
    assert result.final_dir == tmp_path / "run" / "final" and (tmp_path / "run" / "checkpoint-000001").is_dir()
    sft = tmp_path / "sft.JSONL"
    sft.write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]})
                   + "\n")
    result = train(TrainConfig(mode="sft", model=chat_folder, data=sft, output=tmp_path / "sft", max_steps=1,
                               grad_checkpointing=False, progress=False))
    assert metric_rows(tmp_path / "sft")[0]["step"] == 1 and result.final_dir.is_dir()


def test_gradient_accumulation_equals_the_larger_micro_batch(tmp_path, chat_folder, meta):
    # Plain DPO is a per-pair mean, so 2 micro-batches of 1 pair accumulate to 1 micro-batch of 2 pairs.
    one = train(config(chat_folder, meta, tmp_path / "one", mode="dpo", batch_size=2, max_steps=2))
    two = train(config(chat_folder, meta, tmp_path / "two", mode="dpo", batch_size=1, grad_accum=2, max_steps=2))
    for a, b in zip(metric_rows(tmp_path / "one"), metric_rows(tmp_path / "two"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    expected = load_weights(one.final_dir)
    # Two AdamW steps at lr 1e-3 move each weight by ~2e-3; Adam's normalisation magnifies the summation
    # order on near-zero gradients, hence atol 1e-4.
    for key, value in load_weights(two.final_dir).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-4)


def test_hub_id_model_takes_its_tokenizer_from_the_downloaded_folder(tmp_path, chat_folder, meta, fake_hub):
    asked = fake_hub(chat_folder)
    result = train(config(chat_folder, meta, tmp_path / "run", model="OpenGVLab/InternVL2_5-4B", max_steps=1))
    assert asked == ["OpenGVLab/InternVL2_5-4B"]
    assert (result.final_dir / "tokenizer_config.json").is_file()


def test_an_unknown_template_is_refused_before_the_weights_load(tmp_path, chat_folder, meta):
    """Chat and training render prompts with the config's template: an InternVL2 checkpoint's
    'internlm2-chat' must stop at once, not after loading the weights (or at the first question), naming
    the config.json and its key (the error named neither)."""
    from internvl_mpo.pipeline import InternVLChat

    folder = tmp_path / "model"
    shutil.copytree(chat_folder, folder)
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**settings, "template": "internlm2-chat"}))
    for weights in folder.glob("*.safetensors"):
        weights.unlink()  # an error about the weights would mean they were read first
    message = re.escape(f"{folder / 'config.json'}: unknown conversation template 'internlm2-chat'; "
                        "known: ['internvl2_5'] (the key \"template\")")
    with pytest.raises(ConfigError, match=message):
        InternVLChat.from_pretrained(folder)
    with pytest.raises(ConfigError, match=message):
        train(config(folder, meta, tmp_path / "run", max_steps=1))
    with pytest.raises(ConfigError, match=message):
        train(config(folder, meta, tmp_path / "run", model=None, init_from_config=str(folder / "config.json"),
                     tokenizer=str(folder), max_steps=1))


def test_sft_from_scratch_with_init_from_config(tmp_path, chat_folder):
    data = tmp_path / "sft.jsonl"
    convo = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]
    write_mmpr(tmp_path, [])
    data.write_text("\n".join(json.dumps({"image": "red.png", "conversations": convo}) for _ in range(4)) + "\n")
    result = train(TrainConfig(
        mode="sft", init_from_config=str(chat_folder / "config.json"), tokenizer=str(chat_folder), data=str(data),
        image_root=str(tmp_path / "images"), output=str(tmp_path / "run"), max_steps=3, batch_size=2, lr=1e-2,
        warmup_ratio=0.0, progress=False,
    ))
    rows = metric_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["nll"] < rows[0]["nll"]
    assert rows[0]["loss"] == pytest.approx(rows[0]["nll"]) and "rewards/chosen" not in rows[0]
    model = InternVL.from_pretrained(result.final_dir, dtype=torch.float32)
    assert (result.final_dir / "tokenizer_config.json").is_file()
    assert model.image_token_id == load_tokenizer(chat_folder).img_context_id


# ----------------------------------------------------------------------------- LoRA, freezing


def test_a_fresh_lora_adapter_changes_nothing(chat_folder, meta):
    """B starts at zero (PEFT's default), so a LoRA run's policy starts as its reference; A is PEFT's
    kaiming_uniform_(a=sqrt(5)), U(-1/sqrt(in), 1/sqrt(in))."""
    model, batch = pair_batch(chat_folder, meta)
    ids = batch.input_ids[:1, : int(batch.attention_mask[0].sum())]
    tiles = batch.pixel_values[: int(batch.num_tiles[0])]
    with torch.no_grad():
        before = model(ids, pixel_values=tiles)
    names = lora_target_names(model, vision=True)
    apply_lora(model, names, rank=4, alpha=8.0)
    with torch.no_grad():
        assert torch.equal(model(ids, pixel_values=tiles), before)
    a = model.get_submodule(names[0]).lora_A
    bound = 1 / math.sqrt(a.shape[1])
    assert bound / 2 < a.abs().max() <= bound


def test_lora_merges_into_plain_weights(tmp_path, chat_folder, meta):
    model, batch = pair_batch(chat_folder, meta)
    names = lora_target_names(model, vision=True)
    assert len(names) == 7 * 2 + 4 * 2  # 2 decoder blocks x 7 projections, 2 ViT layers x 4
    apply_lora(model, names, rank=4, alpha=8.0)
    with torch.no_grad():
        for name in names:
            torch.nn.init.normal_(model.get_submodule(name).lora_B, std=0.05)
    ids = batch.input_ids[:1, : int(batch.attention_mask[0].sum())]
    tiles = batch.pixel_values[: int(batch.num_tiles[0])]
    with torch.no_grad():
        expected = model(ids, pixel_values=tiles)
    ckpt.export_model(official_state(model.state_dict(), TrainConfig(lora_rank=4, lora_alpha=8.0)), model,
                      tmp_path / "merged")
    plain = InternVL.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        got = plain(ids, pixel_values=tiles)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(plain.language_model.model.layers[0].self_attn.q_proj.weight,
                           InternVL.from_pretrained(chat_folder).language_model.model.layers[0].self_attn.q_proj.weight)


def test_a_resume_refuses_weights_holding_nan_or_inf(tmp_path, chat_folder, meta):
    """A checkpoint's LoRA adapters (extra.safetensors) holding NaN went into the resumed run without a word, and so
    did its model/ weights."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = config(chat_folder, meta, tmp_path / "run", max_steps=2, save_every=1, batch_size=1, lora_rank=2)
    train(cfg)
    saved = tmp_path / "run" / "checkpoint-000001"
    shutil.rmtree(tmp_path / "run" / "final")
    shutil.rmtree(tmp_path / "run" / "checkpoint-000002")
    for file, key in ((saved / "model" / "model.safetensors", "language_model.model.norm.weight"),
                      (saved / ckpt.EXTRA_FILE, None)):
        kept = file.read_bytes()
        with safe_open(str(file), "pt") as f:
            metadata = f.metadata()
        tensors = load_file(file)
        key = key or sorted(tensors)[-1]
        tensors[key].view(-1)[-1] = float("nan")
        save_file(tensors, file, metadata=metadata)
        with pytest.raises(CheckpointError, match=re.escape(f"{file}: {key} holds NaN or inf values; the checkpoint "
                                                            "is broken")):
            train(dataclasses.replace(cfg, resume=True))
        file.write_bytes(kept)


def test_a_resume_refuses_adapters_of_another_shape(tmp_path, chat_folder, meta):
    """extra.safetensors holding adapters of another rank (a damaged or mixed-up checkpoint): one line naming the
    file, not load_state_dict's size-mismatch traceback; adapters missing from it likewise."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = config(chat_folder, meta, tmp_path / "run", max_steps=2, save_every=1, batch_size=1, lora_rank=2)
    train(cfg)
    saved = tmp_path / "run" / "checkpoint-000001" / ckpt.EXTRA_FILE
    shutil.rmtree(tmp_path / "run" / "final")
    shutil.rmtree(tmp_path / "run" / "checkpoint-000002")
    with safe_open(str(saved), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(saved)
    wider = {k: torch.zeros(3, v.shape[1]) if k.endswith("lora_A") else torch.zeros(v.shape[0], 3)
             for k, v in tensors.items()}
    fewer = dict(sorted(tensors.items())[2:])
    for adapters in (wider, fewer):
        save_file(adapters, saved, metadata=metadata)
        with pytest.raises(CheckpointError, match=re.escape(f"{saved}: LoRA adapters do not match this run's "
                                                            "--lora-* settings")):
            train(dataclasses.replace(cfg, resume=True))


def test_lora_training_writes_official_layout(tmp_path, chat_folder, meta):
    result = train(config(chat_folder, meta, tmp_path / "run", lora_rank=4, save_every=2))
    initial, final = load_weights(chat_folder), load_weights(result.final_dir)
    assert initial.keys() == final.keys()
    assert torch.equal(initial["language_model.model.embed_tokens.weight"], final["language_model.model.embed_tokens.weight"])
    assert not torch.equal(initial["language_model.model.layers.1.mlp.down_proj.weight"],
                           final["language_model.model.layers.1.mlp.down_proj.weight"])
    adapters = load_file(tmp_path / "run" / "checkpoint-000002" / ckpt.EXTRA_FILE)
    assert len(adapters) == 2 * 14 and all(k.endswith((".lora_A", ".lora_B")) for k in adapters)


@pytest.mark.parametrize("flags, frozen, trained", [
    ({"freeze_vision": True, "freeze_projector": True}, ("vision_model.", "mlp1."), "language_model."),
    ({"freeze_llm": True}, ("language_model.",), "vision_model."),
])
def test_freeze_flags_keep_frozen_weights_bit_identical(tmp_path, chat_folder, meta, flags, frozen, trained):
    result = train(config(chat_folder, meta, tmp_path / "run", **flags))
    initial, final = load_weights(chat_folder), load_weights(result.final_dir)
    for key, value in initial.items():
        if key.startswith(frozen):
            assert torch.equal(value, final[key]), key
    assert any(not torch.equal(v, final[k]) for k, v in initial.items() if k.startswith(trained))




def test_a_frozen_llm_trains_through_text_only_micro_batches(tmp_path, chat_folder):
    """Only the vision side trains and a micro-batch has no image: its loss reaches no trainable weight.
    It adds a zero gradient (as under DDP and in the official trainer's dummy image) instead of failing
    in backward ("element 0 of tensors does not require grad")."""
    meta = write_mmpr(tmp_path / "mmpr", color_pairs(1, text_only=1))
    result = train(config(chat_folder, meta, tmp_path / "run", batch_size=1, max_steps=2, shuffle=False,
                          freeze_llm=True))
    assert [row["grad_norm"] > 0 for row in metric_rows(tmp_path / "run")] == [True, False]
    initial, final = load_weights(chat_folder), load_weights(result.final_dir)
    assert all(torch.equal(v, final[k]) for k, v in initial.items() if k.startswith("language_model."))
# ----------------------------------------------------------------------------- bad data, CLI


def test_bad_records_name_file_and_line_or_are_counted(tmp_path, chat_folder):
    records = color_pairs(6)
    records.insert(1, '{"question": "broken json"')
    records.insert(3, {"image": "missing.png", "question": "q", "chosen": "a", "rejected": "b"})
    records.insert(5, {"image": "grey.png", "question": "long " * 400, "chosen": "a", "rejected": "b"})
    meta = write_mmpr(tmp_path / "data", records)
    annotation = tmp_path / "data" / "toy.jsonl"
    with pytest.raises(InputError, match=rf"{annotation}:2: malformed JSON"):
        train(config(chat_folder, meta, tmp_path / "a"))
    records.pop(1)
    write_mmpr(tmp_path / "data", records)
    with pytest.raises(InputError, match=rf"{annotation}:3: image file not found"):
        train(config(chat_folder, meta, tmp_path / "b"))
    records.pop(2)
    write_mmpr(tmp_path / "data", records)
    with pytest.raises(InputError, match=rf"{annotation}:4: the prompt is \d+ tokens.*--skip-bad"):
        train(config(chat_folder, meta, tmp_path / "c", max_seq_length=400, max_steps=4))

    records.insert(1, '{"question": "broken json"')
    records.insert(3, {"image": "missing.png", "question": "q", "chosen": "a", "rejected": "b"})
    write_mmpr(tmp_path / "data", records)
    result = train(config(chat_folder, meta, tmp_path / "d", max_seq_length=400, max_steps=6, skip_bad=True))
    assert result.skipped.counts == {"json": 1, "missing_file": 1, "encode": 1}
    assert metric_rows(tmp_path / "d")[-1]["skipped"] == 3


class BadRecords:
    """A dataset whose items are all `BadExample`s except those in `good`; counts its reads."""

    def __init__(self, n: int, good: tuple[int, ...] = ()):
        self.n, self.good, self.reads = n, good, 0

    def __len__(self) -> int:
        return self.n

    def at_epoch(self, epoch: int) -> BadRecords:
        return self

    def __getitem__(self, index: int):
        self.reads += 1
        assert self.reads <= 10 * self.n, "the stream read ten epochs without stopping"
        return index if index in self.good else BadExample(index, "encode", f"toy.jsonl:{index + 1}: too long")


def test_skip_bad_stops_after_a_whole_epoch_without_a_usable_sample():
    cfg = TrainConfig(skip_bad=True, shuffle=False)
    stream = SampleStream(BadRecords(4, good=(2,)), DistEnv(), cfg, SkipReport())
    assert [stream.next_example() for _ in range(3)] == [2, 2, 2]  # one usable record is enough

    data = BadRecords(4)
    stream = SampleStream(data, DistEnv(), cfg, SkipReport())
    with pytest.raises(InputError, match=r"no usable sample in a whole epoch: all 4 samples .* toy\.jsonl:1: too long"):
        stream.next_example()
    assert data.reads == 4 and stream.report.counts == {"encode": 4}
    with pytest.raises(InputError, match=r"^no usable sample in a whole epoch: the 1 sample of this process was bad "
                                         r"and skipped \(--skip-bad\); first problem: toy\.jsonl:1: too long$"):
        SampleStream(BadRecords(1), DistEnv(), cfg, SkipReport()).next_example()  # "all 1 samples ... were" before


def test_skip_bad_moves_on_where_one_process_share_is_bad_but_the_next_epoch_deals_it_others():
    """With several processes a share of an epoch can be all bad while the epoch holds usable records, which one
    process would train on: the run stopped there. The process goes on to the next epoch when it deals it a record
    not known to be bad, and stops, saying why, when every epoch deals it the same bad ones."""
    rank1 = DistEnv(rank=1, world_size=2)
    no_shuffle = TrainConfig(skip_bad=True, shuffle=False)
    rotated = SampleStream(BadRecords(5, good=(0, 2, 4)), rank1, no_shuffle, SkipReport())
    assert [rotated.next_example() for _ in range(2)] == [0, 2]  # epoch 0 dealt it 1 and 3; epoch 1 deals 0, 2, 4
    assert rotated.epoch == 1 and rotated.report.counts == {"encode": 2}
    shuffled = SampleStream(BadRecords(4, good=(0, 2)), rank1, TrainConfig(skip_bad=True, seed=12), SkipReport())
    assert shuffled.next_example() in (0, 2)
    same = SampleStream(BadRecords(4, good=(0, 2)), rank1, no_shuffle, SkipReport())
    with pytest.raises(InputError, match=r"^no usable sample in a whole epoch: all 2 samples of this process were bad "
                                         r"and skipped \(--skip-bad\), and the next epoch deals it only records known "
                                         r"to be bad \(2 processes share each epoch; fewer, or shuffling"):
        same.next_example()


class PillowLimits:
    """A dataset whose items are Pillow's MAX_IMAGE_PIXELS in the process that reads them."""

    def __len__(self) -> int:
        return 2

    def at_epoch(self, epoch: int) -> PillowLimits:
        return self

    def __getitem__(self, index: int):
        from PIL import Image

        return Image.MAX_IMAGE_PIXELS


def test_loader_workers_keep_the_pillow_limit_that_max_pixels_raised(monkeypatch):
    """Spawned workers started with Pillow's default limit: with --num-workers, an image past twice it was
    refused whatever --max-pixels allowed."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400_000_000)  # as `let_pillow_open(400_000_000)` sets it
    stream = SampleStream(PillowLimits(), DistEnv(), TrainConfig(shuffle=False, num_workers=1), SkipReport())
    assert [stream.next_example() for _ in range(2)] == [400_000_000] * 2


def test_max_seq_length_is_capped_by_the_models_context(tmp_path, chat_folder, meta):
    """RoPE is computed for any position, so a sequence past max_position_embeddings would train silently
    on positions the model never saw: an explicit longer --max-seq-length is refused, the default is
    min(8192, context)."""
    short = tmp_path / "short"
    shutil.copytree(chat_folder, short)
    config_json = json.loads((short / "config.json").read_text())
    config_json["llm_config"]["max_position_embeddings"] = 400
    (short / "config.json").write_text(json.dumps(config_json))
    unread = tmp_path / "unread"
    shutil.copytree(short, unread, ignore=shutil.ignore_patterns("*.safetensors"))  # refused before the weights
    with pytest.raises(ConfigError, match=r"^--max-seq-length 401 is longer than the model's context of 400 tokens"):
        train(config(unread, meta, tmp_path / "a", max_seq_length=401))
    assert not (tmp_path / "a").exists()
    long = write_mmpr(tmp_path / "data", [*color_pairs(2), {"question": "long " * 400, "chosen": "a", "rejected": "b"}])
    with pytest.raises(InputError, match=r"toy\.jsonl:3: the prompt is \d+ tokens.*--max-seq-length 400;"):
        train(config(short, long, tmp_path / "b", max_steps=3, batch_size=1, shuffle=False))
    assert train(config(short, meta, tmp_path / "c", max_seq_length=400, max_steps=1)).steps == 1
    assert TrainConfig().max_seq_length is None
    assert max_seq_length(TrainConfig(), ModelConfig.from_json(chat_folder / "config.json")) == 8192


def test_max_dynamic_patch_flag_wins_over_meta_json(tmp_path, chat_folder):
    pair = {"image": "grey.png", "question": "q", "chosen": "a", "rejected": "b"}
    convo = {"image": "grey.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    meta = write_mmpr(tmp_path, [pair], max_dynamic_patch=6)
    (tmp_path / "toy_sft.jsonl").write_text(json.dumps(convo) + "\n")
    sft_meta = json.loads(meta.read_text())
    sft_meta["toy"]["annotation"] = str(tmp_path / "toy_sft.jsonl")
    (tmp_path / "sft_meta.json").write_text(json.dumps(sft_meta))
    tokenizer = load_tokenizer(chat_folder)
    model_config = ModelConfig.from_json(chat_folder / "config.json")
    six = load_image(tmp_path / "images" / "grey.png", max_num=6, image_size=model_config.image_size).shape[0]
    for mode, data in (("mpo", meta), ("sft", tmp_path / "sft_meta.json")):
        tiles = {}
        for flag in (None, 1):
            cfg = TrainConfig(mode=mode, data=str(data), output=str(tmp_path / "o"), max_dynamic_patch=flag)
            dataset, _ = build_dataset(cfg, tokenizer, model_config)
            tiles[flag] = dataset[0].pixel_values.shape[0]
        assert tiles == {None: six, 1: 1} and six > 1, mode


def test_sft_meta_repeat_time_keeps_the_official_lines(tmp_path, chat_folder):
    # The official fine-tuning dataset keeps the first int(n * repeat_time) lines of a subsampled file (it
    # never reads the others) and does not shuffle per dataset; SFT took MMPR's random sample and shuffle.
    lines = [json.dumps({"conversations": [{"from": "human", "value": f"q{k}"}, {"from": "gpt", "value": f"a{k}"}]})
             for k in range(10)]
    (tmp_path / "sft.jsonl").write_text("".join(line + "\n" for line in lines))
    (tmp_path / "tail.jsonl").write_text("".join(line + "\n" for line in lines) + "not json\n")
    tokenizer = load_tokenizer(chat_folder)
    model_config = ModelConfig.from_json(chat_folder / "config.json")
    for name, repeat_time, expected in (("tail", 0.35, [1, 2, 3]), ("sft", 2, list(range(1, 11)) * 2)):
        meta = {"toy": {"root": str(tmp_path), "annotation": str(tmp_path / f"{name}.jsonl"),
                        "repeat_time": repeat_time}}
        (tmp_path / "meta.json").write_text(json.dumps(meta))
        cfg = TrainConfig(mode="sft", data=str(tmp_path / "meta.json"), output=str(tmp_path / "o"))
        dataset, _ = build_dataset(cfg, tokenizer, model_config)
        assert [r.source.line for r in dataset.records] == expected


def test_meta_data_augment_reaches_pair_and_sft_datasets(tmp_path, chat_folder, noisy_metas):
    augmented, plain = noisy_metas
    convo = {"image": "grey.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    (tmp_path / "sft.jsonl").write_text(json.dumps(convo) + "\n")
    tokenizer = load_tokenizer(chat_folder)
    model_config = ModelConfig.from_json(chat_folder / "config.json")
    tiles = {}
    for mode, meta in (("mpo", augmented), ("mpo", plain), ("sft", augmented), ("sft", plain)):
        if mode == "sft":  # the same meta.json with the conversation file as annotation
            entries = json.loads(meta.read_text())
            entries["toy"]["annotation"] = str(tmp_path / "sft.jsonl")
            meta = tmp_path / f"sft_{meta.name}"
            meta.write_text(json.dumps(entries))
        dataset, _ = build_dataset(TrainConfig(mode=mode, data=str(meta), output=str(tmp_path / "o")), tokenizer,
                                   model_config)
        index = next(i for i, r in enumerate(dataset.records) if r.images and r.images[0].endswith("grey.png"))
        tiles[mode, meta.name.removeprefix("sft_")] = dataset[index].pixel_values
    grey = load_image(augmented.parent / "images" / "grey.png", image_size=model_config.image_size)
    for mode in ("mpo", "sft"):
        assert torch.equal(tiles[mode, plain.name], grey)
        assert tiles[mode, augmented.name].shape == grey.shape and not torch.equal(tiles[mode, augmented.name], grey)


def test_train_flags_are_the_config_fields():
    from internvl_mpo.train.cli import train as cli_train

    params = inspect.signature(cli_train).parameters
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert list(params) == list(fields)
    assert {k: p.default for k, p in params.items() if k != "mode"} == {k: v for k, v in fields.items() if k != "mode"}


def test_final_model_keeps_the_starting_checkpoints_dtype(tmp_path, chat_folder, meta):
    """A bf16 checkpoint (as every official one) trains on float32 weights; final/ is bf16 again, as the
    official trainer saves it, while the checkpoints keep float32 for an exact resume."""
    start = InternVL.from_pretrained(chat_folder, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    train(config(start, meta, tmp_path / "run", max_steps=1, save_every=1))
    final, saved = tmp_path / "run" / "final", tmp_path / "run" / "checkpoint-000001" / "model"
    assert json.loads((final / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((saved / "config.json").read_text())["torch_dtype"] == "float32"
    exact, rounded = load_file(saved / "model.safetensors"), load_file(final / "model.safetensors")
    assert rounded.keys() == exact.keys()
    for key, value in rounded.items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, exact[key].to(torch.bfloat16)), key


def test_cli_train_then_plot(tmp_path, chat_folder, meta):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "internvl_mpo.cli", "train", "mpo", "--model", str(chat_folder), "--data", str(meta),
           "--output", str(out), "--max-steps", "2", "--batch-size", "2", "--save-every", "2", "--no-progress",
           "--no-grad-checkpointing"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "final model" in done.stdout
    assert len(metric_rows(out)) == 2
    InternVL.from_pretrained(out / "checkpoint-000002" / "model")
    InternVL.from_pretrained(out / "final")

    from internvl_mpo.cli import main

    assert main(["plot", str(out), "--output", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_output_paths_and_missing_matplotlib(tmp_path, capsys, monkeypatch):
    from internvl_mpo.cli import main

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2)))
    for output, message in ((tmp_path / "no" / "c.png", "does not exist"), (tmp_path, "is a folder"),
                            (tmp_path / "c.svg", "only PNG pictures are written")):
        assert main(["plot", str(tmp_path), "--output", str(output)]) != 0
        err = capsys.readouterr().err
        assert f"error: {output}" in err and message in err and "Traceback" not in err
    assert main(["plot", str(tmp_path), "--output", str(tmp_path / "curves")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'curves.png'}"
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as when it is not installed
    assert main(["plot", str(tmp_path)]) != 0
    assert "pip install 'internvl-mpo[plot]'" in capsys.readouterr().err


def test_plot_with_a_matplotlib_that_cannot_be_imported_says_so(tmp_path, capsys, monkeypatch):
    """matplotlib 3.7.0 to 3.7.2 install beside NumPy 2, which they were not built for: pyplot's import failed deep
    inside with a traceback ("numpy.core.multiarray failed to import"); now one line naming matplotlib and the fix."""
    pytest.importorskip("matplotlib")
    from internvl_mpo.cli import main

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2)))
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # its import fails, as with NumPy 2
    assert main(["plot", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "error: matplotlib" in err and "cannot be imported" in err and "Traceback" not in err
    assert "pip install -U 'internvl-mpo[plot]'" in err and len(err.strip().splitlines()) == 1


def test_matplotlib_keeps_its_cache_out_of_the_home_folder():
    """matplotlib writes its font cache (~/.cache/matplotlib) and makes its config folder on its first import: the
    suite's are in its temporary folder (conftest)."""
    matplotlib = pytest.importorskip("matplotlib")
    assert not Path(matplotlib.get_cachedir()).is_relative_to(Path.home())
    assert not Path(matplotlib.get_configdir()).is_relative_to(Path.home())


def test_plot_skips_the_half_written_line_of_a_killed_run(tmp_path, capsys):
    from internvl_mpo.cli import main

    rows = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 3, "lo')  # killed during the append
    assert main(["plot", str(tmp_path)]) == 0, capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 3, "lo\n' + rows)  # a bad line inside still stops
    assert main(["plot", str(tmp_path)]) != 0
    assert f"{tmp_path / 'metrics.jsonl'}:3: not valid JSON" in capsys.readouterr().err


def test_plot_of_rows_without_a_plotted_value_is_one_line(tmp_path, capsys):
    """A metrics file whose rows hold none of the plotted keys made plt.subplots(0, 1) raise ValueError."""
    from internvl_mpo.cli import main

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lr": 0.1}\n{"step": 2, "lr": 0.2}\n')
    assert main(["plot", str(tmp_path)]) == 1
    assert f"{tmp_path / 'metrics.jsonl'}: no row holds a value to plot (one of loss," in capsys.readouterr().err


def test_plot_reads_lines_ending_at_lf_only(tmp_path):
    """str.splitlines() took an unescaped U+2028 or U+0085 in a JSON string for a line end, and the rest of the
    file was dropped as a half-written last line, without a word."""
    from internvl_mpo.train.cli import read_metrics

    rows = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5, "note": "a\u2028b\x85c"}, {"step": 3, "loss": 0.2}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 4, "lo', encoding="utf-8")  # and a cut last line
    assert read_metrics(tmp_path / "metrics.jsonl") == rows
    (tmp_path / "metrics.jsonl").write_bytes(text.replace("\n", "\r\n").encode())  # CRLF
    assert read_metrics(tmp_path / "metrics.jsonl") == rows


def test_plot_step_axis_has_whole_steps_only(tmp_path, monkeypatch):
    """A 4-step run's curves had ticks at steps 1.5, 2.5, ...: the step axis ticks whole steps only."""
    import matplotlib.figure

    from internvl_mpo.cli import main

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(rows))
    assert main(["plot", str(tmp_path)]) == 0
    ticks = saved[0].axes[-1].get_xticks()
    assert len(ticks) > 1 and all(t == int(t) for t in ticks), ticks


def test_plot_shows_a_lone_value_as_a_dot(tmp_path, monkeypatch):
    """A one-step run, or a value with gaps (null) on both sides, makes no line segment: it is drawn as a dot,
    and a one-step axis ticks that step only."""
    import matplotlib.figure

    from internvl_mpo.cli import main

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))

    def drawn(fig, key):  # the finite points of the lines drawn in `key`'s colour (the curve and any dots)
        ax = next(a for a in fig.axes if key in [t.get_text() for t in a.get_legend().get_texts()])
        colour = next(line.get_color() for line in ax.get_lines() if line.get_label() == key)
        return sorted((float(x), float(y)) for line in ax.get_lines() if line.get_color() == colour
                      for x, y in zip(line.get_xdata(), line.get_ydata()) if math.isfinite(y))

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    assert main(["plot", str(tmp_path)]) == 0
    assert (1.0, 0.5) in drawn(saved[-1], "loss")
    assert list(saved[-1].axes[-1].get_xticks()) == [1]
    values = [0.9, None, 0.7, None, 0.5, 0.4]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": v}) + "\n"
                                                    for s, v in enumerate(values, 1)))
    assert main(["plot", str(tmp_path)]) == 0
    points = drawn(saved[-1], "loss")
    assert {(1.0, 0.9), (3.0, 0.7)} <= set(points) and points.count((5.0, 0.5)) == 1  # a joined value: no dot


@pytest.mark.parametrize("value", ['{"a": 1}', "[1, 2]", '"1.0"', "true"])
def test_plot_refuses_a_value_that_is_not_a_number(tmp_path, capsys, value):
    """A hand-edited or foreign file: one line naming the row and key, not a matplotlib traceback or a curve
    on a categorical axis."""
    from internvl_mpo.cli import main

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": %s}\n' % value)
    assert main(["plot", str(tmp_path)]) == 1
    assert f"{tmp_path / 'metrics.jsonl'}:2: 'loss' is {json.dumps(json.loads(value))}, not a number or null" in \
        capsys.readouterr().err


@pytest.mark.parametrize("line", ['{"question": "q", "chosen": "a", "rejected": "b"}', "[1]", '{"step": "one"}'])
def test_plot_refuses_a_file_that_is_not_metrics(tmp_path, capsys, line):
    """Another JSONL (a data file, say) given to plot: one line naming it, not a KeyError from the plotting."""
    from internvl_mpo.cli import main

    (tmp_path / "other.jsonl").write_text(line + "\n")
    assert main(["plot", str(tmp_path / "other.jsonl")]) == 1
    assert f"{tmp_path / 'other.jsonl'}:1: not a metrics.jsonl row (an object with a numeric 'step')" in \
        capsys.readouterr().err


def test_cli_reports_bad_data_without_traceback(tmp_path, chat_folder):
    meta = write_mmpr(tmp_path / "data", ['{"oops"', *color_pairs(2)])
    from internvl_mpo.cli import main

    code = main(["train", "mpo", "--model", str(chat_folder), "--data", str(meta), "--output", str(tmp_path / "o"),
                 "--no-progress"])
    assert code == 1


def test_max_pixels_refuses_larger_images_naming_the_flag(tmp_path, chat_folder, capsys):
    """train had no --max-pixels: images over Pillow's limit could not be trained on, and the refusal named a
    "max_pixels" that train did not take."""
    from internvl_mpo.cli import main

    meta = write_mmpr(tmp_path / "data", color_pairs(2))  # images of 1200 to 3136 pixels
    run = ["train", "mpo", "--model", str(chat_folder), "--data", str(meta), "--output", str(tmp_path / "o"),
           "--no-progress", "--max-steps", "1"]
    assert main([*run, "--max-pixels", "-1"]) == 1
    assert capsys.readouterr().err == ("internvl-mpo train: error: --max-pixels must be a whole number of pixels >= 1, "
                                       "got -1\n")
    assert not (tmp_path / "o").exists()
    assert main([*run, "--max-pixels", "1000"]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"error: {re.escape(str(tmp_path / 'data' / 'toy.jsonl'))}:\d: .*\.png: \d+x\d+ = \d+ pixels exceeds "
                     r"the limit of 1000 \(possible decompression bomb; a larger --max-pixels allows it\)", err), err
    with pytest.raises(ConfigError, match="--max-pixels must be a whole number of pixels >= 1, got 0"):
        TrainConfig(mode="mpo", model="m", data="meta.json", output="o", max_pixels=0).validate()


def test_missing_required_flags_are_named_together_in_one_line(tmp_path, capsys):
    """train has no default model (chat and serve start the demo model; a forgotten --model must not
    train it): every missing required flag is named at once, before anything loads."""
    from internvl_mpo.cli import main

    model = "--model (a checkpoint folder or hub id to train from; or --init-from-config config.json for random weights)"
    assert main(["train", "mpo"]) == 1
    assert capsys.readouterr().err == f"internvl-mpo train: error: {model}, --data and --output are required\n"
    assert main(["train", "mpo", "--data", "meta.json", "--output", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err == f"internvl-mpo train: error: {model} is required\n"
    assert main(["train", "sft", "--model", "m", "--init-from-config", "c.json", "--data", "d.jsonl",
                 "--output", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err == "internvl-mpo train: error: give only one of --model and --init-from-config\n"
    assert not (tmp_path / "o").exists()


def test_the_closing_lines_count_in_the_singular_and_name_the_problem_kinds(tmp_path, chat_folder, capsys):
    """It printed "trained 1 steps" and "skipped 1 bad records: {'json': 1}" (a Python dict)."""
    meta = write_mmpr(tmp_path / "data", ['{"oops"', *color_pairs(2)])
    from internvl_mpo.cli import main

    code = main(["train", "dpo", "--model", str(chat_folder), "--data", str(meta), "--output", str(tmp_path / "o"),
                 "--max-steps", "1", "--skip-bad", "--no-progress", "--no-grad-checkpointing"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"trained 1 step; final model: {tmp_path / 'o' / 'final'}\n" in out
    assert "\nskipped 1 bad record (json: 1)\n" in out


def test_a_save_interval_longer_than_the_run_is_noted(tmp_path, chat_folder, meta, capsys):
    """--save-every past the last step saved no checkpoint without a word: a run meant to be resumable was not."""
    train(config(chat_folder, meta, tmp_path / "a", max_steps=2, save_every=5))
    assert "note: --save-every 5 is more than the run's 2 steps: it saves no checkpoint before final/" in (
        capsys.readouterr().out)
    assert not list((tmp_path / "a").glob("checkpoint-*"))
    train(config(chat_folder, meta, tmp_path / "b", max_steps=2, save_every=2))
    assert "--save-every" not in capsys.readouterr().out


def test_records_an_epoch_run_leaves_untrained_are_counted(tmp_path, chat_folder, meta, capsys):
    """--epochs counts whole steps: the records after the last one were left untrained without a word (the
    official trainer trains them in a smaller last batch)."""
    train(config(chat_folder, meta, tmp_path / "a", max_steps=0, epochs=1, batch_size=3))  # 10 records
    assert "note: 3 steps of 3 samples leave 1 record of the last epoch untrained" in capsys.readouterr().out
    train(config(chat_folder, meta, tmp_path / "b", max_steps=0, epochs=1, batch_size=2))
    assert "untrained" not in capsys.readouterr().out


def test_answers_cut_to_max_seq_length_are_counted_and_named(tmp_path, chat_folder, capsys):
    """A pair whose answers --max-seq-length cut trained without a word: the user never learnt that the
    tails (a final answer, often) of some samples were not trained."""
    long = {"question": "Say hello", "chosen": "Hello there! " * 40, "rejected": "Go away. " * 40}
    meta = write_mmpr(tmp_path / "data", [{"question": "Hi", "chosen": "Hello!", "rejected": "No."}, long])
    from internvl_mpo.cli import main

    code = main(["train", "dpo", "--model", str(chat_folder), "--data", str(meta), "--output", str(tmp_path / "o"),
                 "--max-steps", "2", "--batch-size", "1", "--no-shuffle", "--max-seq-length", "100", "--no-progress",
                 "--no-grad-checkpointing"])
    assert code == 0
    assert [row["truncated"] for row in metric_rows(tmp_path / "o")] == [0, 1]
    out = capsys.readouterr().out
    assert (f"\nnote: 1 sample had its answer cut to fit --max-seq-length 100 (the first since the run started or"
            f" resumed: {tmp_path}/data/toy.jsonl:2); the cut tails were not trained (metrics.jsonl: truncated)\n") in out


def test_answers_cut_before_a_resume_are_counted_after_it(tmp_path, chat_folder, capsys):
    """A resumed run's note counted only the samples cut since the resume: those of the steps before it, in
    metrics.jsonl, were left out of it."""
    long = {"question": "Say hello", "chosen": "Hello there! " * 40, "rejected": "Go away. " * 40}
    meta = write_mmpr(tmp_path / "data", [long, {"question": "Hi", "chosen": "Hello!", "rejected": "No."}])
    cfg = config(chat_folder, meta, tmp_path / "run", mode="dpo", max_steps=2, batch_size=1, shuffle=False,
                 max_seq_length=100, save_every=1)
    train(cfg)
    killed_after_step_1(tmp_path / "run")
    capsys.readouterr()
    result = train(dataclasses.replace(cfg, resume=True))
    assert [row["truncated"] for row in metric_rows(tmp_path / "run")] == [1, 0]
    assert result.truncation_note.startswith("note: 1 sample had its answer cut to fit --max-seq-length 100;")


def test_fsdp_in_a_single_process_trains_unsharded_with_a_note(tmp_path, chat_folder, meta, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    from internvl_mpo.cli import main

    code = main(["train", "dpo", "--model", str(chat_folder), "--data", str(meta), "--output", str(tmp_path / "o"),
                 "--max-steps", "1", "--batch-size", "2", "--fsdp", "--no-progress", "--no-grad-checkpointing"])
    assert code == 0
    assert "note: --fsdp shards only when several processes run" in capsys.readouterr().out
    assert len(metric_rows(tmp_path / "o")) == 1


def test_a_config_dtype_the_final_save_cannot_take_is_refused_before_training(tmp_path, chat_folder, meta, monkeypatch):
    """The final model is saved in the config's torch_dtype: one it cannot take was read as fp32 (and,
    once refused, must be refused before the first step, not after the last)."""
    from internvl_mpo.train import mpo

    folder = tmp_path / "model"
    shutil.copytree(chat_folder, folder)
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**settings, "torch_dtype": "float8_e4m3fn"}))
    monkeypatch.setattr(mpo, "build_dataset", lambda *a, **k: pytest.fail("training went on"))
    with pytest.raises(InputError, match="dtype 'auto': the checkpoint's dtype is 'float8_e4m3fn'"):
        train(config(folder, meta, tmp_path / "run", max_steps=1))


def test_the_final_model_of_a_checkpoint_without_a_config_dtype_is_saved_in_its_weights_dtype(tmp_path, chat_folder, meta):
    """final/ is saved in the dtype "auto" gives the start: for a bf16 checkpoint without torch_dtype in its
    config.json that is bf16, as transformers reads it, where it was fp32 (twice the size)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(chat_folder, folder)
    assert "torch_dtype" not in json.loads((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, folder / "model.safetensors")
    train(config(folder, meta, tmp_path / "run", max_steps=1))
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_the_starting_checkpoint_is_opened_once_for_its_weights_and_its_dtype(tmp_path, chat_folder, meta, monkeypatch):
    """Without a config dtype, final/'s dtype was read from the shards after the load had opened them: each
    weight file's header was read twice."""
    folder = bf16_shards_without_dtype(chat_folder, tmp_path / "bf16")
    opened = record_header_reads(monkeypatch)
    chosen, parse = [], mpo.parse_dtype
    monkeypatch.setattr(mpo, "parse_dtype", lambda *a: chosen.append(parse(*a)) or chosen[-1])

    def stop(*args, **kwargs):
        raise InputError("stopped after the load")

    monkeypatch.setattr(mpo, "build_dataset", stop)
    with pytest.raises(InputError, match="stopped after the load"):
        train(config(folder, meta, tmp_path / "run", max_steps=1))
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(opened) == shards
    assert chosen == [torch.bfloat16]  # final/'s dtype, from those headers


def test_a_final_model_without_the_official_py_files_says_where_to_get_them(tmp_path, chat_folder, meta, capsys):
    """The official code and vLLM load final/ through its auto_map's .py files; trained from a folder
    without them (or from --init-from-config) it had none, without a word."""
    from internvl_mpo.cli import main

    args = ["--data", str(meta), "--max-steps", "1", "--batch-size", "2", "--no-progress"]
    assert main(["train", "dpo", "--model", str(chat_folder), "--output", str(tmp_path / "a"), *args]) == 0
    out = capsys.readouterr().out
    assert f"note: {tmp_path / 'a' / 'final'} has no configuration_internvl_chat.py" in out
    assert "--include \"*.py\"" in out
    folder = tmp_path / "model"
    shutil.copytree(chat_folder, folder)
    for name in ("configuration_internvl_chat.py", "modeling_internvl_chat.py"):
        (folder / name).write_text("# the official file\n")
    assert main(["train", "dpo", "--model", str(folder), "--output", str(tmp_path / "b"), *args]) == 0
    assert "has no" not in capsys.readouterr().out
    assert (tmp_path / "b" / "final" / "modeling_internvl_chat.py").is_file()


def test_plot_names_a_file_it_cannot_read_or_that_is_not_text(tmp_path, capsys, monkeypatch):
    """A picture given to plot raised UnicodeDecodeError, and a metrics file without read permission
    PermissionError, each with a traceback."""
    from internvl_mpo.cli import main

    picture = tmp_path / "curves.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n")
    assert main(["plot", str(picture)]) == 1
    assert f"{picture}: not a metrics.jsonl file (not UTF-8 text, byte 1)" in capsys.readouterr().err
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    refuse_reading(monkeypatch, metrics)
    assert main(["plot", str(tmp_path)]) == 1
    assert f"{metrics}: cannot read it (Permission denied)" in capsys.readouterr().err


def test_plot_into_a_folder_it_cannot_write_is_one_line(tmp_path, capsys, monkeypatch):
    """A run folder (or --output) that cannot be written (read-only, a full disk) ended plot with matplotlib's
    PermissionError traceback, where tiles says so in a line."""
    import matplotlib.figure

    from internvl_mpo.cli import main

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2)))
    target = tmp_path / "curves.png"

    def refuse(fig, path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", refuse)
    assert main(["plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"internvl-mpo plot: error: {target}: saving failed (") and "Permission denied" in err
    assert "no picture was written" in err and "Traceback" not in err


def test_a_resume_drops_metrics_lines_that_are_no_metrics_rows(tmp_path):
    """A damaged or hand-edited metrics.jsonl line (no step, a string step, a NaN count, bytes that are not UTF-8)
    stopped the resume with a traceback: it is dropped as a half-written line is."""
    from internvl_mpo.train.resume import rewrite_metrics

    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": 1, "truncated": 1}), json.dumps({"step": 2})]
    odd = [b'{"loss": 1.0}', b'{"step": "x"}', b'{"step": 2, "truncated": NaN}', b'{"step": 1, "note": "\xff"}',
           b"[1]", b'{"step": 3}', b'{"step": 2, "lo']
    path.write_bytes(b"\n".join([good[0].encode(), *odd[:4], good[1].encode(), *odd[4:]]))
    assert rewrite_metrics(path, 2) == 1
    assert path.read_text().splitlines() == [good[0], '{"step": 1, "note": "\ufffd"}', good[1]]


def test_a_resume_keeps_metrics_rows_holding_a_unicode_line_separator(tmp_path):
    """A row whose string holds U+2028 unescaped (written by hand or another tool) was split there by splitlines()
    and dropped as two damaged lines; lines end at LF only."""
    from internvl_mpo.train.resume import rewrite_metrics

    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": 1, "note": "a\u2028b\x85c"}, ensure_ascii=False), json.dumps({"step": 2})]
    path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")
    rewrite_metrics(path, 2)
    assert path.read_text(encoding="utf-8").split("\n") == [*rows, ""]


def test_a_tokenizer_past_the_models_vocabulary_is_refused_before_training(tmp_path, chat_folder, meta, monkeypatch):
    """--tokenizer files holding more tokens than the model's embeddings trained without a word (an id past the
    vocabulary in the data failed deep inside) and final/ got them: a checkpoint that chat refused."""
    from test_pipeline import add_token_past_the_vocabulary

    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(chat_folder, tokenizer)
    add_token_past_the_vocabulary(tokenizer)
    monkeypatch.setattr(InternVL, "from_pretrained", lambda *a, **k: pytest.fail("the weights were read"))
    with pytest.raises(CheckpointError, match=rf"^{tokenizer}: the tokenizer files hold .* past the model's vocab"):
        train(config(chat_folder, meta, tmp_path / "run", max_steps=1, tokenizer=str(tokenizer)))
    assert not (tmp_path / "run" / "final").exists()


def test_preference_modes_train_without_the_vision_dropout_as_trls_dpo_trainer(tmp_path, chat_folder, meta):
    # TRL's DPOTrainer (disable_dropout=True, the official MPO trainer's default) sets every nn.Dropout to p = 0:
    # the ViT's proj_drop (vision_config.dropout). Without drop path the policy then computes what the reference does.
    model = tmp_path / "model"
    shutil.copytree(chat_folder, model)
    settings = json.loads((model / "config.json").read_text())
    settings["vision_config"]["dropout"] = 0.5
    (model / "config.json").write_text(json.dumps(settings))
    train(config(chat_folder, meta, tmp_path / "run", model=str(model), max_steps=1, shuffle=False))
    row = metric_rows(tmp_path / "run")[0]
    assert (row["rewards/chosen"], row["rewards/rejected"], row["delta"]) == (0.0, 0.0, 0.0)

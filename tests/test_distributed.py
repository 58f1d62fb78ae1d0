"""Two CPU processes (gloo) against one process on the same global batch (train/distributed.py).

Every chosen answer has the same number of tokens, so the SFT term (a token mean over each
micro-batch, per rank, as in the reference trainer) is the same whether two samples sit in one
micro-batch or one on each of two ranks; the DPO and BCO-pair terms and the BCO running mean match
in general. Drop-path is off (its random masks differ per rank by design).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import random
import re
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from unittest.mock import ANY

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_train_data import COLORS, write_mmpr

from internvl_mpo.chat.tokenizer import load_tokenizer
from internvl_mpo.errors import ConfigError, ResumeSettingsError
from internvl_mpo.model import InternVL
from internvl_mpo.train.distributed import epoch_order, init_distributed, rank_share
from internvl_mpo.train.mpo import train
from internvl_mpo.train.settings import TrainConfig
from internvl_mpo.train.stopping import Stopped


def free_ports(n: int) -> list[int]:
    """`n` free ports outside the kernel's ephemeral range. A port that bind(0) picked and released could be
    handed out again to any socket before the run binds it, gloo's own connections of an earlier config among
    them (EADDRINUSE); the kernel never hands out one outside that range by itself."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):  # not Linux: the IANA range
        low, high = 49152, 65535
    candidates = [*range(10000, low), *range(high + 1, 65536)]
    ports: list[int] = []
    while len(ports) < n:
        port = random.choice(candidates)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # taken
                continue
        if port not in ports:
            ports.append(port)
    return ports


def _worker(rank: int, world: int, ports: list[int], configs: list[dict]) -> None:
    """Runs each config's train() on this rank; fails if one left its process group behind."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    for port, cfg in zip(ports, configs):
        os.environ["MASTER_PORT"] = str(port)
        train(TrainConfig(**cfg))
        assert_no_process_group()


@pytest.fixture(autouse=True)
def _temporary_files_in_tmp_path(tmp_path, monkeypatch):
    """The test's temporary files go into its tmp_path: torch's spawn gives each process a pytorch-errorfile-*.pickle
    in the temporary folder, which a process that raised leaves behind (a failing test's piled up in /tmp)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the spawned processes'
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this process's (read once, then kept)


def _raising_worker(rank: int) -> None:
    raise RuntimeError(f"process {rank} fails")


def test_a_process_that_raised_leaves_its_error_file_in_tmp_path(tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match=r"process \d fails"):
        mp.start_processes(_raising_worker, nprocs=2, start_method="spawn")
    assert list(tmp_path.glob("pytorch-errorfile-*.pickle"))


def rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_unusable_devices_are_config_errors(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="--device 'gpu0': not a device"):
        init_distributed("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device cuda: CUDA is not available on this machine"):
        init_distributed("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"--device cuda:3: no CUDA device 3 \(1 visible\)"):
        init_distributed("cuda:3")
    assert init_distributed("cpu").device == torch.device("cpu")
    # a bare index is that GPU, as `--device 0` of the other commands (it was "not a device")
    with pytest.raises(ConfigError, match=r"--device 3: no CUDA device 3 \(1 visible\)"):
        init_distributed("3")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    assert init_distributed("0").device == torch.device("cuda", 0)


def test_one_gpu_index_for_all_processes_of_a_node_is_refused_and_cuda_takes_the_local_rank(monkeypatch):
    """torchrun gives every process the same flags: --device cuda:0 put all of them on GPU 0, and NCCL stopped
    with a duplicate-GPU error deep inside; each process refuses it alike, and --device cuda is cuda:LOCAL_RANK."""
    import torch.distributed as dist

    for name, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2"),
                        ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    for name, value in (("is_available", lambda: True), ("device_count", lambda: 2), ("set_device", lambda d: None)):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: None)
    for device in ("cuda:0", "cuda:1"):
        with pytest.raises(ConfigError, match=f"--device {device}: 2 processes on this node would all train on GPU"
                                              f" {device[-1]}; give --device cuda"):
            init_distributed(device)
    assert init_distributed("cuda").device == init_distributed(None).device == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per node: its GPU is the user's choice
    assert init_distributed("cuda:0").device == torch.device("cuda", 0)


def test_an_incomplete_torchrun_environment_is_a_config_error(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")  # alone, it made a process that trained and wrote nothing (not rank 0)
    with pytest.raises(ConfigError, match=r"RANK=1 with WORLD_SIZE=1: the rank must be in 0..WORLD_SIZE-1"):
        init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 but no MASTER_ADDR or MASTER_PORT in the environment: launch the"):
        init_distributed("cpu")


def test_the_process_group_waits_30_minutes_for_the_other_ranks(monkeypatch):
    """Ranks wait at a barrier while rank 0 writes a checkpoint; torch's NCCL default of 10 minutes
    would end a run whose save takes longer."""
    from datetime import timedelta

    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: calls.append((args, kwargs)))
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "localhost"),
                        ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    init_distributed("cpu")
    assert calls == [(("gloo",), {"timeout": timedelta(minutes=30)})]


def test_every_epoch_is_reshuffled_by_seed_plus_epoch():
    """Each epoch has its own order, drawn by a generator seeded with seed + epoch (the same on every rank)."""
    orders = [epoch_order(50, epoch, seed=7) for epoch in range(3)]
    assert all(sorted(order) == list(range(50)) for order in orders)
    assert len({tuple(order) for order in orders}) == 3
    assert orders[2] == epoch_order(50, 0, seed=9) == epoch_order(50, 1, seed=8)
    assert epoch_order(5, 3, seed=7, shuffle=False) == list(range(5))


def test_rank_shares_deal_the_stream_of_epochs_round_robin():
    order = epoch_order(10, epoch=3, seed=7)
    assert sorted(order) == list(range(10)) and order != list(range(10))
    # 7 records on 2 and 3 ranks: stream position p (epochs one after another) is rank p % W's; the ranks
    # take turns across each epoch's end, so no record is dropped and the global batches are one process's.
    for world in (2, 3):
        orders = [epoch_order(7, epoch, seed=7) for epoch in range(world)]
        stream = [i for order in orders for i in order]
        reads = [[i for epoch, order in enumerate(orders) for i in rank_share(order, r, world, epoch)]
                 for r in range(world)]
        assert [reads[p % world][p // world] for p in range(len(stream))] == stream
        assert [len(rank_share(orders[1], r, world, 1)) for r in range(world)] == ([3, 4] if world == 2 else [2, 3, 2])


def assert_resumed_as_whole(whole: Path, resumed: Path) -> None:
    """A run resumed from checkpoint-000003 logged the uninterrupted run's steps from there (timings aside)
    and saved the same final weights, bit for bit."""
    assert rows(resumed) == [{**r, **{k: ANY for k in ("tokens_per_s", "step_time_s")}} for r in rows(whole)[3:]]
    expected = InternVL.from_pretrained(whole / "final").state_dict()
    for key, value in InternVL.from_pretrained(resumed / "final").state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import tiny_chat_folder

    root = tmp_path_factory.mktemp("dist")
    folder, _ = tiny_chat_folder(root / "model")
    names = list(COLORS)
    records = [{"image": f"{names[i % 4]}.png", "question": f"Look at picture {i}.", "chosen": "It is fine.",
                "rejected": f"It is {names[i % 4]}, I think."} for i in range(6)]
    records += [{"question": f"Greet me {i}", "chosen": "It is fine.", "rejected": "No."} for i in range(2)]
    meta = write_mmpr(root / "data", records)
    tokenizer = load_tokenizer(folder)
    assert len({len(tokenizer.encode(r["chosen"])) for r in records}) == 1
    return root, folder, meta


def test_two_processes_match_one_on_the_same_global_batch(setup):
    # Two micro-batches per step: gradients are reduced across ranks in the last one's backward only.
    root, folder, meta = setup
    base = TrainConfig(model=str(folder), data=str(meta), max_steps=3, grad_accum=2, lr=1e-3, warmup_ratio=0.0,
                       drop_path_rate=0.0, progress=False, seed=3)
    single = train(dataclasses.replace(base, output=str(root / "single"), batch_size=2))
    configs = [dataclasses.asdict(dataclasses.replace(base, output=str(root / "ddp"), batch_size=1)),
               dataclasses.asdict(dataclasses.replace(base, output=str(root / "fsdp"), batch_size=1, fsdp=True,
                                                           save_every=3))]
    mp.start_processes(_worker, args=(2, free_ports(2), configs), nprocs=2, start_method="spawn")

    expected = InternVL.from_pretrained(single.final_dir, dtype=torch.float32).state_dict()
    initial = InternVL.from_pretrained(folder, dtype=torch.float32).state_dict()
    # Three AdamW steps at lr 1e-3 move weights by ~2e-3; summation order differs between the runs and
    # Adam's normalisation magnifies it on tiny gradients, hence atol 1e-4 (5% of the total move).
    assert min((expected[k] - initial[k]).abs().max() for k in expected) > 1e-3
    for name in ("ddp", "fsdp"):
        for a, b in zip(rows(root / "single"), rows(root / name), strict=True):
            for key in ("loss", "loss/pref", "loss/quality", "nll", "rewards/margins", "delta", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (name, a["step"], key)
            assert b["tokens"] == a["tokens"]
        got = InternVL.from_pretrained(root / name / "final", dtype=torch.float32).state_dict()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-4, msg=f"{name}: {key}")

    # FSDP2 saves gather full tensors on rank 0: official weights and unsharded optimizer states.
    saved = root / "fsdp" / "checkpoint-000003"
    torch.testing.assert_close(InternVL.from_pretrained(saved / "model").state_dict()["language_model.lm_head.weight"],
                               got["language_model.lm_head.weight"], rtol=0, atol=0)
    optim = load_file(saved / "optimizer.safetensors")
    assert optim["model.language_model.lm_head.weight::exp_avg"].shape == expected["language_model.lm_head.weight"].shape
    assert {p.name for p in saved.glob("rank*.json")} == {"rank0.json", "rank1.json"}


def test_ddp_trains_a_model_whose_select_layer_leaves_vit_layers_unrun(setup):
    """The ViT layers after select_layer (-2 in a config) get no gradient: DDP waited for theirs, so step 1's gradients
    were not averaged (the weights were rank 0's alone) and step 2 raised "Expected to have finished reduction in the
    prior iteration". They are frozen, and --lora-vision puts no adapters in them."""
    root, folder, meta = setup
    model = root / "select_layer_-2"
    shutil.copytree(folder, model)
    config = json.loads((model / "config.json").read_text())
    config["select_layer"] = -2  # the tiny ViT's 2 layers: the second never runs
    (model / "config.json").write_text(json.dumps(config))
    base = TrainConfig(model=str(model), data=str(meta), max_steps=2, lr=1e-3, warmup_ratio=0.0, drop_path_rate=0.0,
                       progress=False, seed=3)
    single = train(dataclasses.replace(base, output=str(root / "select_single"), batch_size=2))
    configs = [dataclasses.asdict(dataclasses.replace(base, output=str(root / "select_ddp"), batch_size=1)),
               dataclasses.asdict(dataclasses.replace(base, output=str(root / "select_lora"), batch_size=1, lora_rank=2,
                                                           lora_vision=True))]
    mp.start_processes(_worker, args=(2, free_ports(2), configs), nprocs=2, start_method="spawn")
    expected = InternVL.from_pretrained(single.final_dir, dtype=torch.float32).state_dict()
    got = InternVL.from_pretrained(root / "select_ddp" / "final", dtype=torch.float32).state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-4, msg=key)
    unrun = InternVL.from_pretrained(model, dtype=torch.float32).state_dict()
    lora = InternVL.from_pretrained(root / "select_lora" / "final", dtype=torch.float32).state_dict()
    for key in (k for k in unrun if k.startswith("vision_model.encoder.layers.1.")):
        assert torch.equal(got[key], unrun[key]) and torch.equal(lora[key], unrun[key]), key


def test_two_processes_match_one_across_an_uneven_epoch_end(setup):
    # 5 records on 2 ranks: the ranks used to read 2 each per epoch and never the fifth; the global batches
    # (and so the losses) left one process's at the first epoch's end.
    root, folder, _ = setup
    records = [{"image": f"{name}.png", "question": f"What is this {i}?", "chosen": "It is fine.",
                "rejected": f"It is {name}."} for i, name in enumerate([*COLORS, "red"])]
    meta = write_mmpr(root / "data5", records)
    base = TrainConfig(model=str(folder), data=str(meta), max_steps=4, lr=1e-3, warmup_ratio=0.0, drop_path_rate=0.0,
                       progress=False, seed=5)
    single = train(dataclasses.replace(base, output=str(root / "single5"), batch_size=2))
    configs = [dataclasses.asdict(dataclasses.replace(base, output=str(root / "ddp5"), batch_size=1))]
    mp.start_processes(_worker, args=(2, free_ports(1), configs), nprocs=2, start_method="spawn")
    expected, got = rows(single.final_dir.parent), rows(root / "ddp5")
    assert [r["epoch"] for r in got] == [r["epoch"] for r in expected] == [0.4, 0.8, 1.2, 1.6]
    for a, b in zip(expected, got, strict=True):
        assert (b["tokens"], b["loss"]) == (a["tokens"], pytest.approx(a["loss"], rel=1e-5)), a["step"]


def test_skipped_records_are_counted_over_all_ranks(setup):
    # Two records too long to train on, one read by each rank: metrics.jsonl and the result counted rank 0's only.
    root, folder, _ = setup
    records = [{"image": f"{name}.png", "question": f"What is this {i}?", "chosen": "It is fine.",
                "rejected": f"It is {name}."} for i, name in enumerate([*COLORS, *COLORS])]
    for i in (2, 4):  # stream positions 0 and 1 (the reader's shuffle): rank 0 meets one, rank 1 the other
        records[i]["question"] = "long " * 400
    meta = write_mmpr(root / "data_bad", records)
    base = TrainConfig(model=str(folder), data=str(meta), max_steps=2, max_seq_length=400, skip_bad=True,
                       shuffle=False, drop_path_rate=0.0, progress=False)
    single = train(dataclasses.replace(base, output=str(root / "single_bad"), batch_size=2))
    configs = [dataclasses.asdict(dataclasses.replace(base, output=str(root / "ddp_bad"), batch_size=1))]
    mp.start_processes(_worker, args=(2, free_ports(1), configs), nprocs=2, start_method="spawn")
    assert single.skipped.counts == {"encode": 2}
    assert [r["skipped"] for r in rows(root / "ddp_bad")] == [r["skipped"] for r in rows(root / "single_bad")] == [2, 2]


def test_fsdp_resumes_mid_epoch_exactly_and_refuses_another_world_size(setup):
    root, folder, meta = setup
    base = TrainConfig(model=str(folder), data=str(meta), max_steps=4, save_every=3, batch_size=1, lr=1e-3,
                       warmup_ratio=0.0, progress=False, seed=3, fsdp=True)  # drop path on: RNG states matter

    def run(name: str, **change) -> None:
        cfg = dataclasses.asdict(dataclasses.replace(base, output=str(root / name), **change))
        mp.start_processes(_worker, args=(2, free_ports(1), [cfg]), nprocs=2, start_method="spawn")

    run("whole")
    (root / "resumed").mkdir()
    shutil.copytree(root / "whole" / "checkpoint-000003", root / "resumed" / "checkpoint-000003")  # 3 of 4 per rank
    with pytest.raises(ResumeSettingsError, match=r"world_size \(checkpoint 2, now 1\)"):
        train(dataclasses.replace(base, output=str(root / "resumed"), resume=True))
    run("resumed", resume=True)
    assert_resumed_as_whole(root / "whole", root / "resumed")


def test_fsdp_bf16_reference_is_the_initial_policy(setup):
    # FSDP2 computes with bf16 weights; the live reference and the precomputed pass must compute the same.
    root, folder, meta = setup
    base = TrainConfig(model=str(folder), data=str(meta), max_steps=1, batch_size=1, drop_path_rate=0.0,
                       progress=False, precision="bf16", device="cpu", fsdp=True)
    configs = [dataclasses.asdict(dataclasses.replace(base, output=str(root / name), precompute_ref=pre))
               for name, pre in (("bf16_live", False), ("bf16_precomputed", True))]
    mp.start_processes(_worker, args=(2, free_ports(2), configs), nprocs=2, start_method="spawn")
    for name in ("bf16_live", "bf16_precomputed"):
        row = rows(root / name)[0]
        assert (row["rewards/chosen"], row["rewards/rejected"]) == (0.0, 0.0), name


def test_fsdp_with_a_frozen_llm_and_text_only_samples_on_one_rank(setup):
    # With the LLM frozen (or only LoRA adapters in it) a text-only row's embeddings need no gradient while an
    # image row's do, so the ranks ran different backward collectives (a gloo size mismatch, or a hang).
    root, folder, meta = setup
    base = TrainConfig(model=str(folder), data=str(meta), max_steps=4, lr=1e-3, warmup_ratio=0.0,
                       drop_path_rate=0.0, progress=False, seed=3)
    frozen = {"frozen_llm": {"freeze_llm": True}, "lora": {"lora_rank": 2}}
    configs = [dataclasses.asdict(dataclasses.replace(base, output=str(root / f"fsdp_{name}"), batch_size=1,
                                                      fsdp=True, **change)) for name, change in frozen.items()]
    mp.start_processes(_worker, args=(2, free_ports(2), configs), nprocs=2, start_method="spawn")
    for name, change in frozen.items():
        single = train(dataclasses.replace(base, output=str(root / f"single_{name}"), batch_size=2, **change))
        for a, b in zip(rows(single.final_dir.parent), rows(root / f"fsdp_{name}"), strict=True):
            for key in ("loss", "loss/pref", "loss/quality", "nll", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (name, a["step"], key)


def _reading_worker(rank: int, world: int, ports: list[int], configs: list[dict], log: str) -> None:
    """`_worker` that refuses to load the whole model and records each checkpoint read: key, rows read, rows."""
    from internvl_mpo.checkpoint import LazyTensor

    reads, read = [], LazyTensor.__getitem__

    def recording(self, index):
        value = read(self, index)
        reads.append([self.key, value.shape[0], self.view.get_shape()[0]])
        return value

    def refuse(*args, **kwargs):
        raise AssertionError("InternVL.from_pretrained: the whole model was loaded on the device")

    LazyTensor.__getitem__ = recording
    InternVL.from_pretrained = refuse
    _worker(rank, world, ports, configs)
    Path(log.format(rank)).write_text(json.dumps(reads))


def test_fsdp_ranks_read_only_their_shards_and_random_init_is_unchanged(setup):
    # Every rank used to load the whole fp32 policy onto its device, and a whole reference copy, before sharding
    # (the reference of --precompute-ref's pass too).
    root, folder, meta = setup
    base = TrainConfig(model=str(folder), data=str(meta), max_steps=2, batch_size=1, lr=1e-3, warmup_ratio=0.0,
                       drop_path_rate=0.0, progress=False, seed=3, fsdp=True)
    random_init = dict(model=None, init_from_config=str(folder / "config.json"), tokenizer=str(folder))
    configs = [dataclasses.asdict(dataclasses.replace(base, output=str(root / "shards"))),
               dataclasses.asdict(dataclasses.replace(base, output=str(root / "shards_pre"), precompute_ref=True)),
               dataclasses.asdict(dataclasses.replace(base, output=str(root / "shards_random"), **random_init))]
    log = str(root / "reads{}.json")
    ports = free_ports(len(configs))
    mp.start_processes(_reading_worker, args=(2, ports, configs, log), nprocs=2, start_method="spawn")

    reads = [json.loads(Path(log.format(rank)).read_text()) for rank in range(2)]
    shapes = InternVL.from_pretrained(folder).expected_keys()
    for rank_reads in reads:  # two runs' policy and reference: each key 4 times, never more than half its rows
        assert sorted(key for key, _, _ in rank_reads) == sorted([*shapes] * 4)
        assert all(n <= -(-rows // 2) for _, n, rows in rank_reads), rank_reads
    for key, shape in shapes.items():  # the two ranks' shards make the whole tensor
        assert sum(n for rank_reads in reads for k, n, _ in rank_reads if k == key) == 4 * shape[0], key
    for a, b in zip(rows(root / "shards"), rows(root / "shards_pre"), strict=True):  # batch size 1: exact values
        assert (b["loss"], b["rewards/margins"]) == (a["loss"], a["rewards/margins"]), a["step"]
    single = train(dataclasses.replace(base, output=str(root / "single_random"), batch_size=2, fsdp=False,
                                       **random_init))
    for a, b in zip(rows(single.final_dir.parent), rows(root / "shards_random"), strict=True):
        for key in ("loss", "nll", "rewards/margins", "grad_norm"):  # the same random weights at the start
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert (root / "shards" / "final" / "config.json").is_file()


def test_fsdp_lora_resumes_exactly(setup):
    # Under FSDP2 the adapted linears' base weights come from --model and the adapters from the checkpoint.
    root, folder, meta = setup
    base = TrainConfig(model=str(folder), data=str(meta), max_steps=4, save_every=3, batch_size=1, lr=1e-3,
                       warmup_ratio=0.0, drop_path_rate=0.0, progress=False, seed=3, fsdp=True, lora_rank=2)

    def run(name: str, **change) -> None:
        cfg = dataclasses.asdict(dataclasses.replace(base, output=str(root / name), **change))
        mp.start_processes(_worker, args=(2, free_ports(1), [cfg]), nprocs=2, start_method="spawn")

    run("lora_whole")
    (root / "lora_resumed").mkdir()
    shutil.copytree(root / "lora_whole" / "checkpoint-000003", root / "lora_resumed" / "checkpoint-000003")
    run("lora_resumed", resume=True)
    assert_resumed_as_whole(root / "lora_whole", root / "lora_resumed")


def test_fsdp_precomputed_reference_with_uneven_shares(setup):
    # 5 records on 2 ranks: the sharded reference's pass has rank 1 run a padding row while rank 0 runs its third.
    root, folder, _ = setup
    records = [{"image": f"{name}.png", "question": f"What is this {i}?", "chosen": "It is fine.",
                "rejected": f"It is {name}."} for i, name in enumerate([*COLORS, "red"])]
    meta = write_mmpr(root / "data_uneven", records)
    base = TrainConfig(model=str(folder), data=str(meta), max_steps=2, batch_size=1, lr=1e-3, warmup_ratio=0.0,
                       drop_path_rate=0.0, progress=False, seed=3, fsdp=True)
    configs = [dataclasses.asdict(dataclasses.replace(base, output=str(root / name), precompute_ref=pre))
               for name, pre in (("uneven_live", False), ("uneven_pre", True))]
    mp.start_processes(_worker, args=(2, free_ports(2), configs), nprocs=2, start_method="spawn")
    assert load_file(root / "uneven_pre" / "ref_logps.safetensors")["valid"].tolist() == [1] * 5
    for a, b in zip(rows(root / "uneven_live"), rows(root / "uneven_pre"), strict=True):
        assert (b["loss"], b["rewards/margins"]) == (a["loss"], a["rewards/margins"]), a["step"]


def gloo_threads() -> list[str]:
    """The names of this process's running gloo threads (a process group's workers and its TCP loop)."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            names.append((task / "comm").read_text().strip())
    return [name for name in names if "gloo" in name]


def assert_no_process_group() -> None:
    """train() ended with its process groups destroyed and freed: an FSDP2 run's stayed alive (its gloo threads
    running to the interpreter's exit) through the DeviceMesh that DTensor's caches keep.

    A thread that destroy_process_group has joined can still be listed in /proc for a moment: the kernel wakes
    the joining thread before it removes the ended one, and on a busy machine that moment showed the TCP loop of a
    freed group now and then. So the threads get a few seconds to go; those of a group that lives on never do."""
    import time

    import torch.distributed as dist

    assert not dist.is_initialized(), "train() left the process group initialized"
    deadline = time.monotonic() + 10
    while gloo_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not gloo_threads(), f"train() ended with the process group still running: {gloo_threads()}"


def _stopping_worker(rank: int, world: int, ports: list[int], configs: list[dict], log: str,
                     full_disk: bool = False) -> None:
    """`_worker` that records how each run ended on this rank ("Type: message", or null) in a JSON list, and fails
    if a run left its process group running; with `full_disk`, process 0's safetensors writes fail as on a full disk."""
    if full_disk and rank == 0:
        from safetensors import SafetensorError

        from internvl_mpo import checkpoint

        def disk_full(*args, **kwargs):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        checkpoint.save_tensors = disk_full
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    # Garbage is collected only where train() asks for it: a process group that it left to some later collection
    # still ran its gloo threads when the interpreter exited, and the process aborted now and then ('terminate called
    # without an active exception'); train() must end with the group gone.
    gc.disable()
    ended = []
    for port, cfg in zip(ports, configs):
        os.environ["MASTER_PORT"] = str(port)
        try:
            train(TrainConfig(**cfg))
            ended.append(None)
        except Exception as e:
            ended.append(f"{type(e).__name__}: {e}")
        assert_no_process_group()
    Path(log.format(rank)).write_text(json.dumps(ended))


def run_two(worker, args: tuple, limit_s: float = 300) -> None:
    """Two spawned processes running `worker(rank, 2, *args)`; fails the test if they outlive `limit_s`."""
    import time

    context = mp.start_processes(worker, args=(2, *args), nprocs=2, start_method="spawn", join=False)
    deadline = time.monotonic() + limit_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the processes still ran after {limit_s} s (a rank waiting at a collective)")


def endings(log: str) -> list[list[str | None]]:
    """Per run, how it ended on each rank."""
    return [list(ended) for ended in zip(*(json.loads(Path(log.format(rank)).read_text()) for rank in range(2)))]


def test_a_failed_save_on_process_0_stops_every_process_with_its_error(setup):
    # Process 0 writes checkpoints and final/ while the others wait at a barrier: its SaveError left them
    # there (until the process group's timeout under NCCL; gloo's "Connection closed by peer" traceback here).
    root, folder, meta = setup
    base = TrainConfig(model=str(folder), data=str(meta), max_steps=1, batch_size=1, drop_path_rate=0.0,
                       progress=False)
    log = str(root / "full_disk{}.json")
    cfg = dataclasses.asdict(dataclasses.replace(base, output=str(root / "full_disk"), save_every=1))
    run_two(_stopping_worker, (free_ports(1), [cfg], log, True))
    message = (f"SaveError: {root / 'full_disk' / 'checkpoint-000001'}: saving failed (Error while serializing:"
               " I/O error: No space left on device (os error 28)); nothing there was replaced")
    assert endings(log) == [[message, message]]

    # final/'s temporary folder cannot be made (a file has its name): an OSError, raised by process 0 alone
    (root / "no_final").mkdir()
    (root / "no_final" / ".tmp-final").write_text("")
    log = str(root / "no_final{}.json")
    cfg = dataclasses.asdict(dataclasses.replace(base, output=str(root / "no_final")))
    run_two(_stopping_worker, (free_ports(1), [cfg], log))
    message = (f"SaveError: {root / 'no_final' / 'final'}: saving failed ([Errno 17] File exists:"
               f" '{root / 'no_final' / '.tmp-final'}'); nothing there was replaced")
    assert endings(log) == [[message, message]]


def test_a_bad_sample_in_one_process_share_stops_every_process_with_its_error(setup):
    # Each process encodes only its own share: a record too long to train on, read by process 1 alone, stopped it
    # while process 0 went on into the step's collectives (and into the --precompute-ref pass's).
    root, folder, _ = setup
    records = [{"image": f"{name}.png", "question": f"What is this {i}?", "chosen": "It is fine.",
                "rejected": f"It is {name}."} for i, name in enumerate(COLORS)]
    records[0]["question"] = "long " * 400  # the reader's shuffle puts it at position 1: process 1's first sample
    meta = write_mmpr(root / "data_one_bad", records)
    base = TrainConfig(model=str(folder), data=str(meta), max_steps=1, batch_size=1, max_seq_length=400,
                       shuffle=False, drop_path_rate=0.0, progress=False)
    configs = [dataclasses.asdict(dataclasses.replace(base, output=str(root / name), precompute_ref=pre))
               for name, pre in (("one_bad_live", False), ("one_bad_pre", True))]
    log = str(root / "one_bad{}.json")
    run_two(_stopping_worker, (free_ports(2), configs, log))
    for ended in endings(log):
        assert ended[0] == ended[1] and ended[0].startswith(f"InputError: {meta.parent / 'toy.jsonl'}:1: "), ended


def test_a_nan_in_the_rows_one_process_reads_stops_every_process_with_its_error(setup):
    # Under FSDP2 each process reads (and checks) only its own rows of each weight: a NaN in process 1's rows
    # stopped it alone, while process 0 went on into the run's collectives.
    from safetensors.torch import save_file

    root, folder, meta = setup
    broken = root / "nan_model"
    shutil.copytree(folder, broken)
    key = "language_model.model.embed_tokens.weight"
    state = load_file(broken / "model.safetensors")
    state[key][-1, 0] = float("nan")  # its last row: process 1's
    save_file(state, broken / "model.safetensors")
    cfg = TrainConfig(model=str(broken), data=str(meta), output=str(root / "nan_rows"), max_steps=1, batch_size=1,
                      drop_path_rate=0.0, progress=False, fsdp=True)
    log = str(root / "nan_rows{}.json")
    run_two(_stopping_worker, (free_ports(1), [dataclasses.asdict(cfg)], log))
    message = (f"CheckpointError: {broken / 'model.safetensors'}: {key} holds NaN or inf values; the checkpoint is "
               "broken (a diverged run or a damaged file)")
    assert endings(log) == [[message, message]]


def _node_local_worker(rank: int, world: int, ports: list[int], configs: list[dict], log: str, folders: list[str]):
    """`_stopping_worker` in `folders[rank]`: a relative --data names another copy on each "node"."""
    os.chdir(folders[rank])
    _stopping_worker(rank, world, ports, configs, log)


def test_processes_that_read_different_data_stop_before_training(setup):
    # Node-local copies of the data that differ: the processes counted other steps and shares, and the one that
    # finished first went on to the final save while the others still trained (mismatched collectives).
    root, folder, _ = setup
    records = [{"image": f"{name}.png", "question": f"What is this {i}?", "chosen": "It is fine.",
                "rejected": f"It is {name}."} for i, name in enumerate([*COLORS, *COLORS])]
    nodes = [root / "node0", root / "node1"]
    for node, n in zip(nodes, (6, 8)):
        write_mmpr(node, records[:n])
        write_mmpr(node / "bad", [*records[:3], "{not json" if node.name == "node1" else records[3]])
    cfg = TrainConfig(model=str(folder), data="meta.json", output=str(root / "nodes_run"), batch_size=1,
                      drop_path_rate=0.0, progress=False)
    configs = [dataclasses.asdict(cfg), dataclasses.asdict(dataclasses.replace(cfg, data="bad/meta.json"))]
    log = str(root / "nodes{}.json")
    run_two(_node_local_worker, (free_ports(2), configs, log, [str(node) for node in nodes]))
    counts, bad_line = endings(log)
    message = ("InputError: meta.json: the processes read different data (process 0: 6 records, process 1: 8 records);"
               " every process must read the same files (a copy of them on each node that differs?)")
    assert counts == [message, message]
    # a malformed line in one node's copy only: process 0 waited for process 1 at the next collective
    assert bad_line[0] == bad_line[1], bad_line
    assert bad_line[0].startswith(f"InputError: {nodes[1] / 'bad' / 'toy.jsonl'}:4: malformed JSON"), bad_line


def _sigterm_worker(rank: int, world: int, ports: list[int], configs: list[dict], log: str) -> None:
    """`_stopping_worker` in which process 1 alone gets SIGTERM during the second run, in step 2's second
    micro-batch (a kill of one process); each run's ending is recorded ("stopped: message", or null)."""
    from internvl_mpo.train import mpo

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    loss, calls = mpo.micro_batch_loss, []

    def sigterm_in_step_2(*args):
        calls.append(1)
        if rank == 1 and len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(*args)

    ended = []
    for run, (port, cfg) in enumerate(zip(ports, configs)):
        os.environ["MASTER_PORT"] = str(port)
        mpo.micro_batch_loss = sigterm_in_step_2 if run == 1 else loss
        try:
            train(TrainConfig(**cfg))
            ended.append(None)
        except Stopped as e:
            ended.append(f"stopped: {e}")
        assert_no_process_group()
    Path(log.format(rank)).write_text(json.dumps(ended))


def test_sigterm_to_one_process_stops_both_after_the_same_step_and_resume_is_exact(setup):
    # Without a word between them, the process that got SIGTERM died alone (or, stopping, saved alone) while the
    # other waited at its next collective.
    root, folder, meta = setup
    base = TrainConfig(model=str(folder), data=str(meta), max_steps=4, batch_size=1, grad_accum=2, lr=1e-3,
                       warmup_ratio=0.0, progress=False, seed=3)  # drop path on: RNG states matter
    configs = [dataclasses.asdict(dataclasses.replace(base, output=str(root / name), resume=resume))
               for name, resume in (("term_whole", False), ("term_stopped", False), ("term_stopped", True))]
    log = str(root / "term{}.json")
    run_two(_sigterm_worker, (free_ports(3), configs, log))
    saved = root / "term_stopped" / "checkpoint-000002"
    message = (f"stopped: stopped by SIGTERM after step 2; checkpoint saved to {saved}; run the same command with"
               " --resume to go on")
    assert endings(log) == [[None, None], [message, message], [None, None]]
    assert {p.name for p in saved.glob("rank*.json")} == {"rank0.json", "rank1.json"}
    whole, resumed = root / "term_whole", root / "term_stopped"
    assert rows(resumed) == [{**r, **{k: ANY for k in ("tokens_per_s", "step_time_s")}} for r in rows(whole)]
    expected = InternVL.from_pretrained(whole / "final").state_dict()
    for key, value in InternVL.from_pretrained(resumed / "final").state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def _noting_worker(rank: int, world: int, ports: list[int], configs: list[dict], log: str) -> None:
    """`_worker` that records each process's closing truncation note."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    notes = []
    for port, cfg in zip(ports, configs):
        os.environ["MASTER_PORT"] = str(port)
        notes.append(train(TrainConfig(**cfg)).truncation_note)
        assert_no_process_group()
    Path(log.format(rank)).write_text(json.dumps(notes))


def test_the_truncation_note_names_the_first_cut_sample_whichever_process_read_it(setup):
    """Process 0 prints the closing note: a cut sample that only process 1 read was counted, but the note named no
    file:line (one process with the same global batch names it)."""
    root, folder, _ = setup
    long = {"question": "Say hello", "chosen": "Hello there! " * 40, "rejected": "Go away. " * 40}
    short = {"question": "Hi", "chosen": "Hello!", "rejected": "No."}
    meta = write_mmpr(root / "data_cut", [short, long])  # the cut line 2 is process 1's (as one process reads it 2nd)
    base = TrainConfig(model=str(folder), data=str(meta), mode="dpo", max_steps=1, shuffle=False, max_seq_length=100,
                       drop_path_rate=0.0, progress=False)
    single = train(dataclasses.replace(base, output=str(root / "cut_single"), batch_size=2))
    log = str(root / "cut_notes{}.json")
    configs = [dataclasses.asdict(dataclasses.replace(base, output=str(root / "cut_ddp"), batch_size=1))]
    mp.start_processes(_noting_worker, args=(2, free_ports(1), configs, log), nprocs=2, start_method="spawn")
    assert f"(the first since the run started or resumed: {root}/data_cut/toy.jsonl:2)" in single.truncation_note
    assert json.loads(Path(log.format(0)).read_text()) == [single.truncation_note]


def test_the_truncation_note_names_the_first_cut_sample_also_past_records_skipped_as_bad(setup):
    """The processes placed a cut sample at rank r's j-th batched sample's j * W + r: a record skipped as bad
    (--skip-bad) takes a place in the stream too, so process 0, having skipped one, put its cut sample before
    process 1's that came first, and the note named another file:line than one process with the same global batch."""
    root, folder, _ = setup
    long = {"question": "Say hello", "chosen": "Hello there! " * 40, "rejected": "Go away. " * 40}
    later = {**long, "question": "Say hello again"}
    bad = {"question": "long " * 400, "chosen": "Hi.", "rejected": "No."}  # no room for an answer: skipped
    short = {"question": "Hi", "chosen": "Hello!", "rejected": "No."}
    # the reader's order (lines 4, 3, 6, 5, 1, 2) puts the bad line first, then two short ones, then line 5, line 1
    meta = write_mmpr(root / "data_cut_bad", [later, short, short, bad, long, short])
    base = TrainConfig(model=str(folder), data=str(meta), mode="dpo", max_steps=2, shuffle=False, max_seq_length=100,
                       drop_path_rate=0.0, progress=False, skip_bad=True)
    single = train(dataclasses.replace(base, output=str(root / "cut_bad_single"), batch_size=2))
    log = str(root / "cut_bad_notes{}.json")
    configs = [dataclasses.asdict(dataclasses.replace(base, output=str(root / "cut_bad_ddp"), batch_size=1))]
    mp.start_processes(_noting_worker, args=(2, free_ports(1), configs, log), nprocs=2, start_method="spawn")
    assert single.skipped.counts == {"encode": 1}
    assert f"(the first since the run started or resumed: {root}/data_cut_bad/toy.jsonl:5)" in single.truncation_note
    assert json.loads(Path(log.format(0)).read_text()) == [single.truncation_note]


def _dying_worker(rank: int, world: int, port: int, cfg: dict, log: str) -> None:
    """Rank 1 dies (os._exit, as a kill -9 or the OOM killer) after step 2; rank 0 writes the error it ended with."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)

    def on_step(step: int, metrics: dict) -> None:
        if rank == 1 and step == 2:
            os._exit(0)

    try:
        train(TrainConfig(**cfg), on_step=on_step)
    except Exception as e:  # noqa: BLE001 - the test reads what it was
        Path(log).write_text(f"{type(e).__name__}: {e}")


@pytest.mark.parametrize("fsdp", [False, True])
def test_a_process_that_died_ends_the_others_with_one_line(setup, fsdp):
    # gloo's RuntimeError ("Connection reset by peer", deep in DDP's backward or FSDP2's all-gather) was a
    # 90-line traceback on every surviving process.
    root, folder, meta = setup
    name = f"died_{'fsdp' if fsdp else 'ddp'}"
    cfg = dataclasses.asdict(TrainConfig(model=str(folder), data=str(meta), output=str(root / name), max_steps=50,
                                         save_every=2, batch_size=1, drop_path_rate=0.0, progress=False, fsdp=fsdp))
    log = root / f"{name}.txt"
    mp.start_processes(_dying_worker, args=(2, free_ports(1)[0], cfg, str(log)), nprocs=2, start_method="spawn")
    assert re.fullmatch(r"TrainingError: process 0: lost contact with another process of the run \(it ended or was"
                        r" killed: see its own output\); --resume goes on from \S+checkpoint-00000[24]"
                        r" \(.* by peer.*\)",
                        log.read_text()), log.read_text()


def test_a_bad_flag_under_torchrun_is_one_line_from_process_0(monkeypatch, capsys, tmp_path):
    """Every process checks the same flags: N processes printed the same refusal N times."""
    from internvl_mpo.cli import main

    argv = ["train", "mpo", "--model", "m", "--data", "d", "--output", str(tmp_path / "out"), "--lr", "-1"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    lines = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        lines[rank] = (code, capsys.readouterr().err)
    assert lines == {"0": (1, "internvl-mpo train: error: --lr must be >= 0, got -1.0\n"), "1": (1, "")}
    monkeypatch.setenv("RANK", "5")  # out of range (not a process torchrun made): it speaks for itself
    assert (main(argv), capsys.readouterr().err) == lines["0"]


def test_a_resume_that_differs_from_its_checkpoint_is_one_line_from_process_0(monkeypatch, capsys, tmp_path):
    """Every process reads the same checkpoint and finds the same differences (the process count, say): N
    processes printed the same refusal N times."""
    import internvl_mpo.train.mpo
    from internvl_mpo.cli import main

    def refused(cfg):
        raise ResumeSettingsError("checkpoint-000001: cannot resume, these settings differ from the checkpoint: "
                                  "world_size (checkpoint 1, now 2)")

    monkeypatch.setattr(internvl_mpo.train.mpo, "train", refused)
    monkeypatch.setattr(TrainConfig, "validate", lambda self: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    lines = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        try:
            code = main(["train", "mpo", "--model", "m", "--data", "d", "--output", str(tmp_path), "--resume"])
        except SystemExit as e:
            code = e.code
        lines[rank] = (code, capsys.readouterr().err)
    assert lines == {"0": (1, "internvl-mpo train: error: checkpoint-000001: cannot resume, these settings differ "
                              "from the checkpoint: world_size (checkpoint 1, now 2)\n"), "1": (1, "")}

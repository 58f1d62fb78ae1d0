"""torchrun process groups, DDP and FSDP2 wrapping, rank-0 printing, and each rank's share of the data.

One code path for one process and N: `init_distributed` reads `RANK`, `LOCAL_RANK` and `WORLD_SIZE`
from the environment (torchrun sets them; absent means a single process) and starts a process
group only when there is more than one rank, with NCCL on CUDA and gloo on CPU.

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards each ViT layer and each decoder block, then the
root, with bf16 parameters and fp32 gradient reduction on CUDA (fp32 everywhere on CPU), and refuses
to go on when nothing was sharded. A model built on the meta device is sharded first and then given
its values by `fill_fsdp2`, each rank reading only its own rows of each tensor. The BCO running
mean needs no code here: `RunningMean` in `losses.py` averages its batch value across ranks whenever
a process group with several ranks is up, as TRL's `RunningMoments` does.

Data: every epoch has one order of the whole dataset (a permutation seeded by seed + epoch); the
epochs' orders, one after another, form one stream, and rank r of W reads its positions r, r + W,
r + 2W, ... With a per-rank micro-batch b, the global batch of one micro-step is therefore the next
W * b positions of that stream, the same samples a single process with micro-batch W * b would read,
also across the end of an epoch whose size W does not divide (no record is dropped or repeated; such
an epoch gives some ranks one sample more than others).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from internvl_mpo.devices import device_name
from internvl_mpo.errors import ConfigError, InternVLError, TrainingError
from internvl_mpo.train.settings import env_int

# How long a collective waits for the other ranks: rank 0 writes each checkpoint while the others
# wait at a barrier, and a large model's save can outlast torch's NCCL default of 10 minutes (the
# HF Trainer's ddp_timeout is 30 minutes too).
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistEnv:
    """Rank, world size and device from the torchrun environment; starts the process group if W > 1."""
    rank, local_rank, world = env_int("RANK", 0), env_int("LOCAL_RANK", 0), env_int("WORLD_SIZE", 1)
    # A RANK without its WORLD_SIZE would train as a process that is not rank 0 and so writes nothing.
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} with WORLD_SIZE={world}: the rank must be in 0..WORLD_SIZE-1 (torchrun sets"
                          " both; set neither for one process)")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if world > 1 and missing and not dist.is_initialized():
        raise ConfigError(f"WORLD_SIZE={world} but no {' or '.join(missing)} in the environment: launch the processes with"
                          " torchrun --nproc-per-node N (it sets them)")
    given = device is not None
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device_name(device))
    except RuntimeError:
        raise ConfigError(f"--device {device!r}: not a device (cpu, cuda, cuda:1, ...)") from None
    # torchrun gives every process of a node the same flags: one GPU index would put them all on that GPU
    # (NCCL then stops with a duplicate-GPU error). Every process refuses it alike, before the process group.
    local_world = env_int("LOCAL_WORLD_SIZE", 1)
    if given and dev.type == "cuda" and dev.index is not None and local_world > 1:
        raise ConfigError(f"--device {device}: {local_world} processes on this node would all train on GPU {dev.index};"
                          " give --device cuda (or leave it out): process LOCAL_RANK then takes cuda:LOCAL_RANK")
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: no CUDA device {dev.index} ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        # torch.distributed.nn.functional gives ten functions the default `group=group.WORLD`, read when it is
        # imported: imported while the group runs (dynamo imports it, and DistributedDataParallel() imports dynamo),
        # they keep the group, whose gloo threads then outlive destroy_distributed (test_distributed checks).
        # Imported before, their default is None.
        from torch.distributed.nn import functional  # noqa: F401
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev, timeout=PROCESS_GROUP_TIMEOUT)
        else:
            dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return DistEnv(rank, local_rank, world, dev)


def fsdp_mesh(env: DistEnv) -> DeviceMesh:
    """The mesh of all ranks, on the run's device type, that FSDP2 shards a run's modules over."""
    return init_device_mesh(env.device.type, (env.world_size,))


def destroy_distributed(mesh: DeviceMesh | None = None) -> None:
    """End the process group (and `mesh`'s): freed here, their threads joined, unless a live object still refers
    to them."""
    if dist.is_available() and dist.is_initialized():
        # torch's state-dict helpers (every checkpoint) leave reference cycles that hold the DDP / FSDP2 module, and
        # through it the process group: left to some later collection, its threads still ran when the interpreter
        # exited, and the process aborted now and then ('terminate called without an active exception'). Collected
        # first, the group goes with the last reference that destroy_process_group drops.
        gc.collect()
        if mesh is not None:
            # DTensor's caches (sharding propagation, redistribution planners) keep the run's DTensor specs, and
            # through them the mesh, as long as the process lives; the mesh holds its process groups by reference
            # (`_pg_registry`, for torch.compile; torch has no public call that lets go of them), so the gloo
            # group's threads ran on after train() returned, to the interpreter's exit.
            registry = getattr(mesh, "_pg_registry", None)  # a torch that moved it: the tests' thread check says so
            if isinstance(registry, dict):
                registry.clear()
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """`print` on rank 0 only (CLI-facing code; the library itself does not print)."""
    if env_int("RANK", 0) == 0:
        print(*args, **kwargs, flush=True)


@contextlib.contextmanager
def ranks_together(env: DistEnv) -> Iterator[None]:
    """Run a block without collectives inside (process 0's save, reading this rank's samples) on every
    rank, then stop every rank when it raised on any: a failing rank raises its own error, the others
    the lowest failing rank's (an `InternVLError` as it is, any other as a one-line `TrainingError`).
    Without it a rank that stopped leaves the others waiting at their next collective until the process
    group's timeout, then ending with a torch error. Costs a one-number all-reduce."""
    error = None
    try:
        yield
    except Exception as e:
        if not env.distributed:
            raise
        error = e
    if not env.distributed:
        return
    failed = torch.tensor([error is not None], dtype=torch.int32, device=env.device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if not failed.item():
        return
    sent = error
    if error is not None and not isinstance(error, InternVLError):
        sent = TrainingError(f"process {env.rank} stopped: {type(error).__name__}: {' '.join(str(error).split())}")
    errors = all_gather_lists([sent], env)
    if error is not None:
        raise error
    raise next(e for e in errors if e is not None)


def all_reduce_sum(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over ranks, as a new tensor (the input is left unchanged)."""
    if not env.distributed:
        return x.clone()
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def all_reduce_mean(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    return all_reduce_sum(x, env) / env.world_size


def all_gather_lists(items: list, env: DistEnv) -> list:
    """Every rank's `items` (picklable), concatenated in rank order."""
    if not env.distributed:
        return list(items)
    gathered: list = [None] * env.world_size
    dist.all_gather_object(gathered, items)
    return [item for rank_items in gathered for item in rank_items]


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool = True) -> list[int]:
    """The order of all n dataset positions in one epoch (the same on every rank)."""
    if not shuffle:
        return list(range(n))
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=generator).tolist()


def share_start(n: int, rank: int, world_size: int, epoch: int) -> int:
    """The first position of an n-record epoch that is `rank`'s: stream position epoch * n + i is rank (epoch * n + i) % W's."""
    return (rank - epoch * n) % world_size


def rank_share(order: list[int], rank: int, world_size: int, epoch: int = 0) -> list[int]:
    """`rank`'s records of epoch `epoch`, whose order is `order`: every W-th, from its `share_start`."""
    return order[share_start(len(order), rank, world_size, epoch) :: world_size]


def wrap_ddp(module: nn.Module, env: DistEnv) -> nn.Module:
    """DistributedDataParallel over all ranks (gradients averaged)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The InternVL units that are checkpointed and sharded one by one: ViT layers, then decoder blocks."""
    return [*model.vision_model.encoder.layers, *model.language_model.model.layers]


def shard_fsdp2(root: nn.Module, blocks: list[nn.Module], bf16: bool, mesh: DeviceMesh) -> nn.Module:
    """`fully_shard` each block, then the root (whose own parameters are the rest of the model), over `mesh`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    if bf16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    if not any(isinstance(p, DTensor) for p in root.parameters()):
        raise ConfigError("FSDP2 sharded no parameter; check the model's layer lists")
    return root


def fill_fsdp2(root: nn.Module, device: torch.device, source: Callable[[str], Any]) -> nn.Module:
    """Allocate a meta-built, `shard_fsdp2`-ed module's local shards on `device` and fill them from
    `source(name)`, a full tensor or a `LazyTensor` (read from the memory-mapped checkpoint), of which
    this rank reads only its own rows: the whole model is never on the device.

    FSDP2 shards dim 0 as `torch.chunk` does: rank r of W holds rows r * ceil(n / W) onwards.
    """
    from torch.distributed.tensor import DTensor, Shard

    if any(True for _ in root.buffers()):  # none today: RoPE's inverse frequencies are computed on first use
        raise ConfigError("the model has buffers, which filling FSDP2 shards from a checkpoint does not rebuild")
    root.to_empty(device=device)
    with torch.no_grad():
        for name, param in root.named_parameters():
            if not isinstance(param, DTensor) or tuple(param.placements) != (Shard(0),):
                raise ConfigError(f"FSDP2 left {name} unsharded along dim 0; cannot fill it rank by rank")
            local = param.to_local()
            rank, world = param.device_mesh.get_local_rank(), param.device_mesh.size()
            start = min(rank * -(-param.shape[0] // world), param.shape[0])
            local.copy_(source(name)[start : start + local.shape[0]])
    return root

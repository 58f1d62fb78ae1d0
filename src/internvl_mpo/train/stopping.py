"""SIGTERM stops a run cleanly (a batch scheduler's preemption or time limit, a pod's eviction; torchrun
forwards it to every process): the handler only sets a flag, and the run reads it where it can stop, between
two optimizer steps (after a checkpoint of the step just made) or between the stages of its set-up. Under
several processes they all read it together, in a one-number all-reduce, so that they all stop at the same
point even when the signal reached only one of them."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from internvl_mpo.errors import TrainingError
from internvl_mpo.train.distributed import DistEnv

EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process that SIGTERM ended: 143

_requested = False  # set by the handler, read by `stop_requested`


class Stopped(TrainingError):
    """A run that SIGTERM stopped: after `step` with its checkpoint at `checkpoint`, or before any step (None)."""

    def __init__(self, step: int | None = None, checkpoint: Path | None = None):
        if checkpoint is None:
            message = "stopped by SIGTERM before training started; nothing was trained or saved"
        else:
            message = (f"stopped by SIGTERM after step {step}; checkpoint saved to {checkpoint}; run the same command"
                       " with --resume to go on")
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


def _on_sigterm(signum, frame) -> None:
    global _requested
    _requested = True


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    """While the block runs, SIGTERM sets the flag that `stop_requested` reads instead of ending the process;
    the handler before it comes back after. Outside the main thread (where Python cannot set handlers) a
    SIGTERM does what it did."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested = False  # a SIGTERM that reached an earlier run in this process during its last step
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        # None: a handler that was not set from Python, which cannot be put back; the default stands for it
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def stop_requested(env: DistEnv) -> bool:
    """Whether SIGTERM reached any process of the run; every process gets the same answer (all call this at
    the same points)."""
    if not env.distributed:
        return _requested
    flag = torch.tensor([int(_requested)], dtype=torch.int32, device=env.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def stop_if_requested(env: DistEnv) -> None:
    """`Stopped` (nothing trained or saved) when SIGTERM reached any process during the run's set-up."""
    if stop_requested(env):
        raise Stopped()

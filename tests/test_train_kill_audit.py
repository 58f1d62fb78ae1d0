"""A training run interrupted the hard way: renames and deletions that fail while a checkpoint is published."""

import dataclasses
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_train
from test_train import config

from internvl_mpo.errors import CheckpointError
from internvl_mpo.locks import TRAIN_LOCK
from internvl_mpo.train import checkpointing as ckpt
from internvl_mpo.train.mpo import train

chat_folder, meta = test_train.chat_folder, test_train.meta  # the fixtures


def refuse_rename(monkeypatch, source: str, target: str) -> None:
    """os.replace fails as in a folder made read-only (chattr +i, or chmod for a user other than root) for
    the rename of a path named `source` to one named `target`."""
    real = os.replace

    def replace(src, dst, **kwargs):
        if (os.path.basename(src), os.path.basename(dst)) == (source, target):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(src), None, str(dst))
        return real(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_a_checkpoint_that_cannot_be_renamed_into_place_is_one_line_and_the_last_one_resumes(
        tmp_path, chat_folder, meta, monkeypatch):
    """The rename that publishes a checkpoint failing (its folder made read-only mid-run) stopped the run with a
    PermissionError traceback and left the temporary folder; it is one line naming the checkpoint, and the
    previous checkpoint resumes."""
    run = tmp_path / "run"
    cfg = config(chat_folder, meta, run, max_steps=4, save_every=2)
    with monkeypatch.context() as m:
        refuse_rename(m, ".tmp-checkpoint-000004", "checkpoint-000004")
        message = f"{run / 'checkpoint-000004'}: saving failed ([Errno 1] Operation not permitted: "
        with pytest.raises(CheckpointError, match=re.escape(message) + ".*; nothing there was replaced$"):
            train(cfg)
    assert sorted(p.name for p in run.iterdir()) == [TRAIN_LOCK[0], "checkpoint-000002", "metrics.jsonl"]
    assert train(dataclasses.replace(cfg, resume=True)).resumed_after == 2


def test_a_folder_that_cannot_replace_the_one_there_leaves_that_one(tmp_path, monkeypatch):
    """Publishing over an existing folder (final/ written again) moved it aside before the rename that failed:
    final/ was gone, and a traceback said nothing of where it was."""
    final = tmp_path / "final"
    ckpt.atomic_folder(final, lambda folder: (folder / "config.json").write_text("old"))
    refuse_rename(monkeypatch, ".tmp-final", "final")
    with pytest.raises(CheckpointError, match=re.escape(f"{final}: saving failed ([Errno 1]")):
        ckpt.atomic_folder(final, lambda folder: (folder / "config.json").write_text("new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert (final / "config.json").read_text() == "old"


def test_publish_removes_what_a_kill_between_its_two_renames_left(tmp_path):
    """Killed after moving the old final/ aside and before renaming the new one in: the next publish found no
    final/ and left the old copy (a whole model) as .tmp-final.old for good."""
    (tmp_path / ".tmp-final.old").mkdir()
    (tmp_path / ".tmp-final.old" / "model.safetensors").write_bytes(b"weights")
    ckpt.atomic_folder(tmp_path / "final", lambda folder: (folder / "config.json").write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_checkpoints_that_cannot_be_deleted_for_the_save_limit_are_one_line(tmp_path, chat_folder, meta, monkeypatch):
    """--save-total-limit deleting an older checkpoint in a folder made read-only stopped the run with a traceback;
    it is one line naming that checkpoint and the newest, which resumes."""
    run = tmp_path / "run"
    cfg = config(chat_folder, meta, run, max_steps=6, save_every=2, save_total_limit=1)
    with monkeypatch.context() as m:
        refuse_rename(m, "checkpoint-000002", ".tmp-checkpoint-000002")
        message = (re.escape(f"{run / 'checkpoint-000002'}: cannot delete it to keep --save-total-limit 1 ([Errno 1]"
                             " Operation not permitted: ") + ".*"
                   + re.escape(f"); {run / 'checkpoint-000004'} is saved, --resume goes on from it") + "$")
        with pytest.raises(CheckpointError, match=message):
            train(cfg)
    assert train(dataclasses.replace(cfg, resume=True)).resumed_after == 4


def test_metrics_rows_reach_the_disk_before_the_checkpoint_of_their_steps(tmp_path, chat_folder, meta, monkeypatch):
    """Checkpoints are fsynced before their rename, metrics.jsonl was never: after a machine's crash (a node lost,
    its page cache with it) a resume could go on from a checkpoint whose steps' rows were gone, and the rewrite at a
    resume could leave an empty file. The rows are synced before each checkpoint's rename, the rewrite before its."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("rename", os.path.basename(dst)))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run = tmp_path / "run"
    cfg = config(chat_folder, meta, run, max_steps=2, save_every=1)
    train(cfg)
    synced = [name for kind, name in events if kind == "fsync" or name.startswith("checkpoint-")]
    assert [name for name in synced if name in ("metrics.jsonl", "checkpoint-000001", "checkpoint-000002")] == [
        "metrics.jsonl", "checkpoint-000001", "metrics.jsonl", "checkpoint-000002"]
    events.clear()
    (run / "checkpoint-000002" / ckpt.STATE_FILE).unlink()  # a run killed in its last step's save
    shutil.rmtree(run / "final")
    train(dataclasses.replace(cfg, resume=True))
    assert events.index(("fsync", ".tmp-metrics.jsonl")) < events.index(("rename", "metrics.jsonl"))


SLOW_START = """
import multiprocessing, os, pathlib, time
from internvl_mpo.train.data import PairDataset

class SlowStart(PairDataset):
    \"\"\"Unpickled in a loader worker, before the worker's own start: says so, waits until the run is killed.\"\"\"
    def __setstate__(self, state):
        self.__dict__.update(state)
        if multiprocessing.current_process().name != "MainProcess":  # named before it is unpickled
            (pathlib.Path(self.folder) / "worker.tmp").write_text(str(os.getpid()))
            os.replace(pathlib.Path(self.folder) / "worker.tmp", pathlib.Path(self.folder) / "worker")
            while not (pathlib.Path(self.folder) / "parent_dead").exists():
                time.sleep(0.05)
"""

CHILD_SLOW_WORKER = """
import sys
sys.path[:0] = [{src!r}, {here!r}]
from internvl_mpo.train import mpo
from internvl_mpo.train.settings import TrainConfig
from slowstart import SlowStart
build = mpo.build_dataset
def slow_build(*args):
    dataset, report = build(*args)
    dataset.__class__, dataset.folder = SlowStart, {here!r}
    return dataset, report
mpo.build_dataset = slow_build
mpo.train(TrainConfig(**{cfg!r}))
"""


def running(pid: int) -> bool:
    """Whether process `pid` runs (a zombie that nobody reaps has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_loader_worker_ends_when_the_run_was_killed_while_it_started(tmp_path, chat_folder, meta):
    """A run killed (SIGKILL, the OOM killer) while its --num-workers loader workers started (each epoch starts them
    again): torch's watchdog took init for the worker's parent, so the worker waited for work for good."""
    (tmp_path / "slowstart.py").write_text(SLOW_START)
    cfg = config(chat_folder, meta, tmp_path / "run", num_workers=1)
    script = CHILD_SLOW_WORKER.format(src=str(test_train.SRC), here=str(tmp_path), cfg=dataclasses.asdict(cfg))
    child = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
    deadline = time.time() + 120
    while not (tmp_path / "worker").exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "worker").exists(), "the run never started its loader worker"
    worker = int((tmp_path / "worker").read_text())
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    (tmp_path / "parent_dead").touch()
    deadline = time.time() + 60
    while running(worker) and time.time() < deadline:
        time.sleep(0.1)
    alive = running(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the loader worker outlived its killed run"


def test_a_resume_prunes_what_a_run_killed_while_pruning_left(tmp_path, chat_folder, meta):
    """Killed while --save-total-limit deleted an older checkpoint (after its last save): the resume that trained
    the last steps saved nothing, so nothing pruned the checkpoint (45 GB for a 4B model) or its renamed remains."""
    run = tmp_path / "run"
    cfg = config(chat_folder, meta, run, max_steps=5, save_every=2, save_total_limit=1)
    train(dataclasses.replace(cfg, save_total_limit=0))
    shutil.rmtree(run / "final")  # killed before its final save: the checkpoint pruning was not done either
    (run / ".tmp-checkpoint-000001" / "model").mkdir(parents=True)
    assert train(dataclasses.replace(cfg, resume=True)).resumed_after == 4
    assert sorted(p.name for p in run.iterdir()) == [TRAIN_LOCK[0], "checkpoint-000004", "final", "metrics.jsonl"]

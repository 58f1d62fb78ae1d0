"""The lock a train, pairs, eval or generate run holds on its output folder while it writes there
(`lock_output`), and the check that no live run holds one (`check_not_in_use`).

Each is an flock on a lock file in the folder (the file names the holder), which the kernel drops when the
process ends, however it ends. Filesystems without locks (`LOCKS_UNSUPPORTED`) get none, as a save does
(`checkpoint.save_lock`).
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import IO

from .errors import ConfigError

# What flock gives on filesystems without locks (some NFS and Lustre mounts).
LOCKS_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP)

# What holds a run's output folder (`lock_output`): the lock file there, the run named in the error, what a
# second run would overwrite. `pairs` and `eval` hold theirs with their own (`pairs.PAIRS_LOCK`, `evaluate.EVAL_LOCK`).
TRAIN_LOCK = (".train.lock", "training run", "checkpoints and metrics")


def _in_use(output: Path, lock: IO[str], kind: tuple[str, str, str]) -> ConfigError:
    _, run, overwritten = kind
    lock.seek(0)
    holder = lock.read().strip() or "its process unknown"
    return ConfigError(f"{output} is in use by another {run} ({holder}): two runs would overwrite each"
                       f" other's {overwritten}; wait for it to end or choose another --output")


def lock_output(output: Path, kind: tuple[str, str, str] = TRAIN_LOCK) -> IO[str] | None:
    """Lock `output` for one run: an exclusive flock on its lock file (`kind`: as `TRAIN_LOCK`, whose file
    is `output/.train.lock`), held while the returned file is open. The kernel drops it when the process
    ends, however it ends, so a crashed run leaves the file but no stale lock. ConfigError when another
    process holds it; None (no lock) where the filesystem has no locks."""
    import fcntl

    path = output / kind[0]
    try:
        lock = open(path, "a+", encoding="utf-8")
    except OSError as e:  # a read-only folder, say
        raise ConfigError(f"{path}: cannot open the run's lock file ({e.strerror}); choose another --output") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        error = _in_use(output, lock, kind)
        lock.close()
        raise error from None
    except OSError as e:
        lock.close()
        if e.errno in LOCKS_UNSUPPORTED:
            return None
        raise
    lock.seek(0)
    lock.truncate()
    holder = f"pid {os.getpid()} on {socket.gethostname()}\n".encode()
    try:  # unbuffered: a failed write leaves nothing for close() to write again
        written = os.write(lock.fileno(), holder)
    except OSError:
        written = 0
    if written != len(holder):  # a full disk: the lock holds all the same, its holder unnamed
        os.ftruncate(lock.fileno(), 0)
    return lock


def no_lock_note(output: Path) -> str:
    """What a run says when `lock_output` gave it no lock (a filesystem without locks)."""
    return f"note: {output}'s filesystem has no file locks: make sure no other run writes to it"


def check_not_in_use(output: Path, kind: tuple[str, str, str] = TRAIN_LOCK) -> None:
    """ConfigError when a live run holds `output`'s lock of `kind` (probed with a shared lock, released at once)."""
    import fcntl

    try:
        lock = open(output / kind[0], encoding="utf-8")
    except OSError:  # no lock file (no run started there), or no such folder
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(output, lock, kind) from None
        except OSError as e:
            if e.errno not in LOCKS_UNSUPPORTED:
                raise

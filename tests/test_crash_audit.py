"""Commands that write files, on a full disk: one line naming the file, and a state the same command resumes from.

A full disk is stood in for by RLIMIT_FSIZE (writes past the limit fail with EFBIG; Python ignores SIGXFSZ)."""

from __future__ import annotations

import contextlib
import json
import resource
import subprocess
import sys

import pytest

from internvl_mpo.errors import SaveError
from internvl_mpo.run_folder import Progress, atomic_write

from conftest import tiny_chat_folder


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past `limit` bytes of a file fail in this process meanwhile."""
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)


def test_progress_on_a_full_disk_is_one_line_and_the_rerun_keeps_the_finished_items(tmp_path):
    progress = Progress(tmp_path / "progress.jsonl")
    first = [{"id": "a", "answer": "one"}]
    progress.append(first)
    with file_size_limit(progress.path.stat().st_size + 20), pytest.raises(SaveError) as error:
        progress.append([{"id": "b", "answer": "two " * 20}])  # cut 20 bytes in
    assert str(error.value).startswith(f"{progress.path}: saving failed (")
    assert str(error.value).endswith("make room and run the same command again to resume")
    assert progress.load() == {"a": first[0]}  # the cut line is dropped
    progress.append([{"id": "c", "answer": "three"}])
    assert list(progress.load()) == ["a", "c"]


def test_progress_of_an_item_done_again_is_its_last_line(tmp_path):
    """An item edited since its row was written is done again and appended (pairs' and eval's resume): a later
    rerun reads its last row, or it would take the stale one and do the item again at every rerun."""
    progress = Progress(tmp_path / "progress.jsonl")
    progress.append([{"id": "a", "question": "old"}, {"id": "b", "question": "b"}])
    progress.append([{"id": "a", "question": "new"}])
    assert progress.load() == {"a": {"id": "a", "question": "new"}, "b": {"id": "b", "question": "b"}}


def test_atomic_write_on_a_full_disk_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "score.json"
    atomic_write(path, "old\n")
    with file_size_limit(10), pytest.raises(SaveError, match=f"^{path}: saving failed .*score.json is as it was"):
        atomic_write(path, "new " * 100)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["score.json"]


def _limited(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_generate_on_a_full_disk_says_so_in_one_line_and_the_rerun_resumes(tmp_path):
    folder, _ = tiny_chat_folder(tmp_path / "model")
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    run = [sys.executable, "-m", "internvl_mpo.cli", "generate", "--input", str(requests), "--output", str(answers),
           "--model", str(folder), "--max-new-tokens", "4", "--device", "cpu"]
    requests.write_text(json.dumps({"id": "b", "question": "Hello"}) + "\n")
    assert subprocess.run(run, capture_output=True, timeout=120).returncode == 0  # an earlier run: b and the settings
    requests.write_text("".join(json.dumps({"id": k, "question": q}) + "\n" for k, q in [("a", "Hi"), ("b", "Hello")]))
    kept = "kept " * 400  # b's answer, marked
    answers.write_text(json.dumps({"id": "b", "question": "Hello", "answer": kept}) + "\n")
    full = subprocess.run(run, capture_output=True, text=True, timeout=120,
                          preexec_fn=_limited(answers.stat().st_size + 20))  # a's line is cut 20 bytes in
    assert full.returncode == 1
    assert full.stderr.splitlines()[-1] == (
        f"internvl-mpo generate: error: {answers}: saving failed ([Errno 27] File too large); the answers written "
        "before are kept: make room and run the same command again to resume")
    assert "Traceback" not in full.stderr
    rerun = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"] and rows[1]["answer"] == kept


def test_generate_putting_answers_in_order_on_a_full_disk_leaves_no_temporary_file(tmp_path):
    """The rerun of a finished run rewrites the answers in order through answers.jsonl.tmp: on a full disk it said
    so in one line but left the .tmp (as large as what fitted), keeping the disk full."""
    folder, _ = tiny_chat_folder(tmp_path / "model")
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text("".join(json.dumps({"id": k, "question": q}) + "\n" for k, q in [("a", "Hi"), ("b", "Hello")]))
    run = [sys.executable, "-m", "internvl_mpo.cli", "generate", "--input", str(requests), "--output", str(answers),
           "--model", str(folder), "--max-new-tokens", "4", "--device", "cpu"]
    assert subprocess.run(run, capture_output=True, timeout=120).returncode == 0
    before = answers.read_bytes()
    full = subprocess.run(run, capture_output=True, text=True, timeout=120, preexec_fn=_limited(10))
    assert full.returncode == 1 and "saving failed" in full.stderr.splitlines()[-1], full.stderr
    assert answers.read_bytes() == before and not answers.with_name("answers.jsonl.tmp").exists()


def test_a_full_disk_leaves_the_output_locked_with_its_holder_unnamed(tmp_path):
    """Writing the holder's pid into the lock file was a traceback on a full disk."""
    from internvl_mpo.errors import ConfigError
    from internvl_mpo.locks import TRAIN_LOCK, check_not_in_use, lock_output

    with file_size_limit(5):
        lock = lock_output(tmp_path, TRAIN_LOCK)
    with lock:
        assert (tmp_path / ".train.lock").read_text() == ""  # not a cut "pid 1"
        with pytest.raises(ConfigError, match=r"in use by another training run \(its process unknown\)"):
            check_not_in_use(tmp_path, TRAIN_LOCK)
    check_not_in_use(tmp_path, TRAIN_LOCK)


def test_a_lock_file_that_cannot_be_opened_is_one_line(tmp_path):
    from internvl_mpo.errors import ConfigError
    from internvl_mpo.locks import TRAIN_LOCK, lock_output

    (tmp_path / ".train.lock").mkdir()  # stands in for a read-only folder, which root could write
    with pytest.raises(ConfigError, match=r"\.train\.lock: cannot open the run's lock file \(Is a directory\); "
                                          "choose another --output$"):
        lock_output(tmp_path, TRAIN_LOCK)


def test_a_live_run_is_named_as_its_holder_not_a_crashed_run_before_it(tmp_path):
    """A crashed run leaves its lock file naming it; the next run's holder replaces that name, not follows it."""
    import os
    import socket

    from internvl_mpo.errors import ConfigError
    from internvl_mpo.locks import TRAIN_LOCK, lock_output

    (tmp_path / ".train.lock").write_text("pid 1 on crashed-host\n")
    with lock_output(tmp_path, TRAIN_LOCK):
        holder = f"pid {os.getpid()} on {socket.gethostname()}"
        assert (tmp_path / ".train.lock").read_text() == holder + "\n"
        with pytest.raises(ConfigError, match=rf"in use by another training run \({holder}\): "):
            lock_output(tmp_path, TRAIN_LOCK)  # an flock of another open file: refused, as another process's


def test_putting_answers_in_order_keeps_the_answers_of_requests_no_longer_in_the_file(tmp_path):
    """A rerun of `generate` puts the answers in the requests' order; answers of ids the requests file no longer
    holds (a request taken out of it) stay, after the others, and each id keeps its last line."""
    from internvl_mpo.jsonl import in_order

    answers = tmp_path / "answers.jsonl"
    b, gone, a_old, a = (json.dumps({"id": k, "answer": text}) + "\n" for k, text in
                         [("b", "B"), ("gone", "G"), ("a", "old"), ("a", "A")])
    answers.write_text(b + gone + a_old + a)
    assert in_order(answers, ["a", "b"]).decode() == a + b + gone


def test_generate_rerun_after_a_kill_past_the_last_answer_puts_the_answers_in_order(tmp_path):
    """A run killed after its last answer, before it put the answers back in the requests' order, left them in
    the order they finished: the rerun found every request answered and stopped there."""
    from internvl_mpo import cli_chat

    folder, _ = tiny_chat_folder(tmp_path / "model")
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text("".join(json.dumps({"id": k, "question": q}) + "\n" for k, q in [("a", "Hi"), ("b", "Hello")]))
    run = dict(input=str(requests), output=str(answers), model=str(folder), device="cpu", max_new_tokens=3)
    assert cli_chat.generate(**run) == 0
    ordered = answers.read_bytes()
    first, second = ordered.splitlines(keepends=True)
    answers.write_bytes(second + first)  # as they finished
    assert cli_chat.generate(**run) == 0
    assert answers.read_bytes() == ordered

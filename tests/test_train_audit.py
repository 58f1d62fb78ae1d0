"""What a user sees when following the README's training section end to end."""

import json
import shutil

import test_train
from test_train import config

from internvl_mpo.train.mpo import train

chat_folder, meta = test_train.chat_folder, test_train.meta  # the fixtures


def test_the_closing_line_of_a_resumed_run_counts_the_steps_it_trained(tmp_path, chat_folder, meta, capsys):
    """A resume said "trained 3 steps" after training 1 of them, and also after training none (a checkpoint
    of the last step, where it only writes final/ again)."""
    from internvl_mpo.cli import main

    out = tmp_path / "run"
    train(config(chat_folder, meta, out, max_steps=3, save_every=1))
    shutil.rmtree(out / "final")  # as a run killed after step 2's checkpoint leaves its folder
    shutil.rmtree(out / "checkpoint-000003")
    run = ["train", "mpo", "--model", str(chat_folder), "--data", str(meta), "--output", str(out), "--max-steps",
           "3", "--save-every", "1", "--batch-size", "2", "--lr", "1e-3", "--warmup-ratio", "0", "--drop-path-rate",
           "0", "--no-grad-checkpointing", "--no-progress", "--resume"]
    assert main(run) == 0
    assert f"trained steps 3 to 3 (resumed after step 2); final model: {out / 'final'}\n" in capsys.readouterr().out
    assert main(run) == 0
    assert (f"resumed after the last step, 3: no step left to train; final model: {out / 'final'}\n"
            in capsys.readouterr().out)


def test_skip_bad_that_leaves_no_record_says_what_was_wrong_with_them(tmp_path, chat_folder, capsys):
    """With --skip-bad and every record bad (a wrong `root`: no image is found), the run stopped with "no usable
    training records" and not a word of why."""
    from internvl_mpo.cli import main

    lines = [json.dumps({"image": f"none{i}.png", "question": "<image>\nq", "chosen": "a", "rejected": "b"})
             for i in range(2)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"d": {"root": str(tmp_path), "annotation": str(tmp_path / "pairs.jsonl"),
                                      "repeat_time": 1}}))
    (tmp_path / "sft.jsonl").write_text(json.dumps({"image": "none.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}) + "\n")
    for mode, data, why in [
        ("mpo", meta, f"2 bad records skipped (--skip-bad); first problems: {tmp_path / 'pairs.jsonl'}:1: image file "
                      f"not found: {tmp_path / 'none0.png'}; {tmp_path / 'pairs.jsonl'}:2: "),
        ("sft", tmp_path / "sft.jsonl", f"1 bad record skipped (--skip-bad); first problem: {tmp_path / 'sft.jsonl'}:1:"
                                        f" image file not found: {tmp_path / 'none.png'}\n"),
    ]:
        assert main(["train", mode, "--model", str(chat_folder), "--data", str(data), "--output",
                     str(tmp_path / mode), "--skip-bad", "--no-progress"]) == 1
        assert f"internvl-mpo train: error: {data}: no usable training records: {why}" in capsys.readouterr().err

"""What a user sees when following the README's training section end to end."""

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

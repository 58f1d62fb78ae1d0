"""Seconds per optimizer step and peak memory: our MPO step against TRL's DPOTrainer.

Both sides train the same decoder (Qwen2 layout) on the same batch: 2 pairs, a 300-token prompt and
100-token chosen / rejected answers, text only (TRL's vision path cannot take an InternVL model, and
the 2.5-MPO objective on text is the same maths). The loss is the MPO mix on both sides: TRL with
`loss_type=["sigmoid", "bco_pair", "sft"]`, `loss_weights=[0.8, 0.2, 1.0]`; ours with
`MPOWeights(pref 0.8, quality 0.2, gen 1.0)`. Both keep a live reference model, AdamW, clipping at 1.0,
no activation checkpointing (`--grad-checkpointing` turns it on for both). Every answer has the same
length, so the step-1 losses must agree: the script prints both, and where they differ by more than
a relative 1e-4 (fp32 rounding is far below that) it exits with an error after its report, since the
two sides then do not optimise the same objective.

Configs: `tiny` = 2 decoder layers, width 64, vocabulary 151674 (the real Qwen2.5 vocabulary size,
which dominates the cost); `0.5b` = Qwen2.5-0.5B's shape (24 layers, width 896).

Memory: on CUDA, `torch.cuda.max_memory_allocated` over the timed steps (weights, optimizer state,
activations); on CPU, the process's peak resident set (VmHWM) and its growth over the timed steps.
Each side runs in its own process.

TRL 1.16 is in the test extra (`pip install -e ".[test]"`, for tests/test_trl_parity.py), beside the
project's torch and transformers, so the default `--trl-python` (this interpreter) has it; another
may be named, e.g. a venv that sees the system packages:

    python3 -m venv --system-site-packages /work/venv-bench
    /work/venv-bench/bin/pip install trl==1.16.0
    python benchmarks/train_step.py --trl-python /work/venv-bench/bin/python [--config 0.5b] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOCAB = 151674
LOSS_RTOL = 1e-4  # step-1 losses of the two sides must agree this closely
CONFIGS = {
    "tiny": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2},
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2},
}
WORDS = 1000  # the word-level tokenizer's plain words "w0".."w999"


def word_tokenizer():
    """A word-level tokenizer (one id per space-separated word) so both sides see the exact token counts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, **{f"w{i}": 3 + i for i in range(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def texts(args) -> list[dict[str, str]]:
    """Pairs of random words: prompt `prompt_len` words; answers `answer_len - 1` words (+ EOS added by TRL)."""
    import random

    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(WORDS)}" for _ in range(n))

    return [{"prompt": words(args.prompt_len) + " ", "chosen": words(args.answer_len - 1),
             "rejected": words(args.answer_len - 1)} for _ in range(args.batch)]


def qwen2_model(args):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, tie_word_embeddings=False, max_position_embeddings=4096, rope_theta=1e6,
                         rms_norm_eps=1e-6, **CONFIGS[args.config])
    return Qwen2ForCausalLM(config).float()


def memory_probe(device: str):
    import torch

    def rss(field: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
        return float("nan")

    def start() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / 2**20
        return rss("VmRSS:")

    def peak() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return rss("VmHWM:")

    return start, peak


def run_ours(args) -> dict:
    import dataclasses
    import functools

    import torch

    from internvl_mpo.config import LLMConfig, ModelConfig, VisionConfig
    from internvl_mpo.model import InternVL
    from internvl_mpo.train.data import PairExample, collate_pairs
    from internvl_mpo.train.losses import MPOWeights, RunningMean
    from internvl_mpo.train.mpo import TrainConfig, lr_at, micro_batch_loss
    from internvl_mpo.train.policy import SequenceLogps, build_optimizer, make_reference, set_drop_path

    device = torch.device(args.device)
    hf = qwen2_model(args)
    llm = dataclasses.replace(LLMConfig(), vocab_size=VOCAB, rope_theta=1e6, rms_norm_eps=1e-6, **CONFIGS[args.config])
    vision = dataclasses.replace(VisionConfig(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=56)
    config = ModelConfig(vision=vision, llm=llm, force_image_size=56)
    with torch.device("meta"):
        policy = InternVL(config)
    state = {("language_model." + k): v for k, v in hf.state_dict().items()}
    with torch.device("cpu"):
        donor = InternVL(config)
    donor.init_weights()
    state.update({k: v for k, v in donor.state_dict().items() if not k.startswith("language_model.")})
    policy.load_state_dict(state, assign=True)
    policy = policy.to(device).train()
    del hf, donor

    cfg = TrainConfig(lr=1e-6, warmup_ratio=0.0)
    set_drop_path(policy, 0.0)
    bf16 = device.type == "cuda"
    reference = make_reference(policy, False)  # float32 under the policy's autocast, as the trainer without FSDP
    if args.grad_checkpointing:
        from torch.distributed._composable import checkpoint

        for block in policy.language_model.model.layers:
            checkpoint(block)
    module, ref_module = SequenceLogps(policy), SequenceLogps(reference)
    optimizer = build_optimizer(policy, cfg)
    params = [p for p in policy.parameters() if p.requires_grad]
    weights = MPOWeights(beta=0.1, pref_weight=0.8, quality_weight=0.2, gen_weight=1.0)
    running = RunningMean()
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16)

    tok = word_tokenizer()
    examples = []
    for k, pair in enumerate(texts(args)):
        prompt = tok(pair["prompt"], add_special_tokens=False).input_ids
        chosen = tok(pair["chosen"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        rejected = tok(pair["rejected"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        examples.append(PairExample(k, prompt, chosen, chosen, rejected, rejected,
                                    torch.zeros(0, 3, 56, 56), False, f"pair {k}"))
    batch = collate_pairs(examples, tok.pad_token_id)
    assert batch.input_ids.shape == (2 * args.batch, args.prompt_len + args.answer_len)

    start, peak = memory_probe(args.device)
    times, losses, base = [], [], None
    total = args.warmup + args.steps
    for step in range(total):
        if step == args.warmup:
            base = start()
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, cfg.warmup_ratio, cfg.lr)
        loss, _ = micro_batch_loss(module, ref_module, None, batch.to(device), weights, running, autocast)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    return {"side": "ours", "step_s": statistics.median(times[args.warmup:]), "times": times, "first_loss": losses[0],
            "peak_mib": peak(), "base_mib": base}


def run_trl(args) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    start, peak = memory_probe(args.device)
    times: list[float] = []
    losses: list[float] = []
    marks: dict[str, float] = {}

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == args.warmup:
                marks["base"] = start()
            marks["t0"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - marks["t0"])

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    total = args.warmup + args.steps
    config = DPOConfig(
        output_dir=str(Path(args.workdir) / "trl"), per_device_train_batch_size=args.batch, max_steps=total,
        learning_rate=1e-6, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.05, max_grad_norm=1.0,
        beta=0.1, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], max_length=None,
        gradient_checkpointing=args.grad_checkpointing, bf16=args.device == "cuda", use_cpu=args.device == "cpu",
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        seed=0,
    )
    # One epoch = one batch of exactly these pairs, so every step sees the batch ours sees.
    data = Dataset.from_list(texts(args))
    # An explicit reference (same seed, same weights): TRL would otherwise reload it from a hub path.
    trainer = DPOTrainer(model=qwen2_model(args), ref_model=qwen2_model(args).eval(), args=config, train_dataset=data,
                         processing_class=word_tokenizer(), callbacks=[Timer()])
    first = next(iter(trainer.get_train_dataloader()))
    assert first["input_ids"].shape == (2 * args.batch, args.prompt_len + args.answer_len), first["input_ids"].shape
    trainer.train()
    return {"side": "trl", "trl": trl.__version__, "step_s": statistics.median(times[args.warmup:]), "times": times,
            "first_loss": losses[0] if losses else float("nan"), "peak_mib": peak(), "base_mib": marks.get("base")}


def check_trl_python(python: str) -> None:
    """Before our side runs (minutes for the 0.5b config): the --trl-python interpreter must import trl."""
    try:
        # trl's top level imports lazily: `import trl` passes where DPOTrainer (transformers, datasets) cannot import
        done = subprocess.run([python, "-c", "from trl import DPOConfig, DPOTrainer; import datasets"],
                              capture_output=True, text=True, check=False)
    except OSError as e:
        raise SystemExit(f"--trl-python {python}: cannot run it ({e.strerror})") from None
    if done.returncode != 0:
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"--trl-python {python}: it cannot import trl ({error}); install TRL in a virtualenv as this"
                         " script's docstring shows and pass its python")


def run_side(python: str, side: str, args) -> dict:
    cmd = [python, __file__, "--side", side, "--json", "--config", args.config, "--device", args.device,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--prompt-len", str(args.prompt_len), "--answer-len", str(args.answer_len), "--workdir", args.workdir]
    if args.grad_checkpointing:
        cmd.append("--grad-checkpointing")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{side} side failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=("both", "ours", "trl"), default="both")
    parser.add_argument("--config", choices=tuple(CONFIGS), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=2, help="pairs per step")
    parser.add_argument("--prompt-len", type=int, default=300)
    parser.add_argument("--answer-len", type=int, default=100)
    parser.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing on both sides")
    parser.add_argument("--trl-python", default=sys.executable, help="interpreter that has trl installed")
    parser.add_argument("--workdir", default="/tmp/train_step_bench")
    parser.add_argument("--json", action="store_true", help="print one JSON line (used by --side both)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be at least 1 and --warmup at least 0, got {args.steps} and {args.warmup}")

    if args.side != "both":
        result = run_ours(args) if args.side == "ours" else run_trl(args)
        print(json.dumps(result) if args.json else result)
        return
    try:  # our side builds its decoder and tokenizer with transformers too
        from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"our side needs transformers (its Qwen2 decoder and tokenizer), which does not import here "
                         f"({e}); pip install 'transformers>=5' (the test extra)") from None
    check_trl_python(args.trl_python)
    ours = run_side(sys.executable, "ours", args)
    theirs = run_side(args.trl_python, "trl", args)
    unit = "GPU MiB (max allocated)" if args.device == "cuda" else "MiB peak RSS"
    print(f"config {args.config} on {args.device}: batch {args.batch} pairs, prompt {args.prompt_len}"
          f" + answers {args.answer_len} tokens, median of {args.steps} steps after {args.warmup} warm-up")
    for r in (ours, theirs):
        name = "ours" if r["side"] == "ours" else f"TRL {r['trl']}"
        grow = r["peak_mib"] - r["base_mib"] if r["base_mib"] is not None else float("nan")
        print(f"  {name:10s} {r['step_s']:.3f} s/step   peak {r['peak_mib']:.0f} {unit}"
              f" (+{grow:.0f} over the timed steps)   step-1 loss {r['first_loss']:.4f}")
    print(f"  speed-up {theirs['step_s'] / ours['step_s']:.2f}x, peak memory ratio ours/TRL"
          f" {ours['peak_mib'] / theirs['peak_mib']:.2f}")
    if not math.isclose(ours["first_loss"], theirs["first_loss"], rel_tol=LOSS_RTOL):
        # the figures are printed, but sides that optimise different objectives compare nothing
        raise SystemExit(f"step-1 losses differ by more than a relative {LOSS_RTOL}: ours {ours['first_loss']!r},"
                         f" TRL {theirs['first_loss']!r}")


if __name__ == "__main__":
    from internvl_mpo.errors import InternVLError

    try:
        main()
    except InternVLError as e:  # a bad path or setting: one line, as the command line gives it
        raise SystemExit(f"error: {e}") from None

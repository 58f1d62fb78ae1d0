"""A batch file of requests with answers of uneven length: continuous batching (what `internvl-mpo
generate` and `eval` do, `InternVLChat.answers_as_they_finish`) against fixed chunks of the same size
decoded one after the other (what they did before 2026-12-02, and how a batched `generate()` call of
transformers works: a chunk ends with its longest answer).

Both sides use the same model and engine, so the ratio is the batching alone. Each request asks for a
fixed number of greedy tokens (`ignore_eos`), drawn from `--lengths`, so the work is the same whatever
the model says; the answers are checked to be equal. The two sides take turns, `--rounds` each, and
each keeps its best time.

    python benchmarks/batch_file.py                             # the shipped demo model, CPU
    python benchmarks/batch_file.py --model PATH --device cuda --batch-size 16
"""

import argparse
import random
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or hub id (default: the shipped demo model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32, 256],
                        help="new tokens per request, drawn uniformly from these")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for flag, value in (("--requests", args.requests), ("--batch-size", args.batch_size),
                        ("--lengths", min(args.lengths)), ("--rounds", args.rounds)):
        if value < 1:
            parser.error(f"{flag} {value}: must be at least 1")

    from internvl_mpo.cli_chat import model_path
    from internvl_mpo.generate.params import sampling_params
    from internvl_mpo.pipeline import InternVLChat

    chat = InternVLChat.from_pretrained(model_path(args.model), device=args.device)
    rng = random.Random(0)
    jobs = [(i, chat.prepare(f"Describe item {i}."),
             sampling_params(do_sample=False, max_new_tokens=rng.choice(args.lengths), ignore_eos=True))
            for i in range(args.requests)]
    tokens = sum(params.max_new_tokens for _, _, params in jobs)

    def chunks() -> list[str]:
        out = []
        for start in range(0, len(jobs), args.batch_size):
            out += chat.answer_prepared([(p, params) for _, p, params in jobs[start:start + args.batch_size]])
        return out

    def continuous() -> list[str]:
        answers = dict(chat.answers_as_they_finish(jobs, args.batch_size))
        return [answers[i] for i in range(len(jobs))]

    assert chunks() == continuous(), "the two ways gave different answers"
    best = {"chunks": float("inf"), "continuous": float("inf")}
    for r in range(args.rounds):
        sides = [("chunks", chunks), ("continuous", continuous)]
        for name, fn in sides[:: 1 if r % 2 == 0 else -1]:  # the first turn alternates
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"{args.requests} requests, {tokens} new tokens (lengths {args.lengths}), batch {args.batch_size}, "
          f"{args.device}")
    for name, took in best.items():
        print(f"  {name:<10} {took:7.2f} s  {tokens / took:8.1f} tok/s")
    print(f"continuous batching: {best['chunks'] / best['continuous']:.2f}x the tokens/s of fixed chunks")


if __name__ == "__main__":
    from internvl_mpo.errors import InternVLError

    try:
        main()
    except InternVLError as e:  # a bad path or setting: one line, as the command line gives it
        raise SystemExit(f"error: {e}") from None

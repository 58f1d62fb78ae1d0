"""Next-token choice: logit bias, greedy, temperature, top-k, top-p and repetition penalty, per batch row.

Follows the order and semantics of transformers' logits processors, as used by the official
`chat()` (which calls the inner language model's `generate`): a request's logit bias first (OpenAI's
`logit_bias`, added where vLLM adds it: before the penalties and everything after them), then
repetition penalty (over the tokens generated so far: the official call passes embeddings, so the
prompt ids are not seen), then temperature, top-k, top-p (drop the tokens whose cumulative
probability from the least likely up is <= 1 - top_p, always keeping the most likely). Sampling draws
with the exponential-race trick (argmax of p / Exp(1) noise), which needs no host sync; each row has
its own torch.Generator, so a seeded request draws the same noise alone or batched with others (its
logits may still round differently with the batch's size: see the README). The settings themselves and
their checks: `params.py`.
"""

from __future__ import annotations

import math

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """logits (B, V), seen (B, V) bool, penalty (B,): seen logits < 0 are multiplied, others divided."""
    p = penalty[:, None]
    penalised = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, largest_k: int | None = None,
                       nucleus: bool = True) -> torch.Tensor:
    """Set to -inf what top-k (B,) (0 = off) and then top-p (B,) remove; top_p in float64 keeps the
    caller's value exact (the engine's), fp32 cuts where transformers cuts given that fp32 value.

    `largest_k` (the largest top_k of the rows, 0 when none uses top-k) and `nucleus` (whether a row
    has top_p < 1), known on the host, let the common cases skip sorting the vocabulary: top-k alone
    needs only each row's k-th largest logit (`topk`), and neither needs nothing. The result is the
    same either way (ties with the k-th logit are kept, as transformers' TopKLogitsWarper does)."""
    if not nucleus and largest_k is not None:
        if largest_k == 0:
            return logits
        largest = logits.topk(min(largest_k, logits.shape[-1]), dim=-1).values  # descending
        k = top_k.clamp(min=1, max=largest.shape[-1])
        kth = largest.gather(-1, (k - 1)[:, None])
        kth = kth.masked_fill(top_k[:, None] == 0, float("-inf"))
        return logits.masked_fill(logits < kth, float("-inf"))
    vocab = logits.shape[-1]
    # Ascending, as transformers' and vLLM's top-p sort, with ties in id order: where the cut falls
    # inside a tie (common in bf16 logits), the tied tokens of the highest ids are kept.
    sorted_logits, order = logits.sort(dim=-1, stable=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kth = sorted_logits.gather(-1, (vocab - k)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    # The mass of each token and all less likely ones, summed from the least likely up as transformers
    # does: summed from the top down, fp32 rounding would cut a large vocabulary's tail too early.
    tail = sorted_logits.softmax(-1).cumsum(-1)
    # The cut 1 - top_p is taken in float64 and then rounded to the sums' dtype, as transformers' Python
    # float `1 - top_p` is when compared with them; 1 - (top_p in fp32) lands up to 3e-8 away.
    cut = (1 - top_p.double()).to(tail.dtype)
    drop = (tail <= cut[:, None]) & (top_p[:, None] < 1)  # top_p 1 keeps all (fp32 sums may pass 1)
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def with_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """(B, V) logits divided by each row's temperature (B,), kept above 1e-5 (temperature 0 is greedy)."""
    return logits / temperature.clamp(min=1e-5)[:, None]


def choose_tokens(
    logits: torch.Tensor,
    greedy: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    noise: torch.Tensor | None,
    largest_k: int | None = None,
    nucleus: bool = True,
) -> torch.Tensor:
    """(B, V) fp32 logits -> (B,) token ids. `noise` is Exp(1) noise (B, V), needed when any row samples;
    `largest_k` and `nucleus` as in `filter_top_k_top_p`."""
    best = logits.argmax(-1)
    if noise is None:
        return best
    scaled = with_temperature(logits, temperature)
    probs = filter_top_k_top_p(scaled, top_k, top_p, largest_k, nucleus).softmax(-1)
    drawn = (probs / noise).argmax(-1)
    return torch.where(greedy, best, drawn)


def race_among_top_k(logits: torch.Tensor, top_k: list[int], generators: list[torch.Generator]) -> list[int | None]:
    """Sampled tokens of rows (temperature applied) whose filter is top-k alone (k >= 1 each, no top-p): the
    exponential race of `choose_tokens` run among the tokens top-k keeps (ties with the k-th included, as in
    `filter_top_k_top_p`; -inf logits have no chance and are left out), one Exp(1) draw per kept token in id
    order from the row's generator. The same distribution as the race over the whole vocabulary, for k draws
    where that takes V: a 151674-token vocabulary's float64 uniforms cost ~0.7 ms a row on a CPU, more than a
    tiny model's whole step. None for a row whose largest logit is not finite (the caller's full race)."""
    largest = logits.topk(min(max(top_k), logits.shape[-1]), dim=-1).values  # descending, NaN first
    out: list[int | None] = []
    for row, (k, generator) in enumerate(zip(top_k, generators)):
        top = float(largest[row, 0])
        if not math.isfinite(top):
            out.append(None)
            continue
        kth = largest[row, min(k, largest.shape[-1]) - 1]
        kept = ((logits[row] >= kth) & (logits[row] > -math.inf)).nonzero()[:, 0]  # ascending ids
        weights = (logits[row, kept] - top).exp()  # the probabilities times one common factor
        out.append(int(kept[(weights / exponential_draws(generator, kept.numel(), logits.device)).argmax()]))
    return out


def exponential_draws(generator: torch.Generator, count: int, device) -> torch.Tensor:
    """`count` Exp(1) draws (fp32) from `generator`, as `exponential_noise` draws them."""
    u = torch.rand(count, generator=generator, device=device, dtype=torch.float64)
    return u.clamp_(min=2.0**-60).log_().neg_().float()


def exponential_noise(generators: list[torch.Generator | None], vocab: int, device) -> torch.Tensor:
    """(B, V) Exp(1) draws, row b from generators[b] (ones for a row without one: a greedy row).

    Drawn as -log U with U uniform in float64 and kept off 0: finite and positive, so p / noise is
    never 0 / 0 or 0 / inf, and small enough (down to ~1e-16) that rare tokens win as often as they
    should (float32 U stops at ~6e-8, which starves tokens below ~1e-7). torch's own `exponential_`
    is several times slower on the CPU, and at a full vocabulary per row per step it cost more than
    a small model's decode step."""
    rows = [torch.ones(vocab, device=device) if g is None else exponential_draws(g, vocab, device) for g in generators]
    return torch.stack(rows)


def make_generator(seed: int | None, device) -> torch.Generator:
    """A row's generator; without a seed, seeded from torch's global generator, so that
    `torch.manual_seed` makes unseeded sampling repeatable, as it does in transformers."""
    if seed is None:
        seed = int(torch.randint(2**62, (1,)))
    return torch.Generator(device=device).manual_seed(seed)

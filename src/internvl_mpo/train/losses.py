"""MPO losses: sequence log-probs, sigmoid DPO, BCO-pair, SFT NLL and their weighted sum.

Mirrors TRL 0.10.1 (tag v0.10.1, the version the InternVL docs pin) as driven by InternVL's
`internvl_chat/internvl/train/trainer_dpo.py` (`MultimodalDPOTrainer`):

- `DPOTrainer.get_batch_logps`: shift by one (logits at t score label t+1), log-softmax, gather the
  label, sum over tokens whose label is not -100. No length normalisation.
- `DPOTrainer.dpo_loss`, `loss_type="sigmoid"`: `-(1-ls)*logsigmoid(beta*z) - ls*logsigmoid(-beta*z)`
  with `z = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)`.
- `DPOTrainer.dpo_loss`, `loss_type="bco_pair"`: the batch mean of the 2B rewards
  `beta*[delta_chosen; delta_rejected]` (detached) first updates `RunningMoments`, then the updated
  running mean is the shift `delta`: `-logsigmoid(r_c - delta) - logsigmoid(-(r_r - delta))`.
  Later TRL releases dropped this shift; we keep the 0.10.1 behaviour.
- `trl.trainer.utils.RunningMoments` is `RunningMean` below; its update arithmetic (float32 tensors,
  Python-float state, cross-rank statistics) is reproduced so the state matches TRL's step by step.
- `concatenated_forward`'s `nll_loss`: `CrossEntropyLoss` over the chosen half only, mean over all
  non-ignored tokens pooled across the chosen sequences (one scalar). `get_batch_loss_metrics` adds
  `rpo_alpha * nll` to every per-sample loss before `losses.mean()`, which equals adding it once
  after the mean; `mpo_loss` does the latter.
- InternVL's combined `loss_type="sigmoid,bco_pair"` loops over the names and sums
  `<type>_loss_weight * losses`; here the weights are named fields of `MPOWeights`.

Deliberate differences (all numerically neutral for the 4B-MPO recipe, or documented quirks):

- Log-probs are always computed in float32, chunk by chunk, from final hidden states and the head
  weight. TRL itself does no cast: it takes `log_softmax` in the dtype the model
  returns (float32 for the Qwen2 head of the transformers/Liger versions of the reference run).
  The full `(B, T, V)` float32 log-softmax is never built, and rows whose label is ignored are
  skipped entirely.
- Logged rewards are `beta * (policy - ref)`. InternVL's combined loop logs the weight-sum
  `(w_pref + w_quality) * beta * (policy - ref)`, which is the same for 0.8 + 0.2 = 1 (up to float
  rounding). A single (non-combined) loss type logs unweighted rewards there as here.
- With weights instead of loss-type names, the BCO running mean is touched only when
  `quality_weight != 0`; InternVL touches it whenever `bco_pair` is in the list.
- `sft_nll` divides by `max(n_tokens, 1)`, so a micro-batch with no supervised chosen token gives 0
  instead of TRL's NaN (the data pipeline should never produce one).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from internvl_mpo.train.settings import MPOWeights

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 512


def _shifted_targets(labels: Tensor, ignore_index: int) -> Tensor:
    """(B, T) targets where position t holds label t+1 and the last position is ignored."""
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)  # (B, T)


class _LabelLogProbsFromHidden(torch.autograd.Function):
    """Per-position log p(target) in float32, chunked over scored rows, building the logits chunk by
    chunk as `hidden @ weight.T`.

    The logits of a chunk are rounded to the hidden dtype (as the model's head output would be)
    and then upcast. Saves one float32 log-sum-exp per scored row; backward recomputes the logits;
    the weight grad is accumulated in float32.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk_size: int) -> Tensor:
        B, T, D = hidden.shape
        flat = hidden.reshape(B * T, D)
        tgt = targets.reshape(B * T)
        rows = (tgt != ignore_index).nonzero().squeeze(1)
        out = torch.zeros(B * T, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows.numel(), chunk_size):
            r = rows[start : start + chunk_size]
            x = F.linear(flat[r], weight).float()  # (c, V)
            lse_c = torch.logsumexp(x, dim=-1)
            out[r] = x.gather(1, tgt[r, None]).squeeze(1) - lse_c
            lse[start : start + chunk_size] = lse_c
        ctx.save_for_backward(hidden, weight, tgt, rows, lse)
        ctx.chunk_size = chunk_size
        return out.view(B, T)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, tgt, rows, lse = ctx.saved_tensors
        B, T, D = hidden.shape
        flat = hidden.reshape(B * T, D)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(flat) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        g = grad_out.reshape(B * T).float()
        for start in range(0, rows.numel(), ctx.chunk_size):
            r = rows[start : start + ctx.chunk_size]
            h = flat[r]  # (c, D)
            g_r = g[r, None]
            d = torch.exp(F.linear(h, weight).float() - lse[start : start + ctx.chunk_size, None]).mul_(-g_r)
            d.scatter_add_(1, tgt[r, None], g_r)
            d = d.to(hidden.dtype)  # (c, V), the grad of the head output
            if want_h:
                grad_h[r] = d @ weight
            if want_w:
                grad_w += (d.t() @ h).float()
        grad_h = grad_h.view(B, T, D) if want_h else None
        grad_w = grad_w.to(weight.dtype) if want_w else None
        return grad_h, grad_w, None, None, None


def label_logps_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Summed label log-probs per sequence of the logits `hidden @ lm_head_weight.T`, TRL `get_batch_logps`
    semantics, float32, without ever building the full logits.

    hidden (B, T, D) final normed hidden states, lm_head_weight (V, D) (Qwen2's head has no bias),
    labels (B, T). Only positions with a scored label are projected. Returns (sum_logps (B,)
    float32, n_tokens (B,) int64); gradients flow to `hidden` and `lm_head_weight`.
    """
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} differ in (B, T)")
    targets = _shifted_targets(labels, ignore_index)
    token_logps = _LabelLogProbsFromHidden.apply(hidden, lm_head_weight, targets, ignore_index, chunk_size)
    return token_logps.sum(-1), (targets != ignore_index).sum(-1)


def dpo_sigmoid_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid DPO per example. Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)).

    Rewards are `beta * (policy - ref)`, detached.
    """
    z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = -F.logsigmoid(beta * z) * (1 - label_smoothing) - F.logsigmoid(-beta * z) * label_smoothing
    return losses, _rewards(policy_chosen, ref_chosen, beta), _rewards(policy_rejected, ref_rejected, beta)


def _rewards(policy: Tensor, ref: Tensor, beta: float) -> Tensor:
    return beta * (policy - ref).detach()


AllReduce = Callable[[Tensor], Tensor]


def _dist_all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over ranks with torch.distributed; a copy, the input is left alone."""
    y = x.clone()
    torch.distributed.all_reduce(y, op=torch.distributed.ReduceOp.SUM)
    return y


class RunningMean:
    """The BCO reward shift: TRL 0.10.1 `RunningMoments` as explicit, checkpointable state.

    State starts at mean 0, var 1, std 1, count 1e-24. `update(x)` takes the detached batch mean of
    the 2B rewards on this rank. With several ranks the per-rank values are first reduced to their
    global mean and (biased) variance with n = world size; alone, n = 1 and variance 0. Then
    `mean += (m - mean) * n / (count + n)`, `count += n`, and var/std as TRL keeps them (unused by
    the loss). The net effect is the equal-weight average of every batch mean so far, not an EMA.

    `all_reduce` sums a tensor over ranks and returns the result; by default torch.distributed is
    used when it is initialised with more than one rank.
    """

    def __init__(self, all_reduce: AllReduce | None = None) -> None:
        self.all_reduce = all_reduce
        self.mean = 0.0
        self.var = 1.0
        self.std = 1.0
        self.count = 1e-24

    @property
    def value(self) -> float:
        return self.mean

    def _reducer(self) -> AllReduce | None:
        if self.all_reduce is not None:
            return self.all_reduce
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return _dist_all_reduce_sum
        return None

    @torch.no_grad()
    def update(self, x: Tensor) -> float:
        """Fold one batch value (0-d tensor) into the state; returns the new mean."""
        reduce = self._reducer()
        if reduce is None:
            x_var, x_mean = torch.var_mean(x, unbiased=False)
            n: float = x.numel()
        else:
            sum_and_count = reduce(torch.stack([x.sum().float(), x.new_tensor(x.numel(), dtype=torch.float32)]))
            n = sum_and_count[1].item()
            x_mean = sum_and_count[0] / sum_and_count[1]
            x_var = reduce(((x.float() - x_mean) ** 2).sum()) / sum_and_count[1]
        x_mean, x_var = x_mean.float(), x_var.float()
        # Same operation order and dtypes as TRL: float32 tensors meet Python-float state.
        diff = x_mean - self.mean
        total = self.count + n
        old_sum = self.var * self.count + diff**2 * self.count * n / total
        new_var = (old_sum + x_var * n) / total
        self.mean += (diff * n / total).item()
        self.std = (new_var * total / (total - 1)).float().sqrt().item()
        self.var = new_var.item()
        self.count = total
        return self.mean

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "std": self.std, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        missing = {"mean", "var", "std", "count"} - set(state)
        if missing:
            raise ValueError(f"RunningMean state lacks {sorted(missing)}")
        for key in ("mean", "var", "count"):
            if isinstance(state[key], bool) or not isinstance(state[key], int | float):
                raise ValueError(f"RunningMean state: {key} is {state[key]!r}, not a number")
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        # null in a checkpoint: undefined (inf or NaN) after one update; the next update recomputes it
        self.std = math.nan if state["std"] is None else float(state["std"])
        self.count = float(state["count"])


def bco_pair_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    running: RunningMean,
) -> tuple[Tensor, Tensor, Tensor, float]:
    """BCO-pair per example with TRL 0.10.1's running-mean shift.

    The running mean is updated with this batch first, so the returned `delta` includes it.
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,), delta).
    """
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    batch_reward = torch.cat([beta * chosen_logratios, beta * rejected_logratios]).mean().detach()
    delta = running.update(batch_reward)
    losses = -F.logsigmoid(beta * chosen_logratios - delta) - F.logsigmoid(-(beta * rejected_logratios - delta))
    return losses, _rewards(policy_chosen, ref_chosen, beta), _rewards(policy_rejected, ref_rejected, beta), delta


def sft_nll(logps_sum_chosen: Tensor, n_tokens_chosen: Tensor) -> Tensor:
    """Token-level mean NLL pooled over the chosen sequences of a micro-batch (one scalar).

    Equals `CrossEntropyLoss(ignore_index=-100)` over the chosen half, as TRL's `nll_loss`.
    """
    return -logps_sum_chosen.sum() / n_tokens_chosen.sum().clamp(min=1)


def mpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor | None,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    chosen_nll: Tensor | None,
    weights: MPOWeights,
    running: RunningMean | None,
) -> tuple[Tensor, dict[str, float]]:
    """`mean_i(pref_weight*dpo_i + quality_weight*bco_i) + gen_weight*nll` and float metrics.

    Terms with weight 0 are not computed: plain DPO is (pref 1, quality 0, gen 0); SFT-only is
    (pref 0, quality 0), where the reference log-probs, the rejected log-probs and `running` may
    be None and the running mean is not touched.
    """
    w = weights
    needs_ref = w.pref_weight != 0 or w.quality_weight != 0
    if needs_ref and (policy_rejected_logps is None or ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError("preference terms need rejected and reference log-probs")
    if w.quality_weight != 0 and running is None:
        raise ValueError("the BCO-pair term needs a RunningMean")
    if w.gen_weight != 0 and chosen_nll is None:
        raise ValueError("gen_weight != 0 needs chosen_nll")

    metrics: dict[str, float] = {}
    per_example = torch.zeros_like(policy_chosen_logps)
    if w.pref_weight != 0:
        dpo, _, _ = dpo_sigmoid_loss(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, w.beta, w.label_smoothing
        )
        per_example = per_example + w.pref_weight * dpo
        metrics["loss/pref"] = float(dpo.detach().mean())
    if w.quality_weight != 0:
        bco, _, _, delta = bco_pair_loss(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, w.beta, running
        )
        per_example = per_example + w.quality_weight * bco
        metrics["loss/quality"] = float(bco.detach().mean())
        metrics["delta"] = delta
    loss = per_example.mean()
    if w.gen_weight != 0:
        loss = loss + w.gen_weight * chosen_nll
    if chosen_nll is not None:
        metrics["nll"] = float(chosen_nll.detach())
    metrics["loss"] = float(loss.detach())
    if needs_ref:
        chosen_rewards = _rewards(policy_chosen_logps, ref_chosen_logps, w.beta)
        rejected_rewards = _rewards(policy_rejected_logps, ref_rejected_logps, w.beta)
        metrics["rewards/chosen"] = float(chosen_rewards.mean())
        metrics["rewards/rejected"] = float(rejected_rewards.mean())
        metrics["rewards/accuracies"] = float((chosen_rewards > rejected_rewards).float().mean())
        metrics["rewards/margins"] = float((chosen_rewards - rejected_rewards).mean())
    metrics["logps/chosen"] = float(policy_chosen_logps.detach().mean())
    if policy_rejected_logps is not None:
        metrics["logps/rejected"] = float(policy_rejected_logps.detach().mean())
    return loss, metrics

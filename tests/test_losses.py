"""Tests for internvl_mpo.train.losses.

Three kinds of check:
- hand-derived values (the derivation is in each docstring) and autograd gradient checks;
- chunked log-probs against the naive full log-softmax (values and gradients, fp32 and bf16);
- parity with TRL 0.10.1, the version the reference trainer pins: always against the equations
  below (transcribed from TRL's `dpo_loss`, `get_batch_logps`, `concatenated_forward` and
  `RunningMoments`, and InternVL's combined-loss loop), and against TRL itself when an interpreter
  with trl 0.10.x can be found: the current one, or the one named by INTERNVL_MPO_TRL_PYTHON
  (transformers 5 cannot host trl 0.10.1, so it usually lives in its own venv, e.g.
  `python3 -m venv /work/venv-trl && /work/venv-trl/bin/pip install torch==2.13.0
  'transformers<4.47' trl==0.10.1 rich`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from internvl_mpo.train.losses import (
    MPOWeights,
    RunningMean,
    bco_pair_loss,
    dpo_sigmoid_loss,
    label_logps_from_hidden,
    mpo_loss,
    sft_nll,
)

LOG2 = math.log(2.0)


def _logps_of_logits(logits: torch.Tensor, labels: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed label log-probs of given logits: through an identity head (exact: x @ I == x)."""
    return label_logps_from_hidden(logits, torch.eye(logits.shape[-1], dtype=logits.dtype), labels, **kwargs)


def _softplus(x: float) -> float:
    """-log(sigmoid(-x)) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


# ----------------------------------------------------------------------------- hand-derived


def test_dpo_equal_policy_and_reference_is_log2():
    """policy == ref gives z = 0, so -log sigmoid(0) = log 2 per example and zero rewards."""
    lp = torch.tensor([-3.0, -10.0, -0.5])
    losses, rc, rr = dpo_sigmoid_loss(lp, lp - 1, lp, lp - 1, beta=0.1)
    torch.testing.assert_close(losses, torch.full((3,), LOG2))
    assert torch.equal(rc, torch.zeros(3)) and torch.equal(rr, torch.zeros(3))


def test_dpo_hand_value_and_label_smoothing():
    """pc=-1, pr=-3, rc=rr=-2, beta=0.5: z = (-1+3) - 0 = 2, beta*z = 1.

    ls=0:   -log s(1)            = log(1+e^-1) = 0.313262
    ls=0.1: 0.9 log(1+e^-1) + 0.1 log(1+e^1) = 0.9*0.313262 + 0.1*1.313262 = 0.413262
    rewards: 0.5*(-1+2) = 0.5 and 0.5*(-3+2) = -0.5.
    """
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))
    losses, rc, rr = dpo_sigmoid_loss(*args, beta=0.5)
    assert losses.item() == pytest.approx(_softplus(-1.0), rel=1e-6)
    assert losses.item() == pytest.approx(0.313262, abs=1e-6)
    smoothed, _, _ = dpo_sigmoid_loss(*args, beta=0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * _softplus(-1.0) + 0.1 * _softplus(1.0), rel=1e-6)
    assert smoothed.item() == pytest.approx(0.413262, abs=1e-6)
    assert rc.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)


def test_dpo_gradient_matches_closed_form():
    """d/dpc [-log s(beta z)] = -beta * s(-beta z), d/dpr = +beta * s(-beta z); rewards carry no grad."""
    pc = torch.tensor([-1.0, -4.0], requires_grad=True)
    pr = torch.tensor([-3.0, -2.0], requires_grad=True)
    rc, rr, beta = torch.tensor([-2.0, -3.0]), torch.tensor([-2.5, -2.0]), 0.3
    losses, chosen_rewards, rejected_rewards = dpo_sigmoid_loss(pc, pr, rc, rr, beta=beta)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses.sum().backward()
    z = (pc.detach() - pr.detach()) - (rc - rr)
    s = torch.sigmoid(-beta * z)
    torch.testing.assert_close(pc.grad, -beta * s)
    torch.testing.assert_close(pr.grad, beta * s)


def test_bco_two_steps_by_hand():
    """beta = 0.5, one pair per step, single process.

    Step 1: delta_c = 4, delta_r = 0 -> rewards r_c = 2, r_r = 0, batch mean m1 = 1.
            mean = 0 + (1 - 0) * 1 / (1e-24 + 1) = 1 -> delta = 1 (the current batch counts).
            loss = -log s(2 - 1) - log s(-(0 - 1)) = 2 log(1 + e^-1) = 0.626523
    Step 2: delta_c = 2, delta_r = -4 -> r_c = 1, r_r = -2, m2 = -0.5.
            mean = 1 + (-0.5 - 1) * 1 / 2 = 0.25 = (1 + -0.5) / 2, a cumulative mean, not an EMA.
            loss = -log s(1 - 0.25) - log s(-(-2 - 0.25)) = log(1+e^-0.75) + log(1+e^-2.25)
                 = 0.386880 + 0.100203 = 0.487078
    """
    running = RunningMean()
    z = torch.zeros(1)
    losses, rc, rr, delta = bco_pair_loss(torch.tensor([4.0]), z, z, z, beta=0.5, running=running)
    assert delta == pytest.approx(1.0, abs=1e-12)
    assert losses.item() == pytest.approx(2 * _softplus(-1.0), rel=1e-6)
    assert losses.item() == pytest.approx(0.626523, abs=1e-6)
    assert rc.item() == 2.0 and rr.item() == 0.0
    losses, _, _, delta = bco_pair_loss(torch.tensor([2.0]), torch.tensor([-4.0]), z, z, beta=0.5, running=running)
    assert delta == pytest.approx(0.25, abs=1e-7)
    assert running.value == delta
    assert losses.item() == pytest.approx(_softplus(-0.75) + _softplus(-2.25), rel=1e-6)
    assert losses.item() == pytest.approx(0.487078, abs=1e-6)
    assert running.count == pytest.approx(2.0)


def test_bco_shift_under_gradient_accumulation_lags_within_the_step():
    """beta = 0.5, pairs A (r_c 2, r_r 0, mean 1) and B (r_c -1, r_r -2, mean -1.5): one micro-batch of both,
    or two of one each (--grad-accum 2), as the official trainer updates the mean every micro-batch.

    One micro-batch: m = -0.25, delta = -0.25 for both pairs.
    Two: A is shifted by delta = 1 (B not yet seen), B by (1 - 1.5) / 2 = -0.25. So A's BCO term differs
    (the README used to call the terms equal); after the step both runs hold the mean -0.25.
    """
    pc, pr, z = torch.tensor([4.0, -2.0]), torch.tensor([0.0, -4.0]), torch.zeros(2)
    one = RunningMean()
    big, _, _, delta = bco_pair_loss(pc, pr, z, z, beta=0.5, running=one)
    assert delta == pytest.approx(-0.25, abs=1e-7)
    two = RunningMean()
    first, _, _, delta_a = bco_pair_loss(pc[:1], pr[:1], z[:1], z[:1], beta=0.5, running=two)
    second, _, _, delta_b = bco_pair_loss(pc[1:], pr[1:], z[1:], z[1:], beta=0.5, running=two)
    assert (delta_a, delta_b) == (pytest.approx(1.0, abs=1e-7), pytest.approx(-0.25, abs=1e-7))
    assert first.item() == pytest.approx(2 * _softplus(-1.0), rel=1e-6)  # A: -log s(2 - 1) - log s(-(0 - 1))
    assert big[0].item() == pytest.approx(_softplus(-2.25) + _softplus(0.25), rel=1e-6)  # A shifted by -0.25
    assert second.item() == pytest.approx(big[1].item(), rel=1e-6)
    assert one.value == pytest.approx(two.value, abs=1e-7)


def test_bco_gradient_does_not_flow_through_delta():
    """delta is a float: d/dpc = -beta s(-(r_c - delta)), d/dpr = beta s(r_r - delta)."""
    pc = torch.tensor([1.0, -2.0], requires_grad=True)
    pr = torch.tensor([-1.0, 0.5], requires_grad=True)
    rc, rr, beta = torch.tensor([0.0, -1.0]), torch.tensor([0.5, 0.0]), 0.4
    losses, _, _, delta = bco_pair_loss(pc, pr, rc, rr, beta=beta, running=RunningMean())
    assert isinstance(delta, float)
    losses.sum().backward()
    r_c = beta * (pc.detach() - rc)
    r_r = beta * (pr.detach() - rr)
    torch.testing.assert_close(pc.grad, -beta * torch.sigmoid(-(r_c - delta)))
    torch.testing.assert_close(pr.grad, beta * torch.sigmoid(r_r - delta))


def test_running_mean_is_cumulative_average_and_checkpoints():
    """After k single-process updates the mean is (m1 + ... + mk) / k; state_dict resumes exactly."""
    values = [0.3, -1.2, 2.5, 0.0, 0.7]
    running = RunningMean()
    for k, v in enumerate(values[:3], start=1):
        running.update(torch.tensor(v))
        assert running.value == pytest.approx(sum(values[:k]) / k, abs=1e-6)
    resumed = RunningMean()
    resumed.load_state_dict(json.loads(json.dumps(running.state_dict())))
    for v in values[3:]:
        assert running.update(torch.tensor(v)) == resumed.update(torch.tensor(v))
    assert running.state_dict() == resumed.state_dict()
    assert running.value == pytest.approx(sum(values) / len(values), abs=1e-6)
    with pytest.raises(ValueError, match=r"^RunningMean state lacks \['count'\]$"):
        RunningMean().load_state_dict({"mean": 0.0, "var": 1.0, "std": 1.0})


def test_running_mean_std_after_one_update_checkpoints_as_null(tmp_path):
    """TRL's unbiased std is inf (or NaN) after one update; the checkpoint stores null (strict JSON), and
    checkpoints written with Infinity (before 2026-12-03) resume exactly too."""
    from internvl_mpo.train import checkpointing as ckpt

    running = RunningMean()
    running.update(torch.tensor(0.3))
    assert not math.isfinite(running.std)
    ckpt.write_json(tmp_path / "state.json", running.state_dict())
    assert json.loads((tmp_path / "state.json").read_text())["std"] is None
    old_form = json.loads(json.dumps(running.state_dict()))  # Python's json writes Infinity / NaN
    for state in (ckpt.read_json(tmp_path / "state.json"), old_form):
        resumed, straight = RunningMean(), RunningMean()
        resumed.load_state_dict(state)
        straight.update(torch.tensor(0.3))
        resumed.update(torch.tensor(-1.2))
        straight.update(torch.tensor(-1.2))
        assert resumed.state_dict() == straight.state_dict()
    with pytest.raises(ValueError, match="^RunningMean state: mean is None, not a number$"):
        RunningMean().load_state_dict({"mean": None, "var": 1.0, "std": 1.0, "count": 1.0})


class _TwoRanks:
    """A fake all-reduce(sum) for rank 0 of two ranks whose other rank holds `other`.

    RunningMean calls it twice per update: on [sum, count], then on the summed squared deviation
    from the global mean.
    """

    def __init__(self, other: float) -> None:
        self.other = other
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls % 2 == 1:
            self.global_mean = (x[0].item() + self.other) / (x[1].item() + 1)
            return x + torch.tensor([self.other, 1.0])
        return x + (self.other - self.global_mean) ** 2


def test_running_mean_across_ranks():
    """Ranks hold 1.0 and 3.0: global mean 2, n = 2, variance ((1-2)^2 + (3-2)^2)/2 = 1.

    mean = 0 + 2 * 2 / (2 + 1e-24) = 2; var = (1 * 1e-24 + 4 * 1e-24 * 2 / 2 + 1 * 2) / 2 = 1.
    Second step, ranks hold 0 and -2 (mean -1): mean = 2 + (-1 - 2) * 2 / 4 = 0.5 = (2 + -1) / 2.
    """
    running = RunningMean(all_reduce=_TwoRanks(3.0))
    assert running.update(torch.tensor(1.0)) == pytest.approx(2.0)
    assert running.count == pytest.approx(2.0)
    assert running.var == pytest.approx(1.0)
    running.all_reduce = _TwoRanks(-2.0)
    assert running.update(torch.tensor(0.0)) == pytest.approx(0.5)
    assert running.count == pytest.approx(4.0)


def test_sft_nll_is_pooled_token_mean_cross_entropy():
    """Tokens are pooled over sequences: a 1-token and a 3-token sequence give (l1 + l2+l3+l4) / 4."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, -100, 4, -100], [-100, 1, 2, 3, -100]])
    sums, counts = _logps_of_logits(logits, labels)
    assert counts.tolist() == [1, 3]
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(sft_nll(sums, counts), expected)
    assert sft_nll(torch.zeros(2), torch.zeros(2, dtype=torch.long)).item() == 0.0


# ----------------------------------------------------------------------------- chunked log-probs


def _naive_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full fp32 log-softmax, shift, gather, mask, sum: the textbook computation."""
    lp = logits.float().log_softmax(-1)[:, :-1]
    tgt = labels[:, 1:]
    mask = tgt != -100
    picked = lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def _labels(B: int, T: int, V: int, gen: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :3] = -100  # prompt
    labels[1, -2:] = -100  # padding
    labels[2, ::2] = -100  # scattered
    return labels


def test_label_logps_all_ignored_and_shape_check():
    hidden = torch.randn(2, 4, 5, requires_grad=True)
    weight = torch.randn(7, 5, requires_grad=True)
    sums, n = label_logps_from_hidden(hidden, weight, torch.full((2, 4), -100))
    assert sums.tolist() == [0.0, 0.0] and n.tolist() == [0, 0]
    sums.sum().backward()
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0
    with pytest.raises(ValueError, match="differ"):
        label_logps_from_hidden(hidden, weight, torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_logps_from_hidden_matches_full_logits(dtype):
    """Chunked projection equals projecting everything then log-softmax; grads to hidden and weight."""
    gen = torch.Generator().manual_seed(3)
    B, T, D, V = 3, 7, 16, 41
    labels = _labels(B, T, V, gen)
    hidden = torch.randn(B, T, D, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=gen) / 4).to(dtype).requires_grad_()
    ours, n = label_logps_from_hidden(hidden, weight, labels, chunk_size=4)
    h2 = hidden.detach().clone().requires_grad_()
    w2 = weight.detach().clone().requires_grad_()
    ref, n_ref = _naive_logps(F.linear(h2, w2), labels)
    tol = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(ours, ref, **tol)
    assert torch.equal(n, n_ref)
    coeff = torch.randn(B, generator=gen)
    (ours * coeff).sum().backward()
    (ref * coeff).sum().backward()
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    torch.testing.assert_close(hidden.grad, h2.grad, **tol)
    torch.testing.assert_close(weight.grad, w2.grad, **tol)


def test_label_logps_from_hidden_second_order_use_cases():
    """Frozen head (weight without grad) and a reference pass under no_grad both work."""
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    weight = torch.randn(13, 8, generator=gen)
    labels = torch.randint(0, 13, (2, 5), generator=gen)
    ours, _ = label_logps_from_hidden(hidden, weight, labels, chunk_size=3)
    ours.sum().backward()
    h2 = hidden.detach().clone().requires_grad_()
    _naive_logps(F.linear(h2, weight), labels)[0].sum().backward()
    torch.testing.assert_close(hidden.grad, h2.grad)
    with torch.no_grad():
        again, _ = label_logps_from_hidden(hidden, weight, labels)
    torch.testing.assert_close(again, ours.detach())


def test_no_full_size_tensor_saved_for_backward():
    """Memory-lean: nothing with V * T elements is saved for the backward."""
    B, T, D, V = 2, 64, 8, 300
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    hidden = torch.randn(B, T, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        label_logps_from_hidden(hidden, weight, labels, chunk_size=16)
    assert saved and max(t.numel() for t in saved) < T * V


# ----------------------------------------------------------------------------- MPO combination


def test_mpo_default_weights_combination_by_hand():
    """One pair, beta 0.1, policy logps (-10, -12), ref (-11, -11) -> delta_c = 1, delta_r = -1.

    DPO: z = 2, loss = log(1 + e^-0.2). BCO: rewards 0.1, -0.1, batch mean 0 -> delta 0,
    loss = 2 log(1 + e^-0.1). NLL 1.5. Total = 0.8 dpo + 0.2 bco + 1.5.
    """
    running = RunningMean()
    loss, m = mpo_loss(
        torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]),
        torch.tensor(1.5), MPOWeights(), running,
    )
    dpo, bco = _softplus(-0.2), 2 * _softplus(-0.1)
    assert loss.item() == pytest.approx(0.8 * dpo + 0.2 * bco + 1.5, rel=1e-6)
    assert m["loss/pref"] == pytest.approx(dpo, rel=1e-6)
    assert m["loss/quality"] == pytest.approx(bco, rel=1e-6)
    assert m["nll"] == 1.5 and m["delta"] == pytest.approx(0.0, abs=1e-7)
    assert m["rewards/chosen"] == pytest.approx(0.1) and m["rewards/rejected"] == pytest.approx(-0.1)
    assert m["rewards/accuracies"] == 1.0 and m["rewards/margins"] == pytest.approx(0.2)
    assert m["logps/chosen"] == -10.0 and m["logps/rejected"] == -12.0
    assert all(type(v) is float for v in m.values())
    assert running.count == pytest.approx(1.0)


def test_mpo_gen_weight_scales_the_nll_and_a_reward_tie_is_no_accuracy():
    """Step 0 of a run with a live reference: policy == reference, so z = 0 and every reward is 0.

    DPO: log 2. BCO: rewards 0, delta 0, loss 2 log 2. NLL 2.0 at gen_weight (TRL's rpo_alpha) 0.5 adds 1.0.
    TRL counts accuracy as chosen_rewards > rejected_rewards: a tie is no accuracy.
    """
    logps = torch.tensor([-10.0, -20.0])
    weights = MPOWeights(gen_weight=0.5)
    loss, m = mpo_loss(logps, logps - 3, logps, logps - 3, torch.tensor(2.0), weights, RunningMean())
    assert loss.item() == pytest.approx(0.8 * LOG2 + 0.2 * 2 * LOG2 + 0.5 * 2.0, rel=1e-6)
    assert m["nll"] == 2.0 and m["rewards/chosen"] == m["rewards/rejected"] == 0.0
    assert m["rewards/accuracies"] == 0.0 and m["rewards/margins"] == 0.0


def test_mpo_special_cases():
    pc = torch.tensor([-5.0, -6.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-7.0, -6.5]), torch.tensor([-5.5, -6.0]), torch.tensor([-6.5, -6.0])
    nll = torch.tensor(0.7, requires_grad=True)
    running = RunningMean()
    # plain DPO: the running mean is untouched and the NLL is not added
    dpo_only = MPOWeights(pref_weight=1.0, quality_weight=0.0, gen_weight=0.0)
    loss, m = mpo_loss(pc, pr, rc, rr, nll, dpo_only, running)
    expected, _, _ = dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(loss, expected.mean())
    assert running.state_dict() == RunningMean().state_dict()
    assert "delta" not in m and "loss/quality" not in m
    # SFT only: no reference, no rejected, no running mean
    sft_only = MPOWeights(pref_weight=0.0, quality_weight=0.0, gen_weight=1.0)
    loss, m = mpo_loss(pc, None, None, None, nll, sft_only, None)
    assert loss.item() == pytest.approx(0.7)
    loss.backward()
    assert nll.grad.item() == 1.0 and pc.grad is None
    assert "rewards/chosen" not in m and m["nll"] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="reference"):
        mpo_loss(pc, pr, None, rr, nll, MPOWeights(), running)
    with pytest.raises(ValueError, match="RunningMean"):
        mpo_loss(pc, pr, rc, rr, nll, MPOWeights(), None)


# ----------------------------------------------------------------------------- TRL 0.10.1 parity


def _trl_equations(steps: list[dict], beta: float, ls: float, w_sig: float, w_bco: float, rpo_alpha: float):
    """TRL 0.10.1 + InternVL `MultimodalDPOTrainer`, written out as the equations they compute.

    Per step: z = (pc - pr) - (rc - rr); sigmoid_i = -(1-ls) log s(beta z) - ls log s(-beta z).
    bco_pair: m = mean(beta*(pc-rc) ++ beta*(pr-rr)); RunningMoments with one value per step and
    n = 1 makes delta = the plain average of all m so far (count starts at 1e-24, i.e. ~0);
    bco_i = -log s(beta(pc-rc) - delta) - log s(-(beta(pr-rr) - delta)).
    Combined ("sigmoid,bco_pair"): losses_i = w_sig sigmoid_i + w_bco bco_i, rewards are the
    weight-sum of the per-type rewards, then + rpo_alpha * nll, then the mean over i.
    Computed in float64 with an explicit history, not incrementally.
    """
    history, out = [], []
    for s in steps:
        pc, pr, rc, rr = (torch.tensor(s[k], dtype=torch.float64) for k in ("pc", "pr", "rc", "rr"))
        z = (pc - pr) - (rc - rr)
        sig = -F.logsigmoid(beta * z) * (1 - ls) - F.logsigmoid(-beta * z) * ls
        history.append(torch.cat([beta * (pc - rc), beta * (pr - rr)]).mean().item())
        delta = sum(history) / len(history)
        bco = -F.logsigmoid(beta * (pc - rc) - delta) - F.logsigmoid(-(beta * (pr - rr) - delta))
        chosen_rewards = (w_sig + w_bco) * beta * (pc - rc)
        rejected_rewards = (w_sig + w_bco) * beta * (pr - rr)
        losses = w_sig * sig + w_bco * bco + rpo_alpha * s["nll"]
        out.append({
            "loss": losses.mean().item(), "delta": delta,
            "rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        })
    return out


def _random_steps(n_steps: int, batch: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(n_steps):
        ref = -50 * torch.rand(2, batch, generator=gen)
        pol = ref + 5 * torch.randn(2, batch, generator=gen)
        steps.append({"pc": pol[0].tolist(), "pr": pol[1].tolist(), "rc": ref[0].tolist(), "rr": ref[1].tolist(),
                      "nll": 2 * torch.rand(1, generator=gen).item()})
    return steps


def _ours(steps: list[dict], weights: MPOWeights) -> tuple[list[dict], RunningMean]:
    running, out = RunningMean(), []
    for s in steps:
        pc, pr, rc, rr = (torch.tensor(s[k]) for k in ("pc", "pr", "rc", "rr"))
        _, m = mpo_loss(pc, pr, rc, rr, torch.tensor(s["nll"]), weights, running)
        out.append(m)
    return out, running


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_mpo_matches_trl_equations(ls):
    steps = _random_steps(n_steps=4, batch=3, seed=5)
    weights = MPOWeights(beta=0.1, pref_weight=0.8, quality_weight=0.2, gen_weight=1.0, label_smoothing=ls)
    ours, _ = _ours(steps, weights)
    ref = _trl_equations(steps, beta=0.1, ls=ls, w_sig=0.8, w_bco=0.2, rpo_alpha=1.0)
    for o, r in zip(ours, ref):
        for key, value in r.items():
            assert o[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


_TRL_SCRIPT = r"""
import json, sys, types
import torch
import trl

job = json.load(sys.stdin)
if not trl.__version__.startswith("0.10."):  # before the imports that later releases moved or dropped
    print(json.dumps({"skip": "trl " + trl.__version__}))
    sys.exit(0)
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.utils import RunningMoments


class Accel:  # what dpo_loss and RunningMoments touch
    device = torch.device("cpu")
    use_distributed = False


def fake_trainer(loss_type):
    me = types.SimpleNamespace(
        accelerator=Accel(), reference_free=False, f_divergence_type="reverse_kl", f_divergence_params=None,
        beta=job["beta"], label_smoothing=job["ls"], loss_type=loss_type, label_pad_token_id=-100,
        is_encoder_decoder=False)
    me.running = RunningMoments(me.accelerator)
    return me


# InternVL's MultimodalDPOTrainer.get_batch_loss_metrics, combined branch, on TRL's dpo_loss
me = fake_trainer("sigmoid,bco_pair")
weights = {"sigmoid": job["w_sig"], "bco_pair": job["w_bco"]}
steps = []
for s in job["steps"]:
    pc, pr, rc, rr = (torch.tensor(s[k]) for k in ("pc", "pr", "rc", "rr"))
    losses, chosen_rewards, rejected_rewards = 0, 0, 0
    for name in ("sigmoid", "bco_pair"):
        me.loss_type = name
        l, c, r = DPOTrainer.dpo_loss(me, pc, pr, rc, rr)
        losses, chosen_rewards, rejected_rewards = losses + l * weights[name], chosen_rewards + c * weights[name], rejected_rewards + r * weights[name]
    losses = losses + torch.tensor(s["nll"]) * job["rpo_alpha"]
    steps.append({"loss": losses.mean().item(), "delta": me.running.mean,
                  "rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
                  "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
                  "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
                  "running": {"mean": me.running.mean, "var": me.running.var, "std": me.running.std, "count": me.running.count}})

# get_batch_logps and the chosen-half nll of concatenated_forward
logits = torch.tensor(job["logits"])
labels = torch.tensor(job["labels"])
logps, counts = DPOTrainer.get_batch_logps(logits, labels)
n_chosen = job["n_chosen"]
nll = torch.nn.CrossEntropyLoss(ignore_index=-100)(logits[:n_chosen, :-1].reshape(-1, logits.shape[-1]), labels[:n_chosen, 1:].reshape(-1))

# RunningMoments across two ranks, with a fake accelerator.reduce(sum)
class TwoRanks(Accel):
    use_distributed = True
    def __init__(self, others):
        self.others, self.calls = others, 0
    def reduce(self, x):
        other = self.others[self.calls // 2]
        self.calls += 1
        if self.calls % 2 == 1:
            self.gm = (x[0].item() + other) / (x[1].item() + 1)
            return x + torch.tensor([other, 1.0])
        return x + (other - self.gm) ** 2
dist = RunningMoments(TwoRanks(job["other_rank"]))
dist_states = []
for v in job["this_rank"]:
    dist.update(torch.tensor(v))
    dist_states.append({"mean": dist.mean, "var": dist.var, "std": dist.std, "count": dist.count})

print(json.dumps({"version": trl.__version__, "steps": steps, "logps": logps.tolist(), "counts": counts.tolist(),
                  "nll": nll.item(), "dist_states": dist_states}))
"""


def _trl_python() -> tuple[str | None, str]:
    """An interpreter with trl 0.10.x: this one if its trl is 0.10.x, else INTERNVL_MPO_TRL_PYTHON; else None and
    why. The test extra's trl (1.16, tests/test_trl_parity.py) has neither `DPOTrainer.dpo_loss` nor RunningMoments."""
    try:
        here = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        here = None
    if here is not None and here.startswith("0.10."):
        return sys.executable, ""
    named = os.environ.get("INTERNVL_MPO_TRL_PYTHON")
    if named:
        return named, ""
    found = "trl is not installed here" if here is None else f"trl here is {here}, not 0.10.x"
    return None, f"{found}; set INTERNVL_MPO_TRL_PYTHON to a venv python that has trl 0.10.x"


# The recipe's settings, then others: the weights need not sum to 1, where InternVL logs the weight-sum of
# the per-type rewards (`(w_sig + w_bco) * beta * delta`) and we log `beta * delta`.
TRL_SETTINGS = [{"beta": 0.1, "ls": 0.0, "w_sig": 0.8, "w_bco": 0.2, "rpo_alpha": 1.0},
                {"beta": 0.5, "ls": 0.2, "w_sig": 1.3, "w_bco": 0.6, "rpo_alpha": 0.4}]


@pytest.mark.parametrize("setting", TRL_SETTINGS)
def test_parity_with_trl_0_10_1(setting):
    python, why = _trl_python()
    if python is None:
        pytest.skip(why)
    steps = _random_steps(n_steps=5, batch=2, seed=6)
    gen = torch.Generator().manual_seed(7)
    logits = 4 * torch.randn(4, 9, 23, generator=gen)
    labels = torch.randint(0, 23, (4, 9), generator=gen)
    labels[:, :3] = -100
    labels[1, -3:] = -100
    labels[3, 5:] = -100
    this_rank, other_rank = [0.4, -1.3, 2.2], [1.1, 0.2, -0.9]
    job = {**setting, "steps": steps,
           "logits": logits.tolist(), "labels": labels.tolist(), "n_chosen": 2,
           "this_rank": this_rank, "other_rank": other_rank}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([python, "-c", _TRL_SCRIPT], input=json.dumps(job), capture_output=True, text=True, check=False,
                          timeout=300, env=env, cwd="/")
    if proc.returncode != 0:
        pytest.fail(f"TRL reference run failed:\n{proc.stderr[-3000:]}")
    trl_out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in trl_out:
        pytest.skip(f"need trl 0.10.x, found {trl_out['skip']}")

    weights = MPOWeights(beta=setting["beta"], pref_weight=setting["w_sig"], quality_weight=setting["w_bco"],
                         gen_weight=setting["rpo_alpha"], label_smoothing=setting["ls"])
    ours, running = _ours(steps, weights)
    scale = setting["w_sig"] + setting["w_bco"]
    for o, r in zip(ours, trl_out["steps"]):
        assert o["delta"] == r["delta"]  # same float32 arithmetic, bit for bit
        for key in ("loss", "rewards/accuracies"):
            assert o[key] == pytest.approx(r[key], rel=1e-6, abs=1e-7), key
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert scale * o[key] == pytest.approx(r[key], rel=1e-6, abs=1e-7), key
    assert running.state_dict() == pytest.approx(trl_out["steps"][-1]["running"], nan_ok=True)

    sums, counts = _logps_of_logits(logits, labels, chunk_size=5)
    torch.testing.assert_close(sums, torch.tensor(trl_out["logps"]))
    assert counts.tolist() == trl_out["counts"]
    assert sft_nll(sums[:2], counts[:2]).item() == pytest.approx(trl_out["nll"], rel=1e-6)

    dist = RunningMean()
    for v, other, expected in zip(this_rank, other_rank, trl_out["dist_states"]):
        dist.all_reduce = _TwoRanks(other)
        dist.update(torch.tensor(v))
        assert dist.state_dict() == pytest.approx(expected)


def test_train_step_benchmark_checks_its_trl_python_first(tmp_path):
    """benchmarks/train_step.py without TRL ran our side first (minutes for the 0.5b config) and then printed
    "trl side failed:" and the TRL process's traceback ending "No module named 'trl'". It now checks the
    --trl-python interpreter before anything runs, and refuses one that cannot import trl, naming the flag."""
    spec = importlib.util.spec_from_file_location(
        "benchmark_train_step", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "train_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    no_trl = tmp_path / "python"
    no_trl.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'trl'\" >&2\nexit 1\n")
    no_trl.chmod(0o755)
    with pytest.raises(SystemExit, match=rf"--trl-python {no_trl}: it cannot import trl \(ModuleNotFoundError: No"):
        bench.check_trl_python(str(no_trl))
    with pytest.raises(SystemExit, match=r"--trl-python /nonexistent/python: cannot run it"):
        bench.check_trl_python("/nonexistent/python")
    has_trl = tmp_path / "python-with-trl"
    has_trl.write_text("#!/bin/sh\nexit 0\n")
    has_trl.chmod(0o755)
    bench.check_trl_python(str(has_trl))
    # trl's top level imports lazily: an interpreter where `import trl` passes but its DPOTrainer cannot import
    # (a transformers it cannot take) passed the check, and failed with a traceback after our side had run
    lazy = tmp_path / "python-lazy-trl"
    lazy.write_text("#!/bin/sh\n[ \"$2\" = \"import trl\" ] && exit 0\n"
                    "echo \"ModuleNotFoundError: No module named 'transformers'\" >&2\nexit 1\n")
    lazy.chmod(0o755)
    with pytest.raises(SystemExit, match=rf"--trl-python {lazy}: it cannot import trl \(ModuleNotFoundError: No module "
                                         r"named 'transformers'\)"):
        bench.check_trl_python(str(lazy))

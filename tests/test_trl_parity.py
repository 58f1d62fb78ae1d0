"""Live parity of the MPO losses with TRL 1.16's `DPOTrainer` (the release benchmarks/train_step.py times).

Both sides hold the same tiny Qwen2-layout decoder (random weights, vocabulary 256, width 32, 2 layers, float32,
CPU) and see the same text-only batch of 2 preference pairs whose answers differ in length (TRL's vision path
cannot take an InternVL model; the 2.5-MPO objective on text is the same maths). TRL's side is its trainer, built
as benchmarks/train_step.py's `run_trl` builds it, computing the loss on its own collated batch; ours is the
trainer's `micro_batch_loss` on `SequenceLogps`, as `run_ours` runs it. Compared to float32 rounding: the loss,
the logged rewards and log-probs, and the gradient of every weight of the decoder.

Where TRL 1.16 differs by design from TRL 0.10.1, whose equations our losses follow (README "Training"):
- `bco_pair` dropped the running-mean reward shift. At a run's first step the reference is the policy, every
  reward is 0 and so is the shift: there the two agree; with another reference a test pins the difference.
- `sigmoid` ignores `label_smoothing` (cDPO). TRL 1.16 keeps that equation in its `aot` loss, which on a single
  pair (nothing to sort) is cDPO: label smoothing is compared there, and a test pins what `sigmoid` does with it.
The NLL is the token mean pooled over the chosen answers of the batch on both sides (TRL 1.16's `sft` term), so
answers of different lengths give the same value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl", minversion="1.16", reason="trl >= 1.16 is not installed (the test extra pins it)")
# transformers 5 renamed gradient checkpointing to activation checkpointing; TRL 1.16 still uses the old names
pytestmark = pytest.mark.filterwarnings("ignore:`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated:FutureWarning")

from datasets import Dataset  # trl's dependencies
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from trl import DPOConfig, DPOTrainer

from internvl_mpo.config import LLMConfig, ModelConfig, VisionConfig
from internvl_mpo.model import InternVL
from internvl_mpo.train.data import PairExample, collate_pairs
from internvl_mpo.train.losses import MPOWeights, RunningMean
from internvl_mpo.train.mpo import micro_batch_loss
from internvl_mpo.train.policy import SequenceLogps, make_reference

WORDS = 253  # plain words "w0".."w252"; with <unk>, <eos> and <pad> a vocabulary of 256
SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}
BETA = 0.1
POLICY_SEED, OTHER_SEED = 0, 1  # a reference with OTHER_SEED's weights has log-ratios far from 0
RTOL = 1e-5  # float32 rounding of sums over a few dozen tokens is far below this


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer (one id per space-separated word), as benchmarks/train_step.py's."""
    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, **{f"w{i}": 3 + i for i in range(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def _pairs() -> list[dict[str, str]]:
    """Two pairs of random words; chosen and rejected answers of different lengths (TRL adds the EOS)."""
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(WORDS)}" for _ in range(n))

    return [{"prompt": words(6) + " ", "chosen": words(4), "rejected": words(8)},
            {"prompt": words(9) + " ", "chosen": words(6), "rejected": words(2)}]


def _qwen2(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    # initializer_range 0.3 (not 0.02): next-token distributions far from uniform, rewards far from 0
    config = Qwen2Config(vocab_size=WORDS + 3, tie_word_embeddings=False, max_position_embeddings=64, rope_theta=1e6,
                         rms_norm_eps=1e-6, initializer_range=0.3, **SHAPE)
    return Qwen2ForCausalLM(config).float()


def _internvl(seed: int) -> InternVL:
    """Our model with `_qwen2(seed)`'s decoder as its LLM (and a small random vision tower, unused by text)."""
    llm = dataclasses.replace(LLMConfig(), vocab_size=WORDS + 3, rope_theta=1e6, rms_norm_eps=1e-6, **SHAPE)
    vision = dataclasses.replace(VisionConfig(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=56)
    config = ModelConfig(vision=vision, llm=llm, force_image_size=56)
    with torch.device("meta"):
        model = InternVL(config)
    state = {"language_model." + k: v for k, v in _qwen2(seed).state_dict().items()}
    donor = InternVL(config)
    donor.init_weights()
    state.update({k: v for k, v in donor.state_dict().items() if not k.startswith("language_model.")})
    model.load_state_dict(state, assign=True)
    return model.train()


def _trl(tmp_path, pairs, ref_seed: int, loss_type: list[str], loss_weights=None, label_smoothing=0.0, beta=BETA):
    """TRL's DPOTrainer over `pairs` (one batch), as benchmarks/train_step.py builds it on CPU."""
    config = DPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(pairs), max_steps=1, learning_rate=1e-6,
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.05, max_grad_norm=1.0, beta=beta,
        loss_type=loss_type, loss_weights=loss_weights, label_smoothing=label_smoothing, max_length=None,
        bf16=False, use_cpu=True, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )
    return DPOTrainer(model=_qwen2(POLICY_SEED), ref_model=_qwen2(ref_seed).eval(), args=config,
                      train_dataset=Dataset.from_list(pairs), processing_class=_tokenizer())


def _trl_loss(tmp_path, pairs, ref_seed, loss_type, loss_weights=None, label_smoothing=0.0, beta=BETA):
    """TRL's loss on its first batch, its metrics, its weights' gradients and the batch."""
    trainer = _trl(tmp_path, pairs, ref_seed, loss_type, loss_weights, label_smoothing, beta)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {name: p.grad for name, p in trainer.model.named_parameters()}
    return float(loss.detach()), metrics, grads, batch


def _our_batch(pairs):
    tok = _tokenizer()
    examples = []
    for k, pair in enumerate(pairs):
        prompt = tok(pair["prompt"], add_special_tokens=False).input_ids
        chosen = tok(pair["chosen"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        rejected = tok(pair["rejected"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        examples.append(PairExample(k, prompt, chosen, chosen, rejected, rejected, torch.zeros(0, 3, 56, 56), False,
                                    f"pair {k}"))
    return collate_pairs(examples, tok.pad_token_id)


def _our_models(ref_seed: int):
    policy = _internvl(POLICY_SEED)
    # at a run's first step the reference is a copy of the policy, as the trainer makes it
    ref = make_reference(policy, False) if ref_seed == POLICY_SEED else _internvl(ref_seed).eval().requires_grad_(False)
    return policy, ref


def _our_loss(pairs, ref_seed: int, weights: MPOWeights):
    """Our loss as the trainer computes it (fresh running mean), its metrics, the LLM's gradients and the batch."""
    policy, ref = _our_models(ref_seed)
    batch = _our_batch(pairs)
    loss, metrics = micro_batch_loss(SequenceLogps(policy), SequenceLogps(ref), None, batch, weights, RunningMean(),
                                     contextlib.nullcontext)
    loss.backward()
    grads = {name.removeprefix("language_model."): p.grad for name, p in policy.named_parameters()
             if name.startswith("language_model.")}
    return float(loss.detach()), metrics, grads, batch


def _assert_same_grads(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name, g in theirs.items():
        assert ours[name] is not None and g is not None, name
        # atol: entries near 0 next to large ones carry the large ones' rounding
        torch.testing.assert_close(ours[name], g, rtol=RTOL, atol=RTOL * float(g.abs().max()), msg=name)


LOGPS = ("logps/chosen", "logps/rejected")
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def _assert_same_metrics(ours: dict, theirs: dict, keys=REWARDS + LOGPS) -> None:
    for key in keys:
        assert ours[key] == pytest.approx(theirs[key], rel=RTOL, abs=1e-7), key


MPO = MPOWeights(beta=BETA, pref_weight=0.8, quality_weight=0.2, gen_weight=1.0)
SIGMOID = MPOWeights(beta=BETA, pref_weight=1.0, quality_weight=0.0, gen_weight=0.0)
BCO_PAIR = MPOWeights(beta=BETA, pref_weight=0.0, quality_weight=1.0, gen_weight=0.0)
SFT = MPOWeights(beta=BETA, pref_weight=0.0, quality_weight=0.0, gen_weight=1.0)
FIRST_STEP = {  # TRL loss_type, loss_weights -> our weights
    "mpo": (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], MPO),
    "sigmoid": (["sigmoid"], None, SIGMOID),
    "bco_pair": (["bco_pair"], None, BCO_PAIR),
    "sft": (["sft"], None, SFT),
}


def test_both_sides_score_the_same_tokens(tmp_path):
    """Same ids (TRL tokenizes prompt + answer + EOS, we tokenize the parts) and the same scored positions."""
    _, _, _, theirs = _trl_loss(tmp_path, _pairs(), OTHER_SEED, ["sigmoid"])
    ours = _our_batch(_pairs())
    assert torch.equal(ours.input_ids, theirs["input_ids"])
    assert torch.equal(ours.labels, theirs["input_ids"].masked_fill(theirs["completion_mask"] == 0, -100))
    counts = (theirs["completion_mask"][:2] == 1).sum(1).tolist()
    assert counts[0] != counts[1]  # the pooled NLL sees chosen answers of different lengths


@pytest.mark.parametrize("name", FIRST_STEP)
def test_first_step_matches_trl(tmp_path, name):
    """Reference = the initial policy, as at a run's first step: every term agrees (the BCO shift is 0 there)."""
    loss_type, loss_weights, weights = FIRST_STEP[name]
    theirs, their_metrics, their_grads, _ = _trl_loss(tmp_path, _pairs(), POLICY_SEED, loss_type, loss_weights)
    ours, our_metrics, our_grads, _ = _our_loss(_pairs(), POLICY_SEED, weights)
    assert ours == pytest.approx(theirs, rel=RTOL)
    if name != "sft":
        assert our_metrics["rewards/chosen"] == our_metrics["rewards/rejected"] == 0.0
        _assert_same_metrics(our_metrics, their_metrics)
    _assert_same_grads(our_grads, their_grads)


def test_mpo_training_step_matches_trl(tmp_path):
    """One real `trainer.train()` step of the MPO mix: TRL's logged loss and pre-clipping gradient norm are ours."""
    trainer = _trl(tmp_path, _pairs(), POLICY_SEED, ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])
    trainer.train()
    logged = next(log for log in trainer.state.log_history if "loss" in log)
    policy, ref = _our_models(POLICY_SEED)
    loss, _ = micro_batch_loss(SequenceLogps(policy), SequenceLogps(ref), None, _our_batch(_pairs()), MPO,
                               RunningMean(), contextlib.nullcontext)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.grad is not None], 1.0)
    assert loss.item() == pytest.approx(logged["loss"], rel=RTOL)
    assert float(norm) == pytest.approx(logged["grad_norm"], rel=RTOL)
    assert logged["grad_norm"] > 1.0  # the step clipped


@pytest.mark.parametrize("name", ["sigmoid", "sft"])
def test_other_reference_matches_trl(tmp_path, name):
    """A reference unlike the policy (rewards far from 0): sigmoid DPO and the pooled NLL agree, gradients too."""
    loss_type, loss_weights, weights = FIRST_STEP[name]
    theirs, their_metrics, their_grads, _ = _trl_loss(tmp_path, _pairs(), OTHER_SEED, loss_type, loss_weights)
    ours, our_metrics, our_grads, _ = _our_loss(_pairs(), OTHER_SEED, weights)
    assert ours == pytest.approx(theirs, rel=RTOL)
    assert abs(their_metrics["rewards/margins"]) > 0.1
    _assert_same_metrics(our_metrics, their_metrics, LOGPS if name == "sft" else REWARDS + LOGPS)
    _assert_same_grads(our_grads, their_grads)


def test_label_smoothing_matches_trl_aot_on_one_pair(tmp_path):
    """cDPO with label smoothing 0.1: TRL 1.16's `aot` on one pair is `-(1-ls) logsig(b z) - ls logsig(-b z)`."""
    pair = _pairs()[:1]
    theirs, _, their_grads, _ = _trl_loss(tmp_path, pair, OTHER_SEED, ["aot"], label_smoothing=0.1)
    ours, _, our_grads, _ = _our_loss(pair, OTHER_SEED, dataclasses.replace(SIGMOID, label_smoothing=0.1))
    unsmoothed, _, _, _ = _our_loss(pair, OTHER_SEED, SIGMOID)
    assert ours == pytest.approx(theirs, rel=RTOL)
    assert abs(ours - unsmoothed) > 1e3 * RTOL * ours  # the smoothing shows
    _assert_same_grads(our_grads, their_grads)


def test_trl_1_16_sigmoid_ignores_label_smoothing(tmp_path):
    """Documented difference: TRL 1.16's `sigmoid` with label_smoothing 0.1 is plain DPO; ours (TRL 0.10.1's) is
    cDPO, which exceeds it by exactly ls * mean(beta z) = 0.1 * rewards/margins (-logsig(-x) = -logsig(x) + x)."""
    theirs, _, _, _ = _trl_loss(tmp_path, _pairs(), OTHER_SEED, ["sigmoid"], label_smoothing=0.1)
    ours, metrics, _, _ = _our_loss(_pairs(), OTHER_SEED, dataclasses.replace(SIGMOID, label_smoothing=0.1))
    plain, _, _, _ = _our_loss(_pairs(), OTHER_SEED, SIGMOID)
    assert theirs == pytest.approx(plain, rel=RTOL)
    assert ours - theirs == pytest.approx(0.1 * metrics["rewards/margins"], rel=1e-4)
    assert abs(ours - theirs) > 1e3 * RTOL * theirs


def test_trl_1_16_bco_pair_has_no_running_mean_shift(tmp_path):
    """Documented difference: with rewards r (a reference unlike the policy), TRL 1.16's bco_pair is
    mean(-logsig(r_c) - logsig(-r_r)); ours (TRL 0.10.1's) shifts both by the running mean, after a first update
    the batch mean of [r_c; r_r]. Beta 1 makes the shift large enough to see plainly."""
    beta = 1.0
    theirs, _, _, _ = _trl_loss(tmp_path, _pairs(), OTHER_SEED, ["bco_pair"], beta=beta)
    ours, metrics, _, batch = _our_loss(_pairs(), OTHER_SEED, dataclasses.replace(BCO_PAIR, beta=beta))
    policy, ref = _our_models(OTHER_SEED)
    with torch.no_grad():
        rewards = beta * (SequenceLogps(policy)(batch.input_ids, batch.labels, batch.pixel_values, True)[0]
                          - SequenceLogps(ref)(batch.input_ids, batch.labels, batch.pixel_values, True)[0])
    r_c, r_r = rewards[:2], rewards[2:]
    delta = float(rewards.mean())
    assert metrics["delta"] == pytest.approx(delta, rel=RTOL)
    assert abs(delta) > 0.1
    assert theirs == pytest.approx(float((-F.logsigmoid(r_c) - F.logsigmoid(-r_r)).mean()), rel=RTOL)
    assert ours == pytest.approx(float((-F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta))).mean()), rel=RTOL)
    assert abs(ours - theirs) > 1e2 * RTOL * theirs

"""SFT and DPO objectives (mixtral.finetune.losses) against their formulas computed another way."""
from __future__ import annotations

import math

import pytest
import torch

from mixtral.finetune.losses import IGNORE, dpo_loss, sequence_logprobs, sft_loss


def test_sft_loss_is_the_cross_entropy_over_learned_tokens_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    targets = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE], [IGNORE, 7, 1, IGNORE, IGNORE]])
    learned = [(0, 2), (0, 3), (1, 1), (1, 2)]
    by_hand = -sum(torch.log_softmax(logits[b, t], -1)[targets[b, t]] for b, t in learned) / len(learned)
    assert torch.allclose(sft_loss(logits, targets), by_hand)
    none = torch.full((2, 5), IGNORE)
    zero = sft_loss(logits.requires_grad_(), none)
    zero.backward()
    assert zero.item() == 0.0 and logits.grad.abs().sum() == 0


def test_sequence_logprobs_sum_the_replies_tokens():
    logits = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[IGNORE, 2, 5, IGNORE]])
    want = torch.log_softmax(logits[0, 1], -1)[2] + torch.log_softmax(logits[0, 2], -1)[5]
    assert torch.allclose(sequence_logprobs(logits, targets), want[None])


def test_dpo_matches_its_formula_and_gradient():
    pc = torch.tensor([-10.0, -4.0], requires_grad=True)
    pr = torch.tensor([-12.0, -3.0], requires_grad=True)
    rc, rr = torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -3.5])
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    logits = [0.1 * ((-10 + 11) - (-12 + 11.5)), 0.1 * ((-4 + 4.5) - (-3 + 3.5))]
    want = sum(math.log1p(math.exp(-z)) for z in logits) / 2  # -log sigmoid(z)
    assert math.isclose(out.loss.item(), want, rel_tol=1e-6)
    assert torch.allclose(out.chosen_rewards, torch.tensor([0.1, 0.05]))
    assert torch.allclose(out.rejected_rewards, torch.tensor([-0.05, 0.05]))
    assert out.accuracy.item() == 0.5 and math.isclose(out.margin.item(), (0.15 + 0.0) / 2, rel_tol=1e-5)
    out.loss.backward()
    # d/d pc of -log sigmoid(z) / n = -beta * sigmoid(-z) / n, and the opposite for pr
    sig = torch.sigmoid(-torch.tensor(logits))
    assert torch.allclose(pc.grad, -0.1 * sig / 2) and torch.allclose(pr.grad, 0.1 * sig / 2)


@pytest.mark.parametrize("sft_weight", [0.0, 0.7])
def test_dpo_equals_trls_dpo_trainer_on_the_same_logprobs(sft_weight):
    """TRL's DPOTrainer computes the loss on the same per-token log-probabilities (its model and accelerator stood
    in for by stubs; precomputed reference log-probabilities): loss, rewards, margin, accuracy and gradients agree,
    with the SFT term on the chosen replies as TRL's loss_type ["sigmoid", "sft"] weighs it."""
    from collections import defaultdict
    from types import SimpleNamespace

    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    g = torch.Generator().manual_seed(3)
    pairs, length = 3, 6
    per_token = (torch.randn(2 * pairs, length - 1, generator=g) - 2).requires_grad_()
    completion = torch.ones(2 * pairs, length, dtype=torch.long)
    completion[:, :2] = 0  # the prompt: TRL masks it out of the log-probabilities it is handed, so we do the same
    learned = completion[:, 1:].bool()
    ref = torch.randn(2 * pairs, generator=g) - 8
    model = SimpleNamespace(training=True)

    def forward(**kwargs):
        zeros = torch.zeros(2 * pairs, length - 1)
        return SimpleNamespace(log_probs=per_token * learned, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool())

    identity = lambda t: t  # noqa: E731
    trainer = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device="cpu", gather=identity, gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=["sigmoid", "sft"], loss_weights=[1.0, sft_weight], beta=0.1, label_smoothing=0.0, use_weighting=False,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * pairs, length, dtype=torch.long), "attention_mask": completion * 0 + 1,
              "completion_mask": completion, "ref_chosen_logps": ref[:pairs], "ref_rejected_logps": ref[pairs:]}
    theirs = dpo_trainer.DPOTrainer._compute_loss(trainer, forward, inputs, return_outputs=False)
    (their_grad,) = torch.autograd.grad(theirs, per_token)

    logp = (per_token * learned).sum(-1)
    ours = dpo_loss(logp[:pairs], logp[pairs:], ref[:pairs], ref[pairs:], beta=0.1, sft_weight=sft_weight,
                    chosen_tokens=learned[:pairs].sum())
    (our_grad,) = torch.autograd.grad(ours.loss, per_token)
    metrics = trainer._metrics["train"]
    assert torch.allclose(ours.loss, theirs, rtol=1e-6)
    assert torch.allclose(our_grad, their_grad, rtol=1e-5, atol=1e-8)
    assert math.isclose(ours.chosen_rewards.mean().item(), metrics["rewards/chosen"][0], rel_tol=1e-5)
    assert math.isclose(ours.rejected_rewards.mean().item(), metrics["rewards/rejected"][0], rel_tol=1e-5)
    assert math.isclose(ours.margin.item(), metrics["rewards/margins"][0], rel_tol=1e-5)
    assert math.isclose(ours.accuracy.item(), metrics["rewards/accuracies"][0])

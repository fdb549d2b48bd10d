"""SFT and DPO objectives (mixtral.finetune.losses) against their formulas computed another way."""
from __future__ import annotations

import math

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

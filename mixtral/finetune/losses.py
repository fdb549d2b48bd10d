"""The fine-tuning objectives, as plain functions of logits and targets.

SFT: cross-entropy over the tokens that are learned (the assistant's replies), averaged over those tokens only, so
a row of long prompts and a short reply weighs that reply's tokens as much as any other's.

DPO (Rafailov et al. 2023, the sigmoid loss): for a prompt with a chosen and a rejected reply, the policy π and a
frozen reference π_ref,
    r_chosen   = β (log π(chosen) - log π_ref(chosen))          (the implicit rewards; summed token log-probs)
    r_rejected = β (log π(rejected) - log π_ref(rejected))
    loss       = -log σ(r_chosen - r_rejected)
with metrics the reward margin r_chosen - r_rejected and the preference accuracy (margin > 0).

DPO only asks that the chosen reply gain on the rejected one, so both may lose probability together; when they share
their start (a number and the same number off by one), what falls is often what they have in common, the end of the
reply, and greedy replies stop ending. An SFT term on the chosen replies, `sft_weight` times their mean token
negative log-likelihood (RPO, Pang et al. 2024; TRL's `loss_type=["sigmoid", "sft"]`), keeps them likely.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE = -100  # a target that is not learned (a prompt token, padding): cross_entropy's ignore_index


def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [batch, seq, vocab] (the next token's) against targets [batch, seq] over the
    targets that are not IGNORE; 0 (with a gradient) when there are none."""
    flat = targets.reshape(-1)
    if not (flat != IGNORE).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=IGNORE)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[batch]: the sum over each row of log p(target) for the targets that are not IGNORE (a reply's log
    probability given its prompt). logits [batch, seq, vocab], targets [batch, seq]."""
    learned = targets != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * learned).sum(-1)


class DPO(NamedTuple):
    loss: torch.Tensor  # mean over the pairs
    chosen_rewards: torch.Tensor  # [pairs]
    rejected_rewards: torch.Tensor  # [pairs]

    @property
    def margin(self) -> torch.Tensor:
        """Mean reward margin r_chosen - r_rejected."""
        return (self.chosen_rewards - self.rejected_rewards).mean()

    @property
    def accuracy(self) -> torch.Tensor:
        """Share of pairs whose chosen reply has the higher reward."""
        return (self.chosen_rewards > self.rejected_rewards).float().mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float = 0.1, sft_weight: float = 0.0,
             chosen_tokens: int | torch.Tensor | None = None) -> DPO:
    """The sigmoid DPO loss of the module docstring from summed log-probabilities [pairs] of each reply under the
    policy and the reference (the reference's carry no gradient), plus `sft_weight` times the chosen replies' mean
    token NLL, -sum(policy_chosen) / chosen_tokens (their learned tokens in all)."""
    chosen = beta * (policy_chosen - reference_chosen.detach())
    rejected = beta * (policy_rejected - reference_rejected.detach())
    loss = -F.logsigmoid(chosen - rejected).mean()
    if sft_weight:
        if chosen_tokens is None:
            raise ValueError("dpo_loss: sft_weight needs chosen_tokens, the chosen replies' learned tokens")
        loss = loss + sft_weight * -policy_chosen.sum() / chosen_tokens
    return DPO(loss, chosen.detach(), rejected.detach())

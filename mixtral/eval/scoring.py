"""Scoring tokens: the log-probability the model gives each token of a sequence, and whether it was its argmax.

`score_rows` is the one forward pass behind every likelihood number of `mixtral eval` (perplexity windows,
lm-evaluation-harness' `loglikelihood` and `loglikelihood_rolling`): a batch of rows, each scored only on its last
few tokens. Rows are padded on the right, which the causal mask keeps from touching any real token, and only the
scored positions go through the output projection, so a batch of long windows never holds a full
[batch, seq, vocab] tensor of logits.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from mixtral.model import Transformer

# Scored positions per output projection: 1024 x 32000 float32 logits is 128 MB.
OUTPUT_CHUNK = 1024


class RowScore(NamedTuple):
    logprobs: torch.Tensor  # [n_scored] float32: log p(token | everything before it in the row)
    greedy: torch.Tensor  # [n_scored] bool: whether the token was the model's argmax there


@torch.no_grad()
def score_rows(model: Transformer, rows: Sequence[Sequence[int]], n_scored: Sequence[int]) -> list[RowScore]:
    """Score the last `n_scored[i]` tokens of each row `rows[i]`, each predicted from all the tokens before it.

    Each row needs 1 <= n_scored[i] < len(row) (its first token is context only) and at most the model's
    context_len + 1 tokens. Returns one RowScore per row, in order.
    """
    assert len(rows) == len(n_scored) and rows, (len(rows), len(n_scored))
    for row, n in zip(rows, n_scored):
        assert 1 <= n < len(row) <= model.config.context_len + 1, (n, len(row), model.config.context_len)
    device = model.tok_embeddings.weight.device
    longest = max(len(row) for row in rows) - 1
    inputs = torch.zeros(len(rows), longest, dtype=torch.long)  # [rows, seq], right-padded with 0
    for i, row in enumerate(rows):
        inputs[i, : len(row) - 1] = torch.as_tensor(row[:-1], dtype=torch.long)
    hidden, _ = model.trunk(inputs.to(device))  # [rows, seq, dim]

    # Row i's token j (j >= 1) is predicted at position j - 1.
    which_row = torch.cat([torch.full((n,), i) for i, n in enumerate(n_scored)])
    position = torch.cat([torch.arange(len(row) - 1 - n, len(row) - 1) for row, n in zip(rows, n_scored)])
    targets = torch.cat([torch.as_tensor(row[len(row) - n:], dtype=torch.long) for row, n in zip(rows, n_scored)])
    picked = hidden[which_row.to(device), position.to(device)]  # [scored, dim]
    logprobs, greedy = [], []
    for start in range(0, len(targets), OUTPUT_CHUNK):
        chunk_targets = targets[start:start + OUTPUT_CHUNK].to(device)
        logits = model.output(model.norm(picked[start:start + OUTPUT_CHUNK])).float()  # [chunk, vocab]
        logprobs.append(torch.log_softmax(logits, dim=-1).gather(1, chunk_targets[:, None])[:, 0].cpu())
        greedy.append((logits.argmax(dim=-1) == chunk_targets).cpu())
    return [RowScore(lp, g) for lp, g in zip(torch.cat(logprobs).split(list(n_scored)),
                                             torch.cat(greedy).split(list(n_scored)))]

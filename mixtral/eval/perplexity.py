"""Perplexity with sliding windows: of a token sequence, of text files, or of a prepared corpus per domain.

The method of Hugging Face's "perplexity of fixed-length models": the model reads `window` tokens at a time and
each window starts `stride` tokens after the previous one; only the tokens no earlier window scored are scored, so
every token but the first is scored exactly once, with between window - stride + 1 and window tokens of context
(fewer only at the start). One difference: a window's last input predicts the token after it, so no token is
skipped where two windows meet, and with stride == window the loss is exactly the training validation loss over
non-overlapping windows (`TokenShards.windows`). A smaller stride gives each token more context (a lower, fairer
number) at window / stride times the compute.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from mixtral.data.shards import TokenShards
from mixtral.errors import InputError
from mixtral.eval.scoring import score_rows
from mixtral.model import Transformer

ALL = "all"


@dataclass(frozen=True)
class PerplexityResult:
    loss: float  # mean negative log-likelihood, nats per scored token
    tokens: int  # tokens scored

    @property
    def ppl(self) -> float:
        """exp(loss): the effective number of equally likely choices per token."""
        return math.exp(self.loss)


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, stop, n_scored) of each window over a sequence of `n_tokens`: the row ids[start:stop] (at most
    window + 1 tokens: `window` inputs and the token after the last) is scored on its last `n_scored` tokens."""
    assert 1 <= stride <= window, (stride, window)
    spans = []
    scored_until = 1  # tokens before this index are scored; token 0 has no context to be predicted from
    start = 0
    while scored_until < n_tokens:
        stop = min(start + window + 1, n_tokens)
        spans.append((start, stop, stop - scored_until))
        scored_until = stop
        start += stride
    return spans


def check_windows(model: Transformer, window: int, stride: int, batch_size: int) -> None:
    """Raise InputError for a window the model cannot read, a stride outside [1, window] or a batch below 1."""
    context = model.config.context_len
    if not 1 <= window <= context:
        raise InputError(f"window must be in [1, {context}] (the model's context), got {window}")
    if not 1 <= stride <= window:
        raise InputError(f"stride must be in [1, window={window}], got {stride}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")


@torch.no_grad()
def perplexity(model: Transformer, ids: Sequence[int] | np.ndarray | torch.Tensor, window: int, stride: int,
               batch_size: int = 8, progress: bool = False) -> PerplexityResult:
    """The perplexity of one token sequence `ids` (1-D) under `model`, by sliding windows (module docstring):
    `window` tokens of input per row, advancing by `stride`, `batch_size` windows per forward pass.

    Returns a PerplexityResult (loss in nats/token, ppl, tokens scored = len(ids) - 1). Raises InputError for
    fewer than 2 tokens or settings `check_windows` rejects.
    """
    check_windows(model, window, stride, batch_size)
    ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids)
    if ids.ndim != 1 or len(ids) < 2:
        raise InputError(f"perplexity needs a 1-D sequence of at least 2 tokens, got shape {ids.shape}")
    spans = sliding_windows(len(ids), window, stride)
    total = 0.0
    for first in tqdm(range(0, len(spans), batch_size), desc="windows", unit="batch", disable=not progress):
        batch = spans[first:first + batch_size]
        rows = [ids[start:stop].astype(np.int64).tolist() for start, stop, _ in batch]
        scores = score_rows(model, rows, [n for _, _, n in batch])
        total -= sum(float(score.logprobs.double().sum()) for score in scores)
    return PerplexityResult(loss=total / (len(ids) - 1), tokens=len(ids) - 1)


def combine(results: Mapping[str, PerplexityResult]) -> PerplexityResult:
    """The token-weighted mean of several results: the perplexity of all their tokens together."""
    tokens = sum(r.tokens for r in results.values())
    if not tokens:
        return PerplexityResult(loss=float("nan"), tokens=0)
    return PerplexityResult(loss=sum(r.loss * r.tokens for r in results.values()) / tokens, tokens=tokens)


def corpus_perplexity(model: Transformer, directory: str | os.PathLike, split: str = "val", *, window: int,
                      stride: int, batch_size: int = 8, max_tokens: int | None = None,
                      progress: bool = False) -> dict[str, PerplexityResult]:
    """Perplexity of each domain of a prepared corpus (`mixtral data prepare`) in `split`, each domain's stream
    cut to its first `max_tokens` tokens if given, plus ALL ("all"), the token-weighted mean over the domains.

    Raises InputError for a missing or malformed corpus, or a split without tokens.
    """
    shards = TokenShards(directory, split)
    if not shards.domains:
        raise InputError(f"the {split} split of {directory} has no tokens")
    results = {}
    for domain in shards.domains:
        stream = shards.stream(domain)[:max_tokens]
        results[domain] = perplexity(model, stream, window, stride, batch_size, progress)
    results[ALL] = combine(results)
    return results


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of a file; raises InputError naming it when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path} as UTF-8 text: {e}") from e


def text_perplexity(model: Transformer, tokenizer, paths: Sequence[str | os.PathLike], *, window: int, stride: int,
                    batch_size: int = 8, max_tokens: int | None = None,
                    progress: bool = False) -> dict[str, PerplexityResult]:
    """Perplexity of each text file (tokenized with `tokenizer`, BOS first, cut to `max_tokens`), keyed by its path
    as given, plus ALL, the token-weighted mean. Raises InputError naming a file that cannot be read or is too
    short to score."""
    results = {}
    for path in paths:
        ids = tokenizer.encode(read_text(path))[:max_tokens]
        if len(ids) < 2:
            raise InputError(f"{path} has no text to score (it tokenizes to {len(ids)} token)")
        results[str(path)] = perplexity(model, ids, window, stride, batch_size, progress)
    results[ALL] = combine(results)
    return results

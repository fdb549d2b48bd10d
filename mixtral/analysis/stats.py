"""The statistics of the paper's section 5 and of expert offloading, on recorded routes (plain numpy).

Every function takes one layer's routes of a token stream:
    experts  [tokens, k] int   the chosen experts of each token, best first
    sequence [tokens]    int   which sequence (document window, or generation) each token belongs to; consecutive
                               tokens are a pair, and a cache starts cold, only within one sequence
and returns plain numbers, so each can be checked by hand on a built sequence (tests/test_analysis.py).

The random baselines are exact: they are what the statistic gives when every token picks k distinct experts
uniformly at random, independently of its neighbours.
"""
from __future__ import annotations

from math import comb

import numpy as np


def pairs(sequence: np.ndarray) -> np.ndarray:
    """Indices t such that tokens t and t + 1 are neighbours in one sequence. [pairs] int."""
    sequence = np.asarray(sequence)
    return np.flatnonzero(sequence[1:] == sequence[:-1])


def expert_shares(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """Share of all assignments (first and second choices alike, as in the paper's Figure 7) each expert got.
    [n_experts] float summing to 1 (zeros for no tokens)."""
    counts = np.bincount(np.asarray(experts).reshape(-1), minlength=n_experts).astype(np.float64)
    return counts / counts.sum() if counts.sum() else counts


def first_choice_repeat(experts: np.ndarray, sequence: np.ndarray) -> float:
    """Fraction of consecutive token pairs whose first-choice experts are the same (paper Table 5, "First
    choice"). NaN without pairs."""
    t = pairs(sequence)
    if len(t) == 0:
        return float("nan")
    return float(np.mean(experts[t, 0] == experts[t + 1, 0]))


def topk_repeat(experts: np.ndarray, sequence: np.ndarray) -> float:
    """Fraction of consecutive token pairs whose top-k sets share at least one expert (paper Table 5, "First or
    second choice" for k = 2). NaN without pairs."""
    t = pairs(sequence)
    if len(t) == 0:
        return float("nan")
    a, b = experts[t], experts[t + 1]
    return float(np.mean((a[:, :, None] == b[:, None, :]).any(axis=(1, 2))))


def random_first_choice_repeat(n_experts: int) -> float:
    """1 / n_experts: the next token's first choice is the same one with that chance."""
    return 1.0 / n_experts


def random_topk_repeat(n_experts: int, k: int) -> float:
    """1 - C(E - k, k) / C(E, k): the next token's k experts miss all k of this one's with chance C(E-k,k)/C(E,k).
    8 experts, top-2: 1 - 15/28 = 46.4%."""
    return 1.0 - comb(n_experts - k, k) / comb(n_experts, k)


def stack_distances(experts: np.ndarray, sequence: np.ndarray, n_experts: int) -> np.ndarray:
    """For every access (token by token, its k experts in order of choice), how many distinct other experts were
    used since this expert's last use in the sequence; n_experts for a first use (a cold miss).

    An LRU cache of c experts hits exactly the accesses with distance < c (Mattson et al. 1970), so one pass gives
    the hit rate of every cache size. [tokens * k] int.
    """
    out = np.empty(experts.size, dtype=np.int64)
    recency: list[int] = []  # most recent first
    previous = None
    for i, (row, seq) in enumerate(zip(experts.tolist(), np.asarray(sequence).tolist())):
        if seq != previous:
            recency, previous = [], seq
        for j, e in enumerate(row):
            if e in recency:
                out[i * len(row) + j] = recency.index(e)
                recency.remove(e)
            else:
                out[i * len(row) + j] = n_experts
            recency.insert(0, e)
    return out


def lru_hit_rates(experts: np.ndarray, sequence: np.ndarray, n_experts: int) -> np.ndarray:
    """Hit rate of an LRU cache holding c = 1 .. n_experts experts of this layer (cold at each sequence's start).
    [n_experts] float: entry c - 1 is the cache of c experts."""
    distances = stack_distances(experts, sequence, n_experts)
    return np.array([np.mean(distances < c) for c in range(1, n_experts + 1)])


def random_lru_hit_rate(n_experts: int, k: int, capacity: int) -> float:
    """Steady-state LRU hit rate of a cache of `capacity` experts under uniform random top-k routing.

    When a token asks for its j-th expert (j = 0 .. k-1), its j earlier ones are the most recent entries and the
    other capacity - j entries are a uniformly random subset of the E - j other experts (the order of past uses is
    a random permutation, independent of this token), so the j-th access hits with chance
    max(capacity - j, 0) / (E - j). The rate is the mean over j.
    """
    return float(np.mean([max(capacity - j, 0) / (n_experts - j) for j in range(k)]))


def prediction_recall(predicted: np.ndarray, experts: np.ndarray) -> float:
    """Mean over tokens of |predicted ∩ actual| / k: the share of a layer's real top-k that a guess of k experts
    made beforehand got right. Both [tokens, k]."""
    if len(experts) == 0:
        return float("nan")
    hits = (predicted[:, :, None] == experts[:, None, :]).any(axis=2)
    return float(hits.mean())


def random_prediction_recall(n_experts: int, k: int) -> float:
    """k / n_experts: each of the real k experts is among k random guesses with that chance."""
    return k / n_experts


def prefetch_lru(experts: np.ndarray, predicted: np.ndarray | None, sequence: np.ndarray,
                 capacity: int) -> dict[str, float]:
    """Simulate one layer's expert cache of `capacity` experts with LRU eviction, optionally with prefetching.

    Per token: first the `predicted` experts (a guess made one layer earlier; None: no prefetch) that are not
    cached are loaded, as the most recent entries, best guess last; then the token's real experts are used, best
    first, each a hit if cached, else loaded on demand. A prefetched expert the token does not use was loaded in
    vain (it may still hit for a later token: that counts as a hit then, not as a saving now).

    Returns per-token averages: `hit_rate` (share of real accesses found in the cache), `demand_loads`,
    `prefetch_loads`, `wasted_loads` (prefetched this token and not used by it), all in experts per token.
    """
    recency: list[int] = []
    previous = None
    hits = demand = prefetched = wasted = 0
    seqs = np.asarray(sequence).tolist()
    guesses = predicted.tolist() if predicted is not None else [()] * len(seqs)
    for row, guess, seq in zip(experts.tolist(), guesses, seqs):
        if seq != previous:
            recency, previous = [], seq
        loaded_now = []
        for e in reversed(guess):  # best guess last: it ends up most recent
            if e in recency:
                recency.remove(e)
            else:
                prefetched += 1
                loaded_now.append(e)
            recency.insert(0, e)
            del recency[capacity:]
        wasted += sum(e not in row for e in loaded_now)
        for e in row:
            if e in recency:
                hits += 1
                recency.remove(e)
            else:
                demand += 1
            recency.insert(0, e)
            del recency[capacity:]
    n = max(len(seqs), 1)
    accesses = max(experts.size, 1)
    return {"hit_rate": hits / accesses, "demand_loads": demand / n, "prefetch_loads": prefetched / n,
            "wasted_loads": wasted / n}


def token_consistency(tokens: np.ndarray, first_choice: np.ndarray, min_count: int = 5,
                      seed: int = 0) -> dict[str, float]:
    """How consistently one token id is routed across its contexts: over the token ids seen at least
    `min_count` times, the share of their occurrences that go to that id's most frequent first choice
    (occurrence-weighted). 1.0 means routing is a function of the token id alone.

    The baseline is the same statistic after shuffling the first choices across all occurrences (seeded): same
    token frequencies, same expert loads, routing independent of the token id. Returns {"consistency",
    "shuffled", "token_ids", "occurrences"}.
    """
    tokens = np.asarray(tokens)

    def modal_share(choices: np.ndarray) -> tuple[float, int, int]:
        ids, inverse, counts = np.unique(tokens, return_inverse=True, return_counts=True)
        keep = counts >= min_count
        if not keep.any():
            return float("nan"), 0, 0
        n_experts = int(choices.max()) + 1
        table = np.zeros((len(ids), n_experts), dtype=np.int64)
        np.add.at(table, (inverse, choices), 1)
        return float(table[keep].max(axis=1).sum() / counts[keep].sum()), int(keep.sum()), int(counts[keep].sum())

    consistency, n_ids, n_occ = modal_share(np.asarray(first_choice))
    shuffled = np.random.default_rng(seed).permutation(np.asarray(first_choice))
    return {"consistency": consistency, "shuffled": modal_share(shuffled)[0], "token_ids": n_ids,
            "occurrences": n_occ}


def pooled_lru(experts: np.ndarray, sequence: np.ndarray, slots: int | list[int],
               predicted: np.ndarray | None = None) -> dict[str, float]:
    """Simulate the offloading engine's pool of expert slots over all layers, in decoding order (each token through
    layers 0 .. L-1), with LRU eviction: `slots` an int is one pool shared by every layer (the engine's), a list
    one quota per layer, each layer evicting only among its own. experts [L, tokens, k]; predicted [L - 1,
    tokens, k] (optional): layer l's guess, made at layer l - 1, loaded just before layer l routes, best guess
    last (as `prefetch_lru`). The cache starts cold at each sequence's start. Unlike `prefetch_lru`, layers
    compete for slots: a layer's misses evict another's experts.

    Returns per-token averages over all layers: `hit_rate` (share of real accesses found in the pool),
    `demand_loads` and `prefetch_loads` (experts per token)."""
    from collections import OrderedDict

    n_layers = experts.shape[0]
    shared = isinstance(slots, int)
    quotas = [slots] if shared else list(slots)
    if not shared and len(quotas) != n_layers:
        raise ValueError(f"{len(quotas)} quotas for {n_layers} layers")
    pools: list[OrderedDict] = [OrderedDict() for _ in quotas]
    hits = demand = prefetched = 0
    previous = None
    rows = experts.tolist()
    guesses = predicted.tolist() if predicted is not None else None

    def touch(layer: int, e: int) -> bool:
        """Use (layer, e): True if it was in the pool; made most recent either way."""
        pool = pools[0 if shared else layer]
        key = (layer, e)
        found = key in pool
        if found:
            pool.move_to_end(key)
        else:
            pool[key] = None
            if len(pool) > quotas[0 if shared else layer]:
                pool.popitem(last=False)
        return found

    for t, seq in enumerate(np.asarray(sequence).tolist()):
        if seq != previous:
            pools, previous = [OrderedDict() for _ in quotas], seq
        for layer in range(n_layers):
            if guesses is not None and layer > 0:
                for e in reversed(guesses[layer - 1][t]):
                    prefetched += not touch(layer, e)
            for e in rows[layer][t]:
                if touch(layer, e):
                    hits += 1
                else:
                    demand += 1
    n = max(experts.shape[1], 1)
    return {"hit_rate": hits / max(experts.size, 1), "demand_loads": demand / n, "prefetch_loads": prefetched / n}

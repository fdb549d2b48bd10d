"""`mixtral bench batch-invariant`: what the batch-invariant mode (`mixtral.batch_invariant`) costs, and whether a
row's logits in a batch are bitwise those it gets alone, with the mode off and on side by side.

A Mixtral-8x7B-shaped slice of --layers layers with random bf16 weights (dim 4096, hidden 14336, 8 experts top-2,
32 query heads on 8 key/value heads, the full vocabulary). Decoding: --rows rows with prompts of --prompt-tokens
tokens down to one fewer per row (so the batch pads), prefilled in one chunk, then --steps greedy decode steps
timed; tokens/s counts every row's token. Prefill: one prompt of --prefill-tokens tokens in one chunk. The two
settings alternate within each of --repeats rounds; each figure is the median. Last, for the last of --rows, how
many rows' logits after the first decode step equal (torch.equal) those of the same row run alone.

    mixtral bench batch-invariant
    mixtral bench batch-invariant --layers 2 --rows 1,16 --prefill-tokens 512
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from mixtral import kernels
from mixtral.batch_invariant import batch_invariant
from mixtral.cache import KVCache
from mixtral.config import from_name
from mixtral.generate import decode_step, prefill
from mixtral.model import Transformer, random_model

MODES = {"off": False, "on": True}


def _prompts(rows: int, tokens: int, vocab: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """ids [rows, tokens] and each row's length: tokens, tokens - 1, ... (at least 1)."""
    lengths = [max(1, tokens - r) for r in range(rows)]
    ids = torch.randint(3, vocab, (rows, tokens), generator=torch.Generator().manual_seed(seed))
    return ids, lengths


def _decode(model: Transformer, ids: torch.Tensor, lengths: list[int], steps: int) -> tuple[float, torch.Tensor]:
    """(seconds of `steps` greedy decode steps after a prefill and one untimed step, the logits of that first
    step [rows, vocab])."""
    cache = KVCache(model.config, len(ids), ids.shape[1] + steps + 1, max_chunk=ids.shape[1], dtype=torch.bfloat16)
    logits = prefill(model, cache, ids, lengths)
    first = decode_step(model, cache, logits.argmax(-1).tolist())
    logits = first
    start = time.perf_counter()
    for _ in range(steps):
        logits = decode_step(model, cache, logits.argmax(-1).tolist())
    return time.perf_counter() - start, first


def _prefill(model: Transformer, ids: torch.Tensor) -> float:
    cache = KVCache(model.config, 1, ids.shape[1], max_chunk=ids.shape[1], dtype=torch.bfloat16)
    start = time.perf_counter()
    prefill(model, cache, ids)
    return time.perf_counter() - start


@torch.inference_mode()
def run(*, layers: int = 1, rows: list[int] = (1, 4, 16), prompt_tokens: int = 16, steps: int = 4,
        prefill_tokens: int = 256, repeats: int = 3, seed: int = 0, preset: str = "mixtral-8x7b") -> dict:
    """Time decoding at each of `rows` rows and one prefill on a `layers`-layer slice of `preset`, mode off and on
    alternating, and count the rows equal alone at the last of `rows`; prints the table. Returns {"benchmark":
    "batch-invariant", "amx", "rows": [{"phase", "off_tokens_per_s", "on_tokens_per_s"}], "equal_alone": {"off",
    "on", "rows"}}."""
    config = dataclasses.replace(from_name(preset), n_layers=layers)
    print(f"building a {layers}-layer slice of {preset}, random bf16 weights ...", flush=True)
    model = random_model(config, seed=seed, dtype=torch.bfloat16)
    amx = kernels.policy().amx
    print(f"{layers} layer(s), bf16, {torch.get_num_threads()} threads, AMX: {'yes' if amx else 'no'}, gemv.c: "
          f"{'yes' if kernels.available() else 'no'}; median of {repeats} rounds, off and on alternating")
    phases = {f"decode, {n} row{'s' if n > 1 else ''}": n for n in rows}
    phases[f"prefill, {prefill_tokens} tokens"] = 0
    inputs = {name: _prompts(n, prompt_tokens, config.vocab_size, seed + n) for name, n in phases.items() if n}
    long_prompt = torch.randint(3, config.vocab_size, (1, prefill_tokens),
                                generator=torch.Generator().manual_seed(seed))
    seconds: dict[tuple[str, str], list[float]] = {(p, m): [] for p in phases for m in MODES}
    firsts: dict[str, torch.Tensor] = {}
    for round_ in range(repeats + 1):  # round 0 warms up (oneDNN builds its kernels per shape) and is dropped
        for phase, n in phases.items():
            for mode, enabled in MODES.items():
                with batch_invariant(enabled):
                    if n:
                        spent, firsts[mode] = _decode(model, *inputs[phase], steps)
                    else:
                        spent = _prefill(model, long_prompt)
                if round_:
                    seconds[(phase, mode)].append(spent)
    print(f"{'':<24} {'off tok/s':>10} {'on tok/s':>10} {'on/off':>7}")
    results = []
    for phase, n in phases.items():
        tokens = n * steps if n else prefill_tokens
        off, on = (tokens / statistics.median(seconds[(phase, m)]) for m in MODES)
        print(f"{phase:<24} {off:>10.2f} {on:>10.2f} {on / off:>7.2f}", flush=True)
        results.append({"phase": phase, "off_tokens_per_s": off, "on_tokens_per_s": on})

    # The last decode phase's first-step logits (from the last round) against each of its rows alone.
    ids, lengths = inputs[list(inputs)[-1]]
    equal = {}
    for mode, enabled in MODES.items():
        with batch_invariant(enabled):
            alone = [_decode(model, ids[r:r + 1, :lengths[r]], lengths[r:r + 1], 0)[1][0] for r in range(len(ids))]
        equal[mode] = sum(torch.equal(firsts[mode][r], alone[r]) for r in range(len(ids)))
    print(f"rows of {len(ids)} whose logits equal the row alone (bitwise): off {equal['off']}/{len(ids)}, "
          f"on {equal['on']}/{len(ids)}")
    return {"benchmark": "batch-invariant", "amx": amx, "rows": results,
            "equal_alone": {**equal, "rows": len(ids)}}

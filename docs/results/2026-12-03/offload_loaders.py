"""The default model offloaded under a budget, in one process, alternating: LRU alone, LRU + prediction (before)
with one loader thread, and with two; 16-token prompt, 64 greedy tokens, 2 threads, two rounds.

    python docs/results/2026-12-03/offload_loaders.py 42MB /tmp/expert-files
"""
import functools
import sys
import time

import torch

import mixtral
from mixtral import offload
from mixtral.cache import KVCache
from mixtral.generate import decode_step, prefill

torch.set_num_threads(2)
budget, directory = sys.argv[1], sys.argv[2]
attach = offload.attach


def run(policy: str, loaders: int) -> tuple[float, float, float]:
    offload.attach = functools.partial(attach, loaders=loaders)  # what mixtral.load calls
    model = mixtral.load("default", progress=False, offload=budget, offload_policy=policy, offload_dir=directory)
    engine = model.offload_engine
    ids = torch.randint(1, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.config, 1, 100, max_chunk=16, dtype=model.tok_embeddings.weight.dtype)
    with torch.no_grad():
        logits = prefill(model, cache, ids)
        engine.drain()
        engine.reset_stats()
        start = time.perf_counter()
        for _ in range(64):
            logits = decode_step(model, cache, [int(logits[0].argmax())])
        seconds = time.perf_counter() - start
    stats = engine.stats()
    engine.close()
    return 64 / seconds, stats["demand_loads_per_step"], stats["bytes_read_per_step"] / 1e6


for round_ in range(2):
    for policy, loaders in (("lru", 1), ("lru+predict", 1), ("lru+predict", 2)):
        rate, demand, mb = run(policy, loaders)
        print(f"{budget} round {round_ + 1} {policy} loaders={loaders}: {rate:.1f} tok/s, {demand:.2f} demand "
              f"loads/token, {mb:.1f} MB/token", flush=True)

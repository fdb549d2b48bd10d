"""Decode tokens/s at batch 1 of an N-layer Mixtral-8x7B-shaped model with random weights, for each precision mix
given: 16-token prompt, 32 greedy tokens, 2 threads, best of 3 (the protocol of the llama.cpp script it was
compared with in docs/offloading.md).

    python docs/results/2026-12-03/slice_decode.py 2 int4 "experts=int3:g128,attention=int4,output=int8"
"""
import sys
import time

import torch

from mixtral import quant
from mixtral.cache import KVCache
from mixtral.config import from_name, with_overrides
from mixtral.generate import decode_step, prefill
from mixtral.io.loading import random_quantized

torch.set_num_threads(2)
config = with_overrides(from_name("mixtral-8x7b"), n_layers=int(sys.argv[1]))
for spec in sys.argv[2:]:
    model = random_quantized(config, quant.parse_quantize_option(spec), 0, torch.bfloat16)
    rates = []
    for _ in range(3):
        cache = KVCache(config, 1, 64, max_chunk=16, dtype=torch.bfloat16)
        with torch.no_grad():
            logits = prefill(model, cache, torch.arange(100, 116)[None])
            start = time.perf_counter()
            for _ in range(32):
                logits = decode_step(model, cache, [int(logits[0].argmax())])
            rates.append(32 / (time.perf_counter() - start))
    print(f"{spec}: decode {max(rates):.2f} tok/s (best of 3; all {', '.join(f'{r:.1f}' for r in rates)})",
          flush=True)
    del model

"""Full-depth Mixtral-8x7B (random weights, drawn and quantized in memory matrix by matrix) decoded at batch 1
with lowbit.c's GEMV exact and with int8 activations, alternating in one process: 16-token prompt, 16 greedy
tokens a round, 2 threads. The experts' fit does not change the speed, so the quick min-max fit is used.

    python docs/results/2026-12-03/int8_activations_ab.py 32 "experts=int3:g128:minmax,attention=int4,output=int8"
"""
import resource
import sys
import time

import torch

from mixtral import kernels, quant
from mixtral.cache import KVCache
from mixtral.config import from_name, with_overrides
from mixtral.generate import decode_step, prefill
from mixtral.io.loading import random_quantized

torch.set_num_threads(2)
config = with_overrides(from_name("mixtral-8x7b"), n_layers=int(sys.argv[1]))
start = time.perf_counter()
model = random_quantized(config, quant.parse_quantize_option(sys.argv[2]), 0, torch.bfloat16)
print(f"built {sys.argv[2]} in {time.perf_counter() - start:.0f} s", flush=True)
machine = kernels.policy()
ways = {"exact": machine.with_features(int8_dot=False), "int8": machine}
tokens = {}
for round_ in range(int(sys.argv[3]) if len(sys.argv) > 3 else 2):
    for name, policy in ways.items():
        cache = KVCache(config, 1, 64, max_chunk=16, dtype=torch.bfloat16)
        with torch.no_grad(), kernels.use_policy(policy):
            logits = prefill(model, cache, torch.arange(100, 116)[None])
            out, begin = [], time.perf_counter()
            for _ in range(16):
                out.append(int(logits[0].argmax()))
                logits = decode_step(model, cache, [out[-1]])
            rate = 16 / (time.perf_counter() - begin)
        tokens.setdefault(name, out)
        print(f"round {round_ + 1} {name}: {rate:.2f} tok/s", flush=True)
same = sum(a == b for a, b in zip(tokens["exact"], tokens["int8"]))
print(f"greedy tokens equal in {same} of 16; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")

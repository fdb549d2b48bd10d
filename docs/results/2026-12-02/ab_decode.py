"""A/B: decode tokens/s of batch 1 and 8 on a checkpoint, whichever mixtral is on sys.path.

    PYTHONPATH=<tree> python ab_decode.py CHECKPOINT LABEL
(run on `mixtral bench e2e --workdir DIR`'s 2-layer synthetic Mixtral-8x7B, alternating the two trees)"""
import statistics
import sys
import time

import torch

import mixtral

torch.set_num_threads(2)
model = mixtral.load(sys.argv[1], dtype="bfloat16", progress=False)
g = torch.Generator().manual_seed(0)
out = {}
for batch in (1, 8):
    prompts = torch.randint(0, 32000, (batch, 16), generator=g).tolist()
    mixtral.generate(model, prompts, 4, eos_id=None)  # warm-up
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        mixtral.generate(model, prompts, 1, eos_id=None)
        t1 = time.perf_counter()
        mixtral.generate(model, prompts, 25, eos_id=None)
        t2 = time.perf_counter()
        rates.append(batch * 24 / ((t2 - t1) - (t1 - t0)))
    out[batch] = round(statistics.median(rates), 1)
print(sys.argv[2], "decode tok/s", out, flush=True)

"""A/B: our MoE layer (Mixtral-8x7B shape, bf16) at 1, 4 and 16 tokens, weights from memory, in whichever mixtral
is on sys.path: `PYTHONPATH=<tree> python ab_moe.py LABEL`, alternating the two trees."""
import statistics
import sys
import time

import torch

from mixtral import kernels
from mixtral.moe import MoE

torch.set_num_threads(2)
with torch.device("meta"):
    moe = MoE(4096, 14336, 8, 2).to(torch.bfloat16)
moe = moe.to_empty(device="cpu").eval()
kernels.prefer_huge_pages(moe)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for p in moe.parameters():
        p.normal_(0, 0.02, generator=g)
flush = torch.ones(64 * 2**20)  # 256 MB, 8x the EPYC's L3
res = {}
for T in (1, 4, 16):
    x = torch.randn(1, T, 4096, generator=g).to(torch.bfloat16)
    times = []
    with torch.inference_mode():
        moe(x)
        for i in range(21):
            flush.sum()
            t = time.perf_counter()
            moe(x)
            times.append(time.perf_counter() - t)
    res[T] = round(statistics.median(times) * 1e3, 2)
print(sys.argv[1], res, flush=True)

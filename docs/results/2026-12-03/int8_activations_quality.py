"""What rounding x to int8 in the int3/int2 GEMV (lowbit.c's int8 way) costs in quality, on the bundled default
model: validation windows of the prepared corpus decoded one token at a time (the path that runs the GEMV),
perplexity and top-1 agreement with the bf16 model's logits, exact GEMV against int8 activations, per mix.

    python docs/results/2026-12-03/int8_activations_quality.py data/corpus 16 128
"""
import math
import sys

import torch
import torch.nn.functional as F

import mixtral
from mixtral import kernels, quant
from mixtral.bench.quant_accuracy import corpus_windows
from mixtral.cache import KVCache
from mixtral.generate import decode_step, prefill

torch.set_num_threads(2)
windows = corpus_windows(sys.argv[1], int(sys.argv[2]) * int(sys.argv[3]), int(sys.argv[3]))


@torch.no_grad()
def decoded_logits(model) -> torch.Tensor:
    """[windows, window - 1, vocab]: each window fed one token at a time after its first."""
    out = []
    for row in windows:
        cache = KVCache(model.config, 1, len(row), max_chunk=1, dtype=torch.bfloat16)
        steps = [prefill(model, cache, row[None, :1])]
        steps += [decode_step(model, cache, [int(t)]) for t in row[1:-1]]
        out.append(torch.cat(steps))
    return torch.stack(out)


def report(name, logits, ref):
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    top1 = (logits.argmax(-1) == ref.argmax(-1)).float().mean()
    print(f"{name:34s} ppl {math.exp(nll):8.3f}  top-1 vs bf16 {top1:.4f}", flush=True)


base = mixtral.load("default", dtype="bf16")
ref = decoded_logits(base)
report("bf16", ref, ref)
machine = kernels.policy()
for spec in ["experts=int3:g64,attention=int8,output=int8", "experts=int3:g128,attention=int8,output=int8",
             "experts=int2:g32,attention=int8,output=int8"]:
    model = quant.quantize(mixtral.load("default", dtype="bf16"), quant.parse_quantize_option(spec))
    for way, policy in (("exact", machine.with_features(int8_dot=False)), ("int8 activations", machine)):
        with kernels.use_policy(policy):
            report(f"{spec.split(',')[0]} {way}", decoded_logits(model), ref)

"""One pool of expert slots shared by all layers (the offloading engine's) against fixed per-layer quotas, simulated
on the default model's routes of validation windows of its corpus in decoding order (`stats.pooled_lru`): hit
rate and demand loads per token for pools of 6-36 of its 48 experts, LRU alone and with the next-layer prediction
made before the MoE update.

    python docs/results/2026-12-03/pool_sharing.py data/corpus 64 256
"""
import sys

import torch

import mixtral
from mixtral.analysis import stats
from mixtral.analysis.routes import record_sequences
from mixtral.bench.quant_accuracy import corpus_windows

torch.set_num_threads(2)
windows = corpus_windows(sys.argv[1], int(sys.argv[2]) * int(sys.argv[3]), int(sys.argv[3]))
model = mixtral.load("default", progress=False)
routes = record_sequences(model, windows.tolist(), [0] * len(windows), ["val"])
L, E = routes.n_layers, routes.n_experts
print(f"{routes.experts.shape[1]} tokens, {L} layers, {E} experts a layer, top-{routes.top_k}")


def quotas(total: int, first: int) -> list[int]:
    """`first` slots for layer 0, the rest split evenly over the others (remainder to the earliest)."""
    rest, extra = divmod(total - first, L - 1)
    return [first] + [rest + (i < extra) for i in range(L - 1)]


print("| slots | policy | shared pool | equal quotas | layer 0 twice the others |")
print("|---|---|---|---|---|")
for total in (6, 12, 18, 24, 36):
    equal = [total // L + (i < total % L) for i in range(L)]
    heavy = quotas(total, max(2, round(2 * total / (L + 1))))
    for name, predicted in (("LRU", None), ("LRU + predict before", routes.predicted.get("before"))):
        cells = []
        for slots in (total, equal, heavy):
            r = stats.pooled_lru(routes.experts, routes.sequence, slots, predicted)
            cells.append(f"{r['hit_rate']:.1%} ({r['demand_loads']:.2f})")
        print(f"| {total} | {name} | " + " | ".join(cells) + f" |  quotas {equal} / {heavy}", flush=True)

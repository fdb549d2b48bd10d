"""Expert ablation: held-out loss per domain when one expert of one layer is removed.

Removing expert e of layer l masks its router logit to -inf, so every token that would have chosen it takes its
next-best expert instead and the gate weights renormalise over the experts that remain (the layer stays a top-k
mixture; nothing else changes). The loss increase says how much the model leans on that expert, and for which
domains: the question behind the paper's Figure 7, asked of the model's outputs rather than of its router.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from mixtral.errors import InputError
from mixtral.model import Transformer


@contextmanager
def without_expert(model: Transformer, layer: int, expert: int) -> Iterator[None]:
    """Within the block, expert `expert` of layer `layer` is never chosen (its router logit is -inf)."""
    config = model.config
    if not 0 <= layer < config.n_layers or not 0 <= expert < config.n_experts:
        raise InputError(f"no expert {expert} in layer {layer}: the model has {config.n_layers} layers of "
                         f"{config.n_experts} experts")
    if config.n_experts - 1 < config.top_k:
        raise InputError(f"removing an expert leaves {config.n_experts - 1}, fewer than top_k={config.top_k}")

    def mask(module, args, logits):
        logits = logits.clone()
        logits[..., expert] = float("-inf")
        return logits

    handle = model.layers[layer].moe.router.register_forward_hook(mask)
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def domain_losses(model: Transformer, windows: Mapping[str, torch.Tensor], batch_size: int = 8) -> dict[str, float]:
    """Mean next-token cross-entropy (nats) per domain and over all ("all", token-weighted).

    windows: {domain: LongTensor [n, seq_len + 1]}; each row's first seq_len tokens predict its last seq_len.
    """
    totals, counts = {}, {}
    for domain, rows in windows.items():
        loss_sum, n = 0.0, 0
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            logits = model(chunk[:, :-1]).float()
            targets = chunk[:, 1:]
            loss_sum += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            n += targets.numel()
        totals[domain], counts[domain] = loss_sum, n
    out = {d: totals[d] / counts[d] for d in windows if counts[d]}
    out["all"] = sum(totals.values()) / max(sum(counts.values()), 1)
    return out


def ablate_experts(model: Transformer, windows: Mapping[str, torch.Tensor], layers: Sequence[int] | None = None,
                   batch_size: int = 8, progress: bool = False) -> dict:
    """Loss per domain of the full model and with each (layer, expert) removed in turn.

    Returns {"base": {domain: loss}, "ablated": [[{domain: loss} per expert] per layer in `layers`],
    "layers": layers}.
    """
    from tqdm import tqdm

    layers = list(range(model.config.n_layers)) if layers is None else list(layers)
    base = domain_losses(model, windows, batch_size)
    jobs = [(layer, e) for layer in layers for e in range(model.config.n_experts)]
    ablated: dict[int, list[dict]] = {layer: [] for layer in layers}
    for layer, e in tqdm(jobs, desc="ablation", unit="expert", disable=not progress):
        with without_expert(model, layer, e):
            ablated[layer].append(domain_losses(model, windows, batch_size))
    return {"base": base, "layers": layers, "ablated": [ablated[layer] for layer in layers]}

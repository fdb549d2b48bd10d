"""Recording what the routers decide: per layer and token, the top-k experts and their gate weights.

`RouteRecorder(model)` is a context manager that puts forward hooks on the model for as long as it is open and
takes them off after, so a model that is not being recorded runs exactly the code it always runs. While open it
collects, for every token each forward pass sees (a whole sequence, a prefill chunk, or one decoded token):

    tokens      the input ids (from the embedding's input)
    experts     [layers, tokens, k]  each MoE layer's chosen experts, best first
    weights     [layers, tokens, k]  their gate weights, Softmax(TopK(x · W_g))
    predicted   {"before", "after"} -> [layers - 1, tokens, k]: layer l+1's router applied to layer l's hidden
                state, for prefetching: "before" is the residual stream entering layer l's MoE (known as soon as
                layer l routes, a whole MoE layer ahead), "after" is layer l's output (one attention ahead)

`record_sequences` runs a model over token sequences and returns a `Routes`; `record_generation` records a live
greedy or sampled decode. `Routes.save`/`Routes.load` keep it in one compressed .npz (int8 experts, float16
weights, a JSON header).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from mixtral.errors import InputError
from mixtral.io.files import atomic_open
from mixtral.model import Transformer
from mixtral.moe import route

FORMAT = "mixtral-routes"
VERSION = 1


@dataclass
class Routes:
    """Recorded routes of a token stream made of sequences, each sequence of one domain."""
    tokens: np.ndarray  # [N] int32 token ids
    positions: np.ndarray  # [N] int32 position within its sequence
    sequence: np.ndarray  # [N] int32 which sequence a token belongs to
    domain: np.ndarray  # [N] int16 index into `domains`
    domains: list[str]
    experts: np.ndarray  # [layers, N, k] int
    weights: np.ndarray  # [layers, N, k] float
    n_experts: int
    predicted: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [layers - 1, N, k]
    meta: dict = field(default_factory=dict)  # model, dim, hidden_dim, ... (what the report needs to size experts)

    @property
    def n_layers(self) -> int:
        return self.experts.shape[0]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    def select(self, mask: np.ndarray) -> "Routes":
        """The tokens where `mask` [N] is True (e.g. one domain), everything else alike."""
        return Routes(self.tokens[mask], self.positions[mask], self.sequence[mask], self.domain[mask],
                      self.domains, self.experts[:, mask], self.weights[:, mask], self.n_experts,
                      {k: v[:, mask] for k, v in self.predicted.items()}, self.meta)

    def by_domain(self) -> dict[str, "Routes"]:
        """{domain: its tokens} for the domains that have tokens, in the order of `domains`."""
        return {d: self.select(self.domain == i) for i, d in enumerate(self.domains) if (self.domain == i).any()}

    def save(self, path: str | os.PathLike) -> None:
        """One compressed .npz, written atomically."""
        header = {"format": FORMAT, "version": VERSION, "domains": self.domains, "n_experts": self.n_experts,
                  "predicted": sorted(self.predicted), "meta": self.meta}
        arrays = {"tokens": self.tokens.astype(np.int32), "positions": self.positions.astype(np.int32),
                  "sequence": self.sequence.astype(np.int32), "domain": self.domain.astype(np.int16),
                  "experts": self.experts.astype(np.int8 if self.n_experts <= 127 else np.int16),
                  "weights": self.weights.astype(np.float16),
                  **{f"predicted_{k}": v.astype(np.int8 if self.n_experts <= 127 else np.int16)
                     for k, v in self.predicted.items()},
                  "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
        with atomic_open(path, "wb") as f:  # a file object: numpy adds ".npz" to a path without it
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Routes":
        """Read what `save` wrote; raises InputError naming the file if it is not a routes file."""
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(bytes(data["header"]).decode())
                if header.get("format") != FORMAT:
                    raise InputError(f"{path} is not a routes file (made by 'mixtral routes record')")
                if header.get("version") != VERSION:
                    raise InputError(f"{path} has routes format version {header.get('version')}; this reader "
                                     f"knows version {VERSION}")
                return cls(data["tokens"], data["positions"], data["sequence"], data["domain"], header["domains"],
                           data["experts"].astype(np.int64), data["weights"].astype(np.float32),
                           header["n_experts"],
                           {k: data[f"predicted_{k}"].astype(np.int64) for k in header["predicted"]},
                           header.get("meta", {}))
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise InputError(f"cannot read routes from {path}: {e}") from e


class RouteRecorder:
    """Forward hooks that collect every MoE layer's routing (and the next-layer predictions) while open.

    with RouteRecorder(model) as rec:
        model(ids)
    rec.tokens, rec.experts, rec.weights, rec.predicted: per forward call, in call order (see `arrays`).
    A row of padding in a batch is recorded too: the caller keeps the rows it wants (`record_sequences` does).
    """

    def __init__(self, model: Transformer, predict: bool = True):
        if not model.config.is_moe:
            raise InputError("the model is dense (one expert, no router): there are no routes to record")
        self.model = model
        self.predict = predict
        self.top_k = model.config.top_k
        self.handles: list = []
        self.calls: list[dict] = []  # one per forward: {"tokens": [B, T], "experts": [L] of [B*T, k], ...}

    def __enter__(self) -> "RouteRecorder":
        layers = self.model.layers
        self.handles.append(self.model.tok_embeddings.register_forward_pre_hook(self._on_tokens))
        for i, layer in enumerate(layers):
            self.handles.append(layer.moe.register_forward_hook(self._on_moe(i)))
            if self.predict and i + 1 < len(layers):
                self.handles.append(layer.ffn_norm.register_forward_pre_hook(self._on_hidden(i, "before")))
                self.handles.append(layer.register_forward_hook(self._on_block(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _on_tokens(self, module, args) -> None:
        n = len(self.model.layers)
        self.calls.append({"tokens": args[0].detach().cpu(), "experts": [None] * n, "weights": [None] * n,
                           "before": [None] * (n - 1), "after": [None] * (n - 1)})

    def _on_moe(self, i: int):
        def hook(module, args, output) -> None:
            _, routing = output
            weights, experts = route(routing.logits, self.top_k)
            self.calls[-1]["experts"][i] = experts.cpu()
            self.calls[-1]["weights"][i] = weights.cpu()
        return hook

    def _guess(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer i+1's top-k experts for hidden states h [..., dim], as its router would pick them from h."""
        nxt = self.model.layers[i + 1]
        x = nxt.ffn_norm(h.reshape(-1, h.shape[-1]))
        return torch.topk(nxt.moe.router(x.to(nxt.moe.router.weight.dtype)).float(), self.top_k, dim=-1)[1].cpu()

    def _on_hidden(self, i: int, name: str):
        def hook(module, args) -> None:
            self.calls[-1][name][i] = self._guess(i, args[0])
        return hook

    def _on_block(self, i: int):
        def hook(module, args, output) -> None:
            self.calls[-1]["after"][i] = self._guess(i, output[0])
        return hook


def record_sequences(model: Transformer, sequences: Sequence[Sequence[int]], domains: Sequence[int],
                     domain_names: Sequence[str], *, batch_size: int = 8, predict: bool = True,
                     progress: bool = False, meta: dict | None = None) -> Routes:
    """Run `model` over each token sequence (no cache, full causal attention) and record its routes.

    domains[i] indexes `domain_names` for sequence i. Sequences of a batch are right-padded; padding is not
    recorded (a causal model's real tokens never see it). Raises InputError for an empty sequence or one longer
    than the model's context.
    """
    from tqdm import tqdm

    limit = model.config.context_len
    for i, s in enumerate(sequences):
        if not 0 < len(s) <= limit:
            raise InputError(f"sequence {i} has {len(s)} tokens; it needs 1 to {limit} (the model's context)")
    device = model.tok_embeddings.weight.device
    parts: list[dict] = []
    with torch.inference_mode(), RouteRecorder(model, predict) as rec:
        for start in tqdm(range(0, len(sequences), batch_size), desc="routes", unit="batch", disable=not progress):
            batch = sequences[start:start + batch_size]
            longest = max(len(s) for s in batch)
            ids = torch.zeros(len(batch), longest, dtype=torch.long)
            for row, s in enumerate(batch):
                ids[row, :len(s)] = torch.as_tensor(list(s))
            model.trunk(ids.to(device))
            call = rec.calls.pop()
            real = (torch.arange(longest)[None, :] < torch.tensor([len(s) for s in batch])[:, None]).reshape(-1)
            parts.append(_take(call, real, [start + r for r, s in enumerate(batch) for _ in range(len(s))],
                               [p for s in batch for p in range(len(s))],
                               [domains[start + r] for r, s in enumerate(batch) for _ in range(len(s))]))
    return _routes(parts, domain_names, model, meta)


def record_generation(model: Transformer, prompts: Sequence[Sequence[int]], domains: Sequence[int],
                      domain_names: Sequence[str], max_new_tokens: int, *, predict: bool = True,
                      meta: dict | None = None, **sampling) -> tuple[Routes, list[list[int]]]:
    """Record the routes of live decoding: each prompt (a sequence of its own, domain domains[i]) is prefilled and
    continued one token at a time through the KV cache, alone. Returns (routes of every prompt + its new tokens but
    the last one, the new token ids of each prompt).

    The last new token is never fed back to the model, so it has no routes. `sampling` as in
    `mixtral.generate` (temperature, top_p, seed, ...).
    """
    from mixtral.generate import generate

    parts, new = [], []
    for i, prompt in enumerate(prompts):
        with RouteRecorder(model, predict) as rec:
            new.append(generate(model, [list(prompt)], max_new_tokens, **sampling)[0])
        position = 0
        for call in rec.calls:
            n = call["tokens"].numel()
            parts.append(_take(call, torch.ones(n, dtype=torch.bool), [i] * n, list(range(position, position + n)),
                               [domains[i]] * n))
            position += n
    return _routes(parts, domain_names, model, meta), new


def _take(call: dict, real: torch.Tensor, sequence: list[int], positions: list[int], domains: list[int]) -> dict:
    """The rows of one recorded forward call where `real` [B*T] is True, as numpy arrays."""
    out = {"tokens": call["tokens"].reshape(-1)[real].numpy(), "sequence": np.asarray(sequence),
           "positions": np.asarray(positions), "domain": np.asarray(domains),
           "experts": np.stack([e[real].numpy() for e in call["experts"]]),
           "weights": np.stack([w[real].numpy() for w in call["weights"]])}
    for name in ("before", "after"):
        if call[name] and all(p is not None for p in call[name]):
            out[name] = np.stack([p[real].numpy() for p in call[name]])
    return out


def _routes(parts: list[dict], domain_names: Sequence[str], model: Transformer, meta: dict | None) -> Routes:
    c = model.config
    cat = lambda key, axis=0: np.concatenate([p[key] for p in parts], axis=axis)  # noqa: E731
    predicted = {name: cat(name, 1) for name in ("before", "after") if parts and all(name in p for p in parts)}
    info = {"dim": c.dim, "hidden_dim": c.hidden_dim, "n_layers": c.n_layers, "top_k": c.top_k,
            "expert_bytes_bf16": 3 * c.dim * c.hidden_dim * 2, **(meta or {})}
    return Routes(cat("tokens"), cat("positions"), cat("sequence"), cat("domain"), list(domain_names),
                  cat("experts", 1), cat("weights", 1), c.n_experts, predicted, info)

"""Running a Mixtral whose experts do not fit in memory: the experts stay in per-layer files on disk
(`mixtral.io.experts`) and an engine (`engine.Engine`) reads the ones routing asks for into a pool of memory slots,
with an LRU cache and a predicting background loader. `plan` chooses precisions and a slot budget for a machine.

    model = strip_experts(model)                      # or built without them (`mixtral.io.checkpoint.drop_experts`)
    with attach(model, files, budget_bytes=2 << 30) as engine:
        mixtral.generate.generate(model, prompts, 64)
        print(engine.stats())
"""
from __future__ import annotations

import os
from pathlib import Path

from mixtral.errors import InputError
from mixtral.io.checkpoint import drop_experts
from mixtral.io.experts import ExpertFile, file_name, open_expert_files, write_layer_experts
from mixtral.model import Transformer
from mixtral.offload.engine import COUNTERS, POLICIES, PREDICT, Engine, check_files

__all__ = ["COUNTERS", "POLICIES", "PREDICT", "Engine", "attach", "min_budget", "open_expert_files",
           "strip_experts", "write_expert_files"]


def attach(model: Transformer, expert_files: list[ExpertFile], budget_bytes: int, *, policy: str = "lru+predict",
           predict: str = "before", loaders: int = 1, prefetch_limit: int | None = None,
           staged: bool = False) -> Engine:
    """Run `model`'s MoE layers from `expert_files` (one `ExpertFile` per layer, in order; the engine owns them and
    closes them) through a pool of `budget_bytes` of expert slots: budget_bytes // record_bytes slots, at most
    every expert of the model. The model's own expert weights are not used (drop them with `strip_experts` to
    free their memory). policy: one of POLICIES; predict: "before" or "after" (for "lru+predict"); loaders:
    background reading threads; prefetch_limit: most experts predicted per layer (default: the pool's share per
    layer, at least top_k). The slots live where the model does: on a GPU (the model moved there first) they are
    device memory filled through pinned host buffers (the engine's docstring); staged=True takes that path on the
    CPU too. Returns the Engine (a context manager; `close()` detaches it).

    Raises InputError for an unknown policy or predict, a dense model, a file count that is not the layer count,
    or a budget below `min_budget` (top_k slots: one token's experts in one layer; a batch whose experts do not
    fit runs in rounds); CheckpointError naming a file that does not fit the model."""
    if policy not in POLICIES:
        raise InputError(f"unknown offloading policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if predict not in PREDICT:
        raise InputError(f"unknown prediction point {predict!r}; choose one of {', '.join(PREDICT)}")
    if loaders < 1:
        raise InputError(f"offloading needs at least one loader thread, got {loaders}")
    check_files(model, expert_files)
    needed = min_budget(model, expert_files)
    if budget_bytes < needed:
        record = max(f.record_bytes for f in expert_files)
        raise InputError(f"an expert budget of {budget_bytes} bytes holds {budget_bytes // record} expert slots of "
                         f"{record} bytes; at least {model.config.top_k} (one token's experts in one layer) are "
                         f"needed: give at least {needed} bytes")
    return Engine(model, expert_files, budget_bytes, policy=policy, predict=predict, loaders=loaders,
                  prefetch_limit=prefetch_limit, staged=staged)


def min_budget(model: Transformer, expert_files: list[ExpertFile]) -> int:
    """The smallest budget `attach` takes: top_k slots of the largest record."""
    return model.config.top_k * max(f.record_bytes for f in expert_files)


def strip_experts(model: Transformer) -> Transformer:
    """Remove the expert weights of every MoE layer of `model` (in place: on the meta device before allocation,
    or freeing them afterwards), for a model whose experts `attach` serves from files. Returns `model`."""
    drop_experts(model)
    return model


def write_expert_files(model: Transformer, directory: str | os.PathLike) -> list[Path]:
    """Write each layer's experts of a resident `model` to `directory`/layer-NNN.experts (created if needed; each
    file atomically). Returns the paths, layer by layer. Raises InputError for a model without its experts."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, layer in enumerate(model.layers):
        if layer.moe.w13 is None:
            raise InputError("write_expert_files needs a model that holds its experts (this one was stripped)")
        paths.append(write_layer_experts(directory / file_name(i), layer.moe.w13, layer.moe.w2, layer=i))
    return paths

"""Generation and serving with the experts spread over processes (`torchrun ... mixtral generate|chat|serve
--parallel.ep E`).

Every rank loads its share of the experts, experts [lo, hi) of each layer (quantized or not), reading the
checkpoint one layer's experts at a time (`load_checkpoint`'s experts_sink), so no rank ever holds all of them.
Rank 0 also keeps the rest of the model and runs the command as one process would: it tokenizes, runs the
engine, samples, prints or serves HTTP. Its MoE layers' `offload` hook is `RemoteExperts`: at each layer the
tokens and their routing go to the other ranks, each adds its experts' gated outputs, and a reduce sums them on
rank 0 (`mixtral.parallel.experts`). The other ranks wait in `follow` until rank 0 is done.

Memory: a follower builds the model without its experts while loading (the loader's skeleton) and frees it once
its experts are read; a preset, or a checkpoint saved quantized, is loaded whole first on every rank and then cut.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from mixtral.errors import InputError
from mixtral.io.checkpoint import load_checkpoint
from mixtral.io.loading import inspect_model, is_preset, load, resolve_model, resolve_tokenizer
from mixtral.io.quantized import read_quantization_config
from mixtral.model import Transformer
from mixtral.parallel.experts import (ExpertChannel, RemoteExperts, expert_range, follow, select_experts,
                                      stop_followers)
from mixtral.parallel.mesh import Mesh, collective_failed, init, is_collective_failure, shutdown

log = logging.getLogger("mixtral")


def load_experts(model: str, mesh: Mesh, *, dtype: torch.dtype | None = None, quantize=None,
                 progress: bool = False) -> tuple[Transformer, list[tuple[object, object]], int]:
    """(the model without its experts, this rank's experts [lo, hi) of each layer as (w13, w2), lo).

    Raises InputError for a dense model with ep > 1, or an ep that does not divide the model's experts."""
    path = resolve_model(model)
    config, _ = inspect_model(model)
    if not config.is_moe and mesh.ep > 1:
        raise InputError(f"--parallel.ep is {mesh.ep} but {model} is dense (n_experts = 1): there are no experts "
                         f"to spread")
    try:
        lo, hi = expert_range(config.n_experts, mesh.ep, mesh.ep_rank)
    except ValueError as e:
        raise InputError(str(e).replace("parallel.ep", "--parallel.ep")) from None
    if is_preset(path) or read_quantization_config(Path(path)) is not None:
        skeleton = load(path, dtype=dtype, quantize=quantize, progress=progress)
        layers = [(select_experts(layer.moe.w13, lo, hi), select_experts(layer.moe.w2, lo, hi))
                  for layer in skeleton.layers]
        for layer in skeleton.layers:
            layer.moe.w13 = layer.moe.w2 = None
        return skeleton, layers, lo
    parts: dict[int, tuple[object, object]] = {}

    def keep(layer: int, w13, w2) -> None:  # the loader hands over each layer's whole stacks, then frees them
        parts[layer] = (select_experts(w13, lo, hi), select_experts(w2, lo, hi))

    skeleton = load_checkpoint(path, dtype=dtype, quantize=quantize, progress=progress, experts_sink=keep)
    return skeleton, [parts[i] for i in range(config.n_layers)], lo


def run(model: str, ep: int, command: Callable[[Transformer, object], int], *, tokenizer: str | None = None,
        dtype: torch.dtype | None = None, quantize=None, progress: bool = False, timeout: float = 300.0) -> int:
    """Join the torchrun world of `ep` processes; on rank 0 run `command(model, tokenizer)` with the experts of
    the other ranks behind each MoE layer and return its exit code, on the others serve their experts until it
    is done and return 0. The process group is left on the way out."""
    mesh = init(ep, 1, timeout=timeout)
    try:
        return _run(model, mesh, command, tokenizer, dtype, quantize, progress)
    except (RuntimeError, dist.DistError) as e:
        if not is_collective_failure(e):
            raise
        raise collective_failed(e, mesh.rank, timeout) from None
    finally:
        shutdown()


def _run(model: str, mesh: Mesh, command, tokenizer, dtype, quantize, progress) -> int:
    """`run` inside the process group."""
    tok = None
    if mesh.is_main:  # a missing tokenizer fails before the weights load
        config, files = inspect_model(model)
        tok, note = resolve_tokenizer(tokenizer, model, config, files)
        if note:
            log.warning(note)
    skeleton, layers, lo = load_experts(model, mesh, dtype=dtype, quantize=quantize, progress=progress)
    config = skeleton.config
    activations = skeleton.tok_embeddings.weight.dtype
    channel = ExpertChannel(mesh.ep_group, range(mesh.size), config.dim, config.top_k, activations)
    if not mesh.is_main:
        del skeleton  # a follower needs only its experts
        follow(channel, layers, lo, config.n_experts)
        return 0
    for i, layer in enumerate(skeleton.layers):
        layer.moe.offload = RemoteExperts(channel, i, *layers[i], lo, config.n_experts)
    try:
        return command(skeleton, tok)
    finally:
        try:
            stop_followers(channel)
        except (RuntimeError, dist.DistError):
            pass  # a follower is gone: the error that says so is already on its way out

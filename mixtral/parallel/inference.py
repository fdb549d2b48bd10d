"""Generation and serving with the experts spread over processes (`torchrun ... mixtral generate|chat|serve
--parallel.ep E`).

Every rank loads its share of the experts, experts [lo, hi) of each layer (quantized or not), so that a model too
large for one machine runs on several. Rank 0 also keeps the rest of the model and runs the command as one process
would: it tokenizes, runs the engine, samples, prints or serves HTTP. Its MoE layers' `offload` hook is
`RemoteExperts`: at each layer the tokens and their routing go to the other ranks, each adds its experts' gated
outputs, and a reduce sums them on rank 0 (`mixtral.parallel.experts`). The other ranks wait in `follow` until
rank 0 is done.

What a rank holds while loading, by source:
- a float checkpoint (with or without --quantize): the model without its experts, plus one layer's experts at a
  time (`load_checkpoint`'s experts_sink hands each layer's whole stacks to `select_experts`, then frees them);
- a quantized checkpoint (format 2, `mixtral quantize`): the model without its experts, plus its own experts'
  records of each layer's file, and nothing of the others';
- a preset: drawn a matrix at a time with each layer's experts handed over as from a checkpoint (the same numbers
  as one process draws, since every rank draws them all from the same seed);
- a quantized checkpoint of format 1 (experts inside model.safetensors): the whole model, then cut.
Followers free the model without experts once loaded: they keep only their experts.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from mixtral import quant
from mixtral.config import ModelConfig
from mixtral.errors import InputError
from mixtral.io.checkpoint import load_checkpoint
from mixtral.io.loading import (check_saved, inspect_model, is_preset, notes, random_quantized, random_weights_note,
                                resolve_model, resolve_tokenizer)
from mixtral.io.quantized import load_quantized, open_expert_files, read_quantization_config, saved_settings
from mixtral.model import Transformer
from mixtral.parallel.experts import (ExpertChannel, RemoteExperts, expert_range, follow, patient_group,
                                      select_experts, stop_followers)
from mixtral.parallel.mesh import DistributedError, Mesh, failures_named, init, launched

log = logging.getLogger("mixtral")

Experts = list[tuple[object, object]]  # (w13, w2) of each layer: float stacks or quant.QuantizedExperts
T = TypeVar("T")


def check_layout(config: ModelConfig, ep: int, model: str) -> None:
    """Whether `config`'s experts can be spread over `ep` processes (`model` names it in the messages). Raises
    InputError for ep < 1, a dense model with ep > 1, or an ep that does not divide the model's experts."""
    if ep < 1:
        raise InputError(f"--parallel.ep must be at least 1, got {ep}")
    if ep > 1 and not config.is_moe:
        raise InputError(f"--parallel.ep is {ep} but {model} is dense (n_experts = 1): there are no experts to "
                         f"spread over processes")
    if config.n_experts % ep:
        raise InputError(f"--parallel.ep ({ep}) must divide the model's n_experts ({config.n_experts}) of {model}")


def load_experts(model: str, mesh: Mesh, *, dtype: torch.dtype | None = None, quantize=None,
                 progress: bool = False) -> tuple[Transformer, Experts, int]:
    """(the model without its experts: each MoE's w13 and w2 None; this rank's experts [lo, hi) of each layer as
    (w13, w2); lo). `model`: a checkpoint directory, "default" or a preset, as `mixtral.load` takes; the module
    docstring says what each source costs in memory.

    Raises InputError for a dense model with ep > 1, an ep that does not divide the model's experts, or a
    `quantize` a quantized checkpoint was not saved with; what `mixtral.load` raises for a bad checkpoint."""
    config, _ = inspect_model(model)
    check_layout(config, mesh.ep, model)
    lo, hi = expert_range(config.n_experts, mesh.ep, mesh.ep_rank)
    path = resolve_model(model)
    parts: dict[int, tuple[object, object]] = {}

    def keep(layer: int, w13, w2) -> None:  # the loader hands over each layer's whole stacks, then frees them
        parts[layer] = (select_experts(w13, lo, hi), select_experts(w2, lo, hi))

    if is_preset(path):
        skeleton = random_quantized(config, quantize or "none", 0, dtype or torch.float32, experts_sink=keep,
                                    progress=progress)
    elif read_quantization_config(Path(path)) is not None:
        check_saved(Path(path), quantize)
        if read_quantization_config(Path(path))["format_version"] == 1:
            skeleton = load_quantized(path, dtype=dtype)
            for i, layer in enumerate(skeleton.layers):
                keep(i, layer.moe.w13, layer.moe.w2)
                layer.moe.w13 = layer.moe.w2 = None
        else:
            skeleton = load_quantized(path, dtype=dtype, experts=False)
            _read_saved_experts(path, skeleton, range(lo, hi), parts)
    else:
        skeleton = load_checkpoint(path, dtype=dtype, quantize=quantize, progress=progress, experts_sink=keep)
    return skeleton, [parts[i] for i in range(config.n_layers)], lo


def _read_saved_experts(path, skeleton: Transformer, experts: range, parts: dict) -> None:
    """Fill parts[layer] with the experts `experts` of each layer's file of a quantized checkpoint (format 2)."""
    config = skeleton.config
    precision = saved_settings(path)["experts"]
    dtype = skeleton.tok_embeddings.weight.dtype
    for i, file in enumerate(open_expert_files(path, config)):
        with file:
            w13, w2 = quant.empty_experts(config, dtype, precision, n_experts=len(experts))
            file.read_stack_into(w13, w2, experts)
        for stack in (w13, w2):
            if isinstance(stack, quant.Quantized):
                stack.refresh()
        parts[i] = (w13, w2)


def run(model: str, ep: int, command: Callable[[Transformer, object], int], *, program: str = "generate",
        tokenizer: str | None = None, dtype: torch.dtype | None = None, quantize=None, max_memory=None,
        progress: bool = False, timeout: float = 300.0) -> int:
    """Join the torchrun world of `ep` processes; on rank 0 run `command(model, tokenizer)` with the experts of
    the other ranks behind each MoE layer and return its exit code, on the others serve their experts until it
    is done and return 0 (without printing). Rank 0 tells the others to stop however `command` ends (an error,
    Ctrl-C); the process group is left on the way out.

    program: the `mixtral` subcommand, for the messages. max_memory: must be None (offloading keeps the experts on
    disk, these processes keep them in memory). The other arguments are `mixtral.load_model_and_tokenizer`'s.
    Raises InputError for a bad `ep` (`check_layout`), `max_memory`, or a process that torchrun did not start
    (checked before anything loads, and the same on every rank); what loading raises, on the rank where it did,
    and DistributedError on the others, which stop with it; DistributedError when a peer does not join, dies or
    stalls past `timeout` seconds within a layer (the ranks wait for each other's loading without limit)."""
    if max_memory is not None and ep > 1:
        raise InputError("--max-memory and --parallel.ep do not combine: the processes of --parallel.ep hold the "
                         "experts in memory between them")
    check_layout(inspect_model(model)[0], ep, model)
    if not launched():
        raise InputError(f"--parallel.ep {ep} needs {ep} processes, and this one was not started by torchrun "
                         f"(RANK and WORLD_SIZE are unset): run `torchrun --nproc-per-node {ep} -m mixtral "
                         f"{program} ... --parallel.ep {ep}`")
    mesh = init(ep, 1, timeout=timeout)
    with failures_named(mesh.rank, timeout):
        return _run(model, mesh, command, tokenizer, dtype, quantize, progress)


def _run(model: str, mesh: Mesh, command, tokenizer, dtype, quantize, progress) -> int:
    """`run` inside the process group."""
    patient = patient_group(range(mesh.size))  # ranks may take very different times to load

    def resolve():  # on rank 0, so that a missing tokenizer fails before the weights load
        if not mesh.is_main:
            return None, None
        config, files = inspect_model(model)
        return resolve_tokenizer(tokenizer, model, config, files)

    tok, tokenizer_note = _together(mesh, patient, "finding the tokenizer", resolve)
    skeleton, layers, lo = _together(mesh, patient, "loading the model", lambda: load_experts(
        model, mesh, dtype=dtype, quantize=quantize, progress=progress and mesh.is_main))
    config = skeleton.config
    activations = skeleton.tok_embeddings.weight.dtype  # what flows between the layers, quantized or not
    channel = ExpertChannel(mesh.ep_group, range(mesh.size), config.dim, config.top_k, activations, patient)
    if not mesh.is_main:
        del skeleton  # a follower needs only its experts
        follow(channel, layers, lo, config.n_experts)
        return 0
    log.info("rank 0 of %d holds experts [%d, %d) of each layer and the rest of the model", mesh.ep, lo,
             lo + config.n_experts // mesh.ep)
    if is_preset(model):
        notes.warning(random_weights_note(model))
    if tokenizer_note:
        notes.warning(tokenizer_note)
    for i, layer in enumerate(skeleton.layers):
        layer.moe.offload = RemoteExperts(channel, i, *layers[i], lo, config.n_experts)
    try:
        return command(skeleton, tok)
    finally:
        try:
            stop_followers(channel)
        except (RuntimeError, dist.DistError):
            pass  # a follower is gone: the error that says so is already on its way out


def _together(mesh: Mesh, group, doing: str, step: Callable[[], T]) -> T:
    """step() on every rank, then one all-reduce over `group`: when it raised on any rank, every rank stops, that
    one with its own error and the others with a DistributedError naming it, instead of waiting for it in the next
    collective (on another machine, torchrun does not end them)."""
    try:
        result, error = step(), None
    except Exception as e:  # a bad file, a missing tokenizer, too little memory: the same to the other ranks
        result, error = None, e
    first = torch.tensor([mesh.rank if error is not None else mesh.size], dtype=torch.int64)
    dist.all_reduce(first, op=dist.ReduceOp.MIN, group=group)
    if error is not None:
        raise error
    if first.item() < mesh.size:
        raise DistributedError(f"rank {mesh.rank}: rank {first.item()} failed while {doing} (its error says why)")
    return result

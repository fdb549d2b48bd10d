"""The training loop: AdamW, warmup + cosine, clipping, bf16 autocast, gradient accumulation, validation per
domain, JSONL metrics, a PNG of the curves, and checkpoints that resume exactly.

    OUT/metrics.jsonl                      one JSON object a line: {"kind": "train", ...} or {"kind": "val", ...}
    OUT/curves.png                         train and validation loss, rewritten at each evaluation
    OUT/checkpoints/step_000200/           config.json + model.safetensors (Hugging Face layout, float32: what
                                           mixtral.load and transformers read) + trainer_state.pt + train_config.json

Exact resume: a batch is a pure function of (seed, step) (`TokenShards.batch`), the learning rate a pure function
of the step, and a checkpoint holds everything else that changes: the float32 weights, AdamW's moments and step
counts, and the torch, numpy and Python RNG states (the router jitter draws from torch's). A run killed at any
moment and resumed from its latest checkpoint logs the same losses, bit for bit in float32 on the CPU, as one that
was never interrupted (tests/test_train.py kills one with SIGKILL). A checkpoint is written into a temporary
directory that is renamed into place, so a checkpoint directory that exists is complete.

Under torchrun the same loop runs on every process of a (dp, ep) mesh (`mixtral.parallel`): the model is
parallelized after it is built, each process takes its rows of every batch, the auxiliary losses sum their
statistics over all processes, the logged values are the world's means, and rank 0 alone writes the metrics and
the plot. The losses and weights are those of one process within rounding (tests/test_parallel.py).

A non-finite loss or gradient norm stops the run with DivergedError naming the step, before the optimizer
touches the weights; no checkpoint is written after it, so the latest one is the last good state.
"""
from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol

import numpy as np
import torch
from tqdm import tqdm

from mixtral.errors import ConfigError, MixtralError
from mixtral.io.files import write_text
from mixtral.model import Transformer
from mixtral.train.checkpoints import (CONFIG_FILE, check_resumable, latest_checkpoint, load_checkpoint_state,
                                       save_checkpoint)
from mixtral.train.config import TrainConfig, TrainSection, dumps, from_dict
from mixtral.train.losses import Reduce, cross_entropy, load_balancing_loss, router_metrics, z_loss
from mixtral.train.metrics import append_metrics, plot_curves, truncate_metrics

if TYPE_CHECKING:
    from mixtral.parallel import Mesh

log = logging.getLogger("mixtral")




class DivergedError(MixtralError):
    """The loss or gradient norm became NaN or infinite."""


class Shards(Protocol):
    """What the trainer needs of a corpus: `mixtral.data.shards.TokenShards`."""
    domains: list[str]

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int,
              weights: dict[str, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def windows(self, domain: str, seq_len: int,
                max_windows: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


# ---- the pieces ------------------------------------------------------------------------------------------------

def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the system; returns whether it could.

    A training step allocates and frees the same few hundred MB every time. By default glibc serves blocks over
    128 KB (adaptively up to 32 MB) with fresh mmaps and trims the heap's top, so each step pays page faults on
    memory it just gave back: 160,000 faults a step, 12% of its time, measured on the 42.7M model on 2 cores.
    Blocks up to 32 MiB (glibc's ceiling for this setting) then come from the heap, which is never trimmed below
    what the run has used. Process-wide; harmless (returns False) where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 2 ** 31 - 1)
                and mallopt(m_top_pad, 256 << 20))


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup from 0 over warmup_steps, then a cosine from lr down to min_lr at the last step."""
    o, steps = config.optim, config.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, steps - o.warmup_steps)
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: Transformer, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on the matrices only (not norms, as in GPT-2 and Llama)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    o = config.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # A fused step takes plain tensors or DTensors of one mesh: a parallelized model (mixtral.parallel) has FSDP's
    # DTensors on two meshes (the world's, and the dp ranks' for the experts) or plain expert stacks, so each group
    # is split by the mesh of its parameters there.
    meshes = {id(getattr(p, "device_mesh", None)): getattr(p, "device_mesh", None) for p in params}
    if len(meshes) > 1:
        groups = [{**g, "params": kept} for g in groups for key in meshes
                  if (kept := [p for p in g["params"] if id(getattr(p, "device_mesh", None)) == key])]
    # fused: one pass over each parameter's state instead of one per arithmetic op; measured 14 ms against 87
    # (foreach) and 94 (per-tensor loop) a step for the 42.7M model on 2 CPU cores.
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)


def set_router_options(model: Transformer, config: TrainConfig) -> None:
    """Jitter, capacity and whether the router trains, on every MoE layer (dense layers have no router)."""
    for layer in model.layers:
        moe = layer.moe
        moe.router_jitter = config.router.jitter
        moe.capacity_factor = config.router.capacity_factor
        if moe.router is not None:
            moe.router.weight.requires_grad_(config.router.train)


def lm_loss(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor, aux_loss_coef: float,
            z_loss_coef: float, attention_mask: torch.Tensor | None = None,
            aux_loss_mode: str = "per-layer", reduce: Reduce = None) -> tuple[torch.Tensor, dict, list]:
    """(loss, parts, routing) of one batch: next-token cross-entropy plus the router's auxiliary losses.

    The auxiliary losses are on whenever the model has a router and their coefficient is not zero: the
    caller cannot forget to ask for router logits (a trainer that must ask for them trains without them by
    mistake). parts: {"ce", "lb", "z"} as tensors (lb/z None when off). reduce: in a distributed run, the sum
    over processes the auxiliary losses take their statistics through (`mixtral.train.losses.Reduce`).
    """
    h, routing = model.trunk(inputs)
    ce = cross_entropy(model.norm(h), model.output.weight, targets)
    loss, parts = ce, {"ce": ce, "lb": None, "z": None}
    logits = [r.logits for r in routing]
    if logits and aux_loss_coef > 0:
        parts["lb"] = load_balancing_loss(logits, model.config.top_k, attention_mask, aux_loss_mode, reduce)
        loss = loss + aux_loss_coef * parts["lb"]
    if logits and z_loss_coef > 0:
        parts["z"] = z_loss(logits, attention_mask, reduce)
        loss = loss + z_loss_coef * parts["z"]
    return loss, parts, routing


def autocast(config) -> "torch.autocast | nullcontext":
    """bf16 autocast on the run's device when its [train] dtype is bf16 (any config with a TrainSection)."""
    device = torch.device(config.train.device).type
    if config.train.torch_dtype() == torch.bfloat16:
        return torch.autocast(device, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(model: Transformer, val: Shards, config: TrainConfig) -> dict[str, dict[str, float]]:
    """Validation cross-entropy and perplexity per domain, over up to eval.max_windows windows of each.

    Returns {domain: {"loss", "ppl", "tokens"}} plus "all" (token-weighted over the domains). Eval mode: no jitter,
    no capacity dropping.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results, total, count = {}, 0.0, 0
    try:
        for domain in val.domains:
            windows = list(val.windows(domain, config.data.seq_len, config.eval.max_windows))
            loss_sum, tokens = 0.0, 0
            for start in range(0, len(windows), config.eval.batch_size):
                chunk = windows[start:start + config.eval.batch_size]
                inputs = torch.stack([w[0] for w in chunk]).to(device)
                targets = torch.stack([w[1] for w in chunk]).to(device)
                with autocast(config):
                    h, _ = model.trunk(inputs)
                    ce = cross_entropy(model.norm(h), model.output.weight, targets)
                loss_sum += ce.item() * targets.numel()
                tokens += targets.numel()
            if tokens:
                loss = loss_sum / tokens
                results[domain] = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": tokens}
                total += loss_sum
                count += tokens
    finally:
        model.train(was_training)
    if count:
        results["all"] = {"loss": total / count, "ppl": math.exp(min(total / count, 700.0)), "tokens": count}
    return results


# ---- the loop --------------------------------------------------------------------------------------------------

def train(config: TrainConfig, *, train_data: Shards | None = None, val_data: Shards | None = None,
          resume: bool = False, progress: bool | None = None) -> dict:
    """Run (or, with `resume`, continue) the training `config` describes. Returns the last train record.

    train_data/val_data: the corpora (default: `TokenShards(config.data.dir, "train"/"val")`). progress: draw the
    tqdm bar (None: when stderr is a terminal). The thread count and deterministic mode the config asks for hold
    during the run and are put back after it. Raises ConfigError/InputError for a bad config or corpus,
    CheckpointError for an unreadable checkpoint, DivergedError for a NaN/Inf loss.
    """
    with run_settings(config.train), distributed(config) as mesh:
        return _train(config, train_data, val_data, resume, progress, mesh)


@contextmanager
def distributed(config: TrainConfig) -> Iterator["Mesh | None"]:
    """The run's mesh under torchrun (`mixtral.parallel`), None for one process; the process group is left after
    the block. A collective that fails inside it (a peer died or stalled past parallel.timeout) becomes a
    DistributedError naming this rank."""
    from mixtral import parallel

    p = config.parallel
    if not parallel.launched():
        if p.ep > 1 or p.dp > 1:
            raise ConfigError(f"parallel.ep = {p.ep} and parallel.dp = {p.dp} need several processes: launch with "
                              f"torchrun --nproc-per-node {p.ep * max(p.dp, 1)} -m mixtral train ...")
        yield None
        return
    mesh = parallel.init(p.ep, p.dp or None, timeout=p.timeout, device=config.train.device)
    level = log.level
    if not mesh.is_main:
        log.setLevel(logging.WARNING)  # one copy of the run's messages, from rank 0
    try:
        with parallel.failures_named(mesh.rank, p.timeout):
            yield mesh
    finally:
        log.setLevel(level)


@contextmanager
def run_settings(t: TrainSection) -> Iterator[None]:
    """The thread count and deterministic mode a run's [train] section asks for, and glibc keeping freed memory
    (`keep_freed_memory`), inside the block; the thread count and deterministic mode are put back after it."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        keep_freed_memory()
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _train(config: TrainConfig, train_data: Shards | None, val_data: Shards | None, resume: bool,
           progress: bool | None, mesh: "Mesh | None") -> dict:
    from mixtral import parallel

    out = Path(config.out_dir)
    main = mesh is None or mesh.is_main  # the process that logs, plots and writes the metrics
    if mesh is not None and config.train.batch_size % mesh.size:
        raise ConfigError(f"train.batch_size ({config.train.batch_size}) must be a multiple of the number of "
                          f"processes ({mesh.size}): each reads an equal part of every batch")
    # The sum over every process that the auxiliary losses and router metrics take their statistics through.
    reduce = None if mesh is None else parallel.sum_over(mesh)
    model_config = config.model_config()
    tokenizer_file = None
    if train_data is None or val_data is None:
        from mixtral.data.shards import TokenShards

        train_data = train_data or TokenShards(config.data.dir, "train")
        val_data = val_data or TokenShards(config.data.dir, "val")
    manifest = getattr(train_data, "manifest", None) or {}
    n_words = manifest.get("tokenizer", {}).get("n_words")
    if n_words is not None and n_words > model_config.vocab_size:
        raise ConfigError(f"the corpus {config.data.dir} was tokenized with {n_words} tokens but the model's "
                          f"vocab_size is {model_config.vocab_size}; set model.vocab_size >= {n_words}")
    if manifest.get("tokenizer", {}).get("path"):
        tokenizer_file = Path(manifest["tokenizer"]["path"])

    existing = latest_checkpoint(out)
    if existing is not None and not resume:
        raise ConfigError(f"{out} already holds checkpoints (latest {existing.name}); pass --resume to continue "
                          f"that run, or choose another out_dir")
    device = torch.device(config.train.device)
    torch.manual_seed(config.train.seed)
    np.random.seed(config.train.seed)
    random.seed(config.train.seed)

    model = Transformer(model_config).init_weights(config.train.seed).to(device)
    model.train()
    set_router_options(model, config)
    if mesh is not None:
        parallel.parallelize(model, mesh, config.parallel.shard_experts)
    optimizer = make_optimizer(model, config)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    step = 0
    if existing is not None:
        saved = from_dict(json.loads((existing / CONFIG_FILE).read_text()), str(existing / CONFIG_FILE))
        changed = check_resumable(saved, config, existing)
        step = load_checkpoint_state(existing, model, optimizer, mesh)
        if main:
            truncate_metrics(metrics_path, step)
        log.info("resumed from %s (step %d)%s", existing, step, f"; changed: {', '.join(changed)}" if changed else "")
    else:
        if resume:
            log.info("no checkpoint in %s yet; starting at step 0", out)
        if main:
            metrics_path.write_text("")
    if main:
        for tmp in (out / "checkpoints").glob(".*.tmp") if (out / "checkpoints").is_dir() else []:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        write_text(out / "train_config.json", dumps(config))

    total, active = model_config.param_counts()
    r = config.router
    log.info("model: %.1fM parameters (%.1fM active), %s", total / 1e6, active / 1e6,
             "dense" if not model_config.is_moe else
             f"{model_config.n_experts} experts, top-{model_config.top_k}, router "
             f"{'trains' if r.train else 'frozen'}, load balancing {r.aux_loss_coef} ({r.aux_loss_mode}), "
             f"z-loss {r.z_loss_coef}, "
             f"jitter {r.jitter}, {f'capacity factor {r.capacity_factor}' if r.capacity_factor else 'dropless'}")
    if step >= config.train.steps:
        log.info("%s is already at step %d of %d; nothing to do", out, step, config.train.steps)

    t = config.train
    tokens_per_step = t.batch_size * t.grad_accum * config.data.seq_len
    last: dict = {}
    bar = tqdm(total=t.steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=True if not main else not progress if progress is not None else None)
    window_start, window_tokens = time.perf_counter(), 0
    try:
        while step < t.steps:
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            parts_sum: dict[str, float] = {}
            for micro in range(t.grad_accum):
                inputs, targets = train_data.batch(step * t.grad_accum + micro, t.batch_size, config.data.seq_len,
                                                   t.seed, config.data.weights)
                if mesh is not None:
                    inputs, targets = parallel.local_rows(inputs, mesh), parallel.local_rows(targets, mesh)
                inputs, targets = inputs.to(device), targets.to(device)
                with autocast(config):
                    loss, parts, routing = lm_loss(model, inputs, targets, config.router.aux_loss_coef,
                                                   config.router.z_loss_coef, aux_loss_mode=config.router.aux_loss_mode,
                                                   reduce=reduce)
                values = {key: v.detach() for key, v in (("loss", loss), *parts.items()) if v is not None}
                if mesh is not None:  # the world's means: what one process would log for the whole batch
                    values = parallel.mean_over(values, mesh)
                value = values["loss"].item()
                if not math.isfinite(value):
                    raise DivergedError(f"the loss is {value} at step {step + 1} (micro-batch {micro}); stopping "
                                        f"without a checkpoint. The last good state is "
                                        f"{latest_checkpoint(out) or 'the start (no checkpoint yet)'}: lower "
                                        f"optim.lr, keep optim.grad_clip on, or train in fp32")
                (loss / t.grad_accum).backward()
                for key, v in values.items():
                    parts_sum[key] = parts_sum.get(key, 0.0) + v.item() / t.grad_accum
            params = [p for p in model.parameters() if p.grad is not None]
            if mesh is not None:
                parallel.reduce_expert_grads(model, mesh)
                grad_norm = parallel.clip_grad_norm_(model, config.optim.grad_clip, mesh)
            elif config.optim.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip).item()
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
            if not math.isfinite(grad_norm):
                raise DivergedError(f"the gradient norm is {grad_norm} at step {step + 1}; stopping without a "
                                    f"checkpoint. The last good state is "
                                    f"{latest_checkpoint(out) or 'the start (no checkpoint yet)'}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_tokens += tokens_per_step
            bar.update(1)

            if step % t.log_every == 0 or step == t.steps:
                elapsed = time.perf_counter() - window_start
                record = {"kind": "train", "step": step, "tokens": step * tokens_per_step, **parts_sum, "lr": lr,
                          "grad_norm": grad_norm, "tokens_per_s": window_tokens / elapsed if elapsed > 0 else None}
                record.setdefault("lb", None)
                record.setdefault("z", None)
                layers = router_metrics(routing, reduce=reduce)  # the last micro-batch's
                if layers and main:
                    record["router"] = {"load": [m["load"] for m in layers],
                                        "entropy": [m["entropy"] for m in layers],
                                        "dropped": [m["dropped"] for m in layers]}
                if main:
                    append_metrics(metrics_path, record)
                bar.set_postfix(loss=f"{record['ce']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                last = record
                window_start, window_tokens = time.perf_counter(), 0

            is_last = step == t.steps
            if is_last or (config.eval.every and step % config.eval.every == 0):
                # Every process runs the same validation windows: the experts of each layer are spread over them.
                results = evaluate(model, val_data, config)
                if main:
                    append_metrics(metrics_path, {"kind": "val", "step": step, "tokens": step * tokens_per_step,
                                                  "domains": results})
                    summary = ", ".join(f"{d} {r['loss']:.3f} (ppl {r['ppl']:.1f})" for d, r in results.items())
                    bar.write(f"step {step}: val {summary}")
                    plot_curves(metrics_path, out / "curves.png")
                window_start = time.perf_counter()
            if is_last or (config.checkpoint.every and step % config.checkpoint.every == 0):
                path = save_checkpoint(out, step, model, optimizer, config, tokenizer_file, mesh)
                if main:
                    log.info("saved %s", path)
                window_start = time.perf_counter()
    finally:
        bar.close()
    return last if main else {}

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

A non-finite loss or gradient norm stops the run with DivergedError naming the step, before the optimizer
touches the weights; no checkpoint is written after it, so the latest one is the last good state.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
from tqdm import tqdm

from mixtral.errors import CheckpointError, ConfigError, MixtralError
from mixtral.io.checkpoint import load_checkpoint, save_hf
from mixtral.model import Transformer
from mixtral.train.config import TrainConfig, dumps, from_dict
from mixtral.train.losses import cross_entropy, load_balancing_loss, router_metrics, z_loss

log = logging.getLogger("mixtral")

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"
CHECKPOINT_NAME = re.compile(r"step_(\d+)")

# Keys a resumed run may change: how long it runs and how often it logs, evaluates and saves. Everything else
# must match the checkpoint's config, or the run it continues would not be the run it claims to be.
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "eval.every", "eval.max_windows", "eval.batch_size",
                     "checkpoint.every", "checkpoint.keep", "out_dir"}


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
    # fused: one pass over each parameter's state instead of one per arithmetic op; measured 14 ms against 87
    # (foreach) and 94 (per-tensor loop) a step for the 42.7M model on 2 CPU cores.
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)


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
            aux_loss_mode: str = "per-layer") -> tuple[torch.Tensor, dict, list]:
    """(loss, parts, routing) of one batch: next-token cross-entropy plus the router's auxiliary losses.

    The auxiliary losses are on whenever the model has a router and their coefficient is not zero (PITFALLS 3):
    the caller cannot forget to ask for router logits. parts: {"ce", "lb", "z"} as tensors (lb/z None when off).
    """
    h, routing = model.trunk(inputs)
    ce = cross_entropy(model.norm(h), model.output.weight, targets)
    loss, parts = ce, {"ce": ce, "lb": None, "z": None}
    logits = [r.logits for r in routing]
    if logits and aux_loss_coef > 0:
        parts["lb"] = load_balancing_loss(logits, model.config.top_k, attention_mask, aux_loss_mode)
        loss = loss + aux_loss_coef * parts["lb"]
    if logits and z_loss_coef > 0:
        parts["z"] = z_loss(logits, attention_mask)
        loss = loss + z_loss_coef * parts["z"]
    return loss, parts, routing


def autocast(config: TrainConfig):
    device = torch.device(config.train.device).type
    if config.train.dtype == "bf16":
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


# ---- RNG and checkpoints ---------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """torch, numpy and Python RNG states as tensors and plain lists (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, directory) of the complete checkpoints under OUT/checkpoints, oldest first."""
    root = Path(out_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = CHECKPOINT_NAME.fullmatch(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1][1] if found else None


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(out_dir: str | os.PathLike, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                    config: TrainConfig, tokenizer_file: Path | None = None) -> Path:
    """Write OUT/checkpoints/step_NNNNNN atomically (a temporary directory renamed into place); delete the
    checkpoints beyond the newest `checkpoint.keep`. Returns the directory."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_hf(model, tmp, dtype=torch.float32)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(dumps(config))
    if tokenizer_file is not None and tokenizer_file.is_file():
        # `mixtral generate --model CHECKPOINT` then finds the corpus's own tokenizer.
        name = "tokenizer.json" if tokenizer_file.suffix == ".json" else "tokenizer.model"
        shutil.copyfile(tokenizer_file, tmp / name)
    _fsync_tree(tmp)
    if final.exists():  # a checkpoint of the same step from an earlier, interrupted attempt
        shutil.rmtree(final)
    os.rename(tmp, final)
    for _, old in checkpoints(out_dir)[:-config.checkpoint.keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint_state(path: Path, model: Transformer, optimizer: torch.optim.Optimizer) -> int:
    """Restore weights, optimizer and RNG from checkpoint `path` into `model` and `optimizer`; returns its step."""
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file
        raise CheckpointError(f"{path / STATE_FILE}: cannot load trainer state ({e})") from None
    model.load_state_dict(load_checkpoint(path, dtype=torch.float32, progress=False).state_dict())
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return int(state["step"])


def check_resumable(saved: TrainConfig, config: TrainConfig, path: Path) -> list[str]:
    """The keys that differ between the checkpoint's config and this run's; ConfigError if any may not."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k != "weights":
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(saved.to_dict()), flat(config.to_dict())
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    forbidden = [k for k in changed if k not in RESUMABLE_CHANGES]
    if forbidden:
        detail = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in forbidden)
        raise ConfigError(f"cannot resume from {path}: the config differs in {detail} (only "
                          f"{', '.join(sorted(RESUMABLE_CHANGES))} may change); use another out_dir for a new run")
    return changed


# ---- metrics and the plot --------------------------------------------------------------------------------------

def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, skipping a last line cut short by a kill."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records up to `step` (what a resumed run continues from), atomically."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Train loss (cross-entropy) and validation loss per domain against the step, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    fig, (ax_loss, ax_aux) = plt.subplots(1, 2, figsize=(12, 4.5))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["ce"] for r in train], label="train", lw=1, alpha=0.8)
    for domain in sorted({d for r in val for d in r["domains"]}):
        points = [(r["step"], r["domains"][domain]["loss"]) for r in val if domain in r["domains"]]
        ax_loss.plot(*zip(*points), marker="o", ms=3, label=f"val {domain}", lw=2 if domain == "all" else 1)
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats)", title="loss")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    for key, label in (("lb", "load balancing"), ("z", "router z-loss")):
        points = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if points:
            ax_aux.plot(*zip(*points), label=label, lw=1)
    ax_aux.set(xlabel="step", title="router auxiliary losses")
    if ax_aux.lines:
        ax_aux.legend(fontsize=8)
    ax_aux.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path.with_name(png_path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


# ---- the loop --------------------------------------------------------------------------------------------------

def train(config: TrainConfig, *, train_data: Shards | None = None, val_data: Shards | None = None,
          resume: bool = False, progress: bool | None = None) -> dict:
    """Run (or, with `resume`, continue) the training `config` describes. Returns the last train record.

    train_data/val_data: the corpora (default: `TokenShards(config.data.dir, "train"/"val")`). progress: draw the
    tqdm bar (None: when stderr is a terminal). The thread count and deterministic mode the config asks for hold
    during the run and are put back after it. Raises ConfigError/InputError for a bad config or corpus,
    CheckpointError for an unreadable checkpoint, DivergedError for a NaN/Inf loss.
    """
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        if config.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        keep_freed_memory()
        return _train(config, train_data, val_data, resume, progress)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _train(config: TrainConfig, train_data: Shards | None, val_data: Shards | None, resume: bool,
           progress: bool | None) -> dict:
    out = Path(config.out_dir)
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
    optimizer = make_optimizer(model, config)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    step = 0
    if existing is not None:
        saved = from_dict(json.loads((existing / CONFIG_FILE).read_text()), str(existing / CONFIG_FILE))
        changed = check_resumable(saved, config, existing)
        step = load_checkpoint_state(existing, model, optimizer)
        truncate_metrics(metrics_path, step)
        log.info("resumed from %s (step %d)%s", existing, step, f"; changed: {', '.join(changed)}" if changed else "")
    else:
        if resume:
            log.info("no checkpoint in %s yet; starting at step 0", out)
        metrics_path.write_text("")
    for tmp in (out / "checkpoints").glob(".tmp-*") if (out / "checkpoints").is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    (out / "train_config.json").write_text(dumps(config))

    total, active = model_config.param_counts()
    r = config.router
    log.info("model: %.1fM parameters (%.1fM active), %s", total / 1e6, active / 1e6,
             "dense" if not model_config.is_moe else
             f"{model_config.n_experts} experts, top-{model_config.top_k}, router "
             f"{'trains' if r.train else 'frozen'}, load balancing {r.aux_loss_coef} ({r.aux_loss_mode}), z-loss {r.z_loss_coef}, "
             f"jitter {r.jitter}, {f'capacity factor {r.capacity_factor}' if r.capacity_factor else 'dropless'}")
    if step >= config.train.steps:
        log.info("%s is already at step %d of %d; nothing to do", out, step, config.train.steps)

    t = config.train
    tokens_per_step = t.batch_size * t.grad_accum * config.data.seq_len
    last: dict = {}
    bar = tqdm(total=t.steps, initial=step, desc="train", unit="step", disable=not progress if progress is not None
               else None, dynamic_ncols=True)
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
                inputs, targets = inputs.to(device), targets.to(device)
                with autocast(config):
                    loss, parts, routing = lm_loss(model, inputs, targets, config.router.aux_loss_coef,
                                                   config.router.z_loss_coef, aux_loss_mode=config.router.aux_loss_mode)
                value = loss.item()
                if not math.isfinite(value):
                    raise DivergedError(f"the loss is {value} at step {step + 1} (micro-batch {micro}); stopping "
                                        f"without a checkpoint. The last good state is "
                                        f"{latest_checkpoint(out) or 'the start (no checkpoint yet)'}: lower "
                                        f"optim.lr, keep optim.grad_clip on, or train in fp32")
                (loss / t.grad_accum).backward()
                for key, v in (("loss", loss), *parts.items()):
                    if v is not None:
                        parts_sum[key] = parts_sum.get(key, 0.0) + v.item() / t.grad_accum
            params = [p for p in model.parameters() if p.grad is not None]
            if config.optim.grad_clip > 0:
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
                layers = router_metrics(routing)  # the last micro-batch's
                if layers:
                    record["router"] = {"load": [m["load"] for m in layers],
                                        "entropy": [m["entropy"] for m in layers],
                                        "dropped": [m["dropped"] for m in layers]}
                _append(metrics_path, record)
                bar.set_postfix(loss=f"{record['ce']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                last = record
                window_start, window_tokens = time.perf_counter(), 0

            is_last = step == t.steps
            if is_last or (config.eval.every and step % config.eval.every == 0):
                results = evaluate(model, val_data, config)
                _append(metrics_path, {"kind": "val", "step": step, "tokens": step * tokens_per_step,
                                       "domains": results})
                summary = ", ".join(f"{d} {r['loss']:.3f} (ppl {r['ppl']:.1f})" for d, r in results.items())
                bar.write(f"step {step}: val {summary}")
                plot_curves(metrics_path, out / "curves.png")
                window_start = time.perf_counter()
            if is_last or (config.checkpoint.every and step % config.checkpoint.every == 0):
                path = save_checkpoint(out, step, model, optimizer, config, tokenizer_file)
                log.info("saved %s", path)
                window_start = time.perf_counter()
    finally:
        bar.close()
    return last


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")

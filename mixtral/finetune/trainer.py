"""The fine-tuning loops: SFT on conversations and DPO on preference pairs, with LoRA (over a float or quantized
frozen base) or full fine-tuning, on `mixtral train`'s machinery: the learning-rate schedule, AdamW, clipping, bf16
autocast, gradient accumulation, metrics.jsonl, checkpoints written atomically that resume exactly.

    OUT/metrics.jsonl                  {"kind": "train", ...} and {"kind": "val", ...} records
    OUT/curves.png                     the curves (SFT: loss; DPO: loss and preference accuracy)
    OUT/checkpoints/step_000050/       adapter_config.json + adapter_model.safetensors (LoRA), or the whole model
                                       (full fine-tuning, HF layout, float32); trainer_state.pt; finetune_config.json
    OUT/adapter/                       the final adapters (LoRA)
    OUT/adapter-peft/                  the same in PEFT's format, for transformers' Mixtral (`mixtral.finetune.peft`)
    OUT/model/                         the final model in the HF layout, adapters merged (float bases), with its
                                       tokenizer: `mixtral chat --model OUT/model`
    OUT/reference_logprobs.safetensors DPO with dpo.reference = "precomputed"

SFT: conversations packed into rows of data.seq_len (`finetune.data.pack`; each attends only within itself), the
loss the cross-entropy over the assistant's tokens. DPO: each pair's chosen and rejected replies after its prompt,
padded on the right (padding is never attended to by the tokens before it, and carries no target); the loss is
the sigmoid DPO loss against the reference: the same model with its adapters off, or log-probabilities computed
once before the first step.

Exact resume: a batch is a pure function of (seed, step), as in `mixtral train`, and a checkpoint holds what
trains, AdamW's state and the RNG states (LoRA dropout draws from torch's).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from tqdm import tqdm

from mixtral.errors import CheckpointError, ConfigError, InputError
from mixtral.finetune.config import FinetuneConfig, finetune_config_from_dict
from mixtral.finetune.data import Example, pack, read_conversations, read_jsonl
from mixtral.finetune.lora import WEIGHTS_FILE, adapters_off, apply_lora, merge_lora, save_adapters
from mixtral.finetune.losses import IGNORE, dpo_loss, sequence_logprobs, sft_loss
from mixtral.finetune.peft import save_peft
from mixtral.io.checkpoint import SafetensorsReader, TensorPlan, load_checkpoint, save_hf, write_safetensors
from mixtral.io.files import atomic_directory, write_text
from mixtral.io.loading import inspect_model, load, resolve_model, resolve_tokenizer
from mixtral.model import Transformer
from mixtral.train.checkpoints import (STATE_FILE, check_resumable, checkpoints, latest_checkpoint, rng_state,
                                       set_rng_state)
from mixtral.train.config import dumps
from mixtral.train.losses import cross_entropy, load_balancing_loss, z_loss
from mixtral.train.metrics import append_metrics, read_metrics, truncate_metrics
from mixtral.train.trainer import DivergedError, autocast, learning_rate, run_settings

log = logging.getLogger("mixtral")

MODES = ("sft", "dpo")
CONFIG_FILE = "finetune_config.json"
REFERENCE_FILE = "reference_logprobs.safetensors"


# ---- data --------------------------------------------------------------------------------------------------------

class Pair(NamedTuple):
    chosen: Example  # prompt + chosen reply + </s>; targets on the reply only
    rejected: Example


class Rows(NamedTuple):
    """A batch: ids and targets [rows, seq], the packed documents (SFT) and which tokens are real (not padding)."""
    ids: torch.Tensor
    targets: torch.Tensor
    documents: torch.Tensor | None
    real: torch.Tensor


def _reply(tokenizer, prompt: list[int], text: str, seq_len: int) -> tuple[Example, bool]:
    reply = tokenizer.encode(text, bos=False) + [tokenizer.eos_id]
    ids = prompt + reply
    targets = [IGNORE] * (len(prompt) - 1) + reply + [IGNORE]
    cut = len(ids) > seq_len
    return Example(ids[:seq_len], targets[:seq_len - 1] + [IGNORE] if cut else targets), cut


def read_pairs(path: str, tokenizer, seq_len: int) -> tuple[list[Pair], int]:
    """DPO's JSONL: {"messages": [... ending with a user turn], "chosen": str, "rejected": str} a line. Returns
    the pairs and how many were cut to seq_len. InputError "path:line: ..." for a bad line or chosen == rejected."""
    pairs, cut = [], 0
    for n, record in read_jsonl(path, ("messages", "chosen", "rejected")):
        chosen, rejected, messages = record["chosen"], record["rejected"], record["messages"]
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise InputError(f"{path}:{n}: chosen and rejected must be strings")
        if chosen.strip() == rejected.strip():
            raise InputError(f"{path}:{n}: chosen equals rejected ({chosen!r}): the pair prefers nothing")
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) \
                or messages[-1].get("role") != "user":
            raise InputError(f"{path}:{n}: messages must be a list of messages ending with a user turn (the "
                              f"prompt the chosen and rejected replies answer)")
        try:
            prompt = tokenizer.encode_chat(messages)
        except Exception as e:  # mistral-common's validation: roles out of order, empty content, ...
            raise InputError(f"{path}:{n}: {e}") from None
        (c, cut_c), (r, cut_r) = (_reply(tokenizer, prompt, text, seq_len) for text in (chosen, rejected))
        pairs.append(Pair(c, r))
        cut += cut_c or cut_r
    if not pairs:
        raise InputError(f"{path}: no preference pairs")
    return pairs, cut


def split_held_out(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded shuffle's last `fraction` (at least one item) held out."""
    if len(items) < 2:
        raise InputError(f"{len(items)} example(s) cannot be split into train and validation; give data.val")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    held = max(1, round(len(items) * fraction))
    return [items[i] for i in order[:-held]], [items[i] for i in order[-held:]]


def pad_rows(examples: Sequence[Example]) -> Rows:
    """Examples padded on the right to the longest (ids 0, targets IGNORE)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    real = torch.zeros(len(examples), width, dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        targets[i, :len(e.ids)] = torch.tensor(e.targets)
        real[i, :len(e.ids)] = True
    return Rows(ids, targets, None, real)


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def batch_indices(n: int, batch_size: int, index: int, seed: int) -> list[int]:
    """The items of micro-batch `index`: consecutive slices of one seeded permutation of the n items per epoch
    (every item once an epoch), a pure function of its arguments so that a resumed run sees the same batches."""
    picks = []
    for k in range(index * batch_size, (index + 1) * batch_size):
        epoch, at = divmod(k, n)
        picks.append(_permutation(n, seed, epoch)[at])
    return picks


# ---- the model ---------------------------------------------------------------------------------------------------

def prepare_model(config: FinetuneConfig, device: torch.device) -> Transformer:
    """The base model with what trains marked: adapters (LoRA), or every weight but the router (full)."""
    model = load(config.model.path, dtype=torch.float32, quantize=config.model.quantize, progress=False)
    if config.lora.rank > 0:
        apply_lora(model, config.lora.lora_config())
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(config.lora.train_router or ".router." not in f".{name}")
    return model.to(device).train()


def lm_outputs(model: Transformer, rows: Rows, with_logits: bool):
    """(h normed, logits or None, routing) of a batch."""
    h, routing = model.trunk(rows.ids, documents=rows.documents)
    h = model.norm(h)
    return h, model.output(h) if with_logits else None, routing


def router_losses(config: FinetuneConfig, model: Transformer, routing, real: torch.Tensor) -> dict:
    """Load balancing and z-loss over the real tokens, when the router trains (else none)."""
    logits = [r.logits for r in routing]
    if not (config.lora.train_router and logits):
        return {}
    r = config.router
    return {"lb": (r.aux_loss_coef, load_balancing_loss(logits, model.config.top_k, real, r.aux_loss_mode)),
            "z": (r.z_loss_coef, z_loss(logits, real))}


def sft_batch_loss(model: Transformer, rows: Rows) -> tuple[torch.Tensor, list]:
    """Cross-entropy over the learned tokens; the chunked one (no [tokens, vocab] logits) with a float head."""
    h, _, routing = lm_outputs(model, rows, with_logits=False)
    weight = getattr(model.output, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return cross_entropy(h, weight, rows.targets), routing
    return sft_loss(model.output(h), rows.targets), routing


def pair_logprobs(model: Transformer, pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor, list, Rows]:
    """Summed reply log-probabilities [pairs] of the chosen and the rejected replies, in one batch."""
    rows = pad_rows([p.chosen for p in pairs] + [p.rejected for p in pairs])
    rows = Rows(*(t.to(model.norm.weight.device) if t is not None else None for t in rows))
    _, logits, routing = lm_outputs(model, rows, with_logits=True)
    logp = sequence_logprobs(logits, rows.targets)
    return logp[:len(pairs)], logp[len(pairs):], routing, rows


# ---- the loop ----------------------------------------------------------------------------------------------------

def finetune(config: FinetuneConfig, mode: str, *, resume: bool = False, progress: bool | None = None) -> dict:
    """Run (or, with `resume`, continue) SFT (`mode` "sft") or DPO ("dpo") as `config` says. Returns the last
    train record. Raises ConfigError, InputError (naming file and line), CheckpointError, DivergedError."""
    if mode not in MODES:
        raise ConfigError(f"unknown fine-tuning mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "dpo" and config.lora.rank == 0 and config.dpo.reference != "precomputed":
        raise ConfigError("dpo.reference must be \"precomputed\" with full fine-tuning (lora.rank = 0): there are "
                          "no adapters to switch off")
    with run_settings(config.train):
        return _finetune(config, mode, resume, progress)


def _finetune(config: FinetuneConfig, mode: str, resume: bool, progress: bool | None) -> dict:
    out = Path(config.out_dir)
    existing = latest_checkpoint(out)
    if existing is not None and not resume:
        raise ConfigError(f"{out} already holds checkpoints (latest {existing.name}); pass --resume to continue "
                          f"that run, or choose another out_dir")
    t, device = config.train, torch.device(config.train.device)
    model_config, files = inspect_model(config.model.path)
    tokenizer, note = resolve_tokenizer(config.model.tokenizer, config.model.path, model_config, files)
    if note:
        log.warning(note)
    data = _read_data(config, mode, tokenizer)
    torch.manual_seed(t.seed)
    model = prepare_model(config, device)
    params = [p for p in model.parameters() if p.requires_grad]
    o = config.optim
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    step = 0
    if existing is not None:
        saved = finetune_config_from_dict(json.loads((existing / CONFIG_FILE).read_text()), str(existing / CONFIG_FILE))
        changed = check_resumable(saved, config, existing)
        step = _load_checkpoint(existing, model, optimizer, config)
        truncate_metrics(metrics_path, step)
        log.info("resumed from %s (step %d)%s", existing, step, f"; changed: {', '.join(changed)}" if changed else "")
    else:
        metrics_path.write_text("")
    for tmp in (out / "checkpoints").glob(".*.tmp") if (out / "checkpoints").is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    write_text(out / CONFIG_FILE, dumps(config))
    reference = _reference(config, model, data, out) if mode == "dpo" else None

    trained = sum(p.numel() for p in params)
    log.info("%s: %s, %.2fM of %.1fM parameters train, %d train / %d val %s", mode.upper(),
             f"LoRA rank {config.lora.rank}" if config.lora.rank else "full fine-tuning", trained / 1e6,
             sum(p.numel() for p in model.parameters()) / 1e6, len(data["train"]), len(data["val"]),
             "rows" if mode == "sft" else "pairs")
    last: dict = {}
    bar = tqdm(total=t.steps, initial=step, desc=mode, unit="step", dynamic_ncols=True,
               disable=not progress if progress is not None else None)
    window_start, window_tokens = time.perf_counter(), 0
    try:
        while step < t.steps:
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums: dict[str, float] = {}
            for micro in range(t.grad_accum):
                index = step * t.grad_accum + micro
                picks = batch_indices(len(data["train"]), t.batch_size, index, t.seed)
                with autocast(config):
                    loss, parts, tokens = _step_loss(config, mode, model, data["train"], picks, reference, "train")
                value = loss.item()
                if not math.isfinite(value):
                    raise DivergedError(f"the loss is {value} at step {step + 1}; stopping without a checkpoint "
                                        f"(the last good state is {latest_checkpoint(out) or 'the start'})")
                (loss / t.grad_accum).backward()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v / t.grad_accum
                window_tokens += tokens
            grad_norm = _clip(params, o.grad_clip)
            if not math.isfinite(grad_norm):
                raise DivergedError(f"the gradient norm is {grad_norm} at step {step + 1}; stopping without a "
                                    f"checkpoint (the last good state is {latest_checkpoint(out) or 'the start'})")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % t.log_every == 0 or step == t.steps:
                elapsed = time.perf_counter() - window_start
                last = {"kind": "train", "step": step, **sums, "lr": lr, "grad_norm": grad_norm,
                        "tokens_per_s": window_tokens / elapsed if elapsed > 0 else None,
                        "peak_rss_mb": peak_rss_mb()}
                append_metrics(metrics_path, last)
                bar.set_postfix(loss=f"{sums['loss']:.3f}", lr=f"{lr:.1e}")
                window_start, window_tokens = time.perf_counter(), 0
            is_last = step == t.steps
            if is_last or (config.eval.every and step % config.eval.every == 0):
                record = {"kind": "val", "step": step, **_evaluate(config, mode, model, data["val"], reference)}
                append_metrics(metrics_path, record)
                bar.write(f"step {step}: val " + ", ".join(f"{k} {v:.4f}" for k, v in record.items()
                                                            if isinstance(v, float)))
                _plot(metrics_path, out / "curves.png", mode)
                window_start = time.perf_counter()
            if is_last or (config.checkpoint.every and step % config.checkpoint.every == 0):
                log.info("saved %s", _save_checkpoint(out, step, model, optimizer, config))
                window_start = time.perf_counter()
    finally:
        bar.close()
    _export(config, model, out, tokenizer)
    return last


def _read_data(config: FinetuneConfig, mode: str, tokenizer) -> dict[str, list]:
    d, seed = config.data, config.train.seed
    if mode == "sft":
        train = read_conversations(d.train, tokenizer)
        val = read_conversations(d.val, tokenizer) if d.val else None
        if val is None:
            train, val = split_held_out(train, d.val_fraction, seed)
        order = _permutation(len(train), seed, -1)  # rows mix conversations from all over the file
        rows = {}
        for split, examples in (("train", [train[i] for i in order]), ("val", val)):
            packed = pack(examples, d.seq_len)
            if packed.truncated:
                log.warning("%d %s conversation(s) longer than data.seq_len = %d were cut", packed.truncated, split,
                            d.seq_len)
            real = packed.documents != len(examples)
            rows[split] = [Rows(packed.ids[i], packed.targets[i], packed.documents[i], real[i])
                           for i in range(len(packed.ids))]
        return rows
    train, cut = read_pairs(d.train, tokenizer, d.seq_len)
    if d.val:
        val, cut_val = read_pairs(d.val, tokenizer, d.seq_len)
        cut += cut_val
    else:
        train, val = split_held_out(train, d.val_fraction, seed)
    if cut:
        log.warning("%d pair(s) longer than data.seq_len = %d were cut", cut, d.seq_len)
    return {"train": train, "val": val}


def _stack(rows: Sequence[Rows], device: torch.device) -> Rows:
    return Rows(*(torch.stack([getattr(r, f) for r in rows]).to(device) for f in Rows._fields))


def _step_loss(config: FinetuneConfig, mode: str, model: Transformer, items: list, picks: list[int],
               reference: dict | None, split: str) -> tuple[torch.Tensor, dict[str, float], int]:
    """(loss to minimise, its parts as floats, real tokens) of the items `picks`."""
    device = model.norm.weight.device
    if mode == "sft":
        rows = _stack([items[i] for i in picks], device)
        loss, routing = sft_batch_loss(model, rows)
        parts = {"loss": loss.item()}
        real = rows.real
    else:
        chosen, rejected, routing, rows = pair_logprobs(model, [items[i] for i in picks])
        ref_chosen, ref_rejected = _reference_logprobs(config, model, items, picks, reference, split)
        chosen_tokens = (rows.targets[:len(picks)] != IGNORE).sum()
        result = dpo_loss(chosen, rejected, ref_chosen.to(device), ref_rejected.to(device), config.dpo.beta,
                          config.dpo.sft_weight, chosen_tokens)
        loss = result.loss
        parts = {"loss": loss.item(), "margin": result.margin.item(), "accuracy": result.accuracy.item(),
                 "chosen_reward": result.chosen_rewards.mean().item(),
                 "rejected_reward": result.rejected_rewards.mean().item()}
        real = rows.real
    for name, (coef, value) in router_losses(config, model, routing, real).items():
        loss = loss + coef * value
        parts[name] = value.item()
    return loss, parts, int(real.sum())


def _reference_logprobs(config, model, items, picks, reference, split) -> tuple[torch.Tensor, torch.Tensor]:
    if reference is not None:
        table = reference[split]
        return table[picks, 0], table[picks, 1]
    with torch.no_grad(), adapters_off(model):
        chosen, rejected, _, _ = pair_logprobs(model, [items[i] for i in picks])
    return chosen, rejected


@torch.no_grad()
def _reference(config: FinetuneConfig, model: Transformer, data: dict, out: Path) -> dict | None:
    """The starting model's log-probabilities [pairs, 2] of each split's pairs (dpo.reference = "precomputed"),
    computed once and kept in OUT/reference_logprobs.safetensors (a resumed run reads them back)."""
    if config.dpo.reference != "precomputed":
        return None
    path = out / REFERENCE_FILE
    if path.is_file():
        reader = SafetensorsReader(path)
        try:
            table = {split: reader.read(split) for split in ("train", "val")}
        finally:
            reader.close()
        if all(len(table[s]) == len(data[s]) for s in table):
            return table
        raise ConfigError(f"{path} holds log-probabilities of another data set; delete it or use another out_dir")
    was_training = model.training
    model.eval()
    table = {}
    for split in ("train", "val"):
        pairs, parts = data[split], []
        for start in tqdm(range(0, len(pairs), config.eval.batch_size), desc=f"reference {split}", leave=False):
            with autocast(config):
                chosen, rejected, _, _ = pair_logprobs(model, pairs[start:start + config.eval.batch_size])
            parts.append(torch.stack([chosen, rejected], dim=1).float().cpu())
        table[split] = torch.cat(parts)
    model.train(was_training)
    write_safetensors(path, [TensorPlan(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in table.items()],
                      {"format": "pt"})
    return table


@torch.no_grad()
def _evaluate(config: FinetuneConfig, mode: str, model: Transformer, items: list, reference) -> dict[str, Any]:
    """Validation: SFT loss over the held-out rows' learned tokens; DPO loss, margin and preference accuracy over
    the held-out pairs. Eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    weight_sum = 0
    try:
        for start in range(0, len(items), config.eval.batch_size):
            picks = list(range(start, min(start + config.eval.batch_size, len(items))))
            with autocast(config):
                _, parts, _ = _step_loss(config, mode, model, items, picks, reference, "val")
            weight = sum(int((items[i].targets != IGNORE).sum()) for i in picks) if mode == "sft" else len(picks)
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v * weight
            weight_sum += weight
    finally:
        model.train(was_training)
    result = {k: v / max(weight_sum, 1) for k, v in totals.items() if k not in ("lb", "z")}
    if mode == "sft":
        result["ppl"] = math.exp(min(result["loss"], 700.0))
        result["tokens"] = weight_sum
    return result


def peak_rss_mb() -> float:
    """The process's resident-memory high-water mark so far, in MiB (what QLoRA's saving shows in)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _clip(params: list[torch.Tensor], max_norm: float) -> float:
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item()


# ---- checkpoints and results -------------------------------------------------------------------------------------

def _trained_state(model: Transformer) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(out: Path, step: int, model: Transformer, optimizer, config: FinetuneConfig) -> Path:
    """OUT/checkpoints/step_NNNNNN, atomically: what trains (the adapters, or the whole model), AdamW and RNG
    state, the config; the checkpoints beyond checkpoint.keep deleted."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    with atomic_directory(final) as tmp:
        if config.lora.rank > 0:
            save_adapters(model, tmp)
        else:
            save_hf(model, tmp, dtype=torch.float32)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(dumps(config))
    for _, old in checkpoints(out)[:-config.checkpoint.keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, model: Transformer, optimizer, config: FinetuneConfig) -> int:
    """Restore what trains, AdamW and the RNG states from checkpoint `path`; returns its step."""
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file
        raise CheckpointError(f"{path / STATE_FILE}: cannot load trainer state ({e})") from None
    trained = _trained_state(model)
    if config.lora.rank > 0:
        reader = SafetensorsReader(path / WEIGHTS_FILE)
        try:
            missing = [name for name in trained if name not in set(reader.keys())]
            if missing:
                raise CheckpointError(f"{path / WEIGHTS_FILE}: missing tensor {missing[0]!r}")
            values = {name: reader.read(name) for name in trained}
        finally:
            reader.close()
    else:
        values = dict(load_checkpoint(path, dtype=torch.float32, progress=False).named_parameters())
    with torch.no_grad():
        for name, p in trained.items():
            p.copy_(values[name])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return int(state["step"])


def _export(config: FinetuneConfig, model: Transformer, out: Path, tokenizer) -> None:
    """OUT/adapter (LoRA) and OUT/model (HF layout with its tokenizer; adapters merged into float bases)."""
    if config.lora.rank > 0:
        with atomic_directory(out / "adapter") as tmp:
            save_adapters(model, tmp)
        with atomic_directory(out / "adapter-peft") as tmp:  # the same adapters for transformers + PEFT
            save_peft(model, tmp, base_model_name_or_path=str(resolve_model(config.model.path)))
        if config.model.quantize is not None:
            log.info("adapters in %s (the base is quantized, so no merged model)", out / "adapter")
            return
        merge_lora(model)
    with atomic_directory(out / "model") as tmp:
        save_hf(model, tmp, dtype=torch.bfloat16)
        # The base's tokenizer goes with it (a preset's is mistral-common's), so the directory is complete.
        tokenizer_file = Path(tokenizer.path)
        shutil.copyfile(tokenizer_file, tmp / ("tokenizer.json" if tokenizer_file.suffix == ".json"
                                               else "tokenizer.model"))
    log.info("model in %s", out / "model")


def _plot(metrics_path: Path, png: Path, mode: str) -> None:
    """Train and validation loss, and for DPO the preference accuracy, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mixtral.io.files import atomic_path

    records = read_metrics(metrics_path)
    panels = [("loss", "SFT loss (assistant tokens)" if mode == "sft" else "DPO loss")]
    if mode == "dpo":
        panels.append(("accuracy", "preference accuracy"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for kind in ("train", "val"):
            points = [(r["step"], r[key]) for r in records if r.get("kind") == kind and key in r]
            if points:
                ax.plot(*zip(*points), label=kind, marker="o" if kind == "val" else None, ms=3, lw=1)
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

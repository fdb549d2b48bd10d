"""`mixtral bench train-throughput`: our trainer's step against transformers' MixtralForCausalLM, side by side in
one run.

Both train the same model (our random init, written with save_hf and read by transformers' from_pretrained) on
the same random batches, with the same optimizer (fused AdamW, weight decay 0.1), gradient clipping at 1.0 and
thread count, in float32 and under bf16 autocast. One step is forward, loss, backward, clip and optimizer step:

- ours: `mixtral.train.trainer.lm_loss` (chunked cross-entropy + load-balancing 0.01 + z-loss 0.001), what
  `mixtral train` runs;
- transformers: `model(input_ids, labels, shift_labels, output_router_logits=True)` with router_aux_loss_coef
  0.01 (its cross-entropy + load-balancing loss), as a Trainer would call it.

The implementations alternate in rounds so drift in the machine's speed hits both alike; each row is the median
over its timed steps. `keep_freed_memory` (glibc keeps freed blocks; see mixtral/train/trainer.py) applies to the
whole process, so to both. The first step's loss of both is printed as a check that they train the same model
(ours includes the z-loss, 0.001 x about 4.3 at initialisation).

    mixtral bench train-throughput                      # the 42.7M default model, batch 8 x 256
    mixtral bench train-throughput --impls ours --dim 384 --layers 8 --hidden 1024
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from mixtral.bench.harness import command_line
from mixtral.config import ModelConfig
from mixtral.io.checkpoint import save_hf
from mixtral.model import Transformer
from mixtral.train.trainer import keep_freed_memory, lm_loss

AUX_LOSS_COEF, Z_LOSS_COEF = 0.01, 0.001
IMPLS = ("ours", "transformers")


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The same AdamW for both: weight decay on matrices, fused (one pass per tensor)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=1e-4, betas=(0.9, 0.95), fused=True)


class Trainee:
    """One implementation's model, optimizer and training step."""

    def __init__(self, name: str, model: torch.nn.Module, loss_fn):
        self.name, self.model, self.loss_fn = name, model.train(), loss_fn
        self.optimizer = optimizer(model)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, bf16: bool) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = self.loss_fn(self.model, inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def ours_loss(model, inputs, targets):
    return lm_loss(model, inputs, targets, AUX_LOSS_COEF, Z_LOSS_COEF)[0]


def transformers_loss(model, inputs, targets):
    return model(input_ids=inputs, labels=targets, shift_labels=targets, output_router_logits=True).loss


def build(config: ModelConfig, impls: Sequence[str], seed: int, workdir: Path) -> dict[str, Trainee]:
    """Fresh models with the same weights for each implementation (float32 master weights)."""
    ours = Transformer(config).init_weights(seed)
    trainees = {}
    if "transformers" in impls:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        save_hf(ours, workdir, dtype=torch.float32)
        hf = transformers.AutoModelForCausalLM.from_pretrained(workdir, dtype=torch.float32)
        hf.config.router_aux_loss_coef = AUX_LOSS_COEF
        if hasattr(hf, "router_aux_loss_coef"):
            hf.router_aux_loss_coef = AUX_LOSS_COEF
        trainees["transformers"] = Trainee("transformers", hf, transformers_loss)
    if "ours" in impls:
        trainees["ours"] = Trainee("ours", ours, ours_loss)
    return trainees


def measure(config: ModelConfig, dtype: str, *, impls: Sequence[str], batch: int, seq: int, warmup: int,
            rounds: int, steps: int, seed: int) -> list[dict]:
    """One row per implementation of `impls`: the median time of a training step on `batch` x `seq` random tokens
    in `dtype` ("fp32", or "bf16" under autocast) over `rounds` rounds of `steps` timed steps each, after `warmup`
    untimed ones."""
    bf16 = dtype == "bf16"
    generator = torch.Generator().manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        trainees = build(config, impls, seed, Path(tmp))
    first_loss, times = {}, {name: [] for name in trainees}
    tokens = batch * seq
    batches = []
    for _ in range(warmup + rounds):
        ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=generator)
        batches.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    for name, t in trainees.items():
        for inputs, targets in batches[:warmup]:
            loss = t.step(inputs, targets, bf16)
            first_loss.setdefault(name, loss)
    for inputs, targets in batches[warmup:]:
        for name, t in trainees.items():
            for _ in range(steps):
                start = time.perf_counter()
                t.step(inputs, targets, bf16)
                times[name].append(time.perf_counter() - start)
    rows = []
    for name in trainees:
        step_s = statistics.median(times[name])
        rows.append({"dtype": dtype, "impl": name, "tokens_per_s": tokens / step_s, "s_per_step": step_s,
                     "best_tokens_per_s": tokens / min(times[name]), "steps": len(times[name]),
                     "first_loss": first_loss[name]})
    if "transformers" in trainees:
        reference = next(r for r in rows if r["impl"] == "transformers")["tokens_per_s"]
        for row in rows:
            row["x_transformers"] = row["tokens_per_s"] / reference
    return rows


def model_config(*, dim: int = 256, layers: int = 6, hidden: int = 688, heads: int = 8, kv_heads: int = 2,
                 head_dim: int | None = None, experts: int = 8, top_k: int = 2, vocab: int = 32000,
                 seq: int = 256) -> ModelConfig:
    """The model both implementations train (default: the 42.7M shape of the bundled default model)."""
    return ModelConfig(dim=dim, n_layers=layers, head_dim=head_dim or dim // heads, hidden_dim=hidden, n_heads=heads,
                       n_kv_heads=kv_heads, context_len=max(2048, seq), vocab_size=vocab, n_experts=experts,
                       top_k=top_k)


def run(config: ModelConfig, *, impls: Sequence[str] = IMPLS, dtypes: Sequence[str] = ("fp32", "bf16"),
        batch: int = 8, seq: int = 256, warmup: int = 2, rounds: int = 3, steps: int = 2, seed: int = 0) -> dict:
    """`measure` for each of `dtypes` ("fp32", "bf16"); prints the header and the table as it goes. Returns
    {"benchmark": "train-throughput", "command", "config", "rows"}."""
    kept = keep_freed_memory()
    total, active = config.param_counts()
    command = command_line()
    print(f"# {command}")
    print(f"# model: {total / 1e6:.1f}M parameters ({active / 1e6:.1f}M active): dim {config.dim}, {config.n_layers} "
          f"layers, {config.n_experts} experts top-{config.top_k} of hidden {config.hidden_dim}, {config.n_heads} "
          f"heads / {config.n_kv_heads} KV, vocab {config.vocab_size}")
    versions = f"torch {torch.__version__}"
    if "transformers" in impls:
        import transformers

        versions += f", transformers {transformers.__version__}"
    print(f"# batch {batch} x {seq} tokens, {torch.get_num_threads()} threads, {versions}, glibc keeps freed "
          f"memory: {kept}; median of {rounds} x {steps} steps after {warmup} warm-up")
    rows = []
    print(f"\n{'dtype':<6} {'impl':<13} {'tokens/s':>9} {'s/step':>7} {'best tok/s':>10} {'x transformers':>14} "
          f"{'first loss':>10}")
    for dtype in dtypes:
        for row in measure(config, dtype, impls=impls, batch=batch, seq=seq, warmup=warmup, rounds=rounds,
                           steps=steps, seed=seed):
            rows.append(row)
            ratio = f"{row['x_transformers']:.2f}" if "x_transformers" in row else "-"
            print(f"{row['dtype']:<6} {row['impl']:<13} {row['tokens_per_s']:>9.0f} {row['s_per_step']:>7.3f} "
                  f"{row['best_tokens_per_s']:>10.0f} {ratio:>14} {row['first_loss']:>10.4f}", flush=True)
    return {"benchmark": "train-throughput", "command": command, "config": asdict(config), "rows": rows}

"""Training throughput: our trainer's step against transformers' MixtralForCausalLM, side by side in one run.

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

    python benchmarks/train_throughput.py                      # the 42.7M default model, batch 8 x 256
    python benchmarks/train_throughput.py --impls ours --dim 384 --layers 8 --hidden 1024
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mixtral.config import ModelConfig
from mixtral.io.checkpoint import save_hf
from mixtral.model import Transformer
from mixtral.train.trainer import keep_freed_memory, lm_loss

AUX_LOSS_COEF, Z_LOSS_COEF = 0.01, 0.001


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


def build(config: ModelConfig, impls: list[str], seed: int, workdir: Path) -> dict[str, Trainee]:
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


def measure(args: argparse.Namespace, config: ModelConfig, dtype: str) -> list[dict]:
    bf16 = dtype == "bf16"
    generator = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        trainees = build(config, args.impls, args.seed, Path(tmp))
    first_loss, times = {}, {name: [] for name in trainees}
    tokens = args.batch * args.seq
    batches = []
    for _ in range(args.warmup + args.rounds):
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=generator)
        batches.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    for name, t in trainees.items():
        for inputs, targets in batches[:args.warmup]:
            loss = t.step(inputs, targets, bf16)
            first_loss.setdefault(name, loss)
    for inputs, targets in batches[args.warmup:]:
        for name, t in trainees.items():
            for _ in range(args.steps):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=688, help="expert hidden dimension")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=None, help="default: dim / heads")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    parser.add_argument("--impls", default="ours,transformers", help="comma-separated: ours, transformers")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation and dtype")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of alternating timed steps")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per implementation per round")
    parser.add_argument("--threads", type=int, default=threads, help=f"torch threads (default: {threads})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    args.impls = [s for s in args.impls.split(",") if s]
    dtypes = [s for s in args.dtypes.split(",") if s]
    bad = ([s for s in args.impls if s not in ("ours", "transformers")]
           + [s for s in dtypes if s not in ("fp32", "bf16")])
    if bad:
        parser.error(f"unknown --impls/--dtypes value(s): {', '.join(bad)}")

    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()
    config = ModelConfig(dim=args.dim, n_layers=args.layers, head_dim=args.head_dim or args.dim // args.heads,
                         hidden_dim=args.hidden, n_heads=args.heads, n_kv_heads=args.kv_heads,
                         context_len=max(2048, args.seq), vocab_size=args.vocab, n_experts=args.experts,
                         top_k=args.top_k)
    total, active = config.param_counts()
    command = shlex.join(["python", "benchmarks/train_throughput.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"# {command}")
    print(f"# model: {total / 1e6:.1f}M parameters ({active / 1e6:.1f}M active): dim {config.dim}, {config.n_layers} "
          f"layers, {config.n_experts} experts top-{config.top_k} of hidden {config.hidden_dim}, {config.n_heads} "
          f"heads / {config.n_kv_heads} KV, vocab {config.vocab_size}")
    versions = f"torch {torch.__version__}"
    if "transformers" in args.impls:
        import transformers

        versions += f", transformers {transformers.__version__}"
    print(f"# batch {args.batch} x {args.seq} tokens, {args.threads} threads, {versions}, glibc keeps freed "
          f"memory: {kept}; median of {args.rounds} x {args.steps} steps after {args.warmup} warm-up")
    rows = []
    print(f"\n{'dtype':<6} {'impl':<13} {'tokens/s':>9} {'s/step':>7} {'best tok/s':>10} {'x transformers':>14} "
          f"{'first loss':>10}")
    for dtype in dtypes:
        for row in measure(args, config, dtype):
            rows.append(row)
            ratio = f"{row['x_transformers']:.2f}" if "x_transformers" in row else "-"
            print(f"{row['dtype']:<6} {row['impl']:<13} {row['tokens_per_s']:>9.0f} {row['s_per_step']:>7.3f} "
                  f"{row['best_tokens_per_s']:>10.0f} {ratio:>14} {row['first_loss']:>10.4f}", flush=True)
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps({"command": command, "config": config.__dict__, "rows": rows}, indent=2))
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`mixtral bench finetune`: a LoRA SFT step and a DPO step, ours against transformers + PEFT (with TRL's
log-probability helper), side by side in one run; each side's peak memory from a process of its own; and the peak
memory of QLoRA on a Mixtral-8x7B-shaped slice with int4 weights, against what it must hold.

Both sides train the same adapters on the same weights and batch: the model (default: the bundled default model,
HF layout) loads in float32 master weights into ours (`mixtral.load`) and into transformers'
MixtralForCausalLM; our adapters (`apply_lora`: rank, alpha, attention q/k/v/o and every expert's w13 and w2) are
written with `save_peft` and loaded by `peft.PeftModel.from_pretrained(..., is_trainable=True)`, so both start
from equal A and B (PEFT adapts transformers 5's stacked experts through `target_parameters`, one adapter per
expert; `--no-experts` compares attention-only adapters). Each step runs under bf16 autocast, then fused AdamW on
the adapters:

- SFT: ours is `mixtral finetune`'s loss (`sft_batch_loss`: the chunked cross-entropy of the learned tokens);
  theirs `model(input_ids, labels, shift_labels).loss`, as a Trainer calls it.
- DPO (sigmoid loss, beta 0.1): the policy's summed reply log-probabilities of chosen and rejected rows in one
  batch, the reference's from the same model with the adapters off under no_grad (ours `adapters_off` and
  `sequence_logprobs`; theirs `disable_adapter()` and TRL's `selective_log_softmax`), then -log σ(β Δ). TRL's
  DPOTrainer itself is not run: it needs a dataset pipeline and accelerate around the same computation.

Rows alternate ours/theirs in rounds so drift in the machine's speed hits both alike; each time is the median of
the timed steps. Each task starts from fresh adapters; the first step's loss of both is printed as the check that
they compute the same thing (DPO's is ln 2: with B = 0 the policy is the reference).

Memory is the peak resident set (VmHWM of /proc/self/status) of a fresh process per (implementation, task) that
loads the model and runs the warm-up and timed steps; the resident set before loading (Python, torch and, for
theirs, transformers and PEFT imported) is printed beside it.

QLoRA (`--qlora-layers N`, 0 skips it): a random Mixtral-8x7B-shaped model cut to N layers, the experts and
attention int4, the embeddings and the output head bf16 (as QLoRA keeps its head: bitsandbytes skips lm_head; an
int4 head would be expanded whole for the logits of a training batch and for their gradient), adapters of rank 16 on attention and experts, one SFT step of `--qlora-batch` x `--seq` tokens
in a process of its own, its peak resident set reset (/proc/self/clear_refs) once the model is built: drawing and
quantizing the random weights in float32 peaks higher than training. Reported: the weights' bytes, the adapters
with their gradients and AdamW state, the activations autograd saved for the backward pass (unique storages,
counted by saved_tensors_hooks), and the peak resident set above the process's start against their sum.

    mixtral bench finetune                        # default model, batch 8 x 256, rank 16, SFT and DPO, QLoRA 2 layers
    mixtral bench finetune --tasks sft --no-experts --qlora-layers 0
"""
from __future__ import annotations

import ctypes
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from mixtral.bench.harness import CHILD_STATUS_KB

IMPLS = ("ours", "peft")
TASKS = ("sft", "dpo")
BETA = 0.1


class Workload:
    """The batch both sides train on: SFT rows of `seq` tokens (all learned), and DPO pairs (batch / 2 of them,
    chosen rows then rejected rows) sharing a `prompt`-token prompt, only the replies learned."""

    def __init__(self, vocab: int, batch: int, seq: int, prompt: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, vocab, (batch, seq + 1), generator=g)
        self.inputs, self.targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        pairs = max(1, batch // 2)
        prompts = torch.randint(3, vocab, (pairs, prompt), generator=g)
        replies = torch.randint(3, vocab, (2 * pairs, seq + 1 - prompt), generator=g)
        rows = torch.cat([prompts.repeat(2, 1), replies], dim=1)
        self.pair_inputs = rows[:, :-1].contiguous()
        self.pair_targets = rows[:, 1:].clone()
        self.pair_targets[:, :prompt - 1] = -100  # the prompt's tokens are not learned
        self.tokens = batch * seq
        self.pair_tokens = rows.shape[0] * seq


def vocab_of(model: str) -> int:
    """The vocabulary size of the HF-layout checkpoint `model` (the workload draws its token ids below it)."""
    from mixtral.io.loading import resolve_model

    return int(json.loads((Path(resolve_model(model)) / "config.json").read_text())["vocab_size"])


def lora_config(rank: int, alpha: float, experts: bool):
    from mixtral.finetune.lora import ATTENTION, LoRAConfig

    return LoRAConfig(rank=rank, alpha=alpha, attention=ATTENTION, experts=experts)


def ours_model(model: str, rank: int, alpha: float, experts: bool, seed: int):
    """Our model with adapters (A drawn from `seed`), training mode."""
    from mixtral.finetune.lora import apply_lora
    from mixtral.io.loading import load

    m = load(model, dtype=torch.float32, progress=False)
    torch.manual_seed(seed)
    return apply_lora(m, lora_config(rank, alpha, experts)).train()


def peft_model(model: str, ours, workdir: Path):
    """transformers' MixtralForCausalLM of the same weights with `ours`'s adapters through PEFT, training mode."""
    import peft
    import transformers

    from mixtral.finetune.peft import save_peft
    from mixtral.io.loading import resolve_model

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    save_peft(ours, workdir / "adapter")
    hf = transformers.MixtralForCausalLM.from_pretrained(resolve_model(model), dtype=torch.float32)
    return peft.PeftModel.from_pretrained(hf, workdir / "adapter", is_trainable=True).train()


def ours_loss(model, task: str, w: Workload) -> torch.Tensor:
    from mixtral.finetune.lora import adapters_off
    from mixtral.finetune.losses import dpo_loss, sequence_logprobs
    from mixtral.finetune.trainer import Rows, sft_batch_loss

    if task == "sft":
        return sft_batch_loss(model, Rows(w.inputs, w.targets, None, torch.ones_like(w.inputs, dtype=torch.bool)))[0]
    policy = sequence_logprobs(model(w.pair_inputs), w.pair_targets)
    with torch.no_grad(), adapters_off(model):
        reference = sequence_logprobs(model(w.pair_inputs), w.pair_targets)
    pairs = len(policy) // 2
    return dpo_loss(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], BETA).loss


def peft_loss(model, task: str, w: Workload) -> torch.Tensor:
    from trl.trainer.utils import selective_log_softmax

    if task == "sft":
        return model(input_ids=w.inputs, labels=w.targets, shift_labels=w.targets).loss

    def logprobs(logits):
        learned = w.pair_targets != -100
        return (selective_log_softmax(logits.float(), w.pair_targets.clamp(min=0)) * learned).sum(-1)

    policy = logprobs(model(input_ids=w.pair_inputs).logits)
    with torch.no_grad(), model.disable_adapter():
        reference = logprobs(model(input_ids=w.pair_inputs).logits)
    pairs = len(policy) // 2
    delta = (policy[:pairs] - reference[:pairs]) - (policy[pairs:] - reference[pairs:])
    return -F.logsigmoid(BETA * delta).mean()


class Trainee:
    """One implementation's model, AdamW on its adapters, and its step."""

    def __init__(self, name: str, model, loss_fn):
        self.name, self.model, self.loss_fn = name, model, loss_fn
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
        self.n_params = sum(p.numel() for p in params)

    def step(self, task: str, w: Workload) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = self.loss_fn(self.model, task, w)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def build(impls: Sequence[str], model: str, rank: int, alpha: float, experts: bool, seed: int) -> dict[str, Trainee]:
    ours = ours_model(model, rank, alpha, experts, seed)
    trainees = {}
    if "peft" in impls:
        with tempfile.TemporaryDirectory() as tmp:
            trainees["peft"] = Trainee("peft", peft_model(model, ours, Path(tmp)), peft_loss)
    if "ours" in impls:
        trainees["ours"] = Trainee("ours", ours, ours_loss)
    del ours  # alone, PEFT's side keeps only transformers' model (the memory rows)
    gc.collect()
    return trainees


def measure_speed(tasks: Sequence[str], impls: Sequence[str], *, model: str, rank: int, alpha: float, experts: bool,
                  w: Workload, warmup: int, rounds: int, steps: int, seed: int) -> list[dict]:
    """One row per (task, implementation): median seconds of a step, alternating implementations in rounds."""
    rows = []
    for task in tasks:
        trainees = build(impls, model, rank, alpha, experts, seed)  # fresh adapters: equal first losses
        tokens = w.tokens if task == "sft" else w.pair_tokens
        first_loss, times = {}, {name: [] for name in trainees}
        for name, t in trainees.items():
            for _ in range(warmup):
                first_loss.setdefault(name, t.step(task, w))
        for _ in range(rounds):
            for name, t in trainees.items():
                for _ in range(steps):
                    start = time.perf_counter()
                    t.step(task, w)
                    times[name].append(time.perf_counter() - start)
        for name, t in trainees.items():
            step_s = statistics.median(times[name])
            rows.append({"task": task, "impl": name, "tokens_per_s": tokens / step_s, "s_per_step": step_s,
                         "best_s": min(times[name]), "steps": len(times[name]), "first_loss": first_loss[name],
                         "trained_params": t.n_params})
        if "peft" in trainees and "ours" in trainees:
            theirs = next(r for r in rows if r["task"] == task and r["impl"] == "peft")["tokens_per_s"]
            for row in rows:
                if row["task"] == task:
                    row["x_peft"] = row["tokens_per_s"] / theirs
    return rows


# A fresh process per measurement: VmHWM then holds that configuration's peak alone.
MEMORY_CHILD = CHILD_STATUS_KB + r"""
import json, sys, torch
torch.set_num_threads(int(sys.argv[2]))
args = json.loads(sys.argv[1])
from mixtral.bench import finetune
if args["impl"] == "peft":
    import peft, transformers, trl.trainer.utils  # imported before the baseline, as ours imports mixtral
before = status_kb("VmRSS")
print(json.dumps({"rss_before_mb": before / 1024, **finetune.memory_run(**args),
                  "peak_rss_mb": status_kb("VmHWM") / 1024}))
"""


def memory_run(impl: str, task: str, model: str, rank: int, alpha: float, experts: bool, batch: int, seq: int,
               prompt: int, steps: int, seed: int) -> dict:
    """(In the child) build `impl`'s model and run `steps` steps of `task`; returns the first loss."""
    w = Workload(vocab_of(model), batch, seq, prompt, seed)
    t = build((impl,), model, rank, alpha, experts, seed)[impl]
    losses = [t.step(task, w) for _ in range(steps)]
    return {"impl": impl, "task": task, "first_loss": losses[0]}


def _child(script: str, args: dict, threads: int) -> dict:
    result = subprocess.run([sys.executable, "-c", script, json.dumps(args), str(threads)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


QLORA_CHILD = CHILD_STATUS_KB + r"""
import json, sys, torch
torch.set_num_threads(int(sys.argv[2]))
from mixtral.bench import finetune
start = status_kb("VmRSS")
result = finetune.qlora_run(**json.loads(sys.argv[1]))
print(json.dumps({**result, "rss_start_mb": start / 1024, "peak_rss_mb": status_kb("VmHWM") / 1024}))
"""


def qlora_run(layers: int, batch: int, seq: int, rank: int, alpha: float, seed: int) -> dict:
    """(In the child) one QLoRA SFT step on a Mixtral-8x7B-shaped model of `layers` layers, experts and attention
    int4 (embeddings and output head bf16). Returns the parts of its memory in MB."""
    import dataclasses

    from mixtral.config import PRESETS
    from mixtral.finetune.lora import adapter_parameters, apply_lora
    from mixtral.finetune.trainer import Rows, sft_batch_loss
    from mixtral.io.loading import random_quantized

    config = dataclasses.replace(PRESETS["mixtral-8x7b"], n_layers=layers)
    model = random_quantized(config, {"experts": "int4", "attention": "int4"}, seed=seed, dtype=torch.bfloat16)
    weights = sum(t.nbytes for t in list(model.parameters()) + list(model.buffers()))
    gc.collect()
    _return_free_memory()  # what the builder freed, so that the peak counts training's memory, not its leftovers
    load_peak_kb = _reset_peak_rss()  # drawing and quantizing the random weights peaks higher than training
    torch.manual_seed(seed)
    apply_lora(model, lora_config(rank, alpha, True)).train()
    params = list(adapter_parameters(model).values())
    adapters = sum(p.nbytes for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    w = Workload(config.vocab_size, batch, seq, 1, seed)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sft_batch_loss(model, Rows(w.inputs, w.targets, None, torch.ones_like(w.inputs, dtype=torch.bool)))[0]
    loss.backward()
    optimizer.step()
    step_s = time.perf_counter() - start
    mb = 2.0 ** -20
    return {"layers": layers, "tokens": w.tokens, "step_s": step_s, "loss": loss.item(),
            "load_peak_mb": load_peak_kb / 1024,
            "weights_mb": weights * mb, "adapters_mb": adapters * mb, "adapter_state_mb": 4 * adapters * mb,
            "saved_activations_mb": sum(saved.values()) * mb}


def _return_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> int:
    """Reset this process's VmHWM to its current resident set (Linux: "5" into /proc/self/clear_refs); returns the
    peak before, in kB."""
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    Path("/proc/self/clear_refs").write_text("5")
    return peak


def run(*, model: str = "default", impls: Sequence[str] = IMPLS, tasks: Sequence[str] = TASKS, rank: int = 16,
        alpha: float = 32.0, experts: bool = True, batch: int = 8, seq: int = 256, prompt: int = 64,
        warmup: int = 2, rounds: int = 3, steps: int = 2, memory: bool = True, qlora_layers: int = 2,
        qlora_batch: int = 2, seed: int = 0) -> dict:
    """The speed table, the memory table (unless not `memory`) and the QLoRA breakdown (unless `qlora_layers` is
    0), printed as they come. Returns {"benchmark": "finetune", "speed", "memory", "qlora"}."""
    threads = torch.get_num_threads()
    targets = "attention q/k/v/o" + (" + every expert's w13/w2" if experts else "")
    print(f"# model {model}; LoRA rank {rank}, alpha {alpha:g} on {targets}; batch {batch} x {seq} tokens "
          f"(DPO: {max(1, batch // 2)} pairs, {prompt}-token prompts); bf16 autocast, fused AdamW on the adapters")
    w = Workload(vocab_of(model), batch, seq, prompt, seed)
    speed = measure_speed(tasks, impls, model=model, rank=rank, alpha=alpha, experts=experts, w=w, warmup=warmup,
                          rounds=rounds, steps=steps, seed=seed)
    print(f"\n{'task':<5} {'impl':<6} {'tokens/s':>9} {'s/step':>7} {'best s':>7} {'x peft':>7} {'first loss':>10} "
          f"{'trained':>9}")
    for r in speed:
        ratio = f"{r['x_peft']:.2f}" if "x_peft" in r else "-"
        print(f"{r['task']:<5} {r['impl']:<6} {r['tokens_per_s']:>9.0f} {r['s_per_step']:>7.3f} {r['best_s']:>7.3f} "
              f"{ratio:>7} {r['first_loss']:>10.4f} {r['trained_params']:>9}")
    memory_rows = []
    if memory:
        print(f"\n# peak resident memory, a process per row ({warmup + 1} steps)")
        print(f"{'task':<5} {'impl':<6} {'before MB':>9} {'peak MB':>8} {'peak - before':>13}")
        for task in tasks:
            for impl in impls:
                r = _child(MEMORY_CHILD, {"impl": impl, "task": task, "model": model, "rank": rank, "alpha": alpha,
                                          "experts": experts, "batch": batch, "seq": seq, "prompt": prompt,
                                          "steps": warmup + 1, "seed": seed}, threads)
                memory_rows.append(r)
                print(f"{task:<5} {impl:<6} {r['rss_before_mb']:>9.0f} {r['peak_rss_mb']:>8.0f} "
                      f"{r['peak_rss_mb'] - r['rss_before_mb']:>13.0f}", flush=True)
    qlora = None
    if qlora_layers:
        qlora = _child(QLORA_CHILD, {"layers": qlora_layers, "batch": qlora_batch, "seq": seq, "rank": rank,
                                     "alpha": alpha, "seed": seed}, threads)
        parts = qlora["weights_mb"] + qlora["adapters_mb"] + qlora["adapter_state_mb"] + qlora["saved_activations_mb"]
        qlora["accounted_mb"] = parts
        qlora["peak_over_start_mb"] = qlora["peak_rss_mb"] - qlora["rss_start_mb"]
        qlora["ratio"] = qlora["peak_over_start_mb"] / parts
        print(f"\n# QLoRA: Mixtral-8x7B shape, {qlora_layers} layer(s), int4 experts and attention (embeddings, head "
              f"bf16), rank {rank} "
              f"on attention + experts, {qlora_batch} x {seq} tokens, one SFT step ({qlora['step_s']:.1f} s)")
        print(f"weights {qlora['weights_mb']:.0f} MB + adapters {qlora['adapters_mb']:.0f} MB + their grads and "
              f"AdamW state {qlora['adapter_state_mb']:.0f} MB + saved activations "
              f"{qlora['saved_activations_mb']:.0f} MB = {parts:.0f} MB; peak RSS {qlora['peak_rss_mb']:.0f} MB, "
              f"{qlora['peak_over_start_mb']:.0f} above the process's start ({qlora['rss_start_mb']:.0f}): "
              f"{qlora['ratio']:.2f}x (building the random int4 model peaked at {qlora['load_peak_mb']:.0f} MB)")
    return {"benchmark": "finetune", "speed": speed, "memory": memory_rows, "qlora": qlora}

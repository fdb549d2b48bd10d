"""`mixtral plan`: given only a memory budget, choose what stays resident, the experts' precision and the number of
expert slots, from this machine's measured disk and memory bandwidth, and say what tokens/s to expect.

The model of a decoding step (batch 1) that the plan optimises, per token:
- compute: every weight a token touches is read once from memory: attention and output at their precision, top_k
  experts per layer at theirs, each at the speed its kernel reads (`memory_bytes_per_s`, the bf16 GEMV's, times
  `KERNEL_SPEED` of the precision: the low-bit kernels are bound by unpacking).
- I/O: with experts offloaded, each layer keeps `slots / n_layers` of its experts on average; a needed expert is
  in memory with probability `hit_rate` (for routing that is close to random, as a random-weight model's is:
  slots_per_layer / n_experts; a trained router's locality and next-layer prediction do better: measured with
  `mixtral bench offload`), and each miss reads one expert record from disk at `disk_bytes_per_s`.
- tokens/s = 1 / (compute + I/O): no overlap assumed, so a predicting engine that overlaps reads with compute can
  beat the estimate.
Quality: each expert precision's perplexity change on the bundled default model (measured, `QUALITY`); a plan
whose change exceeds the user's floor is not chosen.
"""
from __future__ import annotations

import dataclasses
import mmap
import os
import tempfile
import time
from pathlib import Path

import torch

from mixtral import kernels, quant
from mixtral.config import ModelConfig
from mixtral.io.experts import read_speed

# The precisions the plan chooses among, best quality first.
EXPERT_CHOICES = ("bf16", "int8", "int4", "int3", "int3:g128", "int2:g32")
ATTENTION_CHOICES = ("bf16", "int8", "int4")

# Perplexity change (fraction) of the default model with its experts and attention at these precisions and the
# output int8, against bf16 everywhere: `mixtral bench quant-accuracy --model default --corpus data/corpus --mixes
# plan --tokens 8192` on 2026-12-03 (docs/offloading.md). Negative: within the noise of bf16 rounding (fp32 is
# -0.05%). A pair missing here is unmeasured: chosen only when no floor is set.
QUALITY: dict[tuple[str, str], float] = {
    ("bf16", "bf16"): -0.0002, ("bf16", "int8"): -0.0010, ("bf16", "int4"): 0.0019, ("int8", "bf16"): 0.0001,
    ("int8", "int8"): -0.0006, ("int8", "int4"): 0.0019, ("int4", "bf16"): 0.0045, ("int4", "int8"): 0.0039,
    ("int4", "int4"): 0.0047, ("int3", "bf16"): 0.0057, ("int3", "int8"): 0.0049, ("int3", "int4"): 0.0062,
    ("int3:g128", "bf16"): 0.0096, ("int3:g128", "int8"): 0.0096, ("int3:g128", "int4"): 0.0126,
    ("int2:g32", "bf16"): 0.0533, ("int2:g32", "int8"): 0.0532, ("int2:g32", "int4"): 0.0572,
}
DEFAULT_QUALITY_FLOOR = 0.05  # the perplexity increase `mixtral plan` accepts unless told otherwise

# How fast each precision's one-row kernel reads its bytes, as a share of the bf16 GEMV's speed (which is memory
# speed): the low-bit ones are bound by unpacking. `mixtral bench quant-accuracy --kernels` on the AMD EPYC of
# 2026-12-03, four runs alternating lowbit.c's two ways (bf16 32.3-33.8 GB/s, two outliers at 40-46; int8
# 23.0-26.1, int4 g128 23.1-33.1, int3 g64/g128 with int8 activations 22.2-27.7, int2 g32 14.0-17.8).
KERNEL_SPEED = {"bf16": 1.0, "int8": 0.74, "int4": 0.77, "int3": 0.76, "int2": 0.48}
# lowbit.c's exact way, where its int8-activation way is not built or is turned off (int3 17.5-21.1 GB/s, int2 g32
# 11.1-13.5, the same runs)
EXACT_LOWBIT_SPEED = {"int3": 0.58, "int2": 0.37}

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Machine:
    """What the plan needs to know about the machine: sequential read speed of the disk the experts live on
    (direct I/O, as the engine reads) and of memory."""
    disk_bytes_per_s: float
    memory_bytes_per_s: float


def measure_disk(directory: str | os.PathLike, size: int = 256 << 20, block: int = 64 << 20) -> float:
    """Bytes/s of direct (`O_DIRECT`, bypassing the page cache) positional reads of a `size`-byte file written in
    `directory` and removed; buffered reads after dropping the file's pages where O_DIRECT is not supported."""
    fd_dir = Path(directory)
    fd_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=fd_dir, prefix=".disk-speed-") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
        buffer = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT requires
        try:
            fd = os.open(f.name, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            fd = os.open(f.name, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):  # not on macOS
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            for offset in range(0, size, block):
                os.preadv(fd, [buffer], offset)
            seconds = time.perf_counter() - start
        finally:
            os.close(fd)
            buffer.close()
    return size / seconds


def measure_memory(size: int = 512 << 20) -> float:
    """Bytes/s at which decoding reads a bf16 weight: `kernels.matmul` of one row through a `size`-byte matrix
    (larger than any last-level cache), the best of 3, all threads. The roofline of a decoding step's weight reads;
    the quantized kernels reach `KERNEL_SPEED` of it."""
    k = 16384
    w = torch.ones(size // 2 // k, k, dtype=torch.bfloat16)
    x = torch.ones(1, k, dtype=torch.bfloat16)
    kernels.matmul(x, w)  # the first call builds the kernels
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        kernels.matmul(x, w)
        best = min(best, time.perf_counter() - start)
    return w.numel() * 2 / best


def measure_machine(directory: str | os.PathLike, expert_files: list | None = None) -> Machine:
    """The machine's disk and memory speed: the disk from random records of `expert_files` (a quantized
    checkpoint's, read as the engine reads them) when given, else from a new file in `directory`."""
    disk = read_speed(expert_files) if expert_files else measure_disk(directory)
    return Machine(disk, measure_memory())


@dataclasses.dataclass(frozen=True)
class Plan:
    experts: str
    attention: str
    output: str
    resident_bytes: int  # everything but the expert slots, KV cache of `context` tokens included
    expert_bytes: int  # one expert (w13 + w2), as read from disk
    slots: int  # experts held in memory, all of them when `offloaded` is False
    offloaded: bool
    hit_rate: float
    read_bytes_per_token: float
    compute_seconds: float
    io_seconds: float
    quality: float | None  # perplexity change of this experts + attention precision (None: unmeasured)

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / (self.compute_seconds + self.io_seconds)

    @property
    def memory_bytes(self) -> int:
        return self.resident_bytes + self.slots * self.expert_bytes

    @property
    def quantize(self) -> dict[str, str]:
        return {"experts": self.experts, "attention": self.attention, "output": self.output}


def attention_bytes(config: ModelConfig, attention: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one layer's wq, wk, wv and wo at the precision `attention`."""
    d, hd = config.dim, config.head_dim
    return (quant.matrix_bytes(attention, config.n_heads * hd, d, dtype)
            + 2 * quant.matrix_bytes(attention, config.n_kv_heads * hd, d, dtype)
            + quant.matrix_bytes(attention, d, config.n_heads * hd, dtype))


def resident_bytes(config: ModelConfig, attention: str, output: str, context: int,
                   dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of everything but the experts: embeddings, output, attention, routers, norms, and the KV cache of
    `context` tokens (one sequence) in `dtype`."""
    d, hd = config.dim, config.head_dim
    router = config.n_experts * d * dtype.itemsize if config.n_experts > 1 else 0
    per_layer = attention_bytes(config, attention, dtype) + router + 2 * d * dtype.itemsize
    kv = 2 * config.n_kv_heads * hd * context * dtype.itemsize
    embeddings = config.vocab_size * d * dtype.itemsize
    out = 0 if config.tie_embeddings and output == "bf16" else quant.matrix_bytes(output, config.vocab_size, d, dtype)
    return embeddings + out + config.n_layers * (per_layer + kv) + d * dtype.itemsize


def expert_bytes(config: ModelConfig, experts: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one expert: w13 [2·hidden, dim] and w2 [dim, hidden]."""
    return (quant.matrix_bytes(experts, 2 * config.hidden_dim, config.dim, dtype)
            + quant.matrix_bytes(experts, config.dim, config.hidden_dim, dtype))


def estimate(config: ModelConfig, budget: int, machine: Machine, *, experts: str, attention: str, output: str = "int8",
             context: int = 4096, hit_rate: float | None = None) -> Plan | None:
    """The plan for these precisions within `budget` bytes, or None when the resident part and one layer's worst
    case (top_k slots per layer... at least top_k slots) do not fit. hit_rate: of the expert cache (default: as if
    routing were random, slots per layer / n_experts)."""
    resident = resident_bytes(config, attention, output, context)
    one = expert_bytes(config, experts)
    total = config.n_layers * config.n_experts
    slots = min(total, max(0, (budget - resident) // one))
    if slots < config.top_k:
        return None
    offloaded = slots < total
    if hit_rate is None:
        hit_rate = min(1.0, slots / config.n_layers / config.n_experts) if offloaded else 1.0
    misses = config.n_layers * config.top_k * (1 - hit_rate)
    # What a token reads from memory, each part at the speed of its precision's kernel
    bandwidth = machine.memory_bytes_per_s
    attention_read = config.n_layers * attention_bytes(config, attention)
    output_read = quant.matrix_bytes(output, config.vocab_size, config.dim)
    experts_read = config.n_layers * config.top_k * one
    compute = (attention_read / (bandwidth * kernel_speed(attention))
               + output_read / (bandwidth * kernel_speed(output)) + experts_read / (bandwidth * kernel_speed(experts)))
    return Plan(experts, attention, output, resident, one, slots, offloaded, hit_rate, misses * one,
                compute, misses * one / machine.disk_bytes_per_s, QUALITY.get((experts, attention)))


def kernel_speed(precision: str) -> float:
    """The share of memory speed at which this machine's one-row kernel reads `precision`'s bytes."""
    parsed = quant.parse_precision(precision)
    mode = parsed.mode if parsed else "bf16"
    if mode in EXACT_LOWBIT_SPEED and not kernels.policy().lowbit_int8:
        return EXACT_LOWBIT_SPEED[mode]
    return KERNEL_SPEED[mode]


def plans(config: ModelConfig, budget: int, machine: Machine, *, context: int = 4096,
          max_quality_loss: float | None = None) -> list[Plan]:
    """Every feasible plan (precisions from EXPERT_CHOICES × ATTENTION_CHOICES, output int8) within `budget`,
    best first: the fastest among those whose expert precision's perplexity change is within
    `max_quality_loss` (a fraction; None: any), then the rest."""
    found = [p for e in EXPERT_CHOICES for a in ATTENTION_CHOICES
             if (p := estimate(config, budget, machine, experts=e, attention=a, context=context)) is not None]

    def acceptable(p: Plan) -> bool:
        return max_quality_loss is None or (p.quality is not None and p.quality <= max_quality_loss)
    return sorted(found, key=lambda p: (not acceptable(p), -p.tokens_per_s))


def describe(plan: Plan, budget: int) -> str:
    where = (f"{plan.slots} expert slots of {plan.expert_bytes / 1e6:.1f} MB ({plan.slots * plan.expert_bytes / GB:.2f}"
             f" GB), the rest of the experts read from disk on demand" if plan.offloaded
             else "every expert resident")
    quality = "unmeasured" if plan.quality is None else f"{100 * plan.quality:+.1f}% perplexity"
    return (f"experts {plan.experts}, attention {plan.attention}, output {plan.output}: "
            f"{plan.memory_bytes / GB:.2f} of {budget / GB:.2f} GB ({plan.resident_bytes / GB:.2f} GB resident; "
            f"{where}); expected {plan.tokens_per_s:.2f} tokens/s (compute {1e3 * plan.compute_seconds:.0f} ms, "
            f"I/O {1e3 * plan.io_seconds:.0f} ms at a {100 * plan.hit_rate:.0f}% hit rate); quality: {quality}")

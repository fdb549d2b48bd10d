"""`mixtral bench quant-accuracy`: what weight-only quantization (int8, int4, int3, int2, a precision per part) costs
in accuracy, and what its kernels gain in time.

Accuracy: one model (default: the random-init preset "small" in bf16; --model PATH for a checkpoint) runs
held-out text (default: modules of Python's standard library, which every machine has) in windows, unquantized
and quantized; for each setting, against the unquantized run:
    rel err    ‖logits - logits_ref‖ / ‖logits_ref‖ over all positions (float32)
               (the fp32 row, the same model unrounded, shows how much mere bf16 rounding moves this model)
    max |Δ|    the largest logit difference
    ppl, Δppl  perplexity of the next token within each window, and its change
    top-1      how often the argmax agrees with the reference
A random-init model's perplexity is about its vocabulary (its predictions are noise); only the changes mean
something there, and they overstate a trained model's (random weights have no outliers to protect, but no
structure to lose either).

--kernels: milliseconds of one product through Mixtral-8x7B's fused w1+w3 (28672 x 4096) and w2 (4096 x 14336)
at 1 and 16 rows, bf16 F.linear (and mixtral.kernels.matmul, the model's bf16 path) against int8, int4 at each
group size and int3/int2 (LOWBIT_KERNELS), as the model calls them (`QuantizedWeight.linear`, casts included).

    mixtral bench quant-accuracy
    mixtral bench quant-accuracy --model default --corpus data/corpus   # the trained default model
    mixtral bench quant-accuracy --kernels --threads 2
"""
from __future__ import annotations

import datetime
import math
import os
import sysconfig
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from mixtral import kernels, quant
from mixtral.bench.harness import cache_flusher, command_line, cpu_times
from mixtral.config import from_name
from mixtral.data.shards import TokenShards
from mixtral.errors import InputError
from mixtral.io.loading import load, load_tokenizer
from mixtral.offload import plan

STDLIB_FILES = ("argparse.py", "textwrap.py", "functools.py", "dataclasses.py", "inspect.py", "typing.py",
                "pathlib.py", "json/decoder.py", "collections/__init__.py", "logging/__init__.py")


def corpus_windows(directory: str, n_tokens: int, window: int) -> torch.Tensor:
    """Validation windows of a prepared corpus (`mixtral data prepare`), the same number from each domain."""
    val = TokenShards(directory, "val")
    per_domain = max(1, n_tokens // window // len(val.domains))
    rows = [inputs for d in val.domains for inputs, _ in val.windows(d, window, per_domain)]
    return torch.stack(rows)


def held_out_tokens(files: Sequence[str] | None, n_tokens: int) -> torch.Tensor:
    """The first `n_tokens` ids of the files (default: standard-library modules), Mixtral tokenizer. Raises
    InputError when they hold fewer."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = [Path(f) for f in files] if files else [stdlib / f for f in STDLIB_FILES if (stdlib / f).exists()]
    tokenizer = load_tokenizer()
    ids: list[int] = []
    for path in paths:
        ids += tokenizer.encode(path.read_text(errors="replace"), bos=not ids)
        if len(ids) >= n_tokens:
            return torch.tensor(ids[:n_tokens])
    raise InputError(f"only {len(ids)} tokens in {', '.join(map(str, paths))}; pass fewer --tokens or more --text")


@torch.no_grad()
def logits_of(model, windows: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([model(windows[i:i + batch]).float() for i in range(0, len(windows), batch)])


def metrics(logits: torch.Tensor, ref: torch.Tensor, windows: torch.Tensor) -> dict[str, float]:
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return {"rel": ((logits - ref).norm() / ref.norm()).item(), "max": (logits - ref).abs().max().item(),
            "ppl": math.exp(nll.item()), "top1": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def quantized_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


# The mixes of the table in docs/offloading.md: a precision per part. Mixtral-offloading's recipe is the last.
MIXES = {
    "all int8": "int8",
    "all int4": "int4",
    "e-int4 a-int8": {"experts": "int4", "attention": "int8", "output": "int8"},
    "e-int3 a-int8": {"experts": "int3", "attention": "int8", "output": "int8"},
    "e-int3g32 a-int8": {"experts": "int3:g32", "attention": "int8", "output": "int8"},
    "e-int3g128 a-int8": {"experts": "int3:g128", "attention": "int8", "output": "int8"},
    "e-int2g32 a-int8": {"experts": "int2:g32", "attention": "int8", "output": "int8"},
    "e-int2g16 a-int4": {"experts": "int2:g16", "attention": "int4", "output": "int8"},
}


def plan_mixes() -> dict[str, dict[str, str]]:
    """The precision pairs `mixtral plan` chooses among (its QUALITY table is measured on these)."""
    return {f"e-{e} a-{a}": {"experts": e, "attention": a, "output": "int8"}
            for e in plan.EXPERT_CHOICES for a in plan.ATTENTION_CHOICES}


def mixtral_8x7b_gb(quantize) -> float:
    """GB that Mixtral-8x7B's weights take in memory at these precisions (`quantize` as `mixtral.quant.quantize`
    takes; unquantized parts in bf16), from its shapes alone."""
    config = from_name("mixtral-8x7b")
    parts = {p: str(v) if v else "bf16" for p, v in quant.quantization_settings(quantize or {}).items()}
    experts = config.n_layers * config.n_experts * plan.expert_bytes(config, parts["experts"])
    return (plan.resident_bytes(config, parts["attention"], parts["output"], context=0) + experts) / 1e9


def accuracy(*, model: str = "small", dtype: str = "bf16", text: Sequence[str] | None = None,
             corpus: str | None = None, tokens: int = 4096, window: int = 256, batch: int = 4,
             modes: Sequence[str] = ("int8", "int4"), group_sizes: Sequence[int] = quant.GROUP_SIZES,
             mixes: dict | None = None) -> dict:
    """Logits of `model` (loaded in `dtype`) on `tokens` held-out tokens (the validation split of the prepared
    `corpus`, else the `text` files, default standard-library modules) in windows of `window` (`batch` windows per
    forward), unquantized, in float32, and quantized to each of `modes` (int4 at each of `group_sizes`), or to each
    of `mixes` ({name: what `quant.quantize` takes}) when given; prints the table as it goes. Bytes per parameter
    count every tensor the model keeps (embeddings and norms too) over its float parameters; "8x7B GB" is what
    Mixtral-8x7B's weights take at the same precisions. Returns {"benchmark": "quant-accuracy", "rows":
    [{"weights", "mb", "bytes_per_param", "gb_8x7b", "rel", "max", "ppl", "top1", "seconds"}]}."""
    if corpus:
        windows = corpus_windows(corpus, tokens, window)
    else:
        windows = held_out_tokens(text, tokens).view(-1, window)
    if mixes is None:
        mixes = {(m + (f" g{g}" if g else "")): (m if g is None else f"{m}:g{g}")
                 for m in modes for g in ([None] if m == "int8" else group_sizes)}
    settings = [(dtype, None)] + ([("fp32", None)] if dtype not in ("fp32", "float32") else []) + list(mixes.items())
    # fp32: how far mere rounding moves this model, the scale for the rest
    print(f"model {model} ({dtype}), {windows.numel()} tokens in {len(windows)} windows of {window}")
    print(f"{'weights':<18}{'MB':>8}{'B/param':>8}{'8x7B GB':>8}{'rel err':>10}{'max |Δ|':>10}{'ppl':>12}{'Δppl':>9}"
          f"{'top-1':>8}{'s':>7}")
    ref = base_ppl = None
    rows = []
    for name, quantize in settings:
        net = load(model, dtype="fp32" if name == "fp32" else dtype, progress=False)
        params = sum(p.numel() for p in net.parameters())
        if quantize is not None:
            quant.quantize(net, quantize)
        start = time.perf_counter()
        logits = logits_of(net, windows, batch)
        seconds = time.perf_counter() - start
        if ref is None:
            ref = logits
        m = metrics(logits, ref, windows)
        base_ppl = base_ppl or m["ppl"]
        mb = quantized_bytes(net) / 1e6
        per_param = mb * 1e6 / params
        gb = mixtral_8x7b_gb(quantize) * (2 if name == "fp32" else 1)
        print(f"{name:<18}{mb:>8.1f}{per_param:>8.3f}{gb:>8.1f}{m['rel']:>10.4f}{m['max']:>10.3f}{m['ppl']:>12.3f}"
              f"{100 * (m['ppl'] / base_ppl - 1):>+8.2f}%{100 * m['top1']:>7.1f}%{seconds:>7.1f}", flush=True)
        rows.append({"weights": name, "quantize": quantize, "mb": mb, "bytes_per_param": per_param, "gb_8x7b": gb,
                     **m, "seconds": seconds})
        del net
    return {"benchmark": "quant-accuracy", "rows": rows}


class OtherProcesses:
    """How much CPU the rest of the machine took since this was made (Linux /proc/stat), to flag timings taken
    beside another busy process."""

    def __init__(self):
        self.start = self._now()

    @staticmethod
    def _now() -> tuple[float, float] | None:
        try:
            fields = cpu_times()
        except (OSError, ValueError):
            return None
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        mine = sum(os.times()[:2])
        return busy - mine, sum(fields) / os.sysconf("SC_CLK_TCK")

    def share(self) -> float | None:
        now = self._now()
        if now is None or self.start is None or now[1] == self.start[1]:
            return None
        return max(0.0, (now[0] - self.start[0]) / (now[1] - self.start[1]))


def best_of(candidates: dict, x: torch.Tensor, min_seconds: float, flush) -> dict[str, float]:
    """Fastest milliseconds of each candidate on x, timed in interleaved rounds for about `min_seconds` each (at
    least 5 rounds), after a warm-up round, each call after `flush()` (weights come from memory, as in decoding).
    The minimum, not the median: on a shared machine other processes only ever add time, and interleaving spreads
    what they add over all candidates alike."""
    best = {name: float("inf") for name in candidates}
    for fn in candidates.values():
        fn(x)
    start, rounds = time.perf_counter(), 0
    while time.perf_counter() - start < min_seconds * len(candidates) or rounds < 5:
        for name, fn in candidates.items():
            flush()
            t = time.perf_counter()
            fn(x)
            best[name] = min(best[name], time.perf_counter() - t)
        rounds += 1
    return {name: 1000 * t for name, t in best.items()}


LOWBIT_KERNELS = ("int3:g64", "int3:g128", "int2:g32", "int2:g16")


def kernel_timings(*, rows: Sequence[int] = (1, 16), group_sizes: Sequence[int] = quant.GROUP_SIZES,
                   lowbit: Sequence[str] = LOWBIT_KERNELS, min_seconds: float = 1.0) -> dict:
    """The best ms of one product through Mixtral-8x7B's w1+w3 and w2 at each of `rows`: bf16 (F.linear and ours)
    against int8, int4 at each of `group_sizes` and the int3/int2 precisions of `lowbit`, about `min_seconds` per
    candidate, cold cache; prints the table as it goes, then each candidate's GB/s at one row (its bytes, scales
    included, over its time: how near memory speed it reads). Returns {"benchmark": "quant-kernels", "rows":
    [{"weight", "rows", "ms": {candidate: ms}}], "gb_per_s": {weight: {candidate: GB/s at the fewest rows}}}."""
    groups = list(group_sizes)
    flush = cache_flusher()
    others = OtherProcesses()
    lowbit_names = {spec: spec.replace(":", " ") for spec in lowbit}
    names = (["bf16 F.linear", "bf16 mixtral"] + ["int8"] + [f"int4 g{g}" for g in groups]
             + list(lowbit_names.values()))
    speeds = {}
    print(f"{'weight':<14}{'rows':>5}" + "".join(f"{n:>15}" for n in names) + "   (best ms; speedup vs bf16 F.linear)")
    results = []
    for n, k in [(28672, 4096), (4096, 14336)]:  # w1+w3 fused, w2 of Mixtral-8x7B
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
        candidates = {"bf16 F.linear": lambda x: F.linear(x, w), "bf16 mixtral": lambda x: kernels.matmul(x, w)}
        for mode, group in [("int8", None)] + [("int4", g) for g in groups]:
            linear = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
            linear.weight.data = w
            candidates["int8" if mode == "int8" else f"int4 g{group}"] = quant.quantize_linear(linear, mode,
                                                                                                group_size=group or 128)
        for spec, name in lowbit_names.items():  # min-max fit: the kernels' time does not depend on the fit
            linear = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
            linear.weight.data = w
            candidates[name] = quant.quantize_linear(linear, f"{spec}:minmax")
        nbytes = {name: (w.numel() * 2 if name.startswith("bf16") else
                         sum(t.numel() * t.element_size() for t in fn.buffers()))
                  for name, fn in candidates.items()}
        for m in rows:
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            ms = best_of(candidates, x, min_seconds, flush)
            cells = "".join(f"{ms[name]:>8.2f} {ms['bf16 F.linear'] / ms[name]:>4.1f}x" for name in names)
            print(f"{n}x{k:<8}{m:>5}{cells}", flush=True)
            results.append({"weight": f"{n}x{k}", "rows": m, "ms": ms})
            if m == min(rows):
                speeds[f"{n}x{k}"] = {name: nbytes[name] / ms[name] / 1e6 for name in names}
    for weight, gbs in speeds.items():
        print(f"# GB/s at {min(rows)} row(s), {weight}: " + ", ".join(f"{name} {v:.1f}" for name, v in gbs.items()))
    share = others.share()
    print(f"# other processes used {share:.0%} of the CPUs meanwhile" if share is not None else "")
    return {"benchmark": "quant-kernels", "rows": results, "gb_per_s": speeds, "other_processes": share}


def print_header() -> None:
    """The first line of either table: date, command, torch, threads and the CPU capability torch dispatches to."""
    print(f"# {datetime.date.today()}  {command_line()}  torch {torch.__version__}  threads {torch.get_num_threads()}"
          f"  cpu capability {torch.backends.cpu.get_cpu_capability()}")

"""`mixtral bench load-memory`: peak memory while loading a checkpoint: ours against transformers, each in a
fresh process.

Writes a random Mixtral-shaped checkpoint of about `--gb` GB (bf16, HF layout, one safetensors file) unless
`--path` names an existing one, then loads it in a child process per loader and reports
(peak RSS - RSS before loading) / bytes of the weights, where "before" is taken after each loader has built
one tiny model (so the one-off loading of libraries is not counted).

    mixtral bench load-memory --gb 1.0

tests/test_memory.py runs `write_checkpoint` and `measure` at 0.4 GB as a regression test of our loader.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from mixtral.config import from_name, with_overrides
from mixtral.io.checkpoint import save_hf
from mixtral.model import random_model

LOADERS = ("mixtral", "transformers")

CHILD = r"""
import json, sys, time
import torch
def status_kb(field):
    # VmHWM, not ru_maxrss: after fork+exec ru_maxrss still counts the parent's resident pages at fork time.
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
loader, path, quantize = sys.argv[1], sys.argv[2], (sys.argv[3:] or [None])[0]
if loader == "mixtral":
    import mixtral
    load = lambda: mixtral.load(path, progress=False, quantize=quantize)
    def warm_up():  # the loader builds models on the meta device; the first use imports ~70 MB of torch code
        with torch.device("meta"):
            mixtral.Transformer(mixtral.from_name("tiny")).to(torch.bfloat16)
else:
    import transformers
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    warm_up = lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
# Build one tiny model first, so that the one-off loading of libraries (~75 MB) is not counted as data.
warm_up()
before = status_kb("VmRSS")
start = time.perf_counter()
model = load()
seconds = time.perf_counter() - start
model_bytes = sum(t.nbytes for t in [*model.parameters(), *model.buffers()] if t is not None)
print(json.dumps({"before_kb": before, "peak_kb": status_kb("VmHWM"), "after_kb": status_kb("VmRSS"),
                  "seconds": seconds, "model_bytes": model_bytes}))
"""


def write_checkpoint(path: Path, gb: float, vocab_size: int = 32000) -> int:
    """A random bf16 checkpoint of about `gb` GB in the HF layout (one safetensors file) at `path`, Mixtral-shaped
    with 1024 dims and experts of 3584 hidden units (a smaller `vocab_size` leaves the experts more of the bytes);
    returns the bytes of its weights."""
    base = with_overrides(from_name("mixtral-8x7b"), dim=1024, hidden_dim=3584, n_heads=8, n_kv_heads=2,
                          vocab_size=vocab_size)
    per_layer = 8 * 3 * 1024 * 3584 + 1024 * 128 * 20
    embeddings = 2 * vocab_size * 1024
    n_layers = max(1, round((gb * 1e9 / 2 - embeddings) / per_layer))
    model = random_model(with_overrides(base, n_layers=n_layers), seed=0, dtype=torch.bfloat16)
    save_hf(model, path, max_shard_bytes=10 * 1024 ** 3)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(path: Path, loader: str, quantize: str | None = None) -> dict:
    """{"before_kb", "peak_kb", "after_kb", "seconds", "model_bytes"} of loading `path` with `loader` ("mixtral"
    or "transformers"; "mixtral" quantizing while loading when `quantize` is "int8" or "int4") in a fresh process:
    its resident memory before, at the peak, after, the load's time and the bytes of the loaded model's tensors."""
    args = [sys.executable, "-c", CHILD, loader, str(path), *([quantize] if quantize else [])]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(*, gb: float = 1.0, path: Path | None = None, loaders: Sequence[str] = LOADERS) -> dict:
    """Write a checkpoint of about `gb` GB into a temporary directory (or measure the existing `path`), then
    `measure` it with each of `loaders`; prints the table as it goes. Returns {"benchmark": "load-memory",
    "weight_bytes", "rows": [{"loader", "grown_bytes", "ratio", "seconds"}]}."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = path or Path(tmp) / "ckpt"
        if path is None:
            weight_bytes = write_checkpoint(checkpoint, gb)
        else:
            weight_bytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
        print(f"checkpoint: {checkpoint}  weights: {weight_bytes / 1e9:.3f} GB")
        print(f"{'loader':<14}{'peak - before (GB)':>20}{'ratio to weights':>18}{'seconds':>10}")
        for loader in loaders:
            r = measure(checkpoint, loader)
            grown = (r["peak_kb"] - r["before_kb"]) * 1024
            print(f"{loader:<14}{grown / 1e9:>20.3f}{grown / weight_bytes:>18.2f}{r['seconds']:>10.2f}", flush=True)
            rows.append({"loader": loader, "grown_bytes": grown, "ratio": grown / weight_bytes,
                         "seconds": r["seconds"]})
    return {"benchmark": "load-memory", "weight_bytes": weight_bytes, "rows": rows}

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

from tqdm import tqdm

from mixtral.bench.harness import CHILD_STATUS_KB
from mixtral.config import ModelConfig, from_name, to_hf_dict, with_overrides
from mixtral.io.checkpoint import TensorPlan, save_hf, write_safetensors
from mixtral.io.files import write_json
from mixtral.io.layouts import hf_layout
from mixtral.model import Transformer, random_model

LOADERS = ("mixtral", "transformers")

CHILD = CHILD_STATUS_KB + r"""
import json, sys, time
import torch
loader, path, quantize, device = sys.argv[1], sys.argv[2], sys.argv[3] or None, sys.argv[4]
if loader == "mixtral":
    import mixtral
    load = lambda: mixtral.load(path, progress=False, quantize=quantize, device=device)
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


QUANTIZE_CHILD = CHILD_STATUS_KB + r"""
import json, os, sys, time
import torch
import mixtral
from mixtral.io.loading import quantize_checkpoint
path, out, quantize = sys.argv[1], sys.argv[2], sys.argv[3]
with torch.device("meta"):
    mixtral.Transformer(mixtral.from_name("tiny")).to(torch.bfloat16)
before = status_kb("VmRSS")
start = time.perf_counter()
quantize_checkpoint(path, out, quantize, progress=False)
seconds = time.perf_counter() - start
size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(out) for f in files)
print(json.dumps({"before_kb": before, "peak_kb": status_kb("VmHWM"), "after_kb": status_kb("VmRSS"),
                  "seconds": seconds, "model_bytes": size}))
"""


def write_random_hf(config: ModelConfig, path: Path, *, seed: int = 0, max_shard_bytes: int = 4 * 1024 ** 3,
                    progress: bool = True) -> int:
    """A random bf16 checkpoint of `config` in the HF layout (sharded, with its index), written one tensor at a time:
    each tensor is drawn from N(0, 0.02) (norms: 1) only when its bytes are written, so a checkpoint larger than
    memory can be made. Returns the bytes of its weights."""
    with torch.device("meta"):
        params = dict(Transformer(config).named_parameters(remove_duplicate=False))
    generator = torch.Generator().manual_seed(seed)
    plans = []
    for key, target in hf_layout(config).items():
        shape = tuple(target.select(params[target.param]).shape)

        def make(key=key, shape=shape) -> torch.Tensor:
            if key.endswith("norm.weight"):
                return torch.ones(shape, dtype=torch.bfloat16)
            return torch.randn(shape, generator=generator).mul_(0.02).to(torch.bfloat16)
        plans.append(TensorPlan(key, shape, torch.bfloat16, make))
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for plan in plans:
        if shards[-1] and size + plan.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += plan.nbytes
    path.mkdir(parents=True, exist_ok=True)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, tqdm(shards, desc="writing random weights", unit="shard", disable=not progress)):
        write_safetensors(path / name, shard)
    write_json(path / "model.safetensors.index.json",
               {"metadata": {"total_size": sum(p.nbytes for p in plans)},
                "weight_map": {plan.name: name for name, shard in zip(names, shards) for plan in shard}})
    write_json(path / "config.json", to_hf_dict(config, "bfloat16"))
    return sum(p.nbytes for p in plans)


def measure_quantize(path: Path, out: Path, quantize: str) -> dict:
    """As `measure`, for `mixtral quantize` (`quantize_checkpoint`) of `path` into `out` in a fresh process;
    "model_bytes" is the size of what it wrote."""
    args = [sys.executable, "-c", QUANTIZE_CHILD, str(path), str(out), quantize]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"mixtral quantize failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


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


def measure(path: Path, loader: str, quantize: str | None = None, device: str = "cpu") -> dict:
    """{"before_kb", "peak_kb", "after_kb", "seconds", "model_bytes"} of loading `path` with `loader` ("mixtral"
    or "transformers"; "mixtral" quantizing while loading when `quantize` is "int8" or "int4", and onto `device`)
    in a fresh process: its resident memory before, at the peak, after, the load's time and the bytes of the
    loaded model's tensors."""
    args = [sys.executable, "-c", CHILD, loader, str(path), quantize or "", device]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(*, gb: float = 1.0, path: Path | None = None, loaders: Sequence[str] = LOADERS, quantize: str | None = None,
        preset: str | None = None, layers: int | None = None, workdir: Path | None = None) -> dict:
    """Write a checkpoint into a temporary directory (under `workdir`, default the system's): about `gb` GB, or
    `preset`'s shapes cut to `layers` layers (streamed: it may exceed memory); or measure the existing `path`.
    Without `quantize`: `measure` it with each of `loaders`. With `quantize` (a precision spec): measure mixtral
    quantizing while loading it and `mixtral quantize` writing it, against the quantized size (the goal: peak
    growth no more than the quantized size + 2 GB). Prints the table as it goes. Returns {"benchmark":
    "load-memory", "weight_bytes", "rows": [{"loader", "grown_bytes", "ratio", "seconds", "result_bytes"}]}."""
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        checkpoint = path or Path(tmp) / "ckpt"
        if path is not None:
            weight_bytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
        elif preset is not None:
            config = from_name(preset)
            config = with_overrides(config, n_layers=layers or config.n_layers)
            weight_bytes = write_random_hf(config, checkpoint)
        else:
            weight_bytes = write_checkpoint(checkpoint, gb)
        print(f"checkpoint: {checkpoint}  weights: {weight_bytes / 1e9:.3f} GB")
        print(f"{'loader':<26}{'peak - before (GB)':>20}{'ratio to weights':>18}{'result (GB)':>13}{'seconds':>10}")
        runs = ([(f"mixtral --quantize {quantize}", lambda: measure(checkpoint, "mixtral", quantize)),
                 (f"mixtral quantize {quantize}", lambda: measure_quantize(checkpoint, Path(tmp) / "out", quantize))]
                if quantize else [(loader, lambda loader=loader: measure(checkpoint, loader)) for loader in loaders])
        for name, measured in runs:
            r = measured()
            grown = (r["peak_kb"] - r["before_kb"]) * 1024
            print(f"{name:<26}{grown / 1e9:>20.3f}{grown / weight_bytes:>18.2f}{r['model_bytes'] / 1e9:>13.3f}"
                  f"{r['seconds']:>10.2f}", flush=True)
            rows.append({"loader": name, "grown_bytes": grown, "ratio": grown / weight_bytes,
                         "seconds": r["seconds"], "result_bytes": r["model_bytes"]})
    return {"benchmark": "load-memory", "weight_bytes": weight_bytes, "rows": rows}

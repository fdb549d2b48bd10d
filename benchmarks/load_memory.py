"""Peak memory while loading a checkpoint: ours against transformers, each in a fresh process.

Writes a random Mixtral-shaped checkpoint of about `--gb` GB (bf16, HF layout, one safetensors file) unless
`--path` names an existing one, then loads it in a child process per loader and reports
(peak RSS - RSS before loading) / bytes of the weights, where "before" is taken after each loader has built
one tiny model (so the one-off loading of libraries is not counted).

    python benchmarks/load_memory.py --gb 1.0
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
def status_kb(field):
    # VmHWM, not ru_maxrss: after fork+exec ru_maxrss still counts the parent's resident pages at fork time.
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
loader, path = sys.argv[1], sys.argv[2]
if loader == "mixtral":
    import mixtral
    load = lambda: mixtral.load(path, progress=False)
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
print(json.dumps({"before_kb": before, "peak_kb": status_kb("VmHWM"), "after_kb": status_kb("VmRSS"),
                  "seconds": seconds}))
"""


def write_checkpoint(path: Path, gb: float) -> int:
    """A random bf16 checkpoint of about `gb` GB; returns the bytes of its weights."""
    import torch

    from mixtral.config import from_name, with_overrides
    from mixtral.io.checkpoint import save_hf
    from mixtral.model import Transformer

    base = with_overrides(from_name("mixtral-8x7b"), dim=1024, hidden_dim=3584, n_heads=8, n_kv_heads=2)
    per_layer = 8 * 3 * 1024 * 3584 + 1024 * 128 * 20
    embeddings = 2 * 32000 * 1024
    n_layers = max(1, round((gb * 1e9 / 2 - embeddings) / per_layer))
    config = with_overrides(base, n_layers=n_layers)
    with torch.device("meta"):
        model = Transformer(config).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_hf(model, path, max_shard_bytes=10 * 1024 ** 3)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(path: Path, loader: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, loader, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="size of the checkpoint to write (default 1.0)")
    parser.add_argument("--path", type=Path, help="measure this checkpoint instead of writing one")
    parser.add_argument("--loaders", default="mixtral,transformers", help="comma-separated: mixtral,transformers")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.path or Path(tmp) / "ckpt"
        if args.path is None:
            weight_bytes = write_checkpoint(path, args.gb)
        else:
            weight_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        print(f"checkpoint: {path}  weights: {weight_bytes / 1e9:.3f} GB")
        print(f"{'loader':<14}{'peak - before (GB)':>20}{'ratio to weights':>18}{'seconds':>10}")
        for loader in args.loaders.split(","):
            r = measure(path, loader)
            grown = (r["peak_kb"] - r["before_kb"]) * 1024
            print(f"{loader:<14}{grown / 1e9:>20.3f}{grown / weight_bytes:>18.2f}{r['seconds']:>10.2f}")


if __name__ == "__main__":
    main()

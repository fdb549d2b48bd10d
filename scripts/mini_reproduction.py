"""The paper's central claim at small scale: at equal training tokens, does a sparse mixture beat dense models?

Trains three models on the default model's corpus with the default model's recipe (configs/default.toml: the
same data order, schedule, optimizer and seed), changing only the feed-forward layers:

    moe           8 experts, top-2 (the default model's architecture)       42.7M parameters, 23.7M active
    dense-active  one FFN of 2 x 688 = 1376: the MoE's active parameters     23.7M
    dense-total   one FFN of 8 x 688 = 5504: the MoE's total parameters      42.7M

then evaluates each final checkpoint on the whole validation split (every window of every domain, not the
training run's sample of them) and writes OUT/results.json, OUT/results.md (the table) and OUT/curves.png
(validation loss per step, one line per model). A run that was stopped continues where it was (`--resume`), so
the script can be run again after an interruption and only finishes what is missing.

    python scripts/build_corpus.py                          # data/corpus, once
    python scripts/mini_reproduction.py                     # 1000 steps each (2.05M tokens), ~45 min on 2 cores
    python scripts/mini_reproduction.py --steps 4000        # the default model's full budget
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

import mixtral
from mixtral.io.files import atomic_path, write_json, write_text
from mixtral.train.config import load_config
from mixtral.train.checkpoints import latest_checkpoint
from mixtral.train.metrics import read_metrics
from mixtral.train.trainer import evaluate

RUNS = {  # name -> (config, what it is)
    "moe": ("configs/default.toml", "8 experts, top-2"),
    "dense-active": ("configs/default-dense-active.toml", "dense, the MoE's active parameters"),
    "dense-total": ("configs/default-dense-total.toml", "dense, the MoE's total parameters"),
}


def train_run(name: str, config: str, out: Path, steps: int, data: str) -> float:
    """Train (or finish training) one model in a subprocess; returns the seconds it took here."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "mixtral", "train", config, "--resume", "--train.steps", str(steps),
           "--out_dir", str(out / name), "--data.dir", data]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def full_validation(name: str, config_path: str, out: Path, steps: int, data: str) -> dict:
    """Validation loss per domain of the run's final checkpoint over every window of the split."""
    config = load_config(config_path, ["--out_dir", str(out / name), "--data.dir", data,
                                       "--eval.max_windows", str(10 ** 9)])
    checkpoint = latest_checkpoint(out / name)
    if checkpoint is None or checkpoint.name != f"step_{steps:06d}":
        raise SystemExit(f"error: {out / name} has no checkpoint of step {steps} (latest: {checkpoint})")
    model = mixtral.load(checkpoint, dtype="float32", progress=False)
    from mixtral.data.shards import TokenShards

    results = evaluate(model, TokenShards(data, "val"), config)
    total, active = model.config.param_counts()
    train = [r for r in read_metrics(out / name / "metrics.jsonl") if r["kind"] == "train"]
    speeds = sorted(r["tokens_per_s"] for r in train if r.get("tokens_per_s"))
    return {"checkpoint": str(checkpoint), "params": total, "active_params": active,
            "tokens": train[-1]["tokens"], "median_tokens_per_s": speeds[len(speeds) // 2],
            "final_train_ce": train[-1]["ce"], "val": results}


def table(results: dict) -> str:
    domains = list(next(iter(results.values()))["val"])
    head = "| model | parameters | active | tokens | train tok/s | " + " | ".join(domains) + " |"
    lines = [head, "|" + "---|" * (5 + len(domains))]
    for name, r in results.items():
        cells = [f"{r['val'][d]['loss']:.3f}" for d in domains]
        lines.append(f"| {name} ({RUNS[name][1]}) | {r['params'] / 1e6:.1f}M | {r['active_params'] / 1e6:.1f}M | "
                     f"{r['tokens'] / 1e6:.2f}M | {r['median_tokens_per_s']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(out: Path, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        val = [r for r in read_metrics(out / name / "metrics.jsonl") if r["kind"] == "val"]
        ax.plot([r["tokens"] / 1e6 for r in val], [r["domains"]["all"]["loss"] for r in val], marker="o", ms=3,
                label=f"{name} ({RUNS[name][1]})")
    ax.set(xlabel="training tokens (millions)", ylabel="validation cross-entropy, all domains (nats)",
           title="mixture of experts against dense models, equal tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="training steps of each run (default: 1000)")
    parser.add_argument("--out", default="out/repro", help="where the runs and results go (default: out/repro)")
    parser.add_argument("--data", default="data/corpus", help="the prepared corpus (default: data/corpus)")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"which runs (default: {','.join(RUNS)})")
    args = parser.parse_args(argv)
    out, names = Path(args.out), args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown run {unknown[0]!r}; choose among {', '.join(RUNS)}")
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        train_run(name, RUNS[name][0], out, args.steps, args.data)
    results = {}
    with torch.inference_mode():
        for name in names:
            results[name] = full_validation(name, RUNS[name][0], out, args.steps, args.data)
            print(f"{name}: all-domain validation loss {results[name]['val']['all']['loss']:.4f}", flush=True)
    write_json(out / "results.json", {"steps": args.steps, "data": args.data, "runs": results}, indent=1)
    write_text(out / "results.md", table(results))
    plot(out, names)
    print(table(results))
    print(f"wrote {out}/results.json, results.md, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

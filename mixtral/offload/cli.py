"""`mixtral plan`: what to run within a memory budget (`mixtral.offload.plan`), registered on the `mixtral` command
by `add_plan_parser`.

    mixtral plan --model mixtral-8x7b --max-memory 16GB
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixtral.config import parse_size
from mixtral.errors import CheckpointError, InputError
from mixtral.io.loading import inspect_model, is_preset, read_quantization_config, resolve_model
from mixtral.io.quantized import open_expert_files
from mixtral.offload import plan

PLAN_EPILOG = """\
Measures this machine's disk (direct reads of the model's expert files when it is a quantized checkpoint, else of
a temporary file in --disk-dir) and memory bandwidth, then estimates tokens/s for each mix of expert and attention
precision that fits (batch 1, see mixtral.offload.plan for the model of a step), and prints the fastest within the
quality floor, then the others.

examples:
  mixtral plan --model mixtral-8x7b --max-memory 16GB
  mixtral plan --model ./Mixtral-8x7B-v0.1 --max-memory 8GB --max-quality-loss 3 --disk-dir ~/.cache/mixtral
"""


def add_plan_parser(subparsers, parents: dict[str, argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `plan` on the subparsers of the `mixtral` command; `parents` as `mixtral.cli.shared_parents`."""
    p = subparsers.add_parser("plan", parents=[parents["verbose"], parents["model"]],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=PLAN_EPILOG,
                              help="choose precisions and expert slots for a memory budget",
                              description="Given a memory budget, choose what stays resident, the experts' "
                                          "precision and the number of expert slots, and estimate tokens/s.")
    p.add_argument("--max-memory", required=True, metavar="SIZE", help="the budget, e.g. 16GB or 12GiB")
    p.add_argument("--max-quality-loss", type=float, default=100 * plan.DEFAULT_QUALITY_FLOOR, metavar="PERCENT",
                   help="largest perplexity increase to accept, in percent, as measured on the default model "
                        f"(default: {100 * plan.DEFAULT_QUALITY_FLOOR:g}; a negative value: any)")
    p.add_argument("--context", type=int, default=4096, help="tokens of KV cache to reserve (default: 4096)")
    p.add_argument("--disk-dir", type=Path, default=Path.home() / ".cache" / "mixtral",
                   help="a directory on the disk the experts will be read from (default: ~/.cache/mixtral)")
    p.add_argument("--json", action="store_true", help="print the plans as JSON")
    p.set_defaults(run=cmd_plan)
    return p


def cmd_plan(args: argparse.Namespace) -> int:
    budget = parse_size(args.max_memory, "--max-memory")
    if args.context < 1:
        raise InputError(f"--context must be at least 1, got {args.context}")
    config, _ = inspect_model(args.model)
    files = _expert_files(args.model, config)
    try:
        machine = plan.measure_machine(args.disk_dir, files)
    finally:
        for file in files:
            file.close()
    loss = None if args.max_quality_loss < 0 else args.max_quality_loss / 100
    found = plan.plans(config, budget, machine, context=args.context, max_quality_loss=loss)
    if args.json:
        print(json.dumps({"machine": vars(machine), "plans": [
            {**vars(p), "tokens_per_s": p.tokens_per_s, "memory_bytes": p.memory_bytes} for p in found]}, indent=2))
        return 0
    where = f"random expert records of {args.model}" if files else f"a new file in {args.disk_dir}"
    print(f"machine: disk {machine.disk_bytes_per_s / 1e9:.2f} GB/s (direct reads of {where}), "
          f"memory {machine.memory_bytes_per_s / 1e9:.1f} GB/s")
    if not found:
        smallest = plan.resident_bytes(config, "int4", "int8", args.context) + config.top_k * plan.expert_bytes(
            config, plan.EXPERT_CHOICES[-1])
        raise InputError(f"--max-memory {args.max_memory} is too small for {args.model}: even int4 attention and "
                         f"{plan.EXPERT_CHOICES[-1]} experts need {smallest / 1e9:.2f} GB resident")
    best = found[0]
    print(f"plan: {plan.describe(best, budget)}")
    parts = " ".join(f"--{part} {spec}" for part, spec in best.quantize.items())
    source = "FLOAT_CHECKPOINT" if files else args.model  # a quantized checkpoint cannot be quantized again
    print(f"run:  mixtral quantize {source} OUT {parts}\n      mixtral generate --model OUT --max-memory "
          f"{args.max_memory} \"...\"")
    print("\nother plans that fit, fastest first:")
    for p in found[1:]:
        print(f"  {plan.describe(p, budget)}")
    return 0


def _expert_files(model: str, config) -> list:
    """The expert files of `model` when it is a quantized checkpoint that has them (the disk is then measured on
    them), else []."""
    if is_preset(model) or read_quantization_config(resolve_model(model)) is None:
        return []
    try:
        return open_expert_files(resolve_model(model), config)
    except CheckpointError:  # format 1: its experts are in model.safetensors
        return []


def stats_lines(stats: dict) -> list[str]:
    """The offloading engine's counters (`Engine.stats()`) as lines for a person: totals and per generated token
    (forward step)."""
    steps = max(stats["steps"], 1)
    needed = max(stats["needed"], 1)
    return [
        f"offload: {stats['slots']} expert slots of {stats['record_bytes'] / 1e6:.1f} MB; {stats['steps']} steps, "
        f"{stats['needed']} experts needed: {stats['hits']} hits, {stats['prefetch_hits']} prefetch hits, "
        f"{stats['demand_loads']} demand loads ({100 * (stats['hits'] + stats['prefetch_hits']) / needed:.1f}% hit "
        f"rate); {stats['prefetch_loads']} prefetched, {stats['loads_in_vain']} in vain",
        f"offload: read {stats['bytes_read'] / 1e9:.2f} GB in {stats['read_seconds']:.2f} s of reading; stalled "
        f"{stats['stall_seconds']:.2f} s on I/O",
        f"offload per step: {stats['demand_loads'] / steps:.2f} demand loads, {stats['prefetch_loads'] / steps:.2f} "
        f"prefetches, {stats['bytes_read'] / steps / 1e6:.1f} MB read, {1e3 * stats['stall_seconds'] / steps:.0f} ms "
        f"stalled",
    ]

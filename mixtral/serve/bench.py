"""`mixtral bench serve`: latency and throughput of `mixtral serve` under 1, 4, 16 and 64 concurrent clients.

Starts the real server in a subprocess (the command a user runs) and drives it over HTTP from this process: for
each level, `--clients` concurrent clients each send `--requests` streaming completions one after another, every
one a prompt of `--prompt-tokens` random token ids and `--new-tokens` greedy tokens (`ignore_eos`, so each request
generates them all; `logprobs: 0`, so each token arrives in a chunk of its own and is timed on arrival).
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mixtral.bench import (Column, format_header, format_row, parse_list, print_provenance, provenance, report,
                           synthetic_checkpoint)
from mixtral.errors import InputError
from mixtral.serve.metrics import parse

SERVE_EPILOG = """\
Serves --model (default: the bundled default model), or with --synthetic a checkpoint shaped like Mixtral-8x7B cut
to --synthetic-layers layers (random bf16 weights, written into --workdir as `mixtral bench e2e` writes it, and
reused there; 2 layers = 6.3 GB, ~7 GB of RAM while serving). The server gets --max-batch = the largest --clients,
rows of --prompt-tokens + --new-tokens tokens, and --threads threads; the clients run in this process. Columns:
  ttft p50/p99    ms from sending a request to receiving its first token
  itl p50/p99     ms between two consecutive tokens of one request (inter-token latency)
  tok/s           tokens received / wall time of the level (what the server delivered, prefill and waits included)
  decode tok/s    clients x (tokens after the first) / (time from the first token to the last), both summed over
                  the level's requests: the decode rate of that many streams running side by side
  x decode        decode tok/s over the 1-client level's
  rows/step       mean rows of the server's decode steps during the level (from its /metrics)

examples:
  mixtral bench serve                                       # the default model, 1/4/16/64 clients
  mixtral bench serve --clients 1,4 --requests 1 --new-tokens 16
  mixtral bench serve --synthetic --workdir /data/bench     # the Mixtral-8x7B-shaped model, 2 layers
"""

COLUMNS: list[Column] = [
    ("clients", "clients", 7, "d"), ("requests", "requests", 8, "d"), ("ttft_p50_ms", "ttft p50", 9, ".1f"),
    ("ttft_p99_ms", "ttft p99", 9, ".1f"), ("itl_p50_ms", "itl p50", 8, ".1f"), ("itl_p99_ms", "itl p99", 8, ".1f"),
    ("tok_s", "tok/s", 8, ".1f"), ("decode_tok_s", "decode tok/s", 12, ".1f"), ("x_decode", "x decode", 8, ".2f"),
    ("rows_per_step", "rows/step", 9, ".1f"),
]

TARGET_CLIENTS, TARGET_RATIO = 16, 6.0  # issue 6: 16 clients reach >= 6x one client's decode tokens/s


def add_serve_benchmark(commands) -> argparse.ArgumentParser:
    """Register `serve` on the subcommands of `mixtral bench`."""
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    p = commands.add_parser("serve", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SERVE_EPILOG,
                            help="mixtral serve under 1..64 concurrent clients: latency and tokens/s",
                            description="Time to first token, inter-token latency and aggregate tokens/s of "
                                        "`mixtral serve` under concurrent streaming clients.")
    p.add_argument("--model", default="default", metavar="PATH_OR_PRESET",
                   help="what the server serves (default: the bundled default model)")
    p.add_argument("--synthetic", action="store_true",
                   help="serve a synthetic Mixtral-8x7B-shaped checkpoint instead of --model")
    p.add_argument("--synthetic-layers", type=int, default=2, help="its layers (default: 2, 6.3 GB)")
    p.add_argument("--synthetic-config", default="mixtral-8x7b", help=argparse.SUPPRESS)  # tests: a tiny preset
    p.add_argument("--workdir", metavar="DIR", help="where the synthetic checkpoint is written and reused (default: "
                                                    "a temporary directory, deleted afterwards)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="passed to mixtral serve")
    p.add_argument("--clients", default="1,4,16,64", help="comma-separated concurrency levels (default: 1,4,16,64)")
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another (default: 2)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="tokens of each prompt (default: 16)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request (default: 32)")
    p.add_argument("--threads", type=int, default=threads, help=f"torch threads of the server (default: {threads})")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and the synthetic weights (default: 0)")
    p.add_argument("--startup-timeout", type=float, default=900,
                   help="seconds to wait for the server to load the model (default: 900)")
    p.add_argument("--json", metavar="PATH", help="also write all rows to this JSON file (atomically)")
    p.set_defaults(run=run_serve)
    return p


def run_serve(args: argparse.Namespace) -> int:
    """`bench serve`: returns 0, or 1 when a request failed or came back short."""
    if importlib.util.find_spec("httpx") is None:
        raise InputError("mixtral bench serve drives the server with httpx, which is not installed; install the test "
                         "extra: pip install -e '.[test]' (or pip install httpx)")
    for name in ("requests", "prompt_tokens", "threads", "synthetic_layers"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.new_tokens < 2:
        raise InputError(f"--new-tokens must be at least 2 (inter-token latency needs a second token), "
                         f"got {args.new_tokens}")
    if args.synthetic and args.model != "default":
        raise InputError("--synthetic serves its own checkpoint; leave out --model")
    levels = parse_list(args.clients, int, "--clients")
    torch.set_num_threads(args.threads)  # the server's count; the header reports this process's (it only drives)
    return report(args, bench_serve(args, levels))


def bench_serve(args: argparse.Namespace, levels: list[int]) -> dict:
    info = provenance(args)
    print_provenance(info)
    temp_dir = None
    model = args.model
    if args.synthetic:
        if args.workdir is None:
            temp_dir = Path(tempfile.mkdtemp(prefix="mixtral-bench-serve-"))
        workdir = Path(args.workdir) if args.workdir is not None else temp_dir
        workdir.mkdir(parents=True, exist_ok=True)
        model = str(synthetic_checkpoint(workdir, args.synthetic_config, args.synthetic_layers, args.seed))
    log = Path(tempfile.mkstemp(prefix="mixtral-serve-", suffix=".log")[1])
    server = None
    try:
        command = [sys.executable, "-m", "mixtral", "serve", "--model", model, "--port", "0", "--no-access-log",
                   "--threads", str(args.threads), "--max-batch", str(max(levels)), "--max-queue", str(max(levels)),
                   "--max-seq-len", str(args.prompt_tokens + args.new_tokens)]
        command += ["--dtype", args.dtype] if args.dtype else []
        print(f"# server: {' '.join(command[1:])}", flush=True)
        server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        name, url = _wait_for_server(server, log, args.startup_timeout)
        rows = asyncio.run(_levels(args, levels, name, url))
    finally:
        if server is not None:
            _stop(server)
        log.unlink(missing_ok=True)
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
    one = next((r for r in rows if r["clients"] == 1), None)
    target = next((r for r in rows if r["clients"] == TARGET_CLIENTS), None)
    if one is not None and target is not None:
        verdict = "met" if target["x_decode"] >= TARGET_RATIO else "missed"
        print(f"\n{TARGET_CLIENTS} clients: decode {target['decode_tok_s']:.1f} tokens/s = {target['x_decode']:.2f}x "
              f"one client's {one['decode_tok_s']:.1f} (issue 6 target: >= {TARGET_RATIO:g}x: {verdict})")
    failed = sum(r["failed"] for r in rows)
    if failed:
        print(f"FAILED: {failed} requests failed or came back short")
    return {**info, "benchmark": "serve", "model": model, "rows": rows, "passed": not failed}


def _wait_for_server(server: subprocess.Popen, log: Path, timeout: float) -> tuple[str, str]:
    """(served model name, base URL) from the server's "serving NAME on URL" line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            words = line.split()
            if len(words) >= 4 and words[0] == "serving" and words[2] == "on":
                return words[1], words[3]
        if server.poll() is not None:
            raise InputError(f"mixtral serve exited with {server.returncode}:\n{log.read_text(errors='replace')}")
        time.sleep(0.2)
    raise InputError(f"mixtral serve did not start within {timeout:g} s (--startup-timeout):\n"
                     f"{log.read_text(errors='replace')}")


def _stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank q-quantile (0 < q <= 1) of `values`; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def _levels(args: argparse.Namespace, levels: list[int], name: str, url: str) -> list[dict]:
    import httpx

    generator = torch.Generator().manual_seed(args.seed)
    rows: list[dict] = []
    print(f"\nserving {name}: prompts of {args.prompt_tokens} random tokens, {args.new_tokens} new tokens greedy, "
          f"{args.requests} requests per client; times in ms")
    print(format_header(COLUMNS), flush=True)
    limits = httpx.Limits(max_connections=max(levels) + 2, max_keepalive_connections=max(levels) + 2)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:

        async def request() -> tuple[float, list[float], str | None]:
            """(send time, arrival time of each token, error or None) of one streaming completion."""
            prompt = torch.randint(3, 32000, (args.prompt_tokens,), generator=generator).tolist()
            body = {"model": name, "prompt": prompt, "max_tokens": args.new_tokens, "temperature": 0,
                    "ignore_eos": True, "logprobs": 0, "stream": True}
            times: list[float] = []
            sent = time.perf_counter()
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    return sent, times, f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    now = time.perf_counter()
                    chunk = json.loads(line[len("data: "):])
                    if "error" in chunk:
                        return sent, times, chunk["error"]["message"]
                    logprobs = chunk["choices"][0]["logprobs"] if chunk["choices"] else None
                    times.extend([now] * len(logprobs["tokens"] if logprobs else ()))
            error = None if len(times) == args.new_tokens else f"{len(times)} of {args.new_tokens} tokens"
            return sent, times, error

        async def client_loop() -> list[tuple[float, list[float], str | None]]:
            return [await request() for _ in range(args.requests)]

        async def batch_stats() -> tuple[float, float]:
            values = parse((await client.get("/metrics")).text)
            return values["mixtral_decode_batch_size_sum"], values["mixtral_decode_batch_size_count"]

        await request()  # warm-up: the first request of a fresh server pays for allocations
        for clients in levels:
            rows_before, steps_before = await batch_stats()
            start = time.perf_counter()
            results = [r for rs in await asyncio.gather(*(client_loop() for _ in range(clients))) for r in rs]
            wall = time.perf_counter() - start
            rows_after, steps_after = await batch_stats()
            good = [(sent, times) for sent, times, error in results if error is None]
            ttft = [(times[0] - sent) * 1e3 for sent, times in good]
            itl = [(b - a) * 1e3 for _, times in good for a, b in zip(times, times[1:])]
            decode_time = sum(times[-1] - times[0] for _, times in good)
            row = {"clients": clients, "requests": len(results), "failed": len(results) - len(good),
                   "errors": sorted({e for _, _, e in results if e is not None})[:3],
                   "ttft_p50_ms": percentile(ttft, 0.5), "ttft_p99_ms": percentile(ttft, 0.99),
                   "itl_p50_ms": percentile(itl, 0.5), "itl_p99_ms": percentile(itl, 0.99),
                   "tok_s": sum(len(t) for _, t in good) / wall, "wall_s": wall,
                   "decode_tok_s": (clients * sum(len(t) - 1 for _, t in good) / decode_time
                                    if decode_time > 0 else None),
                   "rows_per_step": ((rows_after - rows_before) / (steps_after - steps_before)
                                     if steps_after > steps_before else None)}
            one = next((r for r in rows + [row] if r["clients"] == 1), None)
            if one is not None and row["decode_tok_s"] and one["decode_tok_s"]:
                row["x_decode"] = row["decode_tok_s"] / one["decode_tok_s"]
            rows.append(row)
            print(format_row(COLUMNS, row), flush=True)
            for error in row["errors"]:
                print(f"  error: {error}")
    return rows

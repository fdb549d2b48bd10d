"""`mixtral bench serve`: latency and throughput of `mixtral serve` under 1, 4, 16 and 64 concurrent clients.

Starts the real server in a subprocess (the command a user runs) and drives it over HTTP from this process: for
each level, `--clients` concurrent clients each send `--requests` streaming completions one after another, every
one a prompt of `--prompt-tokens` random token ids and `--new-tokens` greedy tokens (`ignore_eos`, so each request
generates them all; `logprobs: 0`, so each token arrives in a chunk of its own and is timed on arrival).
"""
from __future__ import annotations

import asyncio
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mixtral.bench.e2e import synthetic_model
from mixtral.bench.harness import Column, format_header, format_row
from mixtral.errors import InputError
from mixtral.serve.metrics import parse

EPILOG = """\
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

# What batched decoding is for: 16 clients together decode at least 6x the tokens/s of one client alone.
TARGET_CLIENTS, TARGET_RATIO = 16, 6.0


def run(*, model: str, synthetic: bool, synthetic_config: str, synthetic_layers: int, workdir: str | None,
        dtype: str | None, levels: list[int], requests: int, prompt_tokens: int, new_tokens: int, threads: int,
        seed: int, startup_timeout: float) -> dict:
    """Serve `model` (or with `synthetic` the checkpoint `mixtral bench e2e` writes, see `e2e.synthetic_model`)
    with `mixtral serve` in a subprocess of `threads` threads, then drive it at each concurrency level of `levels`:
    that many clients each sending `requests` streaming completions of `prompt_tokens` random ids and `new_tokens`
    (at least 2) greedy tokens. Prints the table as it goes; returns {"benchmark": "serve", "model", "rows",
    "passed"} (passed: every request came back whole). Raises InputError when the server does not start."""
    assert new_tokens >= 2, "inter-token latency needs a second token"
    if synthetic:
        with synthetic_model(synthetic_config, synthetic_layers, seed, workdir, "mixtral-bench-serve-") as path:
            rows = _serve_and_drive(str(path), dtype, levels, requests, prompt_tokens, new_tokens, threads, seed,
                                    startup_timeout)
        model = str(path)
    else:
        rows = _serve_and_drive(model, dtype, levels, requests, prompt_tokens, new_tokens, threads, seed,
                                startup_timeout)
    one = next((r for r in rows if r["clients"] == 1), None)
    target = next((r for r in rows if r["clients"] == TARGET_CLIENTS), None)
    if one is not None and target is not None:
        verdict = "met" if target["x_decode"] >= TARGET_RATIO else "missed"
        print(f"\n{TARGET_CLIENTS} clients: decode {target['decode_tok_s']:.1f} tokens/s = {target['x_decode']:.2f}x "
              f"one client's {one['decode_tok_s']:.1f} (target: >= {TARGET_RATIO:g}x: {verdict})")
    failed = sum(r["failed"] for r in rows)
    if failed:
        print(f"FAILED: {failed} requests failed or came back short")
    return {"benchmark": "serve", "model": model, "rows": rows, "passed": not failed}


def _serve_and_drive(model: str, dtype: str | None, levels: list[int], requests: int, prompt_tokens: int,
                     new_tokens: int, threads: int, seed: int, startup_timeout: float) -> list[dict]:
    """The rows of each level, from a `mixtral serve` of `model` started for them and stopped afterwards."""
    log = Path(tempfile.mkstemp(prefix="mixtral-serve-", suffix=".log")[1])
    server = None
    try:
        command = [sys.executable, "-m", "mixtral", "serve", "--model", model, "--port", "0", "--no-access-log",
                   "--threads", str(threads), "--max-batch", str(max(levels)), "--max-queue", str(max(levels)),
                   "--max-seq-len", str(prompt_tokens + new_tokens)]
        command += ["--dtype", dtype] if dtype else []
        print(f"# server: {' '.join(command[1:])}", flush=True)
        server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        name, url = _wait_for_server(server, log, startup_timeout)
        return asyncio.run(_levels(levels, name, url, requests, prompt_tokens, new_tokens, seed))
    finally:
        if server is not None:
            _stop(server)
        log.unlink(missing_ok=True)


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


async def _levels(levels: list[int], name: str, url: str, requests: int, prompt_tokens: int, new_tokens: int,
                  seed: int) -> list[dict]:
    import httpx

    generator = torch.Generator().manual_seed(seed)
    rows: list[dict] = []
    print(f"\nserving {name}: prompts of {prompt_tokens} random tokens, {new_tokens} new tokens greedy, "
          f"{requests} requests per client; times in ms")
    print(format_header(COLUMNS), flush=True)
    limits = httpx.Limits(max_connections=max(levels) + 2, max_keepalive_connections=max(levels) + 2)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:

        async def request() -> tuple[float, list[float], str | None]:
            """(send time, arrival time of each token, error or None) of one streaming completion."""
            prompt = torch.randint(3, 32000, (prompt_tokens,), generator=generator).tolist()
            body = {"model": name, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
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
            error = None if len(times) == new_tokens else f"{len(times)} of {new_tokens} tokens"
            return sent, times, error

        async def client_loop() -> list[tuple[float, list[float], str | None]]:
            return [await request() for _ in range(requests)]

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

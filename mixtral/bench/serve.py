"""`mixtral bench serve`: latency and throughput of `mixtral serve` under 1, 4, 16 and 64 concurrent clients.

Starts the real server in a subprocess (the command a user runs) and drives it over HTTP from this process: for
each level, `--clients` concurrent clients each send `--requests` streaming completions one after another, every
one a prompt of `--prompt-tokens` random token ids and `--new-tokens` greedy tokens (`ignore_eos`, so each request
generates them all; `logprobs: 0`, so each token arrives in a chunk of its own and is timed on arrival).
With `--shared-prefix N` every prompt starts with the same N tokens (a system prompt) before its own, and the
whole run is made twice, against a server with prefix caching and one without, to compare the time to the first
token.
"""
from __future__ import annotations

import asyncio
import json
import math
import signal
import statistics
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
reused there; 2 layers = 6.3 GB, ~7 GB of RAM while serving, as much again in this process for the 1-client
comparison). The server gets --max-batch = the largest --clients, sequences of --prompt-tokens + --new-tokens
tokens, and --threads threads; the clients run in this process. Columns:
  ttft p50/p99    ms from sending a request to receiving its first token
  itl p50/p99     ms between two consecutive tokens of one request (inter-token latency)
  tok/s           tokens received / wall time of the level (what the server delivered, prefill and waits included)
  decode tok/s    clients x (tokens after the first) / (time from the first token to the last), both summed over
                  the level's requests: the decode rate of that many streams running side by side
  x decode        decode tok/s over the 1-client level's
  rows/step       mean rows of the server's decode steps during the level (from its /metrics)
  peak rows       the most sequences the server ran at once so far (its KV memory and --max-batch bound it)
  preempted       sequences the server sent back to its queue in the level because its KV memory was full
  cached %        prompt tokens of the level taken from the prefix cache instead of computed
With --shared-prefix N: prompts of N shared tokens + --prompt-tokens of their own; each level runs against a
server with prefix caching, then against one started with --no-prefix-caching, and the summary gives the time to
first token without over with (target: >= 5x at 16 clients with a 1,000-token prefix).
With a 1-client level, the model is also loaded in this process and 5 more requests alternate with
mixtral.generate on a prompt of the same length: one client's decode tokens/s over generate's (medians; target:
>= 95%), what the server costs per token.

examples:
  mixtral bench serve                                       # the default model, 1/4/16/64 clients
  mixtral bench serve --shared-prefix 1000 --clients 16 --requests 1 --new-tokens 8   # prefix caching's TTFT
  mixtral bench serve --clients 64 --prompt-tokens 500 --new-tokens 12 --kv-cache-memory 64MiB  # rows per memory
  mixtral bench serve --clients 1,4 --requests 1 --new-tokens 16
  mixtral bench serve --synthetic --workdir /data/bench     # the Mixtral-8x7B-shaped model, 2 layers
"""

COLUMNS: list[Column] = [
    ("clients", "clients", 7, "d"), ("requests", "requests", 8, "d"), ("ttft_p50_ms", "ttft p50", 9, ".1f"),
    ("ttft_p99_ms", "ttft p99", 9, ".1f"), ("itl_p50_ms", "itl p50", 8, ".1f"), ("itl_p99_ms", "itl p99", 8, ".1f"),
    ("tok_s", "tok/s", 8, ".1f"), ("decode_tok_s", "decode tok/s", 12, ".1f"), ("x_decode", "x decode", 8, ".2f"),
    ("rows_per_step", "rows/step", 9, ".1f"), ("peak_rows", "peak rows", 9, "d"), ("preempted", "preempted", 9, "d"),
    ("cached_pct", "cached %", 8, ".1f"),
]

# What batched decoding is for: 16 clients together decode at least 6x the tokens/s of one client alone.
TARGET_CLIENTS, TARGET_RATIO = 16, 6.0
# What prefix caching is for: with a shared 1,000-token system prompt, 16 clients get their first token at least
# 5x sooner than without it.
PREFIX_TARGET_RATIO = 5.0
# What the server costs per token: one client decodes at least 95% as fast as mixtral.generate on the same model.
GENERATE_TARGET_RATIO = 0.95


def run(*, model: str, synthetic: bool, synthetic_config: str, synthetic_layers: int, workdir: str | None,
        dtype: str | None, levels: list[int], requests: int, prompt_tokens: int, new_tokens: int, threads: int,
        seed: int, startup_timeout: float, shared_prefix: int = 0, kv_cache_memory: str | None = None) -> dict:
    """Serve `model` (or with `synthetic` the checkpoint `mixtral bench e2e` writes, see `e2e.synthetic_model`)
    with `mixtral serve` in a subprocess of `threads` threads, then drive it at each concurrency level of `levels`:
    that many clients each sending `requests` streaming completions of `prompt_tokens` random ids and `new_tokens`
    (at least 2) greedy tokens, after `shared_prefix` tokens that every prompt shares (then the run is made with
    and without prefix caching). `kv_cache_memory`: the server's --kv-cache-memory. Prints the table as it goes;
    returns {"benchmark": "serve", "model", "rows", "passed"} (passed: every request came back whole; each row
    says whether its server cached prefixes). Raises InputError when the server does not start."""
    assert new_tokens >= 2, "inter-token latency needs a second token"
    settings = [True, False] if shared_prefix else [True]

    def drive(path: str) -> list[dict]:
        rows = []
        for caching in settings:
            flags = [] if caching else ["--no-prefix-caching"]
            flags += ["--kv-cache-memory", kv_cache_memory] if kv_cache_memory else []
            if shared_prefix:
                print(f"\n# prefix caching {'on' if caching else 'off'}")
            level_rows = _serve_and_drive(path, dtype, levels, requests, prompt_tokens, new_tokens, threads, seed,
                                          startup_timeout, shared_prefix, flags)
            rows += [{**row, "prefix_caching": caching} for row in level_rows]
        return rows

    if synthetic:
        with synthetic_model(synthetic_config, synthetic_layers, seed, workdir, "mixtral-bench-serve-") as path:
            rows = drive(str(path))
        model = str(path)
    else:
        rows = drive(model)
    if shared_prefix:
        _prefix_summary(rows, shared_prefix)
    rows_on = [r for r in rows if r["prefix_caching"]]
    one = next((r for r in rows_on if r["clients"] == 1), None)
    target = next((r for r in rows_on if r["clients"] == TARGET_CLIENTS), None)
    if one is not None and target is not None and not shared_prefix:
        verdict = "met" if target["x_decode"] >= TARGET_RATIO else "missed"
        print(f"\n{TARGET_CLIENTS} clients: decode {target['decode_tok_s']:.1f} tokens/s = {target['x_decode']:.2f}x "
              f"one client's {one['decode_tok_s']:.1f} (target: >= {TARGET_RATIO:g}x: {verdict})")
    side = next((r["side_by_side"] for r in rows_on if "side_by_side" in r), None)
    if side is not None:
        verdict = "met" if side["ratio"] >= GENERATE_TARGET_RATIO else "missed"
        print(f"\n1 client, {side['repeats']} requests alternated with mixtral.generate in this process: decode "
              f"{side['server_tok_s']:.1f} tokens/s through the server = {100 * side['ratio']:.1f}% of generate's "
              f"{side['generate_tok_s']:.1f} (medians; target: >= {100 * GENERATE_TARGET_RATIO:g}%: {verdict})")
    failed = sum(r["failed"] for r in rows)
    if failed:
        print(f"FAILED: {failed} requests failed or came back short")
    return {"benchmark": "serve", "model": model, "rows": rows, "passed": not failed}


def _load_reference(model: str, dtype: str | None, threads: int):
    """The served model loaded in this process as the server loads it, with `threads` threads: the reference the
    server's one-client decode is compared with."""
    from mixtral.io.loading import load_model_and_tokenizer

    torch.set_num_threads(threads)
    loaded, _ = load_model_and_tokenizer(model, dtype=dtype, progress=False)
    return loaded


def _generate_decode_rate(model, prompt: list[int], new_tokens: int) -> float:
    """mixtral.generate's decode tokens/s on `prompt`, by the server's definition: tokens after the first over the
    time from the first token to the last."""
    from mixtral.generate import stream

    times = []
    with torch.inference_mode():
        for _ in stream(model, [prompt], new_tokens, eos_id=None):
            times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


def _prefix_summary(rows: list[dict], shared_prefix: int) -> None:
    """Print each level's time to first token without prefix caching over with it."""
    print(f"\ntime to first token with a shared prefix of {shared_prefix} tokens, without / with prefix caching:")
    for on in (r for r in rows if r["prefix_caching"]):
        off = next((r for r in rows if not r["prefix_caching"] and r["clients"] == on["clients"]), None)
        if off is None or not on["ttft_p50_ms"] or off["ttft_p50_ms"] is None:
            continue
        on["ttft_speedup"] = off["ttft_p50_ms"] / on["ttft_p50_ms"]
        line = (f"  {on['clients']:3d} clients: p50 {off['ttft_p50_ms']:.0f} / {on['ttft_p50_ms']:.0f} ms = "
                f"{on['ttft_speedup']:.1f}x")
        if on["clients"] == TARGET_CLIENTS and shared_prefix >= 1000:
            verdict = "met" if on["ttft_speedup"] >= PREFIX_TARGET_RATIO else "missed"
            line += f" (target: >= {PREFIX_TARGET_RATIO:g}x: {verdict})"
        print(line)


def _serve_and_drive(model: str, dtype: str | None, levels: list[int], requests: int, prompt_tokens: int,
                     new_tokens: int, threads: int, seed: int, startup_timeout: float, shared_prefix: int = 0,
                     flags: list[str] = ()) -> list[dict]:
    """The rows of each level, from a `mixtral serve` of `model` (with `flags`) started for them and stopped
    afterwards."""
    log = Path(tempfile.mkstemp(prefix="mixtral-serve-", suffix=".log")[1])
    server = None
    try:
        command = [sys.executable, "-m", "mixtral", "serve", "--model", model, "--port", "0", "--no-access-log",
                   "--threads", str(threads), "--max-batch", str(max(levels)), "--max-queue", str(max(levels)),
                   "--max-seq-len", str(shared_prefix + prompt_tokens + new_tokens), *flags]
        command += ["--dtype", dtype] if dtype else []
        print(f"# server: {' '.join(command[1:])}", flush=True)
        server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # One client is compared with mixtral.generate side by side, alternating, while the server idles between
        # requests: timings on shared machines drift, so a reference measured before or after is no reference.
        reference = _load_reference(model, dtype, threads) if 1 in levels and "--no-prefix-caching" not in flags \
            else None
        name, url = _wait_for_server(server, log, startup_timeout)
        return asyncio.run(_levels(levels, name, url, requests, prompt_tokens, new_tokens, seed, shared_prefix,
                                   reference))
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
                  seed: int, shared_prefix: int = 0, reference=None, side_by_side: int = 5) -> list[dict]:
    import httpx

    generator = torch.Generator().manual_seed(seed)
    # The shared prefix starts with BOS, like a chat's system prompt. The warm-up request sends it too: the levels
    # measure a server that has seen its system prompt before, as any does after its first request.
    prefix = [1] + torch.randint(3, 32000, (shared_prefix - 1,), generator=generator).tolist() if shared_prefix else []
    rows: list[dict] = []
    shared = f"{shared_prefix} shared + " if shared_prefix else ""
    print(f"\nserving {name}: prompts of {shared}{prompt_tokens} random tokens, {new_tokens} new tokens greedy, "
          f"{requests} requests per client; times in ms")
    print(format_header(COLUMNS), flush=True)
    limits = httpx.Limits(max_connections=max(levels) + 2, max_keepalive_connections=max(levels) + 2)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:

        async def request() -> tuple[float, list[float], str | None]:
            """(send time, arrival time of each token, error or None) of one streaming completion."""
            prompt = prefix + torch.randint(3, 32000, (prompt_tokens,), generator=generator).tolist()
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

        async def server_stats() -> dict[str, float]:
            return parse((await client.get("/metrics")).text)

        await request()  # warm-up: the first request of a fresh server pays for allocations
        for clients in levels:
            before = await server_stats()
            start = time.perf_counter()
            results = [r for rs in await asyncio.gather(*(client_loop() for _ in range(clients))) for r in rs]
            wall = time.perf_counter() - start
            after = await server_stats()
            rows_sum, steps = (after[k] - before[k] for k in ("mixtral_decode_batch_size_sum",
                                                              "mixtral_decode_batch_size_count"))
            cached, computed = (after[k] - before[k] for k in ("mixtral_prefix_cache_hit_tokens_total",
                                                               "mixtral_prefill_tokens_total"))
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
                   "rows_per_step": rows_sum / steps if steps else None,
                   "peak_rows": int(after["mixtral_running_sequences_peak"]),
                   "preempted": int(after["mixtral_preemptions_total"] - before["mixtral_preemptions_total"]),
                   "cached_pct": 100 * cached / (cached + computed) if cached + computed else None}
            one = next((r for r in rows + [row] if r["clients"] == 1), None)
            if one is not None and row["decode_tok_s"] and one["decode_tok_s"]:
                row["x_decode"] = row["decode_tok_s"] / one["decode_tok_s"]
            rows.append(row)
            print(format_row(COLUMNS, row), flush=True)
            for error in row["errors"]:
                print(f"  error: {error}")
            if clients == 1 and reference is not None:
                row["side_by_side"] = await _side_by_side(request, reference, shared_prefix + prompt_tokens,
                                                          new_tokens, side_by_side)
    return rows


async def _side_by_side(request, reference, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """One client's decode tokens/s through the server and mixtral.generate's in this process, alternated
    `repeats` times on prompts of the same length: the medians and their ratio."""
    served, generated = [], []
    prompt = [1] + list(range(100, 100 + prompt_tokens - 1))
    for _ in range(repeats):
        sent, times, error = await request()
        if error is None:
            served.append((len(times) - 1) / (times[-1] - times[0]))
        generated.append(_generate_decode_rate(reference, prompt, new_tokens))
    server_rate, generate_rate = statistics.median(served), statistics.median(generated)
    return {"repeats": repeats, "server_tok_s": server_rate, "generate_tok_s": generate_rate,
            "ratio": server_rate / generate_rate}

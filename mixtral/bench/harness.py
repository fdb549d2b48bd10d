"""What every benchmark of `mixtral bench` shares: timing, provenance, tables, options' lists, JSON results.

    seconds = timed(fn, repeats=5, min_seconds=0.5, between=cache_flusher())
    info = provenance(settings); print_provenance(info)    # date, command, settings, versions, threads, CPU, load
    print(format_header(COLUMNS)); print(format_row(COLUMNS, row))
    exit_code = report(result, json_path)                   # load average at the end, --json written atomically

Every table of `moe`, `e2e` and `serve` starts with the date, the command line, the resolved settings,
torch/transformers versions, the thread count and the CPU, so a number pasted elsewhere carries its provenance.
"""
from __future__ import annotations

import datetime
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from mixtral import kernels
from mixtral.config import DTYPE_ALIASES, dtype_name, parse_dtype
from mixtral.errors import InputError
from mixtral.io.files import write_json
from mixtral.quant import MODES as QUANT_MODES

# The start of the scripts the memory benchmarks run in a fresh process: peak and current resident memory.
CHILD_STATUS_KB = r"""
def status_kb(field):
    # VmHWM, not ru_maxrss: after fork+exec ru_maxrss still counts the parent's resident pages at fork time.
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
"""

# ---- measuring -------------------------------------------------------------------------------------------------

def timed(fn: Callable[[], object], repeats: int, min_seconds: float, warmup: int = 1, best: bool = False,
          between: Callable[[], object] | None = None) -> float:
    """Median seconds of `fn()` over at least `repeats` calls and `min_seconds` in all, after `warmup` calls;
    the fastest call instead with `best` (for a ceiling: what the machine can do, not what it usually does).
    `between` runs untimed before each timed call (`cache_flusher`)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        if between is not None:
            between()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) if best else statistics.median(times)


def cache_flusher(min_bytes: int = 256 * 2**20) -> Callable[[], object]:
    """A function that reads twice the last-level cache's size (at least `min_bytes`), evicting what a timed call
    left there. Decoding reads each layer's experts once per token, so they come from memory; a layer timed in a
    loop would otherwise be served from a cache as large as its active experts (480 MB of L3 on the Xeon of
    2026-12-01, more than two int4 experts of Mixtral-8x7B)."""
    junk = torch.ones(max(min_bytes, 2 * kernels.last_level_cache_bytes()) // 4)
    return junk.sum


def read_bandwidth(gb: float, repeats: int = 5) -> float:
    """Best memory read bandwidth in GB/s: the sum of a `gb`-gigabyte float32 tensor (too big for any cache)."""
    data = torch.ones(max(1, int(gb * 1e9) // 4))
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass also faults the pages in; best-of drops it
        t = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - t)
    return data.nbytes / best / 1e9


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float32."""
    want = want.float()
    return float((got.float() - want).norm() / want.norm().clamp_min(1e-30))


# ---- the machine -----------------------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, with the core count, whether it has AVX512-BF16 and AMX-BF16 (the
    kernels' and torch's GEMM's paths differ with them) and its last-level cache."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    features = "".join(f", {f}" for f in ("avx512_bf16", "amx_bf16") if f in flags)
    cache = kernels.last_level_cache_bytes()
    return f"{name} ({os.cpu_count()} cpus{features}{f', {cache >> 20} MB cache' if cache else ''})"


def load_average() -> str:
    """The 1/5/15-minute load averages: other processes on the cores make every timing of the run slower."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def cpu_times() -> list[int]:
    """The machine's CPU time counters (user, nice, system, idle, iowait, irq, softirq, steal, guest, ...) in clock
    ticks, from the first line of /proc/stat. Raises OSError where that file is missing, ValueError if unreadable."""
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def busy_cores(seconds: float = 1.0) -> float | None:
    """How many cores other processes kept busy over the next `seconds` (this one sleeps meanwhile), from
    /proc/stat; None where that file is missing. The load average cannot tell: it trails by a minute and counts the
    run before this one."""
    def sample() -> tuple[int, int]:
        fields = cpu_times()
        return sum(fields[:8]), fields[3] + fields[4]  # all time (without guest time), idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 == total0:
        return 0.0
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / (total1 - total0))


def default_threads() -> int:
    """The cores this process may run on (its affinity), the default thread count of most benchmarks."""
    return max(1, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def transformers_version() -> str | None:
    """transformers' version, or None when it is not installed (the benchmarks import it only to run it)."""
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def command_line() -> str:
    """The command this process runs, as a user would type it again ("mixtral bench moe --tokens 1,16")."""
    program = Path(sys.argv[0]).name
    program = f"python -m {Path(sys.argv[0]).parent.name}" if program == "__main__.py" else program
    return f"{program} {shlex.join(sys.argv[1:])}"


def provenance(settings: dict) -> dict:
    """What every table is printed under: when, how (command and resolved `settings`), with what, on what."""
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command_line(),
            "settings": settings, "torch": torch.__version__, "transformers": transformers_version(),
            "threads": torch.get_num_threads(), "cpu": cpu_model(), "loadavg_start": load_average(),
            "busy_cores_start": busy_cores()}


def print_provenance(info: dict) -> None:
    print(f"# {info['date']}  {info['command']}")
    print("# " + "  ".join(f"{k}={v}" for k, v in info["settings"].items() if v is not None))
    print(f"# torch {info['torch']}  transformers {info['transformers'] or '(not installed)'}  "
          f"threads {info['threads']}  cpu {info['cpu']}")
    busy = info["busy_cores_start"]
    print(f"# other processes at the start: {'unknown' if busy is None else f'{busy:.2f}'} cores busy; "
          f"load average {info['loadavg_start']}")
    if busy is not None and busy >= 0.25 and busy + info["threads"] > (os.cpu_count() or 1):
        print(f"# warning: other processes share these {os.cpu_count()} cores, so the times below are inflated and "
              f"noisier; compare rows within this table only")


def report(result: dict, json_path: str | os.PathLike | None) -> int:
    """Close a benchmark's output (load average, the result written to `json_path` atomically) and return its exit
    code: 1 when a check failed (`result["passed"]` false), else 0."""
    result["loadavg_end"] = load_average()
    print(f"# load average at the end: {result['loadavg_end']}")
    if json_path:
        write_json(json_path, result)
        print(f"wrote {json_path}")
    return 0 if result["passed"] else 1


# ---- tables ----------------------------------------------------------------------------------------------------

Column = tuple[str, str, int, str]  # row key, title, width, format spec


def format_header(columns: Sequence[Column]) -> str:
    return " ".join(f"{title:>{width}}" if i else f"{title:<{width}}"
                    for i, (_, title, width, _) in enumerate(columns))


def format_row(columns: Sequence[Column], row: dict) -> str:
    """One line of a table: each column's value of `row` in its format, "-" where missing."""
    cells = []
    for i, (key, _, width, spec) in enumerate(columns):
        value = row.get(key)
        text = "-" if value is None else format(value, spec)
        cells.append(f"{text:>{width}}" if i else f"{text:<{width}}")
    return " ".join(cells)


# ---- options ---------------------------------------------------------------------------------------------------

def parse_list(text: str, kind: type, name: str, choices: Sequence | None = None) -> list:
    """"1,4,16" -> [1, 4, 16]; InputError naming the option for an empty list, a bad item or an unknown choice."""
    try:
        items = [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise InputError(f"{name}: cannot parse {text!r} as a comma-separated list of {kind.__name__}") from None
    if not items:
        raise InputError(f"{name}: empty list")
    for item in items:
        if choices is not None and item not in choices:
            raise InputError(f"{name}: unknown value {item!r}; choose from {', '.join(map(str, choices))}")
        if kind is int and item <= 0:
            raise InputError(f"{name}: values must be positive, got {item}")
    return items


def parse_dtypes(text: str, name: str, dtypes: Sequence[str] = ("bfloat16",),
                 extra: Sequence[str] = QUANT_MODES) -> list[str]:
    """"bf16,int4" -> ["bf16", "int4"]: a list of the torch `dtypes` (canonical names of mixtral.config, accepted in
    either spelling and returned as their short alias: "bfloat16" -> "bf16", the names rows and JSON print) and
    the `extra` names (the quantized modes). InputError naming the option for an unknown one."""
    short = {canonical: alias for alias, canonical in DTYPE_ALIASES.items()}

    def spelled(item: str) -> str:
        if item in extra:
            return item
        try:
            dtype = parse_dtype(item, allowed=tuple(dtypes))
        except InputError:
            return item  # parse_list names it as unknown
        return short[dtype_name(dtype)]

    choices = [short[d] for d in dtypes] + list(extra)
    return parse_list(",".join(spelled(item.strip()) for item in text.split(",")), str, name, choices)


def at_least(name: str, value: int, minimum: int = 1, why: str = "") -> None:
    """InputError "--name must be at least minimum" (with `why` in parentheses) when `value` is below."""
    if value < minimum:
        raise InputError(f"{name} must be at least {minimum}{f' ({why})' if why else ''}, got {value}")

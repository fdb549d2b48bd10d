"""`mixtral bench e2e`: load, prefill and decode of a whole model, ours against transformers, in one run.

It writes (or reuses) a synthetic checkpoint in the Hugging Face layout, then loads one model at a time (24 GiB
machines): ours per dtype, then transformers, with the same prompts and the same protocol for both. The synthetic
checkpoint is also what `mixtral bench serve --synthetic` serves.

    mixtral bench e2e --workdir /data/bench
"""
from __future__ import annotations

import gc
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from mixtral.bench.harness import Column, format_header, format_row, relative_error
from mixtral.bench.moe import TOLERANCE
from mixtral.config import from_name, with_overrides
from mixtral.errors import MixtralError
from mixtral.generate import stream
from mixtral.io.checkpoint import find_checkpoint, save_hf
from mixtral.io.files import atomic_directory
from mixtral.io.loading import load
from mixtral.model import random_model

EPILOG = """\
Without --model, writes a synthetic checkpoint shaped like Mixtral-8x7B but with --synthetic-layers layers (random
bf16 weights, Hugging Face layout; 2 layers = 6.3 GB) into --workdir and reuses it on later runs there. Then, one
model in memory at a time: ours per --dtypes (mixtral.load), then transformers (from_pretrained, bf16) with each of
--hf-experts. Same prompts, same protocol for both (transformers' times come from a streamer in the same
generate call):
  ttft ms       time to the first token of a --prompt-tokens prompt (prefill + first greedy pick)
  prefill tok/s a --prefill-tokens prompt at batch 1, divided by its time to the first token
  decode tok/s  (new tokens − 1) × batch / (time of the whole generation − time to the first token)
Ratios divide by transformers bf16 with the first of --hf-experts at the same batch (above 1: ours is faster).
Checks: prompt logits of ours vs transformers (relative error; bf16 must be within tolerance, quantized rows are
shown for information) and greedy tokens (match/mismatch, informative: random weights make near-ties).

examples:
  mixtral bench e2e                                   # 2 synthetic layers in a temporary directory
  mixtral bench e2e --workdir /data/bench             # written there once, reused by later runs
  mixtral bench e2e --keep                            # keep the temporary directory (its path is printed)
  mixtral bench e2e --model ./Mixtral-8x7B-v0.1 --dtypes bf16 --batches 1
"""

COLUMNS: list[Column] = [
    ("impl", "impl", 24, ""), ("dtype", "dtype", 5, ""), ("batch", "batch", 5, "d"), ("ttft_ms", "ttft ms", 8, ".1f"),
    ("prefill_tps", "prefill tok/s", 13, ".1f"), ("decode_tps", "decode tok/s", 12, ".2f"),
    ("x_prefill", "x prefill", 9, ".2f"), ("x_decode", "x decode", 8, ".2f"),
]


def synthetic_checkpoint(directory: Path, preset: str, n_layers: int, seed: int) -> Path:
    """A checkpoint shaped like `preset` with `n_layers` layers of random bf16 weights in `directory`, in the HF
    layout; an existing one with the same config is reused. Returns its path."""
    config = with_overrides(from_name(preset), n_layers=n_layers)
    path = directory / f"synthetic-{preset}-{n_layers}layers-seed{seed}"
    if (path / "config.json").exists():
        try:
            if find_checkpoint(path).config == config:
                print(f"reusing synthetic checkpoint {path}")
                return path
        except MixtralError:
            pass
    total, _ = config.param_counts()
    print(f"writing synthetic checkpoint {path} ({total * 2 / 1e9:.2f} GB) ...", flush=True)
    model = random_model(config, seed, torch.bfloat16)  # one copy of the weights, never a float32 staging copy
    # Renamed into place whole: a killed run never leaves a half checkpoint to be reused.
    with atomic_directory(path) as tmp:
        save_hf(model, tmp)
    del model
    gc.collect()
    return path


@contextmanager
def synthetic_model(preset: str, n_layers: int, seed: int, workdir: str | Path | None, prefix: str,
                    keep: bool = False) -> Iterator[Path]:
    """The path of `synthetic_checkpoint(...)` written into (or reused from) `workdir`, or without a workdir into
    a temporary directory that is removed when the block ends, unless `keep` (then its path is printed)."""
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        yield synthetic_checkpoint(Path(workdir), preset, n_layers, seed)
        return
    temp_dir = Path(tempfile.mkdtemp(prefix=prefix))
    path = None
    try:
        path = synthetic_checkpoint(temp_dir, preset, n_layers, seed)
        yield path
    finally:
        if keep and path is not None:
            print(f"kept {path}")
        else:
            shutil.rmtree(temp_dir, ignore_errors=True)


def time_ours(model, prompts: list[list[int]], new_tokens: int, repeats: int) -> tuple[float, float, list[int]]:
    """(median seconds to the first token, median seconds of the rest, the first row's tokens), greedy."""
    firsts, rests, tokens = [], [], []
    for _ in range(repeats):
        out = []
        start = time.perf_counter()
        steps = stream(model, prompts, new_tokens, eos_id=None)
        out.append(next(steps))
        first = time.perf_counter()
        out.extend(steps)
        end = time.perf_counter()
        firsts.append(first - start)
        rests.append(end - first)
        tokens = [step[0] for step in out]
    return statistics.median(firsts), statistics.median(rests), tokens


def time_transformers(model, prompts: list[list[int]], new_tokens: int,
                      repeats: int) -> tuple[float, float, list[int]]:
    """The same as `time_ours` for a transformers model and its generate(), clocked by a streamer: generate() hands
    the streamer the prompt, then each step's new tokens, so its second call marks the first token of that very run.
    (Timing generate(max_new_tokens=1) and generate(N) separately and subtracting their medians came out negative
    on the shared 2-core machines, where one stalled run moves a median by more than a whole decode.)"""
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenClock(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self):
            pass

    ids = torch.tensor(prompts)
    firsts, rests, tokens = [], [], []
    for _ in range(repeats):
        clock = FirstTokenClock()
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, streamer=clock)
        end = time.perf_counter()
        firsts.append(clock.first - start)
        rests.append(end - clock.first)
        tokens = out[0, ids.shape[1]:].tolist()
    return statistics.median(firsts), statistics.median(rests), tokens


def load_ours(path: Path, mode: str):
    """Our model from `path` in bf16, quantized on load to `mode` unless it is bf16."""
    return load(path, dtype=torch.bfloat16, quantize=None if mode == "bf16" else mode, progress=False)


def run(*, model: str | None, synthetic_config: str, synthetic_layers: int, workdir: str | None, keep: bool,
        dtypes: list[str], batches: list[int], hf_impls: list[str], prompt_tokens: int, new_tokens: int,
        prefill_tokens: int, repeats: int, check_tokens: int, seed: int) -> dict:
    """Time `model` (a checkpoint directory; None: a synthetic one shaped like the preset `synthetic_config` with
    `synthetic_layers` layers, see `synthetic_model`): ours in each of `dtypes`, then transformers with each of
    `hf_impls`, decoding `new_tokens` (at least 2) greedy tokens after prompts of `prompt_tokens` at each of
    `batches`, and prefilling `prefill_tokens`; medians of `repeats`. Prints the tables as it goes; returns
    {"benchmark": "e2e", "model", "rows", "checks", "passed"} (passed: our bf16 prompt logits agree with
    transformers')."""
    assert new_tokens >= 2, "decode speed needs a token after the first"
    options = dict(dtypes=dtypes, batches=batches, hf_impls=hf_impls, prompt_tokens=prompt_tokens,
                   new_tokens=new_tokens, prefill_tokens=prefill_tokens, repeats=repeats,
                   check_tokens=check_tokens, seed=seed)
    if model is not None:
        return _measure(Path(model), **options)
    with synthetic_model(synthetic_config, synthetic_layers, seed, workdir, "mixtral-bench-", keep) as path:
        return _measure(path, **options)


def _measure(path: Path, *, dtypes: list[str], batches: list[int], hf_impls: list[str], prompt_tokens: int,
             new_tokens: int, prefill_tokens: int, repeats: int, check_tokens: int, seed: int) -> dict:
    config = find_checkpoint(path).config
    generator = torch.Generator().manual_seed(seed)
    short = torch.randint(3, config.vocab_size, (max(batches), prompt_tokens), generator=generator).tolist()
    long = torch.randint(3, config.vocab_size, (1, prefill_tokens), generator=generator).tolist()
    n = new_tokens
    print(f"\nmodel {path} ({config.n_layers} layers, dim {config.dim}, {config.n_experts} experts); "
          f"prompts of {prompt_tokens} tokens, {n} new tokens, greedy; prefill prompt {prefill_tokens} "
          f"tokens; median of {repeats}")
    print(format_header(COLUMNS), flush=True)

    rows: list[dict] = []
    checks: list[dict] = []
    ours_tokens: dict[str, list[int]] = {}
    ours_logits: dict[str, torch.Tensor] = {}

    def add_row(row: dict) -> None:
        rows.append(row)
        print(format_row(COLUMNS, row), flush=True)

    def measure(model, timer, impl: str, dtype: str) -> list[int]:
        timer(model, short[:1], 2, 1)  # warm-up: first-call allocations, kernel builds
        prefill_s, _, _ = timer(model, long, 1, repeats)
        first_tokens: list[int] = []
        for batch in batches:
            ttft, rest, tokens = timer(model, short[:batch], n, repeats)
            if batch == batches[0]:
                first_tokens = tokens
            add_row({"impl": impl, "dtype": dtype, "batch": batch, "ttft_ms": ttft * 1e3,
                     "prefill_tps": prefill_tokens / prefill_s if batch == 1 else None,
                     "decode_tps": (n - 1) * batch / rest, "prefill_s": prefill_s if batch == 1 else None,
                     "decode_s": rest})
        return first_tokens

    for dtype in dtypes:
        model = load_ours(path, dtype)
        with torch.inference_mode():
            ours_logits[dtype] = model(torch.tensor(short[:1]))[0].float()
        ours_tokens[dtype] = measure(model, time_ours, "mixtral", dtype)
        del model
        gc.collect()

    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        print(f"note: transformers is not available ({e}); no peer rows")
    else:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        print(f"# transformers' default experts implementation here: {model.config._experts_implementation}")
        with torch.inference_mode():
            hf_logits = model(input_ids=torch.tensor(short[:1])).logits[0].float()
        for impl in hf_impls:
            model.set_experts_implementation(impl)
            tokens = measure(model, time_transformers, f"transformers {impl}", "bf16")
            if impl == hf_impls[0]:
                hf_tokens = tokens
        del model
        gc.collect()
        for dtype, logits in ours_logits.items():
            err = relative_error(logits, hf_logits)
            # Only bf16 is a gate: same weights, same math. A quantized model's logits move further from bf16 than
            # any one layer's output does (`bench moe` gates those): random weights make attention's softmax amplify
            # a 1% weight error into ~20% of the logits over two layers (measured int8), so a fixed bound would
            # test the synthetic model, not the code.
            gate = dtype == "bf16"
            checks.append({"check": "prompt logits vs transformers", "dtype": dtype, "rel_err": err,
                           "tolerance": TOLERANCE[dtype] if gate else None,
                           "passed": err <= TOLERANCE[dtype] if gate else None})
        for dtype, tokens in ours_tokens.items():
            k = min(check_tokens, len(tokens))
            same = sum(a == b for a, b in zip(tokens[:k], hf_tokens[:k]))
            # Greedy tokens of random weights sit on near-ties, so rounding may flip one: informative, not a gate.
            checks.append({"check": f"greedy first {k} tokens vs transformers", "dtype": dtype, "matches": same,
                           "of": k, "ours": tokens[:k], "transformers": hf_tokens[:k], "passed": None})

        reference = {r["batch"]: r for r in rows if r["impl"] == f"transformers {hf_impls[0]}"}
        print(f"\nratios against transformers {hf_impls[0]} bf16 at the same batch:")
        print(format_header(COLUMNS))
        for row in rows:
            ref = reference.get(row["batch"])
            if ref is not None:
                row["x_decode"] = row["decode_tps"] / ref["decode_tps"]
                if row["prefill_tps"] is not None and ref["prefill_tps"] is not None:
                    row["x_prefill"] = row["prefill_tps"] / ref["prefill_tps"]
            print(format_row(COLUMNS, row))

    for c in checks:
        if "rel_err" in c and c["passed"] is None:
            print(f"{c['check']} ({c['dtype']}): relative error {c['rel_err']:.2e} (informative: quantization "
                  f"error of this model)")
        elif "rel_err" in c:
            print(f"{c['check']} ({c['dtype']}): relative error {c['rel_err']:.2e} "
                  f"{'ok' if c['passed'] else 'FAIL'} (tolerance {c['tolerance']:g})")
        else:
            verdict = "match" if c["matches"] == c["of"] else "MISMATCH"
            print(f"{c['check']} ({c['dtype']}): {c['matches']}/{c['of']} {verdict}  ours {c['ours']}  "
                  f"transformers {c['transformers']}")
    passed = all(c["passed"] is not False for c in checks)
    return {"benchmark": "e2e", "model": str(path), "rows": rows, "checks": checks, "passed": passed}

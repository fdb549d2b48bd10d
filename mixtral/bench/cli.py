"""`mixtral bench BENCHMARK`: the parser of every benchmark, and the glue from its options to the benchmark's `run`.

This is the only argparse code of the benchmarks: each module of mixtral/bench/ takes typed arguments and returns
a result dict; the parser of the single-part benchmarks shows their module's docstring as the description.

    mixtral bench moe --tokens 1,16,512        mixtral bench e2e              mixtral bench serve
    mixtral bench load-memory --gb 1.0          mixtral bench quant-accuracy   mixtral bench train-throughput
    mixtral bench profile --model default       mixtral bench gemv             mixtral bench cold-gemv
    mixtral bench amx-experts --mode int4        mixtral bench finetune
    mixtral bench batch-invariant --rows 1,16
    mixtral bench distributed --layouts 1x1,2x1,2x2
    mixtral bench structured
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

from mixtral import kernels, quant
from mixtral.bench import (amx_experts, batch_invariant, cold_gemv, distributed, e2e, finetune, gemv, load_memory,
                           moe, offload, profile_step, quant_accuracy, serve, structured, train_throughput)
from mixtral.bench.harness import (at_least, default_threads, parse_dtypes, parse_list, print_provenance,
                                   provenance, report, transformers_version)
from mixtral.config import DTYPE_CHOICES, PRESETS
from mixtral.errors import InputError
from mixtral.io.files import write_json
from mixtral.quant import MODES as QUANT_MODES

RAW = argparse.RawDescriptionHelpFormatter

EXAMPLES = """\
examples:
  mixtral bench moe --tokens 1,16,512         # one MoE layer: ours vs transformers
  mixtral bench e2e                           # load, prefill and decode: ours vs transformers
  mixtral bench serve                         # mixtral serve under 1..64 concurrent clients
  mixtral bench load-memory --gb 1.0          # peak memory while loading
  mixtral bench quant-accuracy --kernels      # int8/int4: accuracy, or their kernels' times
Run 'mixtral bench BENCHMARK --help' for the options of each.
"""


def _settings(args: argparse.Namespace) -> dict:
    """The resolved options of a run, for its provenance (the parser's bookkeeping left out)."""
    return {k: v for k, v in vars(args).items() if k not in ("run", "command", "bench", "verbose")}


def _start(args: argparse.Namespace) -> dict:
    info = provenance(_settings(args))
    print_provenance(info)
    return info


def _require_transformers() -> None:
    if transformers_version() is None:
        raise InputError("mixtral bench times ours against transformers, which is not installed; install the test "
                         "extra: pip install -e '.[test]' (or pip install transformers)")


def _threads(args: argparse.Namespace) -> None:
    at_least("--threads", args.threads)
    torch.set_num_threads(args.threads)


def _finish(result: dict, json_path: str | None) -> int:
    """Write the result of a benchmark without a pass/fail check to `json_path` (if given); exit code 0."""
    if json_path:
        write_json(json_path, result)
        print(f"wrote {json_path}")
    return 0


# ---- moe, e2e, serve: ours against transformers, with provenance and checks ----------------------------------

def run_moe(args: argparse.Namespace) -> int:
    """`bench moe`: 0, or 1 when a row's output disagrees with transformers."""
    tokens = parse_list(args.tokens, int, "--tokens")
    dtypes = parse_dtypes(args.dtypes, "--dtypes")
    if args.top_k > args.experts:
        raise InputError(f"--top-k ({args.top_k}) cannot exceed --experts ({args.experts})")
    at_least("--repeats", args.repeats)
    _require_transformers()  # after the arguments: a mistake in them is the first thing to hear of
    _threads(args)
    info = _start(args)
    result = moe.run(dim=args.dim, hidden=args.hidden, n_experts=args.experts, top_k=args.top_k, tokens=tokens,
                     dtypes=dtypes, repeats=args.repeats, min_seconds=args.min_seconds, group_size=args.group_size,
                     bandwidth_gb=args.bandwidth_gb, seed=args.seed)
    return report({**info, **result}, args.json)


def run_e2e(args: argparse.Namespace) -> int:
    """`bench e2e`: 0, or 1 when our prompt logits disagree with transformers'."""
    dtypes = parse_dtypes(args.dtypes, "--dtypes")
    batches = parse_list(args.batches, int, "--batches")
    hf_impls = parse_list(args.hf_experts, str, "--hf-experts")
    at_least("--new-tokens", args.new_tokens, 2, "decode speed needs a token after the first")
    if args.model is None and args.synthetic_config not in PRESETS:
        raise InputError(f"--synthetic-config: unknown preset {args.synthetic_config!r}; "
                         f"known presets: {', '.join(PRESETS)}")
    at_least("--repeats", args.repeats)
    _require_transformers()  # after the arguments: a mistake in them is the first thing to hear of
    _threads(args)
    info = _start(args)
    result = e2e.run(
        model=args.model, synthetic_config=args.synthetic_config, synthetic_layers=args.synthetic_layers,
        workdir=args.workdir, keep=args.keep, dtypes=dtypes, batches=batches, hf_impls=hf_impls,
        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, prefill_tokens=args.prefill_tokens,
        repeats=args.repeats, check_tokens=args.check_tokens, seed=args.seed)
    return report({**info, **result}, args.json)


def run_serve(args: argparse.Namespace) -> int:
    """`bench serve`: 0, or 1 when a request failed or came back short."""
    if importlib.util.find_spec("httpx") is None:
        raise InputError("mixtral bench serve drives the server with httpx, which is not installed; install the test "
                         "extra: pip install -e '.[test]' (or pip install httpx)")
    for option in ("--requests", "--prompt-tokens", "--threads", "--synthetic-layers"):
        at_least(option, getattr(args, option[2:].replace("-", "_")))
    at_least("--new-tokens", args.new_tokens, 2, "inter-token latency needs a second token")
    if args.shared_prefix < 0:
        raise InputError(f"--shared-prefix must be >= 0, got {args.shared_prefix}")
    if args.synthetic and args.model != "default":
        raise InputError("--synthetic serves its own checkpoint; leave out --model")
    levels = parse_list(args.clients, int, "--clients")
    _threads(args)  # the server's count; the header reports this process's (it only drives)
    info = _start(args)
    result = serve.run(
        model=args.model, synthetic=args.synthetic, synthetic_config=args.synthetic_config,
        synthetic_layers=args.synthetic_layers, workdir=args.workdir, dtype=args.dtype, levels=levels,
        requests=args.requests, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, threads=args.threads,
        seed=args.seed, startup_timeout=args.startup_timeout, shared_prefix=args.shared_prefix,
        kv_cache_memory=args.kv_cache_memory)
    return report({**info, **result}, args.json)


# ---- the measurements of one part ------------------------------------------------------------------------------

def run_load_memory(args: argparse.Namespace) -> int:
    loaders = parse_list(args.loaders, str, "--loaders", ("mixtral", "transformers"))
    if args.path is not None and not Path(args.path).is_dir():
        raise InputError(f"--path: {args.path} is not a checkpoint directory")
    load_memory.run(gb=args.gb, path=args.path, loaders=loaders, quantize=args.quantize, preset=args.preset,
                    layers=args.layers, workdir=args.workdir)
    return 0


def _mixes(text: str | None) -> dict | None:
    """--mixes: "default" (quant_accuracy.MIXES), "plan" (what `mixtral plan` chooses among) or ;-separated
    --quantize specs (experts=int3,attention=int8;int4)."""
    if text is None:
        return None
    if text == "default":
        return quant_accuracy.MIXES
    if text == "plan":
        return quant_accuracy.plan_mixes()
    return {item.strip(): quant.parse_quantize_option(item.strip()) for item in text.split(";") if item.strip()}


def run_quant_accuracy(args: argparse.Namespace) -> int:
    group_sizes = parse_list(args.group_sizes, int, "--group-sizes")
    _threads(args)
    if args.kernels:
        rows = parse_list(args.rows, int, "--rows")
        quant_accuracy.print_header()
        quant_accuracy.kernel_timings(rows=rows, group_sizes=group_sizes, min_seconds=args.min_seconds)
        return 0
    modes = parse_list(args.modes, str, "--modes", QUANT_MODES)
    if args.tokens % args.window:
        raise InputError(f"--tokens {args.tokens} is not a multiple of --window {args.window}")
    quant_accuracy.print_header()
    quant_accuracy.accuracy(model=args.model, dtype=args.dtype, text=args.text, corpus=args.corpus, tokens=args.tokens,
                   window=args.window, batch=args.batch, modes=modes, group_sizes=group_sizes,
                   mixes=_mixes(args.mixes))
    return 0


def run_train_throughput(args: argparse.Namespace) -> int:
    impls = parse_list(args.impls, str, "--impls", ("ours", "transformers"))
    dtypes = parse_dtypes(args.dtypes, "--dtypes", ("float32", "bfloat16"), extra=())
    if "transformers" in impls:
        _require_transformers()
    _threads(args)
    config = train_throughput.model_config(dim=args.dim, layers=args.layers, hidden=args.hidden, heads=args.heads,
                                kv_heads=args.kv_heads, head_dim=args.head_dim, experts=args.experts,
                                top_k=args.top_k, vocab=args.vocab, seq=args.seq)
    result = train_throughput.run(config, impls=impls, dtypes=dtypes, batch=args.batch, seq=args.seq,
                                  warmup=args.warmup, rounds=args.rounds, steps=args.steps, seed=args.seed)
    return _finish(result, args.json)


def run_finetune(args: argparse.Namespace) -> int:
    impls = parse_list(args.impls, str, "--impls", finetune.IMPLS)
    tasks = parse_list(args.tasks, str, "--tasks", finetune.TASKS)
    for option in ("--rank", "--batch", "--seq", "--rounds", "--steps", "--qlora-batch"):
        at_least(option, getattr(args, option[2:].replace("-", "_")))
    at_least("--warmup", args.warmup, 1, "the first step's loss is the check")
    if not 0 < args.prompt < args.seq:
        raise InputError(f"--prompt must be between 1 and --seq - 1 ({args.seq - 1}), got {args.prompt}")
    if "peft" in impls:
        _require_transformers()
        if importlib.util.find_spec("peft") is None or importlib.util.find_spec("trl") is None:
            raise InputError("mixtral bench finetune times ours against PEFT and TRL, which are not installed; "
                             "install the test extra: pip install -e '.[test]' (or pass --impls ours)")
    _threads(args)
    info = _start(args)
    result = finetune.run(model=args.model, impls=impls, tasks=tasks, rank=args.rank, alpha=args.alpha,
                          experts=not args.no_experts, batch=args.batch, seq=args.seq, prompt=args.prompt,
                          warmup=args.warmup, rounds=args.rounds, steps=args.steps, memory=not args.no_memory,
                          qlora_layers=args.qlora_layers, qlora_batch=args.qlora_batch, seed=args.seed)
    return _finish({**info, **result}, args.json)


def run_profile(args: argparse.Namespace) -> int:
    for option in ("--batch", "--prompt-tokens", "--steps", "--prefill-tokens"):
        at_least(option, getattr(args, option[2:].replace("-", "_")))
    _threads(args)
    profile_step.run(model=args.model, dtype=args.dtype, quantize=args.quantize, batch=args.batch,
                                prompt_tokens=args.prompt_tokens, steps=args.steps,
                                prefill_tokens=args.prefill_tokens, top=args.top)
    return 0


def run_gemv(args: argparse.Namespace) -> int:
    rows = parse_list(args.rows, int, "--rows")
    _threads(args)
    gemv.run(rows=rows, compile=not args.no_compile)
    return 0


def run_cold_gemv(args: argparse.Namespace) -> int:
    at_least("--threads", args.threads)
    at_least("--repeats", args.repeats)
    if not kernels.policy().gemv:
        raise InputError("mixtral bench cold-gemv times gemv.c's GEMV kernels, which do not run here: they need "
                         "AVX512-BF16 and a C compiler (and MIXTRAL_KERNELS not 0)")
    cold_gemv.run(threads=args.threads, repeats=args.repeats)  # each setting in a child of --threads
    return 0


def run_amx_experts(args: argparse.Namespace) -> int:
    rows = parse_list(args.rows, int, "--rows")
    at_least("--repeats", args.repeats)
    _threads(args)
    amx_experts.run(rows=rows, dim=args.dim, hidden=args.hidden, experts=args.experts, mode=args.mode,
                               group_size=args.group_size, repeats=args.repeats)
    return 0


def run_batch_invariant(args: argparse.Namespace) -> int:
    rows = parse_list(args.rows, int, "--rows")
    for option in ("--layers", "--prompt-tokens", "--steps", "--prefill-tokens", "--repeats"):
        at_least(option, getattr(args, option[2:].replace("-", "_")))
    for n in rows:
        at_least("--rows", n)
    _threads(args)
    info = _start(args)
    result = batch_invariant.run(layers=args.layers, rows=rows, prompt_tokens=args.prompt_tokens, steps=args.steps,
                                 prefill_tokens=args.prefill_tokens, repeats=args.repeats, seed=args.seed)
    return _finish({**info, **result}, args.json)


def run_offload(args: argparse.Namespace) -> int:
    models = parse_list(args.models, str, "--model")
    budgets = parse_list(args.budgets, str, "--budgets")
    policies = parse_list(args.policies, str, "--policies")
    offload.check_budgets(budgets)
    offload.check_policies(policies)
    at_least("--tokens", args.tokens)
    at_least("--prompt", args.prompt)
    result = offload.run(models=models, budgets=budgets, policies=policies, prompt=args.prompt, tokens=args.tokens,
                         threads=args.threads, offload_dir=args.offload_dir)
    if args.json:
        write_json(args.json, result)
    return 0


def run_structured(args: argparse.Namespace) -> int:
    libraries = parse_list(args.libraries, str, "--libraries", choices=list(structured.LIBRARIES))
    at_least("--samples", args.samples)
    at_least("--repeats", args.repeats)
    info = _start(args)
    result = structured.run(tokenizer=args.tokenizer, libraries=libraries, samples=args.samples,
                            repeats=args.repeats, seed=args.seed)
    return _finish({**info, **result}, args.json)


def run_distributed(args: argparse.Namespace) -> int:
    layouts = distributed.parse_layouts(args.layouts)
    for ep, dp in layouts:
        at_least("--layouts ep", ep)
        at_least("--layouts dp", dp)
        if args.batch % (ep * dp):
            raise InputError(f"--batch ({args.batch}) must be a multiple of every layout's processes ({ep * dp})")
    if args.preset not in PRESETS:
        raise InputError(f"--preset {args.preset!r} is not a preset; presets: {', '.join(PRESETS)}")
    for name in ("--batch", "--seq", "--steps", "--threads"):
        at_least(name, getattr(args, name[2:]))
    if args.worker:  # one rank of a layout, under torchrun
        ep, dp = layouts[0]
        distributed.worker(args.preset, ep, dp, args.batch, args.seq, args.steps, args.threads, args.worker)
        return 0
    info = _start(args)
    result = distributed.run(layouts, args.preset, args.batch, args.seq, args.steps, args.threads)
    return report({**info, **result}, args.json)


# ---- the parser ------------------------------------------------------------------------------------------------

def add_bench_parser(subparsers, parents: dict[str, argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `bench` and its benchmarks on the subparsers of the `mixtral` command; `parents` as
    `mixtral.cli.shared_parents` makes them (this uses "model" and "verbose")."""
    p = subparsers.add_parser("bench", formatter_class=RAW, epilog=EXAMPLES,
                              help="benchmarks: ours against transformers side by side, and of single parts",
                              description="Benchmarks: ours against transformers from one run (moe, e2e), the "
                                          "server under load (serve), and measurements of single parts.")
    commands = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    verbose = [parents["verbose"]]
    threads = default_threads()

    def add(name: str, run, help: str, module=None, epilog: str | None = None, description: str | None = None,
            with_model: bool = False) -> argparse.ArgumentParser:
        q = commands.add_parser(name, parents=verbose + ([parents["model"]] if with_model else []),
                                formatter_class=RAW, help=help, epilog=epilog,
                                description=description or module.__doc__)
        q.set_defaults(run=run)
        return q

    def common(q: argparse.ArgumentParser, repeats: int) -> None:
        q.add_argument("--dtypes", default="bf16,int8,int4",
                       help="comma-separated weight dtypes of ours: bf16, int8, int4 (default: bf16,int8,int4)")
        q.add_argument("--threads", type=int, default=threads, help=f"torch threads (default: {threads})")
        q.add_argument("--repeats", type=int, default=repeats,
                       help=f"timed calls per measurement at least; the median is reported (default: {repeats})")
        q.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default: 0)")
        q.add_argument("--json", metavar="PATH", help="also write all rows to this JSON file (atomically)")

    q = add("moe", run_moe, "one MoE layer: ours vs transformers' MixtralSparseMoeBlock", epilog=moe.EPILOG,
            description="Time one MoE layer of the given shape, ours against transformers, on shared weights, "
                        "with the memory-bandwidth and GEMM ceilings.")
    q.add_argument("--dim", type=int, default=4096, help="model dimension (default: 4096, Mixtral-8x7B)")
    q.add_argument("--hidden", type=int, default=14336, help="expert hidden dimension (default: 14336)")
    q.add_argument("--experts", type=int, default=8, help="number of experts (default: 8)")
    q.add_argument("--top-k", type=int, default=2, help="experts per token (default: 2)")
    q.add_argument("--tokens", default="1,4,16,64,512", help="comma-separated T of x [1, T, dim] (default: "
                                                              "1,4,16,64,512)")
    q.add_argument("--min-seconds", type=float, default=0.5,
                   help="keep timing a measurement for at least this long (default: 0.5)")
    q.add_argument("--group-size", type=int, default=128, help="quantization group size (default: 128)")
    q.add_argument("--bandwidth-gb", type=float, default=1.0,
                   help="size of the tensor whose sum measures memory bandwidth (default: 1.0)")
    common(q, repeats=5)

    q = add("e2e", run_e2e, "load, prefill and decode a model: ours vs transformers", epilog=e2e.EPILOG,
            description="Prefill and decode speed of a whole model, ours against transformers, with the same "
                        "prompts and protocol.")
    q.add_argument("--model", metavar="PATH", help="checkpoint directory (default: a synthetic checkpoint)")
    synthetic_options(q, "deleted afterwards unless --keep")
    q.add_argument("--keep", action="store_true", help="keep the temporary directory of the synthetic checkpoint")
    q.add_argument("--batches", default="1,8", help="comma-separated batch sizes of decoding (default: 1,8)")
    q.add_argument("--prompt-tokens", type=int, default=16, help="tokens of each decode prompt (default: 16)")
    q.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row (default: 32)")
    q.add_argument("--prefill-tokens", type=int, default=512, help="tokens of the prefill prompt (default: 512)")
    q.add_argument("--hf-experts", default="grouped_mm,eager",
                   help="transformers experts implementations to time; the first is the ratios' reference "
                        "(default: grouped_mm,eager)")
    q.add_argument("--check-tokens", type=int, default=8, help="greedy tokens compared with transformers (default: 8)")
    common(q, repeats=5)

    q = add("distributed", run_distributed, "expert + data parallel training traffic, and the Mixtral-8x7B model",
            module=distributed, epilog=distributed.EPILOG)
    q.add_argument("--layouts", default="1x1,2x1,2x2",
                   help="comma-separated ep x dp layouts; 1x1 is the one-process reference of the step-time model "
                        "(default: 1x1,2x1,2x2)")
    q.add_argument("--preset", default="small", help="the model's preset (default: small)")
    q.add_argument("--batch", type=int, default=8, help="sequences per step, over all ranks (default: 8)")
    q.add_argument("--seq", type=int, default=128, help="tokens per sequence (default: 128)")
    q.add_argument("--steps", type=int, default=3, help="steps timed with and without recording (default: 3)")
    q.add_argument("--threads", type=int, default=1, help="torch threads per rank (default: 1)")
    q.add_argument("--worker", metavar="PATH", help=argparse.SUPPRESS)
    q.add_argument("--json", metavar="PATH", help="also write the results to this JSON file (atomically)")

    q = add("serve", run_serve, "mixtral serve under 1..64 concurrent clients: latency and tokens/s",
            epilog=serve.EPILOG, with_model=True,
            description="Time to first token, inter-token latency and aggregate tokens/s of `mixtral serve` under "
                        "concurrent streaming clients.")
    q.add_argument("--synthetic", action="store_true",
                   help="serve a synthetic Mixtral-8x7B-shaped checkpoint instead of --model")
    synthetic_options(q, "deleted afterwards")
    q.add_argument("--dtype", choices=DTYPE_CHOICES, help="passed to mixtral serve")
    q.add_argument("--clients", default="1,4,16,64", help="comma-separated concurrency levels (default: 1,4,16,64)")
    q.add_argument("--requests", type=int, default=2, help="requests per client, one after another (default: 2)")
    q.add_argument("--prompt-tokens", type=int, default=16, help="tokens of each prompt (default: 16)")
    q.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request (default: 32)")
    q.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                   help="tokens every prompt shares before its own --prompt-tokens (a system prompt); runs the "
                        "levels with and without prefix caching (default: 0, none)")
    q.add_argument("--kv-cache-memory", metavar="SIZE", help="passed to mixtral serve (e.g. 64MiB)")
    q.add_argument("--threads", type=int, default=threads, help=f"torch threads of the server (default: {threads})")
    q.add_argument("--seed", type=int, default=0, help="seed of the prompts and the synthetic weights (default: 0)")
    q.add_argument("--startup-timeout", type=float, default=900,
                   help="seconds to wait for the server to load the model (default: 900)")
    q.add_argument("--json", metavar="PATH", help="also write all rows to this JSON file (atomically)")

    add_part_benchmarks(add, threads)
    return p


def synthetic_options(q: argparse.ArgumentParser, temporary: str) -> None:
    """The options of the synthetic Mixtral-8x7B-shaped checkpoint (`e2e.synthetic_model`)."""
    q.add_argument("--synthetic-layers", type=int, default=2,
                   help="layers of the synthetic Mixtral-8x7B-shaped checkpoint (default: 2, 6.3 GB)")
    q.add_argument("--synthetic-config", default="mixtral-8x7b", help=argparse.SUPPRESS)  # tests: a tiny preset
    q.add_argument("--workdir", metavar="DIR", help=f"where the synthetic checkpoint is written and reused "
                                                    f"(default: a temporary directory, {temporary})")


def add_part_benchmarks(add, threads: int) -> None:
    """The benchmarks of single parts (each with its module's docstring as description), through `add`."""
    q = add("load-memory", run_load_memory, "peak memory while loading: ours vs transformers", load_memory)
    q.add_argument("--gb", type=float, default=1.0, help="size of the checkpoint to write (default: 1.0)")
    q.add_argument("--path", type=Path, help="measure this checkpoint instead of writing one")
    q.add_argument("--loaders", default="mixtral,transformers", help="comma-separated: mixtral,transformers")
    q.add_argument("--quantize", metavar="SPEC",
                   help="measure quantizing instead: mixtral loading with --quantize SPEC and `mixtral quantize`")
    q.add_argument("--preset", help="write this preset's shapes (streamed, may exceed memory) instead of --gb")
    q.add_argument("--layers", type=int, help="with --preset: cut to this many layers")
    q.add_argument("--workdir", type=Path, help="where to write the checkpoint (default: the system's temp dir)")

    q = add("quant-accuracy", run_quant_accuracy, "int8/int4 quantization: accuracy, or the kernels' times",
            "quant_accuracy")
    q.add_argument("--model", default="small", metavar="PATH_OR_PRESET",
                   help="preset or checkpoint directory (default: small)")
    q.add_argument("--dtype", default="bf16", choices=DTYPE_CHOICES,
                   help="dtype of the unquantized model (default: bf16)")
    q.add_argument("--text", nargs="*", metavar="FILE", help="held-out text files (default: stdlib modules)")
    q.add_argument("--corpus", metavar="DIR", help="use the validation split of this prepared corpus instead "
                                                   "(e.g. data/corpus for the default model, which trained on "
                                                   "the standard library)")
    q.add_argument("--tokens", type=int, default=4096, help="tokens of held-out text (default: 4096)")
    q.add_argument("--window", type=int, default=256, help="tokens per window (default: 256)")
    q.add_argument("--batch", type=int, default=4, help="windows per forward pass (default: 4)")
    q.add_argument("--modes", default="int8,int4", help="comma-separated (default: int8,int4)")
    q.add_argument("--group-sizes", default="32,64,128,256", help="int4 group sizes (default: all four)")
    q.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    q.add_argument("--kernels", action="store_true", help="time the kernels instead of measuring accuracy")
    q.add_argument("--mixes", metavar="SPECS",
                   help="measure precision mixes instead of --modes: 'default' (all int8, all int4, experts int4/int3/"
                        "int2 with attention int8 or int4), 'plan' (every pair `mixtral plan` chooses among) or "
                        ";-separated --quantize specs, e.g. "
                        "'int4;experts=int3,attention=int8'")
    q.add_argument("--rows", default="1,16", help="rows of x for --kernels (default: 1,16)")
    q.add_argument("--min-seconds", type=float, default=1.0, help="timing per cell for --kernels (default: 1.0)")

    q = add("train-throughput", run_train_throughput, "a training step: ours vs transformers", train_throughput)
    for option, default, text in (("--dim", 256, ""), ("--layers", 6, ""), ("--hidden", 688, "expert hidden "
                                  "dimension"), ("--heads", 8, ""), ("--kv-heads", 2, ""), ("--experts", 8, ""),
                                  ("--top-k", 2, ""), ("--vocab", 32000, ""), ("--batch", 8, ""), ("--seq", 256, "")):
        q.add_argument(option, type=int, default=default, help=f"{text + ' ' if text else ''}(default: {default})")
    q.add_argument("--head-dim", type=int, default=None, help="(default: dim / heads)")
    q.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast) (default: both)")
    q.add_argument("--impls", default="ours,transformers", help="comma-separated: ours, transformers (default: both)")
    q.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation and dtype (default: 2)")
    q.add_argument("--rounds", type=int, default=3, help="rounds of alternating timed steps (default: 3)")
    q.add_argument("--steps", type=int, default=2, help="timed steps per implementation per round (default: 2)")
    q.add_argument("--threads", type=int, default=threads, help=f"torch threads (default: {threads})")
    q.add_argument("--seed", type=int, default=0, help="(default: 0)")
    q.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file (atomically)")

    q = add("structured", run_structured, "response_format's grammar libraries: llguidance, xgrammar, "
            "outlines-core", structured)
    q.add_argument("--tokenizer", metavar="PATH_OR_PRESET", help="tokenizer preset, file or directory "
                                                                 "(default: Mixtral's, from mistral-common)")
    libraries = ",".join(structured.LIBRARIES)
    q.add_argument("--libraries", default=libraries,
                   help=f"comma-separated; those not installed are skipped (default: {libraries})")
    q.add_argument("--samples", type=int, default=3, help="sampled documents per JSON Schema feature (default: 3)")
    q.add_argument("--repeats", type=int, default=3, help="compiles and walks timed; the median is reported "
                                                          "(default: 3)")
    q.add_argument("--seed", type=int, default=0, help="seed of the sampled documents (default: 0)")
    q.add_argument("--json", metavar="PATH", help="also write the results to this JSON file (atomically)")

    q = add("finetune", run_finetune, "a LoRA SFT and DPO step: ours vs transformers + PEFT; QLoRA memory",
            finetune)
    q.add_argument("--model", default="default", metavar="PATH_OR_PRESET",
                   help="HF-layout checkpoint both sides load (default: default, the bundled 42.7M model)")
    q.add_argument("--impls", default="ours,peft", help="comma-separated: ours, peft (default: both)")
    q.add_argument("--tasks", default="sft,dpo", help="comma-separated: sft, dpo (default: both)")
    q.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    q.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (default: 32)")
    q.add_argument("--no-experts", action="store_true", help="adapters on attention only, both sides")
    for option, default, text in (("--batch", 8, "rows (DPO: half as many pairs)"), ("--seq", 256, "tokens a row"),
                                  ("--prompt", 64, "DPO prompt tokens, not learned"),
                                  ("--warmup", 2, "untimed steps per implementation and task"),
                                  ("--rounds", 3, "rounds of alternating timed steps"),
                                  ("--steps", 2, "timed steps per implementation per round"),
                                  ("--qlora-layers", 2, "layers of the Mixtral-8x7B-shaped QLoRA slice; 0 skips it"),
                                  ("--qlora-batch", 2, "rows of the QLoRA step")):
        q.add_argument(option, type=int, default=default, help=f"{text} (default: {default})")
    q.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    q.add_argument("--threads", type=int, default=threads, help=f"torch threads (default: {threads})")
    q.add_argument("--seed", type=int, default=0, help="(default: 0)")
    q.add_argument("--json", metavar="PATH", help="also write the results to this JSON file (atomically)")

    here = torch.get_num_threads()
    q = add("profile", run_profile, "where a decode step and a prefill spend their time", profile_step,
            with_model=True)
    q.add_argument("--dtype", default="bf16", choices=DTYPE_CHOICES, help="dtype of the weights (default: bf16)")
    q.add_argument("--quantize", choices=QUANT_MODES, default=None, help="quantize the weights after loading")
    q.add_argument("--batch", type=int, default=1, help="rows decoded together (default: 1)")
    q.add_argument("--prompt-tokens", type=int, default=16, help="prompt tokens before the decode steps (default: 16)")
    q.add_argument("--steps", type=int, default=16, help="decode steps profiled, after 4 unprofiled (default: 16)")
    q.add_argument("--prefill-tokens", type=int, default=512, help="tokens of the profiled prefill (default: 512)")
    q.add_argument("--top", type=int, default=12, help="ops listed by self time (default: 12)")
    q.add_argument("--threads", type=int, default=here, help=f"torch threads (default: {here})")

    q = add("gemv", run_gemv, "one expert's linear layer at 1-16 rows: torch, torch.compile and ours", gemv)
    q.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    q.add_argument("--rows", default="1,2,4,8,16", help="rows of x (tokens through one expert) (default: 1,2,4,8,16)")
    q.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidate")

    q = add("cold-gemv", run_cold_gemv, "GEMV from a cold cache: software prefetch and 2 MB pages", cold_gemv)
    q.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    q.add_argument("--repeats", type=int, default=10, help="cold calls per kernel; the best is reported (default: 10)")

    q = add("offload", run_offload, "decoding with offloaded experts: budgets x policies x precisions", offload)
    q.add_argument("--model", dest="models", default="default", metavar="PATHS",
                   help="comma-separated quantized checkpoints (one per expert precision), 'default' or presets "
                        "(default: default)")
    q.add_argument("--budgets", default="4GB,8GB,12GB,16GB", help="comma-separated memory budgets; 'all' runs "
                                                                   "fully resident (default: 4GB,8GB,12GB,16GB)")
    q.add_argument("--policies", default="none,lru,lru+predict,lru+predict-after",
                   help="comma-separated (default: none,lru,lru+predict,lru+predict-after)")
    q.add_argument("--prompt", type=int, default=16, help="prompt tokens before decoding (default: 16)")
    q.add_argument("--tokens", type=int, default=8, help="tokens decoded per configuration (default: 8)")
    q.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    q.add_argument("--offload-dir", help="where expert files of a non-quantized --model are written")
    q.add_argument("--json", type=Path, help="also write the rows as JSON here")

    q = add("batch-invariant", run_batch_invariant, "decode and prefill with the batch-invariant mode off and on",
            batch_invariant)
    q.add_argument("--layers", type=int, default=1, help="layers of the Mixtral-8x7B-shaped slice (default: 1)")
    q.add_argument("--rows", default="1,4,16", help="comma-separated rows decoded together (default: 1,4,16)")
    q.add_argument("--prompt-tokens", type=int, default=16,
                   help="tokens of the longest decode prompt; each further row one fewer (default: 16)")
    q.add_argument("--steps", type=int, default=4, help="decode steps timed per measurement (default: 4)")
    q.add_argument("--prefill-tokens", type=int, default=256, help="tokens of the prefill prompt (default: 256)")
    q.add_argument("--repeats", type=int, default=3, help="rounds, after one of warm-up; the median (default: 3)")
    q.add_argument("--threads", type=int, default=threads, help=f"torch threads (default: {threads})")
    q.add_argument("--seed", type=int, default=0, help="(default: 0)")
    q.add_argument("--json", metavar="PATH", help="also write the results to this JSON file (atomically)")

    q = add("amx-experts", run_amx_experts, "a layer's experts on AMX: amx.c vs the path without it", amx_experts)
    q.add_argument("--rows", default="16,32,64,128,160,256", help="rows per expert, comma-separated "
                                                                  "(default: 16,32,64,128,160,256)")
    q.add_argument("--dim", type=int, default=4096, help="(default: 4096)")
    q.add_argument("--hidden", type=int, default=14336, help="(default: 14336)")
    q.add_argument("--experts", type=int, default=8, help="(default: 8)")
    q.add_argument("--mode", choices=amx_experts.MODES, default="bf16", help="the experts' weights (default: "
                                                                                   "bf16)")
    q.add_argument("--group-size", type=int, default=128, help="int4 group size (default: 128)")
    q.add_argument("--repeats", type=int, default=5, help="passes; the median is reported (default: 5)")
    q.add_argument("--threads", type=int, default=here, help=f"torch threads (default: {here})")

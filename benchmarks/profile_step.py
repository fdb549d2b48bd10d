"""Where a decode step and a prefill spend their time: torch.profiler over mixtral's forward pass, with a span
recorded around every module of the model, so time inside our C kernels (called through ctypes, invisible to the
profiler's op list) is still charged to the attention, MoE or output head that ran it.

It prints, per phase (--steps decode steps at --batch rows after a --prompt-token prompt; one --prefill-token
prefill), the ms a call spends in each part of the model, what the model's forward spends outside its modules
(RoPE tables, masks, the KV cache's bookkeeping, indexing), and what the step spends outside the forward (the
loop of `mixtral.generate.stream`: sampling, building the next ids); then the --top ops by self time. Last, the
time to the first token of `mixtral.generate.stream` on the prefill prompt against the bare prefill forward.

    python benchmarks/profile_step.py --checkpoint out/bench8x7b/synthetic-mixtral-8x7b-2layers-seed0
    python benchmarks/profile_step.py --checkpoint default --quantize int4 --batch 8
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import mixtral
from mixtral.cache import KVCache
from mixtral.generate import stream
from mixtral.model import Attention, RMSNorm
from mixtral.moe import MoE

PARTS = ("attention", "moe", "norms", "output head", "embeddings")


def _part(module: torch.nn.Module, model) -> str | None:
    if isinstance(module, Attention):
        return "attention"
    if isinstance(module, MoE):
        return "moe"
    if isinstance(module, RMSNorm):
        return "norms"
    if module is model.output:
        return "output head"
    if module is model.tok_embeddings:
        return "embeddings"
    return None


def instrument(model) -> None:
    """Record a span named `mixtral::<part>` around every module of `PARTS` and `mixtral::forward` around the
    model itself (forward pre-hooks open them, forward hooks close them)."""
    def opener(label):
        def pre(module, args):
            span = record_function(label)
            span.__enter__()
            module._profile_spans = getattr(module, "_profile_spans", []) + [span]
        return pre

    def closer(module, args, output):
        module._profile_spans.pop().__exit__(None, None, None)

    for module in model.modules():
        part = _part(module, model)
        if part is not None:
            module.register_forward_pre_hook(opener(f"mixtral::{part}"))
            module.register_forward_hook(closer)
    model.register_forward_pre_hook(opener("mixtral::forward"))
    model.register_forward_hook(closer)


def spans(prof, calls: int) -> dict[str, float]:
    """ms per call in each labelled span (CPU total: children included)."""
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("mixtral::") or event.key == "step":
            totals[event.key.removeprefix("mixtral::")] += event.cpu_time_total / 1e3 / calls
    return totals


def report(title: str, prof, calls: int, top: int) -> None:
    t = spans(prof, calls)
    step = t.get("step", t["forward"])
    print(f"\n{title}: {step:.1f} ms a call")
    print(f"  {'part':<34} {'ms':>8} {'share':>7}")
    inside = 0.0
    for part in PARTS:
        if part in t:
            inside += t[part]
            print(f"  {part:<34} {t[part]:>8.2f} {t[part] / step:>6.1%}")
    glue = t["forward"] - inside
    print(f"  {'forward, outside the modules':<34} {glue:>8.2f} {glue / step:>6.1%}")
    if "step" in t:
        loop = step - t["forward"]
        print(f"  {'step, outside the forward':<34} {loop:>8.2f} {loop / step:>6.1%}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="default", help="checkpoint directory or preset (default: the "
                        "bundled model)")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None)
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens before the decode steps")
    parser.add_argument("--steps", type=int, default=16, help="decode steps profiled (after 4 unprofiled)")
    parser.add_argument("--prefill", type=int, default=512, help="tokens of the profiled prefill")
    parser.add_argument("--top", type=int, default=12, help="ops listed by self time")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = mixtral.load(args.checkpoint, dtype=args.dtype, quantize=args.quantize)
    config = model.config
    instrument(model)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, config.vocab_size, (args.batch, args.prompt), generator=generator)
    long_prompt = torch.randint(3, config.vocab_size, (1, args.prefill), generator=generator)
    print(f"{args.checkpoint}: {config.n_layers} layers, dim {config.dim}, {config.n_experts} experts; "
          f"{args.dtype}{', ' + args.quantize if args.quantize else ''}; {args.threads} threads")

    with torch.inference_mode():
        # decode: the loop of `stream`, one token a row a step, greedy
        cache = KVCache(config, args.batch, args.prompt + args.steps + 4, max_chunk=args.prompt,
                        dtype=model.tok_embeddings.weight.dtype)
        logits = model(prompt, cache=cache, last_only=True)[:, 0].float()
        n_new = torch.ones(args.batch, dtype=torch.long)

        def decode_step():
            ids = logits.argmax(-1)[:, None]
            return model(ids, cache=cache, n_new=n_new, last_only=True)[:, 0].float()

        for _ in range(4):
            logits = decode_step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                with record_function("step"):
                    logits = decode_step()
        report(f"decode step, batch {args.batch}", prof, args.steps, args.top)

        def prefill():
            fresh = KVCache(config, 1, args.prefill + 1, max_chunk=args.prefill,
                            dtype=model.tok_embeddings.weight.dtype)
            return model(long_prompt, cache=fresh, last_only=True)

        prefill()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            prefill()
        report(f"prefill of {args.prefill} tokens", prof, 1, args.top)

    # time to the first token of `stream` against the bare prefill, without the profiler
    bare, first = [], []
    for _ in range(3):
        with torch.inference_mode():
            start = time.perf_counter()
            prefill()
            bare.append(time.perf_counter() - start)
        start = time.perf_counter()
        next(stream(model, long_prompt.tolist(), 1))
        first.append(time.perf_counter() - start)
    print(f"\n{args.prefill}-token prompt: prefill forward {statistics.median(bare) * 1e3:.1f} ms, "
          f"stream's first token {statistics.median(first) * 1e3:.1f} ms (medians of 3)")


if __name__ == "__main__":
    main()

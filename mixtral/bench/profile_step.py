"""`mixtral bench profile`: where a decode step and a prefill spend their time: torch.profiler over mixtral's
forward pass, with a span recorded around every module of the model, so time inside our C kernels (called through
ctypes, invisible to the profiler's op list) is still charged to the attention, MoE or output head that ran it.

It prints, per phase (--steps decode steps at --batch rows after a --prompt-tokens prompt; one --prefill-tokens
prefill), the ms a call spends in each part of the model, what the model's forward spends outside its modules
(RoPE tables, masks, the KV cache's bookkeeping, indexing), and what the step spends outside the forward (the
loop of `mixtral.generate.stream`: sampling, building the next ids); then the --top ops by self time. Last, the
time to the first token of `mixtral.generate.stream` on the prefill prompt against the bare prefill forward.

    mixtral bench profile --model out/bench8x7b/synthetic-mixtral-8x7b-2layers-seed0
    mixtral bench profile --model default --quantize int4 --batch 8
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from mixtral.cache import KVCache
from mixtral.generate import stream
from mixtral.io.loading import load
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


def print_phase(title: str, prof, calls: int, top: int) -> dict[str, float]:
    """Print the ms a call of one phase spends in each part, then the `top` ops by self time; returns the spans."""
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
    return dict(t)


def run(*, model: str = "default", dtype: str = "bf16", quantize: str | None = None, batch: int = 1,
        prompt_tokens: int = 16, steps: int = 16, prefill_tokens: int = 512, top: int = 12) -> dict:
    """Profile `steps` greedy decode steps of `batch` rows after a `prompt_tokens`-token prompt (after 4 unprofiled
    ones) and one `prefill_tokens`-token prefill of `model` (a checkpoint directory or preset, loaded in `dtype`,
    quantized to `quantize` if given), then time `stream`'s first token against the bare prefill; prints each
    phase's parts and its `top` ops. Returns {"benchmark": "profile", "phases": {title: {span: ms per call}},
    "prefill_ms", "first_token_ms"}."""
    net = load(model, dtype=dtype, quantize=quantize)
    config = net.config
    instrument(net)
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, config.vocab_size, (batch, prompt_tokens), generator=generator)
    long_prompt = torch.randint(3, config.vocab_size, (1, prefill_tokens), generator=generator)
    print(f"{model}: {config.n_layers} layers, dim {config.dim}, {config.n_experts} experts; "
          f"{dtype}{', ' + quantize if quantize else ''}; {torch.get_num_threads()} threads")
    phases = {}

    with torch.inference_mode():
        # decode: the loop of `stream`, one token a row a step, greedy
        cache = KVCache(config, batch, prompt_tokens + steps + 4, max_chunk=prompt_tokens,
                        dtype=net.tok_embeddings.weight.dtype)
        logits = net(prompt_ids, cache=cache, last_only=True)[:, 0].float()
        n_new = torch.ones(batch, dtype=torch.long)

        def decode_step():
            ids = logits.argmax(-1)[:, None]
            return net(ids, cache=cache, n_new=n_new, last_only=True)[:, 0].float()

        for _ in range(4):
            logits = decode_step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with record_function("step"):
                    logits = decode_step()
        title = f"decode step, batch {batch}"
        phases[title] = print_phase(title, prof, steps, top)

        def run_prefill():
            fresh = KVCache(config, 1, prefill_tokens + 1, max_chunk=prefill_tokens,
                            dtype=net.tok_embeddings.weight.dtype)
            return net(long_prompt, cache=fresh, last_only=True)

        run_prefill()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_prefill()
        title = f"prefill of {prefill_tokens} tokens"
        phases[title] = print_phase(title, prof, 1, top)

    # time to the first token of `stream` against the bare prefill, without the profiler
    bare, first = [], []
    for _ in range(3):
        with torch.inference_mode():
            start = time.perf_counter()
            run_prefill()
            bare.append(time.perf_counter() - start)
        start = time.perf_counter()
        next(stream(net, long_prompt.tolist(), 1))
        first.append(time.perf_counter() - start)
    print(f"\n{prefill_tokens}-token prompt: prefill forward {statistics.median(bare) * 1e3:.1f} ms, "
          f"stream's first token {statistics.median(first) * 1e3:.1f} ms (medians of 3)")
    return {"benchmark": "profile", "phases": phases, "prefill_ms": statistics.median(bare) * 1e3,
            "first_token_ms": statistics.median(first) * 1e3}

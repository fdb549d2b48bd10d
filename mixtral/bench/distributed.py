"""Expert- and data-parallel training traffic: what each step sends, how long it takes, and what that predicts for
Mixtral-8x7B on real interconnects.

For each layout (ep x dp processes, launched with torchrun on this machine, gloo) the benchmark runs training steps
of a model (`mixtral.parallel`) and records every collective a rank calls: the all-to-alls of the token dispatch
and their counts, FSDP2's all-gathers of parameters and reduce-scatters of gradients, the experts' gradient
all-reduce over dp, and the small all-reduces of the losses and router statistics. While it records, each
collective is waited for where it is issued, so its time is its own (FSDP would otherwise overlap the next
block's all-gather with compute). Bytes are what one rank sends under the bandwidth-optimal algorithms: an
all-to-all sends the rows bound for other ranks; an all-gather or reduce-scatter of a tensor of S bytes over n
ranks sends S (n - 1) / n; an all-reduce twice that.

The same run times each kind of collective alone at a few sizes and fits t = latency + bytes / bandwidth. The
traffic model (`step_traffic`: bytes per step from the model's shapes and the layout, with uniform routing)
then predicts the step's collectives; the table shows its bytes and times beside the counted and measured ones.
Finally the model, with an interconnect's latency and bandwidth instead of gloo's, gives Mixtral-8x7B's step.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mixtral.config import PRESETS, ModelConfig

EPILOG = """\
Runs each layout with torchrun on this machine (gloo; processes x --threads should not exceed its cores, or the
times measure contention). On one machine the numbers check the traffic model; the Mixtral-8x7B table applies it
to interconnects this machine does not have.

examples:
  mixtral bench distributed                                     # 1x1, ep2 and ep2xdp2 on the small preset
  mixtral bench distributed --layouts 2x1,4x1,2x2 --preset small --batch 8 --seq 128
"""

# ---- recording the collectives -----------------------------------------------------------------------------

KINDS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "other")
# An all-reduce this large is the experts' gradient over dp; the losses' and router statistics' are vectors of
# layers x (2 n_experts + 1) at most, and the gradient norm one number.
EXPERT_ELEMENTS = 1 << 14


@dataclass
class Call:
    op: str  # the torch.distributed function
    kind: str  # one of KINDS
    what: str  # rows, counts, params, grads, experts, stats
    sent: int  # bytes this rank sends
    seconds: float


def _sent(op: str, tensor_bytes: int, n: int, split_bytes: int | None = None) -> int:
    if op == "all_to_all_single":
        return split_bytes
    if op in ("all_gather_single", "all_gather_into_tensor"):
        return tensor_bytes * (n - 1)  # tensor_bytes: one rank's input
    if op in ("reduce_scatter_single", "reduce_scatter_tensor"):
        return tensor_bytes * (n - 1) // n  # tensor_bytes: the full input
    if op == "all_reduce":
        return 2 * tensor_bytes * (n - 1) // n
    if op == "all_gather":
        return tensor_bytes * (n - 1)
    return tensor_bytes


@contextlib.contextmanager
def recording(calls: list[Call]):
    """Wrap torch.distributed's collectives: each call is waited for where it is issued and appended to `calls`."""
    originals = {}

    def wrap(op: str, kind: str):
        original = getattr(dist, op)
        originals[op] = original

        signature = inspect.signature(original)

        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            group = bound.get("group")
            n = dist.get_world_size(group)
            if op == "all_to_all_single":
                inp, splits = bound["input"], bound.get("input_split_sizes")
                total = inp.numel() * inp.element_size()
                row = total // len(inp) if len(inp) else 0
                rank = dist.get_rank(group)
                sent = (len(inp) - splits[rank]) * row if splits else total * (n - 1) // n
                what = "counts" if inp.dtype == torch.int64 else "rows"
            else:
                tensor = bound.get("input_tensor", bound.get("input", bound.get("tensor")))
                size = tensor.numel() * tensor.element_size()
                sent = _sent(op, size, n)
                what = {"all-gather": "params", "reduce-scatter": "grads"}.get(kind, "stats")
                if op == "all_reduce" and tensor.numel() >= EXPERT_ELEMENTS:
                    what = "experts"
            start = time.perf_counter()
            work = original(*args, **kwargs)
            if work is not None:
                work.wait()
            calls.append(Call(op, kind, what, sent, time.perf_counter() - start))
            return work
        setattr(dist, op, call)

    for op, kind in (("all_to_all_single", "all-to-all"), ("all_gather_single", "all-gather"),
                     ("all_gather_into_tensor", "all-gather"), ("reduce_scatter_single", "reduce-scatter"),
                     ("reduce_scatter_tensor", "reduce-scatter"), ("all_reduce", "all-reduce"),
                     ("all_gather", "other"), ("broadcast", "other")):
        wrap(op, kind)
    try:
        yield calls
    finally:
        for op, original in originals.items():
            setattr(dist, op, original)


# ---- the traffic model ---------------------------------------------------------------------------------------

def split_params(config: ModelConfig) -> tuple[int, int]:
    """(non-expert parameters, routed-expert parameters) of a model."""
    total, _ = config.param_counts()
    experts = config.n_layers * config.n_experts * 3 * config.dim * config.hidden_dim if config.is_moe else 0
    return total - experts, experts


def step_traffic(config: ModelConfig, ep: int, dp: int, tokens_per_rank: int, *, act_bytes: int = 4,
                 param_bytes: int = 4, grad_bytes: int = 4, shard_experts: bool = True) -> dict[str, float]:
    """Bytes one rank sends in one training step (one micro-batch), by what they carry, with uniform routing.

    rows: 4 all-to-alls per MoE layer (dispatch and combine, forward and backward), each tokens x top_k rows of
    dim activations, the (ep - 1) / ep bound for other ranks. counts: one exchange of n_experts int64 per layer.
    params: FSDP all-gathers every non-expert parameter for the forward, and the blocks' again for the backward
    (they are resharded after the forward; the root's are not); with `shard_experts`, each rank's experts too, over
    its dp group. grads: one reduce-scatter of every gradient FSDP shards. experts: without `shard_experts`, the
    all-reduce of this rank's experts' gradients over the dp copies.
    """
    n = ep * dp
    non_expert, experts = split_params(config)
    root = config.vocab_size * config.dim * (1 if config.tie_embeddings else 2) + config.dim
    blocks = non_expert - root
    moe_layers = config.n_layers if config.is_moe else 0
    ring, dp_ring = (n - 1) / n, (dp - 1) / dp
    sharded = experts / ep * dp_ring if shard_experts else 0.0
    return {
        "rows": 4 * moe_layers * tokens_per_rank * config.top_k * config.dim * act_bytes * (ep - 1) / ep,
        "counts": moe_layers * config.n_experts * 8 * (ep - 1) / ep,
        "params": (non_expert + blocks) * param_bytes * ring + 2 * sharded * param_bytes,
        "grads": non_expert * grad_bytes * ring + sharded * grad_bytes,
        "experts": 0.0 if shard_experts else 2 * (experts / ep) * grad_bytes * dp_ring,
    }


@dataclass
class Link:
    """A collective's cost: latency (s) + bytes / bandwidth (bytes/s)."""
    latency: float
    bandwidth: float

    def seconds(self, sent: float, calls: int = 1) -> float:
        return calls * self.latency + sent / self.bandwidth


def fit(points: list[tuple[float, float]]) -> Link:
    """Least squares of seconds = latency + bytes / bandwidth over (bytes, seconds) points."""
    n = len(points)
    mx = sum(b for b, _ in points) / n
    my = sum(t for _, t in points) / n
    var = sum((b - mx) ** 2 for b, _ in points)
    slope = sum((b - mx) * (t - my) for b, t in points) / var if var else 0.0
    slope = max(slope, 1e-15)
    return Link(max(my - slope * mx, 0.0), 1.0 / slope)


# ---- the worker (one rank, under torchrun) ---------------------------------------------------------------------

def _time_alone(op: str, sizes: list[int], group, repeats: int = 5) -> list[tuple[float, float]]:
    """(bytes sent, seconds) of `op` alone at each size of float32 elements: the median of `repeats`."""
    n = dist.get_world_size(group)
    points = []
    for size in sizes:
        per = max(n, size // 4 // n * n)
        x = torch.randn(per)
        times = []
        for _ in range(repeats):
            dist.barrier(group=group)
            start = time.perf_counter()
            if op == "all-to-all":
                dist.all_to_all_single(torch.empty_like(x), x, group=group)
                sent = x.nbytes * (n - 1) // n
            elif op == "all-gather":
                dist.all_gather_into_tensor(torch.empty(per * n), x, group=group)
                sent = x.nbytes * (n - 1)
            elif op == "reduce-scatter":
                dist.reduce_scatter_tensor(torch.empty(per // n), x, group=group)
                sent = x.nbytes * (n - 1) // n
            else:
                dist.all_reduce(x, group=group)
                sent = 2 * x.nbytes * (n - 1) // n
            times.append(time.perf_counter() - start)
        points.append((sent, sorted(times)[len(times) // 2]))
    return points


def worker(preset: str, ep: int, dp: int, batch: int, seq: int, steps: int, threads: int, out: str) -> None:
    from mixtral import parallel
    from mixtral.model import Transformer
    from mixtral.train.trainer import lm_loss

    torch.set_num_threads(threads)
    mesh = parallel.init(ep, dp, timeout=600)
    config = PRESETS[preset]
    model = Transformer(config).init_weights(0)
    model.train()
    parallel.parallelize(model, mesh)
    params = [p for p in model.parameters() if p.requires_grad]
    # Plain Adam: the step's collectives are what is measured, the optimizer only has to run.
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    reduce = parallel.sum_over(mesh)
    generator = torch.Generator().manual_seed(0)

    def step(record: list[Call] | None) -> tuple[float, list[Call]]:
        ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=generator)
        inputs, targets = parallel.local_rows(ids[:, :-1], mesh), parallel.local_rows(ids[:, 1:], mesh)
        calls: list[Call] = []
        context = recording(calls) if record is not None else contextlib.nullcontext()
        dist.barrier()
        start = time.perf_counter()
        with context, torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _, _ = lm_loss(model, inputs, targets, 0.01, 0.001, reduce=reduce)
            loss.backward()
            parallel.reduce_expert_grads(model, mesh)
            parallel.clip_grad_norm_(model, 1.0, mesh)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, calls

    for _ in range(2):  # warm-up: FSDP's lazy init, the kernels' first shapes
        step(None)
    free, recorded = [], []
    for _ in range(steps):  # alternated, so both see the same state of the machine
        free.append(step(None)[0])
        recorded.append(step([]))
    sizes = [1 << 12, 1 << 16, 1 << 20, 1 << 22]
    alone = {op: _time_alone(op, sizes, mesh.world.get_group()) for op in KINDS[:4]}
    everyone = [None] * mesh.size
    mine = {"free": free, "recorded": [(t, [c.__dict__ for c in calls]) for t, calls in recorded], "alone": alone}
    dist.all_gather_object(everyone, mine)
    if mesh.is_main:
        tokens = batch * seq // mesh.size
        Path(out).write_text(json.dumps({"preset": preset, "ep": ep, "dp": dp, "batch": batch, "seq": seq,
                                         "tokens_per_rank": tokens, "threads": threads, "ranks": everyone}))
    parallel.shutdown()


# ---- the report --------------------------------------------------------------------------------------------------

def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def summarize(result: dict) -> dict:
    """Per step, averaged over the ranks and recorded steps: bytes sent and seconds by what the calls carry; the
    step time without recording; the model's bytes and its time from the fitted links."""
    config = PRESETS[result["preset"]]
    ep, dp = result["ep"], result["dp"]
    per_rank = []
    for r in result["ranks"]:
        by: dict[str, list[float]] = {}
        for _, calls in r["recorded"]:
            for c in calls:
                entry = by.setdefault(c["what"], [0.0, 0.0, 0])
                entry[0] += c["sent"]
                entry[1] += c["seconds"]
                entry[2] += 1
        steps = len(r["recorded"])
        per_rank.append({k: (v[0] / steps, v[1] / steps, v[2] / steps) for k, v in by.items()})
    what = sorted({k for r in per_rank for k in r})
    measured = {k: tuple(sum(r.get(k, (0, 0, 0))[i] for r in per_rank) / len(per_rank) for i in range(3))
                for k in what}
    links = {op: fit([tuple(p) for r in result["ranks"] for p in r["alone"][op]]) for op in KINDS[:4]}
    kind_of = {"rows": "all-to-all", "counts": "all-to-all", "params": "all-gather", "grads": "reduce-scatter",
               "experts": "all-reduce", "stats": "all-reduce"}
    # The rows travel in bf16 (the workers train under bf16 autocast); FSDP gathers and reduces float32.
    model = step_traffic(config, ep, dp, result["tokens_per_rank"], act_bytes=2)
    rows = []
    for k in what:
        sent, seconds, calls = measured[k]
        predicted = model.get(k)
        link = links[kind_of.get(k, "all-reduce")]
        rows.append({"what": k, "calls": calls, "sent": sent, "seconds": seconds, "model_sent": predicted,
                     "model_seconds": link.seconds(predicted if predicted is not None else sent, round(calls))})
    step_free = _median([t for r in result["ranks"] for t in r["free"]])
    step_recorded = _median([t for r in result["ranks"] for t, _ in r["recorded"]])
    return {"layout": f"ep{ep} x dp{dp}", "rows": rows, "step_free": step_free, "step_recorded": step_recorded,
            "links": {k: {"latency": v.latency, "bandwidth": v.bandwidth} for k, v in links.items()}}


def print_summary(s: dict, result: dict) -> None:
    print(f"\n## {s['layout']}: {result['preset']}, batch {result['batch']} x {result['seq']} tokens "
          f"({result['tokens_per_rank']} per rank), {result['threads']} thread(s) per rank")
    print(f"{'carries':<8} {'calls':>6} {'MB sent':>9} {'model MB':>9} {'ms':>8} {'model ms':>9}")
    total = [0.0, 0.0]
    for r in s["rows"]:
        model_mb = "" if r["model_sent"] is None else f"{r['model_sent'] / 1e6:9.3f}"
        print(f"{r['what']:<8} {r['calls']:6.0f} {r['sent'] / 1e6:9.3f} {model_mb:>9} {r['seconds'] * 1e3:8.1f} "
              f"{r['model_seconds'] * 1e3:9.1f}")
        total[0] += r["seconds"]
        total[1] += r["model_seconds"]
    print(f"{'total':<8} {'':>6} {sum(r['sent'] for r in s['rows']) / 1e6:9.3f} {'':>9} {total[0] * 1e3:8.1f} "
          f"{total[1] * 1e3:9.1f}")
    print(f"step: {s['step_free'] * 1e3:.1f} ms as trained (collectives overlapping), "
          f"{s['step_recorded'] * 1e3:.1f} ms while recording (each collective waited for)")
    print("fitted gloo links: " + ", ".join(f"{k} {v['latency'] * 1e6:.0f} us + {v['bandwidth'] / 1e9:.2f} GB/s"
                                             for k, v in s["links"].items()))


# Interconnects for the Mixtral-8x7B model: (name, ep, dp, link of the all-to-all, link of FSDP and the dp
# all-reduce, GPUs). Bandwidths are per GPU and direction, after typical NCCL efficiency: NVLink 4 (H100 SXM,
# 450 GB/s per direction) at ~80%; 100 Gb/s Ethernet/InfiniBand (12.5 GB/s per node) shared by the node's GPUs.
SCENARIOS = [
    ("8 GPUs, one node, NVLink", 8, 1, Link(20e-6, 360e9), Link(20e-6, 360e9), True),
    ("16 GPUs, 2 nodes x 8, 100 Gb/s between", 8, 2, Link(20e-6, 360e9), Link(50e-6, 12.5e9 / 8), True),
    ("  the same, experts copied (not sharded)", 8, 2, Link(20e-6, 360e9), Link(50e-6, 12.5e9 / 8), False),
]


def mixtral_8x7b_model(tokens_per_gpu: int = 8 * 4096, flops: float = 400e12) -> list[dict]:
    """Step time of Mixtral-8x7B training per scenario: compute at `flops` per GPU (bf16, ~40% of an H100's
    dense peak), plus the collectives from `step_traffic` (bf16 activations and gathers, fp32 gradient
    reductions), each on its link. Exposed: no overlap; hidden: FSDP's gathers and reductions behind compute."""
    config = PRESETS["mixtral-8x7b"]
    _, active = config.param_counts()
    seq = 4096
    compute = tokens_per_gpu * (6 * active + 12 * config.n_layers * seq * config.dim) / flops
    out = []
    for name, ep, dp, a2a, wide, shard in SCENARIOS:
        t = step_traffic(config, ep, dp, tokens_per_gpu, act_bytes=2, param_bytes=2, grad_bytes=4,
                         shard_experts=shard)
        layers = config.n_layers
        a2a_s = a2a.seconds(t["rows"], 4 * layers) + a2a.seconds(t["counts"], layers)
        groups = layers * (2 if shard and dp > 1 else 1)  # FSDP groups per step: blocks (+ experts), + the root
        fsdp_s = wide.seconds(t["params"], 2 * groups + 1) + wide.seconds(t["grads"], groups + 1)
        experts_s = wide.seconds(t["experts"], 2 * layers) if dp > 1 and not shard else 0.0
        exposed = compute + a2a_s + fsdp_s + experts_s
        hidden = compute + a2a_s + max(0.0, fsdp_s + experts_s - compute)
        n = ep * dp
        # Training state per GPU: fp32 weights and AdamW's two moments (12 bytes a parameter); FSDP shards the
        # non-expert ones over all n GPUs, the experts are split over ep and sharded over dp (or copied).
        non_expert, experts = split_params(config)
        state_gb = 12 * (non_expert / n + experts / (ep * dp if shard else ep)) / 1e9
        out.append({"scenario": name, "state_gb_per_gpu": state_gb, "gpus": n, "ep": ep, "dp": dp,
                    "compute_s": compute, "all_to_all_s": a2a_s,
                    "fsdp_s": fsdp_s, "experts_s": experts_s, "step_exposed_s": exposed, "step_hidden_s": hidden,
                    "tokens_per_s_exposed": n * tokens_per_gpu / exposed,
                    "tokens_per_s_hidden": n * tokens_per_gpu / hidden,
                    "bytes": t})
    return out


def print_model(rows: list[dict]) -> None:
    print("\n## Mixtral-8x7B, 8 x 4096 tokens per GPU per step, 400 TFLOPS per GPU, bf16 (model)")
    print(f"{'scenario':<42} {'compute s':>9} {'a2a s':>7} {'fsdp s':>7} {'dp ar s':>7} {'step s':>7} "
          f"{'hidden s':>8} {'ktok/s':>8} {'state GB':>8}")
    for r in rows:
        print(f"{r['scenario']:<42} {r['compute_s']:9.2f} {r['all_to_all_s']:7.2f} {r['fsdp_s']:7.2f} "
              f"{r['experts_s']:7.2f} {r['step_exposed_s']:7.2f} {r['step_hidden_s']:8.2f} "
              f"{r['tokens_per_s_hidden'] / 1e3:8.1f} {r['state_gb_per_gpu']:8.1f}")


def scaling_check(results: list[dict]) -> list[dict]:
    """The step-time model on this machine: the one-process step (layout 1x1) divided over n processes, slowed
    by n x threads / cores where they outnumber the cores, plus the collectives at the fitted gloo links, against
    the measured step. Needs a 1x1 layout among the results (else returns [])."""
    single = [r for r in results if r["settings"]["ep"] * r["settings"]["dp"] == 1]
    if not single:
        return []
    t1 = single[0]["summary"]["step_free"]
    cores = os.cpu_count() or 1
    rows = []
    print("\n## step time against world size on this machine (model: t1 / n x oversubscription + collectives;")
    print("## measured split: the step while recording, less the time inside its collectives)")
    print(f"{'layout':<12} {'n':>3} {'step ms':>8} {'model':>7} {'compute ms':>11} {'model':>7} "
          f"{'collectives ms':>15} {'model':>7}")
    for r in results:
        s, settings = r["summary"], r["settings"]
        n = settings["ep"] * settings["dp"]
        compute = t1 / n * max(1.0, n * settings["threads"] / cores)
        comm = sum(row["model_seconds"] for row in s["rows"]) if n > 1 else 0.0
        inside = sum(row["seconds"] for row in s["rows"])
        rows.append({"layout": s["layout"], "n": n, "measured_s": s["step_free"], "model_s": compute + comm,
                     "compute_s": compute, "collectives_s": comm, "measured_compute_s": s["step_recorded"] - inside,
                     "measured_collectives_s": inside})
        print(f"{s['layout']:<12} {n:3d} {s['step_free'] * 1e3:8.1f} {(compute + comm) * 1e3:7.1f} "
              f"{(s['step_recorded'] - inside) * 1e3:11.1f} {compute * 1e3:7.1f} {inside * 1e3:15.1f} "
              f"{comm * 1e3:7.1f}")
    return rows


def run(layouts: list[tuple[int, int]], preset: str, batch: int, seq: int, steps: int, threads: int) -> dict:
    """Launch each layout with torchrun, then print its table and the Mixtral-8x7B model. Returns all results."""
    results = []
    with tempfile.TemporaryDirectory(prefix="mixtral-bench-dist-") as tmp:
        for ep, dp in layouts:
            out = Path(tmp) / f"ep{ep}dp{dp}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ep * dp),
                   "--master-port", str(_free_port()), "-m", "mixtral", "bench", "distributed", "--worker", str(out),
                   "--layouts", f"{ep}x{dp}", "--preset", preset, "--batch", str(batch), "--seq", str(seq),
                   "--steps", str(steps), "--threads", str(threads)]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"the ep{ep} x dp{dp} run failed:\n{done.stderr[-3000:]}")
            result = json.loads(out.read_text())
            summary = summarize(result)
            print_summary(summary, result)
            results.append({"summary": summary, "settings": {k: v for k, v in result.items() if k != "ranks"}})
    scaling = scaling_check(results)
    model = mixtral_8x7b_model()
    print_model(model)
    # The check: the model's bytes for what does not depend on routing equal the bytes the run sent.
    exact = [(r["what"], r["sent"], r["model_sent"]) for res in results for r in res["summary"]["rows"]
             if r["what"] in ("params", "grads", "experts", "counts")]
    passed = all(abs(sent - model) <= 0.01 * max(model, 1.0) for _, sent, model in exact)
    print(f"\ntraffic model {'matches' if passed else 'DOES NOT match'} the counted bytes of "
          f"{', '.join(sorted({w for w, _, _ in exact}))} (within 1%)")
    return {"layouts": results, "scaling": scaling, "mixtral_8x7b": model, "passed": passed}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_layouts(text: str) -> list[tuple[int, int]]:
    """"2x1,2x2" -> [(2, 1), (2, 2)] (ep x dp)."""
    layouts = []
    for part in text.split(","):
        ep, _, dp = part.strip().partition("x")
        layouts.append((int(ep), int(dp or 1)))
    return layouts

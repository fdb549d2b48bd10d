"""The routing report: every statistic of `mixtral.analysis.stats` per layer and domain, as JSON, plots and a
markdown summary.

    report.json              per-layer entries: first_choice_repeat, top2_repeat (top-k sets sharing an expert;
                             the paper's "first or second choice" for k = 2), expert_share, lru_hit_rate,
                             prediction_recall, prefetch, token_consistency; each per domain and "all"; plus the
                             exact random-routing baselines
    expert_distribution.png  the paper's Figure 7: share of assignments per expert, per domain, per layer
    locality.png             the paper's Figure 8 / Table 5: repeat rates per layer and domain against random
    lru.png                  LRU expert-cache hit rate against cache size, per layer
    prediction.png           next-layer prediction recall per layer; prefetch + LRU hit rate against cache size
    results.md               the tables, beside the paper's Mixtral 8x7B figures
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mixtral.analysis import stats
from mixtral.analysis.routes import Routes
from mixtral.io.files import atomic_path, write_json

# The paper's Table 5 (Mixtral 8x7B on The Pile): ranges over its domains, in percent.
PAPER_TABLE5 = {0: {"first": (13.6, 14.9), "topk": (44.9, 49.9)},
                15: {"first": (23.6, 28.4), "topk": (61.6, 67.0)},
                31: {"first": (19.7, 26.3), "topk": (44.5, 53.6)}}
MIXTRAL_8X7B_EXPERT_BYTES = 3 * 4096 * 14336 * 2  # one expert in bf16: 352 MB


def _per_domain(routes: Routes, parts: dict[str, Routes], fn) -> dict:
    out = {d: fn(r) for d, r in parts.items()}
    out["all"] = fn(routes)
    return out


def _clean(value):
    """JSON-safe: numpy to Python, NaN to None."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def analyse(routes: Routes) -> dict:
    """Every statistic, per layer and domain. See the module docstring for the keys."""
    E, k = routes.n_experts, routes.top_k
    parts = routes.by_domain()
    guesses = [n for n in ("before", "after") if n in routes.predicted]  # the earlier guess first
    layers = []
    for layer in range(routes.n_layers):
        def on(r: Routes, fn, layer=layer):
            return fn(r.experts[layer], r.sequence)

        entry = {
            "layer": layer,
            "first_choice_repeat": _per_domain(routes, parts, lambda r: on(r, stats.first_choice_repeat)),
            "top2_repeat": _per_domain(routes, parts, lambda r: on(r, stats.topk_repeat)),
            "expert_share": _per_domain(routes, parts, lambda r: stats.expert_shares(r.experts[layer], E)),
            "lru_hit_rate": _per_domain(routes, parts, lambda r: on(r, lambda x, s: stats.lru_hit_rates(x, s, E))),
            "token_consistency": stats.token_consistency(routes.tokens, routes.experts[layer, :, 0]),
        }
        if layer > 0:  # predicted from layer - 1's hidden states
            entry["prediction_recall"] = {
                name: _per_domain(routes, parts, lambda r, name=name: stats.prediction_recall(
                    r.predicted[name][layer - 1], r.experts[layer])) for name in guesses}
            entry["prefetch"] = {
                name: [{"capacity": c, **stats.prefetch_lru(routes.experts[layer], routes.predicted[name][layer - 1],
                                                            routes.sequence, c)} for c in range(1, E + 1)]
                for name in guesses}
        # LRU alone, in prefetch_lru's terms, from the stack-distance hit rates above (no second simulation):
        # every miss is one load on demand, k accesses per token.
        entry["lru"] = [{"capacity": c, "hit_rate": h, "demand_loads": (1 - h) * k, "prefetch_loads": 0.0,
                         "wasted_loads": 0.0} for c, h in enumerate(entry["lru_hit_rate"]["all"], start=1)]
        layers.append(entry)
    return _clean({
        "meta": routes.meta, "n_experts": E, "top_k": k, "n_layers": routes.n_layers, "tokens": len(routes.tokens),
        "sequences": int(len(np.unique(routes.sequence))),
        "domains": {d: len(r.tokens) for d, r in parts.items()},
        "baselines": {"first_choice_repeat": stats.random_first_choice_repeat(E),
                      "top2_repeat": stats.random_topk_repeat(E, k),
                      "lru_hit_rate": [stats.random_lru_hit_rate(E, k, c) for c in range(1, E + 1)],
                      "prediction_recall": stats.random_prediction_recall(E, k)},
        "layers": layers,
    })


# ---- plots -----------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    """Lay out, write atomically and close the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _shown_layers(n_layers: int) -> list[int]:
    """All layers of a small model; first, middle and last of a deep one (as the paper shows 0, 15, 31)."""
    return list(range(n_layers)) if n_layers <= 8 else [0, n_layers // 2 - 1, n_layers - 1]


def plot_distribution(result: dict, path: Path) -> None:
    plt = _pyplot()
    shown = _shown_layers(result["n_layers"])
    domains = list(result["domains"])
    E = result["n_experts"]
    cols = min(3, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False, sharey=True)
    width = 0.8 / max(len(domains), 1)
    for ax, layer in zip(axes.flat, shown):
        shares = result["layers"][layer]["expert_share"]
        for i, d in enumerate(domains):
            ax.bar(np.arange(E) + (i - (len(domains) - 1) / 2) * width, shares[d], width, label=d)
        ax.axhline(1 / E, color="k", ls="--", lw=0.8)
        ax.set(title=f"layer {layer}", xlabel="expert", xticks=range(E))
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("share of assignments")
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.suptitle("expert assignment by domain (dashed: uniform)")
    _save(fig, path)


def plot_locality(result: dict, path: Path) -> None:
    plt = _pyplot()
    layers = range(result["n_layers"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "first_choice_repeat", "first choice repeated"),
                           (axes[1], "top2_repeat", f"top-{result['top_k']} sets share an expert")):
        for d in [*result["domains"], "all"]:
            values = [result["layers"][layer][key][d] for layer in layers]
            ax.plot(layers, [np.nan if v is None else 100 * v for v in values],
                    marker="o", ms=3, lw=2.2 if d == "all" else 1, label=d, color="k" if d == "all" else None)
        ax.axhline(100 * result["baselines"][key], color="gray", ls="--", lw=1, label="random routing")
        ax.set(title=title, xlabel="layer", ylabel="consecutive token pairs (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    _save(fig, path)


def plot_lru(result: dict, path: Path) -> None:
    plt = _pyplot()
    E = result["n_experts"]
    sizes = range(1, E + 1)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for entry in result["layers"]:
        ax.plot(sizes, [100 * h for h in entry["lru_hit_rate"]["all"]], marker="o", ms=3, lw=1,
                label=f"layer {entry['layer']}")
    ax.plot(sizes, [100 * h for h in result["baselines"]["lru_hit_rate"]], "k--", lw=1, label="random routing")
    ax.set(xlabel="experts kept per layer", ylabel="hit rate (%)", title="LRU expert cache", xticks=list(sizes))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def plot_prediction(result: dict, path: Path) -> None:
    plt = _pyplot()
    E = result["n_experts"]
    later = [e for e in result["layers"] if "prediction_recall" in e]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in (later[0]["prediction_recall"] if later else {}):
        axes[0].plot([e["layer"] for e in later], [100 * e["prediction_recall"][name]["all"] for e in later],
                     marker="o", ms=3, label=f"from layer l-1, {name} its MoE")
    axes[0].axhline(100 * result["baselines"]["prediction_recall"], color="gray", ls="--", lw=1,
                    label="random guess")
    axes[0].set(xlabel="layer l", ylabel="recall of the real top-k (%)", title="next-layer expert prediction")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    sizes = range(1, E + 1)
    mean = lambda rows, key: [np.mean([r[c - 1][key] for r in rows]) for c in sizes]  # noqa: E731
    if later:
        axes[1].plot(sizes, [100 * v for v in mean([e["lru"] for e in later], "hit_rate")], marker="o", ms=3,
                     label="LRU")
        for name in later[0]["prefetch"]:
            axes[1].plot(sizes, [100 * v for v in mean([e["prefetch"][name] for e in later], "hit_rate")],
                         marker="o", ms=3, label=f"prefetch ({name}) + LRU")
    axes[1].set(xlabel="experts kept per layer", ylabel="hit rate (%)", xticks=list(sizes),
                title="expert cache, mean over layers 1..L-1")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    _save(fig, path)


# ---- the markdown summary --------------------------------------------------------------------------------------

def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _range(values: list) -> str:
    values = [v for v in values if v is not None]
    return f"{100 * min(values):.1f}–{100 * max(values):.1f}" if values else "-"


def markdown(result: dict, ablation: dict | None = None) -> str:
    E, k = result["n_experts"], result["top_k"]
    domains = list(result["domains"])
    b = result["baselines"]
    expert_mb = result["meta"].get("expert_bytes_bf16", 0) / 1e6
    lines = [f"Routes of {result['tokens']:,} tokens in {result['sequences']} sequences "
             f"({', '.join(f'{d} {n:,}' for d, n in result['domains'].items())}); {result['n_layers']} layers of "
             f"{E} experts, top-{k}. Percentages of consecutive token pairs, or of expert accesses.", "",
             "### Temporal locality (paper Table 5)", "",
             f"Random routing: first choice {_pct(b['first_choice_repeat'])}%, top-{k} sets sharing an expert "
             f"{_pct(b['top2_repeat'])}%. Ranges are over the domains.", "",
             "| layer | first choice, all | range | top-k share one, all | range |" + " ".join(
                 f" {d} first / top-k |" for d in domains),
             "|---|---|---|---|---|" + "---|" * len(domains)]
    for e in result["layers"]:
        f, t = e["first_choice_repeat"], e["top2_repeat"]
        lines.append(f"| {e['layer']} | {_pct(f['all'])} | {_range([f[d] for d in domains])} | {_pct(t['all'])} | "
                     f"{_range([t[d] for d in domains])} |" + "".join(f" {_pct(f[d])} / {_pct(t[d])} |"
                                                                      for d in domains))
    lines += ["", "The paper's Mixtral 8x7B on The Pile (ranges over its domains): " + "; ".join(
        f"layer {layer}: first choice {v['first'][0]}–{v['first'][1]}%, first or second {v['topk'][0]}–"
        f"{v['topk'][1]}%" for layer, v in PAPER_TABLE5.items()) + ".", "",
        "### LRU expert cache: hit rate against experts kept per layer (all domains)", "",
        "| layer | " + " | ".join(f"{c}" for c in range(1, E + 1)) + " |", "|---|" + "---|" * E]
    for e in result["layers"]:
        lines.append(f"| {e['layer']} | " + " | ".join(_pct(h) for h in e["lru_hit_rate"]["all"]) + " |")
    lines.append("| random | " + " | ".join(_pct(h) for h in b["lru_hit_rate"]) + " |")
    later = [e for e in result["layers"] if "prediction_recall" in e]
    if later:
        names = list(later[0]["prediction_recall"])
        lines += ["", "### Predicting layer l's experts from layer l-1's hidden state", "",
                  f"Recall of the real top-{k} when layer l's router is applied to layer l-1's residual stream "
                  f"*before* its MoE update (known a whole MoE layer ahead) or *after* it (one attention ahead). "
                  f"Random guess: {_pct(b['prediction_recall'])}%.", "",
                  "| layer | " + " | ".join(f"{n}, all | {n}, range" for n in names) + " |",
                  "|---|" + "---|---|" * len(names)]
        for e in later:
            r = e["prediction_recall"]
            lines.append(f"| {e['layer']} | " + " | ".join(f"{_pct(r[n]['all'])} | {_range([r[n][d] for d in domains])}"
                                                          for n in names) + " |")
        lines += ["", "### Prefetch + LRU against LRU alone (layers 1..L-1, mean per layer)", "",
                  f"Per token and layer: hit rate of the real accesses, experts loaded on demand, experts "
                  f"prefetched in vain (loaded for this token and not used by it). One expert of this model is "
                  f"{expert_mb:.2f} MB in bf16; one of Mixtral 8x7B is {MIXTRAL_8X7B_EXPERT_BYTES / 1e6:.0f} MB.", "",
                  "| experts kept | LRU hit | LRU loads | " + " | ".join(
                      f"{n}: hit | {n}: demand loads | {n}: wasted loads" for n in names) + " |",
                  "|---|---|---|" + "---|---|---|" * len(names)]
        for c in range(1, E + 1):
            avg = lambda rows, key: np.mean([r[c - 1][key] for r in rows])  # noqa: E731
            lru = [e["lru"] for e in later]
            cells = [f"{_pct(avg(lru, 'hit_rate'))} | {avg(lru, 'demand_loads'):.2f}"]
            for n in names:
                rows = [e["prefetch"][n] for e in later]
                cells.append(f"{_pct(avg(rows, 'hit_rate'))} | {avg(rows, 'demand_loads'):.2f} | "
                             f"{avg(rows, 'wasted_loads'):.2f}")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "### Routing stability: one token id across contexts", "",
              "Share of the occurrences of a token id (ids seen at least 5 times) that go to its most frequent first "
              "choice, against the same with the first choices shuffled across occurrences.", "",
              "| layer | consistency | shuffled | token ids | occurrences |", "|---|---|---|---|---|"]
    for e in result["layers"]:
        c = e["token_consistency"]
        lines.append(f"| {e['layer']} | {_pct(c['consistency'])} | {_pct(c['shuffled'])} | {c['token_ids']} | "
                     f"{c['occurrences']} |")
    if ablation:
        lines += ["", ablation_markdown(ablation)]
    return "\n".join(lines) + "\n"


def ablation_markdown(ablation: dict) -> str:
    """Loss increase per (layer, expert), over all domains, and the domain each removal hurts most."""
    base = ablation["base"]
    domains = [d for d in base if d != "all"]
    E = len(ablation["ablated"][0])
    lines = ["### Expert ablation: held-out loss increase when one expert is removed", "",
             f"Full model: {base['all']:.3f} nats over all domains (" + ", ".join(f"{d} {base[d]:.3f}"
                                                                               for d in domains) + "). "
             "Each cell: increase over all domains in nats, and the domain with the largest increase.", "",
             "| layer | " + " | ".join(f"expert {e}" for e in range(E)) + " |", "|---|" + "---|" * E]
    for layer, row in zip(ablation["layers"], ablation["ablated"]):
        cells = []
        for losses in row:
            worst = max(domains, key=lambda d: losses[d] - base[d])
            cells.append(f"{losses['all'] - base['all']:+.3f} ({worst} {losses[worst] - base[worst]:+.2f})")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(routes: Routes, out: str | os.PathLike, ablation: dict | None = None) -> dict:
    """Analyse `routes` and write report.json, the plots and results.md into `out`. Returns the analysis."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = analyse(routes)
    if ablation:
        result["ablation"] = _clean(ablation)
    write_json(out / "report.json", result, indent=1)
    plot_distribution(result, out / "expert_distribution.png")
    plot_locality(result, out / "locality.png")
    plot_lru(result, out / "lru.png")
    if any("prediction_recall" in e for e in result["layers"]):
        plot_prediction(result, out / "prediction.png")
    (out / "results.md").write_text(markdown(result, ablation))
    return result

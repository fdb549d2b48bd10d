"""`mixtral routes record | report | html | ablate`: registered on the `mixtral` command by `add_routes_parser`.

The model options are the parent parsers the main command passes in (so `--model`, `--tokenizer`, `--dtype` mean
the same everywhere), and a model loads through `mixtral.io.loading.load_model_and_tokenizer` as for `generate`.
One difference: --dtype defaults to float32 here (`RUN_DTYPE`), not to the checkpoint's own.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from mixtral.errors import InputError
from mixtral.io.files import write_text
from mixtral.io.loading import load_model_and_tokenizer, load_tokenizer
from mixtral.io.tokenizer import Tokenizer
from mixtral.model import Transformer

# What record and ablate run the model in unless --dtype says otherwise: the routes of the exact model, not of its
# rounding to a checkpoint's bfloat16.
RUN_DTYPE = "float32"
RUN_DTYPE_NOTE = f"Here --dtype defaults to {RUN_DTYPE}, not to the checkpoint's own."

ROUTES_EPILOG = """\
examples:
  mixtral routes record --corpus data/corpus --out out/routes.npz          # the default model, held-out text
  mixtral routes record --model ./Mixtral-8x7B-v0.1 --source code='src/**/*.py' --source en='notes/*.md'
  mixtral routes record --corpus data/corpus --generate 64 --out out/live.npz   # routes of live decoding
  mixtral routes report out/routes.npz --out out/routes-report                  # JSON, PNGs, results.md
  mixtral routes html out/routes.npz --out out/routes.html --layers 0,3,5 --domain code
  mixtral routes ablate --corpus data/corpus --out out/ablation.json
"""


def add_routes_parser(subparsers, parents: dict[str, argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `routes` (record, report, html, ablate) on the subparsers of the `mixtral` command; `parents` as
    `mixtral.cli.shared_parents` makes them."""
    raw = argparse.RawDescriptionHelpFormatter
    verbose = [parents["verbose"]]
    with_model = [parents["verbose"], parents["model"], parents["weights"]]
    p = subparsers.add_parser("routes", parents=verbose, formatter_class=raw, epilog=ROUTES_EPILOG,
                              help="record and analyse expert routing (the paper's section 5, offloading)",
                              description="Record which experts the routers choose on text, and report expert "
                                          "distribution per domain, temporal locality, expert-cache hit rates, "
                                          "next-layer prediction, ablations and token colouring.")
    commands = p.add_subparsers(dest="routes", required=True, metavar="ACTION")

    def text_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--corpus", metavar="DIR", help="a prepared corpus (mixtral data prepare): its validation "
                                                       "split, every domain")
        q.add_argument("--source", action="append", default=[], metavar="DOMAIN=GLOB",
                       help="text files of one domain, e.g. code='src/**/*.py' (repeatable)")
        q.add_argument("--tokens-per-domain", type=int, default=32768, metavar="N",
                       help="tokens to take from each domain (default: 32768)")
        q.add_argument("--seq-len", type=int, default=512, metavar="T",
                       help="tokens per sequence; longer documents are cut (default: 512)")

    q = commands.add_parser("record", parents=with_model, formatter_class=raw, epilog=ROUTES_EPILOG,
                            help="run a model over text and save its routes (.npz)",
                            description="Run the model over text of several domains and save, per layer and "
                                        "token, the top-k experts, their gate weights and the next-layer "
                                        f"predictions, with token ids, positions and domains. {RUN_DTYPE_NOTE}")
    text_options(q)
    q.add_argument("--out", "-o", default="routes.npz", help="output file (default: routes.npz)")
    q.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    q.add_argument("--generate", type=int, default=0, metavar="N",
                   help="record live decoding instead: each sequence's first --prompt-len tokens are a prompt, "
                        "continued by N generated tokens through the KV cache")
    q.add_argument("--prompt-len", type=int, default=32, metavar="T", help="prompt tokens with --generate (32)")
    q.add_argument("--prompts-per-domain", type=int, default=4, metavar="N",
                   help="prompts per domain with --generate (default: 4)")
    q.add_argument("--temperature", type=float, default=0.0, help="sampling temperature with --generate (0)")
    q.add_argument("--seed", type=int, default=0, help="sampling seed with --generate (default: 0)")
    q.set_defaults(run=cmd_record)

    q = commands.add_parser("report", parents=verbose, formatter_class=raw, epilog=ROUTES_EPILOG,
                            help="statistics, plots and tables from recorded routes",
                            description="Write report.json (per-layer first_choice_repeat, top2_repeat, expert "
                                        "shares, LRU hit rates, prediction recall, prefetch, token consistency, "
                                        "per domain and overall), PNG plots and results.md.")
    q.add_argument("routes_file", metavar="ROUTES.npz")
    q.add_argument("--out", "-o", default="routes-report", help="output directory (default: routes-report)")
    q.add_argument("--ablation", metavar="FILE", help="an ablation JSON (mixtral routes ablate) to include")
    q.set_defaults(run=cmd_report)

    q = commands.add_parser("html", parents=verbose, formatter_class=raw, epilog=ROUTES_EPILOG,
                            help="a page of text coloured by each token's first-choice expert",
                            description="Write a self-contained HTML page showing text with each token coloured "
                                        "by its first-choice expert at the chosen layers (paper Figure 9).")
    q.add_argument("routes_file", metavar="ROUTES.npz")
    q.add_argument("--out", "-o", default="routes.html", help="output file (default: routes.html)")
    q.add_argument("--layers", help="comma-separated layers (default: first, middle and last)")
    q.add_argument("--domain", action="append", default=[], help="domains to show (default: all; repeatable)")
    q.add_argument("--max-tokens", type=int, default=200, metavar="N", help="tokens per domain (default: 200)")
    q.add_argument("--tokenizer", metavar="PATH_OR_PRESET",
                   help="tokenizer to turn ids into text (default: the recorded model's, else Mixtral's)")
    q.set_defaults(run=cmd_html)

    q = commands.add_parser("ablate", parents=with_model, formatter_class=raw, epilog=ROUTES_EPILOG,
                            help="held-out loss per domain with each expert removed in turn",
                            description="For each layer and expert, mask that expert's router logit and measure "
                                        f"the held-out loss per domain; writes a JSON file. {RUN_DTYPE_NOTE}")
    text_options(q)
    q.set_defaults(tokens_per_domain=4096, seq_len=256)
    q.add_argument("--layers", help="comma-separated layers (default: all)")
    q.add_argument("--out", "-o", default="ablation.json", help="output file (default: ablation.json)")
    q.set_defaults(run=cmd_ablate)
    return p


# ---- text -> sequences -----------------------------------------------------------------------------------------

def domain_sequences(args: argparse.Namespace, tokenizer) -> tuple[list[list[int]], list[int], list[str]]:
    """(sequences, domain index of each, domain names) from --corpus and/or --source, up to --tokens-per-domain
    tokens per domain in sequences of at most --seq-len."""
    if not args.corpus and not args.source:
        raise InputError("give the text to route: --corpus DIR (a prepared corpus) or --source DOMAIN=GLOB")
    if args.seq_len < 2 or args.tokens_per_domain < 2:
        raise InputError(f"--seq-len and --tokens-per-domain must be at least 2 (got {args.seq_len}, "
                         f"{args.tokens_per_domain})")
    streams: dict[str, list[np.ndarray]] = {}
    if args.corpus:
        from mixtral.data.shards import TokenShards

        val = TokenShards(args.corpus, "val")
        for d in val.domains:
            streams.setdefault(d, []).append(np.asarray(val.stream(d)[:args.tokens_per_domain]))
    if args.source:
        from mixtral.data.prepare import Source, iter_documents

        sources = [Source.parse(s) for s in args.source]
        for doc in iter_documents(sources, [s.files() for s in sources]):
            domain = sources[doc.source].domain
            have = sum(len(s) for s in streams.get(domain, []))
            if have < args.tokens_per_domain:
                ids = tokenizer.encode(doc.text, bos=True, eos=True)
                streams.setdefault(domain, []).append(np.asarray(ids[:args.tokens_per_domain - have]))
    names = list(streams)
    sequences, domains = [], []
    for i, name in enumerate(names):
        for stream in streams[name]:
            for start in range(0, len(stream), args.seq_len):
                piece = stream[start:start + args.seq_len].tolist()
                if len(piece) >= 2:
                    sequences.append(piece)
                    domains.append(i)
    if not sequences:
        raise InputError("the text given has no sequence of 2 tokens or more")
    return sequences, domains, names


def _load(args: argparse.Namespace) -> tuple[Transformer, Tokenizer]:
    args.dtype = args.dtype or RUN_DTYPE  # recorded in the routes' meta as the dtype the model ran in
    model, tokenizer = load_model_and_tokenizer(args.model, tokenizer=args.tokenizer, dtype=args.dtype,
                                                quantize=args.quantize, progress=sys.stderr.isatty(),
                                                max_memory=args.max_memory, offload_policy=args.offload_policy,
                                                offload_dir=args.offload_dir)
    return model.eval(), tokenizer


def _layers(spec: str | None, n_layers: int) -> list[int] | None:
    if spec is None:
        return None
    try:
        layers = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--layers must be comma-separated integers, got {spec!r}") from None
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise InputError(f"--layers {spec!r}: the model has layers 0 to {n_layers - 1}")
    return layers


def _write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


# ---- the commands ----------------------------------------------------------------------------------------------

def cmd_record(args: argparse.Namespace) -> int:
    from mixtral.analysis.routes import record_generation, record_sequences

    model, tokenizer = _load(args)
    sequences, domains, names = domain_sequences(args, tokenizer)
    meta = {"model": str(args.model), "tokenizer": str(tokenizer.path), "dtype": args.dtype,
            "source": args.corpus or args.source, "live_decoding": bool(args.generate)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.generate:
        chosen = [[j for j, d in enumerate(domains) if d == i][:args.prompts_per_domain] for i in range(len(names))]
        picks = [j for js in chosen for j in js]
        routes, _ = record_generation(model, [sequences[j][:args.prompt_len] for j in picks],
                                      [domains[j] for j in picks], names, args.generate,
                                      temperature=args.temperature, seed=args.seed, eos_id=None)
    else:
        with torch.inference_mode():
            routes = record_sequences(model, sequences, domains, names, batch_size=args.batch_size,
                                      progress=sys.stderr.isatty(), meta=meta)
    routes.meta.update(meta)
    routes.save(out)
    print(f"wrote {out}: {len(routes.tokens):,} tokens in {len(np.unique(routes.sequence))} sequences, "
          f"{routes.n_layers} layers, domains {', '.join(routes.domains)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mixtral.analysis.report import write_report
    from mixtral.analysis.routes import Routes

    routes = Routes.load(args.routes_file)
    ablation = None
    if args.ablation:
        try:
            ablation = json.loads(Path(args.ablation).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"cannot read the ablation file {args.ablation}: {e}") from e
    result = write_report(routes, args.out, ablation)
    for e in result["layers"]:
        print(f"layer {e['layer']}: first choice repeated {100 * e['first_choice_repeat']['all']:.1f}%, "
              f"top-{result['top_k']} sets share an expert {100 * e['top2_repeat']['all']:.1f}% "
              f"(random {100 * result['baselines']['first_choice_repeat']:.1f}%, "
              f"{100 * result['baselines']['top2_repeat']:.1f}%)")
    print(f"wrote {args.out}/report.json, results.md and plots")
    return 0


def cmd_html(args: argparse.Namespace) -> int:
    from mixtral.analysis.html import routes_html, token_pieces
    from mixtral.analysis.routes import Routes

    routes = Routes.load(args.routes_file)
    tokenizer = load_tokenizer(args.tokenizer or routes.meta.get("tokenizer"))
    n = routes.n_layers
    layers = _layers(args.layers, n) or sorted({0, n // 2, n - 1})
    unknown = [d for d in args.domain if d not in routes.domains]
    if unknown:
        raise InputError(f"domain {unknown[0]!r} is not in {args.routes_file} (domains: {', '.join(routes.domains)})")
    keep = np.zeros(len(routes.tokens), dtype=bool)
    for d in args.domain or routes.domains:
        idx = np.flatnonzero(routes.domain == routes.domains.index(d))
        if len(idx):
            first = routes.sequence[idx[0]]  # the domain's first sequence, from its start
            idx = idx[routes.sequence[idx] == first][:args.max_tokens]
            keep[idx] = True
    shown = routes.select(keep)
    pieces = token_pieces(tokenizer, shown.tokens)
    groups = [(routes.domains[shown.domain[idx[0]]], idx) for s in np.unique(shown.sequence)
              for idx in [np.flatnonzero(shown.sequence == s)]]
    page = routes_html(pieces, shown.experts, shown.weights, layers,
                       f"First-choice experts of {routes.meta.get('model', 'the model')}", groups, shown.tokens,
                       shown.positions)
    out = Path(args.out)
    _write_text(out, page)
    print(f"wrote {out}: {len(shown.tokens)} tokens, layers {', '.join(map(str, layers))}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from mixtral.analysis.ablation import ablate_experts

    model, tokenizer = _load(args)
    sequences, domains, names = domain_sequences(args, tokenizer)
    windows = {}
    for i, name in enumerate(names):
        rows = [s for s, d in zip(sequences, domains) if d == i and len(s) == args.seq_len]
        if rows:
            windows[name] = torch.tensor(rows)
    if not windows:
        raise InputError(f"no domain has a whole window of --seq-len {args.seq_len} tokens")
    layers = _layers(args.layers, model.config.n_layers)
    result = ablate_experts(model, windows, layers, progress=sys.stderr.isatty())
    result["meta"] = {"model": str(args.model), "tokens_per_domain": {d: int(w.numel()) for d, w in windows.items()},
                      "seq_len": args.seq_len}
    _write_text(Path(args.out), json.dumps(result, indent=1))
    worst = max(((layer, e, r["all"] - result["base"]["all"]) for layer, row in zip(result["layers"],
                 result["ablated"]) for e, r in enumerate(row)), key=lambda x: x[2])
    print(f"wrote {args.out}: base loss {result['base']['all']:.4f}; the costliest removal is layer {worst[0]} "
          f"expert {worst[1]} (+{worst[2]:.4f} nats)")
    return 0

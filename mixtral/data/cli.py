"""`mixtral data prepare`, `mixtral data math` and `mixtral data tasks`: registered on the `mixtral` command by
`add_data_parser`; the work is `mixtral.data.prepare.prepare`, `mixtral.data.mathgen` and `mixtral.data.tasks`."""
from __future__ import annotations

import argparse
import sys

from mixtral.data import mathgen, tasks
from mixtral.data.prepare import DEFAULT_TEXT_FIELD, DEFAULT_VAL_FRACTION, Source, format_summary, prepare

PREPARE_EPILOG = """\
Each --source is DOMAIN=GLOB (quote the glob so the shell leaves it alone; ** matches any depth). Every file is
one document, except .jsonl files, where each line is a JSON object and its --text-field one document. Output:
DIR/manifest.json, DIR/train/<domain>.bin and DIR/val/<domain>.bin (flat uint16 token streams, each document
BOS + tokens + EOS).

examples:
  mixtral data prepare --source en='docs/**/*.txt' --source code='lib/**/*.py' --out data/mine
  mixtral data prepare --source chat=dialogues.jsonl --text-field content --val-fraction 0.05 --out data/chat
  python scripts/build_corpus.py        # the corpus of the default model (docs/corpus.md)
"""


def add_data_parser(subparsers, parents: dict[str, argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `data` (with `prepare` under it) on the subparsers of the `mixtral` command. It takes none of the
    shared `parents`: its --tokenizer picks the corpus's tokenizer, with no model to take it from."""
    raw = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("data", help="prepare training data: text files -> token shards",
                              description="Turn text into the token shards the trainer reads.",
                              formatter_class=raw,
                              epilog="examples:\n  mixtral data prepare --source en='docs/**/*.md' --out data/en\n"
                                     "Run 'mixtral data prepare --help' for the options.")
    commands = p.add_subparsers(dest="data", required=True, metavar="ACTION")
    q = commands.add_parser("prepare", formatter_class=raw, epilog=PREPARE_EPILOG,
                            help="tokenize text, markdown, code and JSONL files into token shards per domain",
                            description="Tokenize documents into memory-mapped token shards, one stream per domain, "
                                        "with a deterministic train/validation split and a manifest.")
    q.add_argument("--source", "-s", action="append", required=True, metavar="DOMAIN=GLOB",
                   help="files of one domain (repeatable; a domain may have several sources)")
    q.add_argument("--out", "-o", required=True, metavar="DIR", help="directory to write the shards to")
    q.add_argument("--tokenizer", metavar="PATH_OR_PRESET",
                   help="tokenizer file, directory or preset (default: the Mixtral tokenizer from mistral-common)")
    q.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, metavar="F",
                   help=f"share of documents held out for validation, chosen by a hash of path and line "
                        f"(default: {DEFAULT_VAL_FRACTION})")
    q.add_argument("--split-seed", type=int, default=0, help="salt of that hash, for another split (default: 0)")
    q.add_argument("--text-field", default=DEFAULT_TEXT_FIELD, metavar="NAME",
                   help=f"field of each JSONL object holding the text (default: {DEFAULT_TEXT_FIELD})")
    q.add_argument("--force", "-f", action="store_true", help="replace a corpus already prepared in DIR")
    q.set_defaults(run=cmd_prepare)
    m = commands.add_parser("math", formatter_class=raw, help="generate arithmetic problems with worked answers",
                            description=mathgen.__doc__)
    m.add_argument("--seed", type=int, default=0, help="seed of the whole stream (default: 0)")
    m.add_argument("--documents", type=int, default=1, help="documents to print or write (default: 1)")
    m.add_argument("--problems", type=int, default=20, help="problems per document (default: 20)")
    m.add_argument("--jsonl", metavar="PATH", help="write JSONL to PATH instead of printing text")
    m.set_defaults(run=cmd_math)
    t = commands.add_parser("tasks", formatter_class=raw, help="instruction-tuning data: SFT, DPO and eval JSONL",
                            description=tasks.__doc__)
    t.add_argument("--out", "-o", required=True, metavar="DIR", help="directory to write the files to")
    t.add_argument("--seed", type=int, default=0, help="seed of the draws (the split is by content) (default: 0)")
    for name, default in (("sft-train", 40000), ("sft-val", 500), ("dpo-train", 8000), ("dpo-val", 400),
                          ("eval-val", 1000)):
        t.add_argument(f"--{name}", type=int, default=default, metavar="N",
                       help=f"records in {name.replace('-', '_')}.jsonl (default: {default})")
    t.add_argument("--man-dir", default="/usr/share/man", metavar="DIR",
                   help="man pages for the command and function tasks (default: /usr/share/man)")
    t.set_defaults(run=cmd_tasks)
    return p


def cmd_prepare(args: argparse.Namespace) -> int:
    sources = [Source.parse(spec) for spec in args.source]
    manifest = prepare(sources, args.out, args.tokenizer, val_fraction=args.val_fraction,
                       split_seed=args.split_seed, text_field=args.text_field, force=args.force,
                       progress=sys.stderr.isatty())
    print(format_summary(manifest))
    print(f"wrote {args.out}")
    return 0


def cmd_math(args: argparse.Namespace) -> int:
    if args.jsonl:
        count, size = mathgen.write_jsonl(args.jsonl, args.seed, max_documents=args.documents,
                                          problems_per_document=args.problems)
        print(f"wrote {count} documents ({size} bytes) to {args.jsonl}")
        return 0
    for i, text in zip(range(args.documents), mathgen.documents(args.seed, args.problems)):
        sys.stdout.write(("\n" if i else "") + text)
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    manifest = tasks.build(args.out, args.seed, sft_train=args.sft_train, sft_val=args.sft_val,
                           dpo_train=args.dpo_train, dpo_val=args.dpo_val, eval_val=args.eval_val,
                           man_dir=args.man_dir)
    for name, counts in manifest["counts"].items():
        print(f"{name}: {sum(counts.values())} ({', '.join(f'{t} {n}' for t, n in counts.items())})")
    print(f"wrote {args.out}")
    return 0

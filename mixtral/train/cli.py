"""`mixtral train CONFIG.toml [--resume] [--section.key VALUE ...]`: registered on the `mixtral` command by
`add_train_parser`."""
from __future__ import annotations

import argparse
import logging
import sys

TRAIN_EPILOG = """\
CONFIG is a TOML file (see configs/ and mixtral/train/config.py for every key and its default). Any key can be
changed on the command line as --section.key VALUE (or --section.key=VALUE); "none" unsets an optional value.

Writes OUT/metrics.jsonl, OUT/curves.png and OUT/checkpoints/step_NNNNNN/ (Hugging Face layout: load it with
`mixtral generate --model OUT/checkpoints/step_NNNNNN` or transformers). A run that was stopped continues from its
latest checkpoint with --resume, exactly as if it had not been stopped.

Under torchrun the run is distributed (mixtral.parallel): --parallel.ep E spreads the experts over E processes,
--parallel.dp D makes D copies of that (E x D = the number of processes; each reads its share of every batch), and
checkpoints are written with torch.distributed.checkpoint, resumable at any layout (or in one process) and turned
into the Hugging Face layout by `mixtral convert CHECKPOINT OUT --to hf`. --parallel.timeout bounds the wait for a
peer, at start and in every collective.

examples:
  mixtral train configs/tiny.toml --data.dir data/prepared
  mixtral train configs/default.toml --train.steps 2000 --optim.lr 6e-4
  mixtral train configs/default-dense-active.toml --resume
  mixtral train configs/default.toml --print-config
  torchrun --nproc-per-node 4 -m mixtral train configs/default.toml --parallel.ep 2 --parallel.dp 2
"""


def add_train_parser(subparsers, parents: dict[str, argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `train` on the subparsers of the `mixtral` command. It takes none of the shared `parents`: the
    model, dtype and everything else of a run are in its TOML config, and the options after CONFIG are overrides
    of that config."""
    p = subparsers.add_parser("train", help="train a model from a TOML config (MoE or dense baseline)",
                              description="Train a model on a prepared corpus (mixtral data prepare): AdamW, "
                                          "warmup + cosine, bf16 autocast, load-balancing and z-losses, "
                                          "validation per domain, checkpoints that resume exactly.",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EPILOG)
    p.add_argument("config", metavar="CONFIG.toml", help="the run's TOML file")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (file + overrides, defaults filled in) as JSON and exit")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--section.key VALUE",
                   help="changes to the config, e.g. --train.steps 100 --optim.lr 1e-3")
    p.set_defaults(run=cmd_train)
    return p


def cmd_train(args: argparse.Namespace) -> int:
    from mixtral.train.config import dumps, load_config
    from mixtral.train.trainer import train

    overrides = list(args.overrides)
    # REMAINDER swallows options given after CONFIG; take ours back out.
    for flag in ("--resume", "--print-config"):
        while flag in overrides:
            overrides.remove(flag)
            setattr(args, flag[2:].replace("-", "_"), True)
    config = load_config(args.config, overrides)
    if args.print_config:
        sys.stdout.write(dumps(config))
        return 0
    if not logging.getLogger("mixtral").handlers and not logging.getLogger().handlers:
        # What the run is and where it saves are worth seeing without -v.
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    record = train(config, resume=args.resume)
    if record:
        print(f"done: step {record['step']}, train loss {record['ce']:.4f}; "
              f"checkpoints in {config.out_dir}/checkpoints")
    return 0

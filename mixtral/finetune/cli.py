"""`mixtral finetune sft|dpo CONFIG.toml [--resume] [--section.key VALUE ...]`: registered on the `mixtral` command
by `add_finetune_parser`."""
from __future__ import annotations

import argparse
import logging
import sys

FINETUNE_EPILOG = """\
CONFIG is a TOML file (see configs/finetune/ and mixtral/finetune/config.py for every key and its default). Any
key can be changed on the command line as --section.key VALUE; "none" unsets an optional value.

data.train is JSONL: for sft a conversation a line, {"messages": [{"role": "user", "content": ...},
{"role": "assistant", "content": ...}, ...]} (OpenAI's format; the assistant's replies are what is learned); for
dpo a preference a line, {"messages": [... ending with a user turn], "chosen": "...", "rejected": "..."}.

Writes OUT/metrics.jsonl, OUT/curves.png, OUT/checkpoints/step_NNNNNN/ (resume with --resume), and at the end
OUT/adapter/ (LoRA) and OUT/model/ (adapters merged, HF layout: mixtral chat --model OUT/model).

examples:
  mixtral finetune sft configs/finetune/sft.toml
  mixtral finetune sft configs/finetune/sft.toml --model.quantize int4 --lora.rank 8     # QLoRA
  mixtral finetune dpo configs/finetune/dpo.toml --model.path out/sft/model --resume
"""


def add_finetune_parser(subparsers, parents: dict[str, argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `finetune sft` and `finetune dpo`. Like `train`, they take none of the shared `parents`: a run is
    its TOML config, and the options after CONFIG override it."""
    p = subparsers.add_parser("finetune", help="fine-tune a model: SFT or DPO, with LoRA, QLoRA or in full",
                              description="Fine-tune a model on JSONL conversations (sft) or preference pairs "
                                          "(dpo), in the instruct format of mixtral chat.",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=FINETUNE_EPILOG)
    modes = p.add_subparsers(dest="mode", metavar="MODE", required=True)
    for mode, text in (("sft", "supervised fine-tuning: learn the assistant's replies"),
                       ("dpo", "direct preference optimisation: prefer the chosen reply to the rejected one")):
        m = modes.add_parser(mode, help=text, description=text, epilog=FINETUNE_EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        m.add_argument("config", metavar="CONFIG.toml", help="the run's TOML file")
        m.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
        m.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
        m.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--section.key VALUE",
                       help="changes to the config, e.g. --train.steps 100 --lora.rank 8")
        m.set_defaults(run=cmd_finetune)
    return p


def cmd_finetune(args: argparse.Namespace) -> int:
    from mixtral.finetune.config import load_finetune_config
    from mixtral.finetune.trainer import finetune
    from mixtral.train.config import dumps

    overrides = list(args.overrides)
    for flag in ("--resume", "--print-config"):  # REMAINDER swallows options given after CONFIG
        while flag in overrides:
            overrides.remove(flag)
            setattr(args, flag[2:].replace("-", "_"), True)
    config = load_finetune_config(args.config, overrides)
    if args.print_config:
        sys.stdout.write(dumps(config))
        return 0
    if not logging.getLogger("mixtral").handlers and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    record = finetune(config, args.mode, resume=args.resume)
    if record:
        print(f"done: step {record['step']}, train loss {record['loss']:.4f}; results in {config.out_dir}")
    return 0

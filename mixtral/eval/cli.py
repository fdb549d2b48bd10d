"""`mixtral eval perplexity | chat | harness`: registered on the `mixtral` command by `add_eval_parser`.

The model options are the shared parent parsers (`--model`, `--tokenizer`, `--dtype`, `--quantize`, memory), and
a model loads through `mixtral.io.loading.load_model_and_tokenizer` as for `mixtral generate`.
"""
from __future__ import annotations

import argparse
import json
import sys

from mixtral.errors import InputError
from mixtral.io.files import write_text
from mixtral.io.loading import load_model_and_tokenizer
from mixtral.io.tokenizer import Tokenizer
from mixtral.model import Transformer

RAW = argparse.RawDescriptionHelpFormatter

PERPLEXITY_EPILOG = """\
Each token is scored once, from up to WINDOW tokens of context: windows of WINDOW tokens advance by STRIDE and
score only the tokens no earlier window scored (docs/evaluation.md). loss is the mean negative log-likelihood in
nats per token, ppl = exp(loss); "all" is the token-weighted mean over the files or domains.

examples:
  mixtral eval perplexity --model default README.md docs/*.md
  mixtral eval perplexity --model ./Mixtral-8x7B-v0.1 --corpus data/prepared --split val --window 2048
  mixtral eval perplexity --corpus data/prepared --stride 128 --max-tokens 100000 --json
"""

CHAT_EPILOG = """\
TASKS.jsonl has one task a line: {"messages": [... OpenAI chat messages ending with a user turn], "answer": "42",
"checker": "number"}. checker: exact (the stripped reply is the answer; the default), number (the first number in
the reply equals the answer numerically), contains (the answer appears in the reply, ignoring case). Replies are
greedy, in the instruct format of `mixtral chat`, until </s> or --max-new-tokens.

examples:
  mixtral eval chat --model ./Mixtral-8x7B-Instruct-v0.1 tasks.jsonl
  mixtral eval chat --model out/sft/model tasks.jsonl --max-new-tokens 64 --out results.jsonl
"""

HARNESS_EPILOG = """\
Everything after "--" goes to lm-evaluation-harness' own command line, with the model "mixtral" registered
(model_args: pretrained=PATH|default|PRESET, tokenizer, dtype, quantize, batch_size, max_length). Its datasets
come from the Hugging Face hub, so the machine needs network access or a local copy (--include_path with tasks
whose dataset_path is local).

examples:
  mixtral eval harness -- --model mixtral --model_args pretrained=default --tasks hellaswag,arc_easy
  mixtral eval harness -- --model mixtral --model_args pretrained=./Mixtral-8x7B-v0.1,dtype=bfloat16 \\
      --tasks mmlu --num_fewshot 5 --batch_size 8 --output_path results/
  python -m mixtral.eval.harness --model mixtral --tasks gsm8k --limit 20
"""


def add_eval_parser(subparsers, parents: dict[str, argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `eval perplexity`, `eval chat` and `eval harness` on the subparsers of the `mixtral` command."""
    with_model = [parents["verbose"], parents["model"], parents["weights"]]
    p = subparsers.add_parser("eval", help="evaluate a model: perplexity, chat task accuracy, lm-eval benchmarks",
                              description="Evaluate a model: perplexity of text or a prepared corpus, accuracy "
                                          "on chat tasks, or benchmarks through lm-evaluation-harness.",
                              formatter_class=RAW, epilog="Run 'mixtral eval KIND --help' for each kind.")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)

    q = kinds.add_parser("perplexity", parents=with_model, formatter_class=RAW, epilog=PERPLEXITY_EPILOG,
                         help="perplexity of text files or a prepared corpus (per domain)",
                         description="Perplexity of text files, or of each domain of a prepared corpus, with "
                                     "sliding windows.")
    q.add_argument("files", nargs="*", metavar="FILE", help="UTF-8 text files, each scored on its own")
    q.add_argument("--corpus", metavar="DIR", help="a prepared corpus (mixtral data prepare) instead of files")
    q.add_argument("--split", default="val", choices=("train", "val"), help="the corpus split (default: val)")
    q.add_argument("--window", type=int, metavar="N",
                   help="tokens the model reads per window (default: the model's context, at most 1024)")
    q.add_argument("--stride", type=int, metavar="N", help="how far each window advances (default: WINDOW / 2)")
    q.add_argument("--batch-size", type=int, default=8, metavar="B", help="windows per forward pass (default: 8)")
    q.add_argument("--max-tokens", type=int, metavar="N", help="score only the first N tokens of each file/domain")
    q.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    q.set_defaults(run=cmd_perplexity)

    c = kinds.add_parser("chat", parents=with_model, formatter_class=RAW, epilog=CHAT_EPILOG,
                         help="accuracy of an Instruct model on JSONL chat tasks",
                         description="Reply greedily to each chat task and check the reply against its answer.")
    c.add_argument("tasks", metavar="TASKS.jsonl", help="the task file")
    c.add_argument("--max-new-tokens", "-n", type=int, default=32, metavar="N",
                   help="most tokens per reply (default: 32)")
    c.add_argument("--batch-size", type=int, default=16, metavar="B", help="tasks decoded together (default: 16)")
    c.add_argument("--out", metavar="RESULTS.jsonl", help="write each task with its reply and correct flag here")
    c.set_defaults(run=cmd_chat)

    h = kinds.add_parser("harness", parents=[parents["verbose"]], formatter_class=RAW, epilog=HARNESS_EPILOG,
                         help="run lm-evaluation-harness with the 'mixtral' model registered",
                         description="Run lm-evaluation-harness (lm_eval) with this package's model adapter.")
    h.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="-- LM_EVAL_ARGS",
                   help="lm_eval's arguments, e.g. --model mixtral --tasks hellaswag")
    h.set_defaults(run=cmd_harness)
    return p


def _load(args: argparse.Namespace) -> tuple[Transformer, Tokenizer]:
    model, tokenizer = load_model_and_tokenizer(args.model, tokenizer=args.tokenizer, dtype=args.dtype,
                                                quantize=args.quantize, progress=sys.stderr.isatty(),
                                                max_memory=args.max_memory, offload_policy=args.offload_policy,
                                                offload_dir=args.offload_dir)
    return model.eval(), tokenizer


def cmd_perplexity(args: argparse.Namespace) -> int:
    from mixtral.eval.perplexity import corpus_perplexity, text_perplexity

    if bool(args.files) == bool(args.corpus):
        raise InputError("give either text FILEs or --corpus DIR (one of them)")
    model, tokenizer = _load(args)
    window = args.window or min(model.config.context_len, 1024)
    stride = args.stride or max(1, window // 2)
    options = dict(window=window, stride=stride, batch_size=args.batch_size, max_tokens=args.max_tokens,
                   progress=sys.stderr.isatty())
    if args.corpus:
        results = corpus_perplexity(model, args.corpus, args.split, **options)
    else:
        results = text_perplexity(model, tokenizer, args.files, **options)
    if args.json:
        print(json.dumps({"window": window, "stride": stride, "results": {
            name: {"loss": r.loss, "ppl": r.ppl, "tokens": r.tokens} for name, r in results.items()}}))
        return 0
    width = max(len(name) for name in results)
    print(f"window {window}, stride {stride}")
    print(f"{'':{width}}  {'loss':>8}  {'ppl':>10}  {'tokens':>10}")
    for name, r in results.items():
        print(f"{name:{width}}  {r.loss:8.4f}  {r.ppl:10.3f}  {r.tokens:10d}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from mixtral.eval.chat import evaluate_chat, read_chat_tasks

    tasks = read_chat_tasks(args.tasks)  # a malformed file fails before minutes of loading
    model, tokenizer = _load(args)
    result = evaluate_chat(model, tokenizer, tasks, args.max_new_tokens, args.batch_size,
                           progress=sys.stderr.isatty())
    if args.out:
        write_text(args.out, "".join(json.dumps({"source": r.task.source, "messages": r.task.messages,
                                                 "answer": r.task.answer, "checker": r.task.checker,
                                                 "reply": r.reply, "correct": r.correct}) + "\n"
                                     for r in result.records))
    print(f"accuracy {result.accuracy:.4f} ({result.correct}/{len(result.records)})")
    return 0


def cmd_harness(args: argparse.Namespace) -> int:
    from mixtral.eval.harness import run_lm_eval

    argv = list(args.lm_eval_args)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise InputError("give lm_eval's arguments after '--', e.g. mixtral eval harness -- --model mixtral "
                         "--tasks hellaswag")
    return run_lm_eval(argv)

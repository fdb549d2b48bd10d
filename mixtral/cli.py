"""The `mixtral` command: generate, chat, info, convert, bench, train, serve, data, routes.

A thin layer over the library: every subcommand parses its arguments, calls the library (here `generate` and `chat`
through `mixtral.io.loading.load_model_and_tokenizer` and `mixtral.generate`; the others through their subsystem's
`cli` module), and prints. The options several commands share are defined once, in `shared_parents`, and handed
to each subsystem's parser function. User mistakes arrive as `mixtral.errors.MixtralError` and are turned into one
`error: ...` line and exit code 1 in `main`, the only place that handles errors.

    mixtral generate --model tiny "The mixture of experts"
    mixtral chat --model ./Mixtral-8x7B-Instruct-v0.1
    mixtral info --model mixtral-8x7b
    mixtral convert ./hf-checkpoint ./native --to native
    mixtral bench moe --tokens 1,512
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Iterable, Sequence

from mixtral.analysis.cli import add_routes_parser
from mixtral.bench.cli import add_bench_parser
from mixtral.config import DTYPE_CHOICES, PRESETS, parse_dtype
from mixtral.data.cli import add_data_parser
from mixtral.finetune.cli import add_finetune_parser
from mixtral.errors import ContextLengthError, MixtralError
from mixtral.eval.cli import add_eval_parser
from mixtral.generate import check_sampling, complete, stream_text
from mixtral.io.cli import add_convert_parser, add_info_parser, add_quantize_parser, quantize_option
from mixtral.io.loading import (DEFAULT_INSTRUCT, DEFAULT_MODEL, MIXTRAL_VOCAB, NOTES_LOGGER, OFFLOAD_POLICIES,
                                load_model_and_tokenizer)
from mixtral.io.tokenizer import Tokenizer
from mixtral.model import Transformer
from mixtral.offload.cli import add_plan_parser, stats_lines
from mixtral.serve.cli import add_serve_parser
from mixtral.train.cli import add_train_parser

VERBOSE_HELP = "log progress and timings, and show tracebacks of errors"

# What `main` returns after a broken pipe: what a shell reports for a process killed by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


# ---- shared options --------------------------------------------------------------------------------------------

def shared_parents() -> dict[str, argparse.ArgumentParser]:
    """The parent parsers of the options several commands share, each defined once here: "model" (--model;
    "chat_model" the same for the commands whose default depends on --chat),
    "weights" (--tokenizer, --dtype, --quantize: how a model is loaded to run) and "verbose" (-v). Every
    subcommand's parser function takes this dict and uses the ones it needs."""
    def model_parent(default: str | None, says: str) -> argparse.ArgumentParser:
        parent = argparse.ArgumentParser(add_help=False)
        parent.add_argument_group("model").add_argument(
            "--model", "-m", default=default, metavar="PATH_OR_PRESET",
            help=f"checkpoint directory (Hugging Face or Mistral-native layout), '{DEFAULT_MODEL}' (the small "
                 f"Mixtral trained by this project and bundled with it), '{DEFAULT_INSTRUCT}' (the same after "
                 f"instruction tuning) or a preset name ({', '.join(PRESETS)}; presets have random weights) "
                 f"(default: {says})")
        return parent

    model = model_parent(DEFAULT_MODEL, DEFAULT_MODEL)
    # chat and generate take their own: without --model they pick the bundled model by --chat (`default_model`).
    chat_model = model_parent(None, f"{DEFAULT_INSTRUCT} for chat and generate --chat, else {DEFAULT_MODEL}")
    weights = argparse.ArgumentParser(add_help=False)
    group = weights.add_argument_group("model")  # merged with --model's group in a parser that takes both
    group.add_argument("--tokenizer", metavar="PATH_OR_PRESET",
                       help="tokenizer file, directory or preset (default: the model directory's own tokenizer, "
                            "else the Mixtral tokenizer shipped with mistral-common when the vocabulary has "
                            f"{MIXTRAL_VOCAB} tokens)")
    group.add_argument("--dtype", choices=DTYPE_CHOICES,
                       help="dtype of the weights in memory (default: the checkpoint's own, float32 for presets, "
                            "unless the command's description says otherwise)")
    group.add_argument("--quantize", type=quantize_option, metavar="SPEC",
                       help="quantize while loading: one precision for the expert, attention and output weights "
                            "(int8: per channel; int4: groups of 128; int3, int2: groups of 64 and 16, fitted; "
                            "a group may be named: int4:g64), or one per part: experts=int3,attention=int8 "
                            "(parts not named stay in --dtype). The router stays in full precision. A checkpoint "
                            "saved quantized loads quantized without this option")
    memory = weights.add_argument_group("memory (models larger than it)")
    memory.add_argument("--max-memory", metavar="SIZE",
                        help="keep the weights within SIZE (e.g. 12GB): everything but the experts stays resident, "
                             "the experts stay on disk and are read into expert slots as routing asks "
                             "(docs/offloading.md). The KV cache comes on top")
    memory.add_argument("--offload-policy", default="lru+predict", choices=OFFLOAD_POLICIES,
                        help="with --max-memory: none (read every expert when needed), lru (keep the most recently "
                             "used), lru+predict (also read the next layer's predicted experts in the background; "
                             "default), lru+predict-after (predicted after this layer's MoE update)")
    memory.add_argument("--offload-dir", metavar="DIR",
                        help="with --max-memory and a model that is not a quantized checkpoint: where to write its "
                             "expert files (default: under ~/.cache/mixtral/offload)")
    parallel = argparse.ArgumentParser(add_help=False)
    group = parallel.add_argument_group("several processes (started by torchrun)")
    group.add_argument("--parallel.ep", dest="parallel_ep", type=int, default=1, metavar="E",
                       help="spread the experts over the E processes of `torchrun --nproc-per-node E -m mixtral "
                            "...`: each holds n_experts / E of every layer (quantized or not), rank 0 also the rest "
                            "and does the work (docs/distributed.md) (default: 1, this process alone)")
    group.add_argument("--parallel.timeout", dest="parallel_timeout", type=float, default=300.0, metavar="SECONDS",
                       help="with --parallel.ep: how long to wait for every process to join, and for any one of "
                            "them in a layer; between layers (an idle server) the others wait for rank 0 without "
                            "limit (default: 300)")
    verbose = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand without -v must not overwrite a `mixtral -v ...` given before it.
    verbose.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return {"model": model, "chat_model": chat_model, "weights": weights, "verbose": verbose, "parallel": parallel}


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """The sampling options of `generate` and `chat` (one definition for both)."""
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", "-n", type=int, default=64, metavar="N",
                          help="most tokens to generate per reply (default: 64)")
    # Sampling by default: greedy decoding of a chat model tends to loop, and users of a chat CLI expect varied
    # replies. --temperature 0 gives deterministic output.
    sampling.add_argument("--temperature", "-t", type=float, default=0.7, metavar="T",
                          help="softmax temperature; 0 means greedy (argmax, deterministic) (default: 0.7, i.e. "
                               "sampling with --top-p 0.9)")
    sampling.add_argument("--top-k", type=int, default=None, metavar="K",
                          help="sample only among the K most likely tokens (default: no limit)")
    sampling.add_argument("--top-p", type=float, default=0.9, metavar="P",
                          help="sample from the smallest set of tokens whose probability reaches P (default: 0.9; "
                               "1 disables)")
    sampling.add_argument("--seed", type=int, default=None,
                          help="random seed for sampling, for reproducible output (default: a fresh seed per run)")
    sampling.add_argument("--stop", action="append", default=[], metavar="STR",
                          help="end the text before this string (repeatable)")


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop)


def default_model(args: argparse.Namespace) -> str:
    """--model, or the bundled model that fits the command: the instruct one for chat and generate --chat."""
    if args.model is not None:
        return args.model
    return DEFAULT_INSTRUCT if args.command == "chat" or getattr(args, "chat", False) else DEFAULT_MODEL


def with_model(args: argparse.Namespace, command) -> int:
    """command(model, tokenizer) -> exit code, with the model the options name: loaded here, or with its experts
    spread over torchrun's processes (--parallel.ep; rank 0 runs `command`, the others serve their experts)."""
    # One process as ever, unless --parallel.ep asks for more or torchrun started several (which then say that
    # their number and --parallel.ep disagree).
    if args.parallel_ep == 1 and os.environ.get("WORLD_SIZE", "1") == "1":
        return command(*_load(args))
    from mixtral.parallel import inference

    return inference.run(default_model(args), args.parallel_ep, command, program=args.command,
                         tokenizer=args.tokenizer, dtype=parse_dtype(args.dtype), quantize=args.quantize,
                         max_memory=args.max_memory, progress=sys.stderr.isatty(), timeout=args.parallel_timeout)


def _load(args: argparse.Namespace) -> tuple[Transformer, Tokenizer]:
    # tqdm's bar goes to stderr; only draw it for a person watching, not into logs.
    return load_model_and_tokenizer(default_model(args), tokenizer=args.tokenizer, dtype=args.dtype,
                                    quantize=args.quantize, progress=sys.stderr.isatty(), max_memory=args.max_memory,
                                    offload_policy=args.offload_policy, offload_dir=args.offload_dir)


def _report_offload(args: argparse.Namespace, model: Transformer) -> None:
    """With --verbose and --max-memory: what the offloading engine did (stderr)."""
    engine = getattr(model, "offload_engine", None)
    if engine is not None and getattr(args, "verbose", False):
        for line in stats_lines(engine.stats()):
            print(line, file=sys.stderr)


class _NoteHandler(logging.Handler):
    """Prints the loaders' notes as `note: ...` lines on stderr (the stderr of the moment: tests replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"note: {record.getMessage()}", file=sys.stderr)


def show_notes() -> None:
    """Print the `NOTES_LOGGER` records as `note: ...` lines, once however often `main` runs in a process."""
    notes = logging.getLogger(NOTES_LOGGER)
    if not any(isinstance(h, _NoteHandler) for h in notes.handlers):
        notes.addHandler(_NoteHandler())
    notes.propagate = False  # a -v log handler must not print them a second time


# ---- generate --------------------------------------------------------------------------------------------------

GENERATE_EPILOG = """\
Each argument is one prompt (quote a prompt that has spaces); several prompts run as one batch and their
results are printed one after the other under a "==> prompt N <==" header. With no prompt, or "-", the prompt
is read from stdin. Only the generated text is printed, not the prompt.

examples:
  mixtral generate --model ./Mixtral-8x7B-v0.1 "The mixture of experts"
  mixtral generate --model ./Mixtral-8x7B-Instruct-v0.1 --chat "Explain top-2 routing in one paragraph."
  echo "Once upon a time" | mixtral generate --temperature 0 --max-new-tokens 32
  mixtral generate --no-stream --stop "\\n" "Paris is" "Berlin is"
  torchrun --nproc-per-node 2 -m mixtral generate --model ./Mixtral-8x7B-v0.1 --parallel.ep 2 "The mixture"
"""


def read_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts from the command line, or the whole of stdin when none (or "-") was given."""
    if list(prompts) not in ([], ["-"]):
        return list(prompts)
    if sys.stdin.isatty():
        print("reading the prompt from stdin (end it with Ctrl-D)", file=sys.stderr)
    # `echo text | mixtral generate` ends the text with a newline the user did not mean as part of the prompt.
    return [sys.stdin.read().rstrip("\r\n")]


def encode_prompt(tokenizer: Tokenizer, prompt: str, chat: bool) -> str | list[int]:
    """What `stream_text` takes: the string itself, or (chat) the ids of one user message in the Instruct format."""
    return tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat else prompt


def write_stream(pieces: Iterable[str]) -> str:
    """Print text pieces as they come (flushed, so a pipe sees each token) and return the whole text."""
    text = []
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        text.append(piece)
    return "".join(text)


def cmd_generate(args: argparse.Namespace) -> int:
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    # Under torchrun only rank 0 generates; the others (--parallel.ep) must not wait on stdin for a prompt.
    prompts = read_prompts(args.prompt) if os.environ.get("RANK", "0") == "0" else []
    return with_model(args, lambda model, tokenizer: _generate(args, prompts, model, tokenizer))


def _generate(args: argparse.Namespace, prompts: list[str], model: Transformer, tokenizer: Tokenizer) -> int:
    kwargs = _sampling_kwargs(args)
    if len(prompts) == 1 and not args.no_stream:
        write_stream(stream_text(model, tokenizer, encode_prompt(tokenizer, prompts[0], args.chat),
                                 args.max_new_tokens, **kwargs))
        print()
        _report_offload(args, model)
        return 0
    texts = complete(model, tokenizer, [encode_prompt(tokenizer, p, args.chat) for p in prompts],
                     args.max_new_tokens, **kwargs)
    _report_offload(args, model)
    if len(prompts) == 1:
        print(texts[0])
        return 0
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        if i:
            print()
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        print(f"==> prompt {i + 1}: {shown!r} <==")
        print(text)
    return 0


# ---- chat ------------------------------------------------------------------------------------------------------

CHAT_EPILOG = """\
Type a message and press Enter; the reply streams back. The whole conversation is sent each turn, in the
Instruct format of the tokenizer (mistral-common). Commands: /reset forgets the conversation, /exit (or Ctrl-D)
quits. With stdin not a terminal, each input line is one user turn and each reply is printed on its own line.

examples:
  mixtral chat --model ./Mixtral-8x7B-Instruct-v0.1
  mixtral chat --model ./Mixtral-8x7B-Instruct-v0.1 --temperature 0 < questions.txt
  torchrun --nproc-per-node 2 -m mixtral chat --model ./Mixtral-8x7B-Instruct-v0.1 --parallel.ep 2
"""


def cmd_chat(args: argparse.Namespace) -> int:
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    return with_model(args, lambda model, tokenizer: _chat(args, model, tokenizer))


def _chat(args: argparse.Namespace, model: Transformer, tokenizer: Tokenizer) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (gives input() line editing and history)
        except ImportError:
            pass
        print("/reset forgets the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    messages: list[dict[str, str]] = []
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        command = line.strip()
        if command == "/exit":
            return 0
        if command == "/reset":
            messages.clear()
            if interactive:
                print("(conversation cleared)", file=sys.stderr)
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        try:
            ids = tokenizer.encode_chat(messages)
            reply = write_stream(stream_text(model, tokenizer, ids, args.max_new_tokens, **_sampling_kwargs(args)))
        except ContextLengthError as e:
            if not interactive:
                raise
            # A person keeps the session and decides what to drop; a script fails loudly in `main`.
            messages.pop()
            print(f"error: {e}; /reset starts a new conversation", file=sys.stderr)
            continue
        print()
        messages.append({"role": "assistant", "content": reply})


# ---- the parser and main ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the `mixtral` command and its subcommands."""
    parents = shared_parents()
    verbose, model, weights = parents["verbose"], parents["model"], parents["weights"]
    parser = argparse.ArgumentParser(
        prog="mixtral", description="Mixtral of Experts (arXiv 2401.04088) in plain PyTorch.",
        epilog="Run 'mixtral COMMAND --help' for the options of a command.")
    parser.add_argument("--verbose", "-v", action="store_true", help=VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    p = commands.add_parser("generate", parents=[verbose, parents["chat_model"], weights, parents["parallel"]],
                            formatter_class=raw,
                            epilog=GENERATE_EPILOG, help="continue one or more prompts, streaming the text",
                            description="Continue prompts with a model, streaming the text to stdout.")
    p.add_argument("prompt", nargs="*", metavar="PROMPT", help="prompt text; none or '-' reads stdin")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as one user message in the Instruct format ([INST] ... [/INST])")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of token by token")
    add_sampling_options(p)
    p.set_defaults(run=cmd_generate)

    p = commands.add_parser("chat", parents=[verbose, parents["chat_model"], weights, parents["parallel"]],
                            formatter_class=raw,
                            epilog=CHAT_EPILOG,
                            help="talk with an Instruct model, keeping the conversation",
                            description="Interactive chat with an Instruct model, streaming each reply.")
    add_sampling_options(p)
    p.set_defaults(run=cmd_chat)

    add_info_parser(commands, parents)
    add_convert_parser(commands, parents)
    add_quantize_parser(commands, parents)
    add_plan_parser(commands, parents)
    add_bench_parser(commands, parents)
    add_train_parser(commands, parents)
    add_finetune_parser(commands, parents)
    add_eval_parser(commands, parents)
    add_serve_parser(commands, parents)
    add_data_parser(commands, parents)
    add_routes_parser(commands, parents)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `mixtral` command with `argv` (default: sys.argv[1:]); return the exit code.

    0 on success, 1 for a user error (one `error: ...` line on stderr), 2 for bad usage (argparse), 130 after
    Ctrl-C, 141 when stdout was closed early (`mixtral generate ... | head -1`).
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) and usage errors (2): return argparse's code instead of exiting
        return e.code if isinstance(e.code, int) else 1
    show_notes()
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away. Point stdout at devnull so the interpreter's final flush does not raise again
        # (the recipe of the Python docs on SIGPIPE).
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_BROKEN_PIPE
    except (MixtralError, OSError) as e:
        # OSError too: an unwritable DST or a full disk is the user's to fix, not a bug to show a traceback for.
        if args.verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

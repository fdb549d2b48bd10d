"""The `mixtral` command: generate, chat, info, convert, bench, train, data, routes.

A thin layer over the library: every subcommand parses its arguments, calls `mixtral.load`, the tokenizer and
`mixtral.generate`, and prints. User mistakes arrive as `mixtral.errors.MixtralError` and are turned into one
`error: ...` line and exit code 1 in `main`, the only place that handles errors.

    mixtral generate --model tiny "The mixture of experts"
    mixtral chat --model ./Mixtral-8x7B-Instruct-v0.1
    mixtral info --model mixtral-8x7b
    mixtral convert ./hf-checkpoint ./native --to native
    mixtral bench moe --tokens 1,512
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Sequence

from mixtral.analysis.cli import add_routes_parser
from mixtral.bench import add_bench_parser
from mixtral.data.prepare import add_data_parser
from mixtral.train.cli import add_train_parser
from mixtral.serve.cli import add_serve_parser
from mixtral.config import PRESETS, ModelConfig
from mixtral.errors import CheckpointError, ContextLengthError, InputError, MixtralError, TokenizerError
from mixtral.generate import check_sampling, complete, stream_text
from mixtral.io.checkpoint import CheckpointFiles, SafetensorsReader, find_checkpoint, save_hf, save_native
from mixtral.io.loading import load, load_tokenizer, resolve_model
from mixtral.io.tokenizer import DIR_CANDIDATES, Tokenizer
from mixtral.io.tokenizer import PRESETS as TOKENIZER_PRESETS
from mixtral.model import Transformer
from mixtral.quant import read_quantization_config

log = logging.getLogger("mixtral")

# The small Mixtral this project trained and bundles (mixtral/models/default, see its README.md).
DEFAULT_MODEL = "default"

# The vocabulary of the Mixtral 8x7B / Mistral 7B tokenizer that mistral-common ships.
MIXTRAL_VOCAB = 32000

# Files of a tokenizer that `convert` carries over from SRC to DST.
TOKENIZER_FILES = ("tokenizer.model*", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Files that make a directory a checkpoint (either layout). `convert --force` removes them from DST first, since a
# leftover index, shard or other layout's config would be read instead of the new weights.
CHECKPOINT_FILES = ("config.json", "params.json", "model*.safetensors", "model.safetensors.index.json",
                    "pytorch_model*.bin", "pytorch_model.bin.index.json", "consolidated*.safetensors",
                    "consolidated*.pth")

DTYPE_CHOICES = ("float32", "bfloat16", "float16")

VERBOSE_HELP = "log progress and timings, and show tracebacks of errors"

# What `main` returns after a broken pipe: what a shell reports for a process killed by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


# ---- shared options --------------------------------------------------------------------------------------------

def add_model_option(parser: argparse.ArgumentParser) -> None:
    """--model, shared by every subcommand that reads a model."""
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL, metavar="PATH_OR_PRESET",
                        help=f"checkpoint directory (Hugging Face or Mistral-native layout), 'default' (the small "
                             f"Mixtral trained by this project and bundled with it) or a preset name "
                             f"({', '.join(PRESETS)}; presets have random weights) (default: {DEFAULT_MODEL})")


def add_quantize_option(parser: argparse.ArgumentParser) -> None:
    """--quantize, for subcommands that run a model."""
    parser.add_argument("--quantize", choices=("int8", "int4"),
                        help="quantize the expert, attention and output weights after loading (int8: per channel; "
                             "int4: groups of 128); the router stays in full precision. A checkpoint saved "
                             "quantized loads quantized without this option")


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """The model, tokenizer and sampling options of `generate` and `chat` (one definition for both)."""
    model = parser.add_argument_group("model")
    add_model_option(model)
    model.add_argument("--tokenizer", metavar="PATH_OR_PRESET",
                       help="tokenizer file, directory or preset (default: the model directory's own tokenizer, "
                            "else the Mixtral tokenizer shipped with mistral-common when the vocabulary has "
                            f"{MIXTRAL_VOCAB} tokens)")
    model.add_argument("--dtype", choices=DTYPE_CHOICES,
                       help="dtype of the weights in memory (default: the checkpoint's own; float32 for presets)")
    add_quantize_option(model)
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


# ---- models and tokenizers -------------------------------------------------------------------------------------

def is_preset(model: str) -> bool:
    """Whether `mixtral.load(model)` makes a random-init preset (the same rule: a preset name that is no path)."""
    return model in PRESETS and not Path(model).exists()


def inspect_model(model: str) -> tuple[ModelConfig, CheckpointFiles | None]:
    """The config of a preset or checkpoint directory and (for a directory) its files, without reading weights.

    Raises CheckpointError/ConfigError naming the path or preset.
    """
    if is_preset(model):
        return PRESETS[model], None
    model = str(resolve_model(model))
    if not Path(model).exists():
        # Same wording as `mixtral.load`: the argument may have been meant as either.
        raise CheckpointError(f"{model!r} is neither an existing checkpoint directory nor a preset "
                              f"(presets: {', '.join(PRESETS)})")
    files = find_checkpoint(model)
    return files.config, files


def _has_own_tokenizer(directory: Path) -> bool:
    return any(any(directory.glob(pattern)) for pattern in DIR_CANDIDATES)


def resolve_tokenizer(tokenizer: str | None, model: str, config: ModelConfig,
                      files: CheckpointFiles | None) -> tuple[Tokenizer, str | None]:
    """(tokenizer, note) for `model`: --tokenizer if given; else the checkpoint directory's own; else the preset's
    namesake in mistral-common; else the Mixtral tokenizer when the vocabulary has 32000 tokens, with a note saying
    so. Raises TokenizerError when none fits or the tokenizer has more tokens than the model.
    """
    note = None
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    elif files is not None and _has_own_tokenizer(files.directory):
        tok = load_tokenizer(files.directory)
    elif files is None and model.lower() in TOKENIZER_PRESETS:
        tok = load_tokenizer(model)
    elif config.vocab_size == MIXTRAL_VOCAB:
        if files is not None:
            note = (f"{files.directory} has no tokenizer; using the Mixtral tokenizer from mistral-common "
                    f"(pass --tokenizer to choose another)")
        tok = load_tokenizer()
    else:
        raise TokenizerError(f"{model} has no tokenizer and its vocab_size {config.vocab_size} is not the Mixtral "
                             f"tokenizer's {MIXTRAL_VOCAB}; pass --tokenizer PATH")
    if tok.n_words > config.vocab_size:
        raise TokenizerError(f"tokenizer {tok.path} has {tok.n_words} tokens but the model's vocab_size is "
                             f"{config.vocab_size}; pass the model's own tokenizer with --tokenizer")
    return tok, note


def load_model_and_tokenizer(args: argparse.Namespace) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) for --model/--tokenizer/--dtype.

    The tokenizer is resolved first, so a missing one fails before minutes of loading; its note, and the one
    saying a preset's weights are random, are printed once the model has loaded, so that an error stays the
    first line of stderr.
    """
    config, files = inspect_model(args.model)
    tokenizer, tokenizer_note = resolve_tokenizer(args.tokenizer, args.model, config, files)
    start = time.perf_counter()
    # tqdm's bar goes to stderr; only draw it for a person watching, not into logs.
    model = load(args.model, dtype=args.dtype, progress=sys.stderr.isatty(), quantize=args.quantize)
    log.info("loaded %s (%s) in %.1f s", args.model, str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
             time.perf_counter() - start)
    if files is None:
        _note(f"{args.model!r} is a preset with random weights, so the output is noise; leave out --model for "
              f"the trained default model, or pass a checkpoint directory")
    if tokenizer_note:
        _note(tokenizer_note)
    return model, tokenizer


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


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
    prompts = read_prompts(args.prompt)
    model, tokenizer = load_model_and_tokenizer(args)
    kwargs = _sampling_kwargs(args)
    if len(prompts) == 1 and not args.no_stream:
        write_stream(stream_text(model, tokenizer, encode_prompt(tokenizer, prompts[0], args.chat),
                                 args.max_new_tokens, **kwargs))
        print()
        return 0
    texts = complete(model, tokenizer, [encode_prompt(tokenizer, p, args.chat) for p in prompts],
                     args.max_new_tokens, **kwargs)
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
"""


def cmd_chat(args: argparse.Namespace) -> int:
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    model, tokenizer = load_model_and_tokenizer(args)
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


# ---- info ------------------------------------------------------------------------------------------------------

INFO_EPILOG = """\
Reads only the config and file headers, never the weights, so it is instant even for mixtral-8x7b.

examples:
  mixtral info --model mixtral-8x7b
  mixtral info --model ./Mixtral-8x7B-v0.1 --json
"""


def human_count(n: int) -> str:
    """46702792704 -> "46.70B"."""
    for unit, size in (("T", 10 ** 12), ("B", 10 ** 9), ("M", 10 ** 6), ("K", 10 ** 3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    """Decimal units, as disks and model cards count: 93405585408 -> "93.41 GB"."""
    for unit, size in (("TB", 10 ** 12), ("GB", 10 ** 9), ("MB", 10 ** 6), ("kB", 10 ** 3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _file_dtypes(path: Path) -> list[str]:
    """The dtypes of the tensors of a .safetensors file, from its header only ([] for other formats)."""
    if path.suffix != ".safetensors":
        return []
    reader = SafetensorsReader(path)
    try:
        return sorted({str(reader.dtype(k)).removeprefix("torch.") for k in reader.keys()})
    finally:
        reader.close()


def describe(model: str) -> dict:
    """What `info` prints: config, parameter counts and (for a directory) layout and files."""
    config, files = inspect_model(model)
    total, active = config.param_counts()
    info = {"model": model, "source": "preset" if files is None else "checkpoint",
            "layout": None if files is None else ("native" if files.native else "hf"),
            "params_total": total, "params_active": active, "config": asdict(config), "files": [],
            "tokenizer_files": []}
    if files is not None:
        info["files"] = [{"name": w.name, "bytes": w.stat().st_size, "dtypes": _file_dtypes(w)}
                         for w in files.weights]
        info["tokenizer_files"] = sorted({p.name for pattern in TOKENIZER_FILES
                                          for p in files.directory.glob(pattern)})
    return info


def cmd_info(args: argparse.Namespace) -> int:
    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    config = info["config"]
    if info["layout"] is None:
        source = "preset: random init, no weights on disk"
    else:
        source = f"checkpoint, {'Mistral native' if info['layout'] == 'native' else 'Hugging Face'} layout"
    total, active = info["params_total"], info["params_active"]
    print(f"model:       {info['model']} ({source})")
    print(f"parameters:  {human_count(total)} total ({total})")
    print(f"active:      {human_count(active)} per token ({active}): top {config['top_k']} of "
          f"{config['n_experts']} expert{'s' if config['n_experts'] > 1 else ''} per layer")
    print(f"memory:      {human_bytes(2 * total)} in bfloat16, {human_bytes(4 * total)} in float32")
    print("config:")
    width = max(map(len, config))
    for name, value in config.items():
        print(f"  {name:<{width}}  {value}")
    if info["files"]:
        print("weights:")
        width = max(len(f["name"]) for f in info["files"])
        for f in info["files"]:
            print(f"  {f['name']:<{width}}  {human_bytes(f['bytes']):>10}  {','.join(f['dtypes'])}")
        print(f"  total {human_bytes(sum(f['bytes'] for f in info['files']))}")
    if info["layout"] is not None:
        print(f"tokenizer:   {', '.join(info['tokenizer_files']) or 'none'}")
    return 0


# ---- convert ---------------------------------------------------------------------------------------------------

CONVERT_EPILOG = """\
SRC is a checkpoint directory in either layout (or a preset name, which writes its random weights). The
tokenizer files found in SRC (tokenizer.model*, tokenizer.json, tokenizer_config.json, special_tokens_map.json)
are copied to DST. DST must be empty or missing unless --force is given.

examples:
  mixtral convert ./Mixtral-8x7B-v0.1 ./mixtral-native --to native
  mixtral convert ./mixtral-native ./mixtral-hf-bf16 --to hf --dtype bfloat16
"""


def _matching(directory: Path, patterns: Iterable[str]) -> list[Path]:
    return sorted({p for pattern in patterns for p in directory.glob(pattern) if p.is_file()})


def check_destination(src: Path, dst: Path, force: bool) -> None:
    """Refuse a DST that would mix with what is already there. Raises InputError naming DST."""
    if dst.exists() and not dst.is_dir():
        raise InputError(f"destination {dst} exists and is not a directory")
    if src.exists() and dst.exists() and src.resolve() == dst.resolve():
        raise InputError(f"destination {dst} is the source directory; convert into another directory")
    if dst.exists() and any(dst.iterdir()) and not force:
        raise InputError(f"destination {dst} exists and is not empty; pass --force to write into it "
                         f"(replacing the checkpoint and tokenizer files there)")


def cmd_convert(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    check_destination(src, dst, args.force)
    if read_quantization_config(src) is not None:
        raise InputError(f"{src} is a quantized checkpoint; convert reads unquantized weights only (quantize on "
                         f"load with --quantize instead)")
    model = load(args.src, dtype=args.dtype, progress=sys.stderr.isatty())
    if args.force and dst.is_dir():
        # Only after SRC loaded: a failed load leaves DST as it was.
        for path in _matching(dst, CHECKPOINT_FILES + TOKENIZER_FILES):
            path.unlink()
    (save_hf if args.to == "hf" else save_native)(model, dst)
    copied = []
    if src.is_dir():
        for path in _matching(src, TOKENIZER_FILES):
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    dtype = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    layout = "Hugging Face" if args.to == "hf" else "Mistral native"
    print(f"wrote {dst} ({layout} layout, {dtype}):")
    for path in sorted(p for p in dst.iterdir() if p.is_file()):
        print(f"  {path.name}  {human_bytes(path.stat().st_size)}{'  (copied)' if path.name in copied else ''}")
    return 0


# ---- the parser and main ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the `mixtral` command and its subcommands."""
    verbose = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand without -v must not overwrite a `mixtral -v ...` given before it.
    verbose.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    parser = argparse.ArgumentParser(
        prog="mixtral", description="Mixtral of Experts (arXiv 2401.04088) in plain PyTorch.",
        epilog="Run 'mixtral COMMAND --help' for the options of a command.")
    parser.add_argument("--verbose", "-v", action="store_true", help=VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    p = commands.add_parser("generate", parents=[verbose], formatter_class=raw, epilog=GENERATE_EPILOG,
                            help="continue one or more prompts, streaming the text",
                            description="Continue prompts with a model, streaming the text to stdout.")
    p.add_argument("prompt", nargs="*", metavar="PROMPT", help="prompt text; none or '-' reads stdin")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as one user message in the Instruct format ([INST] ... [/INST])")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end instead of token by token")
    add_generation_options(p)
    p.set_defaults(run=cmd_generate)

    p = commands.add_parser("chat", parents=[verbose], formatter_class=raw, epilog=CHAT_EPILOG,
                            help="talk with an Instruct model, keeping the conversation",
                            description="Interactive chat with an Instruct model, streaming each reply.")
    add_generation_options(p)
    p.set_defaults(run=cmd_chat)

    p = commands.add_parser("info", parents=[verbose], formatter_class=raw, epilog=INFO_EPILOG,
                            help="show a model's config, parameter counts and files",
                            description="Show the config, total and active parameter counts, layout and weight "
                                        "files of a preset or checkpoint directory.")
    add_model_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=cmd_info)

    p = commands.add_parser("convert", parents=[verbose], formatter_class=raw, epilog=CONVERT_EPILOG,
                            help="convert a checkpoint between Hugging Face and Mistral-native layouts",
                            description="Load a checkpoint (either layout) and write it in the layout --to names.")
    p.add_argument("src", metavar="SRC", help="checkpoint directory (or preset name) to read")
    p.add_argument("dst", metavar="DST", help="directory to write")
    p.add_argument("--to", required=True, choices=("hf", "native"),
                   help="layout to write: hf (config.json + model*.safetensors) or native "
                        "(params.json + consolidated.safetensors)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="dtype to write (default: SRC's own)")
    p.add_argument("--force", "-f", action="store_true",
                   help="write into a non-empty DST, replacing the checkpoint and tokenizer files there")
    p.set_defaults(run=cmd_convert)

    add_bench_parser(commands)
    add_train_parser(commands)
    add_serve_parser(commands)
    add_data_parser(commands)
    add_routes_parser(commands, [verbose])
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

"""`mixtral info`, `mixtral convert` and `mixtral quantize`: the commands about checkpoints, registered on the
`mixtral` command by `add_info_parser`, `add_convert_parser` and `add_quantize_parser`.

    mixtral info --model mixtral-8x7b
    mixtral convert ./hf-checkpoint ./native --to native
    mixtral quantize ./Mixtral-8x7B-v0.1 ./mixtral-int4 --quantize int4
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

from mixtral import quant
from mixtral.config import DTYPE_CHOICES, dtype_name, parse_dtype
from mixtral.errors import InputError
from mixtral.io.checkpoint import SafetensorsReader, save_hf, save_native
from mixtral.io.loading import inspect_model, is_preset, load, quantize_checkpoint
from mixtral.io.quantized import read_quantization_config

# Files of a tokenizer that `convert` carries over from SRC to DST.
TOKENIZER_FILES = ("tokenizer.model*", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Files that make a directory a checkpoint (either layout). `convert --force` removes them from DST first, since a
# leftover index, shard or other layout's config would be read instead of the new weights.
CHECKPOINT_FILES = ("config.json", "params.json", "model*.safetensors", "model.safetensors.index.json",
                    "pytorch_model*.bin", "pytorch_model.bin.index.json", "consolidated*.safetensors",
                    "consolidated*.pth")

RAW = argparse.RawDescriptionHelpFormatter


# ---- info ------------------------------------------------------------------------------------------------------

INFO_EPILOG = """\
Reads only the config and file headers, never the weights, so it is instant even for mixtral-8x7b.

examples:
  mixtral info --model mixtral-8x7b
  mixtral info --model ./Mixtral-8x7B-v0.1 --json
"""


def add_info_parser(subparsers, parents: dict[str, argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `info` on the subparsers of the `mixtral` command; `parents` as `mixtral.cli.shared_parents`."""
    p = subparsers.add_parser("info", parents=[parents["verbose"], parents["model"]], formatter_class=RAW,
                              epilog=INFO_EPILOG, help="show a model's config, parameter counts and files",
                              description="Show the config, total and active parameter counts, layout and weight "
                                          "files of a preset or checkpoint directory.")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=cmd_info)
    return p


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
        return sorted({dtype_name(reader.dtype(k)) for k in reader.keys()})
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
SRC is a checkpoint directory in either layout, a distributed training run's checkpoint (torch.distributed.checkpoint
shards, written by `torchrun ... mixtral train`), or a preset name (which writes its random weights). The
tokenizer files found in SRC (tokenizer.model*, tokenizer.json, tokenizer_config.json, special_tokens_map.json)
are copied to DST. DST must be empty or missing unless --force is given.

examples:
  mixtral convert ./Mixtral-8x7B-v0.1 ./mixtral-native --to native
  mixtral convert ./mixtral-native ./mixtral-hf-bf16 --to hf --dtype bfloat16
  mixtral convert out/run/checkpoints/step_001000 ./my-model --to hf        # from a distributed run
"""


def add_convert_parser(subparsers, parents: dict[str, argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `convert` on the subparsers of the `mixtral` command; `parents` as `mixtral.cli.shared_parents`.
    Its --dtype is the dtype written, not the one a model runs in, so it is its own option."""
    p = subparsers.add_parser("convert", parents=[parents["verbose"]], formatter_class=RAW, epilog=CONVERT_EPILOG,
                              help="convert a checkpoint between Hugging Face and Mistral-native layouts",
                              description="Load a checkpoint (either layout) and write it in the layout --to "
                                          "names.")
    p.add_argument("src", metavar="SRC", help="checkpoint directory (or preset name) to read")
    p.add_argument("dst", metavar="DST", help="directory to write")
    p.add_argument("--to", required=True, choices=("hf", "native"),
                   help="layout to write: hf (config.json + model*.safetensors) or native "
                        "(params.json + consolidated.safetensors)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="dtype to write (default: SRC's own)")
    p.add_argument("--force", "-f", action="store_true",
                   help="write into a non-empty DST, replacing the checkpoint and tokenizer files there")
    p.set_defaults(run=cmd_convert)
    return p


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
    from mixtral.parallel.checkpoint import is_distributed_checkpoint, load_model

    if is_distributed_checkpoint(src):  # a distributed training run's (torch.distributed.checkpoint)
        model = load_model(src, parse_dtype(args.dtype))
    else:
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
    dtype = dtype_name(model.tok_embeddings.weight.dtype)
    layout = "Hugging Face" if args.to == "hf" else "Mistral native"
    print(f"wrote {dst} ({layout} layout, {dtype}):")
    for path in sorted(p for p in dst.iterdir() if p.is_file()):
        print(f"  {path.name}  {human_bytes(path.stat().st_size)}{'  (copied)' if path.name in copied else ''}")
    return 0


# ---- quantize --------------------------------------------------------------------------------------------------

def quantize_option(text: str) -> "str | dict":
    """argparse type of --quantize: `mixtral.quant.parse_quantize_option`, its error as argparse's."""
    try:
        return quant.parse_quantize_option(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--quantize: ")) from None


def precision_option(text: str) -> str:
    """argparse type of --experts/--attention/--output: one precision spec (`mixtral.quant.parse_precision`)."""
    try:
        quant.parse_precision(text, where="precision")
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("precision: ")) from None
    return text


QUANTIZE_EPILOG = """\
Reads SRC one layer at a time: each layer's experts are read, quantized, written to their own file and freed
before the next layer's, and the rest (attention, router, norms, embeddings) is written at the end, so a checkpoint
larger than memory quantizes (peak: the rest of the model plus one layer's experts). OUT holds config.json,
model.safetensors and experts/layer-NNN.experts, one read per expert: the layout the offloading engine reads.

precisions: int8 (per channel), int4[:gN] (N = 32..256, default 128), int3[:gN] and int2[:gN] (N = 16..128,
default 64 and 16; scales and zeros fitted, not min-max), bf16 (left unquantized).

examples:
  mixtral quantize ./Mixtral-8x7B-v0.1 ./mixtral-int4
  mixtral quantize ./Mixtral-8x7B-v0.1 ./mixtral-e3a8 --experts int3 --attention int8 --output int8
  mixtral quantize mixtral-8x7b ./random-8x7b-int4     # the full-size shape with random weights, for benchmarks
"""


def add_quantize_parser(subparsers, parents: dict[str, argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `quantize` on the subparsers of the `mixtral` command; `parents` as `mixtral.cli.shared_parents`."""
    p = subparsers.add_parser("quantize", parents=[parents["verbose"]], formatter_class=RAW, epilog=QUANTIZE_EPILOG,
                              help="write a quantized checkpoint, one layer at a time",
                              description="Quantize a float checkpoint (either layout), the bundled default model "
                                          "or a preset (random weights) into a quantized checkpoint directory.")
    p.add_argument("src", metavar="SRC", help="checkpoint directory, 'default' or a preset name to read")
    p.add_argument("out", metavar="OUT", help="directory to write (replaced as a whole, atomically)")
    p.add_argument("--quantize", type=quantize_option, default="int4", metavar="SPEC",
                   help="precision of every part, or per part as experts=int3,attention=int8 (default: int4)")
    for part in quant.TARGETS:
        p.add_argument(f"--{part}", type=precision_option, metavar="SPEC",
                       help=f"precision of the {part} weights, overriding --quantize")
    p.add_argument("--dtype", choices=DTYPE_CHOICES,
                   help="dtype of the unquantized tensors (default: SRC's own, float32 for a preset)")
    p.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights (default: 0)")
    p.add_argument("--force", "-f", action="store_true", help="replace a non-empty OUT")
    p.set_defaults(run=cmd_quantize)
    return p


def cmd_quantize(args: argparse.Namespace) -> int:
    src, out = Path(args.src), Path(args.out)
    check_destination(src, out, args.force)
    settings = quant.spec_strings(quant.quantization_settings(args.quantize))
    for part in quant.TARGETS:
        if getattr(args, part) is not None:
            settings[part] = getattr(args, part)
    quantize_checkpoint(args.src, out, settings, dtype=args.dtype, seed=args.seed, progress=sys.stderr.isatty())
    parts = quant.describe(quant.quantization_settings(settings))
    source = f"preset {args.src} (random weights, seed {args.seed})" if is_preset(args.src) else str(src)
    print(f"wrote {out} from {source}: {parts}")
    total = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    print(f"  {len(list((out / 'experts').glob('*.experts')))} expert files, {human_bytes(total)} in all")
    return 0

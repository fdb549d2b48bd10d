"""Loading what a user names: a checkpoint directory, "default" (the bundled model) or a preset.

`load` and `load_tokenizer` are `mixtral.load` and `mixtral.load_tokenizer`. `load_model_and_tokenizer` is what
the commands run: the model plus the tokenizer that fits it (`resolve_tokenizer`), checked before the weights are
read. `is_preset` is the one rule for "a preset unless it is a path"; `resolve_model` the one for "default".
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from mixtral import kernels, quant
from mixtral.config import PRESETS, ModelConfig, dtype_name, from_name, parse_dtype
from mixtral.errors import CheckpointError, InputError, TokenizerError
from mixtral.io.checkpoint import CheckpointFiles, find_checkpoint, load_checkpoint
from mixtral.io.quantized import load_quantized, read_quantization_config
from mixtral.io.tokenizer import DIR_CANDIDATES, Tokenizer
from mixtral.io.tokenizer import PRESETS as TOKENIZER_PRESETS
from mixtral.io.tokenizer import load_tokenizer as _load_tokenizer
from mixtral.model import Transformer, init_parameter_

log = logging.getLogger("mixtral")
# What a user should know about what was loaded (a preset's weights are random, the tokenizer was guessed), at
# WARNING. The `mixtral` command prints these as "note: ..." lines; a library user sees them as log records.
NOTES_LOGGER = "mixtral.notes"
notes = logging.getLogger(NOTES_LOGGER)

# The small Mixtral this project trained and ships (scripts/export_default_model.py writes it; its README.md is
# the model card). The name "default" means this directory wherever a model path or preset is taken.
DEFAULT_MODEL = "default"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "default"

# The vocabulary of the Mixtral 8x7B / Mistral 7B tokenizer that mistral-common ships.
MIXTRAL_VOCAB = 32000


def is_preset(name: str | os.PathLike) -> bool:
    """Whether `name` means a random-init preset: a preset name (a str, not a Path) that is no existing path."""
    return isinstance(name, str) and name in PRESETS and not Path(name).exists()


def resolve_model(path_or_preset: str | os.PathLike) -> str | os.PathLike:
    """"default" (unless a directory of that name exists here) -> the bundled model's directory; else unchanged.
    Raises CheckpointError when the bundled model is missing from this installation."""
    if str(path_or_preset) == DEFAULT_MODEL and not Path(DEFAULT_MODEL).exists():
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise CheckpointError(f"the bundled default model is missing ({DEFAULT_MODEL_DIR}); reinstall mixtral "
                                  f"or pass a checkpoint directory or a preset")
        return DEFAULT_MODEL_DIR
    return path_or_preset


def _neither(path: str | os.PathLike) -> CheckpointError:
    # The argument may have been meant as a path or as a preset: say both.
    return CheckpointError(f"{str(path)!r} is neither an existing checkpoint directory nor a preset "
                           f"(presets: {', '.join(PRESETS)})")


def load(path_or_preset: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device = "cpu", progress: bool = True, seed: int = 0,
         quantize: str | None = None) -> Transformer:
    """A model from a checkpoint directory (HF or Mistral-native layout, or one `mixtral.io.quantized.save_quantized`
    wrote), "default" (the trained model bundled with mixtral) or a preset name.

    A preset gives a randomly initialised model (seeded with `seed`, float32 unless `dtype` says otherwise).
    quantize: "int8" or "int4" quantizes the weights while loading, with `mixtral.quant.quantize`'s default
    settings and its exact result. The float matrices are never all in memory: each is staged, quantized into
    place and freed, so the peak is the quantized model plus one float matrix (one expert's; a whole stack for the
    stacked-expert native layout of December 2023), plus float32 temporaries of 4 MB blocks of rows; a preset
    draws each matrix in float32 (`random_quantized`). A quantized checkpoint loads as it was saved.
    device: the model is loaded on the CPU, then moved there.
    Raises CheckpointError/ConfigError with the file, key or preset at fault; InputError for a bad `dtype` or
    `quantize`.
    """
    dtype = parse_dtype(dtype)
    path_or_preset = resolve_model(path_or_preset)
    if quantize is not None and quantize not in quant.MODES:
        raise InputError(f"unknown quantization mode {quantize!r}; choose one of {', '.join(quant.MODES)}")
    path, saved = Path(path_or_preset), None
    if is_preset(path_or_preset) and quantize is not None:
        model = random_quantized(from_name(path_or_preset), quantize, seed, dtype or torch.float32).to(device)
    elif is_preset(path_or_preset):
        model = Transformer(from_name(path_or_preset)).init_weights(seed)
        model = model.to(device=device, dtype=dtype or torch.float32).eval()
    elif not path.exists():
        raise _neither(path)
    elif (saved := read_quantization_config(path)) is not None:
        if quantize is not None and quantize != saved.get("mode"):
            raise InputError(f"{path} is already quantized to {saved.get('mode')}; it cannot be quantized to "
                             f"{quantize} (load the unquantized checkpoint instead)")
        model = load_quantized(path, dtype=dtype, device=device)
    else:
        model = load_checkpoint(path, dtype=dtype, device=device, progress=progress, quantize=quantize)
    if quantize is not None and saved is None:
        kernels.prefer_huge_pages(model, collapse=True)  # the quantized weights were written as they were made
    return model


def random_quantized(config: ModelConfig, mode: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    """What `Transformer(config).init_weights(seed).to(dtype)` then `quant.quantize(model, mode)` gives (equal
    tensor for tensor), in eval mode, without the float model: each quantized matrix is drawn in float32 one at a
    time (one expert of a stack; the draws of consecutive experts are the draws of the stack), converted to `dtype`,
    quantized into its slot and freed. Peak memory: the quantized model plus one float32 matrix (the largest plain
    tensor, the embeddings, is drawn in float32 too). Raises InputError for an unknown `mode`."""
    model = quant.empty_quantized_model(config, dtype, mode)
    params = dict(model.named_parameters())
    quantized = quant.quantized_modules(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        order = Transformer(config).named_parameters()  # the float model's, which init_weights follows
    with torch.no_grad():
        for name, meta in order:
            if name in params:
                params[name].copy_(init_parameter_(name, torch.empty(meta.shape), generator))
                continue
            module = quantized[name] if name in quantized else quantized[name.rsplit(".", 1)[0]]
            slots = range(len(module)) if isinstance(module, quant.QuantizedExperts) else [None]
            for slot in slots:
                matrix = init_parameter_(name, torch.empty(meta.shape[-2:]), generator)
                quant.quantize_into(module, slot, matrix.to(dtype))
        if config.tie_embeddings and "output" in quantized:
            quant.quantize_into(quantized["output"], None, model.tok_embeddings.weight)
        for module in quantized.values():
            module.refresh()
    return model.eval()


def load_tokenizer(path_or_preset: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint directory ("default": the bundled model's), a tokenizer file, or (None / a
    preset name) the Mixtral tokenizer shipped with mistral-common. See `mixtral.io.tokenizer`."""
    if path_or_preset is not None:
        path_or_preset = resolve_model(path_or_preset)
    return _load_tokenizer(path_or_preset)


# ---- what the commands load: a model and the tokenizer that fits it ---------------------------------------------

def inspect_model(model: str) -> tuple[ModelConfig, CheckpointFiles | None]:
    """The config of a preset or checkpoint directory and (for a directory) its files, without reading weights.

    Raises CheckpointError/ConfigError naming the path or preset.
    """
    if is_preset(model):
        return PRESETS[model], None
    path = resolve_model(model)
    if not Path(path).exists():
        raise _neither(path)
    files = find_checkpoint(path)
    return files.config, files


def _has_own_tokenizer(directory: Path) -> bool:
    return any(any(directory.glob(pattern)) for pattern in DIR_CANDIDATES)


def resolve_tokenizer(tokenizer: str | None, model: str, config: ModelConfig,
                      files: CheckpointFiles | None) -> tuple[Tokenizer, str | None]:
    """(tokenizer, note) for `model`: `tokenizer` if given; else the checkpoint directory's own; else the preset's
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


def load_model_and_tokenizer(model: str, *, tokenizer: str | None = None, dtype: str | torch.dtype | None = None,
                             quantize: str | None = None, progress: bool = True) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) for a checkpoint directory, "default" or a preset, and an optional tokenizer.

    The tokenizer is resolved first (`resolve_tokenizer`), so a missing one fails before minutes of loading. The
    notes for the user (the `NOTES_LOGGER` records) are logged once the model has loaded, so that an error stays
    the first thing reported. Raises CheckpointError, ConfigError, TokenizerError or InputError naming what is at
    fault.
    """
    config, files = inspect_model(model)
    tok, tokenizer_note = resolve_tokenizer(tokenizer, model, config, files)
    start = time.perf_counter()
    loaded = load(model, dtype=dtype, progress=progress, quantize=quantize)
    log.info("loaded %s (%s) in %.1f s", model, dtype_name(loaded.tok_embeddings.weight.dtype),
             time.perf_counter() - start)
    if files is None:
        notes.warning(f"{model!r} is a preset with random weights, so the output is noise; leave out --model "
                      f"for the trained default model, or pass a checkpoint directory")
    if tokenizer_note:
        notes.warning(tokenizer_note)
    return loaded, tok

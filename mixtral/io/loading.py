"""Loading what a user names: a checkpoint directory, "default" (the bundled model) or a preset.

`load` and `load_tokenizer` are `mixtral.load` and `mixtral.load_tokenizer`. `load_model_and_tokenizer` is what
the commands run: the model plus the tokenizer that fits it (`resolve_tokenizer`), checked before the weights are
read. `is_preset` is the one rule for "a preset unless it is a path"; `resolve_model` the one for "default".
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mixtral import kernels, quant
from mixtral.config import PRESETS, ModelConfig, dtype_name, from_name, parse_dtype, parse_size
from mixtral.errors import CheckpointError, InputError, TokenizerError
from mixtral.io.checkpoint import CheckpointFiles, LayerMover, drop_experts, find_checkpoint, load_checkpoint
from mixtral.io.experts import write_layer_experts
from mixtral.io.files import atomic_directory
from mixtral.io.quantized import (EXPERTS_DIR, experts_path, load_quantized, open_expert_files,
                                  read_quantization_config, saved_settings, write_resident_part)
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
# The default model after instruction tuning (SFT, then DPO): what `mixtral chat` and `generate --chat` run.
DEFAULT_INSTRUCT = "default-instruct"
DEFAULT_INSTRUCT_DIR = DEFAULT_MODEL_DIR.parent / DEFAULT_INSTRUCT
BUNDLED = {DEFAULT_MODEL: DEFAULT_MODEL_DIR, DEFAULT_INSTRUCT: DEFAULT_INSTRUCT_DIR}

# The vocabulary of the Mixtral 8x7B / Mistral 7B tokenizer that mistral-common ships.
MIXTRAL_VOCAB = 32000


def is_preset(name: str | os.PathLike) -> bool:
    """Whether `name` means a random-init preset: a preset name (a str, not a Path) that is no existing path."""
    return isinstance(name, str) and name in PRESETS and not Path(name).exists()


def resolve_model(path_or_preset: str | os.PathLike) -> str | os.PathLike:
    """"default" or "default-instruct" (unless a directory of that name exists here) -> the bundled model's
    directory; else unchanged. Raises CheckpointError when the bundled model is missing from this installation."""
    directory = BUNDLED.get(str(path_or_preset))
    if directory is not None and not Path(path_or_preset).exists():
        if not (directory / "config.json").is_file():
            raise CheckpointError(f"the bundled model {str(path_or_preset)!r} is missing ({directory}); reinstall "
                                  f"mixtral or pass a checkpoint directory or a preset")
        return directory
    return path_or_preset


def _neither(path: str | os.PathLike) -> CheckpointError:
    # The argument may have been meant as a path or as a preset: say both.
    return CheckpointError(f"{str(path)!r} is neither an existing checkpoint directory nor a preset "
                           f"(presets: {', '.join(PRESETS)})")


def load(path_or_preset: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device = "cpu", progress: bool = True, seed: int = 0,
         quantize: "str | dict | None" = None, offload: "str | int | None" = None,
         offload_policy: str = "lru+predict", offload_dir: str | os.PathLike | None = None) -> Transformer:
    """A model from a checkpoint directory (HF or Mistral-native layout, or a quantized one `mixtral quantize` or
    `mixtral.io.quantized.save_quantized` wrote), "default" (the trained model bundled with mixtral) or a preset.

    A preset gives a randomly initialised model (seeded with `seed`, float32 unless `dtype` says otherwise), drawn
    one matrix at a time into the model's memory (`random_quantized`).
    quantize: one precision for every part ("int8", "int4", "int3:g64", ...) or one per part ({"experts": "int3",
    "attention": "int8", "output": "int8"}; parts not named stay in `dtype`), as `mixtral.quant.quantize` takes,
    with its exact result. The float matrices are never all in memory: each is staged, quantized into place and
    freed, so the peak is the quantized model plus one float matrix (one expert's; a whole stack for the
    stacked-expert native layout of December 2023), plus float32 temporaries of 4 MB blocks of rows; a preset
    draws each matrix in float32 (`random_quantized`). A quantized checkpoint loads as it was saved.
    device: the model is read on the CPU a layer at a time and each layer moves there once complete
    (`mixtral.io.checkpoint.LayerMover`), so a model that fits the device but not the host still loads.

    offload: a memory budget ("12GB", "8GiB", bytes) for the model's weights: everything but the experts stays
    resident, the experts stay on disk in per-layer files and an engine (`mixtral.offload`) reads the ones routing
    asks for into expert slots that fill the rest of the budget (`offload_policy`: "none", "lru", "lru+predict"
    (prefetching the next layer's experts predicted before this layer's MoE update) or "lru+predict-after"). The
    files are those of a quantized checkpoint (`mixtral quantize`); any other model is first written as one,
    layer by layer, into `offload_dir` (default: a directory under ~/.cache/mixtral/offload named after the
    source and settings, reused while they are unchanged). The engine is `model.offload_engine` (statistics,
    `close()`). The KV cache and activations come on top of the budget. With a CUDA `device` the resident part
    and the slots are on the GPU and the budget is its memory for them; records come from disk through pinned host
    buffers, copied on a side stream (not yet measured on a GPU).
    Raises CheckpointError/ConfigError with the file, key or preset at fault; InputError for a bad `dtype`,
    `quantize` or `offload`, or a budget too small for the resident part plus one token's experts.
    """
    dtype = parse_dtype(dtype)
    path_or_preset = resolve_model(path_or_preset)
    if quantize is not None:
        quant.quantization_settings(quantize)  # a bad spec fails before anything is read
    if offload is not None:
        return _load_offloaded(path_or_preset, parse_size(offload, "offload"), dtype=dtype, device=device,
                               progress=progress, seed=seed, quantize=quantize, policy=offload_policy,
                               directory=offload_dir)
    path, saved = Path(path_or_preset), None
    if is_preset(path_or_preset) and quantize is not None:
        model = random_quantized(from_name(path_or_preset), quantize, seed, dtype or torch.float32, device=device)
    elif is_preset(path_or_preset):  # drawn matrix by matrix: never a float32 copy of the whole model
        model = random_quantized(from_name(path_or_preset), "none", seed, dtype or torch.float32, device=device)
    elif not path.exists():
        raise _neither(path)
    elif read_quantization_config(path) is not None:
        saved = check_saved(path, quantize)
        model = load_quantized(path, dtype=dtype, device=device)
    else:
        model = load_checkpoint(path, dtype=dtype, device=device, progress=progress, quantize=quantize)
    if quantize is not None and saved is None:
        kernels.prefer_huge_pages(model, collapse=True)  # the quantized weights were written as they were made
    return model


OFFLOAD_POLICIES = {"none": ("none", "before"), "lru": ("lru", "before"), "lru+predict": ("lru+predict", "before"),
                    "lru+predict-after": ("lru+predict", "after")}
OFFLOAD_CACHE = Path(os.environ.get("MIXTRAL_CACHE", Path.home() / ".cache" / "mixtral")) / "offload"


def _offload_source(path_or_preset, quantize, dtype, seed) -> str:
    """A name for the expert files of a model that is not a quantized checkpoint: the source (its weight files'
    names, sizes and times for a directory; the seed for a preset) and the settings, hashed."""
    if is_preset(path_or_preset):
        identity = [str(path_or_preset), seed]
    else:
        files = find_checkpoint(path_or_preset)
        identity = [str(files.directory.resolve())] + [(w.name, w.stat().st_size, w.stat().st_mtime_ns)
                                                        for w in files.weights]
    identity += [_spec_strings(quantize or {}), dtype_name(dtype) if dtype else None]
    digest = hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()[:16]
    return f"{Path(str(path_or_preset)).name}-{digest}"


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _load_offloaded(path_or_preset, budget: int, *, dtype, device, progress, seed, quantize, policy,
                    directory) -> Transformer:
    from mixtral import offload  # the engine sits beside io, and imports its expert files

    if policy not in OFFLOAD_POLICIES:
        raise InputError(f"unknown offloading policy {policy!r}; choose one of {', '.join(OFFLOAD_POLICIES)}")
    path = Path(str(path_or_preset))
    if not is_preset(path_or_preset) and not path.exists():
        raise _neither(path)
    if not is_preset(path_or_preset) and read_quantization_config(path) is not None:
        check_saved(path, quantize)
        checkpoint = path
    else:
        checkpoint = Path(directory) if directory else OFFLOAD_CACHE / _offload_source(path_or_preset, quantize,
                                                                                       dtype, seed)
        if read_quantization_config(checkpoint) is None:
            log.info("writing the expert files of %s to %s (once)", path_or_preset, checkpoint)
            quantize_checkpoint(path_or_preset, checkpoint, quantize or {}, dtype=dtype, seed=seed,
                                progress=progress)
    model = load_quantized(checkpoint, dtype=dtype, experts=False, device=device)
    _drop_cached_pages(checkpoint)
    resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t is not None)
    files = open_expert_files(checkpoint, model.config)
    try:
        record = max(f.record_bytes for f in files)
        needed = resident + model.config.top_k * record
        if budget < needed:
            raise InputError(f"a memory budget of {_size(budget)} is too small for {path_or_preset}: its resident "
                             f"part (attention, routers, norms, embeddings) takes {_size(resident)} and one token's "
                             f"{model.config.top_k} experts {_size(model.config.top_k * record)} more; give at least "
                             f"{_size(needed)}, or quantize more")
        policy_name, predict = OFFLOAD_POLICIES[policy]
        model.offload_engine = offload.attach(model, files, budget - resident, policy=policy_name, predict=predict)
    except BaseException:
        for f in files:
            f.close()
        raise
    return model.eval()


def _drop_cached_pages(checkpoint: Path) -> None:
    """Ask Linux to drop the page cache of the resident part's files once they are read: under a memory budget,
    the copy in the model is the one to keep (a cgroup limit counts the page cache too)."""
    if not hasattr(os, "posix_fadvise"):  # not on macOS
        return
    for file in checkpoint.glob("*.safetensors"):
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def check_saved(path: Path, quantize: "str | dict | None") -> dict[str, str | None]:
    """The precisions a quantized checkpoint was saved with; InputError when `quantize` asks for others."""
    saved = saved_settings(path)
    if quantize is not None and _spec_strings(quantize) != saved:
        raise InputError(f"{path} is already quantized ({quant.describe(saved)}); it cannot be quantized to "
                         f"{quant.describe(_spec_strings(quantize))} (load the unquantized checkpoint instead)")
    return saved


def _spec_strings(quantize: "str | dict") -> dict[str, str | None]:
    return quant.spec_strings(quant.quantization_settings(quantize))


def random_quantized(config: ModelConfig, quantize: "str | dict", seed: int = 0, dtype: torch.dtype = torch.float32,
                     *, experts_sink=None, progress: bool = False, device: str | torch.device = "cpu") -> Transformer:
    """What `Transformer(config).init_weights(seed).to(dtype)` then `quant.quantize(model, quantize)` gives (equal
    tensor for tensor), in eval mode, without the float model: each quantized matrix is drawn in float32 one at a
    time (one expert of a stack; the draws of consecutive experts are the draws of the stack), converted to `dtype`,
    quantized into its slot and freed. Peak memory: the quantized model plus one float32 matrix (the largest plain
    tensor, the embeddings, is drawn in float32 too).

    experts_sink(layer, w13, w2): as `mixtral.io.checkpoint.load_checkpoint`'s: the model is made without its
    experts, and each layer's (drawn the same way) are handed to the sink and freed; a full-size random model is
    then written to disk at the memory of one layer's experts. device: each layer moves there once drawn
    (`LayerMover`), so the host holds one layer at a time. Raises InputError for an unknown `quantize`."""
    on_meta = drop_experts if experts_sink is not None else None
    model = quant.empty_quantized_model(config, dtype, quantize, on_meta=on_meta)
    experts_precision = quant.quantization_settings(quantize)["experts"]
    params = {name for name, _ in model.named_parameters()}  # names: a moved layer's Parameters may be new objects
    quantized = quant.quantized_modules(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        order = list(Transformer(config).named_parameters())  # the float model's, which init_weights follows
    stacks: dict[str, object] = {}
    to_device = LayerMover(model, [name for name, _ in order], device)  # (with experts_sink: the CPU)
    with torch.no_grad():
        for name, meta in tqdm(order, desc="random weights", unit="tensor", disable=not progress, leave=False):
            if name in params and model.get_parameter(name).dim() == 3:  # an unquantized expert stack: by expert
                _draw_into(model.get_parameter(name), name, meta, generator, dtype)
            elif name in params:
                model.get_parameter(name).copy_(init_parameter_(name, torch.empty(meta.shape), generator))
            if name in params:
                to_device.done(name)
                continue
            if experts_sink is not None and name.endswith((".moe.w13", ".moe.w2")):
                if not stacks:
                    stacks = dict(zip(("w13", "w2"), quant.empty_experts(config, dtype, experts_precision)))
                _draw_into(stacks[name.rsplit(".", 1)[1]], name, meta, generator, dtype)
                if name.endswith(".w2"):  # the last of the layer's parameters
                    experts_sink(int(name.split(".")[1]), stacks["w13"], stacks["w2"])
                    stacks = {}
                continue
            module = quantized[name] if name in quantized else quantized[name.rsplit(".", 1)[0]]
            _draw_into(module, name, meta, generator, dtype)
            to_device.done(name)
        if config.tie_embeddings and "output" in quantized:
            quant.quantize_into(quantized["output"], None, model.tok_embeddings.weight)
        for module in quantized.values():
            module.refresh()
    return model.to(device).eval()


def _draw_into(target, name: str, meta: torch.Tensor, generator: torch.Generator, dtype: torch.dtype) -> None:
    """Draw the parameter `name` (shape of `meta`) one matrix at a time into `target`: a quantized module
    (quantized into its slots, then refreshed) or a float tensor."""
    if isinstance(target, torch.Tensor):
        for i in range(len(target)):
            target[i].copy_(init_parameter_(name, torch.empty(meta.shape[-2:]), generator))
        return
    slots = range(len(target)) if isinstance(target, quant.QuantizedExperts) else [None]
    for slot in slots:
        matrix = init_parameter_(name, torch.empty(meta.shape[-2:]), generator)
        quant.quantize_into(target, slot, matrix.to(dtype))
    target.refresh()


def quantize_checkpoint(source: str | os.PathLike, out: str | os.PathLike, quantize: "str | dict", *,
                        dtype: str | torch.dtype | None = None, seed: int = 0, progress: bool = True) -> Path:
    """Write a quantized checkpoint (format 2, `mixtral.io.quantized`) of `source`, a float checkpoint directory,
    "default" or a preset (random weights drawn with `seed`), layer by layer: each layer's experts are read (or
    drawn), quantized, written to their file and freed before the next layer's are read, and the rest of the model
    (attention, router, norms, embeddings: a few GB for Mixtral-8x7B) is written at the end. The peak is that rest
    plus one layer's experts, so a 93 GB checkpoint quantizes on a 24 GB machine. `out` appears whole or not at
    all (written in a temporary directory beside it, then renamed; an existing `out` is replaced).
    quantize: as `load`'s. dtype: of the unquantized tensors (default: the checkpoint's; float32 for a preset).
    Returns `out`. Raises what `load` raises."""
    dtype = parse_dtype(dtype)
    source = resolve_model(source)
    quant.quantization_settings(quantize)
    if not is_preset(source):
        if not Path(source).exists():
            raise _neither(source)
        if read_quantization_config(source) is not None:
            raise InputError(f"{source} is already quantized; quantize the float checkpoint it was made from")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out) as tmp:
        (tmp / EXPERTS_DIR).mkdir()
        config = from_name(source) if is_preset(source) else find_checkpoint(source).config
        bar = tqdm(total=config.n_layers, desc=f"quantizing {Path(str(source)).name}", unit="layer",
                   disable=not progress)

        def write(layer: int, w13, w2) -> None:
            write_layer_experts(experts_path(tmp, layer), w13, w2, layer=layer)
            bar.update()

        with bar:
            if is_preset(source):
                model = random_quantized(config, quantize, seed, dtype or torch.float32, experts_sink=write)
            else:
                model = load_checkpoint(source, dtype=dtype, progress=False, quantize=quantize, experts_sink=write)
        write_resident_part(model, tmp)
    return out


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


def random_weights_note(preset: str) -> str:
    """What the commands tell a user who runs a preset."""
    return (f"{preset!r} is a preset with random weights, so the output is noise; leave out --model for the trained "
            f"default model, or pass a checkpoint directory")


def load_model_and_tokenizer(model: str, *, tokenizer: str | None = None, dtype: str | torch.dtype | None = None,
                             quantize: "str | dict | None" = None, progress: bool = True,
                             max_memory: "str | int | None" = None, offload_policy: str = "lru+predict",
                             offload_dir: str | os.PathLike | None = None) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) for a checkpoint directory, "default" or a preset, and an optional tokenizer. The other
    arguments are `load`'s (`max_memory` its `offload`).

    The tokenizer is resolved first (`resolve_tokenizer`), so a missing one fails before minutes of loading. The
    notes for the user (the `NOTES_LOGGER` records) are logged once the model has loaded, so that an error stays
    the first thing reported. Raises CheckpointError, ConfigError, TokenizerError or InputError naming what is at
    fault.
    """
    config, files = inspect_model(model)
    tok, tokenizer_note = resolve_tokenizer(tokenizer, model, config, files)
    start = time.perf_counter()
    loaded = load(model, dtype=dtype, progress=progress, quantize=quantize, offload=max_memory,
                  offload_policy=offload_policy, offload_dir=offload_dir)
    log.info("loaded %s (%s) in %.1f s", model, dtype_name(loaded.tok_embeddings.weight.dtype),
             time.perf_counter() - start)
    if files is None:
        notes.warning(random_weights_note(model))
    if tokenizer_note:
        notes.warning(tokenizer_note)
    return loaded, tok

"""`mixtral.load` and `mixtral.load_tokenizer`: a checkpoint directory or a preset name, whichever was given."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from mixtral import kernels, quant
from mixtral.config import PRESETS, from_name
from mixtral.errors import CheckpointError, InputError
from mixtral.io.checkpoint import load_checkpoint
from mixtral.model import Transformer

log = logging.getLogger("mixtral")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name such as "bf16"; None stays None (keep the checkpoint's dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# The small Mixtral this project trained and ships (scripts/export_default_model.py writes it; its README.md is
# the model card). The name "default" means this directory wherever a model path or preset is taken.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "default"


def resolve_model(path_or_preset: str | os.PathLike) -> str | os.PathLike:
    """"default" (unless a directory of that name exists here) -> the bundled model's directory; else unchanged.
    Raises CheckpointError when the bundled model is missing from this installation."""
    if str(path_or_preset) == "default" and not Path("default").exists():
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise CheckpointError(f"the bundled default model is missing ({DEFAULT_MODEL_DIR}); reinstall mixtral "
                                  f"or pass a checkpoint directory or a preset")
        return DEFAULT_MODEL_DIR
    return path_or_preset


def load(path_or_preset: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device = "cpu", progress: bool = True, seed: int = 0,
         quantize: str | None = None) -> Transformer:
    """A model from a checkpoint directory (HF or Mistral-native layout, or one `mixtral.quant.save_quantized`
    wrote), "default" (the trained model bundled with mixtral) or a preset name.

    A preset gives a randomly initialised model (seeded with `seed`, float32 unless `dtype` says otherwise).
    quantize: "int8" or "int4" quantizes the weights after loading (`mixtral.quant.quantize`, default settings;
    peak memory: the unquantized model plus one quantized layer). A quantized checkpoint loads as it was saved.
    Raises CheckpointError/ConfigError with the file, key or preset at fault; InputError for a bad `quantize`.
    """
    dtype = parse_dtype(dtype)
    path_or_preset = resolve_model(path_or_preset)
    if quantize is not None and quantize not in quant.MODES:
        raise InputError(f"unknown quantization mode {quantize!r}; choose one of {', '.join(quant.MODES)}")
    path, saved = Path(path_or_preset), None
    if isinstance(path_or_preset, str) and path_or_preset in PRESETS and not path.exists():
        model = Transformer(from_name(path_or_preset)).init_weights(seed)
        model = model.to(device=device, dtype=dtype or torch.float32).eval()
    elif not path.exists():
        raise CheckpointError(f"{str(path)!r} is neither an existing checkpoint directory nor a preset "
                              f"(presets: {', '.join(PRESETS)})")
    elif (saved := quant.read_quantization_config(path)) is not None:
        if quantize is not None and quantize != saved.get("mode"):
            raise InputError(f"{path} is already quantized to {saved.get('mode')}; it cannot be quantized to "
                             f"{quantize} (load the unquantized checkpoint instead)")
        model = quant.load_quantized(path, dtype=dtype, device=device)
    else:
        model = load_checkpoint(path, dtype=dtype, device=device, progress=progress)
    if quantize is not None and saved is None:
        model = quant.quantize(model, quantize)
        kernels.prefer_huge_pages(model, collapse=True)  # the quantized weights were written as they were made
    return model


def load_tokenizer(path_or_preset: str | os.PathLike | None = None):
    """The tokenizer of a checkpoint directory ("default": the bundled model's), a tokenizer file, or (None / a
    preset name) the Mixtral tokenizer shipped with mistral-common. See `mixtral.io.tokenizer`."""
    from mixtral.io.tokenizer import load_tokenizer as _load_tokenizer

    if path_or_preset is not None:
        path_or_preset = resolve_model(path_or_preset)
    return _load_tokenizer(path_or_preset)

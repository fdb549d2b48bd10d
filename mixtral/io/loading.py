"""`mixtral.load` and `mixtral.load_tokenizer`: a checkpoint directory or a preset name, whichever was given."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

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


def load(path_or_preset: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device = "cpu", progress: bool = True, seed: int = 0) -> Transformer:
    """A model from a checkpoint directory (HF or Mistral-native layout) or a preset name.

    A preset gives a randomly initialised model (seeded with `seed`, float32 unless `dtype` says otherwise).
    Raises CheckpointError/ConfigError with the file, key or preset at fault.
    """
    dtype = parse_dtype(dtype)
    path = Path(path_or_preset)
    if isinstance(path_or_preset, str) and path_or_preset in PRESETS and not path.exists():
        model = Transformer(from_name(path_or_preset)).init_weights(seed)
        return model.to(device=device, dtype=dtype or torch.float32).eval()
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} is neither an existing checkpoint directory nor a preset "
                              f"(presets: {', '.join(PRESETS)})")
    return load_checkpoint(path, dtype=dtype, device=device, progress=progress)


def load_tokenizer(path_or_preset: str | os.PathLike | None = None):
    """The tokenizer of a checkpoint directory, a tokenizer file, or (None / a preset name) the Mixtral tokenizer
    shipped with mistral-common. See `mixtral.io.tokenizer`."""
    from mixtral.io.tokenizer import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path_or_preset)

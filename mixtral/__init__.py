"""mixtral: Mixtral of Experts (arXiv 2401.04088) in plain PyTorch.

Public contract:
    mixtral.load(path_or_preset, *, dtype=None, device="cpu", quantize=None) -> torch.nn.Module
        (quantize: "int8" | "int4", weight-only; see mixtral.quant)
    model(input_ids [B, T]) -> logits [B, T, vocab]
    mixtral.generate(model, prompts, max_new_tokens, temperature=0.0, ...) -> new token ids per prompt
        (batch_invariant=True: each row's tokens and logits bitwise those it gets alone; see mixtral.batch_invariant)
    mixtral.load_tokenizer(path_or_preset)
"""
from __future__ import annotations

from mixtral.config import PRESETS, ModelConfig, from_name
from mixtral.errors import (CheckpointError, ConfigError, ContextLengthError, InputError, MixtralError,
                            TokenizerError)
from mixtral.generate import complete, generate, stream, stream_text
from mixtral.io.loading import load, load_tokenizer
from mixtral.model import Transformer

__all__ = ["load", "load_tokenizer", "generate", "stream", "stream_text", "complete", "Transformer", "ModelConfig",
           "PRESETS", "from_name", "MixtralError", "ConfigError", "CheckpointError", "TokenizerError",
           "ContextLengthError", "InputError"]

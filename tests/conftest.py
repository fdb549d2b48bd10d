"""Shared fixtures: small random checkpoints written by transformers, the parity oracle."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")


def hf_mixtral(seed: int = 0, **overrides):
    """A random-init transformers MixtralForCausalLM (float32, eval mode) with small defaults."""
    kwargs = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                  sliding_window=None)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**kwargs)).eval()
    _spread_norms(model)
    return model


def hf_mistral(seed: int = 0, **overrides):
    """A random-init transformers MistralForCausalLM (dense) with small defaults."""
    kwargs = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, sliding_window=None)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**kwargs)).eval()
    _spread_norms(model)
    return model


def _spread_norms(model) -> None:
    # Norm weights start at exactly 1; random values make a wrong norm/key mapping visible in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """(directory, transformers model) of a small Mixtral saved with save_pretrained."""
    model = hf_mixtral()
    path = tmp_path_factory.mktemp("hf_mixtral")
    model.save_pretrained(path)
    return path, model

"""Shared fixtures: small random checkpoints written by transformers, the parity oracle, and the summary of what
this machine could not test.

transformers is a test dependency, imported only by the tests that use it (through these helpers or their own
`pytest.importorskip`), so every other test runs without it.
"""
from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch


def hf_mixtral(seed: int = 0, **overrides):
    """A random-init transformers MixtralForCausalLM (float32, eval mode) with small defaults."""
    transformers = pytest.importorskip("transformers")
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
    transformers = pytest.importorskip("transformers")
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


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def token_ids(batch: int = 2, seq: int = 24, vocab: int = 32000) -> torch.Tensor:
    """A fixed batch of random token ids [batch, seq]."""
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def float_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).float()


# ---- what this machine tested --------------------------------------------------------------------------------
# The kernels' fast paths depend on the CPU (AVX512-BF16 for the GEMVs, AMX for the expert tiles), and machines
# differ from run to run, so the end of every run says which CPU it was and which tests it could not run here.

def _cpu() -> tuple[str, list[str]]:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return model, [f for f in ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]


def pytest_terminal_summary(terminalreporter) -> None:
    model, features = _cpu()
    skipped = terminalreporter.stats.get("skipped", [])
    terminalreporter.section("hardware")
    terminalreporter.write_line(f"CPU: {model}; features: {', '.join(features) or 'none of AVX512/AMX'}")
    hardware = [r for r in skipped if any(word in str(r.longrepr).lower()
                                          for word in ("amx", "avx512", "cpu", "huge page", "kernel"))]
    terminalreporter.write_line(f"{len(hardware)} test(s) skipped for want of hardware here"
                                + (" (see the skip reasons above)" if hardware else ""))

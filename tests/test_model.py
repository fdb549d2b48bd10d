"""Parity with transformers' Mixtral and Mistral: logits (both MoE dispatches), greedy continuations, bf16."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import mixtral
from mixtral.config import PRESETS
from mixtral.model import document_positions, random_model

from conftest import hf_mistral, hf_mixtral

MIXTRAL_CASES = {
    "4x2-gqa2": dict(),
    "8x1-mha": dict(num_local_experts=8, num_experts_per_tok=1, num_key_value_heads=4),
    "3x3-mqa": dict(num_local_experts=3, num_experts_per_tok=3, num_key_value_heads=1),
    "8x2-window": dict(num_local_experts=8, num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=2,
                       sliding_window=7),
    "head-dim-16": dict(head_dim=16, num_attention_heads=4, num_key_value_heads=2),
}


def _load_saved(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    return mixtral.load(tmp_path, progress=False)


@pytest.mark.parametrize("case", MIXTRAL_CASES)
def test_mixtral_logits_match_transformers(case, tmp_path):
    hf = hf_mixtral(seed=1, **MIXTRAL_CASES[case])
    ours = _load_saved(hf, tmp_path)
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(0))  # longer than the window
    with torch.no_grad():
        expected = hf(ids).logits
        for dispatch in ("grouped", "reference"):
            for layer in ours.layers:
                layer.moe.dispatch = dispatch
            got = ours(ids)
            assert got.shape == expected.shape
            assert (got - expected).abs().max().item() <= 1e-4, dispatch


@pytest.mark.parametrize("window", [None, 6])
def test_mistral_dense_logits_match_transformers(window, tmp_path):
    hf = hf_mistral(seed=2, sliding_window=window)
    ours = _load_saved(hf, tmp_path)
    assert not ours.config.is_moe and ours.layers[0].moe.router is None
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def _hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("make,kwargs", [(hf_mixtral, dict(sliding_window=None)),
                                         (hf_mixtral, dict(sliding_window=8)),
                                         (hf_mistral, dict(sliding_window=8))],
                         ids=["mixtral", "mixtral-window", "mistral-window"])
def test_greedy_batch_of_different_lengths_matches_transformers(make, kwargs, tmp_path):
    hf = make(seed=3, **kwargs)
    ours = _load_saved(hf, tmp_path)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (1, 5, 13, 20)]
    batched = mixtral.generate(ours, prompts, 32, eos_id=None, prefill_chunk=6)
    for prompt, got in zip(prompts, batched):
        assert got == _hf_greedy(hf, prompt, 32)


def test_bf16_close_to_transformers(tmp_path):
    hf = hf_mixtral(seed=4)
    hf.save_pretrained(tmp_path)
    ours = mixtral.load(tmp_path, dtype="bf16", progress=False)
    assert ours.output.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.to(torch.bfloat16)(ids).logits.float()
        got = ours(ids).float()
    assert (got - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_preset_gives_seeded_random_model():
    a, b = mixtral.load("tiny"), mixtral.load("tiny")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
        assert a(ids).shape == (1, 3, 32000)


@pytest.mark.parametrize("window", [None, 3])
def test_packed_documents_give_each_documents_own_logits(window):
    config = dataclasses.replace(PRESETS["tiny"], n_layers=2, sliding_window=window)
    model = random_model(config, seed=5)
    docs = [torch.tensor([1, 5, 9, 200]), torch.tensor([7, 3]), torch.tensor([2, 8, 8, 3, 90])]
    packed = torch.cat(docs)[None]
    documents = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    assert document_positions(documents).tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4]]
    got = model(packed, documents=documents)[0]
    want = torch.cat([model(d[None])[0] for d in docs])
    assert torch.allclose(got, want, atol=1e-5)

"""Parity with transformers' Mixtral and Mistral: logits, greedy continuations, both MoE dispatches."""
from __future__ import annotations

import pytest
import torch

import mixtral
from mixtral import kernels
from mixtral.moe import moe_grouped, moe_reference, route

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


def test_dispatches_agree_on_uneven_routing():
    # Many tokens, some experts empty: grouped must equal the reference exactly up to float32 rounding.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, generator=g)
    w13, w2 = torch.randn(6, 40, 16, generator=g), torch.randn(6, 16, 20, generator=g)
    logits = torch.randn(50, 6, generator=g)
    logits[:, 4:] -= 100  # experts 4 and 5 receive no tokens
    weights, experts = route(logits, 2)
    assert not (experts >= 4).any()
    torch.testing.assert_close(moe_grouped(x, w13, w2, weights, experts), moe_reference(x, w13, w2, weights, experts))


@pytest.mark.parametrize("amx", [False, True])
def test_bf16_inference_dispatch_equals_float32_reference(amx, monkeypatch):
    # bf16 weights, no autograd, enough rows per expert for the GEMM paths: with AMX they compute (W xᵀ)ᵀ
    # (`moe.swiglu`), forced here on any CPU; both must stay within bf16 rounding of float32.
    monkeypatch.setattr(kernels, "AMX", amx)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 32, generator=g)
    w13, w2 = torch.randn(4, 48, 32, generator=g) * 0.2, torch.randn(4, 32, 24, generator=g) * 0.2
    weights, experts = route(torch.randn(64, 4, generator=g), 2)
    want = moe_reference(x, w13, w2, weights, experts)
    with torch.no_grad():
        got = moe_grouped(x.bfloat16(), w13.bfloat16(), w2.bfloat16(), weights, experts)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.parametrize("amx_kernel", [False, True])
def test_bf16_experts_through_the_amx_kernel_equal_float32_reference(amx_kernel, monkeypatch):
    # Shapes amx.c takes (dim, hidden multiples of 32), two experts with enough rows for it, one without and one
    # with none; without the kernel all run through torch's GEMM. Both within bf16 rounding of float32, and the
    # kernel really runs for exactly the two.
    if amx_kernel and not kernels.amx_available():
        pytest.skip("the kernels are not built for AMX here")
    threshold, calls = kernels.AMX_EXPERT_ROWS, []
    original = kernels.amx_swiglu_add
    monkeypatch.setattr(kernels, "amx_swiglu_add", lambda *a: calls.append(len(a[2])) or original(*a))
    if not amx_kernel:
        monkeypatch.setattr(kernels, "AMX_EXPERT_ROWS", 10**9)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(128, 64, generator=g)
    w13, w2 = torch.randn(4, 192, 64, generator=g) * 0.2, torch.randn(4, 64, 96, generator=g) * 0.2
    logits = torch.randn(128, 4, generator=g)
    logits[:, 3] -= 100  # expert 3 gets no tokens
    logits[:, 2] -= 2.5  # expert 2 too few for amx.c: it goes to torch's GEMM in the same call
    weights, experts = route(logits, 2)
    counts = torch.bincount(experts.reshape(-1), minlength=4).tolist()
    assert 0 < counts[2] < threshold <= min(counts[:2]) and counts[3] == 0
    want = moe_reference(x, w13, w2, weights, experts)
    with torch.no_grad():
        got = moe_grouped(x.bfloat16(), w13.bfloat16(), w2.bfloat16(), weights, experts)
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2
    assert sorted(calls) == (sorted(counts[:2]) if amx_kernel else [])


def test_route_is_softmax_over_top_k():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    weights, experts = route(logits, 2)
    assert experts.tolist() == [[1, 2]]
    torch.testing.assert_close(weights, torch.softmax(torch.tensor([[3.0, 2.0]]), -1))


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


@pytest.mark.parametrize("routing", ["random", "one-expert", "some-empty"])
def test_grouped_equals_reference_forward_and_backward(routing):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(33, 16, generator=g)
    w13 = torch.randn(5, 24, 16, generator=g) * 0.3
    w2 = torch.randn(5, 16, 12, generator=g) * 0.3
    logits = torch.randn(33, 5, generator=g)
    if routing == "one-expert":
        logits[:, 2] += 100  # every token's first choice is expert 2
    elif routing == "some-empty":
        logits[:, :2] -= 100
    weights, experts = route(logits, 2)
    grads = []
    for dispatch in (moe_reference, moe_grouped):
        params = [t.clone().requires_grad_() for t in (x, w13, w2, weights)]
        out = dispatch(params[0], params[1], params[2], params[3], experts)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([out.detach()] + [p.grad for p in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)

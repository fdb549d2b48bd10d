"""mixtral.moe: routing, the reference and grouped dispatches against each other and float32 (forward and
backward), and the inference dispatch through the CPU backend's paths: torch's GEMM, (W xᵀ)ᵀ on AMX, amx.c for
bf16 and quantized experts. (Capacity, jitter and the training losses: test_train_losses.py.)"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mixtral import kernels, quant
from mixtral.moe import MoE, moe_grouped, moe_reference, route

needs_amx = pytest.mark.skipif(not kernels.amx_available(), reason="needs AMX (Intel Xeon since Sapphire Rapids) "
                               "and amx.c built for it; this CPU has none, or the build lacks it")


def test_route_is_softmax_over_top_k():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    weights, experts = route(logits, 2)
    assert experts.tolist() == [[1, 2]]
    torch.testing.assert_close(weights, torch.softmax(torch.tensor([[3.0, 2.0]]), -1))


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
def test_bf16_inference_dispatch_equals_float32_reference(amx):
    # bf16 weights, no autograd, enough rows per expert for the GEMM paths: with AMX they compute (W xᵀ)ᵀ
    # (`kernels.transposed_swiglu`), forced here on any CPU; both must stay within bf16 rounding of float32.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 32, generator=g)
    w13, w2 = torch.randn(4, 48, 32, generator=g) * 0.2, torch.randn(4, 32, 24, generator=g) * 0.2
    weights, experts = route(torch.randn(64, 4, generator=g), 2)
    want = moe_reference(x, w13, w2, weights, experts)
    with torch.no_grad(), kernels.use_policy(kernels.policy().with_features(amx=amx)):
        got = moe_grouped(x.bfloat16(), w13.bfloat16(), w2.bfloat16(), weights, experts)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.parametrize("amx_kernel", [False, pytest.param(True, marks=needs_amx)])
def test_bf16_experts_through_the_amx_kernel_equal_float32_reference(amx_kernel, monkeypatch):
    # Shapes amx.c takes (dim, hidden multiples of 32), two experts with enough rows for it, one without and one
    # with none; without the kernel all run through torch's GEMM. Both within bf16 rounding of float32, and the
    # kernel really runs for exactly the two.
    machine = kernels.policy()
    threshold, calls = machine.amx_expert_rows, []
    original = kernels.amx.amx_swiglu_add
    monkeypatch.setattr(kernels.amx, "amx_swiglu_add", lambda *a: calls.append(len(a[2])) or original(*a))
    policy = machine if amx_kernel else dataclasses.replace(machine, amx_expert_rows=10**9)
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
    with torch.no_grad(), kernels.use_policy(policy):
        got = moe_grouped(x.bfloat16(), w13.bfloat16(), w2.bfloat16(), weights, experts)
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2
    assert sorted(calls) == (sorted(counts[:2]) if amx_kernel else [])


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_inference_dispatch_without_any_kernel_equals_float32(mode):
    # A CPU without the C kernels, AVX512-BF16 or AMX: every expert through torch (quantized ones dequantized).
    g = torch.Generator().manual_seed(8)
    layer = MoE(64, 96, 4, 2)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    layer = layer.to(torch.bfloat16)
    if mode != "bf16":
        quant.quantize(layer, mode, group_size=32)
    x = torch.randn(40, 64, generator=g).bfloat16()
    with torch.no_grad():
        weights, experts = route(layer.router_logits(x), 2)
        w13 = torch.stack([_float32(layer.w13, e) for e in range(4)])
        w2 = torch.stack([_float32(layer.w2, e) for e in range(4)])
        want = moe_reference(x.float(), w13, w2, weights, experts)
        with kernels.use_policy(kernels.CpuPolicy.for_cpu()):
            for dispatch in (moe_grouped, moe_reference):
                got = dispatch(x, layer.w13, layer.w2, weights, experts)
                assert ((got.float() - want).norm() / want.norm()).item() < 1e-2


def _float32(stack, e: int) -> torch.Tensor:
    return stack[e].float() if isinstance(stack, torch.Tensor) else stack[e].dequantize(torch.float32)


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


@needs_amx
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_experts_on_amx_equal_their_dequantized_weights(mode, monkeypatch):
    # From amx_int8_expert_rows / amx_int4_expert_rows rows a quantized expert runs on amx.c, which expands its
    # rows a block at a time. The result must be the expert of the dequantized weights, within bf16 rounding,
    # and the kernel must really run, on the quantized weights themselves.
    g = torch.Generator().manual_seed(11)
    layer = MoE(128, 384, 4, 2).to(torch.bfloat16)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    quant.quantize(layer, mode, group_size=128)
    x = torch.randn(96, 128, generator=g).bfloat16()
    calls = []
    original = kernels.amx.amx_swiglu_add
    monkeypatch.setattr(kernels.amx, "amx_swiglu_add",
                        lambda *a: calls.append(getattr(a[-1], "mode", None)) or original(*a))
    with torch.no_grad():
        weights, experts = route(layer.router_logits(x), 2)
        got = moe_grouped(x, layer.w13, layer.w2, weights, experts)
        w13 = torch.stack([layer.w13[e].dequantize(torch.float32) for e in range(4)])
        w2 = torch.stack([layer.w2[e].dequantize(torch.float32) for e in range(4)])
        want = moe_reference(x.float(), w13, w2, weights, experts)
    assert calls and all(called == mode for called in calls)
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2

"""LoRA adapters (mixtral.finetune.lora): B = 0 is the base model; only adapters train; merged == unmerged logits;
the expert adapters run through the same assignments as the grouped dispatch; QLoRA over quantized bases keeps no
float copy and gives the dequantized model's gradients; adapters save and load on their own, and bad files are
named."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mixtral import kernels, quant
from mixtral.config import PRESETS
from mixtral.errors import CheckpointError, InputError
from mixtral.finetune import lora
from mixtral.model import random_model

CONFIG = dataclasses.replace(PRESETS["tiny"], n_layers=2, n_experts=4, top_k=2)
IDS = torch.tensor([[1, 5, 9, 200, 31, 7], [2, 8, 8, 3, 90, 4]])


def _model(seed=0):
    model = random_model(CONFIG, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # spread-out routers: tokens reach every expert
        for layer in model.layers:
            layer.moe.router.weight.normal_(0, 0.5, generator=g)
    return model


def _trained(model, steps=1, seed=1):
    """Give every B (and A) non-zero values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_zero_b_is_the_base_model_and_only_adapters_train():
    base = _model()
    want = base(IDS)
    tuned = lora.apply_lora(_model(), lora.LoRAConfig(rank=4))
    assert torch.allclose(tuned(IDS), want, atol=1e-5)
    names = set(lora.adapter_parameters(tuned))
    assert names and all(".lora" in n for n in names)
    assert {n.rsplit(".", 1)[1] for n in names} == {"lora_a", "lora_b", "a13", "b13", "a2", "b2"}
    tuned(IDS).sum().backward()
    for name, p in tuned.named_parameters():
        assert (p.grad is not None) == (name in names), name
    # with B = 0 only the Bs get a gradient
    assert all(p.grad.abs().sum() > 0 for n, p in tuned.named_parameters() if n.endswith(("lora_b", "b13", "b2")))
    with pytest.raises(InputError, match="already has LoRA"):
        lora.apply_lora(tuned)


def test_expert_adapters_equal_the_dense_delta_and_merge_exactly():
    model = _trained(lora.apply_lora(_model(), lora.LoRAConfig(rank=3, alpha=6)))
    got = model(IDS)
    # the oracle: the same model with W + scale·B A written into its weights by hand
    oracle = _model()
    with torch.no_grad():
        for mine, theirs in zip(model.layers, oracle.layers):
            for name in lora.ATTENTION:
                w = getattr(mine.attention, name)
                getattr(theirs.attention, name).weight += 2.0 * w.lora_b @ w.lora_a
            theirs.moe.w13 += 2.0 * torch.bmm(mine.moe.lora.b13, mine.moe.lora.a13)
            theirs.moe.w2 += 2.0 * torch.bmm(mine.moe.lora.b2, mine.moe.lora.a2)
    assert torch.allclose(got, oracle(IDS), atol=1e-4)
    merged = lora.merge_lora(model)
    assert merged.lora_config is None and all(layer.moe.lora is None for layer in merged.layers)
    assert torch.allclose(merged(IDS), got, atol=1e-4)
    assert set(merged.state_dict()) == set(_model().state_dict())  # a plain Transformer again


def test_router_trains_only_when_asked():
    model = lora.apply_lora(_model(), lora.LoRAConfig(train_router=True, attention=("wq",), experts=False))
    names = set(lora.adapter_parameters(model))
    assert {"layers.0.moe.router.weight", "layers.0.attention.wq.lora_a"} <= names
    assert not any("wk" in n or "a13" in n for n in names)


def test_qlora_gradients_equal_those_of_the_dequantized_float_model():
    quantized = quant.quantize(_model(), {"experts": "int4", "attention": "int8"})
    float_twin = _model()
    with torch.no_grad():  # the float model holding exactly the quantized weights
        for q, f in zip(quantized.layers, float_twin.layers):
            for name in lora.ATTENTION:
                getattr(f.attention, name).weight.copy_(getattr(q.attention, name).weight)
            for part in ("w13", "w2"):
                stack = getattr(q.moe, part)
                getattr(f.moe, part).copy_(torch.stack([stack[e].dequantize(torch.float32)
                                                        for e in range(len(stack))]))
    models = [_trained(lora.apply_lora(m, lora.LoRAConfig(rank=2))) for m in (quantized, float_twin)]
    losses = [m(IDS).square().mean() for m in models]
    for loss in losses:
        loss.backward()
    assert torch.allclose(losses[0], losses[1], rtol=1e-3)
    grads = [lora.adapter_parameters(m) for m in models]
    for name in grads[1]:
        assert torch.allclose(grads[0][name].grad, grads[1][name].grad, rtol=2e-2, atol=1e-5), name
    with pytest.raises(InputError, match="quantized: merge the adapters into the float model"):
        lora.merge_lora(models[0])


def test_frozen_linear_keeps_no_copy_of_a_quantized_weight():
    w = quant.quantize_linear(torch.nn.Linear(64, 32, bias=False), "int4")._weight()
    x = torch.randn(5, 64, requires_grad=True)
    y = lora.FrozenLinear.apply(x, w)
    saved = [t for t in y.grad_fn.saved_tensors] if hasattr(y.grad_fn, "saved_tensors") else []
    assert not saved  # nothing but the QuantizedWeight itself is kept
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones(5, 32) @ w.dequantize(torch.float32), atol=1e-5)


def test_adapters_save_and_load_on_their_own(tmp_path):
    model = _trained(lora.apply_lora(_model(), lora.LoRAConfig(rank=2, alpha=4, attention=("wq", "wv"))))
    want = model(IDS)
    lora.save_adapters(model, tmp_path / "adapters")
    again = lora.load_adapters(_model(), tmp_path / "adapters")
    assert again.lora_config == model.lora_config
    assert torch.equal(again(IDS), want)
    config = json.loads((tmp_path / "adapters" / lora.CONFIG_FILE).read_text())
    assert config["rank"] == 2 and config["base"]["n_experts"] == 4


def test_bad_adapter_files_are_named(tmp_path):
    model = lora.apply_lora(_model(), lora.LoRAConfig(rank=2))
    lora.save_adapters(model, tmp_path / "a")
    other = lora.apply_lora(_model(), lora.LoRAConfig(rank=3))
    lora.save_adapters(other, tmp_path / "b")
    # rank 3 tensors under a rank 2 config
    (tmp_path / "a" / lora.WEIGHTS_FILE).write_bytes((tmp_path / "b" / lora.WEIGHTS_FILE).read_bytes())
    fresh = _model()
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors: tensor .* has shape"):
        lora.load_adapters(fresh, tmp_path / "a")
    assert fresh.lora_config is None  # left as it was
    (tmp_path / "a" / lora.CONFIG_FILE).write_text('{"format": "mixtral-lora", "version": 1, "rank": 0}')
    with pytest.raises(CheckpointError, match="adapter_config.json: LoRA rank must be at least 1"):
        lora.load_adapters(_model(), tmp_path / "a")
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        lora.load_adapters(_model(), tmp_path / "missing")
    with pytest.raises(InputError, match="unknown attention projection 'wz'"):
        lora.LoRAConfig(attention=("wz",))


def test_a_dense_model_takes_expert_adapters_too():
    dense = dataclasses.replace(PRESETS["tiny-dense"], n_layers=1)
    base = random_model(dense, seed=3)
    tuned = lora.apply_lora(random_model(dense, seed=3), lora.LoRAConfig(rank=2))
    assert torch.allclose(tuned(IDS), base(IDS), atol=1e-5)
    _trained(tuned)
    got = tuned(IDS)
    assert torch.allclose(lora.merge_lora(tuned)(IDS), got, atol=1e-4) and not torch.allclose(got, base(IDS))


def test_adapters_off_is_the_base_model_for_dpos_reference():
    base = _model()
    tuned = _trained(lora.apply_lora(_model(), lora.LoRAConfig(rank=2)))
    on = tuned(IDS)
    with lora.adapters_off(tuned):
        assert torch.allclose(tuned(IDS), base(IDS), atol=1e-5)
    assert torch.equal(tuned(IDS), on) and not torch.allclose(on, base(IDS))


# ---- the fused paths against the reference ------------------------------------------------------------------------

# Quantized products dequantized in float32 on both sides: the machine's kernels (bf16 inside) are chosen by row
# count, and the fused path pads each expert's rows, so the two paths would otherwise take different kernels.
FLOAT32_PRODUCTS = dataclasses.replace(kernels.CpuPolicy.for_cpu(), int8_gemm_rows=0)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))


def _expert_case(base: str, seed: int = 0):
    """An MoE layer's ExpertLoRA with trained adapters over a float, int8 or int4 base, and a routing of 11 tokens
    that leaves expert 3 without any (experts 0-2 only)."""
    model = _model(seed)
    if base != "float":
        model = quant.quantize(model, {"experts": base})
    torch.manual_seed(seed)
    _trained(lora.apply_lora(model, lora.LoRAConfig(rank=3, alpha=6, attention=())))
    moe = model.layers[0].moe
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(11, CONFIG.dim, generator=g)
    experts = torch.stack([torch.randint(0, 3, (11,), generator=g), torch.full((11,), 3)], 1) % 3
    experts[:, 1] = (experts[:, 0] + 1) % 3  # two different experts of 0-2 per token
    gates = torch.softmax(torch.randn(11, 2, generator=g), -1)
    return moe, x, gates, experts


def _expert_run(moe, x, gates, experts, fused: bool, bf16: bool):
    moe.lora.fused = fused
    x, gates = x.clone().requires_grad_(True), gates.clone().requires_grad_(True)
    for p in moe.lora.parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = moe.lora(x, moe.w13, moe.w2, gates, experts, None)
    (y.float() * torch.linspace(-1, 1, y.shape[1])).sum().backward()
    grads = {name: p.grad.clone() for name, p in moe.lora.named_parameters()}
    return y, {"x": x.grad, "gates": gates.grad, **grads}


@pytest.mark.parametrize("base", ["float", "int8", "int4"])
def test_fused_expert_adapters_match_the_reference_and_their_gradients(base):
    moe, x, gates, experts = _expert_case(base)
    with kernels.use_policy(FLOAT32_PRODUCTS):
        fused = _expert_run(moe, x, gates, experts, fused=True, bf16=False)
        reference = _expert_run(moe, x, gates, experts, fused=False, bf16=False)
    assert torch.allclose(fused[0], reference[0], rtol=1e-5, atol=1e-6)
    for name, want in reference[1].items():
        assert torch.allclose(fused[1][name], want, rtol=1e-4, atol=1e-6), name
    # expert 3 got no tokens: zero gradients, present for every adapter
    assert all(fused[1][n][3].abs().max() == 0 for n in ("a13", "b13", "a2", "b2"))
    assert fused[1]["b13"][:3].abs().sum() > 0


@pytest.mark.parametrize("base", ["float", "int4"])
def test_fused_expert_adapters_under_bf16_autocast_stay_near_the_reference(base):
    moe, x, gates, experts = _expert_case(base)
    fused = _expert_run(moe, x, gates, experts, fused=True, bf16=True)
    reference = _expert_run(moe, x, gates, experts, fused=False, bf16=True)
    assert fused[0].dtype == reference[0].dtype
    assert _relative(fused[0], reference[0]) < 2e-2
    for name, want in reference[1].items():
        assert fused[1][name].dtype == want.dtype and _relative(fused[1][name], want) < 5e-2, name


@pytest.mark.parametrize("base", ["float", "int8"])
def test_fused_attention_adapters_match_the_reference(base):
    model = _model()
    if base != "float":
        model = quant.quantize(model, {"attention": base})
    torch.manual_seed(0)
    wq = _trained(lora.apply_lora(model, lora.LoRAConfig(rank=3, attention=("wq",), experts=False))).layers[0]
    wq = wq.attention.wq
    x = torch.randn(2, 5, CONFIG.dim)
    results = []
    with kernels.use_policy(FLOAT32_PRODUCTS):
        for fused in (True, False):
            wq.fused = fused
            xg = x.clone().requires_grad_(True)
            wq.lora_a.grad = wq.lora_b.grad = None
            y = wq(xg)
            (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
            results.append((y, xg.grad, wq.lora_a.grad.clone(), wq.lora_b.grad.clone()))
    for got, want in zip(*results):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_fused_model_gradients_equal_the_reference_model_and_reach_the_router():
    models = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = _trained(lora.apply_lora(_model(), lora.LoRAConfig(rank=2, train_router=True)))
        for m in model.modules():
            if isinstance(m, (lora.LoRALinear, lora.ExpertLoRA)):
                m.fused = fused
        model(IDS).square().mean().backward()
        models.append(lora.adapter_parameters(model))
    for name, p in models[1].items():
        assert torch.allclose(models[0][name].grad, p.grad, rtol=1e-4, atol=1e-7), name
    assert models[0]["layers.0.moe.router.weight"].grad.abs().sum() > 0


def test_dropout_runs_the_reference_path():
    torch.manual_seed(0)
    model = _trained(lora.apply_lora(_model(), lora.LoRAConfig(rank=2, dropout=0.5))).train()
    outs = []
    for fused in (True, False):
        for m in model.modules():
            if isinstance(m, (lora.LoRALinear, lora.ExpertLoRA)):
                m.fused = fused
        torch.manual_seed(5)
        outs.append(model(IDS))
    assert torch.equal(outs[0], outs[1])  # the same dropout masks: the same path
    model.eval()
    assert not torch.allclose(model(IDS), outs[0])  # and dropout acted in training


def test_adapters_off_without_gradients_runs_the_base_kernels():
    base = _model()
    tuned = _trained(lora.apply_lora(_model(), lora.LoRAConfig(rank=2)))
    with torch.no_grad(), lora.adapters_off(tuned):
        assert torch.allclose(tuned(IDS), base(IDS), atol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_weights_input_gradient_in_row_tiles_equals_the_whole_product(mode, monkeypatch):
    model = quant.quantize(_model(), {"experts": mode})
    w = model.layers[0].moe.w13[1]  # expert 1's QuantizedWeight
    assert isinstance(w, kernels.QuantizedWeight)
    dy = torch.randn(5, w.out_features, generator=torch.Generator().manual_seed(0))
    want = dy @ w.dequantize(torch.float32)
    monkeypatch.setattr(lora, "EXPANSION_ROWS", 7)  # several tiles and a short last one
    got = lora._times_weight(dy, w, torch.float32)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_remove_adapters_gives_the_base_model_back():
    base = _model()
    tuned = _trained(lora.apply_lora(_model(), lora.LoRAConfig(rank=2)))
    assert not torch.allclose(tuned(IDS), base(IDS))
    lora.remove_adapters(tuned)
    assert torch.allclose(tuned(IDS), base(IDS), atol=1e-6) and not lora.adapter_parameters(tuned)

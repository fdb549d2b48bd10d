"""mixtral.quant: kernels against the dequantized weights, quantization error, the router left alone, dispatch parity,
model-level error, the checkpoint round trip, errors, and `generate --quantize`."""
from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import mixtral
from mixtral import kernels, quant
from mixtral.cli import main
from mixtral.config import PRESETS
from mixtral.errors import CheckpointError, InputError
from mixtral.generate import complete
from mixtral.io.tokenizer import load_tokenizer
from mixtral.moe import MoE
from mixtral.model import Transformer

MODES = ["int8", "int4"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _linear(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.nn.Linear:
    linear = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02)
    return linear.to(dtype)


def _ids(batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(ids).float()


# ---- one matrix ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# 64: one int4 group; 688 (the default model's expert width) and 40 fill no whole group: padded to 768 and 64.
@pytest.mark.parametrize("n, k", [(256, 512), (100, 256), (64, 64), (100, 688), (32, 40)])
@pytest.mark.parametrize("rows", [1, 5, quant.INT4_GEMV_ROWS, quant.INT8_GEMM_ROWS])  # each kernel's row range
def test_linear_equals_dequantized_weight(mode, dtype, n, k, rows):
    linear = quant.quantize_linear(_linear(n, k, dtype), mode)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = linear(x)
    assert y.dtype == dtype and y.shape == (rows, n)
    # The kernels take bf16 activations and round their result to bf16: 2^-9 relative per element, ~3e-3 overall.
    assert _rel(y, F.linear(x.float(), linear.weight.float())) < 6e-3


def test_3d_input():
    linear = quant.quantize_linear(_linear(64, 128, torch.bfloat16), "int8")
    x = torch.randn(2, 3, 128).to(torch.bfloat16)
    torch.testing.assert_close(linear(x), linear(x.reshape(6, 128)).reshape(2, 3, 64))


def test_int8_error_is_half_a_step_per_channel():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    q, scales = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16 and q.abs().max() == 127
    error = (quant.dequantize_int8(q, scales) - w).abs()
    # Half a step, plus the slack of a bf16-rounded scale at the clipped extreme (127 · 2^-9 steps).
    assert (error <= scales.float()[:, None] * (0.5 + 127 * 2 ** -9)).all()
    assert _rel(quant.dequantize_int8(q, scales), w) < 0.01  # Gaussian rows: max/127 steps, about 0.7%


@pytest.mark.parametrize("group_size", quant.GROUP_SIZES)
def test_int4_error_is_half_a_step_per_group(group_size):
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    q, scales, zeros = quant.quantize_int4(w, group_size)
    assert q.max() <= 15 and scales.shape == zeros.shape == (64, 512 // group_size)
    error = (quant.dequantize_int4(q, scales, zeros) - w).abs().view(64, -1, group_size)
    assert (error <= scales.float()[..., None] * 0.52).all()
    assert _rel(quant.dequantize_int4(q, scales, zeros), w) < 0.12  # (max - min) / 15 steps: 6-11% by group size


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [1, 3, quant.INT4_GEMV_ROWS, quant.INT8_GEMM_ROWS])
@pytest.mark.parametrize("k", [256, 688])  # 688: int4 stores padding columns, which every path must handle
def test_every_kernel_path_gives_the_same_product(mode, rows, k, monkeypatch):
    # The C kernels, the C dequantizer + GEMM, and the pure-torch fallback of a machine without them.
    linear = quant.quantize_linear(_linear(96, k, torch.bfloat16), mode, group_size=64)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    want = F.linear(x.float(), linear.weight.float())
    results = [linear(x)]
    monkeypatch.setattr(quant.kernels, "available", lambda: False)
    results.append(linear(x))
    monkeypatch.setattr(quant.kernels, "dequant_available", lambda: False)
    results.append(linear(x))
    for y in results:
        assert _rel(y, want) < 6e-3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [256, 688])
@pytest.mark.parametrize("rows, amx", [(40, False), (40, True), (16, True)])  # 16 on AMX: transposed products
def test_expansion_in_tiles_equals_the_whole_expanded_weight(mode, k, rows, amx, monkeypatch):
    # 96 output rows in tiles of 64 (the last one short): each tile is expanded into the one reused buffer and
    # multiplied before the next overwrites it; with autograd the whole weight is expanded once instead.
    monkeypatch.setattr(quant.kernels, "AMX", amx)
    linear = quant.quantize_linear(_linear(96, k, torch.bfloat16), mode, group_size=64)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    whole = linear(x)
    stored = linear._weight().qweight.shape[1] * (2 if mode == "int4" else 1)  # inputs, padding included
    monkeypatch.setattr(quant, "EXPANDED_TILE_BYTES", 64 * 2 * stored)  # 64 rows of bf16
    expansions = []
    expand = getattr(quant.kernels, f"dequant_{mode}")
    monkeypatch.setattr(quant.kernels, f"dequant_{mode}", lambda *a: expansions.append(a[0].shape[0]) or expand(*a))
    tiled = linear(x)
    assert expansions == [64, 32]
    # Each output is the same sum of the same bf16 products; only its order may differ with the transposed form.
    if amx and 4 * rows <= 64:
        torch.testing.assert_close(tiled, whole, rtol=2 ** -7, atol=1e-3)
    else:
        assert torch.equal(tiled, whole)
    assert _rel(tiled, F.linear(x.float(), linear.weight.float())) < 6e-3
    xg = x.clone().requires_grad_()
    torch.testing.assert_close(linear(xg), whole, rtol=0, atol=0)


def test_model_to_dtype_keeps_int4_scales_exact():
    linear = quant.quantize_linear(_linear(64, 128, torch.float32), "int4", group_size=32)
    scales, bias = linear.scales.clone(), linear.bias.clone()
    linear.to(torch.float32).to(torch.bfloat16)
    assert linear.scales.dtype == torch.bfloat16 and torch.equal(linear.scales, scales)
    assert linear.bias.dtype == torch.float32 and torch.equal(linear.bias, bias)


def test_fallback_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(quant, "_reported", set())
    monkeypatch.setattr(quant.kernels, "dequant_available", lambda: False)  # a machine without a C compiler
    linear = quant.quantize_linear(_linear(32, 40, torch.bfloat16), "int8")  # torch's int8 kernel needs in % 16 == 0
    x = torch.randn(3, 40).to(torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="mixtral"):
        y = linear(x)
        linear(x)
    assert sum("no int8 kernel" in r.message for r in caplog.records) == 1
    torch.testing.assert_close(y, F.linear(x, linear.weight))


# ---- MoE and model ---------------------------------------------------------------------------------------------

def _moe(dtype=torch.float32) -> MoE:
    moe = MoE(dim=64, hidden_dim=128, n_experts=4, top_k=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return moe.to(dtype)


@pytest.mark.parametrize("mode", MODES)
def test_router_untouched(mode):
    model = mixtral.load("tiny", dtype="bf16")
    routers = [layer.moe.router.weight.clone() for layer in model.layers]
    quant.quantize(model, mode)
    for layer, before in zip(model.layers, routers):
        assert type(layer.moe.router) is torch.nn.Linear
        assert layer.moe.router.weight.dtype == torch.bfloat16 and torch.equal(layer.moe.router.weight, before)
        assert isinstance(layer.moe.w13, quant.QuantizedExperts)
        assert isinstance(layer.attention.wq, quant.QuantizedLinear)
    assert type(model.tok_embeddings) is torch.nn.Embedding


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_moe_reference_equals_grouped(mode, dtype):
    moe = quant.quantize(_moe(dtype), mode)
    assert len(moe.w13) == 4 and moe.w13[0].linear is not None
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    moe.dispatch = "reference"
    reference = moe(x)
    moe.dispatch = "grouped"
    grouped = moe(x)
    if dtype == torch.bfloat16:
        # grouped may run amx.c, which rounds each expert once where the reference rounds its gate, up projection,
        # silu product and output: the two differ by a few bf16 steps (both are held to float32 below)
        assert (grouped.float() - reference.float()).abs().max() <= 2**-6 * reference.float().abs().max()
    else:
        torch.testing.assert_close(grouped, reference)
    # and the quantized experts compute what their dequantized weights would
    plain = _moe(torch.float32)
    with torch.no_grad():
        plain.w13.copy_(torch.stack([moe.w13[e].dequantize(torch.float32) for e in range(4)]))
        plain.w2.copy_(torch.stack([moe.w2[e].dequantize(torch.float32) for e in range(4)]))
        plain.router.weight.copy_(moe.router.weight)
    assert _rel(reference, plain(x.float())) < 0.01
    assert _rel(grouped, plain(x.float())) < 0.01


@pytest.mark.parametrize("preset", ["tiny", "tiny-dense"])
@pytest.mark.parametrize("mode, bound", [("int8", 0.02), ("int4", 0.3)])
def test_quantized_model_logits_close(preset, mode, bound):
    # Measured on these random models: int8 0.9%, int4 13-15% relative logit error (bf16 instead of fp32 weights:
    # 0.5-0.8%). Weight error is 0.7% (int8) and 9-10% (int4) per matrix; the stacked layers amplify it ~1.5x.
    # The bounds leave 2x for seeds and kernels.
    ids = _ids()
    reference = _logits(mixtral.load(preset), ids)
    quantized = mixtral.load(preset, quantize=mode)
    assert quant.quantization_of(quantized)["mode"] == mode
    assert _rel(_logits(quantized, ids), reference) < bound


def test_targets_select_what_is_quantized():
    model = quant.quantize(mixtral.load("tiny"), "int4", group_size=32, targets=["experts"])
    assert isinstance(model.layers[0].moe.w2, quant.QuantizedExperts) and model.layers[0].moe.w2.group_size == 32
    assert type(model.layers[0].attention.wq) is not quant.QuantizedLinear
    assert type(model.output) is not quant.QuantizedLinear


# ---- checkpoints -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset, dtype", [("tiny", "bf16"), ("tiny-dense", "fp32")])
def test_save_load_round_trip(tmp_path, mode, preset, dtype):
    model = mixtral.load(preset, dtype=dtype, quantize=mode)
    ids = _ids()
    quant.save_quantized(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "mixtral", "format_version": 1, "mode": mode,
                                             "group_size": 128 if mode == "int4" else None,
                                             "targets": ["experts", "attention", "output"]}
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["layers.0.moe.w13.qweight"].dtype == (torch.int8 if mode == "int8" else torch.uint8)
    assert tensors["layers.0.attention_norm.weight"].dtype == model.tok_embeddings.weight.dtype
    loaded = mixtral.load(tmp_path)
    assert quant.quantization_of(loaded) == quant.quantization_of(model)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_int4_pads_inputs_that_fill_no_whole_group(tmp_path):
    # The default model's experts have 688 inputs in w2, 5.375 groups of 128: stored as 6, the padding columns
    # copies of the last real one, multiplied by zero inputs.
    model = mixtral.load("tiny", dtype="bf16")
    model = Transformer(dataclasses.replace(model.config, hidden_dim=688)).init_weights(0).to(torch.bfloat16)
    ids = _ids()
    want = _logits(model, ids)
    quant.quantize(model, "int4")
    w2 = model.layers[0].moe.w2
    assert (w2.in_features, w2.stored_in_features, w2.scales.shape[-1]) == (688, 768, 6)
    assert w2[0].dequantize().shape == (64, 688)
    assert _rel(_logits(model, ids), want) < 0.2
    quant.save_quantized(model, tmp_path)
    assert torch.equal(_logits(mixtral.load(tmp_path), ids), _logits(model, ids))


def test_portable_int4_file_form(tmp_path):
    model = mixtral.load("tiny", quantize="int4")
    quant.save_quantized(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    q = kernels.unpack_int4(tensors["output.qweight"])
    w = quant.dequantize_int4(q, tensors["output.scales"], tensors["output.zeros"])
    assert torch.equal(w.to(torch.bfloat16), model.output.weight)


def test_tied_embeddings_round_trip(tmp_path):
    config = dataclasses.replace(PRESETS["tiny"], tie_embeddings=True)
    model = quant.quantize(Transformer(config).init_weights(0).eval(), "int8", targets=["experts", "attention"])
    quant.save_quantized(model, tmp_path)
    loaded = mixtral.load(tmp_path)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    assert torch.equal(_logits(loaded, _ids()), _logits(model, _ids()))


def test_load_dtype_override(tmp_path):
    quant.save_quantized(mixtral.load("tiny", dtype="bf16", quantize="int8"), tmp_path)
    loaded = mixtral.load(tmp_path, dtype="fp32")
    assert loaded.tok_embeddings.weight.dtype == torch.float32 and loaded.output.scales.dtype == torch.float32
    assert _logits(loaded, _ids()).dtype == torch.float32


def test_quantized_checkpoint_errors(tmp_path):
    quant.save_quantized(mixtral.load("tiny", quantize="int4"), tmp_path)
    with pytest.raises(InputError, match="already quantized to int4"):
        mixtral.load(tmp_path, quantize="int8")
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["layers.1.moe.w2.zeros"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor 'layers\.1\.moe\.w2\.zeros'"):
        mixtral.load(tmp_path)
    tensors["layers.1.moe.w2.zeros"] = torch.zeros(3, dtype=torch.bfloat16)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'layers\.1\.moe\.w2\.zeros'.*expected"):
        mixtral.load(tmp_path)


# ---- errors and the CLI ----------------------------------------------------------------------------------------

def test_bad_arguments():
    model = mixtral.load("tiny")
    with pytest.raises(InputError, match="'int3'"):
        quant.quantize(model, "int3")
    with pytest.raises(InputError, match="'router'"):
        quant.quantize(model, "int8", targets=["router"])
    with pytest.raises(InputError, match="group_size"):
        quant.quantize(model, "int4", group_size=48)
    with pytest.raises(InputError, match="'int3'"):
        mixtral.load("tiny", quantize="int3")
    quant.quantize(model, "int8")
    with pytest.raises(InputError, match="already quantized"):
        quant.quantize(model, "int4")
    with pytest.raises(InputError, match="save_quantized"):
        quant.save_quantized(mixtral.load("tiny"), "unused")


def test_cli_generate_quantize(capsys):
    args = ["generate", "--model", "tiny", "--quantize", "int8", "--temperature", "0", "--max-new-tokens", "6",
            "--no-stream", "The mixture"]
    assert main(args) == 0
    expected = complete(mixtral.load("tiny", quantize="int8"), load_tokenizer(), ["The mixture"], 6,
                        temperature=0.0)[0]
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [1, 64])
def test_gradient_through_a_quantized_linear(mode, rows):
    # The integer kernels have no backward, and the dequantize + GEMM path must not hand autograd a reused
    # scratch buffer that a later call overwrites.
    linear = quant.quantize_linear(_linear(64, 128, torch.bfloat16), mode, group_size=32)
    x = torch.randn(rows, 128, dtype=torch.bfloat16, requires_grad=True)
    loss = linear(x).float().sum()
    with torch.no_grad():
        linear(torch.randn(rows, 128, dtype=torch.bfloat16) * 100)
    loss.backward()
    want = linear.weight.float().sum(0).expand(rows, 128)
    assert _rel(x.grad.float(), want) < 6e-3


@pytest.mark.skipif(not kernels.amx_available(), reason="no AMX, or the kernels are not built for it")
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_experts_on_amx_equal_their_dequantized_weights(mode, monkeypatch):
    # From AMX_INT8_EXPERT_ROWS / AMX_INT4_EXPERT_ROWS rows a quantized expert runs on amx.c, which expands its
    # rows a block at a time. The result must be the expert of the dequantized weights, within bf16 rounding,
    # and the kernel must really run, on the quantized weights themselves.
    from mixtral.moe import MoE, moe_grouped, moe_reference, route
    g = torch.Generator().manual_seed(11)
    layer = MoE(128, 384, 4, 2).to(torch.bfloat16)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    quant.quantize(layer, mode, group_size=128)
    x = torch.randn(96, 128, generator=g).bfloat16()
    calls = []
    original = kernels.amx_swiglu_add
    monkeypatch.setattr(kernels, "amx_swiglu_add",
                        lambda *a: calls.append(getattr(a[-1], "mode", None)) or original(*a))
    with torch.no_grad():
        weights, experts = route(layer.router_logits(x), 2)
        got = moe_grouped(x, layer.w13, layer.w2, weights, experts)
        w13 = torch.stack([layer.w13[e].dequantize(torch.float32) for e in range(4)])
        w2 = torch.stack([layer.w2[e].dequantize(torch.float32) for e in range(4)])
        want = moe_reference(x.float(), w13, w2, weights, experts)
    assert calls and all(called == mode for called in calls)
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2

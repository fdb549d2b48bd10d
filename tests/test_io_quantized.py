"""mixtral.io.quantized: the quantized checkpoint written and read back exactly (every mode, a precision per part,
both dtypes, int4 padding, tied embeddings), its portable file form, format 1 still read, the streaming writer
(`mixtral quantize`) equal to quantizing in memory, and the errors naming the tensor, file or field at fault."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import mixtral
from mixtral import kernels, quant
from mixtral.config import PRESETS, to_hf_dict
from mixtral.errors import CheckpointError, InputError
from mixtral.io.checkpoint import save_hf, save_native
from mixtral.io.checkpoint import TensorPlan, write_safetensors
from mixtral.io.loading import quantize_checkpoint
from mixtral.io.quantized import FORMAT_VERSION, experts_path, read_quantization_config, save_quantized
from mixtral.model import Transformer

from conftest import float_logits, rel_error, token_ids

MODES = ["int8", "int4"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset, dtype", [("tiny", "bf16"), ("tiny-dense", "fp32")])
def test_save_load_round_trip(tmp_path, mode, preset, dtype):
    model = mixtral.load(preset, dtype=dtype, quantize=mode)
    ids = token_ids()
    save_quantized(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "experts", "model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "experts").iterdir()) == [
        f"layer-{i:03d}.experts" for i in range(model.config.n_layers)]
    config = json.loads((tmp_path / "config.json").read_text())
    spec = str(quant.parse_precision(mode))
    assert config["quantization_config"] == {"quant_method": "mixtral", "format_version": 2,
                                             "parts": dict.fromkeys(quant.TARGETS, spec)}
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["layers.0.attention.wq.qweight"].dtype == (torch.int8 if mode == "int8" else torch.uint8)
    assert tensors["layers.0.attention_norm.weight"].dtype == model.tok_embeddings.weight.dtype
    assert not [k for k in tensors if ".moe.w" in k]  # the experts are in their own files
    loaded = mixtral.load(tmp_path)
    assert quant.quantization_of(loaded) == quant.quantization_of(model)
    _assert_same_tensors(loaded, model)
    assert torch.equal(float_logits(loaded, ids), float_logits(model, ids))


@pytest.mark.parametrize("parts", [
    {"experts": "int4:g32", "attention": "int8"},
    {"experts": "int8", "output": "int4:g64"},
    {"attention": "int8"},  # the experts stay float: their files hold the float stacks
])
def test_a_precision_per_part_round_trips(tmp_path, parts):
    model = mixtral.load("tiny", dtype="bf16", quantize=parts)
    save_quantized(model, tmp_path)
    loaded = mixtral.load(tmp_path)
    assert quant.quantization_of(loaded) == quant.quantization_of(model)
    _assert_same_tensors(loaded, model)
    assert torch.equal(float_logits(loaded, token_ids()), float_logits(model, token_ids()))


def _as_format_1(model, directory):
    """What format 1 wrote: everything, the expert stacks too, in model.safetensors; mode/group_size/targets."""
    directory.mkdir()
    # The state dict leaves out the int4 bias (derived, not persistent), as format 1 did.
    plans = [TensorPlan(name, tuple(t.shape), t.dtype, lambda t=t: t) for name, t in model.state_dict().items()]
    write_safetensors(directory / "model.safetensors", plans)
    config = to_hf_dict(model.config, "bfloat16")
    config["quantization_config"] = {"quant_method": "mixtral", "format_version": 1, "mode": "int4",
                                     "group_size": 128, "targets": list(quant.TARGETS)}
    (directory / "config.json").write_text(json.dumps(config))


def test_format_1_is_still_read(tmp_path):
    model = mixtral.load("tiny", dtype="bf16", quantize="int4")
    _as_format_1(model, tmp_path / "v1")
    loaded = mixtral.load(tmp_path / "v1")
    _assert_same_tensors(loaded, model)
    assert torch.equal(float_logits(loaded, token_ids()), float_logits(model, token_ids()))


def test_int4_pads_inputs_that_fill_no_whole_group(tmp_path):
    # The default model's experts have 688 inputs in w2, 5.375 groups of 128: stored as 6, the padding columns
    # copies of the last real one, multiplied by zero inputs.
    model = mixtral.load("tiny", dtype="bf16")
    model = Transformer(dataclasses.replace(model.config, hidden_dim=688)).init_weights(0).to(torch.bfloat16)
    ids = token_ids()
    want = float_logits(model, ids)
    quant.quantize(model, "int4")
    w2 = model.layers[0].moe.w2
    assert (w2.in_features, w2.stored_in_features, w2.scales.shape[-1]) == (688, 768, 6)
    assert w2[0].dequantize().shape == (64, 688)
    assert rel_error(float_logits(model, ids), want) < 0.2
    save_quantized(model, tmp_path)
    assert torch.equal(float_logits(mixtral.load(tmp_path), ids), float_logits(model, ids))


def test_portable_int4_file_form(tmp_path):
    model = mixtral.load("tiny", quantize="int4")
    save_quantized(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    q = kernels.unpack_int4(tensors["output.qweight"])
    w = quant.dequantize_int4(q, tensors["output.scales"], tensors["output.zeros"])
    assert torch.equal(w.to(torch.bfloat16), model.output.weight)


@pytest.mark.parametrize("targets", [["experts", "attention"], ["experts", "output"]])
def test_tied_embeddings_round_trip(tmp_path, targets):
    # A float output shares the embeddings' tensor again after loading; a quantized one has its own buffers.
    config = dataclasses.replace(PRESETS["tiny"], tie_embeddings=True)
    model = quant.quantize(Transformer(config).init_weights(0).eval(), "int8", targets=targets)
    save_quantized(model, tmp_path)
    loaded = mixtral.load(tmp_path)
    if "output" in targets:
        assert isinstance(loaded.output, quant.QuantizedLinear)
    else:
        assert loaded.output.weight is loaded.tok_embeddings.weight
    assert torch.equal(float_logits(loaded, token_ids()), float_logits(model, token_ids()))


def test_load_dtype_override(tmp_path):
    save_quantized(mixtral.load("tiny", dtype="bf16", quantize="int8"), tmp_path)
    loaded = mixtral.load(tmp_path, dtype="fp32")
    assert loaded.tok_embeddings.weight.dtype == torch.float32 and loaded.output.scales.dtype == torch.float32
    assert float_logits(loaded, token_ids()).dtype == torch.float32


def test_quantized_checkpoint_errors(tmp_path):
    save_quantized(mixtral.load("tiny", quantize="int4"), tmp_path)
    with pytest.raises(InputError, match=r"already quantized \(experts int4:g128, .*\); it cannot be quantized to "
                                         r"experts int8"):
        mixtral.load(tmp_path, quantize="int8")
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["layers.1.attention.wo.zeros"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor 'layers\.1\.attention\.wo\.zeros'"):
        mixtral.load(tmp_path)
    tensors["layers.1.attention.wo.zeros"] = torch.zeros(3, dtype=torch.bfloat16)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'layers\.1\.attention\.wo\.zeros'.*expected"):
        mixtral.load(tmp_path)


def test_missing_or_truncated_expert_file(tmp_path):
    save_quantized(mixtral.load("tiny", quantize="int4"), tmp_path)
    path = experts_path(tmp_path, 1)
    data = path.read_bytes()
    path.write_bytes(data[:-4096])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        mixtral.load(tmp_path)
    path.unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        mixtral.load(tmp_path)


def test_bad_quantization_config(tmp_path):
    save_quantized(mixtral.load("tiny", quantize="int8"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert read_quantization_config(tmp_path) == config["quantization_config"]
    config["quantization_config"]["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: quantization format_version 3 is not one of 1, 2"):
        mixtral.load(tmp_path)
    config["quantization_config"].update(format_version=FORMAT_VERSION, parts={"experts": "int5"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: bad quantization_config .*'int5'"):
        mixtral.load(tmp_path)
    del config["quantization_config"]["parts"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"quantization_config has no 'parts'"):
        mixtral.load(tmp_path)


def test_save_takes_only_a_quantized_model(tmp_path):
    with pytest.raises(InputError, match="save_quantized"):
        save_quantized(mixtral.load("tiny"), tmp_path)
    assert read_quantization_config(tmp_path) is None and not list(tmp_path.iterdir())


# ---- quantizing while loading an unquantized checkpoint or preset ----------------------------------------------

def _assert_same_tensors(got: torch.nn.Module, want: torch.nn.Module) -> None:
    tensors = lambda m: {**dict(m.named_parameters()), **dict(m.named_buffers())}  # noqa: E731 (int4 bias too)
    got_t, want_t = tensors(got), tensors(want)
    assert sorted(got_t) == sorted(want_t)
    for name, tensor in want_t.items():
        assert got_t[name].dtype == tensor.dtype and torch.equal(got_t[name], tensor), name
    assert quant.quantization_of(got) == quant.quantization_of(want)


def _stacked(native_dir, out_dir, n_layers: int, n_experts: int):
    # The December 2023 release: each layer's experts stacked into [experts * hidden, dim], w2 blocks transposed.
    state = load_file(native_dir / "consolidated.safetensors")
    stacked = {k.replace("feed_forward.gate", "block_sparse_moe.gate"): v for k, v in state.items()
               if ".feed_forward.experts." not in k}
    for layer in range(n_layers):
        for w in ("w1", "w2", "w3"):
            blocks = [state[f"layers.{layer}.feed_forward.experts.{e}.{w}.weight"] for e in range(n_experts)]
            stacked[f"layers.{layer}.block_sparse_moe.{w}"] = torch.cat([b.T if w == "w2" else b for b in blocks])
    out_dir.mkdir()
    save_file(stacked, out_dir / "consolidated.safetensors")
    (out_dir / "params.json").write_text((native_dir / "params.json").read_text())
    return out_dir


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout, preset, tied, hidden", [
    (layout, *case) for layout in ("hf", "native")
    for case in (("tiny", False, None), ("tiny", True, None), ("tiny-dense", False, None), ("tiny", False, 688))
] + [("stacked", "tiny", False, None)])  # hidden 688: int4 pads w2's inputs to whole groups
def test_quantize_while_loading_equals_quantize_after(tmp_path, mode, layout, preset, tied, hidden):
    config = dataclasses.replace(PRESETS[preset], tie_embeddings=tied, hidden_dim=hidden or PRESETS[preset].hidden_dim)
    model = Transformer(config).init_weights(1).to(torch.bfloat16)
    path = (save_hf if layout == "hf" else save_native)(model, tmp_path / "ckpt")
    if layout == "stacked":
        path = _stacked(path, tmp_path / "dec", config.n_layers, config.n_experts)
    # dtype float32 too: the staged matrices are converted from the file's bf16 exactly as the float model's are
    for dtype in (None, "fp32"):
        want = quant.quantize(mixtral.load(path, dtype=dtype, progress=False), mode)
        _assert_same_tensors(mixtral.load(path, dtype=dtype, progress=False, quantize=mode), want)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset", ["tiny", "tiny-dense"])
def test_quantized_preset_equals_quantize_after(mode, preset):
    for dtype, seed in ((None, 0), ("bf16", 5)):
        want = quant.quantize(mixtral.load(preset, dtype=dtype, seed=seed), mode)
        _assert_same_tensors(mixtral.load(preset, dtype=dtype, seed=seed, quantize=mode), want)


def test_quantize_while_loading_errors_are_unchanged(tmp_path):
    path = save_hf(Transformer(PRESETS["tiny"]).init_weights(0).to(torch.bfloat16), tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    key = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    for change, message in ((lambda t: t.pop(key), rf"missing tensor '{re.escape(key)}'"),
                            (lambda t: t.update({key: t[key][:-1]}), rf"model\.safetensors: tensor '{re.escape(key)}'"
                                                                      r" has shape \[.*\], config expects")):
        broken = dict(tensors)
        change(broken)
        save_file(broken, path / "model.safetensors")
        for mode in (None, "int4"):
            with pytest.raises(CheckpointError, match=message):
                mixtral.load(path, progress=False, quantize=mode)


# ---- the streaming writer: `mixtral quantize` --------------------------------------------------------------------

def _same_files(a, b):
    files = lambda d: sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert files(a) == files(b)
    for name in files(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("layout", ["hf", "native"])
@pytest.mark.parametrize("parts", ["int4", {"experts": "int8", "attention": "int4:g32"}, {"output": "int8"}])
def test_quantize_checkpoint_writes_what_saving_the_quantized_model_writes(tmp_path, layout, parts):
    model = Transformer(PRESETS["tiny"]).init_weights(3).to(torch.bfloat16)
    path = (save_hf if layout == "hf" else save_native)(model, tmp_path / "ckpt")
    quantize_checkpoint(path, tmp_path / "streamed", parts, progress=False)
    save_quantized(mixtral.load(path, quantize=parts, progress=False), tmp_path / "in-memory")
    _same_files(tmp_path / "streamed", tmp_path / "in-memory")


def test_quantize_checkpoint_of_a_preset(tmp_path):
    quantize_checkpoint("tiny", tmp_path / "streamed", "int4", seed=4, progress=False)
    save_quantized(mixtral.load("tiny", quantize="int4", seed=4), tmp_path / "in-memory")
    _same_files(tmp_path / "streamed", tmp_path / "in-memory")


def test_quantize_checkpoint_refuses_a_quantized_source_and_leaves_nothing(tmp_path):
    save_quantized(mixtral.load("tiny", quantize="int8"), tmp_path / "q")
    with pytest.raises(InputError, match="already quantized"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "out", "int4", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="'int5'"):
        quantize_checkpoint("tiny", tmp_path / "out", "int5", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary directory left behind either

"""Quantized checkpoints: a model `mixtral.quant.quantize` changed, written as it is and read back without
quantizing again (`save_quantized`, `load_quantized`; `mixtral.load` reads them too).

A directory with
- config.json: the Hugging Face config (`mixtral.config.to_hf_dict`) plus
  "quantization_config": {"quant_method": "mixtral", "mode", "group_size", "targets", "format_version": 1}.
  transformers reads the config and, not knowing quant_method "mixtral", says so instead of guessing.
- model.safetensors: unquantized tensors under the model's own state-dict names (`tok_embeddings.weight`,
  `layers.0.moe.router.weight`, ...) in the model's dtype, and for each quantized matrix at module path P
  (`layers.0.attention.wq`, `output`, `layers.0.moe.w13` with a leading [n_experts] dimension, ...):
    int8: P.qweight int8 [..., out, in], P.scales bf16 [..., out]
    int4: P.qweight uint8 [..., out, in' / 2]: for each block of 32 columns 16 bytes, byte i holding column i
          (low nibble) and column 16 + i (high nibble) of the block (`mixtral.kernels.pack_int4`);
          P.scales and P.zeros bf16 [..., out, in' / group_size]
  where in' is in rounded up to a multiple of the group size (`mixtral.quant.int4_layout`): a matrix whose inputs
  do not fill whole groups (the default model's w2 has 688 = 21.5 x 32) gets copies of its last column as
  padding, so the last group's range stays the real columns' range, and the kernels multiply the padding by zero
  inputs.
The int4 integers are kept in memory in this same layout, so loading them is a straight read.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from mixtral import quant
from mixtral.config import dtype_name, from_hf_dict, read_json, to_hf_dict
from mixtral.errors import CheckpointError, InputError
from mixtral.io.checkpoint import SafetensorsReader, TensorPlan, write_safetensors
from mixtral.io.files import write_json
from mixtral.model import Transformer

FORMAT_VERSION = 1


def _file_shapes(module: quant.Quantized) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) in the file of the buffers of a quantized module (see the module docstring)."""
    lead = (len(module),) if isinstance(module, quant.QuantizedExperts) else ()
    n, k = module.out_features, module.stored_in_features
    if module.mode == "int8":
        return {"qweight": (lead + (n, k), torch.int8), "scales": (lead + (n,), torch.bfloat16)}
    groups = (lead + (n, k // module.group_size), torch.bfloat16)
    return {"qweight": (lead + (n, k // 2), torch.uint8), "scales": groups, "zeros": groups}


def _plain_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The unquantized state: parameters and buffers outside the quantized modules (a tied output once)."""
    quantized = quant.quantized_modules(model)
    state = {}
    for name, tensor in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner in quantized:
            continue
        if name == "output.weight" and model.config.tie_embeddings:
            continue  # the same tensor as tok_embeddings.weight; the model ties them again on load
        state[name] = tensor
    return state


# ---- saving ----------------------------------------------------------------------------------------------------

def save_quantized(model: Transformer, path: str | os.PathLike) -> Path:
    """Write a quantized model as config.json + model.safetensors in the format of this module's docstring.

    Each file goes to a temporary name and is renamed into place. Memory: the model plus one tensor in its file
    form. Returns the directory.
    Raises InputError for a model that `quantize` has not changed.
    """
    settings = quant.quantization_of(model)
    if settings is None or not isinstance(model, Transformer):
        raise InputError("save_quantized takes a Transformer that mixtral.quant.quantize has quantized")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    plans = [TensorPlan(name, tuple(t.shape), t.dtype, lambda t=t: t) for name, t in _plain_tensors(model).items()]
    for name, module in quant.quantized_modules(model).items():
        for key, (shape, dtype) in _file_shapes(module).items():
            # The writer converts to the file's dtype: in memory int8 scales are in the model's dtype.
            plans.append(TensorPlan(f"{name}.{key}", shape, dtype, lambda m=module, key=key: getattr(m, key)))
    write_safetensors(directory / "model.safetensors", plans, {"format": "pt", "quantization": "mixtral"})
    config = to_hf_dict(model.config, dtype_name(model.tok_embeddings.weight.dtype))
    config["quantization_config"] = {"quant_method": "mixtral", "format_version": FORMAT_VERSION, **settings}
    write_json(directory / "config.json", config)
    return directory


# ---- loading ---------------------------------------------------------------------------------------------------

def read_quantization_config(path: str | os.PathLike) -> dict | None:
    """The "quantization_config" of a checkpoint directory written by `save_quantized`, else None."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    settings = read_json(config).get("quantization_config")
    if not isinstance(settings, dict) or settings.get("quant_method") != "mixtral":
        return None
    return settings


def load_quantized(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                   device: str | torch.device = "cpu") -> Transformer:
    """Read a directory written by `save_quantized` into a quantized Transformer in eval mode.

    dtype: of the unquantized tensors and the activations (default: the file's). Memory: the quantized model
    plus the small unquantized tensors being converted to `dtype`.
    Raises CheckpointError naming the file and tensor for a missing, unexpected or misshapen tensor, or the field
    of a bad quantization_config.
    """
    directory = Path(path)
    settings = read_quantization_config(directory)
    if settings is None:
        raise CheckpointError(f"{directory}: no mixtral quantization_config in config.json")
    if settings.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory / 'config.json'}: quantization format_version "
                              f"{settings.get('format_version')!r} is not {FORMAT_VERSION}; upgrade mixtral")
    try:
        targets = quant.check_settings(settings["mode"], settings["targets"], settings["group_size"] or 128)
    except (KeyError, InputError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: bad quantization_config ({e})") from None
    config = from_hf_dict(read_json(directory / "config.json"), str(directory / "config.json"))
    file = directory / "model.safetensors"
    if not file.exists():
        raise CheckpointError(f"{directory}: no model.safetensors")
    reader = SafetensorsReader(file)
    try:
        if dtype is None:
            dtype = reader.dtype("tok_embeddings.weight") if "tok_embeddings.weight" in reader.entries else None
        model = quant.empty_quantized_model(config, dtype or torch.float32, settings["mode"],
                                            group_size=settings["group_size"] or 128, targets=targets)
        _read_into(model, reader)
    finally:
        reader.close()
    return model.to(device).eval()


def _read_into(model: Transformer, reader: SafetensorsReader) -> None:
    quantized = quant.quantized_modules(model)
    plain = _plain_tensors(model)
    expected = {name: (tuple(t.shape), None) for name, t in plain.items()}
    for name, module in quantized.items():
        expected.update({f"{name}.{key}": spec for key, spec in _file_shapes(module).items()})
    unexpected = [k for k in reader.keys() if k not in expected]
    if unexpected:
        raise CheckpointError(f"{reader.path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    missing = [k for k in expected if k not in reader.entries]
    if missing:
        raise CheckpointError(f"{reader.path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    for name, (shape, dtype) in expected.items():
        if tuple(reader.shape(name)) != shape or (dtype is not None and reader.dtype(name) != dtype):
            raise CheckpointError(f"{reader.path}: tensor {name!r} is {reader.dtype(name)} {list(reader.shape(name))},"
                                  f" expected {dtype or 'float'} {list(shape)}")
    # Tensors are read straight into place where the bytes already have their final size, so the peak is the
    # model plus one small tensor, not the model plus its biggest stack.
    with torch.no_grad():
        for name, tensor in plain.items():
            if reader.dtype(name) == tensor.dtype and tensor.is_contiguous():
                reader.read(name, out=tensor)
            else:
                tensor.copy_(reader.read(name))
        for name, module in quantized.items():
            reader.read(f"{name}.qweight", out=module.qweight)  # the file's layout is the kernels' layout
            module.scales.copy_(reader.read(f"{name}.scales"))
            if module.mode == "int4":
                module.zeros.copy_(reader.read(f"{name}.zeros"))
                module.refresh()

"""Quantized checkpoints: a model `mixtral.quant.quantize` changed (a precision per part), written as it is and read
back without quantizing again (`save_quantized`, `load_quantized`; `mixtral.load` reads them too, and `mixtral
quantize` writes them layer by layer from a float checkpoint or a preset, `mixtral.io.loading.quantize_checkpoint`).

Format 2, a directory with
- config.json: the Hugging Face config (`mixtral.config.to_hf_dict`) plus
  "quantization_config": {"quant_method": "mixtral", "format_version": 2,
                          "parts": {"experts": "int3:g64", "attention": "int8", "output": null}}
  (each part's precision as `mixtral.quant.parse_precision` reads it; null: left in the model's float dtype).
  transformers reads the config and, not knowing quant_method "mixtral", says so instead of guessing.
- model.safetensors: everything but the experts. Unquantized tensors under the model's own state-dict names
  (`tok_embeddings.weight`, `layers.0.moe.router.weight`, ...) in the model's dtype, and for each quantized
  matrix at module path P (`layers.0.attention.wq`, `output`):
    int8: P.qweight int8 [out, in], P.scales bf16 [out]
    int4, int3, int2: P.qweight uint8 [out, in' · bits / 8] (the byte layouts are `mixtral.kernels.packing`'s),
          P.scales and P.zeros bf16 [out, in' / group_size]
  where in' is in rounded up to whole groups (`mixtral.quant.stored_layout`): padding columns are copies of the
  last one, so the last group's range stays the real columns' range, and the kernels multiply them by zero inputs.
- experts/layer-NNN.experts, one file per layer: that layer's experts, one record per expert holding its w13 and
  w2 (the same buffers as above, plus the int4 kernels' derived bias), each record page-aligned so that one read
  brings one expert (`mixtral.io.experts`): the offloading engine reads them on demand, a resident load reads
  them all.
The integers are kept in memory in this same layout, so loading them is a straight read.

Format 1 (read only): the same config with "mode", "group_size" and "targets" instead of "parts", and the experts
in model.safetensors as `layers.L.moe.w13.qweight` [n_experts, ...] and so on.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from mixtral import quant
from mixtral.config import ModelConfig, dtype_name, from_hf_dict, read_json, to_hf_dict
from mixtral.errors import CheckpointError, InputError
from mixtral.io import experts as expert_files
from mixtral.io.checkpoint import SafetensorsReader, TensorPlan, drop_experts, write_safetensors
from mixtral.io.files import atomic_directory, write_json
from mixtral.model import Transformer

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
EXPERTS_DIR = "experts"


def experts_path(directory: str | os.PathLike, layer: int) -> Path:
    """The file of layer `layer`'s experts in a quantized checkpoint directory."""
    return Path(directory) / EXPERTS_DIR / expert_files.file_name(layer)


def _file_shapes(module: quant.Quantized) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) in the file of the saved buffers of a quantized module (see the module docstring):
    the module's own buffers but the derived int4 bias."""
    return {name: (tuple(buffer.shape), torch.bfloat16 if name == "scales" else buffer.dtype)
            for name, buffer in module.named_buffers(recurse=False) if name in module.state_dict()}


def _plain_tensors(model: Transformer, *, experts: bool) -> dict[str, torch.Tensor]:
    """The unquantized state: parameters and buffers outside the quantized modules (a tied output once), without
    the expert stacks unless `experts`."""
    quantized = quant.quantized_modules(model)
    state = {}
    for name, tensor in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner in quantized or (not experts and name.endswith((".moe.w13", ".moe.w2"))):
            continue
        if name == "output.weight" and model.config.tie_embeddings:
            continue  # the same tensor as tok_embeddings.weight; the model ties them again on load
        state[name] = tensor
    return state


def _quantized_modules(model: Transformer, *, experts: bool) -> dict[str, quant.Quantized]:
    return {name: m for name, m in quant.quantized_modules(model).items()
            if experts or not name.endswith((".moe.w13", ".moe.w2"))}


# ---- saving ----------------------------------------------------------------------------------------------------

def write_resident_part(model: Transformer, directory: Path) -> None:
    """config.json and model.safetensors of a quantized checkpoint (everything but the experts) into `directory`,
    from a model `quantize` changed, with or without its experts (`mixtral.io.checkpoint.drop_experts`). Every
    part may be unquantized (the expert files of a bf16 model that is offloaded)."""
    settings = getattr(model, "quantization", None)  # not quantization_of, which is None when nothing is quantized
    if not settings or not isinstance(model, Transformer):
        raise InputError("a quantized checkpoint is written from a Transformer that mixtral.quant.quantize changed")
    plans = [TensorPlan(name, tuple(t.shape), t.dtype, lambda t=t: t)
             for name, t in _plain_tensors(model, experts=False).items()]
    for name, module in _quantized_modules(model, experts=False).items():
        for key, (shape, dtype) in _file_shapes(module).items():
            # The writer converts to the file's dtype: in memory int8 scales are in the model's dtype.
            plans.append(TensorPlan(f"{name}.{key}", shape, dtype, lambda m=module, key=key: getattr(m, key)))
    write_safetensors(directory / "model.safetensors", plans, {"format": "pt", "quantization": "mixtral"})
    config = to_hf_dict(model.config, dtype_name(model.tok_embeddings.weight.dtype))
    config["quantization_config"] = {"quant_method": "mixtral", "format_version": FORMAT_VERSION, "parts": settings}
    write_json(directory / "config.json", config)


def save_quantized(model: Transformer, path: str | os.PathLike) -> Path:
    """Write a quantized model (all resident) as a directory in format 2 (this module's docstring), atomically: the
    directory appears whole or not at all, and an existing one is replaced. Memory: the model plus one tensor (one
    expert record) in its file form. Returns the directory.
    Raises InputError for a model that `quantize` has not changed."""
    if quant.quantization_of(model) is None or not isinstance(model, Transformer):
        raise InputError("save_quantized takes a Transformer that mixtral.quant.quantize has quantized")
    directory = Path(path)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(directory) as tmp:
        (tmp / EXPERTS_DIR).mkdir()
        for i, layer in enumerate(model.layers):
            expert_files.write_layer_experts(experts_path(tmp, i), layer.moe.w13, layer.moe.w2, layer=i)
        write_resident_part(model, tmp)
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


def saved_settings(path: str | os.PathLike) -> dict[str, str | None]:
    """{part: spec or None} of a quantized checkpoint directory (either format), checked.
    Raises CheckpointError naming config.json and the field at fault."""
    directory = Path(path)
    settings = read_quantization_config(directory)
    where = directory / "config.json"
    if settings is None:
        raise CheckpointError(f"{directory}: no mixtral quantization_config in config.json")
    version = settings.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{where}: quantization format_version {version!r} is not one of "
                              f"{', '.join(map(str, READABLE_VERSIONS))}; upgrade mixtral")
    try:
        if version == 1:
            parts = quant.quantization_settings(settings["mode"], group_size=settings["group_size"],
                                                targets=settings["targets"], where=str(where))
        else:
            parts = quant.quantization_settings(settings["parts"], where=f"{where}: parts")
    except KeyError as e:
        raise CheckpointError(f"{where}: quantization_config has no {e}") from None
    except InputError as e:
        raise CheckpointError(f"{where}: bad quantization_config ({e})") from None
    return quant.spec_strings(parts)


def open_expert_files(path: str | os.PathLike, config: ModelConfig) -> list:
    """The `mixtral.io.experts.ExpertFile` of every layer of a format-2 directory, checked against `config`.
    Raises CheckpointError naming the file that is missing, truncated or does not fit."""
    files = expert_files.open_expert_files(experts_path(path, i) for i in range(config.n_layers))
    for file in files:
        if file.n_experts != config.n_experts:
            for f in files:
                f.close()
            raise CheckpointError(f"{file.path}: {file.n_experts} experts, config.json says {config.n_experts}")
    return files


def load_quantized(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                   device: str | torch.device = "cpu", experts: bool = True) -> Transformer:
    """Read a directory written by `save_quantized` or `mixtral quantize` into a quantized Transformer in eval mode.

    dtype: of the unquantized tensors and the activations (default: the file's). Memory: the quantized model
    plus the small unquantized tensors being converted to `dtype`. experts=False (format 2): the model without its
    experts (`drop_experts`), for the offloading engine, which reads them from `open_expert_files`.
    Raises CheckpointError naming the file and tensor for a missing, unexpected or misshapen tensor or expert
    file, or the field of a bad quantization_config.
    """
    directory = Path(path)
    parts = saved_settings(directory)
    version = read_quantization_config(directory)["format_version"]
    config = from_hf_dict(read_json(directory / "config.json"), str(directory / "config.json"))
    file = directory / "model.safetensors"
    if not file.exists():
        raise CheckpointError(f"{directory}: no model.safetensors")
    if version == 1 and not experts:
        raise CheckpointError(f"{directory}: format 1 keeps the experts inside model.safetensors; save it again "
                              f"(mixtral quantize) to offload its experts")
    reader = SafetensorsReader(file)
    try:
        if dtype is None:
            dtype = reader.dtype("tok_embeddings.weight") if "tok_embeddings.weight" in reader.entries else None
        in_safetensors = version == 1
        model = quant.empty_quantized_model(config, dtype or torch.float32, parts,
                                            on_meta=None if experts else drop_experts)
        _read_into(model, reader, experts=in_safetensors)
    finally:
        reader.close()
    if experts and version == 2:  # the experts, the bulk of the model, a layer at a time, each then to `device`
        for layer, expert_file in zip(model.layers, open_expert_files(directory, config)):
            with expert_file:
                expert_file.read_stack_into(layer.moe.w13, layer.moe.w2)
            layer.to(device)
    return model.to(device).eval()


def _read_into(model: Transformer, reader: SafetensorsReader, *, experts: bool) -> None:
    quantized = _quantized_modules(model, experts=experts)
    plain = _plain_tensors(model, experts=experts)
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
            for key in _file_shapes(module):
                buffer = getattr(module, key)
                if key == "qweight":
                    reader.read(f"{name}.{key}", out=buffer)  # the file's layout is the kernels' layout
                else:
                    buffer.copy_(reader.read(f"{name}.{key}"))
            module.refresh()

"""Checkpoints on disk: Hugging Face and Mistral-native layouts, read lazily and written atomically; the
safetensors reader and writer that the quantized format (`mixtral.io.quantized`) uses too.

Layouts read (the key maps are in `mixtral.io.layouts`):
- Hugging Face: config.json + model.safetensors, or sharded model-0000i-of-0000N.safetensors with
  model.safetensors.index.json (pytorch_model*.bin too, with weights_only=True).
- Mistral native: params.json + consolidated.safetensors (or consolidated*.pth, unpickled with weights_only=True).
The layouts are told apart by the config file, their variants (fused or stacked experts) by the keys.

Memory: safetensors files are read tensor by tensor straight into the model's preallocated parameters with
plain reads. A memory map would count every page it touched towards the process's RSS until it is closed, so
loading one big file through a map peaks at twice the weights; reading into place peaks at the weights plus
one tensor (plus one tensor when a dtype conversion or permutation needs a staging copy). Quantizing while
loading (`load_checkpoint(..., quantize=...)`) peaks at the quantized model plus one staged float matrix.
Saving streams too: the weights plus one tensor in the file's dtype.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import torch
from tqdm import tqdm

from mixtral import quant
from mixtral.config import (ModelConfig, dtype_name, from_hf_dict, from_params_dict, read_json, to_hf_dict,
                            to_params_dict)
from mixtral.errors import CheckpointError
from mixtral.io.files import atomic_open, write_json
from mixtral.io.layouts import Target, choose_layout, hf_layout, native_layout, permute_to_interleaved
from mixtral.model import Transformer, empty_model

# The dtype names of the safetensors format (each header entry's "dtype"). safetensors keeps its own table
# private, so this is the one table both the reader and the writer use.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


# ---- reading tensors -------------------------------------------------------------------------------------------

def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The memory of a contiguous CPU tensor as bytes, to write out or read into (any dtype: numpy has no bf16)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class SafetensorsReader:
    """Reads tensors of one .safetensors file on demand, checking the header against the file's size."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "rb")
        try:
            self._parse_header(path.stat().st_size)
        except BaseException:
            self._file.close()
            raise

    def _parse_header(self, size: int) -> None:
        path = self.path
        prefix = self._file.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if header_len < 0 or 8 + header_len > size:
            raise CheckpointError(f"{path}: not a safetensors file, or truncated inside its header")
        try:
            header = json.loads(self._file.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: safetensors header is not valid JSON (corrupt file?)") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: safetensors header is not a JSON object")
        for name, info in header.items():
            dtype = SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            try:
                start, end = (int(o) for o in info["data_offsets"])
                shape = tuple(int(n) for n in info["shape"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}") from None
            if self._data_start + end > size:
                raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {self._data_start + end} "
                                      f"but the file has {size} bytes")
            self.entries[name] = (dtype, shape, start, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `name`, read into `out` when given (same dtype and shape, contiguous)."""
        dtype, shape, start, end = self.entries[name]
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        self._file.seek(self._data_start + start)
        if self._file.readinto(_bytes_of(out)) != end - start:
            raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
        return out

    def close(self) -> None:
        self._file.close()


class TorchFileReader:
    """A .pth/.bin state dict, unpickled with weights_only=True (never arbitrary code) and memory-mapped."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for corrupt or unsafe pickles
            raise CheckpointError(f"{path}: cannot load as a weights-only PyTorch file ({e})") from None
        if not isinstance(self._state, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors, found {type(self._state).__name__}")

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._state[name].dtype

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        tensor = self._state[name]
        return tensor if out is None else out.copy_(tensor)

    def close(self) -> None:
        self._state = {}


def _open(path: Path) -> SafetensorsReader | TorchFileReader:
    return SafetensorsReader(path) if path.suffix == ".safetensors" else TorchFileReader(path)


# ---- writing tensors -------------------------------------------------------------------------------------------

class TensorPlan(NamedTuple):
    """One tensor of a file to write: its name, shape and dtype in the file, and `make()`, which returns it (in
    any dtype and on any device: it is converted) only when its bytes are written."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors(path: str | os.PathLike, tensors: Iterable[TensorPlan],
                      metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file (readable by the safetensors library and transformers) one tensor at a time.

    The header is built from the plans; then each tensor is made, converted to its dtype and written, so only one
    made tensor is in memory at a time (saving a 93 GB model needs no second copy of it). Each tensor's own bytes
    are written, so views sharing storage (w1 and w3, the halves of one w13) are fine. The tensors are laid out
    from the widest dtype to the narrowest, as safetensors' own writer does, so each starts aligned to its
    element size. Written atomically (`mixtral.io.files.atomic_open`): after an exception neither a new file nor
    a temporary one is left, and an existing file is kept as it was. Raises AssertionError when a made tensor's
    shape is not its plan's.
    """
    plans = sorted(tensors, key=lambda plan: -plan.dtype.itemsize)  # stable: the given order within a width
    header: dict[str, dict] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for plan in plans:
        header[plan.name] = {"dtype": _DTYPE_NAMES[plan.dtype], "shape": list(plan.shape),
                             "data_offsets": [offset, offset + plan.nbytes]}
        offset += plan.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with atomic_open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape, dtype, make in plans:
            tensor = make().detach().to("cpu", dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise AssertionError(f"{name}: made shape {list(tensor.shape)}, planned {list(shape)}")
            f.write(_bytes_of(tensor))


# ---- finding the files -----------------------------------------------------------------------------------------

@dataclass
class CheckpointFiles:
    directory: Path
    config: ModelConfig
    native: bool  # Mistral's layout (params.json) rather than Hugging Face's
    weights: list[Path]


def find_checkpoint(path: str | os.PathLike) -> CheckpointFiles:
    """Inspect a checkpoint directory: its config and weight files. Raises CheckpointError/ConfigError."""
    directory = Path(path)
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such file or directory")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: a checkpoint is a directory (config.json or params.json beside "
                              f"the weights), not a file")
    if (directory / "config.json").exists():
        config = from_hf_dict(read_json(directory / "config.json"), str(directory / "config.json"))
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            weights = [directory / name for name in sorted(set(weight_map.values()))]
        else:
            weights = sorted(directory.glob("model*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
        native = False
    elif (directory / "params.json").exists():
        config = from_params_dict(read_json(directory / "params.json"), str(directory / "params.json"))
        weights = sorted(directory.glob("consolidated*.safetensors")) or sorted(directory.glob("consolidated*.pth"))
        native = True
    elif (directory / "dcp" / ".metadata").exists():
        raise CheckpointError(f"{directory}: a distributed training checkpoint (torch.distributed.checkpoint); "
                              f"write it in the Hugging Face layout first: mixtral convert {directory} OUT --to hf")
    else:
        raise CheckpointError(f"{directory}: not a checkpoint directory (no config.json or params.json)")
    if not weights:
        expected = ("consolidated.safetensors or consolidated*.pth" if native
                    else "model.safetensors, model-*-of-*.safetensors or pytorch_model*.bin")
        raise CheckpointError(f"{directory}: no weight files ({expected})")
    for w in weights:
        if not w.exists():
            raise CheckpointError(f"{w}: weight file listed in the index is missing")
    return CheckpointFiles(directory, config, native, weights)


# ---- loading ---------------------------------------------------------------------------------------------------

_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def load_checkpoint(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    progress: bool = True, quantize: "str | dict | None" = None,
                    experts_sink: "Callable[[int, object, object], None] | None" = None) -> Transformer:
    """Read a checkpoint directory (either layout) into a Transformer in eval mode.

    dtype: the parameters' dtype; None keeps the checkpoint's own. quantize: a precision for every part ("int8",
    "int4", "int3:g64", ...) or one per part ({"experts": "int3", "attention": "int8"}), as `mixtral.quant.quantize`
    takes, with the same result, quantized while reading: the model is built with its quantized modules in place,
    and each matrix they own is read into a staging buffer, quantized into its slot and freed, so the float
    weights are never all in memory (`_Staging`).

    experts_sink(layer, w13, w2): the experts are streamed out instead of kept. The model is built without expert
    weights (each MoE's w13 and w2 are None: it cannot run as it is), and each layer's experts are read into stacks
    of their own (QuantizedExperts, or float tensors [n_experts, out, in] when the experts are not quantized),
    handed to the sink once complete and freed. The peak is then the model without its experts plus one layer's
    experts (plus a staged float matrix). What `mixtral quantize` and the offloading loader use.

    Raises CheckpointError naming the file and tensor for missing, unexpected, misshapen or truncated tensors;
    ConfigError for a bad config file; InputError for an unknown `quantize`.
    """
    files = find_checkpoint(path)
    readers = []
    try:
        for w in files.weights:
            readers.append(_open(w))
        where = {}  # key -> reader
        for reader in readers:
            for key in reader.keys():
                where[key] = reader
        layout = choose_layout(files.config, files.native, set(where))
        ignored = {"lm_head.weight", "output.weight"} if files.config.tie_embeddings else set()
        unexpected = [k for k in where if k not in layout and k not in ignored and not _IGNORED.match(k)]
        if unexpected:
            raise CheckpointError(f"{where[unexpected[0]].path}: unexpected tensor {unexpected[0]!r} "
                                  f"({len(unexpected)} unexpected in all): does config in {files.directory} "
                                  f"match these weights?")
        missing = [k for k in layout if k not in where]
        if missing:
            raise CheckpointError(f"{files.directory}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
        if dtype is None:
            dtype = where[next(iter(layout))].dtype(next(iter(layout)))
        # Each parameter allocated once, already in `dtype`; quantized modules instead of the float matrices.
        on_meta = drop_experts if experts_sink is not None else None
        model = (empty_model(files.config, dtype, on_meta=on_meta) if quantize is None
                 else quant.empty_quantized_model(files.config, dtype, quantize, on_meta=on_meta))
        # names, not the tensors: a layer moved to another device may get new Parameter objects (LayerMover)
        params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        staging = _Staging(quant.quantized_modules(model), dtype)
        streamed = None if experts_sink is None else _LayerExperts(files.config, dtype, quantize, experts_sink)
        to_device = LayerMover(model, [target.param for target in layout.values()], device)
        with torch.no_grad():
            for key, target in tqdm(layout.items(), desc=f"loading {files.directory.name}", unit="tensor",
                                    disable=not progress, leave=False):
                if streamed is not None and streamed.takes(target):
                    streamed.load(where[key], key, target)
                elif target.param in params:
                    _load_one(where[key], key, target, model.get_parameter(target.param))
                else:
                    staging.load(where[key], key, target)
                to_device.done(target.param)
            if streamed is not None:
                streamed.flush()
            if files.config.tie_embeddings and "output" in staging.modules:
                # The checkpoint has no matrix of its own for a tied output: quantize the embeddings.
                quant.quantize_into(staging.modules["output"], None, model.tok_embeddings.weight)
            staging.finish()
    finally:
        for reader in readers:
            reader.close()
    return model.to(device).eval()


_EXPERT_PARAM = re.compile(r"layers\.(\d+)\.moe\.(w13|w2)$")
_LAYER = re.compile(r"layers\.(\d+)\.")


class LayerMover:
    """Moves each layer of a model being filled on the CPU to `device` as soon as the last of its tensors (`names`,
    parameter or module names, in any order and with repeats for tensors filled in parts) is in. For a device
    other than the CPU the host then holds one layer at a time: a layer's memory is freed as it moves, and the
    layers not yet filled were allocated but never written, so they take no memory. The embeddings, final norm and
    output move with the model at the end. Does nothing for the CPU."""

    def __init__(self, model: Transformer, names: Iterable[str], device: str | torch.device):
        self.model, self.device = model, torch.device(device)
        self.left: dict[int, int] = {}
        for name in names:
            if (match := _LAYER.match(name)) is not None:
                self.left[int(match[1])] = self.left.get(int(match[1]), 0) + 1

    def done(self, name: str) -> None:
        """The tensor `name` (one of `names`) is filled."""
        match = _LAYER.match(name)
        if self.device.type == "cpu" or match is None or int(match[1]) not in self.left:
            return
        layer = int(match[1])
        self.left[layer] -= 1
        if self.left[layer] == 0:
            self.model.layers[layer].to(self.device)


def drop_experts(model: Transformer) -> None:
    """Remove every MoE's expert weights (w13 and w2 become None), on the meta device before allocation: the
    model then holds everything but its experts, which live elsewhere (streamed to files, offloaded)."""
    for layer in model.layers:
        for name in ("w13", "w2"):
            delattr(layer.moe, name)
            setattr(layer.moe, name, None)


class _LayerExperts:
    """Reads the experts of one layer at a time into stacks of their own (quantized as the experts part says),
    and hands each complete layer to a sink (`load_checkpoint`'s experts_sink)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, quantize, sink):
        self.config, self.dtype, self.sink = config, dtype, sink
        settings = quant.quantization_settings(quantize) if quantize is not None else {}
        self.precision = settings.get("experts")
        self.layer: int | None = None
        self.stacks: dict[str, object] = {}
        self.staging: _Staging | None = None

    def takes(self, target: Target) -> bool:
        return _EXPERT_PARAM.match(target.param) is not None

    def load(self, reader, key: str, target: Target) -> None:
        layer, name = _EXPERT_PARAM.match(target.param).groups()
        if int(layer) != self.layer:
            self.flush()
            self.layer = int(layer)
            self.stacks = dict(zip(("w13", "w2"), quant.empty_experts(self.config, self.dtype, self.precision)))
            quantized = {n: s for n, s in self.stacks.items() if isinstance(s, quant.Quantized)}
            self.staging = _Staging(quantized, self.dtype)
        local = Target(name, target.index, target.transform, target.transposed)
        if isinstance(self.stacks[name], torch.Tensor):
            _load_one(reader, key, local, self.stacks[name])
        else:
            self.staging.load(reader, key, local)

    def flush(self) -> None:
        """Hand the layer read so far to the sink and free it."""
        if self.layer is None:
            return
        self.staging.finish()
        self.sink(self.layer, self.stacks["w13"], self.stacks["w2"])
        self.layer, self.stacks, self.staging = None, {}, None


def _load_one(reader, key: str, target: Target, param: torch.Tensor) -> None:
    dest = target.select(param)
    file_shape = reader.shape(key)
    if target.transform is None:
        expected = tuple(dest.shape)
    elif target.transposed:
        expected = (dest.shape[0] * dest.shape[2], dest.shape[1])
    else:
        expected = (dest.numel() // dest.shape[-1], dest.shape[-1]) if dest.dim() == 3 else tuple(dest.shape)
    if tuple(file_shape) != expected:
        raise CheckpointError(f"{reader.path}: tensor {key!r} has shape {list(file_shape)}, "
                              f"config expects {list(expected)}")
    direct = (target.transform is None and isinstance(reader, SafetensorsReader)
              and reader.dtype(key) == dest.dtype and dest.is_contiguous())
    if direct:
        reader.read(key, out=dest)
        return
    tensor = reader.read(key)
    if target.transform is not None:
        tensor = target.transform(tensor)
    dest.copy_(tensor)


class _Staging:
    """Fills quantized modules ({name: module}) from float checkpoint tensors, one staged matrix at a time.

    A target that names an expert (index (e, ...): per-expert layouts) is read into a float buffer of that one
    matrix; w1 and w3 of expert e are the two halves of w13[e], so the buffer waits until both are in, then is
    quantized into slot e and freed. A target without an expert index (a fused or stacked layout, a linear) stages
    the whole stack or matrix. So the float memory in use is one matrix (one stack for the stacked layouts).
    """

    def __init__(self, modules: dict[str, quant.Quantized], dtype: torch.dtype):
        self.modules, self.dtype = modules, dtype
        self.pending: dict[tuple[str, int | None], tuple[torch.Tensor, int]] = {}  # -> (buffer, elements read)

    def load(self, reader, key: str, target: Target) -> None:
        name = target.param if target.param in self.modules else target.param.rsplit(".", 1)[0]
        module = self.modules[name]  # the layouts name `P.weight` for a linear, `P` for an expert stack
        experts = isinstance(module, quant.QuantizedExperts)
        per_expert = experts and target.index and isinstance(target.index[0], int)
        slot = target.index[0] if per_expert else None
        if (name, slot) not in self.pending:
            shape = (module.out_features, module.in_features)
            shape = (len(module), *shape) if experts and not per_expert else shape
            self.pending[name, slot] = (torch.empty(shape, dtype=self.dtype), 0)
        buffer, done = self.pending[name, slot]
        part = Target(target.param, target.index[1:] if per_expert else target.index, target.transform,
                      target.transposed)
        _load_one(reader, key, part, buffer)
        done += part.select(buffer).numel()
        if done < buffer.numel():
            self.pending[name, slot] = (buffer, done)
            return
        del self.pending[name, slot]  # the buffer goes once quantized
        for i, matrix in ([(slot, buffer)] if per_expert else enumerate(buffer) if experts else [(None, buffer)]):
            quant.quantize_into(module, i, matrix)

    def finish(self) -> None:
        """Recompute what derives from the filled buffers (every matrix must be complete)."""
        assert not self.pending, f"tensors left half read: {sorted(self.pending)}"  # the layouts cover each matrix
        for module in self.modules.values():
            module.refresh()


# ---- saving ----------------------------------------------------------------------------------------------------

def _plans(model: Transformer, layout: dict[str, Target], dtype: torch.dtype, *,
           interleaved_rotary: bool = False) -> list[TensorPlan]:
    """The tensors of `layout` taken from `model`'s parameters, to write in `dtype`; `interleaved_rotary`: wq and
    wk permuted back to the native layout's interleaved rotary pairs."""
    params = dict(model.named_parameters())
    heads = {"attention.wq.weight": model.config.n_heads, "attention.wk.weight": model.config.n_kv_heads}
    plans = []
    for key, target in layout.items():
        tensor = target.select(params[target.param])
        n_heads = heads.get(key.split(".", 2)[-1]) if interleaved_rotary else None
        make = partial(permute_to_interleaved, tensor, n_heads) if n_heads else (lambda t=tensor: t)
        plans.append(TensorPlan(key, tuple(tensor.shape), dtype, make))
    return plans


def save_hf(model: Transformer, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
            max_shard_bytes: int = 2 * 1024 ** 3) -> Path:
    """Write `model` in the Hugging Face layout that transformers' MixtralForCausalLM/MistralForCausalLM load, in
    `dtype` (default: the model's). Returns the directory.

    Each file is written to a temporary name and renamed into place. Shards of at most `max_shard_bytes` with an
    index when the weights are larger (memory while saving: the weights plus one tensor).
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.output.weight.dtype
    shards: list[list[TensorPlan]] = [[]]
    size = total = 0
    for plan in _plans(model, hf_layout(model.config), dtype):
        if shards[-1] and size + plan.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += plan.nbytes
        total += plan.nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for name, shard in zip(names, tqdm(shards, desc="saving", unit="shard", leave=False, disable=len(shards) == 1)):
        write_safetensors(directory / name, shard)
        weight_map.update({plan.name: name for plan in shard})
    if len(shards) > 1:
        write_json(directory / "model.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(directory / "config.json", to_hf_dict(model.config, dtype_name(dtype)))
    return directory


def save_native(model: Transformer, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Write `model` in Mistral's native layout: params.json + consolidated.safetensors (wq/wk interleaved), in
    `dtype` (default: the model's). Returns the directory."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.output.weight.dtype
    write_safetensors(directory / "consolidated.safetensors",
                      _plans(model, native_layout(model.config), dtype, interleaved_rotary=True))
    write_json(directory / "params.json", to_params_dict(model.config))
    return directory

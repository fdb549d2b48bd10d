"""Checkpoints on disk: Hugging Face and Mistral-native layouts, read lazily and written atomically.

Layouts read (PITFALLS 10):
- Hugging Face: config.json + model.safetensors, or sharded model-0000i-of-0000N.safetensors with
  model.safetensors.index.json (pytorch_model*.bin too, with weights_only=True). Mixtral experts as
  `block_sparse_moe.experts.E.w1/w2/w3` (the released repos) or transformers 5's fused in-memory names
  `mlp.experts.gate_up_proj/down_proj`; Mistral (dense) as `mlp.gate_proj/up_proj/down_proj`.
- Mistral native: params.json + consolidated.safetensors (or consolidated*.pth, unpickled with weights_only=True),
  experts as `feed_forward.experts.E.w1/...`, and the December 2023 release's stacked `block_sparse_moe.w1/w2/w3`
  of shape [E * hidden, dim] whose w2 blocks are transposed. Native wq/wk rotate interleaved pairs; they are
  permuted here into the rotate-half order of the HF layout, which is the one the model uses.

Memory: safetensors files are read tensor by tensor straight into the model's preallocated parameters with
plain reads. A memory map would count every page it touched towards the process's RSS until it is closed, so
loading one big file through a map peaks at twice the weights; reading into place peaks at the weights plus
one tensor (plus one tensor when a dtype conversion or permutation needs a staging copy).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from mixtral import kernels
from mixtral.config import (ModelConfig, from_hf_dict, from_params_dict, read_json, to_hf_dict,
                            to_params_dict)
from mixtral.errors import CheckpointError
from mixtral.model import Transformer

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


# ---- reading tensors -------------------------------------------------------------------------------------------

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
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
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
        view = memoryview(out.view(torch.uint8).numpy()).cast("B") if out.numel() else memoryview(b"")
        if self._file.readinto(view) != end - start:
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


# ---- the layouts -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: parameter `param`, at `index` within it, after `transform`."""
    param: str
    index: tuple = ()
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    transposed: bool = False  # the file holds the transpose of the destination


def permute_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Native wq/wk (rotary pairs interleaved, 2i and 2i+1) -> HF order (pairs i and i + head_dim/2)."""
    out_dim, dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, dim).transpose(1, 2).reshape(out_dim, dim)


def permute_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_to_rotate_half`: HF order -> native order."""
    out_dim, dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, dim).transpose(1, 2).reshape(out_dim, dim)


def hf_layout(config: ModelConfig, fused_experts: bool = False) -> dict[str, Target]:
    """Checkpoint key -> Target for the Hugging Face layout (the one `save_hf` writes)."""
    h = config.hidden_dim
    keys = {"model.embed_tokens.weight": Target("tok_embeddings.weight"),
            "model.norm.weight": Target("norm.weight")}
    if not config.tie_embeddings:
        keys["lm_head.weight"] = Target("output.weight")
    for i in range(config.n_layers):
        p, ours = f"model.layers.{i}", f"layers.{i}"
        keys[f"{p}.input_layernorm.weight"] = Target(f"{ours}.attention_norm.weight")
        keys[f"{p}.post_attention_layernorm.weight"] = Target(f"{ours}.ffn_norm.weight")
        for hf_name, name in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
            keys[f"{p}.self_attn.{hf_name}.weight"] = Target(f"{ours}.attention.{name}.weight")
        if not config.is_moe:
            keys[f"{p}.mlp.gate_proj.weight"] = Target(f"{ours}.moe.w13", (0, slice(0, h)))
            keys[f"{p}.mlp.up_proj.weight"] = Target(f"{ours}.moe.w13", (0, slice(h, 2 * h)))
            keys[f"{p}.mlp.down_proj.weight"] = Target(f"{ours}.moe.w2", (0,))
        elif fused_experts:
            keys[f"{p}.mlp.gate.weight"] = Target(f"{ours}.moe.router.weight")
            keys[f"{p}.mlp.experts.gate_up_proj"] = Target(f"{ours}.moe.w13")
            keys[f"{p}.mlp.experts.down_proj"] = Target(f"{ours}.moe.w2")
        else:
            keys[f"{p}.block_sparse_moe.gate.weight"] = Target(f"{ours}.moe.router.weight")
            for e in range(config.n_experts):
                q = f"{p}.block_sparse_moe.experts.{e}"
                keys[f"{q}.w1.weight"] = Target(f"{ours}.moe.w13", (e, slice(0, h)))
                keys[f"{q}.w3.weight"] = Target(f"{ours}.moe.w13", (e, slice(h, 2 * h)))
                keys[f"{q}.w2.weight"] = Target(f"{ours}.moe.w2", (e,))
    return keys


def native_layout(config: ModelConfig, stacked_experts: bool = False) -> dict[str, Target]:
    """Checkpoint key -> Target for Mistral's native layout (`stacked_experts`: the December 2023 release)."""
    h = config.hidden_dim
    keys = {"tok_embeddings.weight": Target("tok_embeddings.weight"), "norm.weight": Target("norm.weight")}
    if not config.tie_embeddings:
        keys["output.weight"] = Target("output.weight")
    q_perm = lambda w: permute_to_rotate_half(w, config.n_heads)  # noqa: E731
    k_perm = lambda w: permute_to_rotate_half(w, config.n_kv_heads)  # noqa: E731
    for i in range(config.n_layers):
        p = f"layers.{i}"
        keys[f"{p}.attention_norm.weight"] = Target(f"{p}.attention_norm.weight")
        keys[f"{p}.ffn_norm.weight"] = Target(f"{p}.ffn_norm.weight")
        keys[f"{p}.attention.wq.weight"] = Target(f"{p}.attention.wq.weight", transform=q_perm)
        keys[f"{p}.attention.wk.weight"] = Target(f"{p}.attention.wk.weight", transform=k_perm)
        keys[f"{p}.attention.wv.weight"] = Target(f"{p}.attention.wv.weight")
        keys[f"{p}.attention.wo.weight"] = Target(f"{p}.attention.wo.weight")
        if not config.is_moe:
            keys[f"{p}.feed_forward.w1.weight"] = Target(f"{p}.moe.w13", (0, slice(0, h)))
            keys[f"{p}.feed_forward.w3.weight"] = Target(f"{p}.moe.w13", (0, slice(h, 2 * h)))
            keys[f"{p}.feed_forward.w2.weight"] = Target(f"{p}.moe.w2", (0,))
        elif stacked_experts:
            e, d = config.n_experts, config.dim
            keys[f"{p}.block_sparse_moe.gate.weight"] = Target(f"{p}.moe.router.weight")
            keys[f"{p}.block_sparse_moe.w1"] = Target(f"{p}.moe.w13", (slice(None), slice(0, h)),
                                                      transform=lambda w: w.view(e, h, d))
            keys[f"{p}.block_sparse_moe.w3"] = Target(f"{p}.moe.w13", (slice(None), slice(h, 2 * h)),
                                                      transform=lambda w: w.view(e, h, d))
            # Each expert's w2 block is stored as [hidden, dim], the transpose of the [dim, hidden] we keep.
            keys[f"{p}.block_sparse_moe.w2"] = Target(f"{p}.moe.w2", transform=lambda w: w.view(e, h, d).transpose(1, 2),
                                                      transposed=True)
        else:
            keys[f"{p}.feed_forward.gate.weight"] = Target(f"{p}.moe.router.weight")
            for e in range(config.n_experts):
                q = f"{p}.feed_forward.experts.{e}"
                keys[f"{q}.w1.weight"] = Target(f"{p}.moe.w13", (e, slice(0, h)))
                keys[f"{q}.w3.weight"] = Target(f"{p}.moe.w13", (e, slice(h, 2 * h)))
                keys[f"{q}.w2.weight"] = Target(f"{p}.moe.w2", (e,))
    return keys


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

def _choose_layout(files: CheckpointFiles, keys: set[str]) -> dict[str, Target]:
    config = files.config
    if files.native:
        return native_layout(config, stacked_experts="layers.0.block_sparse_moe.w1" in keys)
    return hf_layout(config, fused_experts="model.layers.0.mlp.experts.gate_up_proj" in keys)


_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def load_checkpoint(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    progress: bool = True) -> Transformer:
    """Read a checkpoint directory (either layout) into a Transformer in eval mode.

    dtype: the parameters' dtype; None keeps the checkpoint's own. Raises CheckpointError naming the file and
    tensor for missing, unexpected, misshapen or truncated tensors; ConfigError for a bad config file.
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
        layout = _choose_layout(files, set(where))
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
        with torch.device("meta"):
            model = Transformer(files.config).to(dtype)
        model = model.to_empty(device="cpu")  # allocates each parameter once, already in `dtype`
        kernels.prefer_huge_pages(model)  # before the first write, which then faults in 2 MB pages
        if files.config.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
        params = dict(model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for key, target in tqdm(layout.items(), desc=f"loading {files.directory.name}", unit="tensor",
                                    disable=not progress, leave=False):
                _load_one(where[key], key, target, params[target.param])
    finally:
        for reader in readers:
            reader.close()
    return model.to(device).eval()


def _load_one(reader, key: str, target: Target, param: torch.Tensor) -> None:
    dest = param[target.index] if target.index else param
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


# ---- saving ----------------------------------------------------------------------------------------------------

def _hf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    config = model.config
    params = dict(model.named_parameters())
    fused = False
    for key, target in hf_layout(config, fused).items():
        yield key, params[target.param][target.index] if target.index else params[target.param]


def _native_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    config = model.config
    params = dict(model.named_parameters())
    for key, target in native_layout(config).items():
        tensor = params[target.param][target.index] if target.index else params[target.param]
        if key.endswith("attention.wq.weight"):
            tensor = permute_to_interleaved(tensor, config.n_heads)
        elif key.endswith("attention.wk.weight"):
            tensor = permute_to_interleaved(tensor, config.n_kv_heads)
        yield key, tensor


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _write_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    # Clone: safetensors refuses views that share storage (w1 and w3 are halves of one w13).
    save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}, str(tmp), metadata)
    os.replace(tmp, path)


def save_hf(model: Transformer, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
            max_shard_bytes: int = 2 * 1024 ** 3) -> Path:
    """Write `model` in the Hugging Face layout that transformers' MixtralForCausalLM/MistralForCausalLM load.

    Each file is written to a temporary name and renamed into place. Shards of at most `max_shard_bytes` with an
    index when the weights are larger (memory while saving: the weights plus about one shard).
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.output.weight.dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in _hf_tensors(model):
        nbytes = tensor.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.to(dtype)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    total = 0
    for name, shard in zip(names, tqdm(shards, desc="saving", unit="shard", leave=False, disable=len(shards) == 1)):
        _write_safetensors_atomic(directory / name, shard, {"format": "pt"})
        weight_map.update({key: name for key in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    if len(shards) > 1:
        _write_json_atomic(directory / "model.safetensors.index.json",
                           {"metadata": {"total_size": total}, "weight_map": weight_map})
    dtype_name = str(dtype).removeprefix("torch.")
    _write_json_atomic(directory / "config.json", to_hf_dict(model.config, dtype_name))
    return directory


def save_native(model: Transformer, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Write `model` in Mistral's native layout: params.json + consolidated.safetensors (wq/wk interleaved)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.output.weight.dtype
    tensors = {key: tensor.to(dtype) for key, tensor in _native_tensors(model)}
    _write_safetensors_atomic(directory / "consolidated.safetensors", tensors, {"format": "pt"})
    _write_json_atomic(directory / "params.json", to_params_dict(model.config))
    return directory


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "config.json").exists() or (p / "params.json").exists())



"""Model hyperparameters: one dataclass, named presets, and the two file formats users have.

`ModelConfig` holds the paper's Table 1 (dim, n_layers, head_dim, hidden_dim, n_heads, n_kv_heads, context_len,
vocab_size, n_experts, top_k) plus rope_theta, norm_eps and sliding_window. A model with `n_experts == 1` is
dense (Mistral 7B): one SwiGLU FFN and no router.

Files: Hugging Face `config.json` (MixtralForCausalLM / MistralForCausalLM; both the older top-level
`rope_theta` and the newer `rope_parameters` form) and Mistral's native `params.json` (a `moe` section for
mixtures).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from mixtral.errors import ConfigError, InputError


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 4096
    n_layers: int = 32
    head_dim: int = 128
    hidden_dim: int = 14336
    n_heads: int = 32
    n_kv_heads: int = 8
    context_len: int = 32768
    vocab_size: int = 32000
    n_experts: int = 8  # 1 means a dense FFN without router (Mistral 7B)
    top_k: int = 2
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    sliding_window: int | None = None  # Mixtral has none (an early config said 4096); Mistral 7B v0.1: 4096
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        positive = ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "context_len",
                    "vocab_size", "n_experts", "top_k")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.top_k > self.n_experts:
            raise ConfigError(f"top_k ({self.top_k}) cannot exceed n_experts ({self.n_experts})")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 1

    def param_counts(self) -> tuple[int, int]:
        """(total parameters, parameters active per token): the paper's 46.7B / 12.9B for mixtral-8x7b."""
        attention = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        expert = 3 * self.dim * self.hidden_dim
        router = self.dim * self.n_experts if self.is_moe else 0
        norms = 2 * self.dim
        per_layer_shared = attention + router + norms
        embeddings = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2) + self.dim
        total = embeddings + self.n_layers * (per_layer_shared + self.n_experts * expert)
        active = embeddings + self.n_layers * (per_layer_shared + min(self.top_k, self.n_experts) * expert)
        return total, active


PRESETS: dict[str, ModelConfig] = {
    # The paper's Table 1.
    "mixtral-8x7b": ModelConfig(),
    "mixtral-8x22b": ModelConfig(dim=6144, n_layers=56, head_dim=128, hidden_dim=16384, n_heads=48, n_kv_heads=8,
                                 context_len=65536, vocab_size=32768, n_experts=8, top_k=2, rope_theta=1e6),
    "mistral-7b": ModelConfig(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                              context_len=32768, vocab_size=32000, n_experts=1, top_k=1, rope_theta=1e4,
                              sliding_window=4096),
    # Small random-init models for tests, demos and benchmarks of the code paths.
    "tiny": ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                        context_len=512, vocab_size=32000, n_experts=4, top_k=2),
    "tiny-dense": ModelConfig(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                              context_len=512, vocab_size=32000, n_experts=1, top_k=1, sliding_window=32,
                              rope_theta=1e4),
    "small": ModelConfig(dim=256, n_layers=4, head_dim=32, hidden_dim=512, n_heads=8, n_kv_heads=2,
                         context_len=2048, vocab_size=32000, n_experts=8, top_k=2),
}


def from_name(name: str) -> ModelConfig:
    """The preset called `name`; raises ConfigError listing the known presets."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


# ---- Hugging Face config.json ----------------------------------------------------------------------------------

def _require(data: dict[str, Any], key: str, source: str) -> Any:
    if key not in data:
        raise ConfigError(f"{source}: missing field {key!r}")
    return data[key]


def from_hf_dict(data: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Parse a transformers MixtralConfig / MistralConfig dict. `source` names the file in error messages."""
    model_type = data.get("model_type")
    if model_type not in ("mixtral", "mistral"):
        raise ConfigError(f"{source}: model_type {model_type!r} is not 'mixtral' or 'mistral'")
    dim = _require(data, "hidden_size", source)
    n_heads = _require(data, "num_attention_heads", source)
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConfigError(f"{source}: rope type {rope.get('rope_type')!r} is not supported (only 'default')")
    rope_theta = rope.get("rope_theta", data.get("rope_theta", 1e6 if model_type == "mixtral" else 1e4))
    moe = model_type == "mixtral"
    try:
        return ModelConfig(
            dim=dim,
            n_layers=_require(data, "num_hidden_layers", source),
            head_dim=data.get("head_dim") or dim // n_heads,
            hidden_dim=_require(data, "intermediate_size", source),
            n_heads=n_heads,
            n_kv_heads=data.get("num_key_value_heads") or n_heads,
            context_len=data.get("max_position_embeddings", 32768),
            vocab_size=_require(data, "vocab_size", source),
            n_experts=data.get("num_local_experts", 8) if moe else 1,
            top_k=data.get("num_experts_per_tok", 2) if moe else 1,
            rope_theta=float(rope_theta),
            norm_eps=float(data.get("rms_norm_eps", 1e-5)),
            sliding_window=data.get("sliding_window"),
            tie_embeddings=bool(data.get("tie_word_embeddings", False)),
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def to_hf_dict(config: ModelConfig, dtype: str = "bfloat16") -> dict[str, Any]:
    """A config.json dict that transformers reads as MixtralForCausalLM (or MistralForCausalLM when dense)."""
    data: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if config.is_moe else "MistralForCausalLM"],
        "model_type": "mixtral" if config.is_moe else "mistral",
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "head_dim": config.head_dim,
        "intermediate_size": config.hidden_dim,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "max_position_embeddings": config.context_len,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps,
        # Both spellings: transformers >= 5 reads rope_parameters, older releases read rope_theta.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "sliding_window": config.sliding_window,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if config.is_moe:
        data["num_local_experts"] = config.n_experts
        data["num_experts_per_tok"] = config.top_k
    return data


# ---- Mistral params.json ---------------------------------------------------------------------------------------

def from_params_dict(data: dict[str, Any], source: str = "params.json") -> ModelConfig:
    """Parse Mistral's native params.json (mistral-inference's TransformerArgs; `moe` present for mixtures)."""
    moe = data.get("moe") or {}
    dim = _require(data, "dim", source)
    n_heads = _require(data, "n_heads", source)
    try:
        return ModelConfig(
            dim=dim,
            n_layers=_require(data, "n_layers", source),
            head_dim=data.get("head_dim") or dim // n_heads,
            hidden_dim=_require(data, "hidden_dim", source),
            n_heads=n_heads,
            n_kv_heads=data.get("n_kv_heads") or n_heads,
            context_len=data.get("max_seq_len", data.get("max_position_embeddings", 32768)),
            vocab_size=_require(data, "vocab_size", source),
            n_experts=moe.get("num_experts", 1),
            top_k=moe.get("num_experts_per_tok", 1),
            rope_theta=float(data.get("rope_theta") or _default_native_rope_theta(data)),
            norm_eps=float(data.get("norm_eps", 1e-5)),
            sliding_window=data.get("sliding_window"),
            tie_embeddings=bool(data.get("tied_embeddings", False)),
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _default_native_rope_theta(data: dict[str, Any]) -> float:
    # params.json may omit rope_theta. mistral-inference then uses 1e6 (Mixtral and later models), while
    # Mistral 7B v0.1 (dense, 4096-token sliding window) came with code that hard-coded LLaMA's 1e4.
    return 1e4 if not data.get("moe") and data.get("sliding_window") else 1e6


def to_params_dict(config: ModelConfig) -> dict[str, Any]:
    data: dict[str, Any] = {
        "dim": config.dim,
        "n_layers": config.n_layers,
        "head_dim": config.head_dim,
        "hidden_dim": config.hidden_dim,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads,
        "norm_eps": config.norm_eps,
        "vocab_size": config.vocab_size,
        "rope_theta": config.rope_theta,
        "max_seq_len": config.context_len,
    }
    if config.sliding_window is not None:
        data["sliding_window"] = config.sliding_window
    if config.tie_embeddings:
        data["tied_embeddings"] = True
    if config.is_moe:
        data["moe"] = {"num_experts": config.n_experts, "num_experts_per_tok": config.top_k}
    return data


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON object from `path`; ConfigError naming the file if it is missing or not a JSON object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


def with_overrides(config: ModelConfig, **overrides: Any) -> ModelConfig:
    """A copy of `config` with some fields changed; unknown field names raise ConfigError."""
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ConfigError(f"unknown config field(s) {sorted(unknown)}; fields are {sorted(known)}")
    return replace(config, **overrides)


# ---- dtypes ----------------------------------------------------------------------------------------------------
# The one vocabulary of dtype names, used by the loaders, the CLI, the trainer's config and the benchmarks. The
# canonical names are torch's (and config.json's "torch_dtype"); the short aliases are what people type.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_CHOICES: tuple[str, ...] = (*DTYPES, *DTYPE_ALIASES)  # what a --dtype option accepts


def parse_dtype(dtype: str | torch.dtype | None, allowed: tuple[str, ...] = tuple(DTYPES)) -> torch.dtype | None:
    """A torch dtype from a name ("bfloat16" or its alias "bf16") or a dtype; None stays None (the caller's
    default). `allowed` narrows the canonical names a caller takes. Raises InputError for any other name."""
    if dtype is None:
        return None
    name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else DTYPE_ALIASES.get(dtype, dtype)
    if name not in allowed:
        aliases = [a for a, n in DTYPE_ALIASES.items() if n in allowed]
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join([*allowed, *aliases])}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of a torch dtype ("bfloat16" for torch.bfloat16)."""
    return str(dtype).removeprefix("torch.")


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_size(size: str | int | float, where: str = "size") -> int:
    """Bytes of a memory size: an int, or "12GB", "8.5 GiB", "512MB" (GB = 10^9 bytes, GiB = 2^30; a bare number
    is bytes). Raises InputError naming `where` for anything else."""
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        value, unit = float(size), ""
    else:
        text = str(size).strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        value, unit = None, text[len(number):]
        try:
            value = float(number)
        except ValueError:
            pass
        if value is None or unit not in _SIZE_UNITS:
            raise InputError(f"{where}: {size!r} is not a size (e.g. 12GB, 8GiB, 512MB)")
    if value <= 0:
        raise InputError(f"{where}: {size!r} must be positive")
    return int(value * _SIZE_UNITS[unit])

"""What a training run is: a TOML file read into small dataclasses, with `--section.key value` overrides.

    # configs/tiny.toml
    out_dir = "out/tiny"
    [model]                    # a preset, then any ModelConfig field on top of it
    preset = "tiny"
    vocab_size = 32000
    [data]
    dir = "data/prepared"      # what `mixtral data prepare` wrote
    [train]
    steps = 200

Every key is optional except `data.dir`; the defaults are below, each with where it comes from. A file may start
with `base = "other.toml"` (relative to itself) and change only some keys: the dense baselines do that. Unknown
keys and values of the wrong type raise ConfigError naming the file and key, and listing the keys there are.

Dense baselines (`model.baseline`, from an MoE config; the router's dim x n_experts weights per layer aside):
- "dense-active": one expert of hidden_dim * top_k, the same parameters per token as the MoE;
- "dense-total": one expert of hidden_dim * n_experts, the same parameters in all as the MoE.

The router options (jitter, capacity factor, whether the router trains) live here rather than in `ModelConfig`:
they are choices of a training run, not of the architecture, and no checkpoint format stores them. The trainer
sets them on each `mixtral.moe.MoE`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from mixtral.config import PRESETS, ModelConfig, parse_dtype, with_overrides
from mixtral.errors import ConfigError, InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BASELINES = ("dense-active", "dense-total")
# What a run computes in, named in mixtral.config's dtype vocabulary: "bf16" (or "bfloat16") autocasts to bfloat16
# over float32 master weights; "fp32" (or "float32") is plain float32. The configs use the short names.
TRAIN_DTYPES = ("bfloat16", "float32")


@dataclass
class ModelSection:
    preset: str = "tiny"
    baseline: str | None = None  # None, "dense-active" or "dense-total"
    # Any ModelConfig field (dim, n_layers, ...) may also appear in [model]; they are kept here.
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    dir: str = ""
    seq_len: int = 256
    # Sampling weight per domain (default: proportional to each domain's tokens).
    weights: dict[str, float] | None = None


@dataclass
class OptimSection:
    # AdamW with the betas, decay and clipping of the Llama / Mixtral-era recipes.
    lr: float = 3e-4
    min_lr: float = 3e-5  # the cosine ends here (lr / 10, Chinchilla)
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off


@dataclass
class RouterSection:
    aux_loss_coef: float = 0.01  # load balancing (Switch Transformer; Mixtral's published config uses 0.02)
    aux_loss_mode: str = "per-layer"  # or "pooled", as transformers computes it (mixtral.train.losses)
    z_loss_coef: float = 0.001  # router z-loss (ST-MoE)
    jitter: float = 0.0  # multiplicative noise on the router input (Switch uses 0.01); 0 is off
    capacity_factor: float | None = None  # None: dropless; Switch's default when enabled is 1.25
    train: bool = True  # whether the router's weights train (fine-tuning may want it frozen)


@dataclass
class TrainSection:
    steps: int = 1000
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    dtype: str = "bf16"  # "bf16": autocast with float32 master weights; "fp32" (see TRAIN_DTYPES)
    seed: int = 0  # model init, batches and router jitter
    threads: int = 0  # torch threads; 0 keeps torch's default (the cores this process may use)
    device: str = "cpu"
    log_every: int = 10
    deterministic: bool = True  # torch.use_deterministic_algorithms; needed for bit-exact resume on CUDA

    def torch_dtype(self) -> torch.dtype:
        """torch.bfloat16 or torch.float32 for `dtype`; raises InputError for another name (`check` reports it)."""
        return parse_dtype(self.dtype, allowed=TRAIN_DTYPES)


@dataclass
class EvalSection:
    every: int = 200  # 0: only at the end
    max_windows: int = 64  # validation windows per domain
    batch_size: int = 8


@dataclass
class CheckpointSection:
    every: int = 200  # 0: only at the end
    keep: int = 3  # the newest checkpoints kept; older ones are deleted


@dataclass
class ParallelSection:
    # Under torchrun: the world is ep x dp processes (mixtral.parallel). Experts are spread over ep; every process
    # reads batch_size / (ep x dp) rows of each batch. Without torchrun both must be 1.
    ep: int = 1
    dp: int = 0  # 0: the number of processes / ep
    timeout: float = 300.0  # seconds to wait for every peer at start and for any one collective
    shard_experts: bool = True  # dp > 1: shard each expert over the dp copies (FSDP) rather than copy it whole


@dataclass
class TrainConfig:
    out_dir: str = "out/run"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    router: RouterSection = field(default_factory=RouterSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    def model_config(self) -> ModelConfig:
        """The ModelConfig this run trains: the preset, its fields changed, then the baseline derived."""
        config = with_overrides(PRESETS[self.model.preset], **self.model.fields)
        return dense_baseline(config, self.model.baseline) if self.model.baseline else config

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"] = {k: v for k, v in data["model"].items() if k != "fields"} | self.model.fields
        return data


def sections_of(config: Any) -> dict[str, Any]:
    """The tables of a run's config dataclass (TrainConfig, or a fine-tuning config built the same way): every
    field but out_dir."""
    return {f.name: f for f in fields(config) if f.name != "out_dir"}


def dense_baseline(config: ModelConfig, match: str) -> ModelConfig:
    """The dense model that matches the MoE `config` in active ("dense-active") or total ("dense-total")
    parameters: one SwiGLU FFN of hidden_dim * top_k or hidden_dim * n_experts, everything else the same.

    Raises ConfigError for an unknown `match` or a config that is already dense.
    """
    if match not in BASELINES:
        raise ConfigError(f"unknown baseline {match!r}; choose one of {', '.join(BASELINES)}")
    if not config.is_moe:
        raise ConfigError(f"baseline {match!r} derives a dense model from a mixture, but the model is already "
                          f"dense (n_experts = 1)")
    width = config.top_k if match == "dense-active" else config.n_experts
    return dataclasses.replace(config, n_experts=1, top_k=1, hidden_dim=config.hidden_dim * width)


# ---- reading -----------------------------------------------------------------------------------------------------

def load_config(path: str | os.PathLike | None, overrides: list[str] = (), kind: type = TrainConfig,
                checker: Any = None) -> Any:
    """Read a TOML file (None: all defaults), apply `--section.key value` overrides, check the result.

    overrides: the command line's leftovers, e.g. ["--train.steps", "10", "--optim.lr=1e-3"]. kind: the config
    dataclass (TrainConfig, or another of sections of dataclasses such as the fine-tuning config) and checker
    its check function (default: `check`). Raises ConfigError naming the file or option and the key at fault.
    """
    raw = _read_toml(Path(path)) if path is not None else {}
    source = str(path) if path is not None else "config"
    config = _build(raw, source, kind())
    for key, value in _parse_overrides(overrides):
        _set(config, key, value, f"--{key}")
    (checker or check)(config, f"{source} with the command line's overrides" if overrides else source)
    return config


def _read_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: base {base!r} includes itself")
    merged = _read_toml(base_path, seen + (base_path,))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _build(raw: dict[str, Any], source: str, config: Any) -> Any:
    sections = sections_of(config)
    for key, value in raw.items():
        if key == "out_dir":
            _set(config, key, value, source)
        elif key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{key}] must be a table, got {value!r}")
            for sub, sub_value in value.items():
                _set(config, f"{key}.{sub}", sub_value, source)
        else:
            raise ConfigError(f"{source}: unknown key {key!r}; top-level keys are base, out_dir and the tables "
                              f"{', '.join(f'[{s}]' for s in sections)}")
    return config


def _parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    pairs = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key VALUE "
                              f"(e.g. --train.steps 100)")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ConfigError(f"option {arg} needs a value")
            value = args[i + 1]
            i += 1
        pairs.append((key.replace("-", "_"), value))
        i += 1
    return pairs


def _set(config: Any, key: str, value: Any, source: str) -> None:
    """Set `section.key` (or `out_dir`) from a TOML value or a command-line string, converting and checking it."""
    if key == "out_dir":
        config.out_dir = _convert(value, str, source, key)
        return
    section_name, _, name = key.partition(".")
    sections = sections_of(config)
    if section_name not in sections or not name:
        raise ConfigError(f"{source}: unknown key {key!r}; keys are out_dir and section.key with a section among "
                          f"{', '.join(sections)}")
    section = getattr(config, section_name)
    if section_name == "data" and name.startswith("weights."):  # --data.weights.code 0.5
        weights = dict(section.weights or {})
        weights[name.split(".", 1)[1]] = _convert(value, float, source, key)
        section.weights = weights
        return
    hints = typing.get_type_hints(type(section))
    if isinstance(section, ModelSection) and name not in hints:
        model_hints = typing.get_type_hints(ModelConfig)
        if name not in model_hints:
            raise ConfigError(f"{source}: unknown key {key!r}; [model] takes preset, baseline and the ModelConfig "
                              f"fields {', '.join(model_hints)}")
        section.fields[name] = _convert(value, model_hints[name], source, key)
        return
    if name not in hints or name == "fields":
        known = [n for n in hints if n != "fields"]
        raise ConfigError(f"{source}: unknown key {key!r}; [{section_name}] takes {', '.join(known)}")
    setattr(section, name, _convert(value, hints[name], source, key))


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise ValueError
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not math.isfinite(result := float(value)):
        raise ValueError
    return result


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError
    return value


# type -> (converter, what the error message asks for)
_CONVERT = {bool: (_to_bool, "true or false"), int: (_to_int, "an integer"), float: (_to_float, "a finite number"),
            str: (_to_str, "a string")}


def _convert(value: Any, kind: Any, source: str, key: str) -> Any:
    """A TOML value or command-line string as `kind` (int, float, str, bool, X | None, dict[str, float])."""
    args = typing.get_args(kind)
    if type(None) in args:  # X | None: "none" (any case) means None
        if value is None or isinstance(value, str) and value.lower() in ("none", "null"):
            return None
        kind = next(a for a in args if a is not type(None))
    if typing.get_origin(kind) in (list, tuple):  # a TOML array, or a comma-separated string on the command line
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be an array, got {value!r}")
        return tuple(_convert(item.strip() if isinstance(item, str) else item, typing.get_args(kind)[0], source,
                              f"{key}[{i}]") for i, item in enumerate(items) if item != "")
    if typing.get_origin(kind) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a table of name = number, got {value!r}")
        return {str(k): _convert(v, float, source, f"{key}.{k}") for k, v in value.items()}
    converter, wanted = _CONVERT[kind]
    try:
        return converter(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key} must be {wanted}, got {value!r}") from None


def check(config: TrainConfig, source: str = "config") -> None:
    """Raise ConfigError for values that cannot work, naming the key."""
    def need(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {key} {rule}, got {_get(config, key)!r}")

    if config.model.preset not in PRESETS:
        raise ConfigError(f"{source}: model.preset {config.model.preset!r} is not a preset; presets: "
                          f"{', '.join(PRESETS)}")
    need(config.model.baseline in (None, *BASELINES), "model.baseline", f"must be one of {', '.join(BASELINES)}")
    try:
        config.model_config()
    except ConfigError as e:
        raise ConfigError(f"{source}: [model]: {e}") from None
    need(bool(config.data.dir), "data.dir", "must name a prepared corpus (mixtral data prepare)")
    need(config.data.seq_len >= 1, "data.seq_len", "must be at least 1")
    o = config.optim
    need(o.lr > 0, "optim.lr", "must be positive")
    need(0 <= o.min_lr <= o.lr, "optim.min_lr", "must be between 0 and optim.lr")
    need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(0 <= o.beta1 < 1, "optim.beta1", "must be in [0, 1)")
    need(0 <= o.beta2 < 1, "optim.beta2", "must be in [0, 1)")
    need(o.eps > 0, "optim.eps", "must be positive")
    need(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 turns clipping off)")
    r = config.router
    need(r.aux_loss_coef >= 0, "router.aux_loss_coef", "must be >= 0 (0 turns it off)")
    need(r.aux_loss_mode in ("per-layer", "pooled"), "router.aux_loss_mode", "must be \"per-layer\" or \"pooled\"")
    need(r.z_loss_coef >= 0, "router.z_loss_coef", "must be >= 0 (0 turns it off)")
    need(0 <= r.jitter < 1, "router.jitter", "must be in [0, 1)")
    need(r.capacity_factor is None or r.capacity_factor > 0, "router.capacity_factor",
         "must be positive, or none for dropless routing")
    t = config.train
    need(t.steps >= 1, "train.steps", "must be at least 1")
    need(t.batch_size >= 1, "train.batch_size", "must be at least 1")
    need(t.grad_accum >= 1, "train.grad_accum", "must be at least 1")
    try:
        t.torch_dtype()
    except InputError:
        need(False, "train.dtype", f"must be one of bf16, fp32 (or {', '.join(TRAIN_DTYPES)})")
    need(t.seed >= 0, "train.seed", "must be >= 0")
    need(t.threads >= 0, "train.threads", "must be >= 0 (0: torch's default)")
    need(t.device == "cpu" or t.device.startswith("cuda"), "train.device", "must be cpu or cuda[:N]")
    need(t.log_every >= 1, "train.log_every", "must be at least 1")
    need(config.eval.every >= 0, "eval.every", "must be >= 0 (0: only at the end)")
    need(config.eval.max_windows >= 1, "eval.max_windows", "must be at least 1")
    need(config.eval.batch_size >= 1, "eval.batch_size", "must be at least 1")
    need(config.checkpoint.every >= 0, "checkpoint.every", "must be >= 0 (0: only at the end)")
    need(config.checkpoint.keep >= 1, "checkpoint.keep", "must be at least 1")
    p = config.parallel
    need(p.ep >= 1, "parallel.ep", "must be at least 1")
    need(p.dp >= 0, "parallel.dp", "must be >= 0 (0: the number of processes / parallel.ep)")
    need(p.timeout > 0, "parallel.timeout", "must be positive")


def _get(config: TrainConfig, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)


def from_dict(data: dict[str, Any], source: str, kind: type = TrainConfig, checker: Any = None) -> Any:
    """The inverse of `TrainConfig.to_dict` (what a checkpoint stores); `kind` and `checker` as for load_config."""
    config = _build(data, source, kind())
    (checker or check)(config, source)
    return config


def dumps(config: Any) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"

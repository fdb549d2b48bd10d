"""What a fine-tuning run is: a TOML file read as `mixtral train` reads its own (same rules, same `--section.key
value` overrides, same errors naming file and key), with the sections a fine-tuning run needs.

    # configs/finetune/sft.toml
    out_dir = "out/sft"
    [model]
    path = "default"           # a checkpoint directory, "default" or a preset
    quantize = "int4"          # QLoRA: the frozen base in int8/int4 (unset: float32)
    [lora]
    rank = 16                  # 0: full fine-tuning (every weight but the router trains, the router by option)
    [data]
    train = "data/tasks/sft_train.jsonl"
    val = "data/tasks/sft_val.jsonl"
    [train]
    steps = 500

The optimizer, train, eval and checkpoint sections are `mixtral train`'s (their defaults differ: fine-tuning takes
a higher learning rate for adapters, no weight decay on them and a short warmup). The router's load-balancing and
z-losses apply whenever the router trains, and cannot be turned off then: a tuned router without them collapses
onto a few experts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mixtral.errors import ConfigError
from mixtral.finetune.lora import ATTENTION, LoRAConfig
from mixtral.train.config import (CheckpointSection, EvalSection, OptimSection, TrainSection, _get, from_dict,
                                  load_config)

REFERENCES = ("adapters-off", "precomputed")


@dataclass
class BaseModelSection:
    path: str = "default"
    quantize: str | None = None  # "int8", "int4", or a precision per part; None: float32 (`mixtral.load`)
    tokenizer: str | None = None  # None: the checkpoint's own, else mistral-common's Mixtral tokenizer


@dataclass
class LoRASection:
    rank: int = 16  # 0: full fine-tuning
    alpha: float = 32.0
    dropout: float = 0.0
    attention: tuple[str, ...] = ATTENTION
    experts: bool = True
    train_router: bool = False

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, attention=tuple(self.attention),
                          experts=self.experts, train_router=self.train_router)


@dataclass
class DataSection:
    train: str = ""  # JSONL: conversations (sft) or preference pairs (dpo)
    val: str | None = None  # the held-out file; None: the last val_fraction of train
    val_fraction: float = 0.05
    seq_len: int = 512  # a packed row (sft) or the longest prompt + reply kept (dpo)


@dataclass
class RouterLossSection:
    # Used when the router trains (lora.train_router); must then be positive.
    aux_loss_coef: float = 0.01
    aux_loss_mode: str = "per-layer"
    z_loss_coef: float = 0.001


@dataclass
class DPOSection:
    beta: float = 0.1  # TRL's default
    # "adapters-off": the reference is the same model with its adapters switched off, computed each step (no
    # second copy); "precomputed": the starting model's log-probabilities of every pair, computed once (the only
    # way with full fine-tuning) and kept in OUT/reference_logprobs.safetensors.
    reference: str = "adapters-off"
    # Weight of an SFT term on the chosen replies (their mean token NLL) added to the DPO loss; 0 is plain DPO.
    sft_weight: float = 0.0


@dataclass
class FinetuneConfig:
    out_dir: str = "out/finetune"
    model: BaseModelSection = field(default_factory=BaseModelSection)
    lora: LoRASection = field(default_factory=LoRASection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=2e-4, min_lr=2e-5, warmup_steps=20,
                                                                     weight_decay=0.0))
    router: RouterLossSection = field(default_factory=RouterLossSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    train: TrainSection = field(default_factory=lambda: TrainSection(steps=200, batch_size=8))
    eval: EvalSection = field(default_factory=lambda: EvalSection(every=50, max_windows=64, batch_size=8))
    checkpoint: CheckpointSection = field(default_factory=lambda: CheckpointSection(every=50, keep=2))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["lora"]["attention"] = list(self.lora.attention)
        return data


def check(config: FinetuneConfig, source: str = "config") -> None:
    """Raise ConfigError for values that cannot work, naming the key."""
    def need(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {key} {rule}, got {_get(config, key)!r}")

    need(bool(config.model.path), "model.path", "must name a checkpoint directory, \"default\" or a preset")
    lora = config.lora
    need(lora.rank >= 0, "lora.rank", "must be >= 0 (0: full fine-tuning)")
    need(lora.alpha > 0, "lora.alpha", "must be positive")
    need(0 <= lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
    need(all(a in ATTENTION for a in lora.attention), "lora.attention", f"may name only {', '.join(ATTENTION)}")
    need(lora.rank == 0 or bool(lora.attention) or lora.experts, "lora.attention",
         "must name a projection when lora.experts is false (no adapter at all)")
    need(lora.rank > 0 or config.model.quantize is None, "model.quantize",
         "needs LoRA (lora.rank > 0): quantized base weights are frozen, so full fine-tuning cannot train them")
    need(bool(config.data.train), "data.train", "must name a JSONL file")
    need(0 < config.data.val_fraction < 1, "data.val_fraction", "must be in (0, 1)")
    need(config.data.seq_len >= 2, "data.seq_len", "must be at least 2")
    r = config.router
    if lora.train_router:
        need(r.aux_loss_coef > 0, "router.aux_loss_coef",
             "must be positive when the router trains (lora.train_router): without it the router collapses")
        need(r.z_loss_coef > 0, "router.z_loss_coef", "must be positive when the router trains")
    need(r.aux_loss_mode in ("per-layer", "pooled"), "router.aux_loss_mode", "must be \"per-layer\" or \"pooled\"")
    need(config.dpo.beta > 0, "dpo.beta", "must be positive")
    need(config.dpo.sft_weight >= 0, "dpo.sft_weight", "must not be negative")
    need(config.dpo.reference in REFERENCES, "dpo.reference", f"must be one of {', '.join(REFERENCES)}")
    o, t = config.optim, config.train
    need(o.lr > 0, "optim.lr", "must be positive")
    need(0 <= o.min_lr <= o.lr, "optim.min_lr", "must be between 0 and optim.lr")
    need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 turns clipping off)")
    need(t.steps >= 1, "train.steps", "must be at least 1")
    need(t.batch_size >= 1, "train.batch_size", "must be at least 1")
    need(t.grad_accum >= 1, "train.grad_accum", "must be at least 1")
    need(t.dtype in ("bf16", "bfloat16", "fp32", "float32"), "train.dtype", "must be bf16 or fp32")
    need(t.threads >= 0, "train.threads", "must be >= 0 (0: torch's default)")
    need(t.device == "cpu" or t.device.startswith("cuda"), "train.device", "must be cpu or cuda[:N]")
    need(t.log_every >= 1, "train.log_every", "must be at least 1")
    need(config.eval.every >= 0, "eval.every", "must be >= 0 (0: only at the end)")
    need(config.eval.batch_size >= 1, "eval.batch_size", "must be at least 1")
    need(config.checkpoint.every >= 0, "checkpoint.every", "must be >= 0 (0: only at the end)")
    need(config.checkpoint.keep >= 1, "checkpoint.keep", "must be at least 1")


def load_finetune_config(path, overrides: list[str] = ()) -> FinetuneConfig:
    """A FinetuneConfig from a TOML file and `--section.key value` overrides (ConfigError naming file and key)."""
    return load_config(path, overrides, kind=FinetuneConfig, checker=check)


def finetune_config_from_dict(data: dict[str, Any], source: str) -> FinetuneConfig:
    """The inverse of `FinetuneConfig.to_dict` (what a checkpoint stores)."""
    return from_dict(data, source, kind=FinetuneConfig, checker=check)

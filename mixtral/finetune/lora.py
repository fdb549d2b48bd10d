"""Low-rank adapters (LoRA, Hu et al. 2021) on a Mixtral, wrapping its modules rather than copying them.

    W x  ->  W x + (alpha / rank) · B A x     A [rank, in] (random), B [out, rank] (zeros: starts unchanged)

Targets: the attention projections (`LoRALinear` replaces wq/wk/wv/wo, holding the original as `base`) and every
expert's w13 and w2, as stacks so one module serves a layer: a13 [n_experts, rank, dim], b13 [n_experts,
2·hidden, rank], a2 [n_experts, rank, hidden], b2 [n_experts, dim, rank] (`ExpertLoRA`, set as the MoE's `lora`,
which then runs the layer's experts on the assignments `moe.sort_by_expert` gives, as the grouped dispatch does).
The base weights are frozen and may be float or quantized (`mixtral.quant`, QLoRA): their products go through
`FrozenLinear`, which saves nothing of the weight for the backward pass and multiplies by it again there (a
quantized weight is expanded again), so no float copy of a quantized base outlives its product. The router is
frozen unless `train_router` (then the trainer must keep the load-balancing and z-losses on: a tuned router
without them collapses onto a few experts).

`merge_lora` folds the adapters into float base weights (the result saves in the HF layout as any model);
`save_adapters` / `load_adapters` keep them on their own (safetensors + JSON).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mixtral.errors import CheckpointError, InputError
from mixtral.io.checkpoint import SafetensorsReader, TensorPlan, write_safetensors
from mixtral.io.files import write_json
from mixtral.kernels import QuantizedWeight
from mixtral.model import Transformer
from mixtral.moe import MoE, sort_by_expert
from mixtral.quant import Quantized

ATTENTION = ("wq", "wk", "wv", "wo")
FORMAT = "mixtral-lora"
VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which modules get adapters and how large. scale = alpha / rank multiplies B A."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapters' input only, in training
    attention: tuple[str, ...] = ATTENTION  # which attention projections
    experts: bool = True  # every expert's w13 and w2
    train_router: bool = False

    def __post_init__(self):
        if self.rank < 1:
            raise InputError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = [name for name in self.attention if name not in ATTENTION]
        if unknown:
            raise InputError(f"unknown attention projection {unknown[0]!r}; choose among {', '.join(ATTENTION)}")
        object.__setattr__(self, "attention", tuple(self.attention))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class FrozenLinear(torch.autograd.Function):
    """x · wᵀ for a frozen weight w (a float tensor or a `QuantizedWeight`): no gradient for w, and no copy of it
    kept for the backward pass, which computes dx = dy · w from w again (for a quantized weight: expanded again,
    one matrix at a time). The forward runs without autograd, so a quantized weight uses its inference kernels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w) -> torch.Tensor:
        ctx.w = w
        return _frozen_product(x, w)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        w = ctx.w
        dense = w.dequantize(dy.dtype) if isinstance(w, QuantizedWeight) else w.to(dy.dtype)
        return dy @ dense, None


def _init_a(a: torch.Tensor) -> None:
    """A as PEFT draws it (Kaiming-uniform with a = sqrt(5), nn.Linear's default), each stacked matrix alike."""
    for matrix in a.view(-1, *a.shape[-2:]):
        nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))


def _weight_of(module: nn.Module):
    """The weight a Linear or QuantizedLinear multiplies by: a tensor or a QuantizedWeight."""
    return module._weight() if isinstance(module, Quantized) else module.weight


class LoRALinear(nn.Module):
    """base(x) + scale · B A x for a bias-free `base` (mixtral.model.Linear or quant.QuantizedLinear), frozen."""

    def __init__(self, base: nn.Module, config: LoRAConfig):
        super().__init__()
        self.base, self.scale = base, config.scale
        self.in_features, self.out_features = base.in_features, base.out_features
        device = next(iter(base.buffers() if isinstance(base, Quantized) else base.parameters())).device
        self.lora_a = nn.Parameter(torch.empty(config.rank, self.in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, config.rank, device=device))
        _init_a(self.lora_a)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled():
            base = FrozenLinear.apply(flat, _weight_of(self.base))
        else:
            base = self.base(flat)  # the inference kernels (GEMV while decoding)
        low = (self.dropout(flat) @ self.lora_a.to(flat.dtype).t()) @ self.lora_b.to(flat.dtype).t()
        return (base + self.scale * low).view(*x.shape[:-1], self.out_features)


class ExpertLoRA(nn.Module):
    """Adapters of every expert of one MoE layer, and the layer's experts run with them (the MoE's `lora`)."""

    def __init__(self, moe: MoE, config: LoRAConfig):
        super().__init__()
        n_experts, hidden, dim = _expert_shape(moe)
        device = _expert_device(moe)
        self.scale = config.scale
        self.a13 = nn.Parameter(torch.empty(n_experts, config.rank, dim, device=device))
        self.b13 = nn.Parameter(torch.zeros(n_experts, 2 * hidden, config.rank, device=device))
        self.a2 = nn.Parameter(torch.empty(n_experts, config.rank, hidden, device=device))
        self.b2 = nn.Parameter(torch.zeros(n_experts, dim, config.rank, device=device))
        _init_a(self.a13)
        _init_a(self.a2)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, w13, w2, weights: torch.Tensor, experts: torch.Tensor,
                kept: torch.Tensor | None) -> torch.Tensor:
        """What `moe_grouped` computes, each expert's w13 and w2 with its adapter added. x [tokens, dim]."""
        a = sort_by_expert(weights, experts, len(self.a13), kept)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        dtype = x.dtype
        for e, s in a.slices():
            xs = x[a.token_of[s]]
            h = self._product(xs, w13[e], self.a13[e], self.b13[e])
            gate, up = h.chunk(2, dim=-1)
            y = self._product(F.silu(gate) * up, w2[e], self.a2[e], self.b2[e])
            out.index_add_(0, a.token_of[s], y.float() * a.gates[s, None])
        if torch.is_grad_enabled():
            # Every adapter takes part in every backward pass, with zero gradients where its expert got no
            # tokens: data-parallel training all-reduces every gradient, and a rank without one would hang.
            out = out + 0.0 * sum(p.sum() for p in self.parameters())
        return out.to(dtype)

    def _product(self, xs: torch.Tensor, w, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        base = FrozenLinear.apply(xs, w) if torch.is_grad_enabled() else _frozen_product(xs, w)
        return base + self.scale * ((self.dropout(xs) @ a.to(xs.dtype).t()) @ b.to(xs.dtype).t())


def _frozen_product(x: torch.Tensor, w) -> torch.Tensor:
    """x · wᵀ for a float tensor or a QuantizedWeight (its kernels), in x's dtype."""
    return w.linear(x) if isinstance(w, QuantizedWeight) else F.linear(x, w.to(x.dtype))


def _expert_shape(moe: MoE) -> tuple[int, int, int]:
    """(n_experts, hidden_dim, dim) of a layer's experts, float or quantized."""
    if isinstance(moe.w13, Quantized):
        return len(moe.w13), moe.w13.out_features // 2, moe.w13.in_features
    if moe.w13 is None:
        raise InputError("this model's experts are offloaded; LoRA needs them in memory")
    n, hidden2, dim = moe.w13.shape
    return n, hidden2 // 2, dim


def _expert_device(moe: MoE) -> torch.device:
    return moe.w13.qweight.device if isinstance(moe.w13, Quantized) else moe.w13.device


def apply_lora(model: Transformer, config: LoRAConfig | None = None) -> Transformer:
    """Freeze `model` and add adapters as `config` says (in place; returns `model`). Its forward is unchanged
    until the adapters train (B starts at zero). Raises InputError for a model that already has adapters or whose
    experts are offloaded."""
    config = config or LoRAConfig()
    if getattr(model, "lora_config", None) is not None:
        raise InputError("this model already has LoRA adapters (merge_lora them first)")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers:
        for name in config.attention:
            setattr(layer.attention, name, LoRALinear(getattr(layer.attention, name), config))
        if config.experts:
            layer.moe.lora = ExpertLoRA(layer.moe, config)
        if config.train_router and layer.moe.router is not None:
            layer.moe.router.weight.requires_grad_(True)
    model.lora_config = config
    return model


def adapter_parameters(model: Transformer) -> dict[str, nn.Parameter]:
    """{name: parameter} of what trains: the adapters, and the routers with train_router."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@contextmanager
def adapters_off(model: Transformer) -> Iterator[Transformer]:
    """Run `model` as its base inside the block (every adapter's scale 0): the reference model of DPO without a
    second copy of the weights. A trained router stays as trained (it is not an adapter)."""
    modules = [m for m in model.modules() if isinstance(m, (LoRALinear, ExpertLoRA))]
    scales = [m.scale for m in modules]
    for m in modules:
        m.scale = 0.0
    try:
        yield model
    finally:
        for m, scale in zip(modules, scales):
            m.scale = scale


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight (W += scale · B A, in float32) and remove the adapters, in place;
    returns `model`, a plain Transformer again. Raises InputError where a base weight is quantized (merge into
    the float model instead: load it unquantized and `load_adapters`)."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise InputError("this model has no LoRA adapters to merge")
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            for name in config.attention:
                wrapped = getattr(layer.attention, name)
                if isinstance(wrapped.base, Quantized):
                    raise InputError(f"layers.{i}.attention.{name} is quantized: merge the adapters into the float "
                                     f"model (load it unquantized, then load_adapters)")
                w = wrapped.base.weight
                w.copy_((w.float() + wrapped.scale * wrapped.lora_b.float() @ wrapped.lora_a.float()).to(w.dtype))
                setattr(layer.attention, name, wrapped.base)
            lora = layer.moe.lora
            if lora is not None:
                if isinstance(layer.moe.w13, Quantized):
                    raise InputError(f"layers.{i}.moe's experts are quantized: merge the adapters into the float "
                                     f"model (load it unquantized, then load_adapters)")
                for w, a, b in ((layer.moe.w13, lora.a13, lora.b13), (layer.moe.w2, lora.a2, lora.b2)):
                    w.copy_((w.float() + lora.scale * torch.bmm(b.float(), a.float())).to(w.dtype))
                layer.moe.lora = None
    model.lora_config = None
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save_adapters(model: Transformer, directory: str | os.PathLike) -> Path:
    """Write the adapters (and the routers, with train_router) of `model` into `directory`: adapter_config.json
    (the LoRAConfig, and the base model's shape) and adapter_model.safetensors, each written atomically.
    Returns the directory."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise InputError("this model has no LoRA adapters to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_parameters(model)
    write_safetensors(directory / WEIGHTS_FILE,
                      [TensorPlan(name, tuple(p.shape), p.dtype, lambda p=p: p) for name, p in tensors.items()],
                      {"format": "pt", "adapters": FORMAT})
    base = model.config
    write_json(directory / CONFIG_FILE, {
        "format": FORMAT, "version": VERSION, **dataclasses.asdict(config),
        "base": {"dim": base.dim, "n_layers": base.n_layers, "hidden_dim": base.hidden_dim,
                 "n_experts": base.n_experts, "vocab_size": base.vocab_size}})
    return directory


def read_adapter_config(directory: str | os.PathLike) -> LoRAConfig:
    """The LoRAConfig of adapters saved by `save_adapters`; CheckpointError naming the file and field if bad."""
    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read LoRA adapter config: {e}") from e
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a {FORMAT} version {VERSION} adapter config "
                              f"(format {data.get('format')!r}, version {data.get('version')!r})")
    fields = {f.name for f in dataclasses.fields(LoRAConfig)}
    try:
        return LoRAConfig(**{k: v for k, v in data.items() if k in fields})
    except (TypeError, InputError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def load_adapters(model: Transformer, directory: str | os.PathLike) -> Transformer:
    """Add the adapters saved in `directory` to `model` (in place; returns it). Raises CheckpointError naming the
    file and tensor for a missing, unexpected or misshapen one (the model is then left without adapters)."""
    config = read_adapter_config(directory)
    apply_lora(model, config)
    path = Path(directory) / WEIGHTS_FILE
    expected = adapter_parameters(model)
    try:
        reader = SafetensorsReader(path)
    except (OSError, CheckpointError) as e:
        _strip(model)
        raise CheckpointError(f"{path}: cannot read LoRA adapters: {e}") from e
    try:
        names = set(reader.keys())
        problem = next((f"missing tensor {n!r}" for n in expected if n not in names), None)
        problem = problem or next((f"unexpected tensor {n!r}" for n in sorted(names) if n not in expected), None)
        problem = problem or next((f"tensor {n!r} has shape {list(reader.shape(n))}, the model's is {list(p.shape)}"
                                   for n, p in expected.items() if tuple(reader.shape(n)) != tuple(p.shape)), None)
        if problem:
            raise CheckpointError(f"{path}: {problem}")
        with torch.no_grad():
            for name, p in expected.items():
                p.copy_(reader.read(name))
    except BaseException:
        _strip(model)
        raise
    finally:
        reader.close()
    return model


def _strip(model: Transformer) -> None:
    """Remove adapters without merging them (after a failed load)."""
    config = model.lora_config
    for layer in model.layers:
        for name in config.attention:
            setattr(layer.attention, name, getattr(layer.attention, name).base)
        layer.moe.lora = None
    model.lora_config = None

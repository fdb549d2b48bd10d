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
import logging
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
from mixtral.moe import MoE, compute_dtype, _slices, moe_grouped, pad_by_expert, sort_by_expert
from mixtral.quant import Quantized

ATTENTION = ("wq", "wk", "wv", "wo")
FORMAT = "mixtral-lora"
VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

log = logging.getLogger("mixtral")


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
        return _times_weight(dy, ctx.w, dy.dtype), None


def _init_a(a: torch.Tensor) -> None:
    """A as PEFT draws it (Kaiming-uniform with a = sqrt(5), nn.Linear's default), each stacked matrix alike."""
    for matrix in a.view(-1, *a.shape[-2:]):
        nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))


def _weight_of(module: nn.Module):
    """The weight a Linear or QuantizedLinear multiplies by: a tensor or a QuantizedWeight."""
    return module._weight() if isinstance(module, Quantized) else module.weight


class LoRALinear(nn.Module):
    """base(x) + scale · B A x for a bias-free `base` (mixtral.model.Linear or quant.QuantizedLinear), frozen.

    In training the product runs as one `LoRAProduct` (x cast to the compute dtype once, the low-rank term added
    into the base product in place, a hand-written backward); `fused = False`, or dropout in training, runs the
    reference: autograd through FrozenLinear and the two low-rank matmuls."""

    def __init__(self, base: nn.Module, config: LoRAConfig):
        super().__init__()
        self.base, self.scale = base, config.scale
        self.in_features, self.out_features = base.in_features, base.out_features
        device = next(iter(base.buffers() if isinstance(base, Quantized) else base.parameters())).device
        self.lora_a = nn.Parameter(torch.empty(config.rank, self.in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, config.rank, device=device))
        _init_a(self.lora_a)
        self.dropout = nn.Dropout(config.dropout)
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if not torch.is_grad_enabled():
            y = self.base(flat)  # the inference kernels (GEMV while decoding)
            if self.scale:
                y = y + self.scale * ((flat @ self.lora_a.to(flat.dtype).t()) @ self.lora_b.to(flat.dtype).t())
        elif self.fused and not (self.training and self.dropout.p > 0):
            dtype = compute_dtype(flat)
            with torch.autocast(flat.device.type, enabled=False):
                y = LoRAProduct.apply(flat.to(dtype), self.lora_a, self.lora_b, _weight_of(self.base), self.scale)
        else:
            y = self._reference(flat)
        return y.view(*x.shape[:-1], self.out_features)

    def _reference(self, flat: torch.Tensor) -> torch.Tensor:
        base = FrozenLinear.apply(flat, _weight_of(self.base))
        low = (self.dropout(flat) @ self.lora_a.to(flat.dtype).t()) @ self.lora_b.to(flat.dtype).t()
        return base + self.scale * low


class LoRAProduct(torch.autograd.Function):
    """x · wᵀ + scale · (x · Aᵀ) · Bᵀ for a frozen w (tensor or QuantizedWeight), in x's dtype, with gradients for
    x, A and B. Saves x and u = x · Aᵀ [rows, rank], not w: the backward multiplies by w again (a quantized one
    expanded again), as FrozenLinear does. Autograd's graph of the same sum casts x twice and runs seven ops more
    per projection; on a loaded 2-core machine every op costs a thread barrier (measured ~7 ms each)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w, scale: float) -> torch.Tensor:
        a_c, b_c = a.to(x.dtype), b.to(x.dtype)
        u = x @ a_c.t()  # [rows, rank]
        y = _frozen_product(x, w)
        if scale:
            y.addmm_(u, b_c.t(), alpha=scale)
        ctx.save_for_backward(x, u, a_c, b_c)
        ctx.w, ctx.scale, ctx.dtypes = w, scale, (a.dtype, b.dtype)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, u, a_c, b_c = ctx.saved_tensors
        dy = dy.to(x.dtype)
        du = (dy @ b_c).mul_(ctx.scale)  # [rows, rank]
        db = (dy.t() @ u).mul_(ctx.scale).to(ctx.dtypes[1]) if ctx.needs_input_grad[2] else None
        da = (du.t() @ x).to(ctx.dtypes[0]) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _times_weight(dy, ctx.w, x.dtype)
            dx.addmm_(du, a_c)
        return dx, da, db, None, None


class ExpertLoRA(nn.Module):
    """Adapters of every expert of one MoE layer, and the layer's experts run with them (the MoE's `lora`).

    In training all experts run in one `ExpertLoRASwiGLU` on the expert-sorted rows; `fused = False`, or dropout
    in training (which the fused function does not implement), runs `_reference`: a loop of per-expert autograd
    ops, the oracle of the fused path."""

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
        self.fused = True

    def forward(self, x: torch.Tensor, w13, w2, weights: torch.Tensor, experts: torch.Tensor,
                kept: torch.Tensor | None) -> torch.Tensor:
        """What `moe_grouped` computes, each expert's w13 and w2 with its adapter added. x [tokens, dim]."""
        if not torch.is_grad_enabled() and self.scale == 0:
            return moe_grouped(x, w13, w2, weights, experts, kept)  # adapters off: the base's inference kernels
        if not self.fused or (self.training and self.dropout.p > 0 and torch.is_grad_enabled()):
            if self.fused:
                _log_reference_once("LoRA dropout in training: the expert adapters run the reference path")
            return self._reference(x, w13, w2, weights, experts, kept)
        a = sort_by_expert(weights, experts, len(self.a13), kept)
        xs, rows, padded = pad_by_expert(x, a.experts, a.token_of, a.counts)  # as the grouped dispatch pads them
        with torch.autocast(x.device.type, enabled=False):
            ys = ExpertLoRASwiGLU.apply(xs, self.a13, self.b13, self.a2, self.b2, w13, w2, self.scale, padded)[rows]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        out.index_add_(0, a.token_of, ys.float() * a.gates[:, None])  # the gates' gradient reaches the router
        return out.to(x.dtype)

    def _reference(self, x: torch.Tensor, w13, w2, weights: torch.Tensor, experts: torch.Tensor,
                   kept: torch.Tensor | None) -> torch.Tensor:
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


class ExpertLoRASwiGLU(torch.autograd.Function):
    """Every expert's SwiGLU with its adapters on its contiguous slice of expert-sorted rows (`counts` per expert),
    as `moe.GroupedSwiGLU` runs the plain experts, with a hand-written backward. For expert e, rows x [n, dim]:

        u13 = x · A13ᵀ                h = x · W13ᵀ + s · u13 · B13ᵀ    [n, 2·hidden]: gate, up
        act = silu(gate) · up          u2 = act · A2ᵀ                   y = act · W2ᵀ + s · u2 · B2ᵀ   [n, dim]

    Saves x, h, silu(gate), act, u13 and u2 (the rank-wide products: [n, rank]); not the frozen weights, which the
    backward reads again (a float stack cast to the compute dtype one expert at a time, a quantized one expanded
    again as FrozenLinear does). Gradients for x and the four adapter stacks, zero for an expert without rows (so
    every adapter has a gradient every step, as data-parallel training needs: every rank must hand in every
    gradient to the all-reduce). Computes in xs's dtype; gradients come back in the adapters' dtype.
    """

    @staticmethod
    def forward(ctx, xs: torch.Tensor, a13: torch.Tensor, b13: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor,
                w13, w2, scale: float, counts: list[int]) -> torch.Tensor:
        dtype = xs.dtype
        rank, hidden = a2.shape[1], a2.shape[2]
        a13_c, b13_c, a2_c, b2_c = (t.to(dtype) for t in (a13, b13, a2, b2))
        hs = xs.new_empty(len(xs), 2 * hidden)  # gate and up pre-activations
        act = xs.new_empty(len(xs), 2 * hidden)  # silu(gate), then silu(gate) * up
        u13, u2 = xs.new_empty(len(xs), rank), xs.new_empty(len(xs), rank)
        ys = xs.new_empty(len(xs), b2.shape[1])
        for e, s in _slices(counts):
            x = xs[s]
            torch.mm(x, a13_c[e].t(), out=u13[s])
            _base_product(x, w13, e, out=hs[s])
            hs[s].addmm_(u13[s], b13_c[e].t(), alpha=scale)
            silu, a = act[s, :hidden], act[s, hidden:]
            torch.ops.aten.silu.out(hs[s, :hidden], out=silu)
            torch.mul(silu, hs[s, hidden:], out=a)
            torch.mm(a, a2_c[e].t(), out=u2[s])
            _base_product(a, w2, e, out=ys[s])
            ys[s].addmm_(u2[s], b2_c[e].t(), alpha=scale)
        ctx.save_for_backward(xs, hs, act, u13, u2, a13_c, b13_c, a2_c, b2_c)
        ctx.w13, ctx.w2, ctx.scale, ctx.counts = w13, w2, scale, counts
        ctx.dtypes = tuple(t.dtype for t in (a13, b13, a2, b2))
        return ys

    @staticmethod
    def backward(ctx, dys: torch.Tensor):
        xs, hs, act, u13, u2, a13_c, b13_c, a2_c, b2_c = ctx.saved_tensors
        dtype, hidden, scale = xs.dtype, a2_c.shape[2], ctx.scale
        dys = dys.to(dtype)
        need_x = ctx.needs_input_grad[0]
        grads = [torch.zeros_like(t) for t in (a13_c, b13_c, a2_c, b2_c)]  # zeros stay for experts without rows
        da13, db13, da2, db2 = grads
        dxs = torch.empty_like(xs) if need_x else None
        dh = torch.empty_like(hs)  # d gate, d up
        du13, du2 = torch.empty_like(u13), torch.empty_like(u2)
        b13_s, b2_s = b13_c * scale, b2_c * scale  # the low-rank products' gradients all carry the scale
        for e, s in _slices(ctx.counts):
            gate, up = hs[s, :hidden], hs[s, hidden:]
            silu, a = act[s, :hidden], act[s, hidden:]
            dy = dys[s]
            torch.mm(dy.t(), u2[s], out=db2[e])
            torch.mm(dy, b2_s[e], out=du2[s])
            torch.mm(du2[s].t(), a, out=da2[e])
            da = _times_weight(dy, ctx.w2[e], dtype)  # [rows, hidden]
            da.addmm_(du2[s], a2_c[e])
            torch.ops.aten.silu_backward.grad_input(da * up, gate, grad_input=dh[s, :hidden])
            torch.mul(da, silu, out=dh[s, hidden:])
            torch.mm(dh[s].t(), u13[s], out=db13[e])
            torch.mm(dh[s], b13_s[e], out=du13[s])
            torch.mm(du13[s].t(), xs[s], out=da13[e])
            if need_x:
                dxs[s] = _times_weight(dh[s], ctx.w13[e], dtype)
                dxs[s].addmm_(du13[s], a13_c[e])
        db13.mul_(scale)
        db2.mul_(scale)
        da13, db13, da2, db2 = (g.to(d) for g, d in zip(grads, ctx.dtypes))
        return dxs, da13, db13, da2, db2, None, None, None, None


def _base_product(x: torch.Tensor, w, e: int, out: torch.Tensor) -> None:
    """out = x · w[e]ᵀ for expert e of a float stack or of `QuantizedExperts` (its inference kernels)."""
    if isinstance(w, torch.Tensor):
        torch.mm(x, w[e].to(x.dtype).t(), out=out)
    else:
        out.copy_(w[e].linear(x))


# Output rows of a quantized weight expanded at a time in the backward pass: 2048 rows of 4096 inputs are 16 MB in
# bf16, where the whole of an 8x7B expert's w13 would be 235 MB (and more while it is unpacked).
EXPANSION_ROWS = 2048


def _times_weight(dy: torch.Tensor, w, dtype: torch.dtype) -> torch.Tensor:
    """dy [n, out] · w [out, in] in `dtype`: the input's gradient of a frozen product. A quantized w is expanded
    EXPANSION_ROWS output rows at a time, the partial products summed in float32, so the backward pass never holds
    a whole expanded matrix."""
    if not isinstance(w, QuantizedWeight) or w.out_features <= EXPANSION_ROWS:
        return dy.to(dtype) @ _dense(w, dtype)
    dx = torch.zeros(len(dy), w.in_features, dtype=torch.float32, device=dy.device)
    for start in range(0, w.out_features, EXPANSION_ROWS):
        rows = slice(start, min(start + EXPANSION_ROWS, w.out_features))
        part = dataclasses.replace(w, qweight=w.qweight[rows], scales=w.scales[rows],
                                   zeros=None if w.zeros is None else w.zeros[rows],
                                   bias=None if w.bias is None else w.bias[:, rows], out_features=rows.stop - start)
        dx += dy[:, rows].to(dtype) @ part.dequantize(dtype)
    return dx.to(dtype)


def _dense(w, dtype: torch.dtype) -> torch.Tensor:
    """A frozen weight as a float matrix in `dtype`: a tensor cast, a QuantizedWeight expanded."""
    return w.dequantize(dtype) if isinstance(w, QuantizedWeight) else w.to(dtype)


_logged: set[str] = set()


def _log_reference_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.info(message)


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
        remove_adapters(model)
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
        remove_adapters(model)
        raise
    finally:
        reader.close()
    return model


def remove_adapters(model: Transformer) -> None:
    """Drop every adapter without merging it (after a failed load, or to get the base model back): the model runs
    its base weights again; they stay frozen as apply_lora left them."""
    config = model.lora_config
    for layer in model.layers:
        for name in config.attention:
            setattr(layer.attention, name, getattr(layer.attention, name).base)
        layer.moe.lora = None
    model.lora_config = None

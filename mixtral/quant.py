"""Weight-only int8 and int4 quantization: swap a model's matrices for quantized ones, in place (gpt-fast style).

What is quantized (`targets`): "experts" (each MoE's w13/w2), "attention" (wq, wk, wv, wo), "output" (the LM head).
Never the router (a quantized gate reorders near-tied logits and so changes which experts run; vLLM, AutoAWQ and
llama.cpp keep it in full precision too), the embeddings or the norms.

    int8: symmetric, a scale per output channel       w[o, k] = q[o, k] · scale[o]                       q in -127..127
    int4: asymmetric (min-max), a scale and a zero    w[o, k] = (q[o, k] - 8) · scale[o, g] + zero[o, g]  q in 0..15
          per group of `group_size` inputs, g = k // group_size (the convention of torch's int4 kernels too)

This module does the maths of quantizing (`quantize_int8`, `quantize_int4`; `quantize_into` puts one matrix into its
slot of a quantized module, the one path both `quantize` and the quantize-while-loading readers take) and swaps the
model's modules for `QuantizedLinear` / `QuantizedExperts`, whose buffers each product hands to the CPU backend as a
`mixtral.kernels.QuantizedWeight`: the backend picks the kernel by the rows of x (int8: torch's int8 kernel, int4:
gemv.c's GEMV, for few rows; the weight expanded to bf16 + torch's GEMM from there; in a MoE layer on AMX, amx.c
expanding the experts' weights into its tiles; `mixtral.kernels.quantized` and `policy` have the crossovers). Scales
and zeros are bf16 numbers, rounded *before* the integers are computed, so every kernel multiplies by exactly the
stored values.

In memory the int4 integers are already in the layout of quantized checkpoints, so loading them is a straight
read. Saving and loading quantized models: `mixtral.io.quantized` (the file format is described there).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mixtral import kernels
from mixtral.config import ModelConfig
from mixtral.errors import InputError
from mixtral.kernels import QuantizedWeight
from mixtral.kernels import dequantize_int4, dequantize_int8  # noqa: F401 (re-exported beside quantize_int4/8)
from mixtral.model import Transformer, empty_model
from mixtral.moe import MoE

MODES = ("int8", "int4")
TARGETS = ("experts", "attention", "output")
GROUP_SIZES = (32, 64, 128, 256)  # multiples of gemv_int4's 32-weight blocks
_BF16_TINY = torch.finfo(torch.bfloat16).tiny  # the scale of an all-zero row or group: any nonzero value works
_ATTENTION = ("wq", "wk", "wv", "wo")
_BLOCK_ELEMENTS = 1 << 20  # weights quantized at a time by `quantize_into`: float32 temporaries of 4 MB each


# ---- one matrix: quantize (dequantizing is the backend's: mixtral.kernels.packing) ----------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q int8 [out, in], scales bfloat16 [out]) with w ≈ q · scales[:, None]."""
    w = w.float()
    scales = (w.abs().amax(dim=-1) / 127).clamp(min=_BF16_TINY).to(torch.bfloat16)
    q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q uint8 [out, in] in 0..15, scales, zeros bfloat16 [out, in / group_size]).

    Min-max per group: q = 0 is the group's minimum and q = 15 its maximum, w ≈ (q - 8) · scale + zero.
    """
    out_features, in_features = w.shape
    groups = w.float().view(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=_BF16_TINY).to(torch.bfloat16)
    zeros = (low + 8 * scales.float()).to(torch.bfloat16)
    minimum = zeros.float() - 8 * scales.float()  # what q = 0 means after rounding scale and zero to bf16
    q = torch.round((groups - minimum[..., None]) / scales.float()[..., None]).clamp_(0, 15)
    return q.to(torch.uint8).view(out_features, in_features), scales, zeros


# ---- the modules that replace the model's ----------------------------------------------------------------------

class Quantized(nn.Module):
    """What `quantize` puts in a model (`QuantizedLinear`, `QuantizedExperts`): the buffers of one matrix
    ([out, in]) or of a stack of them ([n_experts, out, in]), quantized.

    int8: qweight int8 [..., out, in] and scales [..., out] in the model's dtype (so `.to(dtype)` keeps them with
    the activations; their values are bf16 numbers whatever the dtype).
    int4: qweight uint8 [..., out, in / 2], scales and zeros bfloat16 [..., out, groups] (kept bf16 through
    `.to(dtype)`: the kernels read them as such, and the values are bf16 numbers anyway), and the derived,
    unsaved bias float32 [..., groups, out], recomputed by `refresh()` after every move or load.
    """

    def __init__(self, mode: str, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group_size: int | None, out_features: int, in_features: int):
        super().__init__()
        self.mode, self.group_size, self.out_features, self.in_features = mode, group_size, out_features, in_features
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        if mode == "int4":
            self.register_buffer("zeros", zeros)
            self.register_buffer("bias", None, persistent=False)
            self.refresh()

    def refresh(self) -> None:
        """Recompute what derives from the stored buffers (int4: bf16 scales and zeros, the kernel's bias)."""
        if self.mode == "int4" and self.scales.device.type != "meta":
            self.scales, self.zeros = self.scales.to(torch.bfloat16), self.zeros.to(torch.bfloat16)
            self.bias = kernels.int4_bias(self.scales, self.zeros)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.refresh()
        return self

    @property
    def stored_in_features(self) -> int:
        """Columns as stored: in_features, rounded up to whole groups for int4 (see `int4_layout`)."""
        return self.qweight.shape[-1] * (2 if self.mode == "int4" else 1)

    def _weight(self, *index: int) -> QuantizedWeight:
        if self.mode == "int8":
            return QuantizedWeight("int8", self.qweight[index], self.scales[index], None, None, None,
                                   self.out_features, self.in_features)
        return QuantizedWeight("int4", self.qweight[index], self.scales[index], self.zeros[index], self.bias[index],
                               self.group_size, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"{self.mode}, in_features={self.in_features}, out_features={self.out_features}{group}"


class QuantizedLinear(Quantized):
    """Replaces a bias-free nn.Linear (attention projections, output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._weight().linear(x.reshape(-1, x.shape[-1]))
        return y.view(*x.shape[:-1], self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, computed afresh on each access (a full pass over it), for inspection: int8 in the
        model's dtype, int4 in bfloat16 (the dtype of its scales)."""
        return self._weight().dequantize()


class QuantizedExperts(Quantized):
    """Replaces an MoE's stacked expert weight (w13 or w2): `len()` experts, `[e]` one `QuantizedWeight`."""

    def __len__(self) -> int:
        return self.qweight.shape[0]

    def __getitem__(self, e: int) -> QuantizedWeight:
        return self._weight(e)


def quantize_into(module: Quantized, index: int | None, weight: torch.Tensor) -> None:
    """Quantize one matrix `weight` [out, in] (any float dtype, on the CPU) into `module`'s buffers: expert `index`
    of a QuantizedExperts, or (index None) a QuantizedLinear's whole matrix. The one place a matrix is quantized,
    by `quantize` and by the loaders that quantize while reading. int4 columns are padded to the module's stored
    width with copies of the last one. The int4 bias is not updated: call `module.refresh()` once every slot is
    filled (one pass over the stack instead of one per expert)."""
    slot = () if index is None else (index,)
    # Rows are quantized independently, so a block of rows at a time gives the same result with float32
    # temporaries of a bounded size instead of several copies of the matrix (an output head is the largest).
    step = max(1, _BLOCK_ELEMENTS // weight.shape[-1])
    with torch.no_grad():
        for start in range(0, weight.shape[0], step):
            rows = slice(start, start + step)
            _quantize_rows(module, (*slot, rows), weight[rows])


def _quantize_rows(module: Quantized, where: tuple, weight: torch.Tensor) -> None:
    if module.mode == "int8":
        q, scales = quantize_int8(weight)
        module.qweight[where].copy_(q)
        module.scales[where].copy_(scales)  # the buffer's dtype is the model's; the values stay bf16 numbers
        return
    padded = module.stored_in_features
    if padded > weight.shape[-1]:
        weight = F.pad(weight.float()[None], (0, padded - weight.shape[-1]), mode="replicate")[0]
    q, scales, zeros = quantize_int4(weight, module.group_size)
    module.qweight[where].copy_(kernels.pack_int4(q))
    module.scales[where].copy_(scales)
    module.zeros[where].copy_(zeros)


def int4_layout(in_features: int, group_size: int) -> tuple[int, int]:
    """(group size, stored columns) of an int4 matrix with `in_features` inputs: `group_size`, or for a shorter row
    the smallest allowed group that holds it; the columns rounded up to whole groups."""
    group = group_size if in_features >= group_size else min(g for g in GROUP_SIZES if g >= in_features)
    return group, -(-in_features // group) * group


def empty_quantized(w: torch.Tensor, mode: str, group_size: int, cls: type[Quantized],
                    device: str | torch.device | None = None) -> Quantized:
    """A `cls` module for a weight of w's shape and dtype ([out, in], or [n, out, in] for QuantizedExperts; a meta
    tensor will do), its buffers uninitialised on `device` (default: w's), to fill with `quantize_into`."""
    *lead, n, in_features = w.shape
    group, k = int4_layout(in_features, group_size) if mode == "int4" else (None, in_features)
    device = w.device if device is None else device
    if mode == "int8":
        qweight = torch.empty(*lead, n, k, dtype=torch.int8, device=device)
        scales = torch.empty(*lead, n, dtype=w.dtype, device=device)
        zeros = None
    else:
        qweight = torch.empty(*lead, n, k // 2, dtype=torch.uint8, device=device)
        scales = torch.empty(*lead, n, k // group, dtype=torch.bfloat16, device=device)
        zeros = torch.empty_like(scales)
    return cls(mode, qweight, scales, zeros, group, n, in_features)


def _quantized(w: torch.Tensor, mode: str, group_size: int, cls: type[Quantized]) -> Quantized:
    # Quantized on the CPU one matrix at a time (the float32 temporaries are one matrix, not the stack).
    module = empty_quantized(w, mode, group_size, cls, device="cpu")
    w = w.detach()
    for i, matrix in enumerate(w if cls is QuantizedExperts else [w]):
        quantize_into(module, i if cls is QuantizedExperts else None, matrix.cpu())
    module.refresh()
    return module.to(w.device)


def quantize_linear(linear: nn.Linear, mode: str, *, group_size: int = 128) -> QuantizedLinear:
    """A QuantizedLinear with `linear`'s (bias-free) weight; the activations' dtype stays `linear.weight`'s."""
    check_settings(mode, (), group_size)
    if linear.bias is not None:
        raise InputError("quantize_linear takes a linear layer without bias")
    return _quantized(linear.weight, mode, group_size, QuantizedLinear)


# ---- the model -------------------------------------------------------------------------------------------------

def check_settings(mode: str, targets: Iterable[str], group_size: int) -> tuple[str, ...]:
    """The targets as a tuple, once `mode`, every target and (int4) `group_size` are known ones; raises InputError
    naming the first that is not. What `quantize` takes, and what a quantized checkpoint's config must hold."""
    if mode not in MODES:
        raise InputError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    targets = tuple(targets)
    for t in targets:
        if t not in TARGETS:
            raise InputError(f"unknown quantization target {t!r}; choose among {', '.join(TARGETS)}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise InputError(f"int4 group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}")
    return targets


def quantization_plan(module: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
    """(name, parent, attribute) of every matrix `targets` selects in a Transformer or a single MoE: the attribute
    is "moe" for an MoE's expert stacks (w13 and w2), else the name of the nn.Linear on `parent`. What `quantize`
    replaces, and what `empty_quantized_model` replaces on the meta device before allocating.
    Raises InputError for a module that is neither."""
    if isinstance(module, MoE):
        return [("", module, "moe")] if "experts" in targets else []
    if not isinstance(module, Transformer):
        raise InputError(f"quantize takes a mixtral Transformer or MoE, not {type(module).__name__}")
    plan = []
    for i, layer in enumerate(module.layers):
        if "attention" in targets:
            plan += [(f"layers.{i}.attention.{a}", layer.attention, a) for a in _ATTENTION]
        if "experts" in targets:
            plan.append((f"layers.{i}.moe", layer.moe, "moe"))
    if "output" in targets:
        plan.append(("output", module, "output"))
    return plan


def quantize(module: nn.Module, mode: str, *, group_size: int = 128,
             targets: Iterable[str] = TARGETS) -> nn.Module:
    """Quantize a `Transformer` (or a single `MoE`) in place and return it.

    mode: "int8" (per-channel) or "int4" (groups of `group_size` inputs: 32, 64, 128 or 256; a matrix with fewer
    inputs uses one group per row). targets: any of "experts", "attention", "output". The router, embeddings and
    norms stay as they are. Each float weight is freed as soon as its replacement exists, so the peak is the model
    plus one quantized matrix stack (and float32 temporaries of a block of rows, `quantize_into`). The loaders
    quantize while reading instead (`empty_quantized_model` + `quantize_into`), with the same result.
    Raises InputError for an unknown mode, target or group size, or a module already quantized.
    """
    targets = check_settings(mode, targets, group_size)
    if any(isinstance(m, Quantized) for m in module.modules()):
        raise InputError("this model is already quantized; load the unquantized weights to quantize again")
    _swap(module, mode, group_size, targets, _quantized)
    module.quantization = _settings(mode, group_size, targets)
    return module


def _settings(mode: str, group_size: int | None, targets: Iterable[str]) -> dict:
    return {"mode": mode, "group_size": group_size if mode == "int4" else None, "targets": list(targets)}


def _swap(model: nn.Module, mode: str, group_size: int, targets: tuple[str, ...], make) -> None:
    """Replace each matrix `targets` selects by make(float weight, mode, group_size, cls), freeing each float
    weight before the next one is made."""
    for _, parent, attr in quantization_plan(model, targets):
        if attr != "moe":
            setattr(parent, attr, make(getattr(parent, attr).weight, mode, group_size, QuantizedLinear))
            continue
        for w in ("w13", "w2"):
            quantized = make(getattr(parent, w), mode, group_size, QuantizedExperts)
            delattr(parent, w)
            setattr(parent, w, quantized)


def empty_quantized_model(config: ModelConfig, dtype: torch.dtype, mode: str, *, group_size: int = 128,
                          targets: Iterable[str] = TARGETS) -> Transformer:
    """A Transformer (`mixtral.model.empty_model`, uninitialised memory) whose `targets` are already empty quantized
    modules: the float weights they replace are never allocated. Loaders fill the plain tensors in place and the
    quantized modules with `quantize_into` (then `refresh()`). Its `quantization_of` is set.
    Raises InputError for an unknown mode, target or group size."""
    targets = check_settings(mode, targets, group_size)
    model = empty_model(config, dtype, on_meta=lambda m: _swap(m, mode, group_size, targets, empty_quantized))
    model.quantization = _settings(mode, group_size, targets)
    return model


def quantized_modules(model: nn.Module) -> dict[str, Quantized]:
    """{module name: module} of the quantized modules in `model`, in `named_modules` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Quantized)}


def quantization_of(model: nn.Module) -> dict | None:
    """{"mode", "group_size", "targets"} of a model `quantize` changed, else None."""
    return getattr(model, "quantization", None)

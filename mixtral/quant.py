"""Weight-only quantization (int8, int4, int3, int2): swap a model's matrices for quantized ones, in place
(gpt-fast style), with a precision chosen per part.

The parts (`targets`): "experts" (each MoE's w13/w2), "attention" (wq, wk, wv, wo), "output" (the LM head); each
int8, int4, int3, int2 or left in the model's float dtype ("bf16"/"none"), e.g.
`quantize(model, {"experts": "int3", "attention": "int8", "output": "int8"})` or, as the CLI writes it,
"experts=int3:g64:search,attention=int8" (`Precision`, `parse_precision`, `parse_quantize_option`). Never the router
(a quantized gate reorders near-tied logits and so changes which experts run; vLLM, AutoAWQ and llama.cpp keep it in
full precision too), the embeddings or the norms.

    int8: symmetric, a scale per output channel       w[o, k] = q[o, k] · scale[o]                       q in -127..127
    int4: asymmetric (min-max), a scale and a zero    w[o, k] = (q[o, k] - 8) · scale[o, g] + zero[o, g]  q in 0..15
          per group of `group_size` inputs, g = k // group_size (the convention of torch's int4 kernels too)
    int3, int2: as int4 with 8 or 4 levels           w[o, k] = (q[o, k] - 2^(b-1)) · scale[o, g] + zero[o, g]
          and groups of 16-128; scales and zeros fitted to the group's reconstruction error rather than its
          min and max (`quantize_lowbit`: "search" by default, HQQ's half-quadratic solver as "hqq")

This module does the maths of quantizing (`quantize_int8`, `quantize_int4`, `quantize_lowbit`; `quantize_into` puts
one matrix into its slot of a quantized module, the one path both `quantize` and the quantize-while-loading
readers take) and swaps the model's modules for `QuantizedLinear` / `QuantizedExperts`, whose buffers each product
hands to the CPU backend as a `mixtral.kernels.QuantizedWeight`: the backend picks the kernel by the rows of x
(int8: torch's int8 kernel; int4: gemv.c's GEMV, int3/int2: lowbit.c's, for few rows; the weight expanded to bf16
+ torch's GEMM from there; in a MoE layer on AMX, amx.c expanding the experts' weights into its tiles;
`mixtral.kernels.quantized` and `policy` have the crossovers). Scales and zeros are bf16 numbers, rounded *before*
the integers are computed, so every kernel multiplies by exactly the stored values.

In memory the int4/int3/int2 integers are already in the layout of quantized checkpoints (`stored_layout`), so
loading them is a straight read. Saving and loading quantized models: `mixtral.io.quantized` (the file format is
described there).
"""
from __future__ import annotations

import dataclasses
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

MODES = ("int8", "int4", "int3", "int2")
GROUP_SIZES_BY_MODE = {"int4": (32, 64, 128, 256), "int3": (16, 32, 64, 128), "int2": (16, 32, 64, 128)}
FITS = ("minmax", "search", "hqq")  # how int3/int2 scales and zeros are fitted (see quantize_lowbit)
# The fit of int3/int2 when none is named. "search": on the default model's experts it halves int3 g64's loss
# increase over min-max (eval loss on held-out code: bf16 3.4573, int3:g64 minmax 3.4652, search 3.4611, hqq
# 3.4648; int2:g32 3.4981 / 3.4929 / 3.4953) and cuts the squared error by 14-37%, where HQQ's (fitted to an lp
# norm, not the squared error) cuts 7-13%; and it costs 0.4-0.8 s per 14336x4096 matrix on 2 cores (min-max:
# 0.2-0.3; HQQ: 5-6 s, over an hour for Mixtral-8x7B's 766 expert matrices).
LOWBIT_FIT = "search"
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
    return quantize_lowbit(w, 4, group_size, "minmax")


def quantize_lowbit(w: torch.Tensor, bits: int, group_size: int,
                    fit: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q uint8 [out, in] in 0..2^bits - 1, scales, zeros bfloat16 [out, in / group_size]) with
    w ≈ (q - 2^(bits-1)) · scale + zero per group of `group_size` inputs (in a multiple of it); bits 2..4.

    fit (None: LOWBIT_FIT), how each group's scale and zero are chosen:
        "minmax"  q = 0 is the group's minimum, the top level its maximum (int4's fit);
        "search"  the range shrunk toward its middle by each of LOWBIT_SHRINK, the one that reconstructs the
                  group with the least squared error kept (1.0 is min-max: never worse than it);
        "hqq"     the zero fitted by the half-quadratic solver of HQQ (Badri & Shaji, 2023: minimise the lp norm,
                  p < 1, of the error by alternating an lp shrinkage of it with a closed-form zero), the scale
                  min-max's; a group keeps min-max's fit where that has the smaller squared error.
    Scales and zeros are rounded to bf16 before q is computed (q is then the nearest level to each weight), so
    every kernel multiplies by exactly the stored values. Deterministic; an all-equal group gets a tiny scale and
    its value as zero. Float32 temporaries a few times w's size: `quantize_into` feeds blocks of rows. Raises
    InputError for an unknown fit.
    """
    fit = fit or LOWBIT_FIT
    if fit not in FITS:
        raise InputError(f"unknown quantization fit {fit!r}; choose one of {', '.join(FITS)}")
    out_features, in_features = w.shape
    groups = w.float().view(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales, zeros = _range_fit(low, high, bits)
    if fit == "search":
        scales, zeros = _search_fit(groups, low, high, bits, scales, zeros)
    elif fit == "hqq":
        scales, zeros = _hqq_fit(groups, low, high, bits, scales, zeros)
    q = _nearest_levels(groups, scales, zeros, bits)
    return q.to(torch.uint8).view(out_features, in_features), scales, zeros


# Fractions of each group's range that "search" tries. On the default model's experts the groups' choices were
# int3 g64: 0.8-0.9 for 84% of groups, 0.7 or less for 0.3%; int2 g16: 0.75-0.9 for 68%, 0.65 or less for 2.6%.
LOWBIT_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
HQQ_OPTIONS = {"p": 0.7, "beta": 10.0, "kappa": 1.01, "iters": 20}  # HQQ's published defaults


def _range_fit(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 (scale, zero) mapping [low, high] onto the levels 0..2^bits - 1."""
    half = 1 << (bits - 1)
    scales = ((high - low) / ((1 << bits) - 1)).clamp(min=_BF16_TINY).to(torch.bfloat16)
    return scales, (low + half * scales.float()).to(torch.bfloat16)


def _nearest_levels(groups: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 level 0..2^bits - 1 nearest each weight of groups [out, groups, size] for bf16 scales/zeros."""
    scale = scales.float()
    minimum = zeros.float() - (1 << (bits - 1)) * scale  # what q = 0 means after rounding scale and zero to bf16
    q = (groups - minimum[..., None]).div_(scale[..., None])
    return q.round_().clamp_(0, (1 << bits) - 1)


def _squared_error(groups: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Σ (w - dequantized w)² per group, [out, groups]."""
    q = _nearest_levels(groups, scales, zeros, bits)
    error = q.sub_(1 << (bits - 1)).mul_(scales.float()[..., None]).add_(zeros.float()[..., None]).sub_(groups)
    return error.square_().sum(dim=-1)


def _search_fit(groups, low, high, bits, scales, zeros):
    best = _squared_error(groups, scales, zeros, bits)
    middle, radius = (low + high) / 2, (high - low) / 2
    for shrink in LOWBIT_SHRINK[1:]:
        s, z = _range_fit(middle - shrink * radius, middle + shrink * radius, bits)
        error = _squared_error(groups, s, z, bits)
        better = error < best
        best = torch.where(better, error, best)
        scales, zeros = torch.where(better, s, scales), torch.where(better, z, zeros)
    return scales, zeros


def _hqq_fit(groups, low, high, bits, scales, zeros):
    # HQQ's own form: q = round(w · inverse + zero_q), w ≈ (q - zero_q) / inverse, the scale fixed at min-max's.
    levels, p = (1 << bits) - 1, HQQ_OPTIONS["p"]
    beta = HQQ_OPTIONS["beta"]
    inverse = (levels / (high - low).clamp(min=1e-30))[..., None]
    zero_q = -low[..., None] * inverse
    best, best_zero = torch.full_like(low, float("inf")), zero_q[..., 0].clone()
    for _ in range(HQQ_OPTIONS["iters"]):
        q = torch.addcmul(zero_q, groups, inverse).round_().clamp_(0, levels)
        error = groups - (q - zero_q) / inverse  # [out, groups, size]
        mean_error = error.abs().mean(dim=-1)  # HQQ's stopping measure; kept per group here
        better = mean_error < best
        best = torch.where(better, mean_error, best)
        best_zero = torch.where(better, zero_q[..., 0], best_zero)
        # The proximal step of |e|^p: shrink the error toward 0 by |e|^(p-1) / beta (outliers shrink least), then
        # the zero that best explains the weights minus the shrunk error.
        magnitude = error.abs()
        shrunk = error.sign().mul_((magnitude - magnitude.pow(p - 1) / beta).clamp_(min=0))
        zero_q = (q - (groups - shrunk) * inverse).mean(dim=-1, keepdim=True)
        beta *= HQQ_OPTIONS["kappa"]
    scale = 1 / inverse[..., 0]
    hqq_scales = scale.clamp(min=_BF16_TINY).to(torch.bfloat16)
    hqq_zeros = ((1 << (bits - 1)) - best_zero).mul_(hqq_scales.float()).to(torch.bfloat16)
    better = _squared_error(groups, hqq_scales, hqq_zeros, bits) < _squared_error(groups, scales, zeros, bits)
    return torch.where(better, hqq_scales, scales), torch.where(better, hqq_zeros, zeros)


# ---- the modules that replace the model's ----------------------------------------------------------------------

class Quantized(nn.Module):
    """What `quantize` puts in a model (`QuantizedLinear`, `QuantizedExperts`): the buffers of one matrix
    ([out, in]) or of a stack of them ([n_experts, out, in]), quantized.

    int8: qweight int8 [..., out, in] and scales [..., out] in the model's dtype (so `.to(dtype)` keeps them with
    the activations; their values are bf16 numbers whatever the dtype).
    int4: qweight uint8 [..., out, in / 2], scales and zeros bfloat16 [..., out, groups] (kept bf16 through
    `.to(dtype)`: the kernels read them as such, and the values are bf16 numbers anyway), and the derived,
    unsaved bias float32 [..., groups, out], recomputed by `refresh()` after every move or load.
    int3, int2: qweight uint8 [..., out, in · bits / 8] (`kernels.pack_lowbit`), scales and zeros as int4's, no
    bias: lowbit.c reads the zeros themselves (a float32 bias per group would add 2 bits a weight at g16).
    (in: the stored columns, `stored_layout`.)
    """

    def __init__(self, mode: str, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group_size: int | None, out_features: int, in_features: int):
        super().__init__()
        self.mode, self.group_size, self.out_features, self.in_features = mode, group_size, out_features, in_features
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        if mode != "int8":
            self.register_buffer("zeros", zeros)
            self.register_buffer("bias", None, persistent=False)
            self.refresh()

    def refresh(self) -> None:
        """Recompute what derives from the stored buffers (int4/int3/int2: bf16 scales and zeros; int4: the
        kernel's bias)."""
        if self.mode != "int8" and self.scales.device.type != "meta":
            self.scales, self.zeros = self.scales.to(torch.bfloat16), self.zeros.to(torch.bfloat16)
            if self.mode == "int4":
                self.bias = kernels.int4_bias(self.scales, self.zeros)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.refresh()
        return self

    @property
    def bits(self) -> int:
        """Bits per stored weight: 8, 4, 3 or 2."""
        return int(self.mode.removeprefix("int"))

    @property
    def stored_in_features(self) -> int:
        """Columns as stored: in_features, rounded up to whole groups for int4/int3/int2 (see `stored_layout`)."""
        return self.qweight.shape[-1] * 8 // self.bits

    def _weight(self, *index: int) -> QuantizedWeight:
        if self.mode == "int8":
            return QuantizedWeight("int8", self.qweight[index], self.scales[index], None, None, None,
                                   self.out_features, self.in_features)
        bias = None if self.bias is None else self.bias[index]
        return QuantizedWeight(self.mode, self.qweight[index], self.scales[index], self.zeros[index], bias,
                               self.group_size, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode != "int8" else ""
        fit = getattr(self, "fit", None)
        fit = f", fit={fit}" if fit and self.mode in ("int3", "int2") else ""
        return f"{self.mode}, in_features={self.in_features}, out_features={self.out_features}{group}{fit}"


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


def quantize_into(module: Quantized, index: int | None, weight: torch.Tensor, fit: str | None = None) -> None:
    """Quantize one matrix `weight` [out, in] (any float dtype, on the CPU) into `module`'s buffers: expert `index`
    of a QuantizedExperts, or (index None) a QuantizedLinear's whole matrix. The one place a matrix is quantized,
    by `quantize` and by the loaders that quantize while reading. int4/int3/int2 columns are padded to the
    module's stored width with copies of the last one. fit: how int3/int2 scales and zeros are fitted (FITS; None:
    the module's `fit` attribute if it has one, else LOWBIT_FIT). The int4 bias is not updated: call
    `module.refresh()` once every slot is filled (one pass over the stack instead of one per expert)."""
    fit = fit or getattr(module, "fit", None) or LOWBIT_FIT
    slot = () if index is None else (index,)
    # Rows are quantized independently, so a block of rows at a time gives the same result with float32
    # temporaries of a bounded size instead of several copies of the matrix (an output head is the largest).
    step = max(1, _BLOCK_ELEMENTS // weight.shape[-1])
    with torch.no_grad():
        for start in range(0, weight.shape[0], step):
            rows = slice(start, start + step)
            _quantize_rows(module, (*slot, rows), weight[rows], fit)


def _quantize_rows(module: Quantized, where: tuple, weight: torch.Tensor, fit: str) -> None:
    if module.mode == "int8":
        q, scales = quantize_int8(weight)
        module.qweight[where].copy_(q)
        module.scales[where].copy_(scales)  # the buffer's dtype is the model's; the values stay bf16 numbers
        return
    padded = module.stored_in_features
    if padded > weight.shape[-1]:
        weight = F.pad(weight.float()[None], (0, padded - weight.shape[-1]), mode="replicate")[0]
    if module.mode == "int4":
        q, scales, zeros = quantize_int4(weight, module.group_size)
        packed = kernels.pack_int4(q)
    else:
        q, scales, zeros = quantize_lowbit(weight, module.bits, module.group_size, fit)
        packed = kernels.pack_lowbit(q, module.bits)
    module.qweight[where].copy_(packed)
    module.scales[where].copy_(scales)
    module.zeros[where].copy_(zeros)


def stored_layout(mode: str, in_features: int, group_size: int | None) -> tuple[int | None, int]:
    """(group size, stored columns) of a `mode` matrix with `in_features` inputs. int8: (None, in_features).
    int4/int3/int2: `group_size`, or for a shorter row the smallest group the mode allows that holds it
    (GROUP_SIZES_BY_MODE); the columns rounded up to whole groups and to a multiple of 32 (the kernels' blocks:
    int3/int2 groups of 16 come in pairs)."""
    if mode == "int8":
        return None, in_features
    allowed = GROUP_SIZES if mode == "int4" else GROUP_SIZES_BY_MODE[mode]
    group = group_size if in_features >= group_size else min(g for g in allowed if g >= in_features)
    block = max(group, 32)  # group sizes are powers of two: a multiple of both
    return group, -(-in_features // block) * block


def empty_quantized(w: torch.Tensor, mode: str, group_size: int, cls: type[Quantized],
                    device: str | torch.device | None = None) -> Quantized:
    """A `cls` module for a weight of w's shape and dtype ([out, in], or [n, out, in] for QuantizedExperts; a meta
    tensor will do), its buffers uninitialised on `device` (default: w's), to fill with `quantize_into`."""
    *lead, n, in_features = w.shape
    group, k = stored_layout(mode, in_features, group_size)
    device = w.device if device is None else device
    if mode == "int8":
        qweight = torch.empty(*lead, n, k, dtype=torch.int8, device=device)
        scales = torch.empty(*lead, n, dtype=w.dtype, device=device)
        zeros = None
    else:
        qweight = torch.empty(*lead, n, k * int(mode.removeprefix("int")) // 8, dtype=torch.uint8, device=device)
        scales = torch.empty(*lead, n, k // group, dtype=torch.bfloat16, device=device)
        zeros = torch.empty_like(scales)
    return cls(mode, qweight, scales, zeros, group, n, in_features)


def _empty_quantized(w: torch.Tensor, precision: "Precision", cls: type[Quantized],
                     device: str | torch.device | None = None) -> Quantized:
    """`empty_quantized` for a part's precision, the fit recorded for `quantize_into`."""
    module = empty_quantized(w, precision.mode, precision.group_size, cls, device)
    module.fit = precision.fit
    return module


def _quantized(w: torch.Tensor, precision: "Precision", cls: type[Quantized]) -> Quantized:
    # Quantized on the CPU one matrix at a time (the float32 temporaries are one matrix, not the stack).
    module = _empty_quantized(w, precision, cls, device="cpu")
    w = w.detach()
    for i, matrix in enumerate(w if cls is QuantizedExperts else [w]):
        quantize_into(module, i if cls is QuantizedExperts else None, matrix.cpu())
    module.refresh()
    return module.to(w.device)


def quantize_linear(linear: nn.Linear, mode: str, *, group_size: int | None = None) -> QuantizedLinear:
    """A QuantizedLinear with `linear`'s (bias-free) weight; the activations' dtype stays `linear.weight`'s.
    mode: a precision spec as `quantize` takes ("int8", "int4", "int3:g64", ...); group_size: its default group."""
    precision = parse_precision(mode, group_size=group_size, where="quantize_linear")
    if precision is None:
        raise InputError(f"quantize_linear needs a quantization mode, not {mode!r}")
    if linear.bias is not None:
        raise InputError("quantize_linear takes a linear layer without bias")
    return _quantized(linear.weight, precision, QuantizedLinear)


# ---- the model: a precision per part ---------------------------------------------------------------------------

# Each part's default group size: int4's 128 is where its error stops improving much for the bytes (docs/
# performance.md, accuracy); int3 and int2 need smaller groups to keep the error in check, and g16 for int2 is
# mixtral-offloading's recipe for experts.
DEFAULT_GROUP_SIZES = {"int4": 128, "int3": 64, "int2": 16}
UNQUANTIZED = ("bf16", "none")  # how a spec says "leave this part in the model's float dtype"


@dataclasses.dataclass(frozen=True)
class Precision:
    """How one part of a model is quantized: `mode`, with its `group_size` (int4/int3/int2) and, for int3 and
    int2, how scales and zeros are fitted (`fit`, None: `LOWBIT_FIT`). Written as a spec string: "int8",
    "int4:g128", "int3:g64", "int2:g16:hqq"."""
    mode: str
    group_size: int | None = None
    fit: str | None = None

    def __str__(self) -> str:
        group = [f"g{self.group_size}"] if self.group_size else []
        return ":".join([self.mode] + group + ([self.fit] if self.fit else []))


def parse_precision(spec: "str | Precision | None", *, group_size: int | None = None,
                    where: str = "quantize") -> Precision | None:
    """A spec string -> Precision, None for "bf16"/"none"/None (the part is left unquantized).

    "MODE[:gSIZE][:FIT]": MODE one of MODES; SIZE a group size the mode allows (GROUP_SIZES_BY_MODE; default
    `group_size`, else DEFAULT_GROUP_SIZES; int8 has none: it is per channel); FIT one of FITS (int3/int2 only).
    Raises InputError naming `where` and what is wrong."""
    if spec is None or isinstance(spec, Precision):
        precision = spec
    elif not isinstance(spec, str):
        raise InputError(f"{where}: a precision is a string like 'int4' or 'int3:g64', not {spec!r}")
    elif spec.lower() in UNQUANTIZED:
        return None
    else:
        mode, *options = spec.lower().split(":")
        size, fit = None, None
        for option in options:
            if option[:1] == "g" and option[1:].isdigit():
                size = int(option[1:])
            elif option in FITS:
                fit = option
            else:
                raise InputError(f"{where}: unknown option {option!r} in {spec!r} (expected gSIZE or one of "
                                 f"{', '.join(FITS)})")
        if mode not in MODES:
            raise InputError(f"{where}: unknown quantization mode {mode!r}; choose one of "
                             f"{', '.join(MODES + UNQUANTIZED)}")
        if mode != "int8" and size is None:
            size = group_size or DEFAULT_GROUP_SIZES[mode]
        precision = Precision(mode, size, fit)
    if precision is None:
        return None
    mode, size, fit = precision.mode, precision.group_size, precision.fit
    if mode not in MODES:
        raise InputError(f"{where}: unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "int8" and size is not None:
        raise InputError(f"{where}: int8 is per channel and takes no group size (got {size})")
    if mode != "int8" and size not in GROUP_SIZES_BY_MODE[mode]:
        raise InputError(f"{where}: {mode} group_size must be one of "
                         f"{', '.join(map(str, GROUP_SIZES_BY_MODE[mode]))}, got {size!r}")
    if fit is not None and mode not in ("int3", "int2"):
        raise InputError(f"{where}: a fit ({fit}) applies to int3 and int2 only, not {mode}")
    return precision


def quantization_settings(quantize: "str | dict | None", *, group_size: int | None = None,
                          targets: Iterable[str] = TARGETS, where: str = "quantize") -> dict[str, Precision | None]:
    """{part: Precision or None} for every part in TARGETS, from what a user gives:
    - a spec string ("int4", "int3:g64", ...): that precision for each of `targets` (default: all parts);
    - a dict {part: spec}: each named part at its spec, the others unquantized;
    - a dict {part: spec} of `quantization_of` (every part present) round-trips.
    `group_size` is the default group of specs that name none. Raises InputError naming `where` and the part."""
    if isinstance(quantize, dict):
        unknown = [p for p in quantize if p not in TARGETS]
        if unknown:
            raise InputError(f"{where}: unknown part {unknown[0]!r}; the parts are {', '.join(TARGETS)}")
        return {p: parse_precision(quantize.get(p), group_size=group_size, where=f"{where}[{p!r}]") for p in TARGETS}
    targets = tuple(targets)
    for t in targets:
        if t not in TARGETS:
            raise InputError(f"{where}: unknown quantization target {t!r}; choose among {', '.join(TARGETS)}")
    precision = parse_precision(quantize, group_size=group_size, where=where)
    return {p: precision if p in targets else None for p in TARGETS}


def parse_quantize_option(text: str) -> "str | dict[str, str]":
    """What a `--quantize` option says: "int4" (every part; any spec `parse_precision` reads) or per part,
    "experts=int3:g64,attention=int8,output=int8" (parts not named stay unquantized). Checked: raises InputError
    naming the part or spec at fault."""
    if "=" not in text:
        quantization_settings(text, where="--quantize")
        return text
    parts = {}
    for item in text.split(","):
        part, sep, spec = item.partition("=")
        if not sep or not part.strip() or not spec.strip():
            raise InputError(f"--quantize: expected PART=SPEC items separated by commas, got {item!r}")
        parts[part.strip()] = spec.strip()
    quantization_settings(parts, where="--quantize")
    return parts


def spec_strings(settings: dict[str, Precision | None]) -> dict[str, str | None]:
    """{part: spec string or None} of `quantization_settings`' result: what configs and messages hold."""
    return {part: str(p) if p else None for part, p in settings.items()}


def describe(settings: dict[str, Precision | str | None]) -> str:
    """"experts int3:g64, attention int8, output float" (unquantized parts as "float")."""
    return ", ".join(f"{part} {settings[part] or 'float'}" for part in TARGETS)


def quantization_plan(module: nn.Module, targets: Iterable[str]) -> list[tuple[str, nn.Module, str, str]]:
    """(name, parent, attribute, part) of every matrix `targets` (parts) selects in a Transformer or a single MoE:
    the attribute is "moe" for an MoE's expert stacks (w13 and w2), else the name of the nn.Linear on `parent`.
    What `quantize` replaces, and what `empty_quantized_model` replaces on the meta device before allocating.
    Raises InputError for a module that is neither."""
    targets = tuple(targets)
    if isinstance(module, MoE):
        return [("", module, "moe", "experts")] if "experts" in targets else []
    if not isinstance(module, Transformer):
        raise InputError(f"quantize takes a mixtral Transformer or MoE, not {type(module).__name__}")
    plan = []
    for i, layer in enumerate(module.layers):
        if "attention" in targets:
            plan += [(f"layers.{i}.attention.{a}", layer.attention, a, "attention") for a in _ATTENTION]
        if "experts" in targets:
            plan.append((f"layers.{i}.moe", layer.moe, "moe", "experts"))
    if "output" in targets:
        plan.append(("output", module, "output", "output"))
    return plan


def quantize(module: nn.Module, mode: "str | dict", *, group_size: int | None = None,
             targets: Iterable[str] = TARGETS) -> nn.Module:
    """Quantize a `Transformer` (or a single `MoE`) in place and return it.

    mode: one precision for every part in `targets` ("int8": per channel; "int4": groups of `group_size` inputs
    (32, 64, 128 or 256, default 128); "int3"/"int2": groups of 16-128, fitted; a spec may name its group and fit:
    "int3:g64:search"), or a precision per part: {"experts": "int3", "attention": "int8", "output": "int8"} (parts
    not named stay as they are). A matrix with fewer inputs than a group uses one group per row. The router,
    embeddings and norms stay as they are. Each float weight is freed as soon as its replacement exists, so the
    peak is the model plus one quantized matrix stack (and float32 temporaries of a block of rows,
    `quantize_into`). The loaders quantize while reading instead (`empty_quantized_model` + `quantize_into`), with
    the same result. Raises InputError for an unknown mode, part, group size or fit, or a module already quantized.
    """
    settings = quantization_settings(mode, group_size=group_size, targets=targets)
    if any(isinstance(m, Quantized) for m in module.modules()):
        raise InputError("this model is already quantized; load the unquantized weights to quantize again")
    _swap(module, settings, _quantized)
    module.quantization = spec_strings(settings)
    return module


def _swap(model: nn.Module, settings: dict[str, Precision | None], make) -> None:
    """Replace each matrix a quantized part of `settings` selects by make(float weight, precision, cls), freeing
    each float weight before the next one is made."""
    for _, parent, attr, part in quantization_plan(model, [p for p, precision in settings.items() if precision]):
        precision = settings[part]
        if attr != "moe":
            setattr(parent, attr, make(getattr(parent, attr).weight, precision, QuantizedLinear))
            continue
        for w in ("w13", "w2"):
            quantized = make(getattr(parent, w), precision, QuantizedExperts)
            delattr(parent, w)
            setattr(parent, w, quantized)


def empty_quantized_model(config: ModelConfig, dtype: torch.dtype, quantize: "str | dict", *,
                          group_size: int | None = None, targets: Iterable[str] = TARGETS,
                          on_meta=None) -> Transformer:
    """A Transformer (`mixtral.model.empty_model`, uninitialised memory) whose quantized parts (`quantize` and the
    other arguments as for `quantize`) are already empty quantized modules: the float weights they replace are
    never allocated. Loaders fill the plain tensors in place and the quantized modules with `quantize_into` (then
    `refresh()`). Its `quantization_of` is set. `on_meta(model)` runs after the swap, still on the meta device
    (the offloading loader removes the experts there). Raises InputError for an unknown mode, part, group size
    or fit."""
    settings = quantization_settings(quantize, group_size=group_size, targets=targets)

    def swap(model: Transformer) -> None:
        _swap(model, settings, _empty_quantized)
        if on_meta is not None:
            on_meta(model)

    model = empty_model(config, dtype, on_meta=swap)
    model.quantization = spec_strings(settings)
    return model


def empty_experts(config: ModelConfig, dtype: torch.dtype, precision: "Precision | str | None",
                  device: str | torch.device = "cpu", n_experts: int | None = None) -> tuple:
    """One MoE layer's expert stacks (w13 [n_experts, 2·hidden, dim], w2 [n_experts, dim, hidden]), uninitialised:
    QuantizedExperts at `precision`, or plain `dtype` tensors when it is None (the experts left unquantized).
    n_experts: how many (default: the config's; fewer for a process that holds a share of them). What the streaming
    readers fill one layer at a time."""
    precision = parse_precision(precision)
    n = config.n_experts if n_experts is None else n_experts
    shapes = [(n, 2 * config.hidden_dim, config.dim), (n, config.dim, config.hidden_dim)]
    if precision is None:
        return tuple(torch.empty(shape, dtype=dtype, device=device) for shape in shapes)
    return tuple(_empty_quantized(torch.empty(shape, dtype=dtype, device="meta"), precision, QuantizedExperts)
                 .to_empty(device=device) for shape in shapes)


def matrix_bytes(precision: "Precision | str | None", out_features: int, in_features: int,
                 dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one [out, in] matrix takes in memory at `precision` (None: plain `dtype`), every buffer the kernels
    read counted (int4's derived bias too): what `mixtral plan` and the offloading budget add up."""
    precision = parse_precision(precision)
    if precision is None:
        return out_features * in_features * dtype.itemsize
    module = _empty_quantized(torch.empty(out_features, in_features, dtype=dtype, device="meta"), precision,
                              QuantizedLinear)
    total = sum(b.numel() * b.element_size() for b in module.buffers() if b is not None)
    if module.mode == "int4" and module.bias is None:  # derived on refresh, which a meta module skips
        total += module.scales.numel() * 4
    return total


def quantized_modules(model: nn.Module) -> dict[str, Quantized]:
    """{module name: module} of the quantized modules in `model`, in `named_modules` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Quantized)}


def quantization_of(model: nn.Module) -> dict[str, str | None] | None:
    """{part: spec string or None (unquantized)} for each part of a model `quantize` changed (every part in
    TARGETS, e.g. {"experts": "int3:g64", "attention": "int8", "output": None}), else None (also when no part
    is quantized)."""
    parts = getattr(model, "quantization", None)
    return parts if parts and any(parts.values()) else None

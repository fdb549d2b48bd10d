"""int3 and int2 group-wise quantization: the byte layout, the fits, lowbit.c's kernels against the dequantized
reference (under each policy, so the portable paths run on every CPU), and quantized experts through the MoE."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixtral import kernels, quant
from mixtral.errors import InputError
from mixtral.kernels import CpuPolicy
from mixtral.moe import MoE

MACHINE = kernels.policy()
PORTABLE = CpuPolicy.for_cpu()  # no C kernels: dequantize + F.linear
EXPAND = CpuPolicy.for_cpu(library=True)  # the C dequantizer, no AVX512-BF16: expand + bf16 GEMM at any rows
_BUILT = "the C kernels built (a C compiler, MIXTRAL_KERNELS not 0)"
needs_gemv = pytest.mark.skipif(not MACHINE.gemv, reason=f"needs AVX512-BF16 and {_BUILT}; this machine lacks one")
needs_dequant = pytest.mark.skipif(not MACHINE.dequant, reason=f"needs {_BUILT} for the dequantizers; none here")
needs_int8 = pytest.mark.skipif(not MACHINE.lowbit_int8,
                                reason=f"needs AVX512-BF16, VNNI and VBMI and {_BUILT}; this machine lacks one")
BITS = {"int3": 3, "int2": 2}


def _heavy_tailed(shape, generator) -> torch.Tensor:
    """Student-t-like weights (a normal divided by the root of a chi-square with 3 degrees of freedom): outliers
    that min-max fits spend their range on."""
    normal = torch.randn(shape, generator=generator)
    chi = torch.randn(*shape, 3, generator=generator).square().mean(-1)
    return normal / chi.sqrt() * 0.02


# ---- the layout -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (2, 5, 4096)])
def test_pack_unpack_round_trip(bits, shape):
    q = torch.randint(0, 1 << bits, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = kernels.pack_lowbit(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] * bits // 8)
    assert torch.equal(kernels.unpack_lowbit(packed, bits), q)


def test_byte_layout_is_a_little_endian_bit_stream():
    # int2: four weights a byte, LSB first
    q = torch.tensor([[1, 2, 3, 0] + [0] * 28])
    assert kernels.pack_lowbit(q, 2)[0, :2].tolist() == [1 | 2 << 2 | 3 << 4, 0]
    # int3: eight weights in three bytes, weight i in bits 3i..3i+2 of their 24-bit little-endian number
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0] + [7] + [0] * 23])
    word = sum(v << (3 * i) for i, v in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    assert kernels.pack_lowbit(q, 3)[0, :4].tolist() == [word & 255, word >> 8 & 255, word >> 16, 7]


@needs_dequant
@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("group", [16, 32, 64, 128])
def test_c_dequantizer_equals_torch_reference_bit_for_bit(bits, group):
    g = torch.Generator().manual_seed(group)
    n, k = 37, 256
    q = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
    scales = (torch.rand(n, k // group, generator=g) * 0.1 + 1e-3).bfloat16()
    zeros = (torch.randn(n, k // group, generator=g) * 0.1).bfloat16()
    want = kernels.dequantize_lowbit(q, scales, zeros, bits, torch.bfloat16)
    got = kernels.dequant_lowbit(kernels.pack_lowbit(q, bits), scales, zeros, bits)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


# ---- the fits ---------------------------------------------------------------------------------------------------

def _reconstruction(w, bits, group, fit):
    q, scales, zeros = quant.quantize_lowbit(w, bits, group, fit)
    assert q.dtype == torch.uint8 and int(q.max()) < 1 << bits
    assert scales.dtype == zeros.dtype == torch.bfloat16 and scales.shape == (w.shape[0], w.shape[1] // group)
    return kernels.dequantize_lowbit(q, scales, zeros, bits), scales


@pytest.mark.parametrize("bits, group", [(3, 64), (3, 16), (2, 16), (2, 128)])
def test_minmax_error_is_half_a_step_per_group(bits, group):
    g = torch.Generator().manual_seed(bits * group)
    w = (torch.randn(48, 256, generator=g) * 0.05).bfloat16().float()
    deq, scales = _reconstruction(w, bits, group, "minmax")
    step = scales.float().repeat_interleave(group, dim=1)
    # half a step, plus the rounding of scale and zero to bf16 (a few bf16 steps of the group's values)
    slack = 2**-7 * (w.abs().view(48, -1, group).amax(-1).repeat_interleave(group, dim=1) + (1 << bits) * step)
    assert ((w - deq).abs() <= step / 2 + slack).all()


@pytest.mark.parametrize("fit", ["search", "hqq"])
@pytest.mark.parametrize("bits, group", [(3, 64), (2, 16), (2, 32)])
@pytest.mark.parametrize("data", ["normal", "heavy-tailed"])
def test_fitted_groups_reconstruct_no_worse_than_minmax(fit, bits, group, data):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 512, generator=g) * 0.02 if data == "normal" else _heavy_tailed((64, 512), g)
    errors = {}
    for f in ("minmax", fit):
        deq, _ = _reconstruction(w, bits, group, f)
        errors[f] = (w - deq).square().view(64, -1, group).sum(-1)
    assert (errors[fit] <= errors["minmax"]).all()  # group by group
    assert errors[fit].sum() < 0.97 * errors["minmax"].sum()  # and the fit pays overall


@pytest.mark.parametrize("fit", quant.FITS)
@pytest.mark.parametrize("bits", [2, 3])
def test_constant_groups_are_exact_and_fits_deterministic(fit, bits):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).bfloat16().float()
    w[:4] = 0.0
    w[4:6, :32] = 0.3125  # bf16-exact constants
    w[6, 16:32] = -2.5
    deq, _ = _reconstruction(w, bits, 16, fit)
    assert torch.equal(deq[:4], w[:4]) and torch.equal(deq[4:6, :32], w[4:6, :32])
    assert torch.equal(deq[6, 16:32], w[6, 16:32])
    again = quant.quantize_lowbit(w, bits, 16, fit)
    assert all(torch.equal(a, b) for a, b in zip(again, quant.quantize_lowbit(w, bits, 16, fit)))


def test_int4_is_the_four_bit_minmax_fit_and_bad_fits_are_named():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(2))
    for a, b in zip(quant.quantize_int4(w, 32), quant.quantize_lowbit(w, 4, 32, "minmax")):
        assert torch.equal(a, b)
    with pytest.raises(InputError, match="unknown quantization fit 'kmeans'"):
        quant.quantize_lowbit(w, 3, 32, "kmeans")


# ---- modules and kernels ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, group, in_features, stored", [
    ("int3", 64, 200, 256), ("int2", 16, 48, 64), ("int2", 16, 40, 64), ("int3", 128, 20, 32), ("int2", 32, 12, 32),
    ("int4", 128, 688, 768), ("int4", 128, 20, 32)])
def test_stored_layout_and_empty_modules(mode, group, in_features, stored):
    group_used, columns = quant.stored_layout(mode, in_features, group)
    assert columns == stored and columns % 32 == 0 and columns % group_used == 0
    assert group_used == (group if in_features >= group else min(g for g in quant.GROUP_SIZES_BY_MODE[mode]
                                                                   if g >= in_features))
    module = quant.empty_quantized(torch.empty(3, 10, in_features, device="meta"), mode, group,
                                   quant.QuantizedExperts)
    bits = int(mode[3:])
    assert module.qweight.shape == (3, 10, stored * bits // 8) and module.stored_in_features == stored
    assert module.scales.shape == module.zeros.shape == (3, 10, stored // group_used)
    assert f"{mode}, in_features={in_features}, out_features=10, group_size={group_used}" in repr(module)


def _quantized_linear(mode, group, out_features, in_features, seed=0, fit=None):
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)))
    spec = f"{mode}:g{group}" + (f":{fit}" if fit else "")
    return quant.quantize_linear(linear, spec)


def _policies():
    machine = [pytest.param(MACHINE, id="machine", marks=needs_gemv)]
    return machine + [pytest.param(EXPAND, id="expand", marks=needs_dequant), pytest.param(PORTABLE, id="portable")]


@pytest.mark.parametrize("policy", _policies())
@pytest.mark.parametrize("mode", ["int3", "int2"])
@pytest.mark.parametrize("group, n, k", [(16, 70, 96), (64, 64, 200), (32, 33, 512), (128, 130, 256)])
@pytest.mark.parametrize("rows", [1, 2, 7, 64])
def test_linear_equals_dequantized_reference(policy, mode, group, n, k, rows):
    module = _quantized_linear(mode, group, n, k, seed=rows)
    weight = module._weight()
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(5)).bfloat16()
    want = F.linear(x.float(), weight.dequantize(torch.float32))
    with kernels.use_policy(policy):
        path = policy.linear_path(mode, rows)
        got = module(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    # lowbit.c's GEMV multiplies the exact weights in float32 (then rounds to bf16); expansion and the reference
    # round the weights to bf16 first. Its int8 way also rounds x (checked exactly in the test after next).
    stored_groups = -(-k // group)
    int8 = path == "lowbit_gemv" and policy.lowbit_int8 and group >= 32 and stored_groups % 2 == 0
    bound = 2**-5 if int8 else 2**-7 if path == "lowbit_gemv" else 2**-6
    assert (got.float() - want).abs().max() <= bound * want.abs().max(), path


@needs_gemv
@pytest.mark.parametrize("mode", ["int3", "int2"])
@pytest.mark.parametrize("group", [16, 32, 64, 128])
def test_gemv_is_float32_exact_up_to_summation_order(mode, group):
    module = _quantized_linear(mode, group, 96, 1024)
    w = module._weight()
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(9)).bfloat16()
    got = kernels.gemv_lowbit(x, w.qweight, w.scales, w.zeros, w.bits, int8_activations=False)
    want = F.linear(x.double(), w.dequantize(torch.float64))
    # the 128 the kernel adds to every q comes back out of float32 sums 128 times larger than the result's terms
    assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()


@needs_int8
@pytest.mark.parametrize("mode", ["int3", "int2"])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_gemv_with_int8_activations_is_exact_for_the_rounded_x(mode, group, rows):
    # the int8 way multiplies the weights' varying part (q - H)·s by x rounded as round_activations does, and the
    # group constants z by x's exact group sums: the same in float64, up to summation order
    module = _quantized_linear(mode, group, 130, 1024, seed=rows)
    w = module._weight()
    x = (torch.randn(rows, 1024, generator=torch.Generator().manual_seed(9)) * 3).bfloat16()
    x[0, :group] = 0  # an all-zero group: d = 0
    x[-1, 5] = 300.0  # an outlier: its group's other values round coarsely
    got = kernels.gemv_lowbit(x, w.qweight, w.scales, w.zeros, w.bits, int8_activations=True)
    xq, d = kernels.round_activations(x, group)
    rounded = (xq.double().view(rows, -1, group) * d.double()[..., None]).view(rows, 1024)
    q = kernels.unpack_lowbit(w.qweight, w.bits).double() - (1 << (w.bits - 1))
    varying = (q.view(130, -1, group) * w.scales.double()[..., None]).view(130, 1024)
    constant = x.double().view(rows, -1, group).sum(-1) @ w.zeros.double().t()
    want = rounded @ varying.t() + constant
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    # and close to the exact product: the rounding of x is small next to the int3/int2 weights' own
    exact = F.linear(x.double(), w.dequantize(torch.float64))
    assert (got.double() - exact).abs().max() <= 0.05 * exact.abs().max()


@needs_gemv
def test_int8_activations_are_not_used_for_groups_of_16_odd_group_counts_or_when_the_policy_says_no():
    x = torch.randn(2, 384, generator=torch.Generator().manual_seed(1)).bfloat16()
    for group in (16, 128):  # groups of 16; 3 groups of 128 (the int8 way takes groups in pairs)
        w = _quantized_linear("int3", group, 64, 384)._weight()
        exact = kernels.gemv_lowbit(x, w.qweight, w.scales, w.zeros, 3, int8_activations=False)
        assert torch.equal(kernels.gemv_lowbit(x, w.qweight, w.scales, w.zeros, 3, int8_activations=True), exact)
    x = x[:, :256]
    module = _quantized_linear("int3", 64, 64, 256)
    w = module._weight()
    exact = kernels.gemv_lowbit(x, w.qweight, w.scales, w.zeros, 3, int8_activations=False)
    with kernels.use_policy(MACHINE.with_features(int8_dot=False)):
        assert torch.equal(kernels.gemv_lowbit(x, w.qweight, w.scales, w.zeros, 3), exact)


def test_policy_paths_for_lowbit_weights():
    for amx in (False, True):
        policy = CpuPolicy.for_cpu(library=True, avx512_bf16=True, amx=amx, amx_kernel=amx)
        last = policy.lowbit_gemv_rows
        for kind in ("int3", "int2"):
            assert [policy.linear_path(kind, r) for r in (1, last - 1, last)] == ["lowbit_gemv", "lowbit_gemv",
                                                                                   "expand"]
            assert policy.linear_path(kind, 1, inference=False) == "expand"
            # amx.c knows bf16, int8 and int4 only
            assert policy.expert_path(kind, 64) == "linear" and policy.expert_path(kind, 1) == "linear"
    assert EXPAND.linear_path("int3", 1) == "expand" and PORTABLE.linear_path("int2", 1) == "reference"


def test_quantize_into_takes_a_fit_and_defaults_to_lowbit_fit():
    w = _heavy_tailed((64, 256), torch.Generator().manual_seed(4))
    made = {}
    for fit in (None, quant.LOWBIT_FIT, "minmax"):
        module = quant.empty_quantized(w, "int2", 16, quant.QuantizedLinear)
        quant.quantize_into(module, None, w, fit=fit)
        module.refresh()
        made[fit] = module
    assert torch.equal(made[None].qweight, made[quant.LOWBIT_FIT].qweight)
    assert made[None].bias is None  # int3/int2 keep no derived bias
    errors = {fit: (m.weight.float() - w).square().sum() for fit, m in made.items()}
    assert errors[quant.LOWBIT_FIT] <= errors["minmax"]
    moved = made[None].to(torch.float16)
    assert moved.scales.dtype == moved.zeros.dtype == torch.bfloat16


# ---- experts ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", _policies())
@pytest.mark.parametrize("spec", ["int3:g32", "int2:g16"])
def test_quantized_moe_equals_its_dequantized_float_moe(policy, spec):
    moe = MoE(dim=64, hidden_dim=96, n_experts=4, top_k=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    moe = moe.to(torch.bfloat16)
    quant.quantize(moe, {"experts": spec})
    assert isinstance(moe.w13, quant.QuantizedExperts) and moe.w13.mode == spec[:4]
    plain = MoE(dim=64, hidden_dim=96, n_experts=4, top_k=2)
    with torch.no_grad():
        plain.w13.copy_(torch.stack([moe.w13[e].dequantize(torch.float32) for e in range(4)]))
        plain.w2.copy_(torch.stack([moe.w2[e].dequantize(torch.float32) for e in range(4)]))
        plain.router.weight.copy_(moe.router.weight.float())
    x = torch.randn(3, 9, 64, generator=generator).bfloat16()
    want = plain(x.float())
    with kernels.use_policy(policy), torch.no_grad():
        got = moe(x)
        one = moe(x[:1, :1])  # one token: the GEMV's rows
    assert (got.float() - want).norm() <= 0.02 * want.norm()
    assert (one.float() - want[:1, :1]).norm() <= 0.02 * want[:1, :1].norm()


@pytest.mark.parametrize("policy", _policies())
def test_experts_add_takes_lowbit_weights(policy):
    dim, hidden = 64, 96
    experts = []
    for e, spec in enumerate(["int3", "int2"]):
        w13 = _quantized_linear(spec, 32, 2 * hidden, dim, seed=e)._weight()
        w2 = _quantized_linear(spec, 32, dim, hidden, seed=10 + e)._weight()
        experts.append((w13, w2))
    x = torch.randn(5, dim, generator=torch.Generator().manual_seed(3)).bfloat16()
    token_of = torch.tensor([0, 2, 4, 1, 2])
    gates = torch.tensor([0.5, 0.25, 1.0, 0.75, 0.5])
    slices = [slice(0, 3), slice(3, 5)]
    out = torch.zeros(5, dim)
    with kernels.use_policy(policy), torch.no_grad():
        kernels.experts_add(out, x, token_of, gates, [(w13, w2, s) for (w13, w2), s in zip(experts, slices)])
    want = torch.zeros(5, dim)
    for (w13, w2), s in zip(experts, slices):
        xs = x[token_of[s]].float()
        gate, up = F.linear(xs, w13.dequantize(torch.float32)).chunk(2, dim=-1)
        want.index_add_(0, token_of[s], gates[s, None] * F.linear(F.silu(gate) * up, w2.dequantize(torch.float32)))
    assert (out - want).norm() <= 0.02 * want.norm()

"""The CPU backend: each kernel against a float32 reference, the pure-torch fallback of every product on any CPU
(a policy without the library, AVX512-BF16 or AMX), the policy's choice of path, the C struct of amx.c against its
ctypes mirror, and the weights' 2 MB pages."""
from __future__ import annotations

import ctypes

import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mixtral import kernels
from mixtral.kernels import CpuPolicy, amx

MACHINE = kernels.policy()
# A CPU with none of the kernels: every product through torch (runs anywhere).
PORTABLE = CpuPolicy.for_cpu()

_BUILT = "the C kernels built (a C compiler, MIXTRAL_KERNELS not 0)"
needs_gemv = pytest.mark.skipif(not MACHINE.gemv, reason="needs AVX512-BF16 (AMD Zen 4, Intel Xeon since Cooper "
                                f"Lake) and {_BUILT}; this machine lacks one")
needs_dequant = pytest.mark.skipif(not MACHINE.dequant, reason=f"needs {_BUILT} for the dequantizers; none here")
needs_amx = pytest.mark.skipif(not MACHINE.amx_experts, reason="needs AMX (Intel Xeon since Sapphire Rapids) and "
                               "amx.c built for it; this CPU has none, or the build lacks it")
needs_library = pytest.mark.skipif(not MACHINE.library, reason=f"needs {_BUILT}; none here")


@needs_gemv
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n,k", [(1, 32), (7, 64), (130, 96), (64, 4096)])
def test_gemv_bf16_matches_float32_reference(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    ref = F.linear(x.float(), w.float())
    got = kernels.gemv_bf16(x, w)
    # Products of bf16 values are exact in float32; only the order of the float32 sums differs.
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * k ** 0.5)


@needs_gemv
def test_matmul_dispatch_keeps_shape_and_dtype():
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    w = torch.randn(40, 64).to(torch.bfloat16)
    out = kernels.matmul(x, w)
    assert out.shape == (2, 3, 40) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("rows", [12, 40])  # past max_gemv_rows on any CPU
def test_matmul_transposed_form_for_amx_equals_linear(rows):
    # Forced on any CPU: (W xᵀ)ᵀ, copied back to [..., N], is the same product as F.linear within bf16 rounding.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, rows, 96, generator=g).to(torch.bfloat16)
    w = (torch.randn(160, 96, generator=g) * 0.1).to(torch.bfloat16)
    with kernels.use_policy(kernels.policy().with_features(amx=True)):
        y = kernels.matmul(x, w)
    assert y.shape == (1, rows, 160) and y.dtype == torch.bfloat16 and y.is_contiguous()
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=1e-2)


def test_matmul_falls_back_where_the_kernel_does_not_apply():
    # float32, odd K, many rows, autograd: all must still equal F.linear.
    for x, w in [(torch.randn(3, 64), torch.randn(8, 64)),
                 (torch.randn(2, 33).to(torch.bfloat16), torch.randn(8, 33).to(torch.bfloat16)),
                 (torch.randn(40, 64).to(torch.bfloat16), torch.randn(8, 64).to(torch.bfloat16))]:
        torch.testing.assert_close(kernels.matmul(x, w), F.linear(x, w))
    w = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    kernels.matmul(x, w).float().sum().backward()
    assert w.grad is not None


def test_bf16_decoding_through_the_kernel_matches_the_full_forward_pass():
    # Decoding runs the linears on one row at a time (the kernel); the full pass runs torch's GEMM on many rows.
    import mixtral

    model = mixtral.load("tiny", dtype="bf16")
    ids = torch.randint(0, 32000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(ids).float()
        cache = mixtral.cache.KVCache(model.config, 1, 12, dtype=torch.bfloat16)
        steps = torch.cat([model(ids[:, i:i + 1], cache=cache) for i in range(12)], 1).float()
    # Per position within 2% of the logits' scale, but one: the full pass runs the experts with enough rows on
    # amx.c, whose bf16 rounding differs from the steps' GEMV, and at a near-tie of the router (position 11 here)
    # that flips one token's expert in this random model.
    error = (steps - full).abs().amax(-1)[0] / full.abs().max()
    assert (error < 0.02).sum().item() >= len(error) - 1
    assert (steps.argmax(-1) == full.argmax(-1)).float().mean().item() > 0.9


def _int4_weight(n, k, group, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // group, generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
    zero = (torch.randn(n, k // group, generator=g) * 0.05).to(torch.bfloat16)
    dequant = ((q.view(n, k // group, group).float() - 8) * scale.float()[..., None] + zero.float()[..., None])
    return q, scale, zero, dequant.view(n, k)


def test_int4_pack_round_trip():
    q = _int4_weight(6, 96, 32, 0)[0]
    packed = kernels.pack_int4(q)
    assert packed.shape == (6, 48) and packed.dtype == torch.uint8
    assert torch.equal(kernels.unpack_int4(packed), q)
    # The layout gemv.c reads: byte i of a 32-weight block holds weights i and 16 + i.
    assert packed[0, 0].item() == q[0, 0].item() | (q[0, 16].item() << 4)
    assert torch.equal(kernels.unpack_int4(kernels.pack_int4(q[None]))[0], q)  # leading dimensions


@needs_gemv
@pytest.mark.parametrize("m", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("n,k,group", [(1, 32, 32), (9, 128, 64), (130, 256, 128), (64, 512, 32)])
def test_gemv_int4_matches_dequantized_weights(m, n, k, group):
    q, scale, zero, dequant = _int4_weight(n, k, group, m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    got = kernels.gemv_int4(x, kernels.pack_int4(q), scale, kernels.int4_bias(scale, zero))
    ref = F.linear(x.float(), dequant)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * k ** 0.5)


@needs_dequant
@pytest.mark.parametrize("n,k,group", [(1, 32, 32), (9, 128, 64), (130, 256, 128)])
def test_dequant_int4_equals_the_formula_rounded_to_bf16(n, k, group):
    q, scale, zero, dequant = _int4_weight(n, k, group, n)
    assert torch.equal(kernels.dequant_int4(kernels.pack_int4(q), scale, zero), dequant.to(torch.bfloat16))


@needs_dequant
def test_dequant_int8_equals_the_formula_rounded_to_bf16():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (37, 96), generator=g, dtype=torch.int8)
    scale = (torch.rand(37, generator=g) * 0.01).to(torch.bfloat16)
    want = (q.float() * scale.float()[:, None]).to(torch.bfloat16)
    assert torch.equal(kernels.dequant_int8(q, scale), want)


def _swiglu_float32(x, w13, w2):
    gate, up = (x.float() @ w13.float().t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.float().t()


@needs_amx
@pytest.mark.parametrize("rows", [1, 31, 33, 100])
@pytest.mark.parametrize("chunked", [False, True])
def test_amx_swiglu_matches_float32_and_beats_rounding_each_step(rows, chunked):
    policy = kernels.policy()
    if chunked:  # chunks of 4 tiles: K walked in several chunks, partial sums through memory, for both products
        columns = -(-rows // 32) * 32
        policy = dataclasses.replace(policy, amx_chunk_bytes=4 * 1024 * (columns // 16 + 2))
        with kernels.use_policy(policy):
            assert amx._k_chunk(256, columns) == 4 and amx._k_chunk(224, columns) == 4  # 224: 4 + 3 tiles
    g = torch.Generator().manual_seed(rows)
    dim, hidden = 256, 224
    x = torch.randn(rows, dim, generator=g).bfloat16()
    w13 = (torch.randn(2 * hidden, dim, generator=g) * dim ** -0.5).bfloat16()
    w2 = (torch.randn(dim, hidden, generator=g) * hidden ** -0.5).bfloat16()
    assert kernels.amx_swiglu_fits(x, w13, w2)
    with kernels.use_policy(policy):
        got = kernels.amx_swiglu(x, w13, w2)
    assert got.shape == (rows, dim) and got.dtype == torch.bfloat16
    want = _swiglu_float32(x, w13, w2)
    assert (got.float() - want).abs().max() <= 2**-7 * want.abs().max()
    # torch's bf16 path rounds the gate, the up projection and silu(gate); this one rounds silu(gate) * up once.
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    stepwise = F.linear(F.silu(gate) * up, w2)
    assert (got.float() - want).abs().mean() <= (stepwise.float() - want).abs().mean()


@needs_amx
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("mode, group, hidden", [("int8", None, 224), ("int4", 32, 224), ("int4", 128, 384)])
@pytest.mark.parametrize("rows", [10, 70])  # one pass over one column tile (sums kept in the tiles); three passes
def test_amx_swiglu_on_quantized_weights_equals_their_dequantized_expert(mode, group, hidden, rows, chunked):
    from mixtral import quant
    dim = 256
    columns = -(-rows // 16) * 16
    policy = kernels.policy()
    if chunked:  # several K chunks: each block's rows expanded per chunk; int4 chunks rounded to whole groups
        policy = dataclasses.replace(policy, amx_chunk_bytes=6 * 1024 * (columns // 16 + 2))
        with kernels.use_policy(policy):
            assert amx._k_chunk(hidden, columns, 128 // 32) == 4  # 6 tiles would split a group of 128
    g = torch.Generator().manual_seed(3)
    weights = []
    for out_features, in_features in ((2 * hidden, dim), (dim, hidden)):
        linear = torch.nn.Linear(in_features, out_features, bias=False)
        linear.weight.data = torch.randn(out_features, in_features, generator=g) * in_features ** -0.5
        options = {"group_size": group} if group else {}
        weights.append(quant.quantize_linear(linear, mode, **options)._weight())
    w13, w2 = weights
    x = torch.randn(rows, dim, generator=g).bfloat16()
    picked = torch.randperm(rows, generator=g)[:rows * 5 // 7]
    gates = torch.rand(len(picked), generator=g)
    assert kernels.amx_quantized_fits(x, w13, w2)
    out = torch.zeros(rows, dim)
    with kernels.use_policy(policy):
        kernels.amx_swiglu_add(out, x, picked, gates, w13, w2)
    want = torch.zeros(rows, dim)
    want[picked] = gates[:, None] * _swiglu_float32(x[picked], w13.dequantize(torch.float32),
                                                    w2.dequantize(torch.float32))
    assert (out - want).abs().max() <= 2**-7 * want.abs().max()


def test_amx_takes_no_padded_int4_weights():
    from mixtral import quant
    x = torch.ones(40, 256).bfloat16()
    w13, w2 = (quant.quantize_linear(torch.nn.Linear(i, o, bias=False), "int4", group_size=128)._weight()
               for o, i in ((448, 256), (256, 224)))
    assert w2.padding == 32 and not kernels.amx_quantized_fits(x, w13, w2)


def test_amx_swiglu_takes_only_what_it_can():
    x, w13, w2 = torch.ones(40, 64).bfloat16(), torch.ones(192, 64).bfloat16(), torch.ones(64, 96).bfloat16()
    assert kernels.amx_swiglu_fits(x, w13, w2)
    assert not kernels.amx_swiglu_fits(x.float(), w13.float(), w2.float())  # not bf16
    assert not kernels.amx_swiglu_fits(x, torch.ones(2 * 80, 64).bfloat16(), torch.ones(64, 80).bfloat16())  # 80 % 32
    assert not kernels.amx_swiglu_fits(x, w13.t().contiguous().t(), w2)  # not contiguous
    with torch.enable_grad():
        assert not kernels.amx_swiglu_fits(x, w13.requires_grad_(), w2)  # training: autograd needs torch's ops


@needs_dequant
def test_dequant_scratch_is_reused_and_correct():
    q, scale, zero, dequant = _int4_weight(40, 64, 32, 7)
    first = kernels.dequant_int4(kernels.pack_int4(q), scale, zero, scratch=True)
    assert torch.equal(first, dequant.to(torch.bfloat16))
    q2, scale2, zero2, dequant2 = _int4_weight(20, 64, 32, 8)
    second = kernels.dequant_int4(kernels.pack_int4(q2), scale2, zero2, scratch=True)
    assert second.data_ptr() == first.data_ptr()  # the same memory: no new pages to fault in
    assert torch.equal(second, dequant2.to(torch.bfloat16))


def _smaps_entry(address: int, field: str) -> str | None:
    """The `field` line's value for the mapping holding `address`, from /proc/self/smaps; None off Linux."""
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == field + ":":
            return line[len(head):].strip()
    return None


def _thp_mode() -> str | None:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


def _big_module() -> torch.nn.Module:
    with torch.device("meta"):
        module = torch.nn.Linear(4096, 4096, bias=False)  # 64 MB in float32: above glibc's largest mmap threshold
        # (32 MB), so a fresh mapping, never heap memory an earlier test advised
    return module.to_empty(device="cpu")


@pytest.mark.skipif(_thp_mode() in (None, "never"), reason="no transparent huge pages on this machine")
def test_weights_are_advised_for_2mb_pages_before_their_first_write():
    module = _big_module()
    inside = module.weight.data_ptr() + 16 * 2**20
    # Start from "no 2 MB pages" whatever the allocator handed out: in a full run the memory can come advised
    # already (a mapping that inherits an earlier test's advice), which would make the check below pass vacuously.
    start = module.weight.data_ptr() // 2**21 * 2**21 + 2**21
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.madvise(start, 32 * 2**20, 15) == 0  # MADV_NOHUGEPAGE
    assert "hg" not in _smaps_entry(inside, "VmFlags").split()
    assert kernels.prefer_huge_pages(module) >= 8 * 2**20
    # The advice is what this code controls; whether the first write then gets 2 MB pages depends on the kernel
    # having free ones (a fragmented or memory-limited CI machine may fall back to 4 KB pages), so that part is
    # measured by `mixtral bench cold-gemv`, not asserted here.
    assert "hg" in _smaps_entry(inside, "VmFlags").split()
    with torch.no_grad():
        module.weight.copy_(torch.arange(module.weight.numel(), dtype=torch.float32).view_as(module.weight))
    assert module.weight[1, 2].item() == 4096 + 2


@pytest.mark.skipif(_thp_mode() in (None, "never"), reason="no transparent huge pages on this machine")
def test_collapsing_written_weights_keeps_their_values():
    module = _big_module()
    with torch.no_grad():
        module.weight.normal_()
    before = module.weight.clone()
    assert kernels.prefer_huge_pages(module, collapse=True) > 0
    assert torch.equal(module.weight, before)


def test_huge_pages_can_be_turned_off_and_skip_small_or_foreign_tensors(monkeypatch):
    assert kernels.prefer_huge_pages(torch.nn.Linear(8, 8)) == 0  # below min_bytes
    monkeypatch.setenv("MIXTRAL_HUGE_PAGES", "0")
    assert kernels.prefer_huge_pages(_big_module()) == 0


# ---- the policy: which path for (weight kind, rows), on every machine ------------------------------------------

@pytest.mark.parametrize("amx_cpu", [False, True])
def test_linear_path_changes_at_each_threshold(amx_cpu):
    policy = CpuPolicy.for_cpu(library=True, avx512_bf16=True, amx=amx_cpu)
    gemv, int8, int4 = policy.max_gemv_rows, policy.int8_gemm_rows, policy.int4_gemv_rows
    assert (gemv, int8, int4) == ((5, 12, 12) if amx_cpu else (8, 16, 32))
    beyond = "transposed" if amx_cpu else "torch"
    assert [policy.linear_path("bf16", r) for r in (1, gemv, gemv + 1)] == ["gemv", "gemv", beyond]
    if amx_cpu:
        last = policy.amx_transposed_rows
        assert [policy.linear_path("bf16", r) for r in (last, last + 1)] == ["transposed", "torch"]
    assert policy.linear_path("bf16", 1, fits=False) == beyond  # K % 32 or a strided weight: no GEMV
    assert policy.linear_path("bf16", 1, inference=False) == "torch"  # autograd
    assert [policy.linear_path("int8", r) for r in (1, int8 - 1, int8)] == ["int8_torch", "int8_torch", "expand"]
    assert policy.linear_path("int8", 1, fits=False) == "expand"  # in_features % 16: torch's kernel would crash
    assert [policy.linear_path("int4", r) for r in (1, int4 - 1, int4)] == ["int4_gemv", "int4_gemv", "expand"]
    assert policy.linear_path("int4", 1, inference=False) == "expand"
    assert policy.linear_path("float32", 1) == "torch"


def test_linear_path_without_the_kernels():
    no_avx512 = CpuPolicy.for_cpu(library=True)
    assert no_avx512.linear_path("bf16", 1) == "torch" and no_avx512.linear_path("int4", 1) == "expand"
    assert no_avx512.linear_path("int8", 1) == "int8_torch"  # torch's own kernel: no library needed
    assert [PORTABLE.linear_path(kind, 64) for kind in ("bf16", "int8", "int4")] == ["torch", "reference", "reference"]


@pytest.mark.parametrize("amx_cpu", [False, True])
def test_expert_path_changes_at_each_threshold(amx_cpu):
    policy = CpuPolicy.for_cpu(library=True, avx512_bf16=True, amx=amx_cpu, amx_kernel=amx_cpu)
    for kind, least in (("bf16", policy.amx_expert_rows), ("int8", policy.amx_int8_expert_rows),
                        ("int4", policy.amx_int4_expert_rows)):
        below = "transposed" if amx_cpu and kind == "bf16" and least - 1 > policy.max_gemv_rows else "linear"
        assert policy.expert_path(kind, least - 1) == below
        assert policy.expert_path(kind, least) == ("amx" if amx_cpu else "linear")
        assert policy.expert_path(kind, least, fits=False) in ("linear", "transposed")
    assert policy.expert_path("bf16", 64, fits=False) == ("transposed" if amx_cpu else "linear")
    assert policy.expert_path("bf16", 64, inference=False) == "linear"
    assert policy.expert_path("float32", 64) == "linear"
    # amx.c needs all three: the library, an AMX CPU, and a build for it
    for missing in ("library", "amx", "amx_kernel"):
        assert policy.with_features(**{missing: False}).expert_path("bf16", 64, fits=True) != "amx"


def test_expansion_tiles():
    policy = dataclasses.replace(CpuPolicy.for_cpu(amx=True), expanded_tile_bytes=64 * 2 * 4096)
    assert policy.expansion_tiles(16, 96, 4096) == (64, True)  # 16 rows: at most a quarter of the tile
    assert policy.expansion_tiles(17, 96, 4096) == (64, False)
    assert policy.expansion_tiles(16, 64, 4096)[0] >= 64  # one tile holds the whole weight: no transposed form
    assert not policy.expansion_tiles(16, 64, 4096)[1]
    assert not policy.with_features(amx=False).expansion_tiles(16, 96, 4096)[1]
    assert CpuPolicy.for_cpu(llc_bytes=1 << 30).expanded_tile_bytes == 24 << 20  # a quarter of L3, 4-24 MB
    assert CpuPolicy.for_cpu(llc_bytes=0).expanded_tile_bytes == 4 << 20


def test_policy_is_probed_at_first_use_not_at_import():
    code = ("import mixtral.quant, mixtral.model, mixtral.kernels.cpu_policy as p, mixtral.kernels.build as b; "
            "assert p.detected.cache_info().currsize == 0 and b.library.cache_info().currsize == 0")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_use_policy_is_scoped_and_refuses_kernels_the_machine_lacks():
    with kernels.use_policy(PORTABLE):
        assert kernels.policy() is PORTABLE and not kernels.available() and not kernels.amx_available()
    assert kernels.policy() == MACHINE
    impossible = CpuPolicy.for_cpu(library=True, avx512_bf16=True, amx=True, amx_kernel=True)
    if not MACHINE.amx_experts:
        with pytest.raises(ValueError, match="cannot run"):
            with kernels.use_policy(impossible):
                pass
    with kernels.use_policy(MACHINE.with_features(amx=True)):  # AMX for torch's sake: plain torch, any CPU
        assert kernels.policy().amx and kernels.policy().max_gemv_rows == 5


# ---- the fallbacks, on every machine: no library, no AVX512-BF16, no AMX ---------------------------------------

@pytest.mark.parametrize("rows", [1, 4, 40])
def test_matmul_fallback_equals_linear(rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 64, generator=g).bfloat16()
    w = torch.randn(48, 64, generator=g).bfloat16()
    with kernels.use_policy(PORTABLE):
        assert torch.equal(kernels.matmul(x, w), F.linear(x, w))


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 40])
@pytest.mark.parametrize("policy", [PORTABLE, CpuPolicy.for_cpu(amx=True)], ids=["plain", "amx-thresholds"])
def test_quantized_linear_fallback_equals_its_dequantized_weight(mode, rows, policy):
    from mixtral import quant
    linear = torch.nn.Linear(96, 80, bias=False)
    quantized = quant.quantize_linear(linear.to(torch.bfloat16), mode, group_size=32)
    w = quantized._weight()
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(2)).bfloat16()
    with kernels.use_policy(policy):
        got = w.linear(x)
    want = F.linear(x.float(), w.dequantize(torch.float32))
    assert got.dtype == torch.bfloat16 and ((got.float() - want).norm() / want.norm()).item() < 6e-3


def _expert(dim=64, hidden=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(2 * hidden, dim, generator=g) * dim ** -0.5).bfloat16(),
            (torch.randn(dim, hidden, generator=g) * hidden ** -0.5).bfloat16())


@pytest.mark.parametrize("rows", [1, 8, 40])
@pytest.mark.parametrize("policy", [PORTABLE, CpuPolicy.for_cpu(amx=True)], ids=["torch", "transposed"])
def test_swiglu_without_the_kernels_equals_float32(rows, policy):
    w13, w2 = _expert()
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).bfloat16()
    with torch.no_grad(), kernels.use_policy(policy):
        got = kernels.swiglu(x, w13, w2)
    assert got.shape == (rows, 64) and got.dtype == torch.bfloat16
    want = _swiglu_float32(x, w13, w2)
    assert (got.float() - want).abs().max() <= 2**-6 * want.abs().max()


def test_experts_add_runs_each_expert_on_its_slice():
    # Three experts given one by one, the middle one with no rows; out += gate * expert(x[token]).
    experts = [_expert(seed=e) for e in range(3)]
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    token_of = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    gates = torch.rand(7, generator=torch.Generator().manual_seed(2))
    slices = [slice(0, 4), slice(4, 4), slice(4, 7)]
    want = torch.zeros(10, 64)
    for (w13, w2), s in zip(experts, slices):
        if s.stop > s.start:
            want.index_add_(0, token_of[s], gates[s, None] * _swiglu_float32(x[token_of[s]], w13, w2))
    for policy in (PORTABLE, MACHINE):
        out = torch.zeros(10, 64)
        with torch.no_grad(), kernels.use_policy(policy):
            kernels.experts_add(out, x, token_of, gates, [(w13, w2, s) for (w13, w2), s in zip(experts, slices)])
        assert (out - want).abs().max() <= 2**-6 * want.abs().max()


# ---- amx.c's argument struct, checked on every CPU -------------------------------------------------------------

@needs_library
def test_amx_call_struct_layout_matches_its_ctypes_mirror():
    layout = amx.c_layout()
    assert layout == amx.ctypes_layout()
    assert len(layout) == 2 + len(amx._Weight._fields_) + len(amx._Call._fields_)


class _RecordingLibrary:
    """The real library, but `amx_swiglu` reads back the struct it is handed instead of running (any CPU)."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def amx_swiglu(self, address):
        call = amx._Call.from_address(address)
        fields = {name: getattr(call, name) for name, _ in amx._Call._fields_}
        for w in ("w13", "w2"):
            fields[w] = {name: getattr(fields[w], name) for name, _ in amx._Weight._fields_}
        self.calls.append(fields)


@needs_library
@pytest.mark.parametrize("mode", ["bf16", "int4"])
def test_amx_swiglu_add_fills_the_struct_amx_c_reads(mode, monkeypatch):
    from mixtral import quant
    dim, hidden, rows = 64, 96, 5
    w13, w2 = _expert(dim, hidden)
    if mode == "int4":
        w13, w2 = (quant.quantize_linear(torch.nn.Linear(w.shape[1], w.shape[0], bias=False), "int4",
                                         group_size=32)._weight() for w in (w13, w2))
    recorder = _RecordingLibrary(kernels.build.library())
    monkeypatch.setattr(kernels.build, "library", lambda: recorder)
    x = torch.randn(10, dim).bfloat16()
    out = torch.zeros(10, dim)
    picked, gates = torch.tensor([7, 0, 3, 9, 4]), torch.rand(rows)
    kernels.amx_swiglu_add(out, x, picked, gates, w13, w2)
    (call,) = recorder.calls
    assert (call["x"], call["out"]) == (x.data_ptr(), out.data_ptr())
    assert call["rows"] and call["scale"]  # int64 and float32 copies of picked and gates
    assert (call["n"], call["N"], call["dim"], call["H"]) == (rows, 16, dim, hidden)
    assert (call["kc1"], call["kc2"], call["threads"]) == (dim // 32, hidden // 32, torch.get_num_threads())
    assert call["partial1"] is None and call["partial2"] is None  # one chunk of K each: no partial sums
    assert call["bp1"] and call["bp2"]
    if mode == "bf16":
        assert call["w13"] == {"bf16": w13.data_ptr(), "q": None, "scale": None, "zero": None, "group": 0}
        assert call["w2"]["bf16"] == w2.data_ptr()
    else:
        assert call["w13"]["bf16"] is None and call["w13"]["q"] == w13.qweight.data_ptr()
        assert call["w13"]["zero"] == w13.zeros.data_ptr() and call["w2"]["group"] == 32
        assert call["w2"]["scale"] == w2.scales.data_ptr()  # already bf16 and contiguous: passed as it is

"""The decoding GEMV kernel equals float32 matmul of the same bf16 values; the dispatcher picks it only where it
applies."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixtral import kernels

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="no AVX512-BF16 or no C compiler here")


@needs_kernel
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


@needs_kernel
def test_matmul_dispatch_keeps_shape_and_dtype():
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    w = torch.randn(40, 64).to(torch.bfloat16)
    out = kernels.matmul(x, w)
    assert out.shape == (2, 3, 40) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("rows", [12, 40])  # past MAX_ROWS on any CPU
def test_matmul_transposed_form_for_amx_equals_linear(rows, monkeypatch):
    # Forced on any CPU: (W xᵀ)ᵀ, copied back to [..., N], is the same product as F.linear within bf16 rounding.
    monkeypatch.setattr(kernels, "AMX", True)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, rows, 96, generator=g).to(torch.bfloat16)
    w = (torch.randn(160, 96, generator=g) * 0.1).to(torch.bfloat16)
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


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("n,k,group", [(1, 32, 32), (9, 128, 64), (130, 256, 128), (64, 512, 32)])
def test_gemv_int4_matches_dequantized_weights(m, n, k, group):
    q, scale, zero, dequant = _int4_weight(n, k, group, m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    got = kernels.gemv_int4(x, kernels.pack_int4(q), scale, kernels.int4_bias(scale, zero))
    ref = F.linear(x.float(), dequant)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * k ** 0.5)


needs_dequant = pytest.mark.skipif(not kernels.dequant_available(), reason="no C compiler here")


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


needs_amx = pytest.mark.skipif(not kernels.amx_available(), reason="no AMX, or the kernels are not built for it")


def _swiglu_float32(x, w13, w2):
    gate, up = (x.float() @ w13.float().t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.float().t()


@needs_amx
@pytest.mark.parametrize("rows", [1, 31, 33, 100])
@pytest.mark.parametrize("chunked", [False, True])
def test_amx_swiglu_matches_float32_and_beats_rounding_each_step(rows, chunked, monkeypatch):
    if chunked:  # chunks of 4 tiles: K walked in several chunks, partial sums through memory, for both products
        columns = -(-rows // 32) * 32
        monkeypatch.setattr(kernels, "_CHUNK_BYTES", 4 * 1024 * (columns // 16 + 2))
        assert kernels._k_chunk(256, columns) == 4 and kernels._k_chunk(224, columns) == 4  # 224: 4 + 3 tiles
    g = torch.Generator().manual_seed(rows)
    dim, hidden = 256, 224
    x = torch.randn(rows, dim, generator=g).bfloat16()
    w13 = (torch.randn(2 * hidden, dim, generator=g) * dim ** -0.5).bfloat16()
    w2 = (torch.randn(dim, hidden, generator=g) * hidden ** -0.5).bfloat16()
    assert kernels.amx_swiglu_fits(x, w13, w2)
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
def test_amx_swiglu_on_quantized_weights_equals_their_dequantized_expert(mode, group, hidden, rows, chunked,
                                                                         monkeypatch):
    from mixtral import quant
    dim = 256
    columns = -(-rows // 16) * 16
    if chunked:  # several K chunks: each block's rows expanded per chunk; int4 chunks rounded to whole groups
        monkeypatch.setattr(kernels, "_CHUNK_BYTES", 6 * 1024 * (columns // 16 + 2))
        assert kernels._k_chunk(hidden, columns, 128 // 32) == 4  # 6 tiles would split a group of 128
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
    kernels.amx_swiglu_add(out, x, picked, gates, w13, w2)
    want = torch.zeros(rows, dim)
    want[picked] = gates[:, None] * _swiglu_float32(x[picked], w13.dequantize(torch.float32),
                                                    w2.dequantize(torch.float32))
    assert (out - want).abs().max() <= 2**-7 * want.abs().max()


@needs_amx
def test_amx_takes_no_padded_int4_weights():
    from mixtral import quant
    x = torch.ones(40, 256).bfloat16()
    w13, w2 = (quant.quantize_linear(torch.nn.Linear(i, o, bias=False), "int4", group_size=128)._weight()
               for o, i in ((448, 256), (256, 224)))
    assert w2.padding == 32 and not kernels.amx_quantized_fits(x, w13, w2)


@needs_amx
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
    before = _smaps_entry(inside, "VmFlags")
    assert "hg" not in before.split(), f"a fresh mapping already advised ({before}); seen once in a full run"
    assert kernels.prefer_huge_pages(module) >= 8 * 2**20
    # The advice is what this code controls; whether the first write then gets 2 MB pages depends on the kernel
    # having free ones (a fragmented or memory-limited CI machine may fall back to 4 KB pages), so that part is
    # measured by benchmarks/cold_gemv.py, not asserted here.
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

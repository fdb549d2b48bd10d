"""Expert files (mixtral.io.experts): the layout, round trips for every kind of stack, and every error path."""
from __future__ import annotations

import json
import os

import pytest
import torch

from mixtral import quant
from mixtral.config import PRESETS
from mixtral.errors import CheckpointError, InputError
from mixtral.io import experts as ex
from mixtral.model import random_model

KINDS = ["int8", "int4", "int3", "int2", torch.bfloat16, torch.float32]


def _stacks(kind, layer: int = 0):
    """(w13, w2) of one layer of a tiny model: QuantizedExperts of mode `kind`, or float tensors of that dtype."""
    model = random_model(PRESETS["tiny"], seed=3)
    if isinstance(kind, torch.dtype):
        model = model.to(kind)
    else:
        try:
            quant.quantize(model, {"experts": kind})
        except Exception as e:  # int3/int2 arrive with their own kernels; until then their quantize fails
            pytest.skip(f"{kind} quantization is not available here ({type(e).__name__}: {e})")
    moe = model.layers[layer].moe
    return moe.w13, moe.w2


def _buffers(w):
    """name -> tensor of a QuantizedWeight or a tensor."""
    if isinstance(w, torch.Tensor):
        return {"weight": w}
    return {k: getattr(w, k) for k in ("qweight", "scales", "zeros", "bias") if getattr(w, k) is not None}


@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_records_read_back_as_the_experts(tmp_path, kind):
    w13, w2 = _stacks(kind)
    path = ex.write_layer_experts(tmp_path / ex.file_name(1), w13, w2, layer=1)
    with ex.ExpertFile(path) as f:
        assert (f.layer, f.n_experts) == (1, len(w13))
        assert f.record_bytes % ex.PAGE == 0 and f.data_offset % ex.PAGE == 0
        assert os.path.getsize(path) == f.data_offset + f.n_experts * f.record_bytes
        buffer = ex.aligned_buffer(f.record_bytes)
        assert buffer.data_ptr() % ex.PAGE == 0
        for e in range(f.n_experts):
            f.read_into(e, buffer)
            for got, want in zip(f.views(buffer), (w13[e], w2[e])):
                assert type(got) is type(want)
                if not isinstance(want, torch.Tensor):
                    assert (got.mode, got.group_size, got.out_features, got.in_features) == \
                        (want.mode, want.group_size, want.out_features, want.in_features)
                    assert got.qweight.data_ptr() - buffer.data_ptr() < f.record_bytes  # a view, not a copy
                for name, t in _buffers(want).items():
                    g = _buffers(got)[name]
                    assert g.dtype == t.dtype and torch.equal(g, t), name
                    assert (g.data_ptr() - buffer.data_ptr()) % 64 == 0
        # A resident load fills fresh stacks with the same bytes.
        fresh13, fresh2 = _empty_like(w13), _empty_like(w2)
        f.read_stack_into(fresh13, fresh2)
        for fresh, stack in ((fresh13, w13), (fresh2, w2)):
            for e in range(len(stack)):
                for name, t in _buffers(stack[e]).items():
                    assert torch.equal(_buffers(fresh[e])[name], t), name


def _empty_like(stack):
    if isinstance(stack, torch.Tensor):
        return torch.full_like(stack, float("nan"))
    module = quant.empty_quantized(torch.empty(len(stack), stack.out_features, stack.in_features, device="meta"),
                                   stack.mode, stack.group_size, quant.QuantizedExperts, device="cpu")
    for b in module.buffers():
        if b is not None:
            b.zero_()
    return module


def test_buffered_reads_when_direct_io_is_refused(tmp_path):
    w13, w2 = _stacks("int4")
    path = ex.write_layer_experts(tmp_path / "l.experts", w13, w2, layer=0)
    with ex.ExpertFile(path) as f:
        if f._direct_fd is not None:
            os.close(f._direct_fd)
            f._direct_fd = None  # what a filesystem without O_DIRECT (tmpfs) gives
        # Not page-aligned, which is fine buffered. 64 bytes in, unless the allocation happens to end a page there.
        base = torch.zeros(f.record_bytes + 128, dtype=torch.uint8)
        offset = 64 if (base.data_ptr() + 64) % ex.PAGE else 128
        unaligned = base[offset:offset + f.record_bytes]
        assert unaligned.data_ptr() % ex.PAGE
        f.read_into(2, unaligned)
        assert torch.equal(f.views(unaligned)[0].qweight, w13[2].qweight)


def test_int8_scales_follow_the_model_dtype(tmp_path):
    w13, w2 = _stacks("int8")  # float32 model: int8 scales are float32 numbers with bf16 values
    path = ex.write_layer_experts(tmp_path / "l.experts", w13, w2, layer=0)
    with ex.ExpertFile(path) as f:
        buffer = ex.aligned_buffer(f.record_bytes)
        f.read_into(0, buffer)
        got = f.views(buffer, torch.bfloat16)[0]
        assert got.scales.dtype == torch.bfloat16 and torch.equal(got.scales.float(), w13[0].scales)
        assert f.views(buffer, torch.float32)[0].scales.dtype == torch.float32


def test_writing_rejects_stacks_that_do_not_go_together(tmp_path):
    w13, _ = _stacks(torch.float32)
    with pytest.raises(InputError, match="w13 has 4 experts, w2 3"):
        ex.write_layer_experts(tmp_path / "l.experts", w13, w13[:3], layer=0)
    with pytest.raises(InputError, match="QuantizedExperts or a float tensor"):
        ex.write_layer_experts(tmp_path / "l.experts", w13, [1, 2, 3, 4], layer=0)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.fixture
def good_file(tmp_path):
    w13, w2 = _stacks("int4")
    return ex.write_layer_experts(tmp_path / "layer-000.experts", w13, w2, layer=0)


def _rewrite_header(path, change):
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    change(header)
    text = json.dumps(header).encode()
    assert len(text) + 8 <= ex.PAGE
    data[:ex.PAGE] = (len(text).to_bytes(8, "little") + text).ljust(ex.PAGE, b"\0")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.unlink(), "expert file not found"),
    (lambda p: p.write_bytes(b"abc"), "too short"),
    (lambda p: p.write_bytes(b"\xff" * 64), "not an expert file"),
    (lambda p: p.write_bytes((10).to_bytes(8, "little") + b"{not json}" + b"\0" * 5000), "not valid JSON"),
    (lambda p: _rewrite_header(p, lambda h: h.update(format="safetensors")), "not an expert file"),
    (lambda p: _rewrite_header(p, lambda h: h.update(format_version=99)), "format_version 99"),
    (lambda p: _rewrite_header(p, lambda h: h.pop("record_bytes")), "bad header.*record_bytes"),
    (lambda p: _rewrite_header(p, lambda h: h.update(record_bytes=4097)), "not a multiple of 4096"),
    (lambda p: _rewrite_header(p, lambda h: h["matrices"]["w2"]["buffers"]["qweight"].update(offset=1 << 30)),
     "does not lie aligned inside the record"),
    (lambda p: _rewrite_header(p, lambda h: h["matrices"]["w13"].update(mode="int7")), "unknown mode"),
    (lambda p: os.truncate(p, os.path.getsize(p) - 4096), "truncated"),
    (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 4096), "too long"),
])
def test_damaged_files_are_refused(good_file, damage, message):
    damage(good_file)
    with pytest.raises(CheckpointError, match=message) as info:
        ex.ExpertFile(good_file)
    assert str(good_file) in str(info.value)


def test_a_file_truncated_after_opening_gives_a_short_read_error(good_file):
    with ex.ExpertFile(good_file) as f:
        os.truncate(good_file, f.data_offset + f.record_bytes + 100)
        buffer = ex.aligned_buffer(f.record_bytes)
        f.read_into(0, buffer)
        with pytest.raises(CheckpointError, match="short read of expert 1"):
            f.read_into(1, buffer)
        with pytest.raises(IndexError):
            f.read_into(f.n_experts, buffer)


def test_read_stack_into_checks_the_layout(good_file):
    w13, w2 = _stacks("int8")
    with ex.ExpertFile(good_file) as f, pytest.raises(CheckpointError, match="w13 is int4.*the model has int8"):
        f.read_stack_into(w13, w2)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssShmem in /proc/self/status")
def test_aligned_buffers_are_private_memory_not_page_cache():
    def shmem_kb():  # shared anonymous memory is shmem, which Linux also counts as page cache ("Cached")
        return int(next(line for line in open("/proc/self/status") if line.startswith("RssShmem")).split()[1])
    before = shmem_kb()
    buffer = ex.aligned_buffer(64 << 20)
    buffer.fill_(1)
    assert buffer.data_ptr() % ex.PAGE == 0
    assert shmem_kb() - before < 16 << 10  # 64 MB written, none of it shmem

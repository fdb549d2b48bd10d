"""Peak RSS while loading stays near the bytes of the weights (`mixtral bench load-memory` measures it at 1 GB),
and quantizing while loading never holds the float weights: the peak is the quantized model plus one staged
matrix."""
from __future__ import annotations

from pathlib import Path

import pytest

from mixtral.bench.load_memory import measure, write_checkpoint

needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")


@pytest.mark.slow
@needs_proc
def test_peak_rss_while_loading_is_below_1_3x_weights(tmp_path):
    weight_bytes = write_checkpoint(tmp_path / "ckpt", 0.4)
    result = measure(tmp_path / "ckpt", "mixtral")
    grown = (result["peak_kb"] - result["before_kb"]) * 1024
    assert grown < 1.3 * weight_bytes, f"peak grew by {grown / weight_bytes:.2f}x the weights"
    assert grown > 0.9 * weight_bytes  # the measurement does see the weights


# Beyond the quantized model and the staged matrix: quantize_into's float32 temporaries (a few blocks of 4 MB)
# and what the allocator keeps of freed ones. torch's own memory is not counted: `measure` takes "before" once
# a tiny model has been built, i.e. having loaded nothing.
ALLOWANCE = 64 * 2 ** 20


@pytest.mark.slow
@needs_proc
def test_quantizing_while_loading_never_holds_the_float_weights(tmp_path):
    # A small vocabulary, so that the experts (which int4 shrinks) are nearly all of the bytes, as in Mixtral.
    weight_bytes = write_checkpoint(tmp_path / "ckpt", 0.4, vocab_size=4096)
    result = measure(tmp_path / "ckpt", "mixtral", "int4")
    grown = (result["peak_kb"] - result["before_kb"]) * 1024
    staged = 2 * 3584 * 1024 * 2  # the largest staging unit: one expert's w13 (w1 and w3) in bf16
    bound = result["model_bytes"] + staged + ALLOWANCE
    numbers = (f"bf16 weights {weight_bytes / 2 ** 20:.0f} MiB, int4 model {result['model_bytes'] / 2 ** 20:.0f} "
               f"MiB, peak grew by {grown / 2 ** 20:.0f} MiB, bound {bound / 2 ** 20:.0f} MiB")
    assert grown < bound, numbers
    assert grown < 0.5 * weight_bytes, numbers  # quantizing after loading peaks at 1.4x the weights


@pytest.mark.slow
@needs_proc
def test_mixtral_quantize_holds_one_layer_of_float_experts_at_a_time(tmp_path):
    from mixtral.bench.load_memory import measure_quantize
    weight_bytes = write_checkpoint(tmp_path / "ckpt", 0.4, vocab_size=4096)
    result = measure_quantize(tmp_path / "ckpt", tmp_path / "out", "int4")
    grown = (result["peak_kb"] - result["before_kb"]) * 1024
    layer_experts = 8 * 3 * 3584 * 1024 * 2  # one layer's experts in bf16, before they are quantized and written
    bound = layer_experts + ALLOWANCE + 0.1 * weight_bytes  # + the resident part (attention etc.), under 10% here
    numbers = (f"bf16 weights {weight_bytes / 2 ** 20:.0f} MiB, written {result['model_bytes'] / 2 ** 20:.0f} MiB, "
               f"peak grew by {grown / 2 ** 20:.0f} MiB, bound {bound / 2 ** 20:.0f} MiB")
    assert grown < bound, numbers
    assert (tmp_path / "out" / "config.json").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.slow
@needs_proc
def test_loading_onto_a_device_holds_one_layer_at_a_time_on_the_host(tmp_path):
    # The meta device stands in for a GPU (none here): what leaves the host is the same, each layer as soon as it
    # is complete (LayerMover), so the host peak is one layer, not the model.
    weight_bytes = write_checkpoint(tmp_path / "ckpt", 0.8, vocab_size=4096)
    result = measure(tmp_path / "ckpt", "mixtral", device="meta")
    grown = (result["peak_kb"] - result["before_kb"]) * 1024
    layer = 8 * 3 * 3584 * 1024 * 2 + 1024 * 128 * 20 * 2  # one layer in bf16: experts and attention
    numbers = f"bf16 weights {weight_bytes / 2 ** 20:.0f} MiB, peak grew by {grown / 2 ** 20:.0f} MiB"
    assert weight_bytes > 3.5 * layer, numbers  # several layers, so that holding them all would show
    assert grown < layer + ALLOWANCE, numbers
    on_cpu = measure(tmp_path / "ckpt", "mixtral")
    assert (on_cpu["peak_kb"] - on_cpu["before_kb"]) * 1024 > 0.9 * weight_bytes  # the measurement sees a model

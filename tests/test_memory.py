"""Peak RSS while loading stays near the bytes of the weights (`mixtral bench load-memory` measures it at 1 GB)."""
from __future__ import annotations

from pathlib import Path

import pytest

from mixtral.bench.load_memory import measure, write_checkpoint


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_rss_while_loading_is_below_1_3x_weights(tmp_path):
    weight_bytes = write_checkpoint(tmp_path / "ckpt", 0.4)
    result = measure(tmp_path / "ckpt", "mixtral")
    grown = (result["peak_kb"] - result["before_kb"]) * 1024
    assert grown < 1.3 * weight_bytes, f"peak grew by {grown / weight_bytes:.2f}x the weights"
    assert grown > 0.9 * weight_bytes  # the measurement does see the weights

"""`mixtral bench` on tiny shapes: both benchmarks run end to end, write their JSON, and pass their own checks.

The timings themselves are not tested (shared 2-core machines); only that each row holds positive numbers and that
ours agreed with transformers before a number was reported.
"""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from mixtral import bench
from mixtral.bench import add_bench_parser, expert_bytes, main, random_moe

from conftest import transformers  # noqa: F401  (skips the module without transformers)

TINY_MOE = ["moe", "--dim", "64", "--hidden", "128", "--experts", "4", "--tokens", "1,4"]
FAST = ["--repeats", "2", "--min-seconds", "0", "--bandwidth-gb", "0.05"]


def _quant_available() -> bool:
    try:
        import mixtral.quant  # noqa: F401
    except ImportError:
        return False
    return True


def test_moe_writes_rows_that_agree_with_transformers(tmp_path, capsys):
    out = tmp_path / "moe.json"
    assert main(TINY_MOE + ["--dtypes", "bf16", "--repeats", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["passed"] and result["bandwidth_gbps"] > 0 and result["dense_gemm_gflops"] > 0
    rows = result["rows"]
    assert {(r["impl"], r["tokens"]) for r in rows} == {
        (impl, t) for impl in ("mixtral", "transformers eager", "transformers grouped_mm") for t in (1, 4)}
    for r in rows:
        assert r["ms"] > 0 and r["gflops"] > 0 and r["gbps"] > 0 and 1 <= r["experts"] <= 4
        if r["impl"] != "transformers eager":
            assert r["check"] == "ok" and r["rel_err"] < bench.TOLERANCE["bf16"]
        if r["impl"] == "mixtral":
            assert r["x_eager"] > 0 and r["x_grouped"] > 0
    assert [r["experts"] for r in rows if r["impl"] == "mixtral"][0] == 2  # one token reaches top_k experts
    printed = capsys.readouterr().out
    assert "python -m mixtral.bench moe --dim 64" in printed and "memory read bandwidth" in printed
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file


@pytest.mark.skipif(not _quant_available(), reason="mixtral.quant has not landed")
def test_moe_quantized_rows(tmp_path):
    out = tmp_path / "moe.json"
    assert main(TINY_MOE + ["--dtypes", "int8,int4", *FAST, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    ours = {(r["dtype"], r["tokens"]): r for r in rows if r["impl"] == "mixtral"}
    assert set(ours) == {(d, t) for d in ("int8", "int4") for t in (1, 4)}
    assert all(r["check"] == "ok" for r in ours.values())
    # Fewer bytes per weight than bf16: the GB/s column counts what the quantized experts really occupy.
    assert ours[("int4", 1)]["bytes"] < ours[("int8", 1)]["bytes"]


def test_moe_fails_when_ours_disagrees(tmp_path, monkeypatch):
    # A benchmark must never report the time of a wrong answer as a pass.
    real = bench.random_moe

    def broken(*args, **kwargs):
        moe = real(*args, **kwargs)
        moe.forward = lambda x: torch.zeros_like(x)
        return moe

    monkeypatch.setattr(bench, "random_moe", broken)
    out = tmp_path / "moe.json"
    assert main(TINY_MOE + ["--tokens", "1", "--dtypes", "bf16", *FAST, "--json", str(out)]) == 1
    result = json.loads(out.read_text())
    assert not result["passed"]
    (row,) = [r for r in result["rows"] if r["impl"] == "mixtral"]
    assert row["check"] == "FAIL" and "ms" not in row  # a wrong answer is reported, never timed


def test_expert_bytes_counts_storage():
    moe = random_moe(64, 128, 4, 2, seed=0)
    assert expert_bytes(moe) == 3 * 64 * 128 * 2


def test_e2e_synthetic_runs_ours_and_transformers(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    argv = ["e2e", "--synthetic-config", "tiny", "--synthetic-layers", "2", "--workdir", str(tmp_path / "work"),
            "--dtypes", "bf16", "--batches", "1,2", "--prompt-tokens", "8", "--new-tokens", "3",
            "--prefill-tokens", "32", "--repeats", "1", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["passed"]
    rows = {(r["impl"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {(impl, b) for impl in ("mixtral", "transformers grouped_mm", "transformers eager")
                         for b in (1, 2)}
    for (impl, batch), r in rows.items():
        assert r["ttft_ms"] > 0 and r["decode_tps"] > 0 and r["x_decode"] > 0
        assert (r["prefill_tps"] > 0) if batch == 1 else r["prefill_tps"] is None
    logits = [c for c in result["checks"] if "rel_err" in c]
    assert logits and all(c["passed"] for c in logits)
    assert "writing synthetic checkpoint" in capsys.readouterr().out
    # A second run in the same workdir reuses the checkpoint instead of writing it again.
    assert main(argv) == 0
    assert "reusing synthetic checkpoint" in capsys.readouterr().out


def test_e2e_temporary_checkpoint_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.tempfile, "tempdir", str(tmp_path))
    argv = ["e2e", "--synthetic-config", "tiny", "--dtypes", "bf16", "--batches", "1", "--prompt-tokens", "4",
            "--new-tokens", "2", "--prefill-tokens", "8", "--repeats", "1", "--hf-experts", "eager"]
    assert main(argv) == 0
    assert not list(tmp_path.glob("mixtral-bench-*"))


@pytest.mark.parametrize("argv, message", [
    (["moe", "--dtypes", "fp8"], "--dtypes: unknown value 'fp8'"),
    (["moe", "--tokens", "1,x"], "--tokens: cannot parse"),
    (["moe", "--tokens", "0"], "--tokens: values must be positive"),
    (["moe", "--experts", "2", "--top-k", "3"], "--top-k (3) cannot exceed --experts (2)"),
    (["e2e", "--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["e2e", "--synthetic-config", "nope"], "--synthetic-config: unknown preset 'nope'"),
])
def test_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_help_and_usage_errors():
    assert main(["moe", "--help"]) == 0
    assert main(["e2e", "--help"]) == 0
    assert main([]) == 2
    assert main(["moe", "--no-such-option"]) == 2


def test_add_bench_parser_registers_bench_under_a_cli():
    parser = argparse.ArgumentParser(prog="mixtral")
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "moe", "--tokens", "1,16"])
    assert args.run is bench.run_moe and args.tokens == "1,16"
    assert parser.parse_args(["bench", "e2e"]).run is bench.run_e2e


def test_profile_step_charges_the_model_parts(capsys):
    # benchmarks/profile_step.py on the tiny preset: every part of the model gets a span, and the spans do not
    # overlap (what the forward spends outside them, its total less theirs, is not negative).
    import re
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import profile_step

    profile_step.main(["--checkpoint", "tiny", "--steps", "2", "--prefill", "16", "--prompt", "4", "--top", "3"])
    out = capsys.readouterr().out
    for phase in ("decode step, batch 1", "prefill of 16 tokens"):
        block = out[out.index(phase):]
        rows = dict(re.findall(r"^  (attention|moe|norms|output head|embeddings|forward, outside the modules|"
                               r"step, outside the forward) +(-?[\d.]+)", block.split("Name")[0], re.M))
        assert {"attention", "moe", "norms", "output head", "forward, outside the modules"} <= rows.keys()
        assert all(float(v) >= 0 for v in rows.values()) and float(rows["moe"]) > 0
    assert re.search(r"prefill forward [\d.]+ ms, stream's first token [\d.]+ ms", out)

"""`mixtral bench`: every benchmark runs on tiny shapes, writes its results, and passes its own checks.

The timings themselves are not tested (shared 2-core machines); only that each row holds positive numbers and that
ours agreed with transformers before a number was reported. Each benchmark of mixtral/bench/ gets at least its
`--help` and, where one takes seconds, a tiny run.
"""
from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch

from mixtral import kernels
from mixtral.bench import cold_gemv, e2e, gemv, moe, structured
from mixtral.bench.cli import run_e2e, run_moe
from mixtral.bench.harness import parse_dtypes
from mixtral.cli import build_parser, main
from mixtral.config import from_name
from mixtral.errors import InputError
from mixtral.io.checkpoint import save_hf
from mixtral.kernels import amx_available
from mixtral.model import random_model

TINY_MOE = ["bench", "moe", "--dim", "64", "--hidden", "128", "--experts", "4", "--tokens", "1,4"]
FAST = ["--repeats", "2", "--min-seconds", "0", "--bandwidth-gb", "0.05"]
TINY_E2E = ["bench", "e2e", "--synthetic-config", "tiny", "--dtypes", "bf16", "--prompt-tokens", "4",
            "--new-tokens", "2", "--repeats", "1"]
BENCHMARKS = ("moe", "e2e", "serve", "load-memory", "quant-accuracy", "train-throughput", "profile", "gemv",
              "cold-gemv", "amx-experts", "finetune", "structured")


def test_moe_writes_rows_that_agree_with_transformers(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "moe.json"
    assert main(TINY_MOE + ["--dtypes", "bf16", *FAST, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["passed"] and result["bandwidth_gbps"] > 0 and result["dense_gemm_gflops"] > 0
    rows = result["rows"]
    assert {(r["impl"], r["tokens"]) for r in rows} == {
        (impl, t) for impl in ("mixtral", "transformers eager", "transformers grouped_mm") for t in (1, 4)}
    for r in rows:
        assert r["ms"] > 0 and r["gflops"] > 0 and r["gbps"] > 0 and 1 <= r["experts"] <= 4
        if r["impl"] != "transformers eager":
            assert r["check"] == "ok" and r["rel_err"] < moe.TOLERANCE["bf16"]
        if r["impl"] == "mixtral":
            assert r["x_eager"] > 0 and r["x_grouped"] > 0
    assert [r["experts"] for r in rows if r["impl"] == "mixtral"][0] == 2  # one token reaches top_k experts
    assert result["settings"]["dim"] == 64 and result["settings"]["tokens"] == "1,4"
    printed = capsys.readouterr().out
    assert "dim=64" in printed and "memory read bandwidth" in printed
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file


def test_moe_quantized_rows(tmp_path):
    pytest.importorskip("transformers")
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
    pytest.importorskip("transformers")
    real = moe.random_moe

    def broken(*args, **kwargs):
        layer = real(*args, **kwargs)
        layer.forward = lambda x: torch.zeros_like(x)
        return layer

    monkeypatch.setattr(moe, "random_moe", broken)
    out = tmp_path / "moe.json"
    assert main(TINY_MOE + ["--tokens", "1", "--dtypes", "bfloat16", *FAST, "--json", str(out)]) == 1
    result = json.loads(out.read_text())
    assert not result["passed"]
    (row,) = [r for r in result["rows"] if r["impl"] == "mixtral"]
    assert row["check"] == "FAIL" and "ms" not in row and row["dtype"] == "bf16"  # reported, never timed


def test_expert_bytes_counts_storage():
    layer = moe.random_moe(64, 128, 4, 2, seed=0)
    assert moe.expert_bytes(layer) == 3 * 64 * 128 * 2


def test_dtype_lists_take_both_spellings_and_print_the_short_one():
    assert parse_dtypes("bfloat16,int4,bf16", "--dtypes") == ["bf16", "int4", "bf16"]
    assert parse_dtypes("float32,bf16", "--dtypes", ("float32", "bfloat16"), extra=()) == ["fp32", "bf16"]
    with pytest.raises(InputError, match="--dtypes: unknown value 'int8'"):
        parse_dtypes("int8", "--dtypes", ("float32", "bfloat16"), extra=())


@pytest.mark.slow
def test_e2e_synthetic_runs_ours_and_transformers(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "e2e.json"
    argv = TINY_E2E + ["--synthetic-layers", "2", "--workdir", str(tmp_path / "work"), "--batches", "1,2",
                       "--prompt-tokens", "8", "--new-tokens", "3", "--prefill-tokens", "32", "--json", str(out)]
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
    assert not list((tmp_path / "work").glob(".*"))  # written whole under a temporary name, then renamed
    # A second run in the same workdir reuses the checkpoint instead of writing it again.
    assert main(argv) == 0
    assert "reusing synthetic checkpoint" in capsys.readouterr().out


@pytest.mark.slow
def test_e2e_temporary_checkpoint_is_removed(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setattr(e2e.tempfile, "tempdir", str(tmp_path))
    argv = TINY_E2E + ["--batches", "1", "--prefill-tokens", "8", "--hf-experts", "eager"]
    assert main(argv) == 0
    assert not list(tmp_path.glob("mixtral-bench-*"))


@pytest.mark.parametrize("argv, message", [
    (["moe", "--dtypes", "fp8"], "--dtypes: unknown value 'fp8'"),
    (["moe", "--tokens", "1,x"], "--tokens: cannot parse"),
    (["moe", "--tokens", "0"], "--tokens: values must be positive"),
    (["moe", "--experts", "2", "--top-k", "3"], "--top-k (3) cannot exceed --experts (2)"),
    (["moe", "--repeats", "0"], "--repeats must be at least 1"),
    (["e2e", "--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["e2e", "--synthetic-config", "nope"], "--synthetic-config: unknown preset 'nope'"),
    (["gemv", "--rows", ""], "--rows: empty list"),
    (["load-memory", "--loaders", "vllm"], "--loaders: unknown value 'vllm'"),
    (["quant-accuracy", "--tokens", "100"], "--tokens 100 is not a multiple of --window 256"),
    (["train-throughput", "--dtypes", "fp16"], "--dtypes: unknown value 'fp16'"),
    (["profile", "--steps", "0"], "--steps must be at least 1"),
])
def test_user_errors_are_one_line(argv, message, capsys):
    assert main(["bench", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_has_help(name, capsys):
    assert main(["bench", name, "--help"]) == 0
    assert f"usage: mixtral bench {name}" in capsys.readouterr().out


def test_usage_errors():
    assert main(["bench"]) == 2
    assert main(["bench", "moe", "--no-such-option"]) == 2


def test_bench_is_registered_on_the_mixtral_command():
    parser = build_parser()
    args = parser.parse_args(["bench", "moe", "--tokens", "1,16"])
    assert args.run is run_moe and args.tokens == "1,16"
    assert parser.parse_args(["bench", "e2e"]).run is run_e2e


def test_profile_charges_the_model_parts(capsys):
    # On the tiny preset: every part of the model gets a span, and the spans do not overlap (what the forward
    # spends outside them, its total less theirs, is not negative).
    assert main(["bench", "profile", "--model", "tiny", "--steps", "2", "--prefill-tokens", "16",
                 "--prompt-tokens", "4", "--top", "3"]) == 0
    out = capsys.readouterr().out
    for phase in ("decode step, batch 1", "prefill of 16 tokens"):
        block = out[out.index(phase):]
        rows = dict(re.findall(r"^  (attention|moe|norms|output head|embeddings|forward, outside the modules|"
                               r"step, outside the forward) +(-?[\d.]+)", block.split("Name")[0], re.M))
        assert {"attention", "moe", "norms", "output head", "forward, outside the modules"} <= rows.keys()
        assert all(float(v) >= 0 for v in rows.values()) and float(rows["moe"]) > 0
    assert re.search(r"prefill forward [\d.]+ ms, stream's first token [\d.]+ ms", out)


def test_train_throughput_runs_both(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    out = tmp_path / "rows.json"
    argv = ["bench", "train-throughput", "--dim", "32", "--layers", "1", "--hidden", "48", "--heads", "4",
            "--vocab", "64", "--batch", "2", "--seq", "16", "--rounds", "1", "--steps", "1", "--warmup", "1",
            "--threads", "1", "--dtypes", "float32,bf16", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/mixtral", *argv])  # as a user runs it
    assert main(argv) == 0
    assert "# mixtral bench train-throughput --dim 32" in capsys.readouterr().out  # the command heads the table
    rows = json.loads(out.read_text())["rows"]
    expected = {(d, i) for d in ("fp32", "bf16") for i in ("ours", "transformers")}
    assert {(r["dtype"], r["impl"]) for r in rows} == expected
    fp32 = {r["impl"]: r["first_loss"] for r in rows if r["dtype"] == "fp32"}
    # Same model, same batch: the losses differ only by ours' z-loss term (0.001 x about log(8)^2).
    assert abs(fp32["ours"] - fp32["transformers"]) < 0.01


def test_quant_accuracy_on_the_tiny_preset(capsys):
    assert main(["bench", "quant-accuracy", "--model", "tiny", "--tokens", "64", "--window", "32", "--batch", "2",
                 "--group-sizes", "32", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    table = {line.split()[0]: line.split() for line in out.splitlines() if line[:4] in ("bf16", "fp32", "int8",
                                                                                          "int4")}
    assert set(table) == {"bf16", "fp32", "int8", "int4"} and "int4 g32" in out
    header = next(line for line in out.splitlines() if line.startswith("weights"))
    rel = header.split().index("rel")  # "rel err": the column after "8x7B GB"
    assert float(table["bf16"][rel]) == 0  # the reference row: no error against itself
    assert float(table["int4"][rel + 1]) > 0  # (int4 g32: the name takes two fields)
    assert float(table["fp32"][3]) == 2 * float(table["bf16"][3])  # 8x7B GB, fp32 twice bf16


def test_quant_accuracy_of_precision_mixes(capsys):
    assert main(["bench", "quant-accuracy", "--model", "tiny", "--tokens", "64", "--window", "32", "--batch", "2",
                 "--mixes", "experts=int3:g32,attention=int8;int8", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines()}
    # a mix weighs less than all int8 for the 8x7B, and more than nothing
    assert 0 < float(lines["experts=int3:g32,attention=int8"][3]) < float(lines["int8"][3])


@pytest.mark.slow
def test_load_memory_of_a_tiny_checkpoint(tmp_path, capsys):
    save_hf(random_model(from_name("tiny"), dtype=torch.bfloat16), tmp_path / "ckpt")
    assert main(["bench", "load-memory", "--path", str(tmp_path / "ckpt"), "--loaders", "mixtral"]) == 0
    (row,) = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("mixtral ")]
    assert float(row[-1]) > 0  # seconds of the load


def test_gemv_on_small_shapes(capsys):
    result = gemv.run(rows=[1, 2], compile=False, shapes=[(64, 128)])
    assert [(r["weight"], r["rows"]) for r in result["rows"]] == [("64x128", 1), ("64x128", 2)]
    assert all(r["ms"]["bf16 torch"] > 0 for r in result["rows"])
    assert "vs bf16 torch" in capsys.readouterr().out


needs_gemv = pytest.mark.skipif(not kernels.policy().gemv,
                                reason="needs gemv.c's kernels: AVX512-BF16 and a C compiler (MIXTRAL_KERNELS not 0)")


@needs_gemv
def test_cold_gemv_measures_both_kernels():
    result = cold_gemv.measure(threads=1, repeats=2, n=256, k=256)
    assert result["bf16"]["ms"] > 0 and result["int4"]["gbps"] > 0


def test_amx_experts_runs_or_says_there_is_no_amx(capsys):
    argv = ["bench", "amx-experts", "--dim", "64", "--hidden", "128", "--experts", "2", "--rows", "16",
            "--repeats", "1"]
    if not amx_available():
        assert main(argv) == 1
        assert "no AMX" in capsys.readouterr().err
        return
    assert main(argv) == 0
    assert re.search(r"^ +16 +[\d.]+ +[\d.]+ ", capsys.readouterr().out, re.M)


@pytest.mark.slow
@needs_gemv
def test_cold_gemv_runs_each_setting_in_its_own_process(capsys):
    result = cold_gemv.run(threads=1, repeats=1, n=256, k=256)
    assert [r["setting"] for r in result["rows"]] == [name for name, _ in cold_gemv.SETTINGS]
    assert all(r["bf16"]["ms"] > 0 and r["int4"]["ms"] > 0 for r in result["rows"])
    assert "prefetch on,  2 MB pages" in capsys.readouterr().out


def test_cold_gemv_says_when_the_kernels_do_not_run_here(capsys):
    with kernels.use_policy(kernels.CpuPolicy.for_cpu()):  # a CPU without the C kernels
        assert main(["bench", "cold-gemv", "--repeats", "1"]) == 1
    assert "error: mixtral bench cold-gemv times gemv.c's GEMV kernels, which do not run here" in capsys.readouterr().err


def test_finetune_times_ours_and_peft_on_the_same_adapters(tmp_path, capsys, hf_checkpoint):
    pytest.importorskip("peft")
    pytest.importorskip("trl")
    out = tmp_path / "finetune.json"
    argv = ["bench", "finetune", "--model", str(hf_checkpoint[0]), "--rank", "4", "--batch", "4", "--seq", "16",
            "--prompt", "4", "--warmup", "1", "--rounds", "1", "--steps", "1", "--qlora-layers", "0", "--no-memory",
            "--threads", "1", "--json", str(out)]
    assert main(argv) == 0
    speed = json.loads(out.read_text())["speed"]
    assert {(r["task"], r["impl"]) for r in speed} == {(t, i) for t in ("sft", "dpo") for i in ("ours", "peft")}
    first = {(r["task"], r["impl"]): r["first_loss"] for r in speed}
    # The same weights, adapters and batch: the same first loss (bf16 autocast on both sides), and DPO's is ln 2
    # since B = 0 makes the policy the reference.
    assert first["sft", "ours"] == pytest.approx(first["sft", "peft"], rel=2e-2)
    assert first["dpo", "ours"] == pytest.approx(math.log(2), abs=1e-6) == first["dpo", "peft"]
    assert all(r["tokens_per_s"] > 0 and r["trained_params"] > 0 for r in speed)
    assert {r["trained_params"] for r in speed if r["task"] == "sft"} == {speed[0]["trained_params"]}


def test_structured_checks_each_library_it_finds(tmp_path, capsys, monkeypatch):
    pytest.importorskip("jsonschema")
    # A few features and invalid schemas stand in for all of them; the peers run where they are installed.
    monkeypatch.setattr(structured, "FEATURES", {k: structured.FEATURES[k] for k in ("types", "uniqueItems")})
    monkeypatch.setattr(structured, "INVALID", {"unknown type": structured.INVALID["unknown type"]})
    out = tmp_path / "structured.json"
    assert main(["bench", "structured", "--samples", "1", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    ours = result["libraries"]["llguidance"]
    for walk in ours["walk"].values():  # every token of the valid documents allowed, EOS only at the end
        assert walk["all_allowed"] and walk["eos_only_at_end"] and walk["specials_never"]
    assert ours["features"] == {"types": "ok 1/1", "uniqueItems": "refused"}
    assert ours["invalid"] == {"unknown type": "refused"}
    assert set(result["ours_mask_us"]) == set(structured.SCHEMAS)
    assert "JSON Schema feature" in capsys.readouterr().out
    assert main(["bench", "structured", "--libraries", "guidance"]) == 1
    assert "error: --libraries: unknown value 'guidance'" in capsys.readouterr().err

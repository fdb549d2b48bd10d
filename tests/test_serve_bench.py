"""`mixtral bench serve` on the tiny preset: it starts the real server, runs every level, and writes its rows.

The timings themselves are not tested (shared 2-core machines); only that each level's requests all came back
whole and its numbers are positive.
"""
from __future__ import annotations

import json

import pytest

from mixtral.cli import main

pytest.importorskip("httpx")


@pytest.mark.slow
def test_bench_serve_runs_each_level(tmp_path, capsys):
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--model", "tiny", "--clients", "1,3", "--requests", "2", "--prompt-tokens", "5",
            "--new-tokens", "4", "--threads", "1", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["passed"] and result["benchmark"] == "serve"
    rows = {r["clients"]: r for r in result["rows"]}
    assert set(rows) == {1, 3}
    for clients, r in rows.items():
        assert r["requests"] == 2 * clients and r["failed"] == 0
        assert r["ttft_p50_ms"] > 0 and r["ttft_p99_ms"] >= r["ttft_p50_ms"] and r["tok_s"] > 0
        assert r["itl_p99_ms"] >= r["itl_p50_ms"] >= 0 and r["rows_per_step"] >= 1
    assert rows[1]["x_decode"] == 1.0
    printed = capsys.readouterr().out
    assert "model=tiny" in printed and "decode tok/s" in printed


@pytest.mark.slow
def test_bench_serve_synthetic_checkpoint(tmp_path, capsys):
    # The synthetic checkpoint is the one `bench e2e` writes (here from the tiny preset), reused from --workdir.
    argv = ["bench", "serve", "--synthetic", "--synthetic-config", "tiny", "--workdir", str(tmp_path), "--clients",
            "1", "--requests", "1", "--prompt-tokens", "3", "--new-tokens", "2", "--threads", "1"]
    assert main(argv) == 0
    assert "writing synthetic checkpoint" in capsys.readouterr().out
    assert list(tmp_path.glob("synthetic-tiny-2layers-seed0/config.json"))


def test_bench_serve_errors(capsys):
    for bad, message in ((["--new-tokens", "1"], "--new-tokens must be at least 2"),
                         (["--clients", "0"], "--clients: values must be positive"),
                         (["--synthetic", "--model", "tiny"], "leave out --model")):
        assert main(["bench", "serve", *bad]) == 1
        assert message in capsys.readouterr().err
    assert main(["bench", "serve", "--help"]) == 0

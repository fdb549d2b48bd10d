"""Generation and serving with the experts spread over 2 and 4 CPU processes (torchrun, gloo): the same text and
logits as one process, quantized or not, the HTTP server on rank 0, and the errors of a wrong launch."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mixtral.config import from_name, with_overrides
from mixtral.io.checkpoint import save_hf
from mixtral.model import random_model
from test_parallel import WORKER, env, fail_a_peer, free_port, start_rank, torchrun

pytestmark = pytest.mark.slow  # each test starts 2 to 4 processes

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The mixture of experts"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random Mixtral (8 experts, the Mixtral vocabulary, so mistral-common's tokenizer fits)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny8"
    save_hf(random_model(with_overrides(from_name("tiny"), n_experts=8), seed=3), path)
    return path


def generate(checkpoint: Path, n: int = 1, *extra: str) -> str:
    args = ["-m", "mixtral", "generate", "--model", str(checkpoint), "-t", "0", "-n", "16", *extra, PROMPT]
    if n == 1:
        result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env(),
                                cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        result = torchrun(n, *args, "--parallel.ep", str(n))
    return result.stdout


@pytest.mark.parametrize("n", [2, 4])
def test_logits_equal_the_whole_model(n):
    torchrun(n, str(WORKER), "inference", timeout=120)


@pytest.mark.parametrize("n,extra", [(2, ()), (4, ()), (2, ("--quantize", "int8")), (2, ("--dtype", "bfloat16"))])
def test_generate_equals_one_process(checkpoint, n, extra):
    want = generate(checkpoint, 1, *extra)
    assert len(want.strip()) > 0
    assert generate(checkpoint, n, *extra) == want


def test_serve_on_rank_0(checkpoint):
    want = generate(checkpoint, 1)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--master-port", str(free_port()), "-m", "mixtral", "serve", "--model",
                               str(checkpoint), "--parallel.ep", "2", "--port", str(port), "--no-access-log"],
                              env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        body = json.dumps({"model": str(checkpoint), "prompt": PROMPT, "max_tokens": 16, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            text = json.loads(response.read())["choices"][0]["text"]
        assert text == want.rstrip("\n")
    finally:
        os.killpg(server.pid, signal.SIGINT)  # torchrun and both ranks
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            raise
    assert server.returncode is not None


def test_wrong_launch_errors(checkpoint):
    run = [sys.executable, "-m", "mixtral", "generate", "--model", str(checkpoint), "-n", "2", PROMPT]
    alone = subprocess.run([*run, "--parallel.ep", "2"], capture_output=True, text=True, timeout=60, env=env())
    assert alone.returncode == 1 and "not started by torchrun" in alone.stderr, alone.stderr
    memory = subprocess.run([*run, "--parallel.ep", "2", "--max-memory", "1GB"], capture_output=True, text=True,
                            timeout=60, env=env())
    assert memory.returncode == 1 and "--max-memory and --parallel.ep do not combine" in memory.stderr


def test_a_dead_follower_ends_generation_with_a_clear_error(checkpoint):
    port = free_port()
    ranks = [start_rank(rank, port, "generate", "--model", str(checkpoint), "-t", "0", "-n", "400",
                        "--parallel.ep", "2", "--parallel.timeout", "20", PROMPT) for rank in (0, 1)]
    fail_a_peer(ranks, lambda: ranks[0].stdout.read(1), signal.SIGKILL, 20 + 5)  # once rank 0 streams text

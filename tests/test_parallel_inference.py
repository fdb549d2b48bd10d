"""Generation and serving with the experts spread over processes (`mixtral.parallel.inference`).

In-process: each rank's share of the experts (`select_experts`, `load_experts` from every kind of source) is the
whole model's cut, the ranks' float32 sums add up to the single process's layer bitwise, and a wrong launch fails
before anything loads. Under torchrun (2 and 4 CPU processes, gloo; marked slow): the same logits and text as one
process, float32, bf16 and quantized, the HTTP server on rank 0 that SIGTERM ends with all its processes, and the
error a dead follower gives."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import mixtral
from mixtral.cli import main
from mixtral.config import from_name, with_overrides
from mixtral.io.checkpoint import save_hf
from mixtral.io.loading import quantize_checkpoint, random_quantized
from mixtral.model import random_model
from mixtral.moe import moe_grouped, route
from mixtral.parallel.experts import expert_range, local_experts_add, select_experts
from mixtral.parallel.inference import load_experts
from mixtral.parallel.mesh import Mesh
from test_parallel import env, fail_a_peer, free_port, start_rank

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("parallel_worker.py")  # its "inference" case: rank 0's logits, bitwise
PROMPT = "The mixture of experts"
N_EXPERTS = 8
CONFIG = with_overrides(from_name("tiny"), n_experts=N_EXPERTS)  # the Mixtral vocabulary: mistral-common's fits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random Mixtral with 8 experts, float32, in the Hugging Face layout."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny8"
    save_hf(random_model(CONFIG, seed=3), path)
    return path


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, checkpoint) -> Path:
    """The same saved quantized (format 2: one file of expert records per layer), every part int4."""
    return quantize_checkpoint(checkpoint, tmp_path_factory.mktemp("q") / "tiny8-int4", "int4:g32", progress=False)


def buffers(stack) -> dict[str, torch.Tensor]:
    """Every tensor of an expert stack: a float tensor, or a QuantizedExperts' buffers (the derived int4 bias too)."""
    if isinstance(stack, torch.Tensor):
        return {"weight": stack}
    return {name: b for name, b in stack.named_buffers(recurse=False) if b is not None}


def assert_same_stack(got, want) -> None:
    assert type(got) is type(want)
    a, b = buffers(got), buffers(want)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


# ---- in one process -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [None, "int8", "int4:g32", "int3:g16"])
def test_select_experts_copies_a_share(mode):
    model = random_quantized(with_overrides(CONFIG, n_layers=1), {"experts": mode}, seed=1)
    stack = model.layers[0].moe.w13
    for ep in (2, 4, 8):
        for rank in range(ep):
            lo, hi = expert_range(N_EXPERTS, ep, rank)
            part = select_experts(stack, lo, hi)
            assert len(part) == hi - lo
            for name, b in buffers(part).items():
                whole = buffers(stack)[name]
                assert torch.equal(b, whole[lo:hi]), name
                # A copy, not a view: the whole stack can be freed once every share is taken.
                assert b.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr(), name
            if mode is not None:
                assert part.mode == stack.mode and part.group_size == stack.group_size
                assert getattr(part, "fit", None) == getattr(stack, "fit", None)


@pytest.mark.parametrize("mode,dtype", [(None, torch.float32), (None, torch.bfloat16), ("int8", torch.float32),
                                        ("int4:g32", torch.bfloat16)])
def test_the_shares_add_up_to_the_whole_layer(mode, dtype):
    """What makes the distributed outputs bitwise the same: each rank adds its experts' gated outputs into float32
    zeros, and a token's two contributions, a + b, are what the single process adds (0 + a + b); the zeros of the
    ranks without its experts add nothing, in whatever order a reduce adds them."""
    moe = random_quantized(with_overrides(CONFIG, n_layers=1), {"experts": mode}, seed=2, dtype=dtype).layers[0].moe
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(37, CONFIG.dim, generator=generator).to(dtype)
    weights, experts = route(torch.randn(37, N_EXPERTS, generator=generator), CONFIG.top_k)
    with torch.inference_mode():
        want = moe_grouped(x, moe.w13, moe.w2, weights, experts)
        for ep in (2, 4, 8):
            total = torch.zeros(x.shape, dtype=torch.float32)
            for rank in range(ep):
                lo, hi = expert_range(N_EXPERTS, ep, rank)
                total += local_experts_add(x, weights, experts, select_experts(moe.w13, lo, hi),
                                           select_experts(moe.w2, lo, hi), lo, N_EXPERTS)
            assert torch.equal(total.to(dtype), want), ep


@pytest.mark.parametrize("source,quantize", [("checkpoint", None), ("checkpoint", "int4:g32"),
                                             ("quantized", None), ("tiny", "int8"), ("tiny", None)])
def test_each_rank_loads_its_share(checkpoint, quantized, source, quantize):
    """From a float checkpoint (quantized while reading or not), a quantized checkpoint (only the rank's records)
    and a preset: a rank's experts are the whole model's cut, and the rest is the whole model's."""
    model = {"checkpoint": str(checkpoint), "quantized": str(quantized)}.get(source, source)
    whole = mixtral.load(model, quantize=quantize, progress=False)
    n_experts = whole.config.n_experts
    for ep in (2, 4) if n_experts % 4 == 0 else (2,):
        for rank in range(ep):
            skeleton, layers, lo = load_experts(model, Mesh(None, None, rank, ep, 1), quantize=quantize)
            hi = lo + n_experts // ep
            assert (lo, hi) == expert_range(n_experts, ep, rank)
            for layer, (w13, w2), full in zip(skeleton.layers, layers, whole.layers):
                assert layer.moe.w13 is None and layer.moe.w2 is None
                assert_same_stack(w13, select_experts(full.moe.w13, lo, hi))
                assert_same_stack(w2, select_experts(full.moe.w2, lo, hi))
            want = {k: v for k, v in whole.state_dict().items() if ".moe.w13" not in k and ".moe.w2" not in k}
            got = skeleton.state_dict()
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.fixture
def run(capsys, monkeypatch):
    """run(*argv, **environment) -> (exit code, stderr) of `mixtral` in-process, not started by torchrun unless
    the environment says so."""
    def _run(*argv, **environment):
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(name, raising=False)
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        code = main([str(a) for a in argv])
        return code, capsys.readouterr().err
    return _run


def test_a_wrong_launch_fails_before_loading(run, checkpoint):
    generate = ("generate", "--model", checkpoint, "-n", "2", PROMPT)
    code, err = run(*generate, "--parallel.ep", "2")
    assert code == 1 and "not started by torchrun" in err
    assert "torchrun --nproc-per-node 2 -m mixtral generate ... --parallel.ep 2" in err
    code, err = run("serve", "--model", checkpoint, "--port", "0", "--parallel.ep", "4")
    assert code == 1 and "torchrun --nproc-per-node 4 -m mixtral serve ... --parallel.ep 4" in err
    code, err = run("chat", "--model", checkpoint, "--parallel.ep", "2")
    assert code == 1 and "-m mixtral chat ... --parallel.ep 2" in err
    for args, says in [(("--parallel.ep", "3"), "--parallel.ep (3) must divide the model's n_experts (8)"),
                       (("--parallel.ep", "0"), "--parallel.ep must be at least 1, got 0"),
                       (("--parallel.ep", "2", "--max-memory", "1GB"),
                        "--max-memory and --parallel.ep do not combine")]:
        code, err = run(*generate, *args)
        assert code == 1 and says in err, err
    code, err = run("generate", "--model", "tiny-dense", "--parallel.ep", "2", PROMPT)
    assert code == 1 and "is dense (n_experts = 1)" in err
    # torchrun's processes and --parallel.ep disagree: said before any of them waits for the others.
    code, err = run(*generate, RANK="0", WORLD_SIZE="2")
    assert code == 1 and "parallel.ep (1) x parallel.dp (1) must equal the number of processes (2" in err
    code, err = run(*generate, "--parallel.ep", "4", RANK="1", WORLD_SIZE="2")
    assert code == 1 and "parallel.ep (4) x parallel.dp (1) must equal the number of processes (2" in err


# ---- under torchrun -----------------------------------------------------------------------------------------------

def torchrun_command(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
            str(free_port()), *args]


def check_run(command: list[str], timeout: float = 120) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


_ONE_PROCESS: dict[tuple, str] = {}


def generate(model: Path, n: int, *extra: str) -> str:
    """What `mixtral generate` prints greedily, in one process (n = 1; once per arguments) or in n under torchrun."""
    args = ["-m", "mixtral", "generate", "--model", str(model), "-t", "0", "-n", "16", *extra, PROMPT]
    if n > 1:
        return check_run(torchrun_command(n, *args, "--parallel.ep", str(n)))
    key = (str(model), *extra)
    if key not in _ONE_PROCESS:
        _ONE_PROCESS[key] = check_run([sys.executable, *args])
    return _ONE_PROCESS[key]


@pytest.mark.slow
def test_logits_equal_the_whole_model():
    """Rank 0's fp32 logits with its experts on 2 processes, prefill and decode through the KV cache, bitwise."""
    check_run(torchrun_command(2, str(WORKER), "inference"))


# float32 on 2 processes is the server test's; each case here costs ~12 s (processes starting on 2 cores).
@pytest.mark.slow
@pytest.mark.parametrize("n,source,extra", [(4, "checkpoint", ()), (2, "checkpoint", ("--quantize", "int8")),
                                            (2, "quantized", ("--dtype", "bfloat16"))])
def test_generate_equals_one_process(checkpoint, quantized, n, source, extra):
    model = checkpoint if source == "checkpoint" else quantized
    want = generate(model, 1, *extra)
    assert len(want.strip()) > 0
    assert generate(model, n, *extra) == want


def _gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
def test_serve_on_rank_0_until_sigterm(checkpoint):
    want = generate(checkpoint, 1)
    port = free_port()
    server = subprocess.Popen(torchrun_command(2, "-m", "mixtral", "serve", "--model", str(checkpoint),
                                               "--parallel.ep", "2", "--port", str(port), "--no-access-log"),
                              env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # its own process group: torchrun and both ranks
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, server.communicate()[1][-3000:]
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
        # What a process manager sends: to torchrun alone, which passes it on to the ranks.
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=60)
        deadline = time.monotonic() + 30
        while not _gone(server.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _gone(server.pid), "a rank outlived torchrun"
        # Rank 0 shut the server down in order (torchrun itself reports the signal with a traceback of its own).
        assert "Finished server process" in stderr and "error:" not in stderr, stderr[-3000:]
    finally:
        if not _gone(server.pid):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.mark.slow
def test_a_dead_follower_ends_generation_with_a_clear_error(checkpoint):
    port = free_port()
    ranks = [start_rank(r, port, "generate", "--model", str(checkpoint), "-t", "0", "-n", "400", "--parallel.ep",
                        "2", "--parallel.timeout", "20", PROMPT) for r in (0, 1)]
    # Once rank 0 streams text both are inside the layers; the killed one's connection closes at once, well before
    # the 20 s a stalled peer would take.
    fail_a_peer(ranks, lambda: ranks[0].stdout.read(1), signal.SIGKILL, 15)


@pytest.mark.slow
def test_a_follower_that_cannot_load_stops_every_rank(checkpoint, tmp_path):
    """On another machine torchrun would not end rank 0 for it: rank 0 hears of it at once, not after a timeout."""
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    port = free_port()
    ranks = [start_rank(r, port, "generate", "--model", str(model), "--parallel.ep", "2", "--parallel.timeout", "60",
                        PROMPT) for r, model in ((0, checkpoint), (1, broken))]
    try:
        errors = [p.communicate(timeout=60)[1] for p in ranks]
    finally:
        for p in ranks:
            p.kill()
            p.wait()
    assert [p.returncode for p in ranks] == [1, 1], errors
    assert "rank 0: rank 1 failed while loading the model" in errors[0], errors[0][-2000:]
    assert "model.safetensors" in errors[1] and "Traceback" not in errors[1], errors[1][-2000:]

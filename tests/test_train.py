"""The trainer: config parsing and its errors, the schedule, the loss falling, exact resume after SIGKILL, NaN
stopping, checkpoints that mixtral.load and transformers read, dense baselines, the `mixtral train` command."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mixtral
from mixtral.cli import main
from mixtral.config import PRESETS
from mixtral.data.shards import FORMAT, VERSION
from mixtral.errors import ConfigError
from mixtral.train.config import dense_baseline, load_config
from mixtral.train.checkpoints import checkpoints, latest_checkpoint
from mixtral.train.metrics import read_metrics
from mixtral.train.trainer import DivergedError, learning_rate, train

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64

TINY_MODEL = """
[model]
preset = "tiny"
dim = 32
n_layers = 2
head_dim = 8
hidden_dim = 48
n_heads = 4
n_kv_heads = 2
vocab_size = 64
n_experts = 4
top_k = 2
"""


def _stream(domain: str, n: int, seed: int) -> np.ndarray:
    """Learnable token streams: "count" repeats 3..34 in order; "pairs" is random tokens each followed by its
    successor, so half the tokens are predictable from the one before."""
    rng = np.random.default_rng(seed)
    if domain == "count":
        return 3 + np.arange(n) % 32
    first = rng.integers(3, VOCAB - 1, n // 2)
    return np.stack([first, first + 1], axis=1).reshape(-1)


def make_corpus(directory: Path) -> Path:
    """A prepared corpus in the layout `mixtral data prepare` writes (mixtral.data.shards), two domains."""
    splits = {}
    for split, n, seed in (("train", 20000, 0), ("val", 2000, 1)):
        (directory / split).mkdir(parents=True)
        entries = {}
        for domain in ("count", "pairs"):
            tokens = _stream(domain, n, seed)
            tokens.astype("<u2").tofile(directory / split / f"{domain}.bin")
            entries[domain] = {"file": f"{split}/{domain}.bin", "documents": 1, "bytes": 0, "tokens": len(tokens)}
        splits[split] = entries
    manifest = {"format": FORMAT, "version": VERSION, "dtype": "uint16",
                "tokenizer": {"bos_id": 1, "eos_id": 2, "n_words": VOCAB},
                "domains": {"count": {}, "pairs": {}}, "splits": splits}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def write_config(path: Path, corpus: Path, out: Path, extra: str = "", model: str = TINY_MODEL) -> Path:
    path.write_text(f"""
out_dir = "{out}"
{model}
[data]
dir = "{corpus}"
seq_len = 16

[optim]
lr = 1e-2
min_lr = 1e-3
warmup_steps = 5

[train]
steps = 30
batch_size = 4
dtype = "fp32"
log_every = 1
threads = 1

[eval]
every = 10
max_windows = 4

[checkpoint]
every = 10
keep = 2
{extra}""")
    return path


def run_config(tmp_path: Path, corpus: Path, name: str, *overrides: str, model: str = TINY_MODEL):
    out = tmp_path / name
    config = load_config(write_config(tmp_path / f"{name}.toml", corpus, out, model=model), list(overrides))
    threads = torch.get_num_threads()
    record = train(config, progress=False)
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    return out, record


def train_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


# ---- config ----------------------------------------------------------------------------------------------------

def test_config_reads_toml_and_overrides(tmp_path, corpus):
    path = write_config(tmp_path / "c.toml", corpus, tmp_path / "out", extra="[router]\ncapacity_factor = 1.25\n")
    config = load_config(path, ["--train.steps", "7", "--optim.lr=0.5", "--router.capacity_factor", "none",
                                "--model.n_layers", "3", "--data.weights.count", "2"])
    assert config.train.steps == 7 and config.optim.lr == 0.5 and config.router.capacity_factor is None
    assert config.model_config().n_layers == 3 and config.model_config().vocab_size == VOCAB
    assert config.data.weights == {"count": 2.0}
    assert config.router.aux_loss_coef == 0.01 and config.router.z_loss_coef == 0.001  # literature defaults


@pytest.mark.parametrize("overrides,message", [
    (["--train.stepz", "3"], r"unknown key 'train.stepz'; \[train\] takes steps, batch_size"),
    (["--nosection", "3"], "unknown key 'nosection'"),
    (["--model.depth", "3"], r"\[model\] takes preset, baseline and the ModelConfig fields dim"),
    (["--train.steps", "2.5"], "train.steps must be an integer, got '2.5'"),
    (["--optim.lr", "fast"], "optim.lr must be a finite number, got 'fast'"),
    (["--router.train", "maybe"], "router.train must be true or false"),
    (["--train.dtype", "fp16"], "train.dtype must be one of bf16, fp32"),
    (["--router.capacity_factor", "0"], "capacity_factor must be positive, or none for dropless"),
    (["--model.preset", "nope"], "model.preset 'nope' is not a preset"),
    (["--model.top_k", "9"], r"top_k \(9\) cannot exceed n_experts \(4\)"),
    (["--model.baseline", "dense-half"], "model.baseline must be one of dense-active, dense-total"),
    (["--train.steps"], "option --train.steps needs a value"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_config_errors_name_the_key(tmp_path, corpus, overrides, message):
    path = write_config(tmp_path / "c.toml", corpus, tmp_path / "out")
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing.toml: file not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)
    bad.write_text("[trian]\nsteps = 1\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown key 'trian'"):
        load_config(bad)
    bad.write_text("[train]\nsteps = 1\n")
    with pytest.raises(ConfigError, match="data.dir must name a prepared corpus"):
        load_config(bad)


def test_config_base_file(tmp_path, corpus):
    base = write_config(tmp_path / "base.toml", corpus, tmp_path / "out")
    child = tmp_path / "child.toml"
    child.write_text('base = "base.toml"\nout_dir = "elsewhere"\n[model]\nbaseline = "dense-total"\n'
                     '[train]\nsteps = 3\n')
    config = load_config(child)
    assert config.out_dir == "elsewhere" and config.train.steps == 3 and config.train.batch_size == 4
    assert config.model_config() == dense_baseline(load_config(base).model_config(), "dense-total")


def test_shipped_configs_parse():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        config = load_config(path)
        assert config.model_config().vocab_size == 32000, path


def test_dense_baselines_match_active_and_total_parameters():
    moe = PRESETS["small"]
    total, active = moe.param_counts()
    router = moe.n_layers * moe.dim * moe.n_experts
    same_active = dense_baseline(moe, "dense-active")
    same_total = dense_baseline(moe, "dense-total")
    assert not same_active.is_moe and same_active.hidden_dim == moe.hidden_dim * moe.top_k
    assert same_active.param_counts()[0] == active - router
    assert same_total.param_counts()[0] == total - router
    with pytest.raises(ConfigError, match="already dense"):
        dense_baseline(same_active, "dense-total")


def test_learning_rate_warmup_then_cosine(tmp_path, corpus):
    config = load_config(write_config(tmp_path / "c.toml", corpus, tmp_path / "out"),
                         ["--train.steps", "100", "--optim.warmup_steps", "10"])
    lrs = [learning_rate(s, config) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[9:], lrs[10:]))
    assert learning_rate(100, config) == pytest.approx(1e-3)
    mid = 10 + 45
    assert lrs[mid] == pytest.approx(1e-3 + (1e-2 - 1e-3) * 0.5, rel=1e-6)


# ---- training --------------------------------------------------------------------------------------------------

def test_loss_falls_and_outputs_are_written(tmp_path, corpus):
    out, record = run_config(tmp_path, corpus, "run", "--train.steps", "40")
    losses = [loss for _, loss in train_losses(out)]
    assert len(losses) == 40 and record["step"] == 40
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    records = read_metrics(out / "metrics.jsonl")
    first = records[0]
    for key in ("step", "tokens", "loss", "ce", "lb", "z", "lr", "grad_norm", "tokens_per_s", "router"):
        assert key in first, key
    assert first["tokens"] == 4 * 16 and len(first["router"]["load"]) == 2 and len(first["router"]["load"][0]) == 4
    assert first["router"]["dropped"] == [0.0, 0.0]
    assert 1.9 < first["lb"] < 2.5  # about top_k for a nearly balanced router
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in val] == [10, 20, 30, 40]
    assert set(val[-1]["domains"]) == {"count", "pairs", "all"}
    assert val[-1]["domains"]["count"]["loss"] < val[0]["domains"]["count"]["loss"]
    assert val[-1]["domains"]["all"]["ppl"] == pytest.approx(math.exp(val[-1]["domains"]["all"]["loss"]))
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [s for s, _ in checkpoints(out)] == [30, 40]  # keep = 2


def test_checkpoint_loads_in_mixtral_and_transformers(tmp_path, corpus):
    transformers = pytest.importorskip("transformers")
    out, _ = run_config(tmp_path, corpus, "run", "--train.steps", "10", "--train.dtype", "bf16")
    path = latest_checkpoint(out)
    assert path.name == "step_000010" and (path / "trainer_state.pt").is_file()
    ours = mixtral.load(path, progress=False)
    assert ours.tok_embeddings.weight.dtype == torch.float32
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_dense_baseline_and_capacity_runs(tmp_path, corpus):
    out, record = run_config(tmp_path, corpus, "dense", "--train.steps", "5", "--model.baseline", "dense-active")
    assert record["lb"] is None and record["z"] is None and "router" not in record
    assert mixtral.load(latest_checkpoint(out), progress=False).config.hidden_dim == 96
    out, record = run_config(tmp_path, corpus, "capacity", "--train.steps", "5", "--router.capacity_factor", "1.0",
                             "--router.jitter", "0.01", "--train.grad_accum", "2")
    assert all(0 < d < 1 for d in record["router"]["dropped"]) or sum(record["router"]["dropped"]) > 0
    assert record["tokens"] == 5 * 2 * 4 * 16


def test_frozen_router_keeps_its_weights(tmp_path, corpus):
    out, _ = run_config(tmp_path, corpus, "frozen", "--train.steps", "3", "--router.train", "false")
    trained = mixtral.load(latest_checkpoint(out), progress=False)
    config = load_config(write_config(tmp_path / "x.toml", corpus, tmp_path / "x")).model_config()
    initial = mixtral.Transformer(config).init_weights(0)
    torch.testing.assert_close(trained.layers[0].moe.router.weight, initial.layers[0].moe.router.weight,
                               atol=0, rtol=0)
    assert not torch.equal(trained.layers[0].moe.w13, initial.layers[0].moe.w13)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, corpus):
    with pytest.raises(DivergedError, match=r"at step \d+") as info:
        run_config(tmp_path, corpus, "nan", "--optim.lr", "1e30", "--optim.min_lr", "1e30",
                   "--optim.warmup_steps", "0", "--optim.grad_clip", "0", "--checkpoint.every", "1")
    found = checkpoints(tmp_path / "nan")
    assert found, "the first steps were finite and checkpointed"
    failed = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert found[-1][0] == failed - 1  # the last finite step's checkpoint, nothing after it
    assert str(found[-1][1]) in str(info.value)
    mixtral.load(found[-1][1], progress=False)  # intact
    assert not list((tmp_path / "nan" / "checkpoints").glob(".*.tmp"))


def test_existing_run_needs_resume_and_the_same_config(tmp_path, corpus):
    out, _ = run_config(tmp_path, corpus, "run", "--train.steps", "10")
    path = tmp_path / "run.toml"
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume"):
        train(load_config(path, ["--train.steps", "10"]), progress=False)
    with pytest.raises(ConfigError, match=r"config differs in optim.lr: 0.01 -> 0.5"):
        train(load_config(path, ["--train.steps", "20", "--optim.lr", "0.5"]), resume=True, progress=False)


# ---- exact resume after SIGKILL --------------------------------------------------------------------------------

def _train_process(config: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "mixtral", "train", str(config), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, corpus):
    steps = 120
    extra = "[router]\njitter = 0.01\n"  # the torch RNG is part of the state too
    common = ["--train.steps", str(steps), "--checkpoint.every", "10"]
    whole = write_config(tmp_path / "whole.toml", corpus, tmp_path / "whole", extra)
    killed = write_config(tmp_path / "killed.toml", corpus, tmp_path / "killed", extra)

    process = _train_process(killed, *common)
    deadline = time.monotonic() + 120
    # Kill it right after its second checkpoint, mid-run.
    while not (tmp_path / "killed" / "checkpoints" / "step_000020").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = [s for s, _ in train_losses(tmp_path / "killed")]
    assert 20 <= max(done) < steps, "the run must be killed mid-run"

    resumed = _train_process(killed, *common, "--resume")
    uninterrupted = _train_process(whole, *common)
    for p in (resumed, uninterrupted):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    expected = train_losses(tmp_path / "whole")
    assert [s for s, _ in expected] == list(range(1, steps + 1))
    assert train_losses(tmp_path / "killed") == expected  # ==: bit for bit
    val = [[r for r in read_metrics(tmp_path / d / "metrics.jsonl") if r["kind"] == "val"] for d in ("killed", "whole")]
    assert [r["domains"] for r in val[0]] == [r["domains"] for r in val[1]]
    a, b = (mixtral.load(latest_checkpoint(tmp_path / d), progress=False) for d in ("killed", "whole"))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# ---- the command -----------------------------------------------------------------------------------------------

def test_cli_train_print_config_and_errors(tmp_path, corpus, capsys):
    path = write_config(tmp_path / "c.toml", corpus, tmp_path / "out")
    assert main(["train", str(path), "--print-config", "--train.steps", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["steps"] == 3 and printed["model"]["dim"] == 32
    assert main(["train", str(path), "--train.stepz", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "train.stepz" in err[0]


def test_cli_train_runs(tmp_path, corpus, capsys):
    path = write_config(tmp_path / "c.toml", corpus, tmp_path / "out")
    assert main(["train", str(path), "--train.steps", "4", "--eval.every", "0"]) == 0
    assert "done: step 4" in capsys.readouterr().out
    assert [s for s, _ in checkpoints(tmp_path / "out")] == [4]

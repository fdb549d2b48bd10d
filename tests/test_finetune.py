"""`mixtral finetune sft|dpo`: the runs on a tiny random Mixtral (the "tiny" preset, the real tokenizer), DPO's
reference, full fine-tuning and QLoRA, the router's losses when it trains, exact resume after SIGKILL, and the
errors that name the file and line."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mixtral
from mixtral.errors import ConfigError, InputError
from mixtral.finetune.config import load_finetune_config
from mixtral.finetune.trainer import batch_indices, finetune
from mixtral.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [(a, b) for a in range(2, 9) for b in range(1, 4)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Conversations and preference pairs about small additions."""
    root = tmp_path_factory.mktemp("finetune_data")
    with open(root / "sft.jsonl", "w") as f:
        for a, b in QUESTIONS:
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                             {"role": "assistant", "content": str(a + b)}]}) + "\n")
    with open(root / "dpo.jsonl", "w") as f:
        for a, b in QUESTIONS:
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} + {b}?"}],
                                "chosen": str(a + b), "rejected": str(a + b + 1)}) + "\n")
    return root


def write_config(path: Path, data: Path, out: Path, mode: str = "sft", extra: str = "") -> Path:
    path.write_text(f"""
out_dir = "{out}"
[model]
path = "tiny"
[data]
train = "{data / f'{mode}.jsonl'}"
val_fraction = 0.2
seq_len = 64
[optim]
lr = 1e-2
warmup_steps = 2
[train]
steps = 8
batch_size = 4
log_every = 1
dtype = "fp32"
[eval]
every = 4
[checkpoint]
every = 4
{extra}""")
    return path


def records(out: Path, kind: str = "train") -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == kind]


def run(config: Path, mode: str, *overrides: str, resume: bool = False) -> dict:
    return finetune(load_finetune_config(config, list(overrides)), mode, resume=resume, progress=False)


def test_batches_visit_every_item_once_an_epoch():
    seen = [i for index in range(5) for i in batch_indices(10, 2, index, seed=3)]
    assert sorted(seen) == list(range(10))
    assert batch_indices(10, 2, 7, seed=3) == batch_indices(10, 2, 7, seed=3)
    assert [batch_indices(10, 2, i, seed=3) for i in range(5)] != [batch_indices(10, 2, i, seed=4) for i in range(5)]


def test_sft_learns_and_writes_adapters_and_a_merged_model(tmp_path, data):
    out = tmp_path / "sft"
    run(write_config(tmp_path / "c.toml", data, out), "sft")
    train, val = records(out), records(out, "val")
    assert [r["step"] for r in train] == list(range(1, 9))
    assert val[-1]["loss"] < val[0]["loss"] and train[-1]["loss"] < train[0]["loss"]
    assert train[0]["peak_rss_mb"] > 0
    for name in ("adapter/adapter_config.json", "adapter-peft/adapter_config.json",
                 "adapter/adapter_model.safetensors", "model/config.json",
                 "model/tokenizer.model", "curves.png", "checkpoints/step_000008/trainer_state.pt"):
        assert (out / name).is_file(), name
    # The merged model gives the adapted model's predictions.
    base = mixtral.load("tiny", progress=False)
    mixtral.finetune.lora.load_adapters(base, out / "adapter")
    merged = mixtral.load(out / "model", dtype=torch.float32, progress=False)
    ids = torch.tensor([[1, 733, 16289, 28793, 1824, 349, 28705, 28750]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), base(ids), atol=0.05, rtol=0)  # the merged copy is in bf16


def test_dpo_starts_at_log_2_and_precomputed_reference_equals_adapters_off(tmp_path, data):
    a, b = tmp_path / "off", tmp_path / "pre"
    run(write_config(tmp_path / "a.toml", data, a, "dpo"), "dpo")
    run(write_config(tmp_path / "b.toml", data, b, "dpo", '[dpo]\nreference = "precomputed"\n'), "dpo")
    first = records(a)[0]
    # Before the first update the policy is the reference (B = 0): every pair's loss is log 2, margin 0.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["margin"] == pytest.approx(0, abs=1e-6)
    assert [r["loss"] for r in records(a)] == pytest.approx([r["loss"] for r in records(b)], abs=1e-5)
    assert (b / "reference_logprobs.safetensors").is_file()
    assert {"loss", "margin", "accuracy"} <= set(records(a, "val")[-1])
    assert records(a)[-1]["margin"] > 0.01 and records(a)[-1]["loss"] < first["loss"]  # it learns the train pairs


def test_dpo_sft_weight_adds_the_chosen_replies_nll_to_the_loss(tmp_path, data):
    config = write_config(tmp_path / "a.toml", data, tmp_path / "x", "dpo")
    extra = {}
    for weight in ("0.5", "1.0"):
        run(config, "dpo", "--train.steps", "1", "--dpo.sft_weight", weight, "--out_dir", str(tmp_path / weight))
        extra[weight] = records(tmp_path / weight)[0]["loss"] - math.log(2)  # the first step's DPO term is log 2
    assert extra["0.5"] > 0.1 and extra["1.0"] == pytest.approx(2 * extra["0.5"], rel=1e-5)
    with pytest.raises(ConfigError, match="dpo.sft_weight"):
        run(config, "dpo", "--dpo.sft_weight", "-1")


def test_full_finetuning_trains_all_but_the_router(tmp_path, data):
    out = tmp_path / "full"
    run(write_config(tmp_path / "c.toml", data, out, extra="[lora]\nrank = 0\n"), "sft", "--train.steps", "2")
    before, after = mixtral.load("tiny", progress=False), mixtral.load(out / "model", dtype=torch.float32,
                                                                       progress=False)
    assert torch.equal(before.layers[0].moe.router.weight.bfloat16(), after.layers[0].moe.router.weight.bfloat16())
    assert not torch.equal(before.layers[0].attention.wq.weight.bfloat16(), after.layers[0].attention.wq.weight)
    with pytest.raises(ConfigError, match="dpo.reference"):
        run(tmp_path / "c.toml", "dpo", "--data.train", str(data / "dpo.jsonl"))


def test_trained_router_keeps_its_losses_on(tmp_path, data):
    config = write_config(tmp_path / "c.toml", data, tmp_path / "r", extra="[lora]\ntrain_router = true\n")
    run(config, "sft", "--train.steps", "2")
    assert all(r["lb"] > 0 and r["z"] > 0 for r in records(tmp_path / "r"))
    with pytest.raises(ConfigError, match="router.aux_loss_coef"):
        load_finetune_config(config, ["--router.aux_loss_coef", "0"])


def test_qlora_trains_over_an_int8_base_and_saves_adapters_only(tmp_path, data):
    out = tmp_path / "q"
    run(write_config(tmp_path / "c.toml", data, out), "sft", "--train.steps", "2", "--model.quantize", "int8")
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "model").exists()
    with pytest.raises(ConfigError, match="model.quantize"):
        load_finetune_config(tmp_path / "c.toml", ["--model.quantize", "int8", "--lora.rank", "0"])


def test_bad_data_is_named_by_file_and_line(tmp_path, data):
    pairs = (data / "dpo.jsonl").read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(pairs[:2] + [json.dumps({"messages": [{"role": "user", "content": "1 + 1?"}],
                                                      "chosen": "2", "rejected": " 2"})]) + "\n")
    config = write_config(tmp_path / "c.toml", data, tmp_path / "o", "dpo")
    with pytest.raises(InputError, match=f"{bad}:3: chosen equals rejected"):
        run(config, "dpo", "--data.train", str(bad))
    bad.write_text("\n".join(pairs[:4] + ["{not json"]) + "\n")
    with pytest.raises(InputError, match=f"{bad}:5"):
        run(config, "dpo", "--data.train", str(bad))
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"}]}) + "\n")
    with pytest.raises(InputError, match=f"{bad}:1: .*assistant"):
        run(config, "sft", "--data.train", str(bad))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        run(write_config(tmp_path / "d.toml", data, tmp_path / "d"), "sft", "--train.steps", "1")
        run(tmp_path / "d.toml", "sft", "--train.steps", "1")


def test_cli_prints_config_and_rejects_unknown_keys(tmp_path, data, capsys):
    from mixtral.cli import main

    config = write_config(tmp_path / "c.toml", data, tmp_path / "o")
    assert main(["finetune", "sft", str(config), "--print-config", "--lora.rank", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["lora"]["rank"] == 4
    with pytest.raises(ConfigError, match="lora.ranks"):
        load_finetune_config(config, ["--lora.ranks", "4"])


def _process(config: Path, mode: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "mixtral", "finetune", mode, str(config), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sft", "dpo"])
def test_kill_and_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, data, mode):
    steps = 40
    extra = "[lora]\ndropout = 0.1\n"  # the torch RNG is part of the state too
    common = ["--train.steps", str(steps), "--checkpoint.every", "5", "--eval.every", "10"]
    whole = write_config(tmp_path / "whole.toml", data, tmp_path / "whole", mode, extra)
    killed = write_config(tmp_path / "killed.toml", data, tmp_path / "killed", mode, extra)
    process = _process(killed, mode, *common)
    deadline = time.monotonic() + 120
    while not (tmp_path / "killed" / "checkpoints" / "step_000010").exists():  # kill it mid-run
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 10 <= max(r["step"] for r in records(tmp_path / "killed")) < steps, "the run must be killed mid-run"

    resumed, uninterrupted = _process(killed, mode, *common, "--resume"), _process(whole, mode, *common)
    for p in (resumed, uninterrupted):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    losses = [[(r["step"], r["loss"]) for r in records(tmp_path / d)] for d in ("killed", "whole")]
    assert [s for s, _ in losses[1]] == list(range(1, steps + 1))
    assert losses[0] == losses[1]  # bit for bit
    assert [r["loss"] for r in records(tmp_path / "killed", "val")] == \
        [r["loss"] for r in records(tmp_path / "whole", "val")]
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("killed", "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

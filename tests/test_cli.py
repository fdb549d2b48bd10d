"""The `mixtral` command: generate/chat/info/convert against the library as oracle, and every error path.

Most tests run `main([...])` in-process (fast); two run `python -m mixtral.cli` for the entry point and exit code.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mistral_common
import pytest
import torch
from safetensors.torch import load_file, save_file

import mixtral
from mixtral.cli import build_parser, main
from mixtral.config import DTYPE_CHOICES, PRESETS
from mixtral.generate import stream_text
from mixtral.io.tokenizer import load_tokenizer
from mixtral.model import Transformer

GREEDY = ["--temperature", "0", "--max-new-tokens", "8"]
MIXTRAL_V1 = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def _save_hf(path: Path, seed: int = 0, **overrides) -> Path:
    transformers = pytest.importorskip("transformers")  # only the tests of checkpoints need it
    kwargs = dict(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**kwargs)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A small random HF checkpoint with the Mixtral vocabulary and no tokenizer of its own."""
    return _save_hf(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def ckpt_tok(tmp_path_factory, ckpt) -> Path:
    """The same checkpoint with the Mixtral tokenizer inside, as a released checkpoint ships it."""
    path = tmp_path_factory.mktemp("ckpt_tok") / "model"
    shutil.copytree(ckpt, path)
    shutil.copy(MIXTRAL_V1, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def reference(ckpt):
    """(model, tokenizer) loaded through the library: the oracle for what the CLI prints."""
    return mixtral.load(ckpt, progress=False), load_tokenizer()


@pytest.fixture
def run(capsys, monkeypatch):
    """run(*argv, stdin=None) -> (exit code, stdout, stderr) of main(argv) in-process."""
    def _run(*argv, stdin: str | None = None):
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()  # drop what the test printed before (transformers' progress bars)
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return _run


def _stream(model, tok, prompt, n=8) -> str:
    return "".join(stream_text(model, tok, prompt, n, temperature=0.0))


# ---- generate ---------------------------------------------------------------------------------------------------

def test_generate_preset_prints_text_and_one_note(run):
    code, out, err = run("generate", "--model", "tiny", *GREEDY, "Hello")
    assert code == 0
    assert out.strip()
    assert err.count("\n") == 1 and err.startswith("note:") and "random" in err


def test_generate_checkpoint_equals_library(run, ckpt, reference):
    model, tok = reference
    code, out, err = run("generate", "--model", ckpt, *GREEDY, "The mixture of experts")
    assert code == 0
    expected = mixtral.complete(model, tok, ["The mixture of experts"], 8, temperature=0.0)[0]
    assert out == expected + "\n"
    # No tokenizer in the directory: the Mixtral one, said once.
    assert err.count("note:") == 1 and "mistral-common" in err


def test_no_stream_and_stdin_give_the_streamed_text(run, ckpt):
    streamed = run("generate", "--model", ckpt, *GREEDY, "Once upon a time")[1]
    assert run("generate", "--model", ckpt, *GREEDY, "--no-stream", "Once upon a time")[1] == streamed
    assert run("generate", "--model", ckpt, *GREEDY, stdin="Once upon a time\n")[1] == streamed
    assert run("generate", "--model", ckpt, *GREEDY, "-", stdin="Once upon a time")[1] == streamed


def test_chat_flag_wraps_prompt_as_instruct_message(run, ckpt, reference):
    model, tok = reference
    code, out, _ = run("generate", "--model", ckpt, *GREEDY, "--chat", "What is a router?")
    assert code == 0
    assert out == _stream(model, tok, tok.encode_chat([{"role": "user", "content": "What is a router?"}])) + "\n"


def test_several_prompts_run_as_a_batch_with_headers(run, ckpt, reference):
    model, tok = reference
    prompts = ["Paris is", "The capital of Germany"]
    code, out, _ = run("generate", "--model", ckpt, *GREEDY, *prompts)
    assert code == 0
    texts = mixtral.complete(model, tok, prompts, 8, temperature=0.0)
    assert out == (f"==> prompt 1: 'Paris is' <==\n{texts[0]}\n\n"
                   f"==> prompt 2: 'The capital of Germany' <==\n{texts[1]}\n")


def test_sampling_is_reproducible_with_seed(run):
    args = ("generate", "--model", "tiny", "--max-new-tokens", "12", "--seed", "3", "Hello")
    first = run(*args)[1]
    assert run(*args)[1] == first
    assert run(*args[:-2], "4", "Hello")[1] != first


# ---- chat -------------------------------------------------------------------------------------------------------

def test_chat_keeps_the_conversation(run, ckpt, reference):
    model, tok = reference
    code, out, _ = run("chat", "--model", ckpt, *GREEDY, stdin="Hello\nWhat next?\n")
    assert code == 0
    messages = [{"role": "user", "content": "Hello"}]
    first = _stream(model, tok, tok.encode_chat(messages))
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "What next?"}]
    second = _stream(model, tok, tok.encode_chat(messages))
    assert out == f"{first}\n{second}\n"  # no "> " prompt: stdin is not a terminal


def test_chat_reset_and_exit(run, ckpt):
    out = run("chat", "--model", ckpt, *GREEDY, stdin="Hello\n/reset\nHello\n/exit\nnever answered\n")[1]
    first, second, rest = out.split("\n", 2)
    assert first == second and rest == ""


# ---- info -------------------------------------------------------------------------------------------------------

def test_info_preset_counts_without_allocating(run, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("info must not build the model")
    monkeypatch.setattr(Transformer, "__init__", no_weights)
    total, active = PRESETS["mixtral-8x7b"].param_counts()
    code, out, _ = run("info", "--model", "mixtral-8x7b")
    assert code == 0
    assert "46.70B" in out and str(total) in out
    assert "12.88B" in out and str(active) in out
    code, out, _ = run("info", "--model", "mixtral-8x7b", "--json")
    info = json.loads(out)
    assert (info["params_total"], info["params_active"]) == (total, active)
    assert info["config"]["n_experts"] == 8 and info["source"] == "preset"


def test_info_checkpoint_dir(run, ckpt_tok):
    code, out, _ = run("info", "--model", ckpt_tok)
    assert code == 0
    assert "Hugging Face layout" in out and "model.safetensors" in out and "tokenizer.model" in out
    info = json.loads(run("info", "--model", ckpt_tok, "--json")[1])
    assert info["layout"] == "hf" and info["config"]["hidden_dim"] == 64 and info["config"]["context_len"] == 64
    assert [f["name"] for f in info["files"]] == ["model.safetensors"]
    assert info["files"][0]["bytes"] == (ckpt_tok / "model.safetensors").stat().st_size
    assert info["tokenizer_files"] == ["tokenizer.model"]


# ---- convert ----------------------------------------------------------------------------------------------------

def test_convert_round_trip_keeps_text_and_tokenizer(run, ckpt_tok, tmp_path):
    native, hf = tmp_path / "native", tmp_path / "hf"
    assert run("convert", ckpt_tok, native, "--to", "native")[0] == 0
    assert run("convert", native, hf, "--to", "hf")[0] == 0
    assert (native / "params.json").exists() and (native / "consolidated.safetensors").exists()
    assert (hf / "config.json").exists() and (hf / "model.safetensors").exists()
    tokenizer_bytes = MIXTRAL_V1.read_bytes()
    assert (native / "tokenizer.model").read_bytes() == (hf / "tokenizer.model").read_bytes() == tokenizer_bytes
    results = [run("generate", "--model", d, *GREEDY, "Mixtral routes each token") for d in (ckpt_tok, native, hf)]
    assert all(code == 0 for code, _, _ in results)
    assert results[0][1] == results[1][1] == results[2][1]
    assert all(err == "" for _, _, err in results)  # each directory's own tokenizer: no note


def test_convert_force_replaces_an_old_checkpoint(run, ckpt, tmp_path):
    dst = tmp_path / "dst"
    assert run("convert", ckpt, dst, "--to", "native")[0] == 0
    (dst / "notes.txt").write_text("mine")
    code, _, _ = run("convert", ckpt, dst, "--to", "hf", "--force")
    assert code == 0
    # The old native files would otherwise sit beside the new HF ones; unrelated files stay.
    assert not (dst / "params.json").exists() and not (dst / "consolidated.safetensors").exists()
    assert (dst / "notes.txt").read_text() == "mine"
    assert run("info", "--model", dst, "--json")[0] == 0


# ---- help and usage ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command,options", [
    ("generate", ["--model", "--tokenizer", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                  "--stop", "--dtype", "--chat", "--no-stream", "--parallel.ep", "--parallel.timeout", "torchrun"]),
    ("chat", ["--model", "--tokenizer", "--max-new-tokens", "--temperature", "--top-p", "--seed", "/reset", "/exit",
              "--parallel.ep", "torchrun"]),
    ("info", ["--model", "--json"]),
    ("convert", ["SRC", "DST", "--to", "--dtype", "--force"]),
])
def test_help(run, command, options):
    code, out, _ = run(command, "--help")
    assert code == 0
    assert "examples:" in out
    for option in options:
        assert option in out


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) of every subcommand under `parser`, nested ones (`routes record`) included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield path + (name,), sub
                yield from _commands(sub, path + (name,))


COMMANDS = {path: sub for path, sub in _commands(build_parser())}


def test_every_command_is_listed():
    top = {path[0] for path in COMMANDS}
    assert top == {"generate", "chat", "info", "convert", "quantize", "plan", "bench", "train", "serve", "data",
                   "routes", "finetune", "eval"}
    assert {("routes", a) for a in ("record", "report", "html", "ablate")} <= set(COMMANDS)
    assert ("data", "prepare") in COMMANDS


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_command_has_help(run, path):
    code, out, err = run(*path, "--help")
    assert code == 0, err
    assert out.startswith(f"usage: mixtral {' '.join(path)}")


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


@pytest.mark.parametrize("flag,commands", [
    ("--model", ["info", "serve", "routes record", "routes ablate"]),
    ("--model", ["generate", "chat"]),  # their own: without --model they pick the bundled model by --chat
    ("--tokenizer", ["generate", "chat", "serve", "routes record", "routes ablate"]),
    ("--dtype", ["generate", "chat", "serve", "routes record", "routes ablate"]),
    ("--quantize", ["generate", "chat", "serve", "routes record", "routes ablate"]),
    ("--parallel.ep", ["generate", "chat", "serve"]),
    ("--parallel.timeout", ["generate", "chat", "serve"]),
    ("--verbose", ["generate", "chat", "info", "convert", "serve", "routes", "routes record", "routes html"]),
])
def test_shared_options_are_one_definition(flag, commands):
    actions = {command: _option(COMMANDS[tuple(command.split())], flag) for command in commands}
    assert all(a is not None for a in actions.values()), actions
    assert len({id(a) for a in actions.values()}) == 1, f"{flag} is defined more than once"
    if flag == "--dtype":
        assert tuple(actions["generate"].choices) == DTYPE_CHOICES
    if flag == "--model":  # None for generate and chat: `default_model` picks by --chat
        assert next(iter(actions.values())).default == (None if "generate" in actions else "default")


def test_routes_runs_in_float32_unless_told(monkeypatch):
    from mixtral.analysis import cli as routes_cli

    seen = {}

    def fake_load(model, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop before any work; main turns it into 130

    monkeypatch.setattr(routes_cli, "load_model_and_tokenizer", fake_load)
    assert main(["routes", "record", "--model", "tiny", "--source", "x=README.md"]) == 130
    assert seen["dtype"] == "float32"
    assert main(["routes", "record", "--model", "tiny", "--dtype", "bf16", "--source", "x=README.md"]) == 130
    assert seen["dtype"] == "bf16"


def test_usage_errors_keep_argparse_exit_code(run):
    assert run()[0] == 2
    assert run("generate", "--max-new-tokens", "many")[0] == 2
    assert run("convert", "a", "b")[0] == 2  # --to is required


# ---- errors: one line, exit 1, the thing at fault named ---------------------------------------------------------

def _assert_error(result, *named):
    code, _, err = result
    assert code == 1, err
    assert err.startswith("error:"), err
    assert "Traceback" not in err
    for thing in named:
        assert str(thing) in err, err


def test_error_missing_directory(run, tmp_path):
    missing = tmp_path / "no-such-model"
    _assert_error(run("generate", "--model", missing, "hi"), missing)
    _assert_error(run("info", "--model", missing), missing)


def test_error_not_a_checkpoint(run, tmp_path):
    _assert_error(run("generate", "--model", tmp_path, "hi"), tmp_path, "config.json")


def test_error_shape_disagrees_with_config(run, ckpt, tmp_path):
    path = shutil.copytree(ckpt, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 48
    (path / "config.json").write_text(json.dumps(config))
    _assert_error(run("generate", "--model", path, "hi"), path / "model.safetensors", "shape", "[48, 32]")


def test_error_missing_tensor(run, ckpt, tmp_path):
    path = shutil.copytree(ckpt, tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, path / "model.safetensors", {"format": "pt"})
    _assert_error(run("generate", "--model", path, "hi"), "'model.norm.weight'", path)


def test_error_truncated_weights(run, ckpt, tmp_path):
    path = shutil.copytree(ckpt, tmp_path / "m")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _assert_error(run("generate", "--model", path, "hi"), weights, "truncated")
    _assert_error(run("info", "--model", path), weights, "truncated")  # info reads the headers


def test_error_unknown_preset(run):
    _assert_error(run("generate", "--model", "mixtral-9x9b", "hi"), "'mixtral-9x9b'", "tiny")


def test_error_prompt_longer_than_context(run, ckpt_tok):
    _assert_error(run("generate", "--model", ckpt_tok, *GREEDY, " ".join(["word"] * 100)), "context of 64 tokens")


def test_error_convert_into_non_empty_destination(run, ckpt, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    _assert_error(run("convert", ckpt, tmp_path, "--to", "native"), tmp_path, "--force")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_error_no_tokenizer_for_another_vocabulary(run, tmp_path):
    path = _save_hf(tmp_path / "small-vocab", vocab_size=128)
    _assert_error(run("generate", "--model", path, "hi"), "vocab_size 128", "--tokenizer")


def test_error_bad_sampling_setting_before_loading(run):
    _assert_error(run("generate", "--model", "mixtral-8x7b", "--top-p", "1.5", "hi"), "top_p", "1.5")


def test_interrupt_and_broken_pipe_are_quiet(run, monkeypatch, capsys):
    class Interrupted(io.StringIO):
        def read(self, *args):
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", Interrupted())
    code, out, err = run("generate", "--model", "tiny")
    assert (code, out, err) == (130, "", "")

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code = main(["generate", "--model", "tiny", *GREEDY, "hi"])
    assert code == 141
    assert "error" not in capsys.readouterr().err


# ---- the real entry point ---------------------------------------------------------------------------------------

def _cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixtral.cli", *map(str, argv)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def test_entry_point_generates(run):
    result = _cli("generate", "--model", "tiny", *GREEDY, "Hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == run("generate", "--model", "tiny", *GREEDY, "Hello")[1]
    assert result.stderr.startswith("note:") and "Traceback" not in result.stderr


def test_entry_point_error_exit_code(tmp_path):
    result = _cli("info", "--model", tmp_path / "missing")
    assert result.returncode == 1
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1
    assert str(tmp_path / "missing") in result.stderr


# ---- quantize, plan, --max-memory -------------------------------------------------------------------------------

def test_quantize_command_writes_a_checkpoint_that_generates_the_same(run, ckpt, tmp_path):
    code, out, err = run("quantize", ckpt, tmp_path / "q", "--experts", "int4:g32", "--attention", "int8",
                         "--output", "bf16")
    assert code == 0, err
    assert "experts int4:g32, attention int8, output float" in out
    saved = mixtral.load(tmp_path / "q")
    assert mixtral.quant.quantization_of(saved) == {"experts": "int4:g32", "attention": "int8", "output": None}
    want = mixtral.load(ckpt, quantize={"experts": "int4:g32", "attention": "int8"}, progress=False)
    ids = torch.tensor([[1, 5, 9, 200]])
    assert torch.equal(saved(ids), want(ids))
    code, _, err = run("quantize", ckpt, tmp_path / "q")
    assert code == 1 and "not empty; pass --force" in err


def test_max_memory_generates_what_the_resident_model_does(run, ckpt, tmp_path):
    args = ("generate", "--model", ckpt, "--quantize", "int4", "--temperature", "0", "-n", "6", "Hello")
    code, resident, _ = run(*args)
    code, offloaded, err = run(*args, "--max-memory", "40MB", "--offload-dir", tmp_path / "x", "-v")
    assert code == 0 and offloaded == resident
    assert "offload:" in err and "hit rate" in err and "per step" in err


def test_quantize_option_errors_are_usage_errors(run):
    code, _, err = run("generate", "--quantize", "experts=int9", "Hi")
    assert code == 2 and "unknown quantization mode 'int9'" in err


def test_plan_prints_a_plan_within_the_budget(run, monkeypatch):
    from mixtral.offload import plan
    monkeypatch.setattr(plan, "measure_machine", lambda directory, files: plan.Machine(1.5e9, 20e9))
    code, out, err = run("plan", "--model", "mixtral-8x7b", "--max-memory", "16GB")
    assert code == 0, err
    assert out.startswith("machine: disk 1.50 GB/s") and "\nplan: experts " in out and "of 16.00 GB" in out
    assert "mixtral quantize mixtral-8x7b OUT --experts" in out
    code, _, err = run("plan", "--model", "mixtral-8x7b", "--max-memory", "1GB")
    assert code == 1 and "too small" in err

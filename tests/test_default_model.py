"""The bundled default model: present, loaded by `mixtral` and `transformers` with the same logits, and what the
CLI runs when no --model is given."""
from __future__ import annotations

import pytest
import torch

import mixtral
from mixtral import load_tokenizer
from mixtral.cli import main
from mixtral.io.loading import DEFAULT_MODEL, DEFAULT_MODEL_DIR


def test_the_default_model_is_bundled_with_its_card():
    names = {p.name for p in DEFAULT_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "README.md", "curves.png"} <= names
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size < 100e6  # small enough to ship in the package
    model = mixtral.load("default", progress=False)
    c = model.config
    assert (c.n_experts, c.top_k, c.vocab_size) == (8, 2, 32000)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16


def test_transformers_gives_the_same_logits():
    transformers = pytest.importorskip("transformers")
    ids = torch.tensor([load_tokenizer("default").encode("The mixture of experts routes each token")])
    ours = mixtral.load("default", dtype="float32", progress=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)


def test_its_tokenizer_is_the_mixtral_tokenizer():
    text = "Bonjour, wie geht's? 3 + 4 = 7\n    def f(x):"
    assert load_tokenizer(DEFAULT_MODEL_DIR).encode(text) == load_tokenizer().encode(text)


def test_generate_without_model_uses_it(capsys):
    assert DEFAULT_MODEL == "default"
    code = main(["generate", "--temperature", "0", "--max-new-tokens", "6", "def main():"])
    out, err = capsys.readouterr()
    want = mixtral.complete(mixtral.load("default", progress=False), load_tokenizer("default"), ["def main():"], 6)[0]
    assert code == 0 and out.strip() == want.strip() and want.strip()
    assert "random weights" not in err


def test_the_instruct_model_is_bundled_and_chat_uses_it(capsys, monkeypatch):
    from mixtral.io.loading import DEFAULT_INSTRUCT, DEFAULT_INSTRUCT_DIR

    names = {p.name for p in DEFAULT_INSTRUCT_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "README.md", "results.json"} <= names
    model, tokenizer = mixtral.load(DEFAULT_INSTRUCT, progress=False), load_tokenizer(DEFAULT_INSTRUCT)
    question = [{"role": "user", "content": "What is 12 + 30?"}]
    want = mixtral.complete(model, tokenizer, [tokenizer.encode_chat(question)], 8)[0].strip()
    assert main(["generate", "--chat", "--temperature", "0", "--max-new-tokens", "8", "What is 12 + 30?"]) == 0
    assert capsys.readouterr().out.strip() == want
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("What is 12 + 30?\n"))
    assert main(["chat", "--temperature", "0", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == want
    # Without --chat, generate keeps the base model.
    assert main(["generate", "--temperature", "0", "--max-new-tokens", "6", "def main():"]) == 0
    base = mixtral.complete(mixtral.load("default", progress=False), load_tokenizer("default"), ["def main():"], 6)[0]
    assert capsys.readouterr().out.strip() == base.strip()

"""mixtral.io.loading: the one "preset unless it is a path" rule, "default", and the model + tokenizer loader the
commands use (its notes go to a logger, not to stderr)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from mixtral.config import PRESETS
from mixtral.errors import CheckpointError, InputError
from mixtral.io.loading import (DEFAULT_MODEL_DIR, NOTES_LOGGER, inspect_model, is_preset, load,
                                load_model_and_tokenizer, resolve_model)
from mixtral.io.tokenizer import Tokenizer
from mixtral.model import Transformer


def test_a_preset_name_is_a_preset_unless_it_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_preset("tiny") and not is_preset("default") and not is_preset("nope")
    assert not is_preset(Path("tiny"))  # a Path is always a path
    (tmp_path / "tiny").mkdir()
    assert not is_preset("tiny")
    # load and inspect_model follow the same rule: ./tiny is now read as a (broken) checkpoint directory.
    with pytest.raises(CheckpointError, match="tiny"):
        load("tiny")
    with pytest.raises(CheckpointError, match="tiny"):
        inspect_model("tiny")


def test_default_means_the_bundled_model(tmp_path, monkeypatch):
    assert resolve_model("default") == DEFAULT_MODEL_DIR
    assert inspect_model("default")[1].directory == DEFAULT_MODEL_DIR
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()
    assert resolve_model("default") == "default"  # a directory of that name here wins


def test_unknown_names_and_settings_are_named():
    with pytest.raises(CheckpointError, match="'mixtral-9x9b' is neither an existing checkpoint directory nor a "
                                              "preset"):
        inspect_model("mixtral-9x9b")
    with pytest.raises(InputError, match="unknown dtype 'fp8'"):
        load("tiny", dtype="fp8")
    with pytest.raises(InputError, match="'int5'"):
        load("tiny", quantize="int5")


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_load_model_and_tokenizer_logs_its_notes():
    notes, records = logging.getLogger(NOTES_LOGGER), Records()
    notes.addHandler(records)  # on the logger itself: `mixtral` (the command) may have stopped it propagating
    try:
        model, tokenizer = load_model_and_tokenizer("tiny", dtype="bf16", progress=False)
    finally:
        notes.removeHandler(records)
    assert isinstance(model, Transformer) and isinstance(tokenizer, Tokenizer)
    assert model.config == PRESETS["tiny"] and model.tok_embeddings.weight.dtype == torch.bfloat16
    assert [r.levelno for r in records.records] == [logging.WARNING]
    assert "random weights" in records.records[0].getMessage()


# ---- offloading: mixtral.load(..., offload=...) -------------------------------------------------------------------

def test_offloaded_load_equals_the_resident_model(tmp_path):
    from mixtral.generate import generate

    resident = load("tiny", quantize="int4", seed=2)
    offloaded = load("tiny", quantize="int4", seed=2, offload="12MB", offload_dir=tmp_path / "experts",
                     progress=False)
    with offloaded.offload_engine as engine:
        assert all(layer.moe.w13 is None for layer in offloaded.layers)  # the experts are on disk only
        ids = torch.tensor([[1, 5, 9, 200, 31], [1, 7, 3, 3, 8]])
        assert torch.equal(offloaded(ids), resident(ids))
        prompts = [[1, 5, 9, 200], [1, 7]]
        assert generate(offloaded, prompts, 6) == generate(resident, prompts, 6)
        assert engine.stats()["needed"] > 0
    # The expert files written on first use are reused: a second load writes nothing.
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "experts").rglob("*") if p.is_file()}
    again = load("tiny", quantize="int4", seed=2, offload="12MB", offload_dir=tmp_path / "experts")
    again.offload_engine.close()
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "experts").rglob("*") if p.is_file()} == written


def test_an_unquantized_model_offloads_in_its_own_dtype(tmp_path):
    resident = load("tiny", dtype="bf16", seed=4)
    offloaded = load("tiny", dtype="bf16", seed=4, offload="24MB", offload_dir=tmp_path / "experts", progress=False)
    with offloaded.offload_engine:
        ids = torch.tensor([[1, 5, 9, 200, 31]])
        assert torch.equal(offloaded(ids), resident(ids))


def test_offloading_a_quantized_checkpoint_reads_its_expert_files(tmp_path):
    from mixtral.io.loading import quantize_checkpoint

    quantize_checkpoint("tiny", tmp_path / "q", {"experts": "int8", "attention": "int4"}, progress=False)
    resident = load(tmp_path / "q")
    offloaded = load(tmp_path / "q", offload="24MB", offload_policy="lru")
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    assert torch.equal(offloaded(ids), resident(ids))
    offloaded.offload_engine.close()
    with pytest.raises(InputError, match="already quantized"):
        load(tmp_path / "q", offload="12MB", quantize="int4")


def test_offload_budget_too_small_names_the_sizes(tmp_path):
    with pytest.raises(InputError, match=r"budget of 1\.00 MB is too small for tiny: its resident part .* takes "
                                         r"[\d.]+ MB and one token's 2 experts [\d.]+ MB more; give at least"):
        load("tiny", quantize="int4", offload="1MB", offload_dir=tmp_path / "experts")
    for bad, message in (("12XB", "not a size"), ("-1GB", "must be positive")):
        with pytest.raises(InputError, match=message):
            load("tiny", offload=bad)
    with pytest.raises(InputError, match="unknown offloading policy 'mru'"):
        load("tiny", offload="12MB", offload_policy="mru", offload_dir=tmp_path / "experts")


def test_a_preset_is_drawn_matrix_by_matrix_as_init_weights_draws_it():
    expected = Transformer(PRESETS["tiny"]).init_weights(3).to(torch.bfloat16).state_dict()
    got = load("tiny", dtype="bf16", seed=3, progress=False).state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


@pytest.mark.parametrize("source", ["preset", "checkpoint", "quantized"])
def test_loading_onto_another_device_moves_every_layer(tmp_path, source):
    # The meta device stands in for a GPU: each layer leaves the host once complete (LayerMover; the memory
    # this saves is measured in tests/test_memory.py), and nothing stays behind on the CPU.
    from mixtral.io.checkpoint import save_hf
    from mixtral.io.loading import quantize_checkpoint

    if source == "preset":
        path = "tiny"
    elif source == "checkpoint":
        path = save_hf(load("tiny", seed=1), tmp_path / "hf")
    else:
        path = quantize_checkpoint("tiny", tmp_path / "q", {"experts": "int3", "attention": "int8"}, progress=False)
    model = load(path, device="meta", quantize="int4" if source != "quantized" else None, progress=False)
    tensors = [*model.parameters(), *(b for b in model.buffers() if b is not None)]
    assert tensors and all(t.device.type == "meta" for t in tensors)

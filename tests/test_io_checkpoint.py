"""mixtral.io.checkpoint and mixtral.io.layouts: checkpoint layouts (HF, sharded, fused, native, native .pth,
December 2023 stacked), round trips through transformers, errors, and the streaming safetensors writer."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mixtral
from mixtral.errors import CheckpointError
from mixtral.io.checkpoint import SafetensorsReader, TensorPlan, save_hf, save_native, write_safetensors
from mixtral.io.layouts import native_layout, permute_to_interleaved, permute_to_rotate_half

from conftest import hf_mistral, hf_mixtral

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS)


def _assert_same_logits(a, b):
    assert (a - b).abs().max().item() <= 1e-5


def test_rotary_permutations_are_inverse():
    w = torch.randn(64, 32)
    torch.testing.assert_close(permute_to_interleaved(permute_to_rotate_half(w, 4), 4), w, rtol=0, atol=0)


def test_sharded_hf_checkpoint(tmp_path):
    hf = hf_mixtral(seed=1)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    _assert_same_logits(_logits(mixtral.load(tmp_path, progress=False)), hf(IDS).logits.detach())


def test_fused_expert_keys_of_transformers_5(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint
    # transformers 5 keeps experts fused in memory (mlp.experts.gate_up_proj); a file with those names loads too.
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    _assert_same_logits(_logits(mixtral.load(tmp_path, progress=False)), hf(IDS).logits.detach())


@pytest.mark.parametrize("make", [hf_mixtral, hf_mistral], ids=["mixtral", "mistral"])
def test_hf_to_native_to_hf_round_trip(make, tmp_path):
    hf = make(seed=2, sliding_window=5)
    hf.save_pretrained(tmp_path / "hf")
    model = mixtral.load(tmp_path / "hf", progress=False)
    save_native(model, tmp_path / "native")
    assert json.loads((tmp_path / "native" / "params.json").read_text())["sliding_window"] == 5
    native = mixtral.load(tmp_path / "native", progress=False)
    _assert_same_logits(_logits(native), hf(IDS).logits.detach())
    save_hf(native, tmp_path / "hf2")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    _assert_same_logits(back(IDS).logits.detach(), hf(IDS).logits.detach())


def test_native_keys_use_interleaved_rotary_order(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint
    save_native(mixtral.load(path, progress=False), tmp_path)
    native = load_file(tmp_path / "consolidated.safetensors")
    assert set(native) == set(native_layout(mixtral.load(tmp_path, progress=False).config))
    hf_wq = hf.model.layers[0].self_attn.q_proj.weight.detach()
    torch.testing.assert_close(native["layers.0.attention.wq.weight"], permute_to_interleaved(hf_wq, 4))
    torch.testing.assert_close(native["layers.0.feed_forward.experts.1.w2.weight"],
                               hf.model.layers[0].mlp.experts.down_proj[1].detach())


def _native_state(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint
    save_native(mixtral.load(path, progress=False), tmp_path / "n")
    return load_file(tmp_path / "n" / "consolidated.safetensors"), (tmp_path / "n" / "params.json").read_text(), hf


def test_native_pth_checkpoint(hf_checkpoint, tmp_path):
    state, params, hf = _native_state(hf_checkpoint, tmp_path)
    (tmp_path / "pth").mkdir()
    torch.save(state, tmp_path / "pth" / "consolidated.00.pth")
    (tmp_path / "pth" / "params.json").write_text(params)
    _assert_same_logits(_logits(mixtral.load(tmp_path / "pth", progress=False)), hf(IDS).logits.detach())


def test_december_2023_stacked_expert_layout(hf_checkpoint, tmp_path):
    state, params, hf = _native_state(hf_checkpoint, tmp_path)
    n_experts = json.loads(params)["moe"]["num_experts"]
    stacked = {}
    for key, value in state.items():
        if ".feed_forward.experts." not in key:
            stacked[key.replace("feed_forward.gate", "block_sparse_moe.gate")] = value
    for layer in range(2):
        for w in ("w1", "w2", "w3"):
            blocks = [state[f"layers.{layer}.feed_forward.experts.{e}.{w}.weight"] for e in range(n_experts)]
            # The original release stores [experts * hidden, dim]; each w2 block is transposed.
            stacked[f"layers.{layer}.block_sparse_moe.{w}"] = torch.cat([b.T if w == "w2" else b for b in blocks])
    (tmp_path / "dec").mkdir()
    torch.save(stacked, tmp_path / "dec" / "consolidated.00.pth")
    (tmp_path / "dec" / "params.json").write_text(params)
    _assert_same_logits(_logits(mixtral.load(tmp_path / "dec", progress=False)), hf(IDS).logits.detach())


def test_saved_hf_loads_in_transformers_in_bf16(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint
    save_hf(mixtral.load(path, progress=False), tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = mixtral.load(tmp_path, progress=False)
    assert ours.output.weight.dtype == torch.bfloat16  # the checkpoint's dtype is kept by default
    with torch.no_grad():
        assert (back(IDS).logits.float() - ours(IDS).float()).abs().max().item() < 0.05


def test_save_is_atomic_and_leaves_no_temporaries(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint
    save_hf(mixtral.load(path, progress=False), tmp_path, max_shard_bytes=20_000)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in names if n.startswith(".") or ".tmp" in n]
    assert "model.safetensors.index.json" in names and len([n for n in names if n.startswith("model-")]) > 1
    _assert_same_logits(_logits(mixtral.load(tmp_path, progress=False)), _logits(mixtral.load(path, progress=False)))


# ---- errors: each names the file and the tensor or field -----------------------------------------------------

def _copy(path, tmp_path):
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="nope' is neither an existing checkpoint directory nor a preset"):
        mixtral.load(tmp_path / "nope")


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        mixtral.load(tmp_path)


def test_no_weight_files(hf_checkpoint, tmp_path):
    (tmp_path / "config.json").write_text((hf_checkpoint[0] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weight files"):
        mixtral.load(tmp_path)


def test_missing_tensor(hf_checkpoint, tmp_path):
    d = _copy(hf_checkpoint[0], tmp_path)
    state = load_file(d / "model.safetensors")
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.block_sparse_moe\.experts\.2\.w3"):
        mixtral.load(d, progress=False)


@pytest.mark.parametrize("field, value, error", [
    ("intermediate_size", 40, r"model\.safetensors: tensor '.*experts\.0\.w1\.weight' has shape \[48, 32\], "
                              r"config expects \[40, 32\]"),
    ("num_hidden_layers", 1, r"unexpected tensor 'model\.layers\.1\."),
], ids=["shape", "unexpected-tensor"])
def test_config_disagrees_with_the_weights(hf_checkpoint, tmp_path, field, value, error):
    d = _copy(hf_checkpoint[0], tmp_path)
    config = json.loads((d / "config.json").read_text())
    config[field] = value
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=error):
        mixtral.load(d, progress=False)


def test_truncated_safetensors(hf_checkpoint, tmp_path):
    d = _copy(hf_checkpoint[0], tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor '.*' ends at byte"):
        mixtral.load(d, progress=False)
    (d / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="not a safetensors file, or truncated inside its header"):
        mixtral.load(d, progress=False)


def test_pth_is_never_unpickled_beyond_weights(tmp_path, hf_checkpoint):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "consolidated.00.pth")
    state, params, _ = _native_state(hf_checkpoint, tmp_path / "p")
    (tmp_path / "params.json").write_text(params)
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: cannot load as a weights-only"):
        mixtral.load(tmp_path, progress=False)


def test_bad_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(mixtral.ConfigError, match=r"config\.json: not valid JSON"):
        mixtral.load(tmp_path)


def test_unknown_preset():
    with pytest.raises(CheckpointError, match="'mixtral-1x1b'.*presets: mixtral-8x7b"):
        mixtral.load("mixtral-1x1b")


# ---- the safetensors writer ----------------------------------------------------------------------------------

def _plan(name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> TensorPlan:
    return TensorPlan(name, tuple(tensor.shape), dtype or tensor.dtype, lambda: tensor)


def test_written_tensors_read_back_by_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(2, 6, 4, generator=g)
    tensors = {
        "f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 3, generator=g).half(), "i8": torch.randint(-127, 128, (5, 3), dtype=torch.int8),
        "u8": torch.randint(0, 256, (9,), dtype=torch.uint8), "i64": torch.arange(3), "bool": torch.tensor([True]),
        "scalar": torch.tensor(2.5), "empty": torch.empty(0, 4, dtype=torch.bfloat16),
        "w1": w13[1, :3], "w3": w13[1, 3:], "transposed": w13[0].t(),  # views sharing one storage
    }
    plans = [_plan(name, t) for name, t in tensors.items()] + [_plan("as_bf16", w13[0], torch.bfloat16)]
    path = tmp_path / "t.safetensors"
    write_safetensors(path, plans, {"format": "pt", "note": "x"})
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]
    loaded = load_file(path)
    assert set(loaded) == {*tensors, "as_bf16"}
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert torch.equal(loaded["as_bf16"], w13[0].to(torch.bfloat16))
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
    reader = SafetensorsReader(path)
    try:
        for name, tensor in tensors.items():
            assert torch.equal(reader.read(name), tensor), name
            start = reader.entries[name][2]
            assert start % tensor.element_size() == 0, name  # each tensor aligned to its element size
    finally:
        reader.close()


def test_a_failed_write_leaves_no_file_and_no_temporary(tmp_path):
    def fail() -> torch.Tensor:
        raise RuntimeError("interrupted")

    path = tmp_path / "model.safetensors"
    plans = [_plan("a", torch.ones(4)), TensorPlan("b", (4,), torch.float32, fail)]
    with pytest.raises(RuntimeError, match="interrupted"):
        write_safetensors(path, plans)
    assert not list(tmp_path.iterdir())
    write_safetensors(path, [_plan("a", torch.ones(4))])
    with pytest.raises(AssertionError, match="made shape"):  # a tensor that is not what its plan said
        write_safetensors(path, [TensorPlan("a", (5,), torch.float32, lambda: torch.ones(4))])
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert torch.equal(load_file(path)["a"], torch.ones(4))  # the old file is kept whole

"""LoRA adapters in PEFT's format (mixtral.finetune.peft): transformers + PEFT over our save_hf base give our logits
with our adapters (attention, per-expert w13/w2, a trained router; a dense model's FFN); adapters PEFT trained load
into ours with PEFT's logits; merged adapters load in transformers; what our modules cannot hold is named."""
from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtral.config import PRESETS
from mixtral.errors import CheckpointError, InputError
from mixtral.finetune import lora
from mixtral.finetune.peft import CONFIG_FILE, WEIGHTS_FILE, load_peft, save_peft
from mixtral.io.checkpoint import save_hf
from mixtral.model import random_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CONFIG = dataclasses.replace(PRESETS["tiny"], n_layers=2, n_experts=4, top_k=2, vocab_size=256)
DENSE = dataclasses.replace(PRESETS["tiny-dense"], n_layers=1, vocab_size=256)
IDS = torch.tensor([[1, 5, 9, 200, 31, 7], [2, 8, 8, 3, 90, 4]])


def _model(config=CONFIG, seed=0):
    model = random_model(config, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # spread-out routers: tokens reach every expert
        for layer in model.layers:
            if layer.moe.router is not None:
                layer.moe.router.weight.normal_(0, 0.5, generator=g)
    return model


def _trained(model, seed=1):
    """Random values in every adapter (B too, else a wrong B mapping could not show) and a trained router."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _hf(path, config=CONFIG):
    """transformers' model of the base saved at `path` (float32, eval)."""
    save_hf(_model(config), path)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model):
    """Logits of IDS from ours (a tensor) or transformers' (an output object)."""
    with torch.no_grad():
        out = model(IDS)
    return getattr(out, "logits", out)


LORA_CONFIGS = {
    "everything": lora.LoRAConfig(rank=3, alpha=6, train_router=True),
    "experts only": lora.LoRAConfig(rank=2, alpha=5, attention=()),
    "some attention": lora.LoRAConfig(rank=2, alpha=4, attention=("wq", "wk"), experts=False),
}


@pytest.mark.parametrize("name", LORA_CONFIGS)
def test_peft_over_transformers_gives_our_logits(tmp_path, name):
    ours = _trained(lora.apply_lora(_model(), LORA_CONFIGS[name]))
    want = _logits(ours)
    assert not torch.allclose(want, _logits(_model()), atol=1e-3)  # the adapters do change the logits
    save_peft(ours, tmp_path / "adapter", base_model_name_or_path="tiny")
    theirs = peft.PeftModel.from_pretrained(_hf(tmp_path / "base"), tmp_path / "adapter").eval()
    assert torch.allclose(_logits(theirs), want, atol=1e-4)
    config = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "tiny"
    # and back into ours
    again = load_peft(_model(), tmp_path / "adapter")
    assert again.lora_config == ours.lora_config
    assert torch.allclose(_logits(again), want, atol=1e-6)


def test_a_dense_models_ffn_adapters_share_one_a_between_gate_and_up(tmp_path):
    ours = _trained(lora.apply_lora(_model(DENSE), lora.LoRAConfig(rank=2, alpha=4)))
    want = _logits(ours)
    save_peft(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(_hf(tmp_path / "base", DENSE), tmp_path / "adapter").eval()
    assert torch.allclose(_logits(theirs), want, atol=1e-4)
    assert torch.allclose(_logits(load_peft(_model(DENSE), tmp_path / "adapter")), want, atol=1e-6)


def test_expert_dropout_is_written_as_zero_which_peft_requires(tmp_path, caplog):
    ours = _trained(lora.apply_lora(_model(), lora.LoRAConfig(rank=2, dropout=0.1))).eval()
    with caplog.at_level(logging.WARNING, logger="mixtral"):
        save_peft(ours, tmp_path / "adapter")
    assert "lora_dropout 0" in caplog.text
    assert json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())["lora_dropout"] == 0.0
    theirs = peft.PeftModel.from_pretrained(_hf(tmp_path / "base"), tmp_path / "adapter").eval()
    assert torch.allclose(_logits(theirs), _logits(ours), atol=1e-4)


def test_an_adapter_peft_trained_loads_into_ours(tmp_path):
    theirs = _hf(tmp_path / "base")
    config = peft.LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "v_proj", "o_proj"],
                             target_parameters=["mlp.experts.down_proj"], task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(theirs, config).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_peft(_model(), tmp_path / "adapter")
    assert ours.lora_config.attention == ("wq", "wv", "wo") and ours.lora_config.experts
    assert torch.allclose(_logits(ours), _logits(theirs), atol=1e-4)
    # gate_up_proj was not targeted: its B is zero
    assert all(layer.moe.lora.b13.abs().sum() == 0 for layer in ours.layers)


def test_merged_adapters_load_in_transformers_with_the_same_logits(tmp_path):
    ours = _trained(lora.apply_lora(_model(), lora.LoRAConfig(rank=3, alpha=6, train_router=True)))
    want = _logits(ours)
    save_hf(lora.merge_lora(ours), tmp_path / "merged", dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert torch.allclose(_logits(theirs), want, atol=1e-4)


def test_save_errors_are_named(tmp_path):
    with pytest.raises(InputError, match="no LoRA adapters to save"):
        save_peft(_model(), tmp_path / "a")
    nothing = lora.apply_lora(_model(), lora.LoRAConfig(attention=(), experts=False))
    with pytest.raises(InputError, match="adapts nothing"):
        save_peft(nothing, tmp_path / "a")
    assert not (tmp_path / "a" / WEIGHTS_FILE).exists()


def _rewrite(path, **fields):
    data = json.loads((path / CONFIG_FILE).read_text())
    data.update(fields)
    (path / CONFIG_FILE).write_text(json.dumps(data))


def test_what_our_adapters_cannot_hold_is_named_and_leaves_the_model_as_it_was(tmp_path):
    good = tmp_path / "good"
    save_peft(_trained(lora.apply_lora(_model(), lora.LoRAConfig(rank=2))), good)
    bad = tmp_path / "bad"
    bad.mkdir()
    cases = [
        ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
        ({"use_dora": True}, "use_dora = True is not supported"),
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"bias": "all"}, "bias = 'all'"),
        ({"target_modules": "all-linear"}, "target_modules must be a list"),
        ({"target_modules": ["q_proj", "w1"]}, "target_modules entry 'w1'"),
        ({"target_parameters": ["mlp.experts.router"]}, "target_parameters entry"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save entry 'lm_head'"),
        ({"r": 3}, r"tensor '.*lora_A.weight' has shape \[2, 64\], the model's is \[3, 64\]"),
        ({"target_modules": ["q_proj"]}, "unexpected tensor '.*k_proj"),
        ({"modules_to_save": ["mlp.gate"]}, "missing tensor '.*mlp.gate.weight'"),
    ]
    for fields, message in cases:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            (bad / name).write_bytes((good / name).read_bytes())
        _rewrite(bad, **fields)
        model = _model()
        with pytest.raises(CheckpointError, match=message) as e:
            load_peft(model, bad)
        assert str(bad) in str(e.value)
        assert getattr(model, "lora_config", None) is None, fields
        assert not isinstance(model.layers[0].attention.wq, lora.LoRALinear), fields
    with pytest.raises(CheckpointError, match="adapter_config.json: cannot read"):
        load_peft(_model(), tmp_path / "missing")
    with pytest.raises(InputError, match="already has LoRA"):
        load_peft(lora.apply_lora(_model()), good)


def test_a_dense_gate_and_up_with_different_a_are_refused(tmp_path):
    save_peft(_trained(lora.apply_lora(_model(DENSE), lora.LoRAConfig(rank=2))), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_FILE)
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    tensors[key] = tensors[key] + 1
    save_file(tensors, tmp_path / WEIGHTS_FILE, {"format": "pt"})
    model = _model(DENSE)
    with pytest.raises(CheckpointError, match="up_proj.lora_A.weight' differs from .*gate_proj.lora_A.weight"):
        load_peft(model, tmp_path)
    assert getattr(model, "lora_config", None) is None and model.layers[0].moe.lora is None

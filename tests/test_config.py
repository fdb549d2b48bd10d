from __future__ import annotations

import json

import pytest
import torch

from mixtral.config import (DTYPE_ALIASES, DTYPE_CHOICES, PRESETS, ModelConfig, dtype_name, from_hf_dict, from_name,
                            from_params_dict, parse_dtype, to_hf_dict, to_params_dict, with_overrides)
from mixtral.errors import ConfigError, InputError
from mixtral.train.config import load_config


def test_mixtral_8x7b_matches_paper_table_1_and_parameter_counts():
    c = from_name("mixtral-8x7b")
    assert (c.dim, c.n_layers, c.head_dim, c.hidden_dim, c.n_heads, c.n_kv_heads) == (4096, 32, 128, 14336, 32, 8)
    assert (c.context_len, c.vocab_size, c.n_experts, c.top_k) == (32768, 32000, 8, 2)
    assert c.sliding_window is None and c.rope_theta == 1e6
    total, active = c.param_counts()
    assert round(total / 1e9, 1) == 46.7
    assert round(active / 1e9, 1) == 12.9


def test_mistral_7b_is_dense_with_window():
    c = from_name("mistral-7b")
    assert not c.is_moe and c.sliding_window == 4096
    total, active = c.param_counts()
    assert total == active and round(total / 1e9, 2) == 7.24


def test_unknown_preset_names_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'mixtral-9x9b'.*mixtral-8x7b"):
        from_name("mixtral-9x9b")


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_and_params_round_trip(name):
    c = PRESETS[name]
    assert from_hf_dict(json.loads(json.dumps(to_hf_dict(c)))) == c
    assert from_params_dict(json.loads(json.dumps(to_params_dict(c)))) == c


def test_hf_config_reads_both_rope_spellings():
    base = to_hf_dict(PRESETS["tiny"])
    old = {k: v for k, v in base.items() if k != "rope_parameters"} | {"rope_theta": 12345.0}
    new = {k: v for k, v in base.items() if k != "rope_theta"} | {"rope_parameters": {"rope_type": "default",
                                                                                      "rope_theta": 54321.0}}
    assert from_hf_dict(old).rope_theta == 12345.0
    assert from_hf_dict(new).rope_theta == 54321.0


def test_hf_config_errors_name_the_field():
    data = to_hf_dict(PRESETS["tiny"])
    del data["hidden_size"]
    with pytest.raises(ConfigError, match="x/config.json: missing field 'hidden_size'"):
        from_hf_dict(data, "x/config.json")
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        from_hf_dict(to_hf_dict(PRESETS["tiny"]) | {"model_type": "llama"})
    with pytest.raises(ConfigError, match="top_k"):
        from_hf_dict(to_hf_dict(PRESETS["tiny"]) | {"num_experts_per_tok": 9})


def test_real_mixtral_params_json_without_rope_theta():
    # The December 2023 params.json of mixtral-8x7b-32kseqlen; without rope_theta mistral-inference uses 1e6.
    params = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
              "norm_eps": 1e-05, "vocab_size": 32000, "moe": {"num_experts_per_tok": 2, "num_experts": 8}}
    c = from_params_dict(params)
    assert c.is_moe and c.n_experts == 8 and c.top_k == 2 and c.rope_theta == 1e6
    mistral_v01 = {k: v for k, v in params.items() if k != "moe"} | {"sliding_window": 4096}
    assert from_params_dict(mistral_v01).rope_theta == 1e4


def test_validation():
    with pytest.raises(ConfigError, match="n_heads"):
        ModelConfig(n_heads=6, n_kv_heads=4)
    with pytest.raises(ConfigError, match="'dim' must be a positive integer"):
        ModelConfig(dim=0)
    with pytest.raises(ConfigError, match="unknown config field"):
        with_overrides(PRESETS["tiny"], n_expert=3)


# ---- the one dtype vocabulary ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,dtype", [("float32", torch.float32), ("fp32", torch.float32),
                                        ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
                                        ("float16", torch.float16), ("fp16", torch.float16),
                                        (torch.bfloat16, torch.bfloat16), (None, None)])
def test_parse_dtype_takes_names_aliases_and_dtypes(name, dtype):
    assert parse_dtype(name) is dtype
    if isinstance(name, str):
        assert name in DTYPE_CHOICES
        assert dtype_name(dtype) == DTYPE_ALIASES.get(name, name)


def test_parse_dtype_rejects_names_outside_what_is_allowed():
    with pytest.raises(InputError, match="unknown dtype 'int8'; choose one of float32, bfloat16, float16"):
        parse_dtype("int8")
    with pytest.raises(InputError, match="unknown dtype 'fp16'; choose one of bfloat16, float32, fp32, bf16"):
        parse_dtype("fp16", allowed=("bfloat16", "float32"))
    with pytest.raises(InputError, match="torch.float16"):
        parse_dtype(torch.float16, allowed=("float32",))


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                        ("fp32", torch.float32), ("float32", torch.float32)])
def test_a_training_run_names_its_dtype_in_the_same_vocabulary(name, dtype):
    config = load_config(None, ["--data.dir", "corpus", "--train.dtype", name])
    assert config.train.dtype == name and config.train.torch_dtype() is dtype
    assert load_config(None, ["--data.dir", "corpus"]).train.torch_dtype() is torch.bfloat16  # the default
    with pytest.raises(ConfigError, match="train.dtype must be one of bf16, fp32"):
        load_config(None, ["--data.dir", "corpus", "--train.dtype", "fp16"])

"""LoRA adapters in PEFT's format over transformers' Mixtral (and Mistral) layout: `save_peft` writes what
`peft.PeftModel.from_pretrained` loads onto the base model that `save_hf` writes; `load_peft` reads such an adapter
(ours, or one trained with PEFT on transformers 5) into the modules of `mixtral.finetune.lora`.

Each of our adapters and its PEFT counterpart, keyed under base_model.model.model.layers.N (scale = lora_alpha / r
on both sides, `use_rslora`'s lora_alpha / sqrt(r) read as alpha = lora_alpha · sqrt(r)):
- attention wq/wk/wv/wo -> self_attn.q_proj/k_proj/v_proj/o_proj (`target_modules`): lora_A = A [r, in], lora_B =
  B [out, r]. Our wq/wk rows are already in the HF layout's rotate-half order (`mixtral.io.layouts`), so B's rows
  are written as they are.
- the experts of a mixture -> transformers 5 keeps them as two 3-D parameters, mlp.experts.gate_up_proj
  [E, 2·hidden, dim] (w1 = gate rows first, then w3 = up) and down_proj [E, dim, hidden]: our w13 and w2 exactly.
  PEFT adapts parameters through `target_parameters` (its ParamWrapper) with one adapter per expert, flattened:
  lora_A [E·r, in] expert-major (row e·r + j), lora_B [out, r·E] expert-minor (column j·E + e). Both parameters
  live on one module, so PEFT nests two wrappers: gate_up_proj's, wrapped first as the module's first parameter,
  is the inner one (mlp.experts.base_layer.lora_A/B), down_proj's the outer (mlp.experts.lora_A/B).
- the FFN of a dense model -> mlp.gate_proj/up_proj/down_proj (`target_modules`): our w13 adapter has one A for w1
  and w3, so gate_proj and up_proj get the same lora_A and the two halves of B.
- a trained router (train_router) -> mlp.gate (`modules_to_save`): its whole weight.

So every adapter of ours has an exact PEFT form. One training setting has none: PEFT refuses dropout with parameter
adapters, so a config with expert adapters says lora_dropout 0 (dropout acts only while training; what the adapters
compute is the same). Reading, what our modules cannot hold is a CheckpointError naming the file and the field or
tensor: DoRA and other variants, per-module ranks or alphas, bias adapters, a subset of the layers, other targets,
a dense model's gate_proj and up_proj with different A.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixtral.config import ModelConfig
from mixtral.errors import CheckpointError, InputError
from mixtral.finetune import lora
from mixtral.io.checkpoint import SafetensorsReader, TensorPlan, write_safetensors
from mixtral.io.files import write_json
from mixtral.model import Transformer

log = logging.getLogger("mixtral")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LAYERS = "base_model.model.model.layers"  # PeftModel -> MixtralForCausalLM -> MixtralModel
ATTENTION = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
MOE_FFN = ("gate_up_proj", "down_proj")  # in the order PEFT nests their wrappers, innermost first
DENSE_FFN = ("gate_proj", "up_proj", "down_proj")
ROUTER = "mlp.gate"
# Fields of a PEFT LoraConfig that change what an adapter computes in ways our modules cannot: each must be unset.
UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out", "use_qalora", "rank_pattern", "alpha_pattern",
               "layers_to_transform", "layer_replication", "exclude_modules", "trainable_token_indices",
               "alora_invocation_tokens", "velora_config", "kasa_config", "arrow_config", "use_bdlora")


@dataclass(frozen=True)
class _Slot:
    """Where a PEFT tensor lives among our adapters: in parameter `param`, the part `index` of it; `stacked` ("a"
    or "b") for an expert stack that PEFT's ParamWrapper keeps flattened into one matrix."""
    param: str
    index: tuple = ()
    stacked: str | None = None


def _layout(config: ModelConfig, attention: tuple[str, ...], ffn: tuple[str, ...],
            router: bool) -> dict[str, _Slot]:
    """PEFT key -> _Slot for adapters on `attention` (our names), the FFN targets `ffn` (PEFT's names, of MOE_FFN
    or DENSE_FFN) and, with `router`, the router's weight."""
    keys: dict[str, _Slot] = {}
    h = config.hidden_dim
    for i in range(config.n_layers):
        theirs, ours = f"{LAYERS}.{i}", f"layers.{i}"
        for name in attention:
            for part in "ab":
                keys[f"{theirs}.self_attn.{ATTENTION[name]}.lora_{part.upper()}.weight"] = \
                    _Slot(f"{ours}.attention.{name}.lora_{part}")
        for target in ffn:
            suffix = "2" if target == "down_proj" else "13"
            if config.is_moe:
                nested = target == "gate_up_proj" and len(ffn) == 2
                module = f"{theirs}.mlp.experts" + (".base_layer" if nested else "")
                for part in "ab":
                    keys[f"{module}.lora_{part.upper()}.weight"] = \
                        _Slot(f"{ours}.moe.lora.{part}{suffix}", stacked=part)
            else:
                rows = {"gate_proj": slice(0, h), "up_proj": slice(h, 2 * h), "down_proj": slice(None)}[target]
                keys[f"{theirs}.mlp.{target}.lora_A.weight"] = _Slot(f"{ours}.moe.lora.a{suffix}", (0,))
                keys[f"{theirs}.mlp.{target}.lora_B.weight"] = _Slot(f"{ours}.moe.lora.b{suffix}", (0, rows))
        if router and config.is_moe:
            keys[f"{theirs}.{ROUTER}.weight"] = _Slot(f"{ours}.moe.router.weight")
    return keys


def _to_peft(tensor: torch.Tensor, slot: _Slot) -> torch.Tensor:
    if slot.stacked == "a":  # [E, r, in] -> [E·r, in]
        return tensor.reshape(-1, tensor.shape[-1])
    if slot.stacked == "b":  # [E, out, r] -> [out, r·E]
        return tensor.permute(1, 2, 0).reshape(tensor.shape[1], -1)
    return tensor


def _from_peft(tensor: torch.Tensor, slot: _Slot, shape: torch.Size) -> torch.Tensor:
    """The inverse of `_to_peft`, for a destination of `shape`."""
    if slot.stacked == "a":
        return tensor.reshape(shape)
    if slot.stacked == "b":
        n_experts, out, rank = shape
        return tensor.reshape(out, rank, n_experts).permute(2, 0, 1)
    return tensor


def _peft_shape(shape: torch.Size, slot: _Slot) -> tuple[int, ...]:
    """The shape PEFT stores a destination of `shape` in."""
    return tuple(_to_peft(torch.empty(shape, device="meta"), slot).shape)


def save_peft(model: Transformer, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters of `model` (after `apply_lora`) as a PEFT LoRA adapter for transformers' layout of the
    model (the one `save_hf` writes) into `directory`: adapter_config.json and adapter_model.safetensors, each
    written atomically. `base_model_name_or_path` goes into the config for tools that fetch the base by it.
    Returns the directory. Raises InputError for a model without adapters, or whose adapters adapt nothing."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise InputError("this model has no LoRA adapters to save")
    base = model.config
    ffn = (MOE_FFN if base.is_moe else DENSE_FFN) if config.experts else ()
    router = config.train_router and base.is_moe
    layout = _layout(base, config.attention, ffn, router)
    if not layout:
        raise InputError("this model's LoRA config adapts nothing (no attention projection, no experts, no router)")
    params = dict(model.named_parameters())
    plans = []
    for key, slot in layout.items():
        tensor = _to_peft(params[slot.param][slot.index].detach(), slot)
        plans.append(TensorPlan(key, tuple(tensor.shape), tensor.dtype, lambda tensor=tensor: tensor))
    dropout = config.dropout
    if base.is_moe and config.experts and dropout:
        log.warning("PEFT allows no dropout with parameter (expert) adapters: %s says lora_dropout 0 instead of "
                    "%g (dropout acts only in training; the adapters compute the same)", CONFIG_FILE, dropout)
        dropout = 0.0
    modules = sorted(ATTENTION[name] for name in config.attention) + ([] if base.is_moe else list(ffn))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / WEIGHTS_FILE, plans, {"format": "pt"})
    write_json(directory / CONFIG_FILE, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank, "lora_alpha": int(config.alpha) if float(config.alpha).is_integer() else config.alpha,
        "lora_dropout": dropout, "target_modules": modules,
        "target_parameters": [f"mlp.experts.{name}" for name in ffn] if base.is_moe and ffn else None,
        "modules_to_save": [ROUTER] if router else None,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "lora_bias": False,
        "init_lora_weights": True, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None, "revision": None})
    return directory


def _matches(target: str, full: str) -> bool:
    """Whether PEFT matches the name `target` against a module or parameter called `full` (a suffix of whole
    components)."""
    return full == target or full.endswith("." + target)


def _names(data: dict[str, Any], field: str, path: Path) -> list[str]:
    value = data.get(field)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"{path}: {field} must be a list of names, got {value!r} (patterns are not read)")
    return value


def _lora_config(data: dict[str, Any], model: ModelConfig, path: Path) -> tuple[lora.LoRAConfig, tuple[str, ...]]:
    """Our LoRAConfig and the FFN targets (PEFT's names) of the PEFT adapter config `data` read from `path`."""
    if data.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type is {data.get('peft_type')!r}; only 'LORA' adapters are read")
    for field in UNSUPPORTED:
        if data.get(field) not in (None, False, {}, []):
            raise CheckpointError(f"{path}: {field} = {data[field]!r} is not supported by mixtral's LoRA")
    if data.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: bias = {data['bias']!r} is not supported by mixtral's LoRA (only 'none')")
    rank, alpha = data.get("r"), data.get("lora_alpha", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"{path}: r must be an integer and lora_alpha a number, got {rank!r} and {alpha!r}")
    if data.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # rsLoRA scales by lora_alpha / sqrt(r); ours by alpha / r
    ffn_names = MOE_FFN if model.is_moe else DENSE_FFN
    candidates = {f"self_attn.{hf}": name for name, hf in ATTENTION.items()}
    if not model.is_moe:
        candidates.update({f"mlp.{name}": name for name in DENSE_FFN})
    targeted = set()
    for target in _names(data, "target_modules", path):
        found = {ours for full, ours in candidates.items() if _matches(target, full)}
        if not found:
            raise CheckpointError(f"{path}: target_modules entry {target!r} is none of this model's adaptable "
                                  f"modules ({', '.join(candidates)})")
        targeted |= found
    for target in _names(data, "target_parameters", path):
        found = {name for name in MOE_FFN if _matches(target, f"mlp.experts.{name}")} if model.is_moe else set()
        if not found:
            raise CheckpointError(f"{path}: target_parameters entry {target!r} is not one of this model's "
                                  f"expert parameters (mlp.experts.gate_up_proj, mlp.experts.down_proj)")
        targeted |= found
    router = False
    for target in _names(data, "modules_to_save", path):
        if not (model.is_moe and _matches(target, ROUTER)):
            raise CheckpointError(f"{path}: modules_to_save entry {target!r} is not the router (mlp.gate)")
        router = True
    attention = tuple(name for name in lora.ATTENTION if name in targeted)
    ffn = tuple(name for name in ffn_names if name in targeted)
    if not (attention or ffn or router):
        raise CheckpointError(f"{path}: the adapter targets nothing")
    try:
        config = lora.LoRAConfig(rank=rank, alpha=float(alpha), dropout=float(data.get("lora_dropout") or 0.0),
                                 attention=attention, experts=bool(ffn), train_router=router)
    except InputError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return config, ffn


def load_peft(model: Transformer, directory: str | os.PathLike) -> Transformer:
    """Add the PEFT LoRA adapter in `directory` (adapter_config.json, adapter_model.safetensors: what `save_peft`
    writes, or PEFT's save_pretrained over transformers 5's Mixtral or Mistral) to `model`, in place; returns it.
    Raises InputError for a model that already has adapters, CheckpointError naming the file and the field or
    tensor for what cannot be read or has no form among our adapters (the model is then left as it was)."""
    if getattr(model, "lora_config", None) is not None:
        raise InputError("this model already has LoRA adapters (merge_lora them first)")
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    try:
        data = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: cannot read PEFT adapter config: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_path}: not a JSON object")
    config, ffn = _lora_config(data, model.config, config_path)
    layout = _layout(model.config, config.attention, ffn, config.train_router)
    try:
        reader = SafetensorsReader(weights_path)
    except OSError as e:
        raise CheckpointError(f"{weights_path}: cannot read PEFT adapter weights: {e}") from None
    try:
        names = set(reader.keys())
        problem = next((f"missing tensor {key!r}" for key in layout if key not in names), None)
        problem = problem or next((f"unexpected tensor {key!r}" for key in sorted(names) if key not in layout), None)
        if problem:
            raise CheckpointError(f"{weights_path}: {problem}")
        tensors = {key: reader.read(key) for key in layout}
    finally:
        reader.close()
    lora.apply_lora(model, config)
    try:
        _fill(model, layout, tensors, weights_path)
    except BaseException:
        lora.remove_adapters(model)
        raise
    return model


def _fill(model: Transformer, layout: dict[str, _Slot], tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy each PEFT tensor into its slot among `model`'s adapters. Parts nothing fills keep B = 0."""
    params = dict(model.named_parameters())
    filled: dict[tuple[str, str], str] = {}  # (param, index) -> the key that filled it
    with torch.no_grad():
        for key, slot in layout.items():
            dest = params[slot.param][slot.index]
            expected = _peft_shape(dest.shape, slot)
            if tuple(tensors[key].shape) != expected:
                raise CheckpointError(f"{path}: tensor {key!r} has shape {list(tensors[key].shape)}, the model's "
                                      f"is {list(expected)}")
            value = _from_peft(tensors[key], slot, dest.shape).to(dest.dtype)
            where = (slot.param, repr(slot.index))
            if where in filled and not torch.equal(dest, value):
                raise CheckpointError(f"{path}: tensor {key!r} differs from {filled[where]!r}; mixtral's adapter of "
                                      f"a dense FFN has one A for gate_proj and up_proj")
            filled[where] = key
            dest.copy_(value)

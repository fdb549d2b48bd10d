"""Where each tensor of a checkpoint goes in the model: the key maps of the Hugging Face and Mistral-native layouts.

- Hugging Face: Mixtral experts as `block_sparse_moe.experts.E.w1/w2/w3` (the released repos) or transformers 5's
  fused in-memory names `mlp.experts.gate_up_proj/down_proj`; Mistral (dense) as `mlp.gate_proj/up_proj/down_proj`.
- Mistral native: experts as `feed_forward.experts.E.w1/...`, or the December 2023 release's stacked
  `block_sparse_moe.w1/w2/w3` of shape [E * hidden, dim] whose w2 blocks are transposed.

The model keeps each MoE's w1 and w3 as the two halves of one `w13` [E, 2 * hidden, dim] and w2 as [E, dim, hidden].
Native wq/wk rotate interleaved pairs of each head; they are permuted into the rotate-half order of the HF layout,
which is the one the model uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mixtral.config import ModelConfig


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: parameter `param`, at `index` within it, after `transform`."""
    param: str
    index: tuple = ()
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    transposed: bool = False  # the file holds the transpose of the destination

    def select(self, param: torch.Tensor) -> torch.Tensor:
        """The part of `param` (a view) that this checkpoint tensor fills."""
        return param[self.index] if self.index else param


def permute_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Native wq/wk (rotary pairs interleaved, 2i and 2i+1) -> HF order (pairs i and i + head_dim/2)."""
    out_dim, dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, dim).transpose(1, 2).reshape(out_dim, dim)


def permute_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_to_rotate_half`: HF order -> native order."""
    out_dim, dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, dim).transpose(1, 2).reshape(out_dim, dim)


def _swiglu(w1: str, w3: str, w2: str, moe: str, expert: int, h: int) -> dict[str, Target]:
    """The keys of one expert's three matrices (a dense FFN is expert 0): w1 and w3, of `h` rows each, are the two
    halves of `moe`.w13[expert], w2 is `moe`.w2[expert]."""
    return {w1: Target(f"{moe}.w13", (expert, slice(0, h))), w3: Target(f"{moe}.w13", (expert, slice(h, 2 * h))),
            w2: Target(f"{moe}.w2", (expert,))}


def _experts(block: str, moe: str, config: ModelConfig) -> dict[str, Target]:
    """The keys of an MoE block stored expert by expert, the same in both layouts but for the block's name:
    `block`.gate.weight (the router) and `block`.experts.E.w1/w3/w2.weight for each expert E."""
    keys = {f"{block}.gate.weight": Target(f"{moe}.router.weight")}
    for e in range(config.n_experts):
        q = f"{block}.experts.{e}"
        keys.update(_swiglu(f"{q}.w1.weight", f"{q}.w3.weight", f"{q}.w2.weight", moe, e, config.hidden_dim))
    return keys


def hf_layout(config: ModelConfig, fused_experts: bool = False) -> dict[str, Target]:
    """Checkpoint key -> Target for the Hugging Face layout (`fused_experts`: transformers 5's in-memory names;
    `save_hf` writes the released repos' per-expert names)."""
    h = config.hidden_dim
    keys = {"model.embed_tokens.weight": Target("tok_embeddings.weight"),
            "model.norm.weight": Target("norm.weight")}
    if not config.tie_embeddings:
        keys["lm_head.weight"] = Target("output.weight")
    for i in range(config.n_layers):
        p, ours = f"model.layers.{i}", f"layers.{i}"
        keys[f"{p}.input_layernorm.weight"] = Target(f"{ours}.attention_norm.weight")
        keys[f"{p}.post_attention_layernorm.weight"] = Target(f"{ours}.ffn_norm.weight")
        for hf_name, name in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
            keys[f"{p}.self_attn.{hf_name}.weight"] = Target(f"{ours}.attention.{name}.weight")
        if not config.is_moe:
            keys.update(_swiglu(f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight", f"{p}.mlp.down_proj.weight",
                                f"{ours}.moe", 0, h))
        elif fused_experts:
            keys[f"{p}.mlp.gate.weight"] = Target(f"{ours}.moe.router.weight")
            keys[f"{p}.mlp.experts.gate_up_proj"] = Target(f"{ours}.moe.w13")
            keys[f"{p}.mlp.experts.down_proj"] = Target(f"{ours}.moe.w2")
        else:
            keys.update(_experts(f"{p}.block_sparse_moe", f"{ours}.moe", config))
    return keys


def native_layout(config: ModelConfig, stacked_experts: bool = False) -> dict[str, Target]:
    """Checkpoint key -> Target for Mistral's native layout (`stacked_experts`: the December 2023 release)."""
    h = config.hidden_dim
    keys = {"tok_embeddings.weight": Target("tok_embeddings.weight"), "norm.weight": Target("norm.weight")}
    if not config.tie_embeddings:
        keys["output.weight"] = Target("output.weight")
    q_perm = lambda w: permute_to_rotate_half(w, config.n_heads)  # noqa: E731
    k_perm = lambda w: permute_to_rotate_half(w, config.n_kv_heads)  # noqa: E731
    for i in range(config.n_layers):
        p = f"layers.{i}"
        keys[f"{p}.attention_norm.weight"] = Target(f"{p}.attention_norm.weight")
        keys[f"{p}.ffn_norm.weight"] = Target(f"{p}.ffn_norm.weight")
        keys[f"{p}.attention.wq.weight"] = Target(f"{p}.attention.wq.weight", transform=q_perm)
        keys[f"{p}.attention.wk.weight"] = Target(f"{p}.attention.wk.weight", transform=k_perm)
        keys[f"{p}.attention.wv.weight"] = Target(f"{p}.attention.wv.weight")
        keys[f"{p}.attention.wo.weight"] = Target(f"{p}.attention.wo.weight")
        if not config.is_moe:
            q = f"{p}.feed_forward"
            keys.update(_swiglu(f"{q}.w1.weight", f"{q}.w3.weight", f"{q}.w2.weight", f"{p}.moe", 0, h))
        elif stacked_experts:
            e, d = config.n_experts, config.dim
            keys[f"{p}.block_sparse_moe.gate.weight"] = Target(f"{p}.moe.router.weight")
            keys[f"{p}.block_sparse_moe.w1"] = Target(f"{p}.moe.w13", (slice(None), slice(0, h)),
                                                      transform=lambda w: w.view(e, h, d))
            keys[f"{p}.block_sparse_moe.w3"] = Target(f"{p}.moe.w13", (slice(None), slice(h, 2 * h)),
                                                      transform=lambda w: w.view(e, h, d))
            # Each expert's w2 block is stored as [hidden, dim], the transpose of the [dim, hidden] we keep.
            keys[f"{p}.block_sparse_moe.w2"] = Target(f"{p}.moe.w2", transposed=True,
                                                      transform=lambda w: w.view(e, h, d).transpose(1, 2))
        else:
            keys.update(_experts(f"{p}.feed_forward", f"{p}.moe", config))
    return keys


def choose_layout(config: ModelConfig, native: bool, keys: set[str]) -> dict[str, Target]:
    """The layout of a checkpoint (`native`: Mistral's) whose files hold `keys`, telling its variants apart."""
    if native:
        return native_layout(config, stacked_experts="layers.0.block_sparse_moe.w1" in keys)
    return hf_layout(config, fused_experts="model.layers.0.mlp.experts.gate_up_proj" in keys)

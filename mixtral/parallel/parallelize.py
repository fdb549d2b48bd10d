"""Wrap a plain model for expert- and data-parallel training, and the steps of a training loop that change with it.

`parallelize(model, mesh)` takes the model every rank built the same way (same seed or checkpoint) and:
- keeps of each MoE layer's expert stacks only this rank's experts [lo, hi), and sets the layer's `dispatch` to the
  all-to-all one (`AllToAllExperts`) and its `keep` to capacity counted over the world's batch (`global_capacity`);
- shards everything else (attention, norms, embeddings, output, router) over all ranks with FSDP2
  (`fully_shard`, one group per block and one for the rest), which all-gathers a block's weights for its forward
  and backward and reduce-scatters (averages) their gradients over the world;
- with dp > 1, shards each layer's local experts over the `dp` ranks that hold copies of them (FSDP2 on the
  `dp` mesh, each expert's rows split: Shard(1)), so a rank keeps 1 / (ep x dp) of the experts' weights, gradients
  and optimizer state between uses, as it does of the rest.
An expert's gradient on the owning rank is the sum over the `ep` ranks whose tokens it served (the all-to-all's
backward brings them); summed over the `dp` copies (FSDP's reduce-scatter) and divided by the world size, it is
the gradient of the world's mean loss, as FSDP's average over the world makes the rest's. With
`shard_experts=False` the experts are FSDP's `ignored_params` instead, a whole copy on every dp row, and
`reduce_expert_grads` all-reduces their gradients.

Nothing in `mixtral.model` or `mixtral.moe` knows about any of this: the MoE layer has a `dispatch` and a `keep`
hook, and FSDP hooks the modules' forward (and `Transformer.trunk`, which training calls instead of forward).
"""
from __future__ import annotations

import re
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Shard

from mixtral.model import Transformer
from mixtral.parallel.experts import AllToAllExperts, expert_range, global_capacity
from mixtral.parallel.mesh import DistributedError, Mesh

EXPERT_PARAM = re.compile(r"layers\.\d+\.moe\.(w13|w2)$")


def expert_parameters(model: Transformer) -> dict[str, nn.Parameter]:
    """The routed experts' stacks by name (none for a dense model, whose one FFN is sharded like attention)."""
    if not model.config.is_moe:
        return {}
    return {name: p for name, p in model.named_parameters() if EXPERT_PARAM.fullmatch(name)}


def parallelize(model: Transformer, mesh: Mesh, shard_experts: bool = True) -> Transformer:
    """Shard `model` over `mesh` in place for training (see the module doc); returns it.

    Raises DistributedError when ep does not divide the model's experts, ep > 1 for a dense model, or dp does
    not divide the experts' rows when they are sharded.
    """
    config = model.config
    if mesh.ep > 1 and not config.is_moe:
        raise DistributedError(f"parallel.ep is {mesh.ep} but the model is dense (n_experts = 1): there are no "
                               f"experts to spread; use parallel.dp alone")
    if config.is_moe:
        try:
            lo, hi = expert_range(config.n_experts, mesh.ep, mesh.ep_rank)
        except ValueError as e:
            raise DistributedError(str(e)) from None
        keep = global_capacity(mesh.world.get_group(), mesh.size, mesh.rank)
        for layer in model.layers:
            moe = layer.moe
            moe.keep = keep
            if mesh.ep > 1:
                moe.w13 = nn.Parameter(moe.w13.detach()[lo:hi].clone(), requires_grad=moe.w13.requires_grad)
                moe.w2 = nn.Parameter(moe.w2.detach()[lo:hi].clone(), requires_grad=moe.w2.requires_grad)
                moe.dispatch = AllToAllExperts(config.n_experts, mesh.ep, mesh.ep_rank, mesh.ep_group)
    experts = expert_parameters(model)
    ignored = set(experts.values())
    if experts and shard_experts and mesh.dp > 1:
        for name, p in experts.items():
            if p.shape[1] % mesh.dp:
                raise DistributedError(f"parallel.dp ({mesh.dp}) must divide the rows of {name} ({p.shape[1]}) "
                                       f"to shard the experts; or set parallel.shard_experts = false")
        for layer in model.layers:
            # The router first, on the world mesh like the rest; then the layer's experts on the dp mesh.
            fully_shard(layer.moe.router, mesh=mesh.world)
            fully_shard(layer.moe, mesh=mesh.grid["dp"], shard_placement_fn=lambda p: Shard(1))
        ignored = set()
        # FSDP warns that the MoE layer returns a view (its output reshaped to the input's shape), which an
        # in-place add would cut off its backward hook; the block adds it out of place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .*MoE.* returned a view tensor")
    for layer in model.layers:
        fully_shard(layer, mesh=mesh.world, ignored_params=ignored)
    fully_shard(model, mesh=mesh.world, ignored_params=ignored)
    # Training runs `trunk` (then the norm and the chunked cross-entropy on the output weight), not `forward`.
    register_fsdp_forward_method(model, "trunk")
    return model


def reduce_expert_grads(model: Transformer, mesh: Mesh) -> None:
    """Make each expert's gradient that of the world's mean loss: the sum over the dp copies, / world size.
    Every rank takes part whatever its routing (an expert that got no tokens has a zero gradient, not None).
    Call it once per optimizer step, after the last backward."""
    for p in expert_parameters(model).values():
        if not p.requires_grad:
            continue
        if isinstance(p, DTensor):  # sharded over dp: FSDP's reduce-scatter has averaged it over the dp copies
            p.grad.div_(mesh.ep)  # (gloo has no pre-scaled sum, which FSDP's own divide factor would use)
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if mesh.dp > 1:
            dist.all_reduce(p.grad, group=mesh.dp_group)
        p.grad.div_(mesh.size)


def clip_grad_norm_(model: Transformer, max_norm: float, mesh: Mesh) -> float:
    """The global gradient norm over every parameter of the world (each element counted once), and, when
    max_norm > 0, the gradients scaled as torch.nn.utils.clip_grad_norm_ scales them. Returns the norm."""
    experts = set(expert_parameters(model).values())
    device = next(model.parameters()).device
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for p in model.parameters():
        if p.grad is None:
            continue
        local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        square = local.detach().double().square().sum()
        # A shard lives on one rank; an unsharded expert's gradient is the same on each of its dp copies.
        squares += square / mesh.dp if p in experts and not isinstance(p, DTensor) else square
    dist.all_reduce(squares, group=mesh.world.get_group())
    norm = float(squares.sqrt())
    if max_norm > 0:
        scale = min(1.0, max_norm / (norm + 1e-6))
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def local_rows(batch: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """This rank's rows of a global batch [rows, ...]: the rank-th of `mesh.size` equal parts, so the ranks'
    parts in rank order are the batch a single process would take."""
    per = len(batch) // mesh.size
    return batch[mesh.rank * per:(mesh.rank + 1) * per]

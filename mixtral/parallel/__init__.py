"""Scale-out on torch.distributed: experts spread over processes (expert parallelism), everything else sharded
with FSDP2 (data parallelism), for training and for inference. Launched by torchrun; gloo on CPUs, NCCL on GPUs.

    mesh.py         the process group, the (dp, ep) device mesh, timeouts and their errors
    experts.py      the experts' all-to-all dispatch (training) and rank 0's remote experts (inference)
    parallelize.py  `parallelize(model, mesh)` and the training steps that change with it
    checkpoint.py   torch.distributed.checkpoint save/load at any layout, Hugging Face export
    inference.py    loading each rank's experts and running generate/serve with them

The model (`mixtral.model`, `mixtral.moe`) stays plain: an MoE layer has `dispatch`, `keep` and `offload` hooks,
which this package sets. docs/distributed.md has the commands, the design and the measured traffic.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from mixtral.parallel.mesh import (DistributedError, Mesh, collective_failed, failures_named, init,
                                   is_collective_failure, launched, shutdown)
from mixtral.parallel.parallelize import clip_grad_norm_, local_rows, parallelize, reduce_expert_grads


class _Sum(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) too: every process computes the same loss from the
    sum, so the gradient of the sum of their losses with respect to one process's part is the sum of theirs."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_over(mesh: Mesh):
    """The differentiable sum over every process (`mixtral.train.losses.Reduce`)."""
    group = mesh.world.get_group()
    return lambda t: _Sum.apply(t, group)


def mean_over(values: dict[str, torch.Tensor], mesh: Mesh) -> dict[str, torch.Tensor]:
    """Scalars averaged over every process, in one all-reduce."""
    stacked = torch.stack([v.float().reshape(()) for v in values.values()])
    dist.all_reduce(stacked, group=mesh.world.get_group())
    return dict(zip(values, stacked / mesh.size))


__all__ = ["DistributedError", "Mesh", "clip_grad_norm_", "collective_failed", "failures_named", "init",
           "is_collective_failure",
           "launched", "local_rows", "mean_over", "parallelize", "reduce_expert_grads", "shutdown", "sum_over"]

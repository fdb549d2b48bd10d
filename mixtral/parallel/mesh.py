"""The process group and the device mesh of a distributed run.

The world is a (dp, ep) grid: rank = dp_rank * ep + ep_rank. The `ep` ranks of one row hold one copy of the
experts between them, each `n_experts / ep` of every layer; the `dp` rows are copies of that. Every rank reads its
own part of each batch, so the non-expert parameters (attention, norms, embeddings, router) see the whole world's
data and are sharded over all ranks (`world` mesh), while each expert's gradient is summed over the `dp` copies.

torchrun (or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT) starts the processes; gloo
runs the collectives on CPUs, NCCL on GPUs. `timeout` bounds both the wait for every peer to join and each
collective, so a peer that never comes or dies mid-run ends the run with DistributedError instead of a hang.
"""
from __future__ import annotations

import datetime
import logging
import os
from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mixtral.errors import MixtralError

log = logging.getLogger("mixtral")


class DistributedError(MixtralError):
    """A peer that never joined, died, or timed out; or a distributed layout that cannot work."""


class Mesh(NamedTuple):
    """Where this process sits in a distributed run."""
    grid: DeviceMesh  # 2-D, dims ("dp", "ep")
    world: DeviceMesh  # 1-D over every rank: what FSDP shards the non-expert parameters over
    rank: int
    ep: int
    dp: int

    @property
    def size(self) -> int:
        return self.ep * self.dp

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.grid.get_group("ep")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.grid.get_group("dp")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one rank of several (or of one)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(ep: int = 1, dp: int | None = None, *, timeout: float = 300.0, device: str = "cpu") -> Mesh:
    """Join the run the launcher's environment describes and build its (dp, ep) mesh.

    dp None: WORLD_SIZE / ep. timeout: seconds to wait for every peer at start-up and for any one collective
    afterwards. device "cpu" uses gloo, "cuda" NCCL (each rank on cuda:LOCAL_RANK). Raises DistributedError
    when ep * dp is not the world size, or when the peers do not all join within `timeout`.
    """
    if not launched():
        raise DistributedError("not started by torchrun (RANK and WORLD_SIZE are unset): launch with "
                               "`torchrun --nproc-per-node N -m mixtral ...`")
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    dp = world_size // ep if dp is None else dp
    if ep < 1 or dp < 1 or ep * dp != world_size:
        raise DistributedError(f"parallel.ep ({ep}) x parallel.dp ({dp}) must equal the number of processes "
                               f"({world_size}, WORLD_SIZE)")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        except Exception as e:  # the store's own errors: DistStoreError, DistNetworkError, RuntimeError
            raise DistributedError(f"rank {rank}: not every one of the {world_size} processes joined within "
                                   f"{timeout:g} s (parallel.timeout) at {os.environ.get('MASTER_ADDR')}:"
                                   f"{os.environ.get('MASTER_PORT')}: {_first_line(e)}") from None
    kind = "cuda" if backend == "nccl" else "cpu"
    grid = init_device_mesh(kind, (dp, ep), mesh_dim_names=("dp", "ep"))
    world = init_device_mesh(kind, (world_size,), mesh_dim_names=("world",))
    return Mesh(grid, world, rank, ep, dp)


def shutdown() -> None:
    """Leave the process group (a no-op when none was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# What gloo and NCCL say when a peer is gone or late; a RuntimeError with another message is a bug, not a peer.
_PEER_TROUBLE = ("connection closed", "connection reset", "connection refused", "timed out", "timeout", "broken pipe",
                 "gloo", "nccl", "peer")


def is_collective_failure(e: BaseException) -> bool:
    """Whether `e` comes from a collective whose peer died, hung up or timed out."""
    return isinstance(e, dist.DistError) or any(s in str(e).lower() for s in _PEER_TROUBLE)


@contextmanager
def failures_named(rank: int, timeout: float) -> Iterator[None]:
    """Inside the block, a collective that fails because a peer died, hung up or let `timeout` pass becomes a
    DistributedError naming `rank` (`collective_failed`); other errors pass as they are. The process group is left
    after the block either way."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        if not is_collective_failure(e):
            raise
        raise collective_failed(e, rank, timeout) from None
    finally:
        shutdown()


def collective_failed(e: BaseException, rank: int, timeout: float) -> DistributedError:
    """The error a run reports when a collective raised: a peer died, hung up, or let `timeout` pass."""
    return DistributedError(f"rank {rank}: a collective failed ({_first_line(e)}); a peer has probably died or "
                            f"stalled (each collective waits at most {timeout:g} s, parallel.timeout)")

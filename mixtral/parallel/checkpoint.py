"""Checkpoints of a distributed run with torch.distributed.checkpoint (DCP): every rank writes its own shards.

    OUT/checkpoints/step_000200/dcp/        the weights and AdamW's state, as DCP files (.metadata + one per rank)
    OUT/checkpoints/step_000200/trainer_state.pt   the step and rank 0's RNG states (weights_only loadable)
    OUT/checkpoints/step_000200/train_config.json
    OUT/checkpoints/step_000200/model_config.json  the model's config as config.json has it (Hugging Face)

Each tensor is saved with its place in the whole: FSDP's shards as the DTensors they are, and each rank's experts
[lo, hi) as a DTensor split over the mesh's `ep` dimension on dim 0, and over `dp` on dim 1 when FSDP shards them
there (else replicated over `dp`). DCP therefore reads a
checkpoint into any other layout: saved at EP=2, it resumes at EP=1, at EP=4, or in one process without torchrun
(`load_state`, which then reads whole tensors). `load_model` reads one into a plain model, which `mixtral convert`
writes in the Hugging Face layout, as the single-process trainer's checkpoints are.

Atomic as the single-process checkpoints are: the ranks write into a temporary directory, and rank 0 renames it
into place once every rank has finished (a barrier), so a checkpoint directory that exists is complete.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, Replicate, Shard

from mixtral.config import ModelConfig, from_hf_dict, read_json, to_hf_dict
from mixtral.errors import CheckpointError
from mixtral.io.files import fsync_tree
from mixtral.model import Transformer, empty_model
from mixtral.parallel.mesh import Mesh
from mixtral.parallel.parallelize import EXPERT_PARAM

DCP_DIR = "dcp"
MODEL_CONFIG = "model_config.json"


def is_distributed_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / DCP_DIR / ".metadata").is_file()


def _expert_placement(value: torch.Tensor, mesh: Mesh) -> DTensor:
    """This rank's experts as a part of the whole stack: split over ep on dim 0, and over dp on dim 1 when FSDP
    shards them (a DTensor on the dp mesh), else the same on every dp row."""
    if isinstance(value, DTensor):
        return DTensor.from_local(value.to_local(), mesh.grid, [Shard(1), Shard(0)], run_check=False)
    return DTensor.from_local(value, mesh.grid, [Replicate(), Shard(0)], run_check=False)


def _state(model: Transformer, optimizer: torch.optim.Optimizer | None, mesh: Mesh | None) -> tuple[dict, dict]:
    """(what DCP saves and loads, what set_*_state_dict takes): the first holds each rank's experts as a part of
    the whole (`_expert_placement`), sharing memory with the second, which shares it with the model and the
    optimizer's state where it can (DCP loads in place)."""
    plain = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        # Only the per-parameter state (by name): the param groups come from the run's config, and their number
        # depends on the layout (`make_optimizer` splits them by mesh).
        plain["optimizer"] = {"state": get_optimizer_state_dict(model, optimizer)["state"]}  # allocates if new
    if mesh is None or mesh.ep == 1:
        return plain, plain
    wrapped = {"model": {name: _expert_placement(v, mesh) if EXPERT_PARAM.fullmatch(name) else v
                         for name, v in plain["model"].items()}}
    if optimizer is not None:
        wrapped["optimizer"] = {"state": {
            name: ({key: _expert_placement(v, mesh) if key in ("exp_avg", "exp_avg_sq") else v
                    for key, v in entry.items()} if EXPERT_PARAM.fullmatch(name) else entry)
            for name, entry in plain["optimizer"]["state"].items()}}
    return wrapped, plain


def save_state(directory: Path, model: Transformer, optimizer: torch.optim.Optimizer, mesh: Mesh) -> None:
    """Every rank: write the model's and optimizer's shards to `directory`/dcp (collective)."""
    dcp.save(_state(model, optimizer, mesh)[0], checkpoint_id=str(directory / DCP_DIR))


def load_state(directory: Path, model: Transformer, optimizer: torch.optim.Optimizer | None,
               mesh: Mesh | None) -> None:
    """Read `directory`/dcp into this rank's part of `model` and `optimizer` (collective when `mesh` is set; a
    plain single-process model and optimizer when it is None). Raises CheckpointError for an unreadable one."""
    wrapped, plain = _state(model, optimizer, mesh)
    try:
        with warnings.catch_warnings():  # DCP warns that one process without a process group is one process
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(wrapped, checkpoint_id=str(directory / DCP_DIR), no_dist=mesh is None)
    except Exception as e:  # a missing, foreign or truncated checkpoint; DCP wraps the cause
        raise CheckpointError(f"{directory / DCP_DIR}: cannot load the distributed checkpoint "
                              f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
    set_model_state_dict(model, plain["model"])
    if optimizer is not None:
        current = get_optimizer_state_dict(model, optimizer)
        set_optimizer_state_dict(model, optimizer, {"state": plain["optimizer"]["state"],
                                                    "param_groups": current["param_groups"]})


def begin(final: Path, mesh: Mesh) -> Path:
    """The temporary directory the ranks write checkpoint `final` into (made by rank 0; collective)."""
    tmp = final.parent / f".{final.name}.dcp.tmp"
    if mesh.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    return tmp


def commit(tmp: Path, final: Path, mesh: Mesh) -> None:
    """Once every rank has written into `tmp`: rank 0 syncs it and renames it to `final` (replacing one of the
    same step from an interrupted attempt); every rank returns once it is in place (collective)."""
    dist.barrier()
    if mesh.is_main:
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()


def write_model_config(directory: Path, config: ModelConfig) -> None:
    """The model's config beside the shards (rank 0), so `load_model` needs nothing else."""
    (directory / MODEL_CONFIG).write_text(json.dumps(to_hf_dict(config, "float32"), indent=2) + "\n")


def load_model(checkpoint: str | os.PathLike, dtype: torch.dtype | None = None) -> Transformer:
    """The whole model of the distributed checkpoint directory `checkpoint`, in one process (no torchrun), in eval
    mode, float32 unless `dtype` says otherwise. Raises CheckpointError for a directory that is not one."""
    directory = Path(checkpoint)
    if not is_distributed_checkpoint(directory):
        raise CheckpointError(f"{directory}: not a distributed training checkpoint (no {DCP_DIR}/.metadata)")
    config = from_hf_dict(read_json(directory / MODEL_CONFIG), str(directory / MODEL_CONFIG))
    model = empty_model(config, torch.float32)
    load_state(directory, model, None, None)
    return model.to(dtype or torch.float32).eval()

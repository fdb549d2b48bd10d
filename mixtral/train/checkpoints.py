"""Training checkpoints: OUT/checkpoints/step_NNNNNN, written atomically and resumed exactly.

A checkpoint holds the float32 weights in the Hugging Face layout (what `mixtral.load` and transformers read),
`trainer_state.pt` (AdamW's state, the step, and the torch, numpy and Python RNG states, all loadable with
`weights_only=True`) and the run's `train_config.json`. It is written into a temporary directory renamed into
place, so a checkpoint directory that exists is complete. A distributed run (torchrun) writes its weights and
AdamW's state as torch.distributed.checkpoint shards instead (`mixtral.parallel.checkpoint`), which resume at any
layout, also in one process; `mixtral convert` writes them in the Hugging Face layout.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mixtral.errors import CheckpointError, ConfigError
from mixtral.io.checkpoint import load_checkpoint, save_hf
from mixtral.io.files import atomic_directory
from mixtral.model import Transformer
from mixtral.train.config import TrainConfig, dumps

if TYPE_CHECKING:
    from mixtral.parallel import Mesh

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"
CHECKPOINT_NAME = re.compile(r"step_(\d+)")

# Keys a resumed run may change: how long it runs, how often it logs, evaluates and saves, how many threads and
# processes it uses (a machine that got busier, more machines; sums may then round differently). Everything else
# must match the checkpoint's config, or the run it continues would not be the run it claims to be.
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.threads", "eval.every", "eval.max_windows",
                     "eval.batch_size", "checkpoint.every", "checkpoint.keep", "out_dir",
                     # A distributed checkpoint resumes at any layout (mixtral.parallel.checkpoint).
                     "parallel.ep", "parallel.dp", "parallel.timeout", "parallel.shard_experts"}


def rng_state() -> dict[str, Any]:
    """torch, numpy and Python RNG states as tensors and plain lists (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, directory) of the complete checkpoints under OUT/checkpoints, oldest first."""
    root = Path(out_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = CHECKPOINT_NAME.fullmatch(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1][1] if found else None


def save_checkpoint(out_dir: str | os.PathLike, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                    config: TrainConfig, tokenizer_file: Path | None = None, mesh: "Mesh | None" = None) -> Path:
    """Write OUT/checkpoints/step_NNNNNN atomically (a temporary directory renamed into place; one of the same
    step from an earlier, interrupted attempt is replaced); delete the checkpoints beyond the newest
    `checkpoint.keep`. Returns the directory. With a `mesh` (a distributed run; every rank calls it) the weights
    and optimizer state are written with torch.distributed.checkpoint (`mixtral.parallel.checkpoint`)."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    if mesh is None:
        with atomic_directory(final) as tmp:
            save_hf(model, tmp, dtype=torch.float32)
            torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / STATE_FILE)
            _save_extras(tmp, config, tokenizer_file)
    else:
        from mixtral.parallel import checkpoint as dcp_checkpoint

        tmp = dcp_checkpoint.begin(final, mesh)
        dcp_checkpoint.save_state(tmp, model, optimizer, mesh)
        if mesh.is_main:
            torch.save({"step": step, "rng": rng_state()}, tmp / STATE_FILE)
            dcp_checkpoint.write_model_config(tmp, model.config)
            _save_extras(tmp, config, tokenizer_file)
        dcp_checkpoint.commit(tmp, final, mesh)
    if mesh is None or mesh.is_main:
        for _, old in checkpoints(out_dir)[:-config.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _save_extras(directory: Path, config: TrainConfig, tokenizer_file: Path | None) -> None:
    (directory / CONFIG_FILE).write_text(dumps(config))
    if tokenizer_file is not None and tokenizer_file.is_file():
        # `mixtral generate --model CHECKPOINT` then finds the corpus's own tokenizer.
        name = "tokenizer.json" if tokenizer_file.suffix == ".json" else "tokenizer.model"
        shutil.copyfile(tokenizer_file, directory / name)


def load_checkpoint_state(path: Path, model: Transformer, optimizer: torch.optim.Optimizer,
                          mesh: "Mesh | None" = None) -> int:
    """Restore weights, optimizer and RNG from checkpoint `path` into `model` and `optimizer`; returns its step.

    A distributed run's checkpoint (torch.distributed.checkpoint) loads at any layout: into this rank's part of a
    parallelized model when `mesh` is set (every rank calls it), or whole into a single process's model.
    A single process's checkpoint loads into a single process only."""
    from mixtral.parallel import checkpoint as dcp_checkpoint

    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file
        raise CheckpointError(f"{path / STATE_FILE}: cannot load trainer state ({e})") from None
    if dcp_checkpoint.is_distributed_checkpoint(path):
        dcp_checkpoint.load_state(path, model, optimizer, mesh)
    elif mesh is not None:
        raise CheckpointError(f"{path} was written by a single process (Hugging Face layout); a distributed run "
                              f"resumes only from its own kind: resume this run without torchrun")
    else:
        model.load_state_dict(load_checkpoint(path, dtype=torch.float32, progress=False).state_dict())
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return int(state["step"])


def check_resumable(saved: TrainConfig, config: TrainConfig, path: Path) -> list[str]:
    """The keys that differ between the checkpoint's config and this run's; ConfigError if any may not."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k != "weights":
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(saved.to_dict()), flat(config.to_dict())
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    forbidden = [k for k in changed if k not in RESUMABLE_CHANGES]
    if forbidden:
        detail = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in forbidden)
        raise ConfigError(f"cannot resume from {path}: the config differs in {detail} (only "
                          f"{', '.join(sorted(RESUMABLE_CHANGES))} may change); use another out_dir for a new run")
    return changed

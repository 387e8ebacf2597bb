"""Training checkpoints: everything needed to continue a killed run exactly where it stopped.

A checkpoint is a directory checkpoints/step-000050/ holding
  trainable.safetensors  the trainable parameters by name (adapter weights, or every weight for full FT)
  optimizer.pt           AdamW state (moments, step counts)
  rng.pt                 torch / python / numpy (/ CUDA) RNG states
  state.json             step, data position (epoch, batch), best validation loss, elapsed time, config
In several processes only rank 0 writes; under FSDP every process takes part in gathering the weights and
the optimizer state first (tailor.train.distributed), so the files are the same as a single process's
except optimizer.pt, which FSDP keys by parameter name (resume with the same strategy).
It is written with tailor.files.atomic_output: into a temporary sibling directory (.step-000050.tmp-*),
flushed to disk and renamed into place, so a SIGKILL at any moment leaves either the previous checkpoint or
the new one, never half of one (remove_stale_temporaries clears the leftover temporary on resume).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tailor.files import atomic_output
from tailor.train.distributed import (
    copy_into_parameter,
    is_main_process,
    load_optimizer_state,
    optimizer_state,
    whole_tensor,
)

CHECKPOINT_PREFIX = "step-"


@dataclass
class TrainState:
    """Where a run is: optimizer steps taken, the next batch to read, and running statistics."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    elapsed: float = 0.0
    best_val_loss: float | None = None
    best_step: int | None = None


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, whole (gathered under FSDP: every process calls), detached and
    contiguous (safetensors needs contiguous)."""
    return {n: whole_tensor(p.detach()).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    version, mt_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt_state), gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(checkpoints_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainState, config: dict[str, Any], keep: int = 2,
                    module: nn.Module | None = None) -> Path:
    """Write checkpoints/step-<step>/ atomically, then drop all but the `keep` newest checkpoints.
    `module` is the training module as wrapped (DDP, FSDP): under FSDP every process must call."""
    final = checkpoints_dir / f"{CHECKPOINT_PREFIX}{state.step:06d}"
    weights, optimizer_saved = trainable_state(model), optimizer_state(module, optimizer)
    if not is_main_process():
        return final
    # Files are fsynced before the rename; re-saving a step (resumed and killed again) replaces it whole.
    with atomic_output(final, directory=True) as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer_saved, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"state": asdict(state), "config": config}, indent=1))
    for old in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of an interrupted save are ignored)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [p for p in checkpoints_dir.iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    module: nn.Module | None = None) -> TrainState:
    """Restore trainable weights, optimizer and RNG state in place; return the saved TrainState.
    Every process reads the checkpoint (`module`: the wrapped training module, as for save_checkpoint)."""
    saved, optimizer_state, rng, state = _read_checkpoint(path)
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise ValueError(
            f"{path}: checkpoint does not match the model being trained (missing {missing[:5]}, "
            f"unexpected {extra[:5]}); resume with the same model, method and LoRA settings."
        )
    for name, tensor in saved.items():
        copy_into_parameter(params[name], tensor)
    load_optimizer_state(module, optimizer, optimizer_state)
    set_rng_state(rng)
    return TrainState(**state)


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict, dict[str, Any]]:
    """A checkpoint's four files, or a ValueError naming the checkpoint and how to go on without it."""
    try:
        saved = load_file(str(path / "trainable.safetensors"))
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
        rng = torch.load(path / "rng.pt", weights_only=True)
        state = json.loads((path / "state.json").read_text())["state"]
        TrainState(**state)
    except Exception as exc:  # safetensors, pickle, JSON and OS errors all mean: this checkpoint is unusable
        older = [p.name for p in list_checkpoints(path.parent) if p != path]
        fallback = (f"delete {path} to resume from {older[-1]}, or " if older else "")
        raise ValueError(
            f"{path}: the checkpoint cannot be read ({type(exc).__name__}: {exc}); it is corrupt or "
            f"incomplete. To go on, {fallback}start a new run with another --out. The checkpoint is left "
            "as it is."
        ) from None
    return saved, optimizer_state, rng, state

"""Resumable training checkpoints: one folder, replaced atomically.

A checkpoint holds each module's weights as ``NAME.safetensors``, each optimizer or scheduler
state as ``NAME.pt`` (read back with ``weights_only=True``), the torch RNG state (so dropout and
sampling continue as in an uninterrupted run) and ``state.json``. It is written to
``FOLDER.tmp`` and swapped in; a kill between the two renames leaves ``FOLDER.old``, which
``read_state`` puts back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_checkpoint(folder: Path, *, modules: dict, objects: dict, state: dict) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        save_file({k: v.contiguous() for k, v in module.state_dict().items()},
                  tmp / f"{name}.safetensors")
    for name, obj in objects.items():
        torch.save(obj.state_dict(), tmp / f"{name}.pt")
    torch.save(torch.get_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)


def read_state(folder: Path) -> dict | None:
    """The checkpoint's ``state.json``, or None if there is no checkpoint."""
    old = folder.with_name(folder.name + ".old")
    if not folder.exists() and (old / "state.json").is_file():  # killed while replacing it
        old.rename(folder)
    path = folder / "state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_checkpoint(folder: Path, *, modules: dict, objects: dict) -> None:
    """Load weights, optimizer/scheduler states and the RNG state saved by ``save_checkpoint``."""
    for name, module in modules.items():
        module.load_state_dict(load_file(folder / f"{name}.safetensors"))
    for name, obj in objects.items():
        obj.load_state_dict(torch.load(folder / f"{name}.pt", weights_only=True))
    torch.set_rng_state(torch.load(folder / "rng.pt", weights_only=True))

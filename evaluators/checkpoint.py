"""Resumable training checkpoints: one folder, replaced atomically.

A checkpoint holds each module's weights as ``NAME.safetensors``, each optimizer or scheduler
state as ``NAME.pt`` (read back with ``weights_only=True``), the torch RNG state (so dropout and
sampling continue as in an uninterrupted run) and ``state.json``. It is written to
``FOLDER.tmp`` and swapped in; a kill between the two renames leaves ``FOLDER.old``, which
``read_state`` puts back; a kill while the replaced ``FOLDER.old`` is being removed leaves part
of it beside the new ``FOLDER``, which the next save or read removes.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


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
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        _drop_stale(folder)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)


def _drop_stale(folder: Path) -> None:
    """A ``FOLDER.old`` beside a ``FOLDER`` is what a kill left of the replaced checkpoint while
    it was being removed (the new one was already in place): removed."""
    old = folder.with_name(folder.name + ".old")
    if folder.exists() and old.exists():
        shutil.rmtree(old, ignore_errors=True)


def read_state(folder: Path) -> dict | None:
    """The checkpoint's ``state.json``, or None if there is no checkpoint (or none that reads:
    it is removed with a warning, and the training starts over)."""
    old = folder.with_name(folder.name + ".old")
    if not folder.exists() and (old / "state.json").is_file():  # killed while replacing it
        old.rename(folder)
    _drop_stale(folder)
    path = folder / "state.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        discard(folder, e)
        return None


def discard(folder: Path, error: Exception) -> None:
    """A cache or checkpoint that does not load: one warning, removed, rebuilt by the caller."""
    log.warning("%s does not load (%s: %s): removed, it is rebuilt", folder, type(error).__name__,
                str(error).splitlines()[0][:120] if str(error) else "")
    if folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
    elif folder.exists():
        folder.unlink()


def resume(folder: Path, *, modules: dict, objects: dict) -> dict | None:
    """The state of the checkpoint in ``folder``, its weights, optimizer and RNG states loaded
    into ``modules`` and ``objects``; None if there is none, or if it does not load (then it is
    removed with a warning and the training starts over)."""
    state = read_state(folder)
    if state is None:
        return None
    try:
        load_checkpoint(folder, modules=modules, objects=objects)
    except Exception as e:  # truncated or foreign files: start over rather than stop here
        discard(folder, e)
        return None
    return state


def load_checkpoint(folder: Path, *, modules: dict, objects: dict) -> None:
    """Load weights, optimizer/scheduler states and the RNG state saved by ``save_checkpoint``.
    Every file is read before anything is loaded, so a truncated file changes nothing."""
    weights = {name: load_file(folder / f"{name}.safetensors") for name in modules}
    states = {name: torch.load(folder / f"{name}.pt", weights_only=True) for name in objects}
    rng = torch.load(folder / "rng.pt", weights_only=True)
    for name, module in modules.items():
        module.load_state_dict(weights[name])
    for name, obj in objects.items():
        obj.load_state_dict(states[name])
    torch.set_rng_state(rng)

"""How the benchmarks name a student's results: light enough (no Optuna, no pydantic) for
benchmarks/on_device.py to import on a GPU machine that has PyTorch and little else."""

from __future__ import annotations

from tacnas.searchspace.arch import ArchConfig


def ident_of(st: dict) -> tuple[ArchConfig, str]:
    """A student's arch and its name with the teacher layers it starts from (hand ones)."""
    a = ArchConfig.from_dict(st["arch"])
    return a, a.name + ("" if st["layers"] is None else "-T" + "".join(map(str, st["layers"])))

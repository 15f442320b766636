"""A latency model of one device: the table of profiled blocks, its fits, and predictions of
any candidate of the space in microseconds, without building it.

A candidate's forward pass is an embedding block (for a factorized ALBERT embedding, the lookup
at width E plus its E->H projection), ``num_layers`` encoder layers and a head (pooler and
classifier). Each block is timed in isolation (``evaluators/profile.py``). The prediction is
``c0 + c1 * (embedding + layers * layer + head)``, where ``layer`` comes from a fit over all the
profiled layers of the model class (their work by kind: projections, FFN, attention,
elementwise, softmax, per call; see ``fit_layer_model``) rather than from the one block's own
timing, and ``c0, c1`` are fitted per model class on a handful of whole-model measurements (the
framework's fixed overheads: mask creation, output wrapping), and kept only where leave-one-out
says the correction helps.

Cross-layer sharing changes parameters, not compute: ALBERT runs ``num_layers`` layers however
many groups hold their weights, so the number of groups never enters a prediction. The model
class does: transformers' ``AlbertLayer`` and ``BertLayer`` are different code with different
per-call overheads (measured here: an ALBERT student runs ~10% faster than the BERT student of
the same dimensions at batch 1), so their layers are profiled separately.

The table is JSON, keyed by a device fingerprint (CPU, cores, threads, torch, transformers,
backend, batch size, sequence length). It grows: a study whose space needs blocks the table
lacks profiles just those and saves them, so every study on the device shares one table.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import transformers
from scipy.optimize import nnls

from tacnas.errors import UserError
from tacnas.searchspace.arch import ArchConfig

BACKENDS = ("torch", "onnxruntime")


class CorruptTable(UserError):
    """A latency table file that does not parse."""
TABLE_VERSION = 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_fingerprint(*, batch_size: int, seq_len: int, threads: int,
                       backend: str = "torch") -> dict:
    """What a latency table is valid for: this machine and these measurement settings."""
    fp = {
        "cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "backend": backend, "batch_size": batch_size, "seq_len": seq_len,
    }
    if backend.startswith("onnxruntime"):
        import onnxruntime

        fp["onnxruntime"] = onnxruntime.__version__
        fp["thread_pool"] = "global"  # see evaluators/runtime.py: session()
    return fp


def fingerprint_id(fp: Mapping) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


class Block(NamedTuple):
    """One profiled block. ``albert`` selects the transformers class (BERT or ALBERT code)."""

    kind: str  # embedding | layer | head
    albert: bool
    hidden: int
    heads: int = 0  # layer only
    ffn: int = 0  # layer only
    emb: int = 0  # embedding only

    @property
    def key(self) -> str:
        cls = "albert" if self.albert else "bert"
        if self.kind == "embedding":
            return f"embedding:{cls}:E{self.emb}:H{self.hidden}"
        if self.kind == "layer":
            return f"layer:{cls}:H{self.hidden}:A{self.heads}:F{self.ffn}"
        return f"head:{cls}:H{self.hidden}"

    @classmethod
    def parse(cls, key: str) -> Block:
        """The inverse of ``key`` (the table's JSON is keyed by it)."""
        kind, name, *dims = key.split(":")
        v = {d[0]: int(d[1:]) for d in dims}
        return cls(kind, name == "albert", v["H"], heads=v.get("A", 0), ffn=v.get("F", 0),
                   emb=v.get("E", 0))


def blocks_of(layers: int, hidden: int, heads: int, ffn: int, emb: int,
              albert: bool) -> list[tuple[Block, int]]:
    """The blocks of a forward pass and how often each runs (sharing plays no part)."""
    return [
        (Block("embedding", albert, hidden, emb=emb), 1),
        (Block("layer", albert, hidden, heads=heads, ffn=ffn), layers),
        (Block("head", albert, hidden), 1),
    ]


def arch_blocks(arch: ArchConfig) -> list[tuple[Block, int]]:
    return blocks_of(arch.num_layers, arch.hidden_size, arch.num_heads, arch.intermediate_size,
                     arch.embedding_size, arch.is_albert)


def teacher_arch(config) -> ArchConfig:
    """The teacher as an ``ArchConfig`` (BERT or ALBERT), so the table can predict it too."""
    layers = config.num_hidden_layers
    return ArchConfig(
        num_layers=layers, hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        embedding_size=getattr(config, "embedding_size", config.hidden_size),
        num_hidden_groups=getattr(config, "num_hidden_groups", layers),
    ).validate()


# ----------------------------------------------------------------------------------- the table


@dataclass
class LatencyTable:
    fingerprint: dict
    blocks: dict[str, float] = field(default_factory=dict)  # Block.key -> ms
    fit_points: dict[str, float] = field(default_factory=dict)  # arch name -> measured ms
    correction: dict[str, list[float]] = field(default_factory=dict)  # bert|albert -> [c0, c1]
    # bert|albert -> coefficients of LAYER_TERMS: a layer's time as a fit over all its class's
    # profiled layers (see fit_layer_model); a class without one uses its raw block times
    layer_model: dict[str, list[float]] = field(default_factory=dict)
    profile_seconds: float = 0.0  # total time spent profiling this table, all sessions
    unit_ms: float | None = None  # the reference's quiet time: every figure is in its units

    # -- prediction
    def block_sum(self, arch: ArchConfig) -> float:
        return self._sum(arch_blocks(arch))

    def _sum(self, blocks: Iterable[tuple[Block, int]]) -> float:
        total = 0.0
        for block, n in blocks:
            ms = self.blocks.get(block.key)
            if ms is None:
                raise KeyError(block.key)
            if block.kind == "layer":
                ms = self.layer_ms(block, ms)
            total += n * ms
        return total

    def layer_ms(self, block: Block, measured: float) -> float:
        """One layer's time: the class's fitted layer model if it has one, else as measured."""
        coef = self.layer_model.get("albert" if block.albert else "bert")
        if not coef:
            return measured
        x = layer_terms(block.hidden, block.heads, block.ffn, self.fingerprint["batch_size"],
                        self.fingerprint["seq_len"])
        return sum(c * v for c, v in zip(coef, x))

    def coefficients(self, albert: bool) -> tuple[float, float]:
        c0, c1 = self.correction.get("albert" if albert else "bert", (0.0, 1.0))
        return float(c0), float(c1)

    def predict_ms(self, arch: ArchConfig) -> float:
        """End-to-end latency of ``arch`` from the table. Raises KeyError naming a missing block."""
        c0, c1 = self.coefficients(arch.is_albert)
        return c0 + c1 * self.block_sum(arch)

    def missing(self, archs: Iterable[ArchConfig]) -> list[Block]:
        need = {}
        for arch in archs:
            for block, _ in arch_blocks(arch):
                if block.key not in self.blocks:
                    need[block.key] = block
        return list(need.values())

    # -- persistence
    def to_dict(self) -> dict:
        return {"version": TABLE_VERSION, "fingerprint": self.fingerprint, "blocks": self.blocks,
                "fit_points": self.fit_points, "correction": self.correction,
                "layer_model": self.layer_model,
                "profile_seconds": self.profile_seconds, "unit_ms": self.unit_ms}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a table

    @classmethod
    def load(cls, path: str | Path, *, expect: Mapping | None = None) -> LatencyTable:
        """Load a table; with ``expect`` (this device's fingerprint), refuse one made elsewhere."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            table = cls(fingerprint=d["fingerprint"], blocks=d["blocks"],
                        fit_points=d.get("fit_points", {}), correction=d.get("correction", {}),
                        profile_seconds=d.get("profile_seconds", 0.0),
                        unit_ms=d.get("unit_ms"), layer_model=d.get("layer_model", {}))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptTable(f"budget.latency_table {path}: not a latency table ({e}); run "
                               "`run_search.py profile --fresh --config FILE` to make it again"
                               ) from None
        if "layer_model" not in d:  # a table from before the layer model: fit it now
            refit(table, known_archs(table))
        if expect is not None:
            diff = [f"{k}: table {table.fingerprint.get(k)!r}, here {expect.get(k)!r}"
                    for k in sorted(set(expect) | set(table.fingerprint))
                    if table.fingerprint.get(k) != expect.get(k)]
            if diff:
                raise UserError(
                    f"budget.latency_table {path}: profiled for another device or setting "
                    f"({'; '.join(diff[:3])}); run `run_search.py profile --config FILE` here, "
                    "or drop budget.latency_table to use this machine's own table"
                )
        return table


def default_table_path(cache: Path, fingerprint: Mapping) -> Path:
    return Path(cache) / "latency" / f"{fingerprint_id(fingerprint)}.json"


# ------------------------------------------------------------------------ the overhead correction


def _fit(xs: list[float], ys: list[float], how: str) -> tuple[float, float]:
    n = len(xs)
    if how == "none" or n == 0:
        return 0.0, 1.0
    if how == "scale":  # least relative squares: c1 minimising sum(((c1 x - y) / y)^2)
        r = [x / y for x, y in zip(xs, ys)]
        return 0.0, sum(r) / sum(v * v for v in r)
    if how == "offset" or n < 3:
        return sum(y - x for x, y in zip(xs, ys)) / n, 1.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return my - mx, 1.0
    c1 = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - c1 * mx, c1


def fit_correction(xs: list[float], ys: list[float]) -> tuple[str, tuple[float, float]]:
    """Pick none / scale / offset / affine by leave-one-out relative error, then fit it on all
    points."""
    if len(xs) < 2:
        return "none", (0.0, 1.0)
    best, best_err = "none", math.inf
    for how in ("none", "scale", "offset", "affine"):
        if how == "affine" and len(xs) < 4:
            continue
        err = 0.0
        for i in range(len(xs)):
            c0, c1 = _fit(xs[:i] + xs[i + 1:], ys[:i] + ys[i + 1:], how)
            err += abs(c0 + c1 * xs[i] - ys[i]) / ys[i]
        if err < best_err - 1e-12:
            best, best_err = how, err
    return best, _fit(xs, ys, best)


def fit_archs(table: LatencyTable, archs: list[ArchConfig], per_class: int) -> list[ArchConfig]:
    """A spread of architectures per class (quantiles of FLOPs, then layer count) for
    whole-model measurement, skipping those already measured."""
    chosen = []
    for albert in (False, True):
        of_class = sorted((a for a in archs if a.is_albert == albert),
                          key=lambda a: (a.flops(batch_size=1, seq_len=64), a.num_layers))
        have = sum(1 for a in of_class if a.name in table.fit_points)
        k = min(per_class - have, len(of_class))
        if k <= 0 or not of_class:
            continue
        fresh = [a for a in of_class if a.name not in table.fit_points]
        idx = sorted({round(i * (len(fresh) - 1) / max(1, k - 1)) for i in range(k)})
        chosen += [fresh[i] for i in idx]
    return chosen


# A layer's work by kind, at batch B and sequence length S (T = B * S tokens): the four H x H
# projections, the two FFN matrices, attention scores and mixing, elementwise work over the
# hidden and FFN widths (LayerNorms, residuals, GELU), the softmax over the scores, and a fixed
# per-call cost (dispatch).
LAYER_TERMS = ("proj", "ffn", "attention", "elementwise_hidden", "elementwise_ffn", "softmax",
               "call")
MIN_LAYERS_FOR_MODEL = 3 * len(LAYER_TERMS)  # profiled layers a class needs to fit one


def layer_terms(hidden: int, heads: int, ffn: int, batch_size: int, seq_len: int) -> list[float]:
    t = batch_size * seq_len
    scores = batch_size * heads * seq_len * seq_len
    return [4.0 * t * hidden * hidden, 2.0 * t * hidden * ffn, 2.0 * scores * (hidden // heads),
            float(t * hidden), float(t * ffn), float(scores), 1.0]


def fit_layer_model(table: LatencyTable) -> dict[str, int]:
    """Per class, a layer's time as a non-negative combination of ``LAYER_TERMS``, fitted
    (least relative squares, ``scipy.optimize.nnls``) over every layer the table profiled.

    Why: one layer block is timed in a few sweeps of a few passes; on this shared machine, at
    batch 32, re-timing the same block moved it by up to 20%, and a candidate's prediction
    multiplies its layer's error by the layer count. The fit pools 25 layers' timings, so a
    block's own noise averages out while the way time grows with hidden, heads and FFN width
    stays (measured by benchmarks/latency_model.py at batch 32: held-out error 10.1% -> 3.6%
    MAPE after teacher calibration). Non-negative terms keep the time growing with every
    dimension. A class with fewer than ``MIN_LAYERS_FOR_MODEL`` profiled layers keeps its raw
    block times. Returns how many layers each class's fit used."""
    b, s = table.fingerprint["batch_size"], table.fingerprint["seq_len"]
    rows: dict[str, list[tuple[list[float], float]]] = {"bert": [], "albert": []}
    for key, ms in table.blocks.items():
        block = Block.parse(key)
        if block.kind != "layer" or ms <= 0:
            continue
        rows["albert" if block.albert else "bert"].append(
            (layer_terms(block.hidden, block.heads, block.ffn, b, s), ms))
    table.layer_model = {}
    used = {}
    for cls, pts in rows.items():
        if len(pts) < MIN_LAYERS_FOR_MODEL:
            continue
        scale = [max(abs(x[i]) for x, _ in pts) or 1.0 for i in range(len(LAYER_TERMS))]
        a_rows = [[x[i] / scale[i] / y for i in range(len(LAYER_TERMS))] for x, y in pts]
        coef, _ = nnls(np.asarray(a_rows), np.ones(len(pts)))
        table.layer_model[cls] = [float(c / sc) for c, sc in zip(coef, scale)]
        used[cls] = len(pts)
    return used


def refit(table: LatencyTable, names: Mapping[str, ArchConfig]) -> dict[str, str]:
    """Fit each class's layer model on its profiled layers, then its correction on the table's
    whole-model points; returns the correction form chosen."""
    fit_layer_model(table)
    forms = {}
    for albert in (False, True):
        pts = [(table.block_sum(names[n]), ms) for n, ms in table.fit_points.items()
               if n in names and names[n].is_albert == albert]
        if not pts:
            continue
        how, coef = fit_correction([p[0] for p in pts], [p[1] for p in pts])
        cls = "albert" if albert else "bert"
        table.correction[cls] = list(coef)
        forms[cls] = how
    return forms


def known_archs(table: LatencyTable) -> dict[str, ArchConfig]:
    """Fit points from earlier spaces, parsed back from their names (L-H-A-F-E-G)."""
    out = {}
    for name in table.fit_points:
        try:
            out[name] = ArchConfig.from_name(name)
        except UserError:
            continue
    return out

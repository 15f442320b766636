"""A latency model of one device: profile the blocks a candidate is made of once, then predict
any candidate of the space in microseconds, without building it.

A candidate's forward pass is an embedding block (for a factorized ALBERT embedding, the lookup
at width E plus its E->H projection), ``num_layers`` encoder layers and a head (pooler and
classifier). Each block is timed in isolation, exactly as the model calls it (same module class,
same attention mask, same inputs), in the clean latency subprocess, with warm-up and the lowest
of several medians. The prediction is ``c0 + c1 * (embedding + layers * layer + head)``, where
``layer`` comes from a fit over all the profiled layers of the model class (their work by kind:
projections, FFN, attention, elementwise, softmax, per call; see ``fit_layer_model``) rather
than from the one block's own timing, and ``c0, c1`` are fitted per model class on a handful of whole-model measurements (the framework's
fixed overheads: mask creation, output wrapping), and kept only where leave-one-out says the
correction helps.

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
import itertools
import json
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import transformers
from scipy.optimize import nnls
from tqdm.auto import tqdm

from tacnas.errors import UserError
from tacnas.searchspace.arch import ArchConfig
from tacnas.searchspace.space import ALL, HIDDEN, SearchSpace

BACKENDS = ("torch", "onnxruntime")
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
    if backend == "onnxruntime":
        import onnxruntime

        fp["onnxruntime"] = onnxruntime.__version__
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
            raise UserError(f"budget.latency_table {path}: not a latency table ({e}); "
                            "run `run_search.py profile --config FILE` to make one") from None
        if "layer_model" not in d:  # a table from before the layer model: fit it now
            refit(table, _known(table))
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
        kind, cls, *dims = key.split(":")
        if kind != "layer" or ms <= 0:
            continue
        h, a, f = (int(d[1:]) for d in dims)
        rows[cls].append((layer_terms(h, a, f, b, s), ms))
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


# ------------------------------------------------------------------------------- profiling


STACK = 4  # a layer is timed inside a stack of this many distinct layers (see block_module)
_PROBES: dict[str, object] = {}  # the worker's built probe models, reused across sweeps


def _probe_config(block: dict, teacher_config: dict):
    """A small model holding ``block``: ``STACK`` distinct layers of its class. Only the
    embedding block needs the real vocabulary; the others use a small one (faster to build,
    same compute)."""
    from transformers import PretrainedConfig

    from tacnas.searchspace.build import student_config

    h = block["hidden"]
    tc = dict(teacher_config)
    if block["kind"] != "embedding":
        tc["vocab_size"] = 512
    arch = ArchConfig(
        num_layers=2 if block["albert"] else 1, hidden_size=h,
        num_heads=block["heads"] or 1, intermediate_size=block["ffn"] or 4,
        embedding_size=block["emb"] or h, num_hidden_groups=1,
    ).validate()
    config = student_config(arch, PretrainedConfig(**tc))
    config.num_hidden_layers = STACK
    if block["albert"]:
        config.num_hidden_groups = STACK
    return config


class _Embedding(torch.nn.Module):
    def __init__(self, model, albert: bool):
        super().__init__()
        base = model.albert if albert else model.bert
        self.embeddings = base.embeddings
        self.mapping = base.encoder.embedding_hidden_mapping_in if albert else None

    def forward(self, ids):
        h = self.embeddings(input_ids=ids)
        return self.mapping(h) if self.mapping is not None else h


class _Layers(torch.nn.Module):
    def __init__(self, model, albert: bool, mask):
        super().__init__()
        base = model.albert if albert else model.bert
        self.layers = base.encoder.albert_layer_groups if albert else base.encoder.layer
        self.mask = mask

    def forward(self, hidden):
        for layer in self.layers:
            hidden = layer(hidden, self.mask)
        return hidden


class _Head(torch.nn.Module):
    def __init__(self, model, albert: bool):
        super().__init__()
        self.model, self.albert = model, albert

    def forward(self, hidden):
        m = self.model
        if self.albert:
            pooled = m.albert.pooler_activation(m.albert.pooler(hidden[:, 0]))
        else:
            pooled = m.bert.pooler(hidden)
        return m.classifier(m.dropout(pooled))


def block_module(model, block: dict, batch_size: int, seq_len: int):
    """``(module, inputs, per)``: ``block`` of ``model`` as the model's forward calls it (same
    modules, same attention mask), with its inputs; the time of ``module(*inputs)`` divided by
    ``per`` is the block's. A layer runs as a pass through ``STACK`` distinct layers: in a
    model each layer's weights are evicted by the others' before its next call, while one layer
    called again and again stays in cache (measured: up to 19% faster for a 320-wide layer with
    a 1536 FFN)."""
    from transformers.masking_utils import create_bidirectional_mask

    from tacnas.evaluators.latency import input_ids

    albert = block["albert"]
    ids = input_ids(model.config.vocab_size, batch_size, seq_len)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(batch_size, seq_len, block["hidden"], generator=g)
    kind = block["kind"]
    if kind == "embedding":
        return _Embedding(model, albert), (ids,), 1
    if kind == "layer":
        mask = create_bidirectional_mask(config=model.config, inputs_embeds=hidden,
                                         attention_mask=torch.ones_like(ids))
        module = _Layers(model, albert, mask)
        return module, (hidden,), len(module.layers)
    return _Head(model, albert), (hidden,), 1


def _profile_in_worker(block: dict, teacher_config: dict,
                       settings: dict) -> tuple[float, float]:
    """One timing of one block against the reference, in the latency subprocess (the runner is
    kept for the next sweep): ``(ratio, reference ms)``."""
    from transformers import AutoModelForSequenceClassification

    from tacnas.evaluators.latency import ratio_in_worker, runner_in_worker

    key = Block(**block).key
    if key not in _PROBES:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(
            _probe_config(block, teacher_config)).eval()
        module, inputs, per = block_module(model, block, settings["batch_size"],
                                           settings["seq_len"])
        _PROBES[key] = (runner_in_worker(module, inputs, settings), per)
    fn, per = _PROBES[key]
    ratio, ref_ms = ratio_in_worker(fn, settings)
    return ratio / per, ref_ms


def _clear_probes() -> None:
    _PROBES.clear()


def ensure_profiled(table: LatencyTable, meter, archs: list[ArchConfig], *, path: Path,
                    fit_per_class: int = 6, progress: bool = True) -> dict:
    """Profile every block ``archs`` need that ``table`` lacks, measure a few whole models of
    each class for the overhead correction, refit and save. Returns what was done.

    Every block and whole model is timed against the reference (see ``evaluators.latency``) in
    ``rounds`` sweeps over all of them, in a shuffled order each sweep, and keeps the median of
    its ratios; the table's unit is the reference's lowest median seen while profiling (or the
    unit the table already has)."""
    t0 = time.perf_counter()
    missing = table.missing(archs)
    fits = fit_archs(table, archs, fit_per_class) if (missing or not table.correction) else []
    if not missing and not fits:
        return {"blocks": 0, "whole_models": 0, "forms": {}, "seconds": 0.0}
    teacher_config = meter.teacher_config.to_dict()
    sweeps = meter.settings["rounds"]
    one = {**meter.settings, "rounds": 1}
    jobs = [("block", b) for b in missing] + [("model", a) for a in fits]
    ratios: dict[str, list[float]] = {}
    ref_low = math.inf
    rng = random.Random(0)
    bar = tqdm(total=sweeps * len(jobs), desc="profile", unit="timing", disable=not progress)
    try:
        for _ in range(sweeps):
            order = jobs[:]
            rng.shuffle(order)
            for kind, item in order:
                if kind == "block":
                    key = item.key
                    r, ref_ms = meter.call(_profile_in_worker, item._asdict(), teacher_config, one)
                else:
                    key = item.name
                    r, ref_ms = meter.call(_measure_arch_in_worker, item.to_dict(),
                                           teacher_config, one)
                ratios.setdefault(key, []).append(r)
                ref_low = min(ref_low, ref_ms)
                bar.update(1)
    finally:
        bar.close()
        meter.call(_clear_probes)
        meter.call(_clear_models)
    if table.unit_ms is None:
        table.unit_ms = ref_low
    for b in missing:
        table.blocks[b.key] = statistics.median(ratios[b.key]) * table.unit_ms
    for a in fits:
        table.fit_points[a.name] = statistics.median(ratios[a.name]) * table.unit_ms
    meter.unit_ms = table.unit_ms  # the meter's direct measurements in the table's units
    forms = refit(table, {a.name: a for a in archs} | _known(table))
    table.profile_seconds += time.perf_counter() - t0
    table.save(path)
    return {"blocks": len(missing), "whole_models": len(fits), "forms": forms,
            "seconds": time.perf_counter() - t0}


_MODELS: dict[str, object] = {}


def _measure_arch_in_worker(arch: dict, teacher_config: dict,
                            settings: dict) -> tuple[float, float]:
    """A whole model against the reference (kept for the next sweep): ``(ratio, ref ms)``."""
    from transformers import AutoModelForSequenceClassification, PretrainedConfig

    from tacnas.evaluators.latency import model_inputs, ratio_in_worker, runner_in_worker
    from tacnas.searchspace.build import student_config

    a = ArchConfig.from_dict(arch)
    if a.name not in _MODELS:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(
            student_config(a, PretrainedConfig(**teacher_config)))
        module, inputs = model_inputs(model, settings["batch_size"], settings["seq_len"])
        _MODELS[a.name] = runner_in_worker(module, inputs, settings)
    return ratio_in_worker(_MODELS[a.name], settings)


def _clear_models() -> None:
    _MODELS.clear()


def _known(table: LatencyTable) -> dict[str, ArchConfig]:
    """Fit points from earlier spaces, parsed back from their names (L-H-A-F-E-G)."""
    out = {}
    for name in table.fit_points:
        try:
            L, H, A, F, E, G = (int(p[1:]) for p in name.split("-"))
            out[name] = ArchConfig(L, H, A, F, E, G).validate()
        except (ValueError, UserError):
            continue
    return out


# ------------------------------------------------------------------------- expected latency


class ExpectedLatency:
    """The latency model as a differentiable function of one categorical distribution per
    dimension of the space: ``E[latency] = sum over every combination of choices of
    prediction(combination) * prod_d p_d(choice_d)``. At one-hot distributions it is exactly
    ``table.predict_ms`` of that architecture.

    Combinations that are not an architecture (an embedding wider than the hidden size, groups
    that do not divide the layers, heads that do not divide the hidden size) take the space's
    largest latency, so that mass on them is never attractive.
    """

    def __init__(self, table: LatencyTable, space: SearchSpace):
        self.dims: list[tuple[str, tuple]] = list(space.choices().items())
        values, valid = [], []
        for combo in itertools.product(*(c for _, c in self.dims)):
            d = dict(zip((n for n, _ in self.dims), combo))
            layers, hidden, ffn = d["num_layers"], d["hidden_size"], d["intermediate_size"]
            heads = d.get("num_heads") or hidden // (space.head_size or 1)
            emb = hidden if d["embedding_size"] == HIDDEN else d["embedding_size"]
            groups = layers if d["num_hidden_groups"] == ALL else d["num_hidden_groups"]
            ok = emb <= hidden and layers % groups == 0 and hidden % heads == 0
            if ok:
                arch = ArchConfig(layers, hidden, heads, ffn, emb, groups)
                values.append(table.predict_ms(arch))
            else:
                values.append(math.nan)
            valid.append(ok)
        grid = torch.tensor(values, dtype=torch.float64)
        worst = grid[torch.tensor(valid)].max() if any(valid) else torch.tensor(0.0)
        grid = torch.where(torch.tensor(valid), grid, worst)
        self.grid = grid.reshape([len(c) for _, c in self.dims])

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.dims]

    def __call__(self, probs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``probs[name]``: a 1-D distribution over that dimension's choices (space order)."""
        out = self.grid.to(next(iter(probs.values())).dtype)
        for name, choices in self.dims:  # contract one leading dimension at a time
            p = probs[name]
            if p.shape != (len(choices),):
                raise ValueError(f"probs[{name!r}] has shape {tuple(p.shape)}, "
                                 f"expected ({len(choices)},)")
            out = torch.tensordot(p, out, dims=([0], [0]))
        return out

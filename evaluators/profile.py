"""Profiling a device's latency table: every block a space needs, timed in isolation exactly as
the model calls it (same module class, same attention mask, same inputs), in the clean latency
subprocess (``evaluators/latency.py``), against the reference, with warm-up and the median of
several sweeps; and a few whole models per class for the table's overhead correction.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tacnas.evaluators.latency import against_reference, input_ids, kept, runner
from tacnas.evaluators.latency_table import Block, LatencyTable, fit_archs, known_archs, refit
from tacnas.searchspace.arch import ArchConfig

STACK = 4  # a layer is timed inside a stack of this many distinct layers (see block_module)


def _probe_config(block: Block, teacher_config: dict):
    """A small model holding ``block``: ``STACK`` distinct layers of its class. Only the
    embedding block needs the real vocabulary; the others use a small one (faster to build,
    same compute)."""
    from transformers import PretrainedConfig

    from tacnas.searchspace.build import student_config

    tc = dict(teacher_config)
    if block.kind != "embedding":
        tc["vocab_size"] = 512
    arch = ArchConfig(
        num_layers=2 if block.albert else 1, hidden_size=block.hidden,
        num_heads=block.heads or 1, intermediate_size=block.ffn or 4,
        embedding_size=block.emb or block.hidden, num_hidden_groups=1,
    ).validate()
    config = student_config(arch, PretrainedConfig(**tc))
    config.num_hidden_layers = STACK
    if block.albert:
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


def block_module(model, block: Block, batch_size: int, seq_len: int):
    """``(module, inputs, per)``: ``block`` of ``model`` as the model's forward calls it (same
    modules, same attention mask), with its inputs; the time of ``module(*inputs)`` divided by
    ``per`` is the block's. A layer runs as a pass through ``STACK`` distinct layers: in a
    model each layer's weights are evicted by the others' before its next call, while one layer
    called again and again stays in cache (measured: up to 19% faster for a 320-wide layer with
    a 1536 FFN)."""
    from transformers.masking_utils import create_bidirectional_mask

    ids = input_ids(model.config.vocab_size, batch_size, seq_len)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(batch_size, seq_len, block.hidden, generator=g)
    if block.kind == "embedding":
        return _Embedding(model, block.albert), (ids,), 1
    if block.kind == "layer":
        mask = create_bidirectional_mask(config=model.config, inputs_embeds=hidden,
                                         attention_mask=torch.ones_like(ids))
        module = _Layers(model, block.albert, mask)
        return module, (hidden,), len(module.layers)
    return _Head(model, block.albert), (hidden,), 1


def _block_in_worker(block: Block, teacher_config: dict, s) -> tuple[float, float]:
    """One timing of one block against the reference, in the latency subprocess (the probe is
    kept for the next sweep): ``(ratio, reference ms)``."""
    from transformers import AutoModelForSequenceClassification

    def build():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(
            _probe_config(block, teacher_config)).eval()
        module, inputs, per = block_module(model, block, s.batch_size, s.seq_len)
        return runner(module, inputs, s), per

    fn, per = kept(("block", block.key), build)
    ratio, ref_ms = against_reference(fn, s)
    return ratio / per, ref_ms


def block_ratio(meter, block: Block, *, rounds: int = 1) -> tuple[float, float]:
    """``(ratio to the reference, reference ms)`` of one block, kept built until
    ``meter.forget()``."""
    return meter.call(_block_in_worker, block, meter.teacher_config.to_dict(),
                      dataclasses.replace(meter.settings, rounds=rounds))


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
    sweeps = meter.settings.rounds
    jobs = [(b.key, b) for b in missing] + [(a.name, a) for a in fits]
    ratios: dict[str, list[float]] = {}
    ref_low = math.inf
    rng = random.Random(0)
    bar = tqdm(total=sweeps * len(jobs), desc="profile", unit="timing", disable=not progress)
    try:
        for _ in range(sweeps):
            order = jobs[:]
            rng.shuffle(order)
            for key, item in order:
                if isinstance(item, Block):
                    r, ref_ms = block_ratio(meter, item)
                else:
                    r, ref_ms = meter.arch_ratio(item)
                ratios.setdefault(key, []).append(r)
                ref_low = min(ref_low, ref_ms)
                bar.update(1)
    finally:
        bar.close()
        meter.forget()
    if table.unit_ms is None:
        table.unit_ms = ref_low
    for b in missing:
        table.blocks[b.key] = statistics.median(ratios[b.key]) * table.unit_ms
    for a in fits:
        table.fit_points[a.name] = statistics.median(ratios[a.name]) * table.unit_ms
    meter.unit_ms = table.unit_ms  # the meter's direct measurements in the table's units
    forms = refit(table, {a.name: a for a in archs} | known_archs(table))
    table.profile_seconds += time.perf_counter() - t0
    table.save(path)
    return {"blocks": len(missing), "whole_models": len(fits), "forms": forms,
            "seconds": time.perf_counter() - t0}

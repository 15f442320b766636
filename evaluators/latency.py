"""Measured latency: a candidate's forward pass on this machine, at the budget's batch size,
sequence length and thread count (warm-up, median of repeats, inference mode).

A predictive latency model comes later; here every candidate is built and measured. Latency does
not depend on the weights, so a candidate is measured as a randomly initialised model (cheap to
build) and results are cached per architecture for the life of the meter.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from searchspace.arch import ArchConfig
from searchspace.build import build_student


@contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def measure_ms(
    model: PreTrainedModel,
    *,
    batch_size: int,
    seq_len: int,
    threads: int,
    warmup: int = 5,
    repeats: int = 20,
    rounds: int = 3,
) -> float:
    """Forward latency in milliseconds of ``model`` on a full (unpadded) batch: the fastest of
    ``rounds`` medians of ``repeats`` timed passes. Load from other processes only ever slows a
    pass down, so the lowest median is the steadiest estimate on a shared machine."""
    model.eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch_size, seq_len), generator=g)
    mask = torch.ones_like(ids)
    medians = []
    with torch_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            model(input_ids=ids, attention_mask=mask)
        for _ in range(rounds):
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                model(input_ids=ids, attention_mask=mask)
                times.append(time.perf_counter() - t)
            medians.append(statistics.median(times))
    return 1000 * min(medians)


class LatencyMeter:
    """Measures architectures built with the teacher's vocabulary and labels."""

    def __init__(self, teacher: PreTrainedModel, *, batch_size: int, seq_len: int, threads: int,
                 warmup: int = 5, repeats: int = 20, rounds: int = 3):
        self.teacher = teacher
        self.settings = dict(batch_size=batch_size, seq_len=seq_len, threads=threads,
                             warmup=warmup, repeats=repeats, rounds=rounds)
        self._cache: dict[ArchConfig, float] = {}

    def model_ms(self, model: PreTrainedModel) -> float:
        return measure_ms(model, **self.settings)

    def teacher_ms(self) -> float:
        return self.model_ms(self.teacher)

    def arch_ms(self, arch: ArchConfig) -> float:
        if arch not in self._cache:
            model = build_student(arch, self.teacher, init="random")
            self._cache[arch] = self.model_ms(model)
        return self._cache[arch]

"""Measured latency: a candidate's forward pass on this machine, at the budget's batch size,
sequence length and thread count (warm-up, lowest of several medians, inference mode).

Measurements run in a dedicated subprocess that never trains: measured here, batch-1 inference
in a process that has just trained a model is often 20-35% slower than in a fresh one, which
would bias every comparison between a candidate and the teacher. Latency does not depend on the
weights, so a candidate (and the teacher) is measured as a randomly initialised model built from
its config; results are cached per architecture for the life of the meter. A predictive latency
model comes later; here every candidate is built and measured.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig

from searchspace.arch import ArchConfig
from searchspace.build import student_config


@contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def measure_ms(
    model,
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


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end this process when the search process is gone (even SIGKILLed)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _measure_in_worker(config: dict | None, folder: str | None, settings: dict) -> float:
    """Runs in the latency subprocess: build from a config dict (random weights) or load a folder."""
    if folder is not None:
        model = AutoModelForSequenceClassification.from_pretrained(folder)
    else:
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(**config)
        model = AutoModelForSequenceClassification.from_config(cfg)
    return measure_ms(model, **settings)


class LatencyMeter:
    """Measures architectures built with the teacher's vocabulary and labels, in a clean
    subprocess started on first use."""

    def __init__(self, teacher_config: PretrainedConfig, *, batch_size: int, seq_len: int,
                 threads: int, warmup: int = 5, repeats: int = 20, rounds: int = 3):
        self.teacher_config = teacher_config
        self.settings = dict(batch_size=batch_size, seq_len=seq_len, threads=threads,
                             warmup=warmup, repeats=repeats, rounds=rounds)
        self._pool: ProcessPoolExecutor | None = None
        self._cache: dict[ArchConfig, float] = {}

    def _run(self, config: dict | None = None, folder: str | None = None) -> float:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                initializer=_exit_with_parent, initargs=(os.getpid(),))
        return self._pool.submit(_measure_in_worker, config, folder, self.settings).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def teacher_ms(self) -> float:
        return self._run(config=self.teacher_config.to_dict())

    def folder_ms(self, folder) -> float:
        """A saved model (an export), loaded as a user would load it."""
        return self._run(folder=str(folder))

    def arch_ms(self, arch: ArchConfig) -> float:
        if arch not in self._cache:
            self._cache[arch] = self._run(config=student_config(arch, self.teacher_config).to_dict())
        return self._cache[arch]

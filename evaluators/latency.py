"""Measured latency: a candidate's forward pass on this machine, at the budget's batch size,
sequence length and thread count, in inference mode.

Two effects of this shared machine shape how (both measured here):

- Measurements run in a dedicated subprocess that never trains: batch-1 inference in a process
  that has just trained a model is often 20-35% slower than in a fresh one.
- The machine has slow spells of seconds to minutes (the same model: 6.2 ms for 25 s, then
  8.3-9.5 ms for 20 s), longer than any one measurement, so a lowest-of-medians taken inside
  a spell is still slow. Every measurement therefore alternates, pass by pass, the model and a
  fixed reference model, and reports the model's time as a ratio to the reference's times it
  sat between, in units of the reference's quiet-machine time (``unit_ms``). Two passes over 20
  models a few minutes apart: raw medians agreed within ±10% for 55% of the models, ratios
  for 95% (mean gap 8.4% -> 2.6%).

Latency does not depend on the weights, so a candidate (and the teacher) is measured as a
randomly initialised model built from its config; results are cached per architecture for the
life of the meter. The latency model profiles blocks in the same kind of worker, in the same units
(``evaluators/profile.py``), and predicts the rest (``evaluators/latency_table.py``).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig

from tacnas.searchspace.arch import ArchConfig
from tacnas.searchspace.build import student_config

# the reference: a one-layer BERT, hidden 256, 8 heads, FFN 1024, small vocabulary
REFERENCE = dict(model_type="bert", vocab_size=512, hidden_size=256, num_hidden_layers=1,
                 num_attention_heads=8, intermediate_size=1024, num_labels=2)


@contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def input_ids(vocab_size: int, batch_size: int, seq_len: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, vocab_size, (batch_size, seq_len), generator=g)


class Logits(torch.nn.Module):
    """A classifier as ``(input_ids, attention_mask) -> logits``: what is timed and exported."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()

    def forward(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask).logits


def model_inputs(model, batch_size: int, seq_len: int):
    ids = input_ids(model.config.vocab_size, batch_size, seq_len)
    return Logits(model), (ids, torch.ones_like(ids))


def make_runner(module: torch.nn.Module, inputs: tuple, *, backend: str = "torch",
                threads: int = 1, shared: bool = False):
    """``fn()`` running ``module(*inputs)`` once: in PyTorch eager, or exported to ONNX and run
    by an ONNX Runtime session with ``threads`` intra-op threads (quantized to int8 for
    ``onnxruntime-int8``; see ``evaluators/runtime.py``). ``shared``: on the process's global
    ONNX Runtime pool, which only the latency worker makes (once a process has it, a plain
    ``InferenceSession`` there fails)."""
    module.eval()
    if backend == "torch":
        return lambda: module(*inputs)
    from tacnas.evaluators.runtime import onnx_runner

    return onnx_runner(module, inputs, backend=backend, threads=threads, shared=shared)


def time_call(fn, *, threads: int, warmup: int = 5, repeats: int = 20, rounds: int = 3) -> float:
    """Milliseconds of ``fn()`` under inference mode: the lowest of ``rounds`` medians."""
    medians = []
    with torch_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            fn()
        for _ in range(rounds):
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            medians.append(statistics.median(times))
    return 1000 * min(medians)


def time_ratio(fn, ref, *, threads: int, warmup: int = 5, repeats: int = 20,
               rounds: int = 3) -> tuple[float, float]:
    """``fn`` against ``ref``, alternating pass by pass: ``(ratio, ref_ms)``, the median over
    rounds of median(fn)/median(ref), and the lowest median of ``ref`` in milliseconds."""
    ratios, ref_medians = [], []
    with torch_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            fn()
            ref()
        for _ in range(rounds):
            tf, tr = [], []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                ref()
                tf.append(t1 - t)
                tr.append(time.perf_counter() - t1)
            ratios.append(statistics.median(tf) / statistics.median(tr))
            ref_medians.append(statistics.median(tr))
    return statistics.median(ratios), 1000 * min(ref_medians)


def measure_ms(model, *, batch_size: int, seq_len: int, threads: int, warmup: int = 5,
               repeats: int = 20, rounds: int = 3) -> float:
    """Raw forward latency in ms of ``model``: the lowest of ``rounds`` medians (no reference)."""
    module, inputs = model_inputs(model, batch_size, seq_len)
    return time_call(make_runner(module, inputs), threads=threads, warmup=warmup,
                     repeats=repeats, rounds=rounds)


# ------------------------------------------------------------------------------ the subprocess


@dataclass(frozen=True)
class Settings:
    """How a latency is measured: the budget's shape and the timing protocol."""

    batch_size: int
    seq_len: int
    threads: int
    warmup: int = 5
    repeats: int = 20
    rounds: int = 3
    backend: str = "torch"

    def timing(self) -> dict:
        return dict(threads=self.threads, warmup=self.warmup, repeats=self.repeats,
                    rounds=self.rounds)


# The latency subprocess's built runners, kept across calls: the reference of each shape, and
# the models and probes a sweep times again (``keep``); ``forget`` drops all but the references.
_KEPT: dict[tuple, tuple] = {}


def kept(key: tuple, build) -> tuple:
    if key not in _KEPT:
        _KEPT[key] = build()
    return _KEPT[key]


def forget() -> None:
    for k in [k for k in _KEPT if k[0] != "reference"]:
        del _KEPT[k]


def reference(s: Settings):
    """The worker's reference pass at this shape (built once per process, fixed weights)."""
    def build():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**REFERENCE))
        module, inputs = model_inputs(model, s.batch_size, s.seq_len)
        return (runner(module, inputs, s),)

    return kept(("reference", s.batch_size, s.seq_len, s.backend, s.threads), build)[0]


def runner(module, inputs, s: Settings):
    """A runner in the latency worker (ONNX sessions on its one shared pool)."""
    return make_runner(module, inputs, backend=s.backend, threads=s.threads, shared=True)


def against_reference(fn, s: Settings) -> tuple[float, float]:
    """``fn`` timed against the reference: ``(ratio, reference ms)`` (see ``time_ratio``)."""
    return time_ratio(fn, reference(s), **s.timing())


def _calibrate(s: Settings) -> float:
    """The reference's own time: the lowest of ``rounds`` medians (at least 5)."""
    return time_call(reference(s), **{**s.timing(), "rounds": max(5, s.rounds)})


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end this process when the search process is gone (even SIGKILLed)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _config_runner(config: dict, s: Settings):
    """A runner of the model built from a transformers config dict (random weights, seed 0)."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(**config))
    return runner(*model_inputs(model, s.batch_size, s.seq_len), s)


def _runner_of(config: dict | None, folder: str | None, s: Settings):
    """A runner of the model built from a config dict (random weights) or loaded from a folder
    as a user would load it: its shipped ONNX graph in ONNX Runtime, else transformers'."""
    if folder is not None and s.backend != "torch":
        from tacnas.evaluators.runtime import ONNX_FILES, shipped_runner

        if (Path(folder) / ONNX_FILES[s.backend]).is_file():  # the graph a user ships
            return shipped_runner(folder, s.backend, batch_size=s.batch_size,
                                  seq_len=s.seq_len, threads=s.threads, shared=True)
    if folder is None:
        return _config_runner(config, s)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    return runner(*model_inputs(model, s.batch_size, s.seq_len), s)


def _measure_in_worker(config: dict | None, folder: str | None, s: Settings,
                       keep: str | None = None) -> tuple[float, float]:
    """Runs in the latency subprocess: a model built from a config dict (random weights) or
    loaded from a folder, against the reference; with ``keep``, built once and kept under that
    name for the next sweep."""
    def build():
        return (_runner_of(config, folder, s),)

    fn = kept(("model", keep), build)[0] if keep is not None else build()[0]
    return against_reference(fn, s)


def _pair_in_worker(config: dict | None, teacher: dict, s: Settings,
                    folder: str | None = None) -> float:
    """Runs in the latency subprocess: a model built from ``config`` (or loaded from
    ``folder``) timed against the teacher built from ``teacher`` (kept across calls),
    alternating call by call (``time_ratio``, at least 5 rounds): the model's time over the
    teacher's, no reference between."""
    key = ("reference", "teacher", json.dumps(teacher, sort_keys=True, default=str),
           s.batch_size, s.seq_len, s.backend, s.threads)
    teacher_fn = kept(key, lambda: (_config_runner(teacher, s),))[0]
    return time_ratio(_runner_of(config, folder, s), teacher_fn,
                      **{**s.timing(), "rounds": max(5, s.rounds)})[0]


class LatencyMeter:
    """Measures architectures built with the teacher's vocabulary and labels, in a clean
    subprocess started on first use. Figures are in ms of the reference's quiet time:
    ``unit_ms`` (from a latency table, so that predictions and measurements agree), or the
    reference calibrated on first use."""

    def __init__(self, teacher_config: PretrainedConfig, *, batch_size: int, seq_len: int,
                 threads: int, warmup: int = 5, repeats: int = 20, rounds: int = 3,
                 unit_ms: float | None = None, backend: str = "torch"):
        self.teacher_config = teacher_config
        self.settings = Settings(batch_size=batch_size, seq_len=seq_len, threads=threads,
                                 warmup=warmup, repeats=repeats, rounds=rounds, backend=backend)
        self.backend = backend
        self.units: dict[str, float] = {} if unit_ms is None else {backend: unit_ms}
        self._pools: dict[str, ProcessPoolExecutor] = {}  # one worker per backend
        self._cache: dict[ArchConfig, float] = {}
        self._shares: dict[ArchConfig, float] = {}

    @property
    def unit_ms(self) -> float | None:
        """The budget backend's unit: the reference's quiet time in that runtime."""
        return self.units.get(self.backend)

    @unit_ms.setter
    def unit_ms(self, value: float | None) -> None:
        if value is None:
            self.units.pop(self.backend, None)
        else:
            self.units[self.backend] = value

    def _settings(self, backend: str | None) -> Settings:
        if backend is None or backend == self.backend:
            return self.settings
        return dataclasses.replace(self.settings, backend=backend)

    def call(self, fn, *args, backend: str | None = None):
        """Run ``fn(*args)`` (a picklable top-level function) in the latency subprocess of
        ``backend`` (the budget's by default). Each backend has its own worker: ONNX Runtime's
        thread pool and PyTorch's OpenMP threads never share a process (measured here: the
        fp32 teacher in PyTorch read 16.7 ms in a worker that had run ONNX Runtime sessions,
        against 9.4-9.7 ms in one that had not)."""
        backend = backend or self.backend
        if backend not in self._pools:
            self._pools[backend] = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                initializer=_exit_with_parent, initargs=(os.getpid(),))
        return self._pools[backend].submit(fn, *args).result()

    def unit(self, backend: str | None = None) -> float:
        """The reference's quiet time in ``backend`` (the budget's by default): the unit of the
        figures measured in it, calibrated on first use unless a latency table gave it."""
        s = self._settings(backend)
        if s.backend not in self.units:
            self.units[s.backend] = self.call(_calibrate, s, backend=s.backend)
        return self.units[s.backend]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True)
        self._pools.clear()

    # -- one timing against the reference, for sweeps (profiling, benchmarks)
    def arch_ratio(self, arch: ArchConfig, *, rounds: int = 1) -> tuple[float, float]:
        """``(ratio to the reference, reference ms)`` of ``arch`` in ``rounds`` rounds; the
        model stays built in the worker until ``forget``."""
        config = student_config(arch, self.teacher_config).to_dict()
        return self.call(_measure_in_worker, config, None,
                         dataclasses.replace(self.settings, rounds=rounds), arch.name)

    def arch_share(self, arch: ArchConfig, *, fresh: bool = False) -> float:
        """``arch``'s time over the teacher's, the two timed alternately call by call in one
        measurement (``_pair_in_worker``), kept per architecture (``fresh``: measured again).

        A speedup budget is a ratio, and each figure in ms is measured against the small
        reference model: at batch 32 here the teacher read 290-355 ms that way within minutes (290
        then 354 within one), so a candidate checked against the teacher's lowest reading of a
        study is checked against another phase of the machine. Paired, the two share the phase.
        Four cycles over 4 students in 15 minutes (AMD EPYC, batch 32): paired, each one's
        speedup spread 2-13% but for one reading 33% low; apart, in the same minute, 5-43%,
        medians 4-19% lower (``benchmarks/finalist_search.py`` runs both over its picks)."""
        if fresh or arch not in self._shares:
            config = student_config(arch, self.teacher_config).to_dict()
            self._shares[arch] = self.call(_pair_in_worker, config,
                                           self.teacher_config.to_dict(), self.settings)
        return self._shares[arch]

    def folder_share(self, folder, backend: str | None = None) -> float:
        """A saved model's (an export's, loaded as ``folder_ms`` loads it) time over the
        teacher's in ``backend`` (the budget's by default), paired as in ``arch_share``."""
        s = self._settings(backend)
        return self.call(_pair_in_worker, None, self.teacher_config.to_dict(), s, str(folder),
                         backend=s.backend)

    def forget(self) -> None:
        """Drop the models and probes the worker keeps for sweeps."""
        self.call(forget)

    # -- latencies in ms (of the unit)
    def _run(self, config: dict | None = None, folder: str | None = None,
             backend: str | None = None) -> float:
        unit = self.unit(backend)
        s = self._settings(backend)
        ratio, _ = self.call(_measure_in_worker, config, folder, s, backend=s.backend)
        return ratio * unit

    def teacher_ms(self, backend: str | None = None) -> float:
        """The teacher's architecture in ``backend`` (the budget's by default)."""
        return self._run(config=self.teacher_config.to_dict(), backend=backend)

    def folder_ms(self, folder, backend: str | None = None) -> float:
        """A saved model (an export), loaded as a user would load it: the transformers folder
        in PyTorch, its shipped ONNX graph in ONNX Runtime."""
        return self._run(folder=str(folder), backend=backend)

    def config_ms(self, config: dict) -> float:
        """A model built from a transformers config dict (random weights)."""
        return self._run(config=config)

    def arch_ms(self, arch: ArchConfig) -> float:
        if arch not in self._cache:
            self._cache[arch] = self._run(config=student_config(arch, self.teacher_config).to_dict())
        return self._cache[arch]

"""The budget: what it is right now, who changed it, and whether a candidate fits it.

``Budget.resolve`` turns the config's ``budget`` section into figures for this process:

- ``latency_ms`` is fixed; ``speedup`` is over the teacher measured in this process, by the
  same latency worker as the candidates (so both see the same machine state); with both, the
  tighter holds. ``max_params`` is a parameter count.
- The teacher is measured again after every trained candidate (``tighten``; the
  differentiable search: at every checkpoint of its architecture phase): a slow spell of this
  shared machine during one teacher measurement would loosen a ``speedup`` budget, the unsafe
  direction, so the lowest figure seen only ever tightens it.
- With the latency table (``budget.latency: predict``), predictions are calibrated by the
  teacher measured now over the teacher predicted (``PredictedLatency.calibrate``): with a
  ``speedup`` budget the check becomes table-internal (candidate predicted against teacher
  predicted / speedup), whatever state the machine was in while profiling.
- A candidate predicted within ``guard_band`` of the budget (where the table's error could flip
  the decision) is measured directly instead; a candidate that may be shipped (a finalist, the
  differentiable search's derived architecture) is measured whatever its prediction
  (``confirm``), under a ``speedup`` budget paired with the teacher (its time over the
  teacher's, the two alternating call by call), so that its fit no longer depends on which
  teacher reading set the budget.
- One impossible reading does not rule a study: a teacher reading under half of both the other
  readings and the table's prediction is an outlier (``outlier``), ignored with a warning; a
  study's stored figure that a fresh measurement shows to be one is replaced, said so.

- ``min_retention`` is a floor on the score, not on latency: ``floor`` is that fraction of the
  teacher's own dev score under the search's objective (its task metric, or 1.0 for agreement
  with itself); a trained candidate scoring under it violates the ``min_retention``
  constraint, and the search then ranks feasible candidates by latency, fastest first.

- ``min_use`` is a floor on latency: a candidate predicted faster than that share of the
  latency budget leaves it unused and is rejected untrained (``Verdict.unused``), as one over
  it is; the floor is checked on the prediction (no guard band: a student just under the floor
  is as good a choice as one just over it).

``Budget.check(arch)`` returns a ``Verdict``: the latency it used and where it came from, the
parameter count and how far over the tightest budget the candidate is. The study keeps the
teacher's lowest figure and the budget it gives (``teacher_ms``, ``budget_ms``); every trial
records the budget it was checked against.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import optuna

from tacnas.errors import UserError
from tacnas.evaluators.latency_table import LatencyTable, teacher_arch
from tacnas.searchspace.arch import ArchConfig

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- latency models


class LatencyModel(Protocol):
    """A candidate's latency on this device: predicted by the table or measured."""

    source: str  # "predicted" | "measured"
    meter: object  # the latency worker (``evaluators.latency.LatencyMeter``)
    scale: float | None  # the calibration applied to predictions (None: measured)
    path: object  # the latency table's file (None: measured)

    def ms(self, arch: ArchConfig) -> float: ...

    def raw(self, arch: ArchConfig) -> float | None:
        """The table's uncalibrated prediction (None: measured)."""

    def calibrate(self, teacher_ms: float) -> None: ...

    def teacher_predicted(self) -> float | None: ...


class MeasuredLatency:
    """``budget.latency: measure``: every candidate built and measured (cached per arch)."""

    source = "measured"
    scale = None
    path = None

    def __init__(self, meter):
        self.meter = meter

    def ms(self, arch: ArchConfig) -> float:
        return self.meter.arch_ms(arch)

    def raw(self, arch: ArchConfig) -> float | None:
        return None

    def calibrate(self, teacher_ms: float) -> None:
        pass

    def teacher_predicted(self) -> float | None:
        return None


class PredictedLatency:
    """``budget.latency: predict``: the device's latency table, scaled by ``scale`` (the
    teacher measured now over the teacher predicted, set by ``calibrate``)."""

    source = "predicted"

    def __init__(self, table: LatencyTable, meter, path=None):
        self.table, self.meter, self.path = table, meter, path
        self.scale = 1.0

    def raw(self, arch: ArchConfig) -> float:
        return self.table.predict_ms(arch)

    def ms(self, arch: ArchConfig) -> float:
        return self.table.predict_ms(arch) * self.scale

    def teacher_predicted(self) -> float:
        return self.table.predict_ms(teacher_arch(self.meter.teacher_config))

    def calibrate(self, teacher_ms: float) -> None:
        self.scale = teacher_ms / self.teacher_predicted()


# ---------------------------------------------------------------------------------- the budget


@dataclass(frozen=True)
class Verdict:
    latency_ms: float
    source: str  # predicted | measured | measured (guard band | finalist)
    predicted_ms: float | None  # the table's raw prediction (None: no table)
    latency_scale: float | None
    budget_ms: float | None  # the latency budget checked against
    params: int
    violation: float  # how far over the tightest budget, as a fraction (<= 0: fits)
    seconds: float  # the check itself, without storage writes
    floor_ms: float | None = None  # budget.min_use of the latency budget
    share: float | None = None  # measured paired with the teacher: its time over the teacher's

    @property
    def fits(self) -> bool:
        return self.violation <= 0

    @property
    def unused(self) -> bool:
        """Faster than ``budget.min_use`` of the budget: rejected for leaving it unused."""
        return self.floor_ms is not None and self.latency_ms < self.floor_ms


class Budget:
    """The budget of one search process; see the module docstring."""

    def __init__(self, cfg, latency: LatencyModel, params_of: Callable[[ArchConfig], int], *,
                 budget_ms: float | None, study: optuna.Study | None = None,
                 teacher_ms: float | None = None):
        self.cfg, self.latency, self.params_of = cfg, latency, params_of
        self.budget_ms, self.study = budget_ms, study
        self.teacher_ms = teacher_ms  # the teacher's lowest plausible reading (resolve, tighten)
        self.floor: float | None = None  # budget.min_retention as a score (see resolve)
        self.readings: list[float] = []  # the teacher's plausible readings in this process

    # -- resolving and tightening
    @classmethod
    def resolve(cls, run, study: optuna.Study) -> Budget:
        """This process's budget. The first process on a study stores the teacher's figures;
        later ones keep the lowest plausible teacher reading seen (load only ever slows)."""
        attrs, b, lat = study.user_attrs, run.cfg.budget, run.latency
        first = "teacher_ms" not in attrs
        measure = first or b.speedup is not None or lat.source == "predicted"
        now = lat.meter.teacher_ms() if measure else attrs["teacher_ms"]
        stored, now, replaced = _reconcile(study.study_name, attrs.get("teacher_ms"), now,
                                           lat.teacher_predicted())
        teacher_ms = now if stored is None else min(now, stored)
        lat.calibrate(teacher_ms if b.speedup is not None else now)
        budget = cls(b, lat, run.params_of, budget_ms=_latency_budget(b, teacher_ms),
                     study=study, teacher_ms=teacher_ms)
        budget.readings = [x for x in (stored, now) if x is not None]
        budget.floor = floor_score(b.min_retention, run.teacher_dev, run.proxy.score_key)
        budget._check_reachable(run.space, teacher_ms)
        predicted = lat.teacher_predicted()
        if predicted is not None and abs(now / predicted - 1.0) > 0.15:
            log.warning(
                "the latency table predicts the teacher at %.2f ms, measured now at %.2f ms: "
                "predictions are scaled by %.3f; if this persists, re-profile "
                "(run_search.py profile --fresh)", predicted, now, now / predicted)
        if first:
            if predicted is not None:
                study.set_user_attr("teacher_predicted_ms", predicted)
            study.set_user_attr("teacher_dev", run.teacher_dev)
            study.set_user_attr("ranked_by", {"key": run.proxy.score_key,
                                              "name": run.proxy.score_name()})
            study.set_user_attr("warnings", list(run.warnings))
            study.set_user_attr("teacher_params", run.teacher_params)
            study.set_user_attr("space_size", run.space.size)
            study.set_user_attr("floor_score", budget.floor)
        if first or replaced:
            study.set_user_attr("teacher_ms", teacher_ms)
            study.set_user_attr("budget_ms", budget.budget_ms)
        else:
            budget._record(teacher_ms)
        return budget

    def tighten(self) -> None:
        """Measure the teacher again (a ``speedup`` budget only); a faster reading tightens,
        unless it is an outlier (see ``outlier``)."""
        if self.cfg.speedup is None:
            return
        reading = self.latency.meter.teacher_ms()
        predicted = self.latency.teacher_predicted()
        if outlier(reading, self.readings, predicted):
            log.warning("a teacher reading of %.2f ms is ignored: an outlier against the other "
                        "readings (median %.2f ms)%s", reading, statistics.median(self.readings),
                        "" if predicted is None else f" and the table's {predicted:.2f} ms")
            return
        self.readings.append(reading)
        teacher_ms = min(reading, self.study.user_attrs["teacher_ms"])
        self.teacher_ms = teacher_ms
        self.budget_ms = min(self.budget_ms, teacher_ms / self.cfg.speedup)
        self.latency.calibrate(teacher_ms)
        self._record(teacher_ms)

    def _record(self, teacher_ms: float) -> None:
        if self.study is not None and teacher_ms < self.study.user_attrs["teacher_ms"]:
            log.info("teacher measured faster (%.2f ms): speedup budget now %.2f ms",
                     teacher_ms, self.budget_ms)
            self.study.set_user_attr("teacher_ms", teacher_ms)
            self.study.set_user_attr("budget_ms", self.budget_ms)

    def _check_reachable(self, space, teacher_ms: float) -> None:
        b = self.cfg
        if self.budget_ms is not None:
            smallest = space.smallest()
            fast = self.latency.ms(smallest)
            if fast > self.budget_ms:
                which = " and ".join(f"budget.{k}={getattr(b, k)}"
                                     for k in ("speedup", "latency_ms") if getattr(b, k))
                raise UserError(
                    f"{which}: the fastest candidate of the space ({smallest.name}) takes "
                    f"{fast:.2f} ms at batch {b.batch_size}, seq_len {b.seq_len}, over the budget "
                    f"of {self.budget_ms:.2f} ms (teacher {teacher_ms:.2f} ms); relax the budget "
                    "or add smaller choices to space")
            if b.min_use is not None:
                self._check_usable(space, teacher_ms)
        if b.max_params is not None:
            p = min(self.params_of(a) for a in space.check_valid())
            if p > b.max_params:
                raise UserError(
                    f"budget.max_params={b.max_params}: the smallest candidate has {p} parameters;"
                    " raise it or add smaller choices (embedding_size shrinks the vocabulary matrix)")

    def _check_usable(self, space, teacher_ms: float) -> None:
        """``budget.min_use``: some candidate of the space lies between the floor and the
        budget by the latency table, or the search could train nothing (measuring every
        candidate to know, under ``budget.latency: measure``, would cost what the search does:
        there ``search.max_rejections`` ends a search that finds none)."""
        if self.latency.source != "predicted":
            return
        lo, hi = self.floor_ms, self.budget_ms
        if any(lo <= self.latency.ms(a) <= hi for a in space.check_valid()):
            return
        raise UserError(
            f"budget.min_use={self.cfg.min_use}: no candidate of the space is predicted between "
            f"{lo:.2f} and {hi:.2f} ms (teacher {teacher_ms:.2f} ms); lower budget.min_use or "
            "add choices to space")

    # -- checking
    def latency_of(self, arch: ArchConfig) -> tuple[float, str]:
        """The latency model's figure; a prediction within the guard band of the budget is
        replaced by a measurement."""
        ms = self.latency.ms(arch)
        if self.latency.source == "predicted" and self.budget_ms is not None and \
                abs(ms / self.budget_ms - 1.0) <= self.cfg.guard_band:
            return self.latency.meter.arch_ms(arch), "measured (guard band)"
        return ms, self.latency.source

    @property
    def floor_ms(self) -> float | None:
        """``budget.min_use`` in ms: candidates faster than this leave the budget unused."""
        if self.cfg.min_use is None or self.budget_ms is None:
            return None
        return self.cfg.min_use * self.budget_ms

    def violation(self, latency_ms: float, params: int, floor_on: float | None = None) -> float:
        """How far outside the budget, as a fraction of it (<= 0: fits): over the latency or
        parameter budget, or under ``budget.min_use`` of the latency budget (checked on
        ``floor_on``, the prediction, where given; by default on ``latency_ms``)."""
        out = [-1.0]
        if self.budget_ms is not None:
            out.append(latency_ms / self.budget_ms - 1.0)
            if self.cfg.min_use is not None:
                use = (latency_ms if floor_on is None else floor_on) / self.budget_ms
                out.append(self.cfg.min_use - use)
        if self.cfg.max_params is not None:
            out.append(params / self.cfg.max_params - 1.0)
        return max(out)

    def check(self, arch: ArchConfig) -> Verdict:
        t0 = time.perf_counter()
        ms, source = self.latency_of(arch)
        params = self.params_of(arch)
        return Verdict(ms, source, self.latency.raw(arch), self.latency.scale, self.budget_ms,
                       params, self.violation(ms, params), time.perf_counter() - t0,
                       self.floor_ms)

    @property
    def paired(self) -> bool:
        """A ``speedup`` budget with the teacher's figure known: ``confirm`` measures a candidate
        against the teacher, alternating, rather than against the reference (``arch_share``)."""
        return self.cfg.speedup is not None and self.teacher_ms is not None

    @property
    def confirms(self) -> bool:
        """Whether ``confirm`` measures anything ``check`` did not: under the latency table, or
        under a ``speedup`` budget (``paired``)."""
        return self.budget_ms is not None and (self.latency.source == "predicted" or self.paired)

    def confirm(self, arch: ArchConfig) -> Verdict:
        """``check`` for a candidate that may be shipped (a finalist, a derived architecture).

        - Under the latency table it is built and measured whatever its prediction. The table
          is as good as this machine's noise on held-out architectures, not on every one: at
          batch 32 the 4x@32 finalist search's pick ran 12% slower than predicted, 1% over its
          budget, outside the guard band.
        - Under a ``speedup`` budget the measurement is paired: the candidate's time over the
          teacher's, the two alternating call by call (``LatencyMeter.arch_share``), times
          the teacher's figure (``teacher_ms``), so the fit is ``share <= 1 / speedup``
          whichever teacher reading set the budget. Each measured against the small reference,
          the teacher read 215-355 ms at batch 32 here within sittings, and the same student
          3.97x-5.04x of it in four passes.
        - The floor (``budget.min_use``) stays on the prediction, as ``check`` has it.

        A paired measurement is 105 calls of each model (about 1 s at batch 1 and 25-40 s at
        batch 32, here) against minutes of training a finalist; the share is kept per
        architecture."""
        if not self.confirms:
            return self.check(arch)
        t0 = time.perf_counter()
        share = None
        if self.paired:
            share = self.latency.meter.arch_share(arch)
            ms, source = share * self.teacher_ms, "measured (finalist, paired)"
        else:
            ms, source = self.latency.meter.arch_ms(arch), "measured (finalist)"
        predicted = self.latency.ms(arch)
        params = self.params_of(arch)
        return Verdict(ms, source, self.latency.raw(arch), self.latency.scale, self.budget_ms,
                       params, self.violation(ms, params, floor_on=predicted),
                       time.perf_counter() - t0, self.floor_ms, share)


def floor_score(min_retention: float | None, teacher_dev: dict, key: str) -> float | None:
    """``budget.min_retention`` as a score under the search's objective ``key``: that fraction
    of the teacher's dev score (agreement: of 1.0, the teacher agreeing with itself)."""
    if min_retention is None:
        return None
    ref = 1.0 if key.endswith("agreement") else teacher_dev[key]
    if not ref > 0:
        raise UserError(f"budget.min_retention: the teacher's dev {key} is {ref:.4f}, so a "
                        "fraction of it is no floor; use proxy.objective: agreement, or a "
                        "latency/params budget instead")
    return min_retention * ref


def floor_violation(floor: float, score: float | None) -> float:
    """How far under the floor a score is, as a fraction of the floor (<= 0: meets it); an
    untrained candidate (no score) does not meet it."""
    if score is None:
        return 1.0
    return (floor - score) / floor


OUTLIER = 0.5  # a teacher reading under half of every reference is impossible, not fast


def outlier(reading: float, others: list[float], predicted: float | None) -> bool:
    """A teacher reading far below both the other readings (their median) and the latency
    table's prediction, where there are any: a measurement fault (this shared machine has slow
    spells of +50%, never the teacher at half its quiet time), not a new minimum."""
    refs = ([statistics.median(others)] if others else []) + \
        ([predicted] if predicted is not None else [])
    return bool(refs) and all(reading < OUTLIER * r for r in refs)


def _reconcile(name: str, stored: float | None, now: float,
               predicted: float | None) -> tuple[float | None, float, bool]:
    """The study's stored teacher figure against a fresh reading: ``(stored, now, replaced)``.
    An implausible stored figure is replaced (and said so), an implausible fresh one ignored;
    a stored figure much faster than the machine measures now is reported, and kept (the
    lowest reading counts)."""
    if stored is None or stored == now:
        return stored, now, False
    if outlier(stored, [now], predicted):
        log.warning("study %s: its teacher figure of %.2f ms is implausible against a fresh "
                    "measurement of %.2f ms%s: replaced by the fresh one", name, stored, now,
                    "" if predicted is None else f" and the table's {predicted:.2f} ms")
        return None, now, True
    if outlier(now, [stored], predicted):
        log.warning("a teacher reading of %.2f ms is ignored: an outlier against the study's "
                    "%.2f ms", now, stored)
        return stored, stored, False
    if now > 1.25 * stored:
        log.warning("the teacher measures %.2f ms now, the study's lowest reading is %.2f ms: "
                    "the budget keeps the stricter figure (is the machine busier than when the "
                    "study began?)", now, stored)
    return stored, now, False


def _latency_budget(b, teacher_ms: float) -> float | None:
    budgets = [x for x in (b.latency_ms, teacher_ms / b.speedup if b.speedup else None)
               if x is not None]
    return min(budgets) if budgets else None

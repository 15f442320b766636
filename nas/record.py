"""What a trial records: one status enum and one frozen record, written by every strategy
(Optuna's samplers, NNI's strategies, the differentiable search) and read by every reader
(``status``, ``export``, ``report``, ``distill --from``, the benchmarks).

A record lives in the trial's Optuna ``user_attrs``, one key per field (the keys studies made
before this module already used), so any Optuna tool (the dashboard, ``study.trials_dataframe``)
shows it too. ``write`` stores the fields that are set; ``read`` is the one way back, with one
set of defaults. A trial is written in stages (who runs it and what it is; then its budget
check; then its result), so a record read from a running trial has only the first stages.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import socket
from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial, TrialState

from tacnas.searchspace.arch import ArchConfig

WORKER = f"{socket.gethostname()}:{os.getpid()}"  # which process ran a trial


class TrialStatus(str, enum.Enum):
    """What became of a candidate (stored as the plain string)."""

    TRAINED = "trained"  # within budget, trained by the proxy, scored
    PRUNED = "pruned"  # within budget, training stopped early by the pruner
    OVER_BUDGET = "over_budget"  # checked (latency, params) and rejected, never trained
    UNUSED = "unused_budget"  # faster than budget.min_use of the budget: rejected, never trained
    INVALID = "invalid"  # the sampled combination is not an architecture
    DUPLICATE = "duplicate"  # the architecture was already checked or trained: reused
    DIVERGED = "diverged"  # within budget, but its training diverged (non-finite): Optuna FAIL

    @property
    def counts(self) -> bool:
        """Toward ``search.n_trials`` (a trained candidate, pruned or not)."""
        return self in (TrialStatus.TRAINED, TrialStatus.PRUNED)


@dataclass(frozen=True)
class TrialRecord:
    worker: str | None = None
    strategy: str | None = None  # None: an Optuna sampler; "differentiable"; "nni-..."
    status: TrialStatus | None = None  # None while the trial runs
    reason: str | None = None  # why it is invalid, or why its training failed
    arch: ArchConfig | None = None
    # the budget check
    latency_ms: float | None = None  # what the check used (calibrated prediction or measured)
    latency_source: str | None = None  # predicted | measured | measured (guard band | finalist)
    predicted_ms: float | None = None  # the latency table's raw prediction
    latency_scale: float | None = None  # the calibration applied to it
    budget_ms: float | None = None  # the latency budget it was checked against
    params: int | None = None
    budget_check_s: float | None = None
    # the result
    score: float | None = None  # the proxy's objective (dev task.metric, or agreement with the
    # teacher: study user attr ranked_by) where the candidate is deployed
    score_se: float | None = None  # its standard error on the split it was scored on
    fp32_score: float | None = None  # onnxruntime-int8: the fp32 model's (score is int8's)
    metrics: dict | None = None
    curve: list | None = None  # [(step, dev score)]
    train_seconds: float | None = None
    duplicate_of: int | None = None
    extra: dict = field(default_factory=dict)  # strategy-specific (the differentiable search's)

    @property
    def arch_name(self) -> str | None:
        return None if self.arch is None else self.arch.name

    @property
    def trained(self) -> bool:
        return self.status is TrialStatus.TRAINED

    @property
    def counts(self) -> bool:
        """Toward ``search.n_trials`` (see ``TrialStatus.counts``); a running trial does not."""
        return self.status is not None and self.status.counts

    # ----------------------------------------------------------------------------- storage

    def attrs(self) -> dict:
        """The user attrs this record stores (unset fields are left out)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "extra":
                out.update(v)
            elif v is None:
                continue
            elif f.name == "arch":
                out["arch"], out["arch_name"] = v.to_dict(), v.name
            elif f.name == "status":
                out["status"] = v.value
            else:
                out[f.name] = v
        return out

    def write(self, trial: optuna.Trial, *only: str) -> None:
        """Store every set field, or only the fields named in ``only``."""
        attrs = self.attrs()
        if only:
            keys = set(only) | ({"arch_name"} if "arch" in only else set())
            attrs = {k: v for k, v in attrs.items() if k in keys}
        for k, v in attrs.items():
            trial.set_user_attr(k, v)

    @classmethod
    def read(cls, trial: FrozenTrial) -> TrialRecord:
        a = dict(trial.user_attrs)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: a.pop(k) for k in list(a) if k in known}
        a.pop("arch_name", None)
        if "arch" in values:
            values["arch"] = ArchConfig.from_dict(values["arch"])
        if "status" in values:
            values["status"] = TrialStatus(values["status"])
        return cls(**values, extra=a)


def read(trial: FrozenTrial) -> TrialRecord:
    return TrialRecord.read(trial)


def records(study: optuna.Study, *states: TrialState) -> list[tuple[FrozenTrial, TrialRecord]]:
    trials = study.get_trials(deepcopy=False, states=states or None)
    return [(t, TrialRecord.read(t)) for t in trials]

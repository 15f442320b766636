"""The Optuna search: storage, study create/load/resume, sampler, budget constraint, pruner.

Every trial's params are the space's choices, so ``FixedTrial(trial.params)`` rebuilds its
architecture. A candidate over budget is measured (milliseconds), recorded with its latency and
a positive ``budget`` constraint (``trial.set_constraint``, which Optuna 5's TPE and NSGA-II
samplers read), and never trained. ``n_trials`` counts trained candidates across every process
on the study; rejected, invalid and duplicate candidates do not count.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from tacnas.errors import UserError
from tacnas.evaluators.latency_model import teacher_arch
from tacnas.evaluators.metrics import WORST
from tacnas.evaluators.proxy import Stopped
from tacnas.nas.config import RunConfig, config_from_dict
from tacnas.nas.pipeline import Run
from tacnas.searchspace.arch import ArchConfig, InvalidArch

log = logging.getLogger(__name__)

TRAINED = ("trained", "pruned")  # statuses that count toward n_trials
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # which process ran a trial


# ------------------------------------------------------------------------------ storage, study


def run_folder(run_dir: str | Path, study: str) -> Path:
    """``runs/<study>/``: study.db (the default storage), config.yaml, checkpoints/, exports/."""
    return Path(run_dir).absolute() / study


def checkpoint_dir(run_dir: str | Path, study: str, number: int) -> Path:
    return run_folder(run_dir, study) / "checkpoints" / f"trial_{number}"


def default_storage(run_dir: str | Path, study: str) -> str:
    path = run_folder(run_dir, study) / "study.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_storage(url: str, *, heartbeat_interval: int = 10, grace_period: int = 30):
    """An RDB URL (sqlite:///, postgresql://, mysql://) or ``journal:///path/to/file.log``."""
    retry = RetryHeartbeatStaleTrialCallback(max_retry=3)
    try:
        if url.startswith("journal://"):
            path = url[len("journal://"):]
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(path))
        kwargs = {}
        if url.startswith("sqlite"):
            kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
        return RDBStorage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                          heartbeat_stale_trial_callback=retry, **kwargs)
    except Exception as e:
        raise UserError(
            f"--storage {url}: cannot open ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "use sqlite:///path.db, postgresql://user@host/db or journal:///path.log"
        ) from None


def is_multi_objective(cfg: RunConfig) -> bool:
    return cfg.search.sampler == "nsga2" or cfg.search.multi_objective


def _directions(cfg: RunConfig) -> list[str]:
    return ["maximize", "minimize"] if is_multi_objective(cfg) else ["maximize"]


def make_sampler(cfg: RunConfig, *, offset: int = 0):
    """``offset`` (the number of trials already in the study) keeps a resumed sampler from
    replaying the first process's random draws."""
    seed = cfg.seed + offset
    s = cfg.search
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                      n_startup_trials=s.n_startup_trials)


def make_pruner(cfg: RunConfig):
    s, p = cfg.search, cfg.proxy
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s.n_startup_trials)
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, p.eval_every), max_resource=p.steps)
    return optuna.pruners.NopPruner()


_IGNORED_FOR_MATCH = {("search", "n_trials"), ("search", "timeout"), ("distill",)}


def _differences(a: dict, b: dict, prefix=()) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if (*prefix, k) in _IGNORED_FOR_MATCH:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, (*prefix, k))
        elif va != vb:
            out.append(".".join((*prefix, k)))
    return out


def _summary(storage, name: str):
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if s.study_name == name:
            return s
    return None


def _open_for(url: str, cfg: RunConfig):
    return open_storage(url, heartbeat_interval=cfg.search.heartbeat_interval,
                        grace_period=cfg.search.grace_period)


def _load(name: str, storage, cfg: RunConfig, n_trials: int) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage,
                             sampler=make_sampler(cfg, offset=n_trials), pruner=make_pruner(cfg))


def load_study(name: str, storage_url: str) -> optuna.Study:
    """Load an existing study (for resume/status/export), with a sampler rebuilt from its config."""
    summary = _summary(open_storage(storage_url), name)
    if summary is None:
        raise UserError(
            f"--study {name}: no such study in {storage_url}; run `search` first or check --storage"
        )
    cfg = stored_config(summary.user_attrs, name)
    return _load(name, _open_for(storage_url, cfg), cfg, summary.n_trials)


def stored_config(user_attrs: dict, name: str) -> RunConfig:
    if "config" not in user_attrs:
        raise UserError(f"--study {name}: this study was not made by tacnas (no stored config)")
    return config_from_dict(user_attrs["config"], source=f"study {name}")


def create_or_load(name: str, storage_url: str, cfg: RunConfig) -> optuna.Study:
    """A new study, or the existing one with the same config (many workers share one study)."""
    storage = _open_for(storage_url, cfg)
    summary = _summary(storage, name)
    deadline = time.monotonic() + 60
    while summary is not None and "config" not in summary.user_attrs \
            and time.monotonic() < deadline:  # another worker is creating it right now
        time.sleep(0.5)
        summary = _summary(storage, name)
    if summary is not None:
        # through today's config class, so a setting added since (at its default) is no change
        diff = _differences(stored_config(summary.user_attrs, name).to_dict(), cfg.to_dict())
        if diff:
            raise UserError(
                f"--study {name}: exists in {storage_url} with a different config (differs at "
                f"{', '.join(diff[:5])}); use `resume --study {name}` or a new --study name"
            )
        return _load(name, storage, cfg, summary.n_trials)
    study = optuna.create_study(
        study_name=name, storage=storage, directions=_directions(cfg),
        sampler=make_sampler(cfg), pruner=make_pruner(cfg), load_if_exists=True,
    )
    study.set_user_attr("config", cfg.to_dict())
    return study


# --------------------------------------------------------------------------------- the search


def trained_count(study: optuna.Study) -> int:
    return sum(
        1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if t.user_attrs.get("status") in TRAINED
    )


def _finished_same_arch(study: optuna.Study, name: str, number: int) -> FrozenTrial | None:
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.number != number and t.user_attrs.get("arch_name") == name and \
                t.user_attrs.get("status") in ("trained", "over_budget"):
            return t
    return None


class Objective:
    """One trial: sample, check the budget (cheap), then train only a feasible candidate."""

    def __init__(self, run: Run, study: optuna.Study, *, budget_ms: float | None):
        self.run, self.study, self.budget_ms = run, study, budget_ms
        self.cfg = run.cfg
        self.multi = len(study.directions) > 1
        self.worst = WORST[self.cfg.task.metric]

    def refresh_budget(self) -> None:
        """Measure the teacher again (a ``speedup`` budget only). A slow spell of this shared
        machine during one teacher measurement would loosen the budget, the unsafe direction;
        the lowest figure seen only ever tightens it."""
        speedup = self.cfg.budget.speedup
        if speedup is None:
            return
        teacher_ms = min(self.run.meter.teacher_ms(), self.study.user_attrs["teacher_ms"])
        self.budget_ms = min(self.budget_ms, teacher_ms / speedup)
        calibrate(self.run, teacher_ms)
        _record_teacher(self.study, teacher_ms, self.budget_ms)

    def _wait_for_same_in_flight(self, name: str, number: int) -> FrozenTrial | None:
        """A finished trial of this architecture, if any. If an earlier trial (another worker's)
        is running the same architecture right now, wait for it rather than train it twice;
        a running trial whose worker died is failed here (heartbeat) and no longer waited for."""
        heartbeat = bool(getattr(self.study._storage, "heartbeat_interval", None))
        deadline = None
        if not heartbeat:  # a journal: a dead worker's trial never ends, so wait boundedly
            seconds = [t.user_attrs.get("train_seconds", 0.0)
                       for t in self.study.get_trials(deepcopy=False)]
            deadline = time.monotonic() + 60 + 2 * max([300.0, *seconds])
        while True:
            same = _finished_same_arch(self.study, name, number)
            if same is not None:
                return same
            if deadline is not None and time.monotonic() > deadline:
                return None
            running = [t for t in self.study.get_trials(deepcopy=False,
                                                         states=(TrialState.RUNNING,))
                       if t.number < number and t.user_attrs.get("arch_name") == name]
            if not running:
                return None
            log.info("trial %d: %s is being run by trial %d; waiting for its result",
                     number, name, running[0].number)
            time.sleep(2.0)
            optuna.storages.fail_stale_trials(self.study)

    def latency(self, arch: ArchConfig) -> tuple[float, str]:
        """The table's prediction; a candidate predicted within the guard band of the budget
        (where the table's error could flip the decision) is measured directly instead."""
        ms, source = self.run.latency_of(arch)
        band = self.cfg.budget.guard_band
        if source == "predicted" and self.budget_ms is not None and \
                abs(ms / self.budget_ms - 1.0) <= band:
            return self.run.meter.arch_ms(arch), "measured (guard band)"
        return ms, source

    def _values(self, score: float, latency_ms: float):
        return (score, latency_ms) if self.multi else score

    def __call__(self, trial: optuna.Trial):
        trial.set_user_attr("worker", WORKER)
        try:
            arch = self.run.space.sample(trial)
        except InvalidArch as e:
            trial.set_user_attr("status", "invalid")
            trial.set_user_attr("reason", str(e))
            trial.set_constraint("budget", 1.0)
            return self._values(self.worst, math.inf)
        trial.set_user_attr("arch", arch.to_dict())
        trial.set_user_attr("arch_name", arch.name)

        same = self._wait_for_same_in_flight(arch.name, trial.number)
        if same is not None:  # another trial (or worker) did this one: reuse, never retrain
            for k in ("latency_ms", "latency_source", "predicted_ms", "params", "score",
                      "metrics"):
                if k in same.user_attrs:
                    trial.set_user_attr(k, same.user_attrs[k])
            trial.set_user_attr("status", "duplicate")
            trial.set_user_attr("duplicate_of", same.number)
            for k, v in same.constraints.items():
                trial.set_constraint(k, v)
            return tuple(same.values) if self.multi else same.value

        t0 = time.perf_counter()
        latency, source = self.latency(arch)
        params = self.run.params_of(arch)
        check_s = time.perf_counter() - t0  # the check itself, not the storage writes
        trial.set_user_attr("latency_ms", latency)
        trial.set_user_attr("latency_source", source)
        if self.run.table is not None:
            trial.set_user_attr("predicted_ms", self.run.table.predict_ms(arch))
            trial.set_user_attr("latency_scale", self.run.latency_scale)
        trial.set_user_attr("budget_ms", self.budget_ms)
        trial.set_user_attr("params", params)
        trial.set_user_attr("budget_check_s", check_s)
        violation = max(self._violations(latency, params))
        trial.set_constraint("budget", violation)
        if violation > 0:
            trial.set_user_attr("status", "over_budget")
            return self._values(self.worst, latency)

        def report(step: int, score: float) -> bool:
            if self.multi:
                return False
            trial.report(score, step)
            return trial.should_prune()

        try:
            result, model = self.run.proxy.evaluate(arch, report=report, progress=self.run.progress)
        except Stopped as s:
            trial.set_user_attr("status", "pruned")
            trial.set_user_attr("score", s.score)
            raise optuna.TrialPruned(str(s)) from None
        model.save_pretrained(checkpoint_dir(self.cfg.run_dir, self.study.study_name, trial.number))
        trial.set_user_attr("status", "trained")
        trial.set_user_attr("score", result.score)
        trial.set_user_attr("metrics", result.metrics)
        trial.set_user_attr("curve", result.curve)
        trial.set_user_attr("train_seconds", result.train_seconds)
        return self._values(result.score, latency)

    def _violations(self, latency: float, params: int) -> list[float]:
        out = [-1.0]
        if self.budget_ms is not None:
            out.append(latency / self.budget_ms - 1.0)
        if self.cfg.budget.max_params is not None:
            out.append(params / self.cfg.budget.max_params - 1.0)
        return out


def resolve_budget(run: Run, study: optuna.Study) -> float | None:
    """The latency budget in ms for this process. ``latency_ms`` is fixed. ``speedup`` is over the
    teacher measured in this run (by the same latency worker as the candidates, so both see the
    same machine state); the study keeps the first process's figures for display."""
    attrs = study.user_attrs
    b = run.cfg.budget
    first = "teacher_ms" not in attrs
    table = getattr(run, "table", None)
    measure = first or b.speedup is not None or table is not None
    now = run.meter.teacher_ms() if measure else attrs["teacher_ms"]
    teacher_ms = now if first else min(now, attrs["teacher_ms"])  # load only ever slows
    if table is not None:
        calibrate(run, teacher_ms if b.speedup is not None else now)
    budgets = [x for x in (b.latency_ms, teacher_ms / b.speedup if b.speedup else None)
               if x is not None]
    budget = min(budgets) if budgets else None
    if budget is not None:
        smallest = run.space.smallest()
        fast, _ = run.latency_of(smallest)
        if fast > budget:
            which = " and ".join(
                f"budget.{k}={getattr(b, k)}" for k in ("speedup", "latency_ms") if getattr(b, k))
            raise UserError(
                f"{which}: the fastest candidate of the space ({smallest.name}) takes {fast:.2f} ms"
                f" at batch {b.batch_size}, seq_len {b.seq_len}, over the budget of {budget:.2f} ms"
                f" (teacher {teacher_ms:.2f} ms); relax the budget or add smaller choices to space"
            )
    if b.max_params is not None:
        p = min(run.params_of(a) for a in run.space.all_archs())
        if p > b.max_params:
            raise UserError(
                f"budget.max_params={b.max_params}: the smallest candidate has {p} parameters; "
                "raise it or add smaller choices (embedding_size shrinks the vocabulary matrix)"
            )
    if table is not None:
        predicted = table.predict_ms(teacher_arch(run.meter.teacher_config))
        if abs(now / predicted - 1.0) > 0.15:
            log.warning(
                "the latency table predicts the teacher at %.2f ms, measured now at %.2f ms: "
                "predictions are scaled by %.3f; if this persists, re-profile "
                "(run_search.py profile --fresh)", predicted, now, now / predicted)
        if first:
            study.set_user_attr("teacher_predicted_ms", predicted)
    if first:
        study.set_user_attr("teacher_ms", teacher_ms)
        study.set_user_attr("budget_ms", budget)
        study.set_user_attr("teacher_dev", run.teacher_dev)
        study.set_user_attr("teacher_params", run.teacher_params)
        study.set_user_attr("space_size", run.space.size)
    else:
        _record_teacher(study, teacher_ms, budget)
    return budget


def calibrate(run: Run, teacher_ms: float) -> None:
    """Scale the table's predictions by the teacher measured now over the teacher predicted.
    With a ``speedup`` budget the check becomes table-internal (candidate predicted against
    teacher predicted / speedup), whatever state the machine was in while profiling; with
    ``latency_ms`` it follows this machine's current speed."""
    if run.table is not None:
        run.latency_scale = teacher_ms / run.table.predict_ms(teacher_arch(run.meter.teacher_config))


def _record_teacher(study: optuna.Study, teacher_ms: float, budget_ms: float | None) -> None:
    if teacher_ms < study.user_attrs["teacher_ms"]:
        log.info("teacher measured faster (%.2f ms): speedup budget now %.2f ms",
                 teacher_ms, budget_ms)
        study.set_user_attr("teacher_ms", teacher_ms)
        study.set_user_attr("budget_ms", budget_ms)


def run_search(run: Run, study: optuna.Study, *, n_trials: int | None,
               timeout: float | None, driver=None) -> dict:
    """Run trials until the study holds ``n_trials`` trained candidates (or ``timeout``).

    ``driver(objective, callback, timeout, stopped)`` replaces Optuna's own loop where another
    library proposes the candidates (``nas.nni_search``); every trial still goes through
    ``objective`` and ``callback`` inside ``study.optimize``, so budget checks, reuse of trained
    architectures, checkpoints and the stopping rules are the same."""
    budget_ms = resolve_budget(run, study)
    if hasattr(run.proxy, "supernet"):  # proxy.kind: supernet: trained once, before the trials
        run.proxy.supernet(progress=run.progress)
    if n_trials is not None:
        study.set_user_attr("n_trials", n_trials)
    target = study.user_attrs.get("n_trials")
    objective = Objective(run, study, budget_ms=budget_ms)
    done = trained_count(study)
    streak = {"untrained": 0, "exhausted": False, "stop": False}
    bar = tqdm(total=target, initial=done, desc=f"search {study.study_name}", unit="trained",
               disable=not run.progress)

    def after(study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.user_attrs.get("status") in TRAINED:
            objective.refresh_budget()
            streak["untrained"] = 0
            bar.update(1)
            bar.set_postfix(best=_best_text(study))
        else:
            streak["untrained"] += 1
        if target is not None and trained_count(study) >= target:
            streak["stop"] = True
            study.stop()
        if streak["untrained"] >= run.cfg.search.max_rejections:
            streak["exhausted"] = streak["stop"] = True
            study.stop()

    try:
        if target is None or done < target:
            if driver is None:
                study.optimize(objective, n_trials=None, timeout=timeout, callbacks=[after],
                               gc_after_trial=True)
            else:
                driver(objective, after, timeout, lambda: streak["stop"])
    finally:
        bar.close()
        run.meter.close()
    budget_ms = objective.budget_ms
    summary = {"trained": trained_count(study), "target": target,
               "exhausted": streak["exhausted"], "budget_ms": budget_ms}
    if streak["exhausted"]:
        log.warning(
            "stopped after %d candidates in a row were over budget, invalid or already trained: "
            "the feasible part of the space may be exhausted (%d trained)",
            run.cfg.search.max_rejections, summary["trained"],
        )
    if not any(t.user_attrs.get("status") == "trained" for t in study.get_trials(deepcopy=False)):
        raise UserError(
            f"budget: no candidate met the budget of {budget_ms:.2f} ms in "
            f"{len(study.trials)} tries; relax the budget or add smaller choices to space"
        )
    return summary


def _best_text(study: optuna.Study) -> str:
    best = best_trials(study)
    return f"{max(t.user_attrs['score'] for t in best):.4f}" if best else "-"


def feasible_trained(study: optuna.Study) -> list[FrozenTrial]:
    """Trained trials within every budget, including the study's final latency budget (which
    can only have tightened since a trial was checked)."""
    budget_ms = study.user_attrs.get("budget_ms")
    return [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("status") == "trained" and all(v <= 0 for v in t.constraints.values())
        and (budget_ms is None or t.user_attrs["latency_ms"] <= budget_ms)
    ]


def pareto_front(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The non-dominated trials over (score up, latency down), fastest first."""
    def key(t):
        return t.user_attrs["score"], t.user_attrs["latency_ms"]

    def dominates(a: FrozenTrial, b: FrozenTrial) -> bool:
        (sa, la), (sb, lb) = key(a), key(b)
        return sa >= sb and la <= lb and (sa > sb or la < lb)

    front = [t for t in trials if not any(dominates(o, t) for o in trials)]
    return sorted(front, key=lambda t: t.user_attrs["latency_ms"])


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best feasible trained trial (single objective), or the feasible trained Pareto front
    over (score up, latency down) for a multi-objective study."""
    done = feasible_trained(study)
    if not done:
        return []
    if len(study.directions) == 1:
        return [max(done, key=lambda t: (t.value, -t.number))]
    return pareto_front(done)


def arch_of(trial: FrozenTrial) -> ArchConfig:
    return ArchConfig.from_dict(trial.user_attrs["arch"])

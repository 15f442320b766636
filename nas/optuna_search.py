"""The Optuna search: each trial samples a candidate, checks it against the budget, and trains
only a feasible one.

A candidate over budget (or under ``budget.min_use`` of it) is checked in milliseconds,
recorded with its latency and a positive ``budget`` constraint (``trial.set_constraint``, which
Optuna 5's TPE and NSGA-II samplers read), and never trained. An architecture already checked or trained (by this or another worker) is
reused, never trained twice. ``run_search`` runs trials until the study holds ``n_trials``
trained candidates; another library's strategy (NNI) can propose them instead of the sampler.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import optuna
from filelock import FileLock
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from tacnas.errors import UserError
from tacnas.evaluators.checkpoint import read_state
from tacnas.evaluators.metrics import se_key, worst
from tacnas.evaluators.proxy import Stopped
from tacnas.evaluators.training import Diverged, check_finite
from tacnas.nas.budget import Budget, floor_violation
from tacnas.nas.pipeline import Run
from tacnas.nas.record import WORKER, TrialRecord, TrialStatus
from tacnas.nas.study import (
    best_trials,
    checkpoint_dir,
    feasible_trained,
    finished_same_arch,
    floor_unmet,
    min_retention,
    rescored,
    rescored_under,
    run_folder,
    trained_count,
)
from tacnas.searchspace.arch import InvalidArch

log = logging.getLogger(__name__)

GIVE_UP_DIVERGED = 3  # candidates diverged before any trained: the recipe, not the candidates


class Objective:
    """Sample, check the budget (without training), then train only a feasible candidate."""

    def __init__(self, run: Run, study: optuna.Study, budget: Budget):
        self.run, self.study, self.budget = run, study, budget
        self.multi = len(study.directions) > 1
        self.floor = run.cfg.budget.min_retention is not None  # the latency ranks, a floor holds
        self.worst = worst(run.cfg)

    def _values(self, score: float, latency_ms: float):
        if self.multi:
            return (score, latency_ms)
        return latency_ms if self.floor else score

    def _floor(self, trial: optuna.Trial, score: float | None) -> None:
        """The ``min_retention`` constraint (under an accuracy floor only): an untrained
        candidate does not meet it."""
        if self.floor:
            trial.set_constraint("min_retention", floor_violation(self.budget.floor, score))

    def __call__(self, trial: optuna.Trial):
        """The trial's values. A trial that trained a candidate is followed by a garbage
        collection (what Optuna's ``gc_after_trial`` does after every trial): not one rejected
        without training, as most are under a tight budget (0.5 s each in a process holding
        torch and transformers)."""
        self._trained = False
        try:
            return self._objective(trial)
        finally:
            if self._trained:
                gc.collect()

    def _objective(self, trial: optuna.Trial):
        rec = TrialRecord(worker=WORKER)
        rec.write(trial)
        try:
            arch = self.run.space.sample(trial)
        except InvalidArch as e:
            dataclasses.replace(rec, status=TrialStatus.INVALID, reason=str(e)).write(
                trial, "status", "reason")
            trial.set_constraint("budget", 1.0)
            self._floor(trial, None)
            return self._values(self.worst, math.inf)
        rec = dataclasses.replace(rec, arch=arch)
        rec.write(trial, "arch")

        same = self._wait_for_same_in_flight(arch.name, trial.number)
        if same is not None:  # another trial (or worker) did this one: reuse, never retrain
            return self._reuse(trial, rec, same)

        v = self.budget.check(arch)
        rec = dataclasses.replace(
            rec, latency_ms=v.latency_ms, latency_source=v.source, predicted_ms=v.predicted_ms,
            latency_scale=v.latency_scale, budget_ms=v.budget_ms, params=v.params,
            budget_check_s=v.seconds)
        rec.write(trial, "latency_ms", "latency_source", "predicted_ms", "latency_scale",
                  "budget_ms", "params", "budget_check_s")
        trial.set_constraint("budget", v.violation)
        if not v.fits:
            self._floor(trial, None)
            status = TrialStatus.UNUSED if v.unused else TrialStatus.OVER_BUDGET
            dataclasses.replace(rec, status=status).write(trial, "status")
            return self._values(self.worst, v.latency_ms)

        def report(step: int, score: float) -> bool:
            if self.multi:
                return False
            trial.report(score, step)
            return trial.should_prune()

        self._trained = True
        try:
            result, model = self.run.proxy.evaluate(arch, report=report, progress=self.run.progress)
        except Stopped as s:
            dataclasses.replace(rec, status=TrialStatus.PRUNED, score=s.score).write(
                trial, "status", "score")
            raise optuna.TrialPruned(str(s)) from None
        except Diverged as e:  # the trial FAILs (a NaN value), the study goes on
            dataclasses.replace(rec, status=TrialStatus.DIVERGED, reason=str(e)).write(
                trial, "status", "reason")
            log.warning("trial %d (%s) failed: %s", trial.number, arch.name, e)
            return self._values(math.nan, v.latency_ms)
        model.save_pretrained(checkpoint_dir(self.run.cfg.run_dir, self.study.study_name,
                                             trial.number))
        fp32, key = result.fp32_metrics, self.run.proxy.score_key
        dataclasses.replace(
            rec, status=TrialStatus.TRAINED, score=result.score,
            score_se=result.metrics.get(se_key(key)), metrics=result.metrics,
            curve=result.curve, train_seconds=result.train_seconds,
            fp32_score=None if fp32 is None else fp32[key],
        ).write(trial, "status", "score", "score_se", "metrics", "curve", "train_seconds",
                "fp32_score")
        self._floor(trial, result.score)
        return self._values(result.score, v.latency_ms)

    def _reuse(self, trial: optuna.Trial, rec: TrialRecord, same: FrozenTrial):
        done = TrialRecord.read(same)
        if done.status is TrialStatus.DIVERGED:  # it would diverge again: fail without training
            dataclasses.replace(rec, status=TrialStatus.DIVERGED, duplicate_of=same.number,
                                reason=done.reason, latency_ms=done.latency_ms).write(trial)
            return self._values(math.nan, done.latency_ms)
        dataclasses.replace(
            rec, status=TrialStatus.DUPLICATE, duplicate_of=same.number,
            latency_ms=done.latency_ms, latency_source=done.latency_source,
            predicted_ms=done.predicted_ms, params=done.params, score=done.score,
            score_se=done.score_se, metrics=done.metrics,
        ).write(trial, "status", "duplicate_of", "latency_ms", "latency_source", "predicted_ms",
                "params", "score", "score_se", "metrics")
        for k, v in same.constraints.items():
            trial.set_constraint(k, v)
        return tuple(same.values) if self.multi else same.value

    def _wait_for_same_in_flight(self, name: str, number: int) -> FrozenTrial | None:
        """A finished trial of this architecture, if any. If an earlier trial (another worker's)
        is running the same architecture right now, wait for it rather than train it twice;
        a running trial whose worker died is failed here (heartbeat) and no longer waited for."""
        heartbeat = bool(getattr(self.study._storage, "heartbeat_interval", None))
        deadline = None
        if not heartbeat:  # a journal: a dead worker's trial never ends, so wait boundedly
            seconds = [TrialRecord.read(t).train_seconds or 0.0
                       for t in self.study.get_trials(deepcopy=False)]
            deadline = time.monotonic() + 60 + 2 * max([300.0, *seconds])
        while True:
            same = finished_same_arch(self.study, name, number)
            if same is not None:
                return same
            if deadline is not None and time.monotonic() > deadline:
                return None
            running = [t for t in self.study.get_trials(deepcopy=False,
                                                         states=(TrialState.RUNNING,))
                       if t.number < number and TrialRecord.read(t).arch_name == name]
            if not running:
                return None
            log.info("trial %d: %s is being run by trial %d; waiting for its result",
                     number, name, running[0].number)
            time.sleep(2.0)
            optuna.storages.fail_stale_trials(self.study)


def run_search(run: Run, study: optuna.Study, *, n_trials: int | None,
               timeout: float | None, driver=None) -> dict:
    """Run trials until the study holds ``n_trials`` trained candidates (or ``timeout``).

    ``driver(objective, callback, timeout, stopped)`` replaces Optuna's own loop where another
    library proposes the candidates (``nas/nni_search.py``); every trial still goes through
    ``objective`` and ``callback`` inside ``study.optimize``, so budget checks, reuse of trained
    architectures, checkpoints and the stopping rules are the same."""
    budget = Budget.resolve(run, study)
    run.proxy.prepare(progress=run.progress)  # proxy.kind: supernet trains it once, here
    if n_trials is not None:
        study.set_user_attr("n_trials", n_trials)
    target = study.user_attrs.get("n_trials")
    objective = Objective(run, study, budget)
    done = trained_count(study)
    streak = {"untrained": 0, "diverged": 0, "exhausted": False, "stop": False}
    bar = tqdm(total=target, initial=done, desc=f"search {study.study_name}", unit="trained",
               disable=not run.progress)

    def after(study: optuna.Study, trial: FrozenTrial) -> None:
        record = TrialRecord.read(trial)
        status = record.status
        if status is TrialStatus.DIVERGED:
            streak["diverged"] += 1
            if streak["diverged"] >= GIVE_UP_DIVERGED and trained_count(study) == 0:
                streak["stop"] = True  # the recipe diverges for every candidate: say so now
                study.stop()
        if record.counts:
            budget.tighten()
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
                study.optimize(objective, n_trials=None, timeout=timeout, callbacks=[after])
            else:
                driver(objective, after, timeout, lambda: streak["stop"])
    finally:
        bar.close()
        run.meter.close()
    summary = {"trained": trained_count(study), "target": target,
               "exhausted": streak["exhausted"], "budget_ms": budget.budget_ms}
    if streak["exhausted"]:
        log.warning(
            "stopped after %d candidates in a row were outside the budget, invalid or already "
            "trained: "
            "the feasible part of the space may be exhausted (%d trained)",
            run.cfg.search.max_rejections, summary["trained"],
        )
    records = [TrialRecord.read(t) for t in study.get_trials(deepcopy=False)]
    diverged = [r for r in records if r.status is TrialStatus.DIVERGED]
    if not any(r.trained for r in records) and diverged:
        raise UserError(f"{diverged[0].reason} (every candidate trained so far diverged: "
                        f"{len(diverged)})")
    if not any(r.trained for r in records):
        within = (f"the budget of {budget.budget_ms:.2f} ms" if budget.budget_ms is not None
                  else "budget.max_params")
        raise UserError(
            f"budget: no candidate met {within} in "
            f"{len(study.trials)} tries; relax the budget or add smaller choices to space"
        )
    if (unmet := floor_unmet(study)) is not None:
        raise UserError(unmet)
    if run.cfg.search.rescore_top_k:
        summary["rescored"] = rescore(run, study, run.cfg.search.rescore_top_k,
                                      run.cfg.search.rescore_steps, budget)
        run.meter.close()
    return summary


def rescore_setting(cfg) -> dict:
    """What a re-score depends on: a study re-scored under another setting starts over."""
    s = cfg.search
    how = ({"recipe": "proxy", "steps": s.rescore_steps} if s.rescore_recipe == "proxy"
           else {"recipe": "distill", "distill": dataclasses.asdict(cfg.distill)})
    prune = {"prune": s.rescore_prune} if s.rescore_prune is not None else {}
    return {**how, "objective": s.rescore_objective, **prune}


def rescore(run: Run, study: optuna.Study, k: int, steps: int, budget: Budget,
            among: list | None = None) -> dict[int, float | None]:
    """Multi-fidelity (``search.rescore_top_k``): the ``k`` best feasible trials by the proxy
    are trained again, by the distillation proxy for ``steps`` KD steps or by the ``distill``
    recipe in full (``search.rescore_recipe``), and ``best_trial`` then picks by that longer
    run's ``search.rescore_objective``. Each score is stored in the study as it is done (study
    user attribute ``rescored``), so a resumed or repeated search re-scores only what is new;
    a finalist's full training resumes from its checkpoint. ``among``: these trials (those of
    them feasible) instead of the top ``k`` (the differentiable search's most likely). A
    finalist may be shipped: it is measured before it is trained (``Budget.confirm``: paired
    with the teacher under a ``speedup`` budget, else where the latency table let it in), and
    one over the budget as measured gives its place to the next (``_measured_top``)."""
    setting = rescore_setting(run.cfg)
    scores = {str(n): v for n, v in rescored(study).items()}
    if scores and (before := rescored_under(study)) != setting:
        log.warning("search.rescore_*: the study was re-scored under %s; re-scoring its top %d "
                    "under %s", before, k, setting)
        scores = {}
    feasible = feasible_trained(study)
    if among is not None:
        numbers = {t.number for t in among}
        feasible = [t for t in feasible if t.number in numbers]
    top = _measured_top(study, budget, sorted(feasible, key=lambda t: (-t.value, t.number)), k)
    by_arch = {TrialRecord.read(t).arch_name: scores[str(t.number)] for t in
               study.get_trials(deepcopy=False) if str(t.number) in scores}
    todo = [t for t in top if str(t.number) not in scores]
    full = run.cfg.search.rescore_recipe == "distill"
    proxy = run.proxy.longer(steps) if todo and not full else None
    what = "with the distill recipe" if full else f"at {steps} steps"
    objective = run.cfg.search.rescore_objective
    key = run.proxy.score_key if objective == "proxy" else run.proxy.key_for(objective)
    for t in tqdm(todo, desc=f"re-score the top {k} {what}", unit="candidate",
                  disable=not run.progress):
        rec = TrialRecord.read(t)
        if rec.arch_name in by_arch:  # the same architecture, trained by another trial
            score = by_arch[rec.arch_name]
        else:
            try:
                if full:
                    lead = _prune_below(run, study, [u for u in top if scores.get(str(u.number))
                                                     is not None])
                    metrics = finalist_metrics(run, study, rec.arch, prune_below=lead) or {}
                else:
                    metrics = proxy.evaluate(rec.arch, progress=False)[0].metrics
                score = metrics.get(key)
                score = score if score is not None and math.isfinite(score) else None
            except Diverged as e:
                log.warning("re-scoring %s: %s", rec.arch_name, e)
                score = None
        scores[str(t.number)] = by_arch[rec.arch_name] = score
        study.set_user_attr("rescored", scores)
        study.set_user_attr("rescore_setting", setting)
    return rescored(study)


def _measured_top(study: optuna.Study, budget: Budget, ranked: list, k: int) -> list:
    """The first ``k`` of ``ranked`` that fit the budget as measured (``Budget.confirm``, where
    it measures anything the trial's check did not). The study keeps each figure (user
    attributes ``finalist_share``, paired with the teacher, and ``finalist_ms``), which
    ``feasible_trained`` applies from then on; one over the budget is dropped, said so, and the
    next takes its place."""
    shares = {str(n): v for n, v in (study.user_attrs.get("finalist_share") or {}).items()}
    measured = {str(n): v for n, v in (study.user_attrs.get("finalist_ms") or {}).items()}
    top = []
    for t in ranked:
        if len(top) == k:
            break
        rec = TrialRecord.read(t)
        if budget.confirms and str(t.number) not in shares and str(t.number) not in measured:
            v = budget.confirm(rec.arch)
            if v.share is not None:
                shares[str(t.number)] = v.share
                study.set_user_attr("finalist_share", shares)
            else:
                measured[str(t.number)] = v.latency_ms
                study.set_user_attr("finalist_ms", measured)
            if not v.fits:
                log.warning("finalist %s (trial %d) measured %.2f ms, over the budget of %.2f ms "
                            "(checked at %.2f ms, %s): not trained, the next takes its place",
                            rec.arch_name, t.number, v.latency_ms, v.budget_ms, rec.latency_ms,
                            rec.latency_source)
                continue
        top.append(t)
    return top


def _prune_below(run: Run, study: optuna.Study, finished: list) -> dict[int, float] | None:
    """``search.rescore_prune``: step -> the dev score a finalist must keep at that step, the
    best the ``finished`` finalists (trained in full, not pruned) had there less the margin."""
    from tacnas.nas.distill import lead_of

    margin = run.cfg.search.rescore_prune
    if margin is None:
        return None
    states = [read_state(finalist_dir(run, study, TrialRecord.read(t).arch_name) / "checkpoint")
              for t in finished]
    return lead_of([(s or {}).get("curve", []) for s in states], margin)


def finalist_dir(run: Run, study: optuna.Study, arch_name: str):
    """Where ``search.rescore_recipe: distill`` trains a finalist (``out`` of ``distill``): one
    folder per ``distill`` recipe, so a changed recipe never resumes another's checkpoint."""
    recipe = json.dumps(dataclasses.asdict(run.cfg.distill), sort_keys=True)
    tag = hashlib.sha256(recipe.encode()).hexdigest()[:10]
    return run_folder(run.cfg.run_dir, study.study_name) / "finalists" / tag / arch_name


def reuse_finalist(run: Run, study: optuna.Study, arch, out) -> Path | None:
    """Before ``distill`` of ``arch`` into ``out``: the finalist's checkpoint and best model,
    where ``search.rescore_recipe: distill`` trained it under this recipe, are copied in, so the
    distillation resumes at its end. Returns the finalist folder, or None (``out`` untouched)."""
    src = finalist_dir(run, study, arch.name)
    if (run.cfg.search.rescore_recipe != "distill" or read_state(src / "checkpoint") is None
            or not (src / "best" / "config.json").is_file() or (out / "checkpoint").exists()):
        return None
    out.mkdir(parents=True, exist_ok=True)
    for name in ("checkpoint", "best"):
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.copytree(src / name, out / name)
    return src


def finalist_metrics(run: Run, study: optuna.Study, arch,
                     prune_below: dict[int, float] | None = None) -> dict | None:
    """A finalist trained by the ``distill`` recipe (resumed from its checkpoint), scored as the
    search scores its candidates: dev metrics, agreement with the teacher, where deployed.
    None: it was pruned (``prune_below``, see ``train_student``), now or when first trained."""
    from transformers import AutoModelForSequenceClassification

    from tacnas.nas.distill import train_student

    out = finalist_dir(run, study, arch.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    # workers of one study re-score the same finalists: one trains, the others then find its
    # finished checkpoint (a resume that trains nothing)
    with FileLock(str(out) + ".lock"):
        if train_student(run, arch, out, prune_below=prune_below)["pruned_at"]:
            return None
    model = AutoModelForSequenceClassification.from_pretrained(out / "best").eval()
    check_finite(model, what=f"finalist {arch.name}", lr_key="distill.lr")
    return run.proxy.final_scores(model)[0]


def _best_text(study: optuna.Study) -> str:
    best = best_trials(study)
    if not best:
        return "-"
    if min_retention(study) is not None:  # the fastest that keeps the floor
        return f"{min(TrialRecord.read(t).latency_ms for t in best):.2f} ms"
    return f"{max(TrialRecord.read(t).score for t in best):.4f}"

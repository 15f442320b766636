"""A study: where it is stored, how it is created, loaded and resumed, and what it holds.

Every trial's params are the space's choices, so ``FixedTrial(trial.params)`` rebuilds its
architecture; what became of it is its ``TrialRecord`` (``nas/record.py``). A study's
``user_attrs`` hold its config (so ``resume`` needs nothing else), ``n_trials``, and the budget's
figures (``nas/budget.py``). ``n_trials`` counts trained candidates across every process on the
study; rejected, invalid and duplicate candidates do not count.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from tacnas.errors import UserError
from tacnas.nas.config import RunConfig, config_from_dict
from tacnas.nas.record import TrialRecord, TrialStatus
from tacnas.searchspace.arch import ArchConfig

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ storage, study


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_name(study: str) -> str:
    """A study name is a name (it becomes a folder under the run directory), never a path."""
    if not _NAME.fullmatch(study) or ".." in study:
        raise UserError(f"--study {study!r}: a study name is 1-100 letters, digits, '.', '_' or "
                        "'-' (starting with a letter or digit), not a path; use --run-dir or "
                        "--storage to choose where it lives")
    return study


def run_folder(run_dir: str | Path, study: str) -> Path:
    """``runs/<study>/``: study.db (the default storage), config.yaml, checkpoints/, exports/."""
    return Path(run_dir).absolute() / check_name(study)


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


def directions(cfg: RunConfig) -> list[str]:
    """(score up, latency down) for a Pareto front; one objective otherwise: the score, or,
    under an accuracy floor (``budget.min_retention``, a constraint), the latency."""
    if is_multi_objective(cfg):
        return ["maximize", "minimize"]
    return ["minimize"] if cfg.budget.min_retention is not None else ["maximize"]


def min_retention(study: optuna.Study) -> float | None:
    """The study's accuracy floor as a fraction of the teacher (``budget.min_retention``)."""
    return study.user_attrs.get("config", {}).get("budget", {}).get("min_retention")


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


# what a resumed study may change: how long to go on, re-scoring its best trials after them
# (search.rescore_*: the trials stay the same), and the final distillation
_IGNORED_FOR_MATCH = {("search", "n_trials"), ("search", "timeout"), ("search", "rescore_top_k"),
                      ("search", "rescore_steps"), ("search", "rescore_recipe"),
                      ("search", "rescore_objective"), ("distill",)}


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
    summary = _summary(open_storage(storage_url), check_name(name))
    if summary is None:
        raise UserError(
            f"--study {name}: no such study in {storage_url}; run `search` first or check --storage"
        )
    cfg = stored_config(summary.user_attrs, name)
    return _load(name, _open_for(storage_url, cfg), cfg, summary.n_trials)


def _unstarted(storage, name: str) -> bool:
    """No trial of the study has finished, and none is running (another worker's)."""
    study = optuna.load_study(study_name=name, storage=storage)
    return not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                         TrialState.RUNNING))


def stored_config(user_attrs: dict, name: str) -> RunConfig:
    if "config" not in user_attrs:
        raise UserError(f"--study {name}: this study was not made by tacnas (no stored config)")
    return config_from_dict(user_attrs["config"], source=f"study {name}")


def create_or_load(name: str, storage_url: str, cfg: RunConfig) -> optuna.Study:
    """A new study, or the existing one with the same config (many workers share one study).
    A study that has no finished trial yet takes a corrected config (a mistake found after it
    was created must not lock its name)."""
    storage = _open_for(storage_url, cfg)
    summary = _summary(storage, check_name(name))
    deadline = time.monotonic() + 60
    while summary is not None and "config" not in summary.user_attrs \
            and time.monotonic() < deadline:  # another worker is creating it right now
        time.sleep(0.5)
        summary = _summary(storage, name)
    if summary is not None:
        # through today's config class, so a setting added since (at its default) is no change
        diff = _differences(stored_config(summary.user_attrs, name).to_dict(), cfg.to_dict())
        if diff and _unstarted(storage, name):
            log.warning("study %s had no finished trial: its config is replaced (it differed at %s)",
                        name, ", ".join(diff[:5]))
            optuna.delete_study(study_name=name, storage=storage)
            stale = run_folder(cfg.run_dir, name) / "checkpoints"  # a search's partial state
            if stale.exists():
                shutil.rmtree(stale)
            summary, diff = None, []
        elif diff:
            raise UserError(
                f"--study {name}: exists in {storage_url} with a different config (differs at "
                f"{', '.join(diff[:5])}); use `resume --study {name}` or a new --study name"
            )
    if summary is not None:
        return _load(name, storage, cfg, summary.n_trials)
    study = optuna.create_study(
        study_name=name, storage=storage, directions=directions(cfg),
        sampler=make_sampler(cfg), pruner=make_pruner(cfg), load_if_exists=True,
    )
    study.set_user_attr("config", cfg.to_dict())
    return study


# ------------------------------------------------------------------------------------ queries


def trained_count(study: optuna.Study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False,
                                           states=(TrialState.COMPLETE, TrialState.PRUNED))
               if TrialRecord.read(t).counts)


def finished_same_arch(study: optuna.Study, name: str, number: int) -> FrozenTrial | None:
    """A finished trial that checked (and trained, if it fit) the architecture ``name``; a
    diverged one counts too (the same training would diverge again)."""
    done = (TrialStatus.TRAINED, TrialStatus.OVER_BUDGET, TrialStatus.UNUSED,
            TrialStatus.DIVERGED)
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        r = TrialRecord.read(t)
        if t.number != number and r.arch_name == name and r.status in done:
            return t
    return None


def feasible_trained(study: optuna.Study) -> list[FrozenTrial]:
    """Trained trials within every budget, including the study's final latency budget (which
    can only have tightened since a trial was checked), on the latency measured when the trial
    became a finalist where it was (study user attribute ``finalist_ms``)."""
    budget_ms = study.user_attrs.get("budget_ms")
    measured = finalist_ms(study)
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        r = TrialRecord.read(t)
        ms = measured.get(t.number, r.latency_ms)
        if r.trained and all(v <= 0 for v in t.constraints.values()) and \
                (budget_ms is None or ms <= budget_ms):
            out.append(t)
    return out


def pareto_front(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The non-dominated trials over (score up, latency down), fastest first."""
    key = {t.number: (r.score, r.latency_ms) for t, r in ((t, TrialRecord.read(t)) for t in trials)}

    def dominates(a: FrozenTrial, b: FrozenTrial) -> bool:
        (sa, la), (sb, lb) = key[a.number], key[b.number]
        return sa >= sb and la <= lb and (sa > sb or la < lb)

    front = [t for t in trials if not any(dominates(o, t) for o in trials)]
    return sorted(front, key=lambda t: key[t.number][1])


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best feasible trained trial (single objective: the highest score, or under an
    accuracy floor the fastest), or the feasible trained Pareto front over (score up, latency
    down) for a multi-objective study. Feasible includes meeting the floor."""
    done = feasible_trained(study)
    if not done:
        return []
    if len(study.directions) == 1:
        if min_retention(study) is not None:
            return [min(done, key=lambda t: (TrialRecord.read(t).latency_ms,
                                             -TrialRecord.read(t).score, t.number))]
        longer = rescored(study)  # search.rescore_top_k: the longer score decides among them
        if rescued := [t for t in done if longer.get(t.number) is not None]:
            return [max(rescued, key=lambda t: (longer[t.number], t.value, -t.number))]
        return [max(done, key=lambda t: (t.value, -t.number))]
    return pareto_front(done)


def finalist_ms(study: optuna.Study) -> dict[int, float]:
    """Trial number -> its latency measured when it became a finalist (``rescore``; empty if
    none was): paired with the teacher under a ``speedup`` budget (user attribute
    ``finalist_share``, the trial's time over the teacher's), in ms of the study's teacher figure
    now, so a later, faster teacher reading does not move its fit; else measured in ms
    (``finalist_ms``), for trials checked on the latency table's prediction."""
    attrs = study.user_attrs
    out = {int(k): v for k, v in (attrs.get("finalist_ms") or {}).items()}
    for k, share in (attrs.get("finalist_share") or {}).items():
        out[int(k)] = share * attrs["teacher_ms"]
    return out


def finalist_source(study: optuna.Study, number: int) -> str:
    """How a finalist's latency (``finalist_ms``) was measured."""
    paired = str(number) in (study.user_attrs.get("finalist_share") or {})
    return "measured (finalist, paired)" if paired else "measured (finalist)"


def rescored(study: optuna.Study) -> dict[int, float | None]:
    """``search.rescore_top_k``: trial number -> its score by the longer run (None: that
    training diverged); empty if the study was not re-scored."""
    return {int(k): v for k, v in (study.user_attrs.get("rescored") or {}).items()}


def rescored_under(study: optuna.Study) -> dict | None:
    """The setting the study was re-scored under (``recipe``, ``steps`` or ``distill``,
    ``objective``), or None; a study re-scored before it was kept: its ``rescore_steps``."""
    attrs = study.user_attrs
    if "rescore_setting" in attrs:
        return attrs["rescore_setting"]
    if "rescore_steps" in attrs:
        return {"recipe": "proxy", "steps": attrs["rescore_steps"], "objective": "proxy"}
    return None


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The one trial to export: the best, or the front's highest-scoring member (under an
    accuracy floor, its fastest)."""
    best = best_trials(study)
    if not best:
        return None
    if min_retention(study) is not None:
        return min(best, key=lambda t: TrialRecord.read(t).latency_ms)
    return max(best, key=lambda t: TrialRecord.read(t).score)


def floor_unmet(study: optuna.Study) -> str | None:
    """Under an accuracy floor with trained candidates of which none meets it: one line naming
    ``budget.min_retention``, the best retention seen and the fix. None otherwise."""
    floor, frac = study.user_attrs.get("floor_score"), min_retention(study)
    if floor is None or frac is None or feasible_trained(study):
        return None
    trained = [(t, r) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
               if (r := TrialRecord.read(t)).trained and r.score is not None]
    if not trained:
        return None
    t, r = max(trained, key=lambda tr: tr[1].score)
    return (f"budget.min_retention={frac:g}: none of the {len(trained)} trained candidates "
            f"keeps {frac:.1%} of the teacher's dev score (floor {floor:.4f}; best "
            f"{r.score:.4f} = {r.score * frac / floor:.1%}, {r.arch_name}, trial {t.number}); "
            "lower budget.min_retention, train more candidates (search.n_trials) or add larger "
            "choices to space")


def arch_of(trial: FrozenTrial) -> ArchConfig:
    return TrialRecord.read(trial).arch

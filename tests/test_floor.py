"""The accuracy floor (``budget.min_retention``) and the length-aware budget
(``budget.seq_len: task``): the synthetic search's known optimum, the differentiable search,
and the CLI on the tiny config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tacnas.errors import UserError
from tacnas.evaluators.data import Split, length_percentile
from tacnas.nas.config import config_from_dict
from tacnas.nas.differentiable import differentiable_search
from tacnas.nas.optuna_search import run_search
from tacnas.nas.record import TrialRecord
from tacnas.nas.report import status_text
from tacnas.nas.study import best_trial, create_or_load, default_storage
from tests.conftest import cli, cli_here, fake_run, true_score


def _study(run, name="f"):
    return create_or_load(name, default_storage(run.cfg.run_dir, name), run.cfg)


def _keepers(run, floor: float, budget_ms: float | None = None) -> list:
    """Every architecture of the space scoring at least ``floor`` (within ``budget_ms``),
    fastest first."""
    ok = [a for a in run.space.all_archs() if true_score(a) >= floor and
          (budget_ms is None or run.meter.arch_ms(a) <= budget_ms)]
    return sorted(ok, key=run.meter.arch_ms)


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_the_floor_alone_finds_a_fast_student_that_keeps_it(tmp_path, sampler):
    run = fake_run(tmp_path, sampler, n_trials=25, speedup=None, min_retention=0.8)
    study = _study(run)
    assert study.directions[0].name == "MINIMIZE"  # one objective: the latency
    run_search(run, study, n_trials=25, timeout=None)
    floor = study.user_attrs["floor_score"]
    assert floor == pytest.approx(0.8 * 0.9)
    best = best_trial(study)
    r = TrialRecord.read(best)
    assert r.score >= floor and best.constraints["min_retention"] <= 0
    trained = [TrialRecord.read(t) for t in study.trials if TrialRecord.read(t).trained]
    below = [x for x in trained if x.score < floor]
    assert below, "a floor every candidate meets tests nothing"
    assert all(t.constraints["min_retention"] > 0 for t in study.trials
               if TrialRecord.read(t).trained and TrialRecord.read(t).score < floor)
    # the fastest of the trained candidates that keep the floor, and among the space's fastest
    assert r.latency_ms == min(x.latency_ms for x in trained if x.score >= floor)
    rank = [a.name for a in _keepers(run, floor)].index(r.arch_name)
    if sampler == "tpe":
        assert rank < 5, (rank, r.arch_name)
    text = status_text(study)
    assert "accuracy floor: the fastest candidate keeping 80.0%" in text
    assert f"fastest keeping the floor: #{best.number} {r.arch_name}" in text


def test_the_floor_holds_under_a_latency_budget_too(tmp_path):
    run = fake_run(tmp_path, "tpe", n_trials=20, speedup=1.5, min_retention=0.7)
    study = _study(run)
    run_search(run, study, n_trials=20, timeout=None)
    budget_ms, floor = study.user_attrs["budget_ms"], study.user_attrs["floor_score"]
    assert all(run.meter.arch_ms(a) <= budget_ms for a in run.proxy.trained)
    r = TrialRecord.read(best_trial(study))
    assert r.score >= floor and r.latency_ms <= budget_ms
    assert r.arch_name in [a.name for a in _keepers(run, floor, budget_ms)[:5]]


def test_a_pareto_study_exports_the_fastest_front_member_that_keeps_the_floor(tmp_path):
    run = fake_run(tmp_path, "nsga2", n_trials=15, speedup=None, min_retention=0.8)
    study = _study(run)
    run_search(run, study, n_trials=15, timeout=None)
    floor = study.user_attrs["floor_score"]
    r = TrialRecord.read(best_trial(study))
    keeping = [TrialRecord.read(t) for t in study.trials if TrialRecord.read(t).trained
               and TrialRecord.read(t).score >= floor]
    assert r.score >= floor and r.latency_ms == min(x.latency_ms for x in keeping)


def test_a_floor_no_candidate_meets_is_a_user_error_naming_the_field(tmp_path):
    # the synthetic scores top out at 0.892, the teacher's is 0.9
    run = fake_run(tmp_path, "tpe", n_trials=6, speedup=None, min_retention=1.0)
    study = _study(run)
    with pytest.raises(UserError, match=r"^budget\.min_retention=1: none of the 6 trained "
                                        r"candidates keeps 100\.0%.*lower budget\.min_retention"):
        run_search(run, study, n_trials=6, timeout=None)
    assert best_trial(study) is None  # status and export see it the same way
    assert "budget.min_retention=1: none of the 6" in status_text(study)


@pytest.mark.parametrize("search, fragment", [
    (dict(pruner="median"), r"search\.pruner: with budget\.min_retention"),
    (dict(strategy="nni-evolution"), r"search\.strategy: nni-evolution maximises a score"),
])
def test_the_floor_with_a_pruner_or_an_nni_strategy_is_refused(search, fragment):
    with pytest.raises(UserError, match=fragment):
        config_from_dict(dict(task=dict(dataset="x.csv"), teacher=dict(model="t"),
                              space=dict(num_layers=[1], hidden_size=[32],
                                         intermediate_size=[64]),
                              budget=dict(min_retention=0.9), search=search))


def test_differentiable_search_under_a_floor_picks_the_fastest_likely_keeper(tmp_path):
    run = fake_run(tmp_path, strategy="differentiable", speedup=None, min_retention=0.4)
    study = _study(run)
    summary = differentiable_search(run, study)
    recs = {t.number: TrialRecord.read(t) for t in study.trials}
    assert len(recs) == run.cfg.differentiable.floor_candidates == summary["trained"]
    floor = study.user_attrs["floor_score"]
    keepers = {n: r for n, r in recs.items() if r.score >= floor}
    assert keepers, "a floor the scores never meet tests the error path, not the choice"
    fastest = min(keepers, key=lambda n: recs[n].latency_ms)
    assert summary["trial"] == fastest == best_trial(study).number
    assert {r.strategy for r in recs.values()} == {"differentiable"}
    # the latency term pulled the expected latency down from the warm-up's uniform mix
    hist = json.loads((tmp_path / "f" / "checkpoints" / "differentiable_history.json")
                      .read_text())
    assert hist[-1]["expected_ms"] < hist[0]["expected_ms"]


def test_differentiable_search_under_an_unmet_floor_is_a_user_error(tmp_path):
    run = fake_run(tmp_path, strategy="differentiable", speedup=None, min_retention=1.0)
    with pytest.raises(UserError, match=r"^budget\.min_retention=1: none of the 8 trained"):
        differentiable_search(run, _study(run))


# ------------------------------------------------------------------ the task's own lengths


def _split(lengths: list[int]) -> Split:
    n, m = len(lengths), max(lengths)
    ids = torch.ones(n, m, dtype=torch.long)
    return Split(ids, torch.zeros_like(ids), torch.tensor(lengths), torch.zeros(n, dtype=torch.long))


def test_length_percentile_rounds_up_to_eight_and_caps_at_max_length():
    lengths = list(range(1, 101))  # 1..100 tokens
    assert length_percentile(_split(lengths), 90, 512) == 96  # 90.1 -> 96
    assert length_percentile(_split(lengths), 50, 512) == 56  # 50.5 -> 56
    assert length_percentile(_split(lengths), 100, 64) == 64  # capped
    assert length_percentile(_split([3, 4, 5]), 90, 512) == 8  # at least 8


def test_cli_budget_at_the_task_length_profiles_and_reports_that_length(project, monkeypatch):
    p = cli_here("search", "--config", "tiny.yaml", "--study", "len", "--set", "budget.seq_len=task",
            "--set", "budget.seq_len_percentile=50", "--set", "search.n_trials=1",
            "--set", "proxy.steps=2", cwd=project)
    # the tiny task's dev lengths, tokenized as the search does
    from tacnas.nas.config import load_config
    from tacnas.nas.pipeline import prepare

    cfg = load_config(project / "tiny.yaml", [f"run_dir={project / 'runs'}"])
    monkeypatch.chdir(project)
    run = prepare(cfg, progress=False)
    run.meter.close()
    expect = length_percentile(run.data.dev, 50, cfg.task.max_length)
    assert expect < cfg.task.max_length  # the test means something: not the padded length
    assert 8 * int(np.ceil(float(np.median(run.data.dev.lengths.numpy())) / 8)) == expect
    q = cli_here("profile", "--config", "tiny.yaml", "--set", "budget.seq_len=task",
            "--set", "budget.seq_len_percentile=50", cwd=project)
    assert f"seq_len {expect}" in q.stdout
    e = cli_here("export", "--study", "len", "--out", "out", cwd=project)
    report = json.loads((project / "out" / "report.json").read_text())
    assert report["measurement"]["seq_len"] == expect, (p.stdout, e.stdout)
    assert f"seq_len {expect}" in e.stdout


def test_cli_floor_no_candidate_meets_exits_2_with_one_line(project):
    args = ["--set", "budget.speedup=null", "--set", "budget.min_retention=1.0",
            "--set", "proxy.steps=1", "--set", "search.n_trials=2"]
    p = cli("search", "--config", "tiny.yaml", "--study", "floor", *args, cwd=project,
            check=False)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip().splitlines()
    assert err[-1].startswith("error: budget.min_retention=1: none of the 2 trained candidates")
    assert "Traceback" not in p.stderr
    s = cli_here("status", "--study", "floor", cwd=project)
    assert "budget.min_retention=1: none of the 2" in s.stdout
    e = cli("export", "--study", "floor", "--out", "out", cwd=project, check=False)
    assert e.returncode == 2 and "budget.min_retention=1" in e.stderr.strip().splitlines()[-1]

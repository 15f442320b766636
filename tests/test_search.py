"""The Optuna search on a synthetic evaluator with a known optimum: fast, no training."""

from __future__ import annotations

import optuna
import pytest

from tacnas.errors import UserError
from tacnas.nas.optuna_search import run_search
from tacnas.nas.report import status_text
from tacnas.nas.study import best_trials, create_or_load, default_storage
from tests.conftest import fake_run, true_score


def _study(run, name="s"):
    return create_or_load(name, default_storage(run.cfg.run_dir, name), run.cfg)


@pytest.mark.parametrize("sampler", ["tpe", "random", "nsga2"])
def test_budget_is_hard_and_only_feasible_candidates_train(tmp_path, sampler):
    run = fake_run(tmp_path, sampler)
    study = _study(run)
    summary = run_search(run, study, n_trials=12, timeout=None)
    budget = study.user_attrs["budget_ms"]
    assert summary["trained"] == 12
    assert all(run.meter.arch_ms(a) <= budget for a in run.proxy.trained)
    assert len(set(run.proxy.trained)) == len(run.proxy.trained)  # nothing trained twice
    over = [t for t in study.trials if t.user_attrs.get("status") == "over_budget"]
    assert all(t.user_attrs["latency_ms"] > budget and t.constraints["budget"] > 0 for t in over)
    for t in study.trials:  # every trial's params rebuild its architecture
        arch = run.space.sample(optuna.trial.FixedTrial(t.params))
        assert arch.to_dict() == t.user_attrs["arch"]


def test_tpe_finds_the_known_optimum_under_the_budget(tmp_path):
    run = fake_run(tmp_path, "tpe", n_trials=20)
    study = _study(run)
    run_search(run, study, n_trials=20, timeout=None)
    budget = study.user_attrs["budget_ms"]
    feasible = sorted((true_score(a) for a in run.space.all_archs()
                       if run.meter.arch_ms(a) <= budget), reverse=True)
    best = best_trials(study)[0]
    assert best.value >= feasible[2], (best.value, feasible[:5])  # top 3 of the feasible set
    assert best.user_attrs["latency_ms"] <= budget


def test_nsga2_front_is_feasible_and_non_dominated(tmp_path):
    run = fake_run(tmp_path, "nsga2", n_trials=15)
    study = _study(run)
    run_search(run, study, n_trials=15, timeout=None)
    front = best_trials(study)
    assert len(front) >= 2
    for a in front:
        assert a.constraints["budget"] <= 0
        for b in front:
            assert not (b.values[0] > a.values[0] and b.values[1] < a.values[1])


def test_resume_continues_to_the_new_total_without_retraining(tmp_path):
    run = fake_run(tmp_path, "tpe")
    study = _study(run)
    run_search(run, study, n_trials=5, timeout=None)
    first = list(run.proxy.trained)
    run2 = fake_run(tmp_path, "tpe")
    study2 = _study(run2)
    run_search(run2, study2, n_trials=9, timeout=None)
    assert len(run2.proxy.trained) == 4
    assert not set(first) & set(run2.proxy.trained)


def test_unreachable_budget_is_a_user_error(tmp_path):
    run = fake_run(tmp_path, "tpe", speedup=1000.0)
    with pytest.raises(UserError, match=r"budget\.speedup=1000.0: the fastest candidate"):
        run_search(run, _study(run), n_trials=3, timeout=None)


def test_min_use_rejects_untrained_what_leaves_the_budget_unused(tmp_path):
    run = fake_run(tmp_path, "tpe", n_trials=8, min_use=0.6)
    study = _study(run)
    run_search(run, study, n_trials=8, timeout=None)
    budget = study.user_attrs["budget_ms"]
    floor = 0.6 * budget
    assert run.proxy.trained and all(floor <= run.meter.arch_ms(a) <= budget
                                     for a in run.proxy.trained)
    unused = [t for t in study.trials if t.user_attrs.get("status") == "unused_budget"]
    assert unused  # the space's fast half was proposed, and turned away
    for t in unused:
        assert t.user_attrs["latency_ms"] < floor and t.constraints["budget"] > 0
        assert t.user_attrs["arch"] not in [a.to_dict() for a in run.proxy.trained]
    best = best_trials(study)[0]
    assert floor <= best.user_attrs["latency_ms"] <= budget
    assert (f"budget use: candidates predicted under 60% of the budget are rejected untrained "
            f"({len(unused)} so far)") in status_text(study)


def test_a_min_use_no_candidate_meets_is_a_user_error(tmp_path):
    run = fake_run(tmp_path, "tpe", predicted=True)
    budget = run.meter.teacher_ms() / 2.0
    slowest_fit = max(ms for a in run.space.all_archs()
                      if (ms := run.meter.arch_ms(a)) <= budget)
    assert slowest_fit < budget
    use = round((slowest_fit / budget + 1.0) / 2, 6)  # between the best fit and the budget
    run = fake_run(tmp_path, "tpe", predicted=True, min_use=use)
    with pytest.raises(UserError, match=rf"budget\.min_use={use}: no candidate of the space is "
                                        "predicted between"):
        run_search(run, _study(run), n_trials=3, timeout=None)
    assert not run.proxy.trained


def test_min_use_needs_a_latency_budget():
    from tacnas.nas.config import config_from_dict

    base = dict(task=dict(dataset="x.csv"), teacher=dict(model="t"),
                space=dict(num_layers=[1, 2], hidden_size=[32, 64], intermediate_size=[64]))
    assert config_from_dict({**base, "budget": {"latency_ms": 5.0, "min_use": 0.8}}).budget.min_use
    for budget in ({"max_params": 10**6, "min_use": 0.8},
                   {"speedup": 2.0, "min_retention": 0.95, "min_use": 0.8}):
        with pytest.raises(UserError, match=r"budget\.min_use: it is a share of a latency"):
            config_from_dict({**base, "budget": budget})


def test_a_different_config_under_the_same_study_name_is_refused(tmp_path):
    run = fake_run(tmp_path)
    run_search(run, _study(run), n_trials=1, timeout=None)  # a finished trial
    other = fake_run(tmp_path, speedup=3.0)
    with pytest.raises(UserError, match="different config .*budget.speedup"):
        _study(other)


def test_a_study_without_a_finished_trial_takes_a_corrected_config(tmp_path, caplog):
    run = fake_run(tmp_path)
    _study(run)  # created, then (say) a mistake stopped the search before any trial finished
    other = fake_run(tmp_path, speedup=3.0)
    study = _study(other)
    assert study.user_attrs["config"]["budget"]["speedup"] == 3.0
    assert "config is replaced" in caplog.text


def test_a_study_from_before_a_new_config_section_still_opens(tmp_path):
    run = fake_run(tmp_path)
    study = _study(run)
    old = run.cfg.to_dict()
    del old["nni"]  # as stored by a version without the section
    study.set_user_attr("config", old)
    assert _study(run).study_name == study.study_name  # the default is no difference


def test_journal_storage_holds_a_resumable_study(tmp_path):
    url = f"journal://{tmp_path}/study.log"
    run = fake_run(tmp_path)
    study = create_or_load("j", url, run.cfg)
    run_search(run, study, n_trials=3, timeout=None)
    run2 = fake_run(tmp_path)
    again = create_or_load("j", url, run2.cfg)
    assert again.user_attrs["n_trials"] == 3
    run_search(run2, again, n_trials=5, timeout=None)
    assert len(run2.proxy.trained) == 2 and (tmp_path / "study.log").stat().st_size > 0


def test_a_slow_teacher_measurement_only_tightens_the_budget(tmp_path):
    """The machine was busy when the teacher was first measured (30% slow): later, faster
    teacher measurements tighten the budget, and the best trial fits the tightest one."""
    run = fake_run(tmp_path, "tpe", n_trials=8)
    true_ms = run.meter.teacher_ms()
    readings = iter([1.3 * true_ms] + [true_ms] * 100)
    run.meter.teacher_ms = lambda: next(readings)
    study = _study(run)
    summary = run_search(run, study, n_trials=8, timeout=None)
    assert summary["budget_ms"] == pytest.approx(true_ms / 2.0)
    assert study.user_attrs["budget_ms"] == pytest.approx(true_ms / 2.0)
    assert study.user_attrs["teacher_ms"] == pytest.approx(true_ms)
    best = best_trials(study)
    assert best and best[0].user_attrs["latency_ms"] <= true_ms / 2.0
    loose = [t for t in study.trials if t.user_attrs.get("status") == "trained"
             and t.user_attrs["latency_ms"] > true_ms / 2.0]
    assert all(t not in best for t in loose)


def test_one_impossible_teacher_reading_does_not_rule_the_study(tmp_path, caplog):
    """Under load one teacher timing came back at a fraction of every other: it is an
    outlier, not a new minimum, so the budget stays where the plausible readings put it."""
    run = fake_run(tmp_path, "tpe", n_trials=6)
    true_ms = run.meter.teacher_ms()
    readings = iter([true_ms, 0.2 * true_ms] + [true_ms] * 100)
    run.meter.teacher_ms = lambda: next(readings)
    study = _study(run)
    summary = run_search(run, study, n_trials=6, timeout=None)
    assert summary["budget_ms"] == pytest.approx(true_ms / 2.0)
    assert study.user_attrs["teacher_ms"] == pytest.approx(true_ms)
    assert "is ignored: an outlier" in caplog.text
    assert len(run.proxy.trained) == 6  # the study went on, every candidate feasible


def test_a_stored_outlier_is_replaced_on_resume_and_said(tmp_path, caplog):
    run = fake_run(tmp_path, "tpe", n_trials=3)
    true_ms = run.meter.teacher_ms()
    study = _study(run)
    run_search(run, study, n_trials=3, timeout=None)
    study.set_user_attr("teacher_ms", 0.2 * true_ms)  # what one bad reading had stored
    study.set_user_attr("budget_ms", 0.1 * true_ms)
    summary = run_search(fake_run(tmp_path, "tpe"), _study(run), n_trials=5, timeout=None)
    assert summary["budget_ms"] == pytest.approx(true_ms / 2.0)
    assert study.user_attrs["teacher_ms"] == pytest.approx(true_ms)
    assert "implausible against a fresh measurement" in caplog.text


def test_rescoring_the_top_k_picks_by_the_longer_score_and_resumes(tmp_path):
    import dataclasses

    from tacnas.nas.study import best_trial, feasible_trained, rescored
    from tests.conftest import FakeProxy

    def with_rescore(run, k):
        run.cfg = dataclasses.replace(run.cfg, search=dataclasses.replace(
            run.cfg.search, rescore_top_k=k, rescore_steps=50))
        # a misleading short proxy: shallow candidates look 0.15 better than they are
        run.proxy = FakeProxy(bias=lambda a: 0.15 * (a.num_layers == 1))
        return run

    run = with_rescore(fake_run(tmp_path, "tpe", n_trials=12), 4)
    study = _study(run)
    summary = run_search(run, study, n_trials=12, timeout=None)
    top = sorted(feasible_trained(study), key=lambda t: (-t.value, t.number))[:4]
    longer = rescored(study)
    assert set(longer) == {t.number for t in top} == set(summary["rescored"])
    assert all(v == pytest.approx(true_score(run.space.sample(
        optuna.trial.FixedTrial(study.trials[n].params)))) for n, v in longer.items())
    pick = best_trial(study)
    truth = {t.number: true_score(run.space.sample(optuna.trial.FixedTrial(t.params)))
             for t in top}
    assert pick.number in longer and truth[pick.number] == max(truth.values())
    assert len(run.proxy.rescorer.trained) == len({t.user_attrs["arch_name"] for t in top})
    # a repeated search re-scores nothing already scored
    again = with_rescore(fake_run(tmp_path, "tpe", n_trials=12), 4)
    run_search(again, _study(again), n_trials=12, timeout=None)
    assert again.proxy.rescorer is None and best_trial(_study(again)).number == pick.number
    # ... and a re-score under another setting starts over (no score of 50 steps kept)
    longer_run = with_rescore(fake_run(tmp_path, "tpe", n_trials=12), 4)
    longer_run.cfg = dataclasses.replace(longer_run.cfg, search=dataclasses.replace(
        longer_run.cfg.search, rescore_steps=60))
    run_search(longer_run, _study(longer_run), n_trials=12, timeout=None)
    assert len(longer_run.proxy.rescorer.trained) == len(run.proxy.rescorer.trained)
    assert _study(longer_run).user_attrs["rescore_setting"]["steps"] == 60


def test_rescoring_is_refused_where_it_cannot_pick_one_score():
    from tacnas.nas.config import config_from_dict

    base = dict(task=dict(dataset="x.csv"), teacher=dict(model="t"),
                space=dict(num_layers=[1, 2], hidden_size=[32, 64], intermediate_size=[64]))
    ok = config_from_dict({**base, "search": {"rescore_top_k": 3}, "budget": {"speedup": 2.0}})
    assert ok.search.rescore_top_k == 3
    # the differentiable search's finalists: its k most likely architectures, re-scored
    assert config_from_dict({**base, "search": {"rescore_top_k": 3, "strategy": "differentiable"},
                             "budget": {"speedup": 2.0}}).search.rescore_top_k == 3
    for search, budget in [({"sampler": "nsga2"}, {}), ({"multi_objective": True}, {}),
                           ({}, {"min_retention": 0.99}),
                           ({"strategy": "differentiable"}, {"min_retention": 0.99})]:
        with pytest.raises(UserError, match="search.rescore_top_k"):
            config_from_dict({**base, "search": {"rescore_top_k": 3, **search},
                              "budget": {"speedup": 2.0, **budget}})
    with pytest.raises(UserError, match="search.rescore_recipe/rescore_objective"):
        config_from_dict({**base, "search": {"rescore_recipe": "distill"},
                          "budget": {"speedup": 2.0}})
    # pruning stops finalists trained in full: with the proxy re-scoring there are none
    with pytest.raises(UserError, match="search.rescore_prune"):
        config_from_dict({**base, "search": {"rescore_top_k": 3, "rescore_prune": 0.01},
                          "budget": {"speedup": 2.0}})
    assert config_from_dict({**base, "search": {"rescore_top_k": 3, "rescore_prune": 0.01,
                                                "rescore_recipe": "distill"},
                             "budget": {"speedup": 2.0}}).search.rescore_prune == 0.01
    # without finalists it is inert: a config that ships it turns them off with top_k alone
    assert config_from_dict({**base, "search": {"rescore_prune": 0.01},
                             "budget": {"speedup": 2.0}}).search.rescore_top_k == 0

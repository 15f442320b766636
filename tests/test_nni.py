"""NNI's multi-trial strategies proposing candidates that run as ordinary Optuna trials.

NNI is an optional extra: these tests run in an environment with ``tacnas[nni]`` (``make test``
builds one, .venv-nni); elsewhere they are skipped, and TACNAS_REQUIRE_NNI=1 turns the skip into
a failure."""

from __future__ import annotations

import os

import optuna
import pytest

from tacnas.nas.config import load_config
from tacnas.nas.optuna_search import run_search
from tacnas.nas.pipeline import prepare
from tacnas.nas.study import create_or_load, default_storage
from tests.conftest import cli

if os.environ.get("TACNAS_REQUIRE_NNI") != "1":
    pytest.importorskip("nni", reason="the [nni] extra is not installed")

from tacnas.nas.nni_search import nni_driver  # noqa: E402

CAP = 35_000  # parameters: 36 of the tiny space's 60 architectures fit


def _run(project, monkeypatch, strategy, *extra):
    monkeypatch.chdir(project)
    cfg = load_config("tiny.yaml", [f"search.strategy={strategy}", "proxy.steps=10",
                                    "proxy.eval_every=0", *extra])
    run = prepare(cfg, progress=False)
    study = create_or_load("n", default_storage(cfg.run_dir, "n"), cfg)
    return run, study


def test_dimensions_name_what_the_space_suggests(project, monkeypatch):
    run, _ = _run(project, monkeypatch, "nni-random")
    dims = run.space.choices()
    seen = {}

    class Recorder:
        def suggest_categorical(self, name, choices):
            seen[name] = tuple(choices)
            return choices[0]

    run.space.sample(Recorder())
    assert dims == seen  # NNI's choices are exactly the names/values PartialFixedSampler fixes


@pytest.mark.parametrize("strategy", ["nni-evolution", "nni-random", "nni-tpe"])
def test_nni_strategy_trains_the_requested_trials_through_the_objective(
        project, monkeypatch, strategy):
    run, study = _run(project, monkeypatch, strategy, "nni.population_size=3",
                      "nni.sample_size=2")
    summary = run_search(run, study, n_trials=4, timeout=None, driver=nni_driver(run, study))
    trials = study.get_trials(deepcopy=False)
    trained = [t for t in trials if t.user_attrs.get("status") in ("trained", "pruned")]
    assert summary["trained"] == 4 == len(trained)
    assert len({t.user_attrs["arch_name"] for t in trained}) == 4  # nothing trained twice
    assert all(t.user_attrs["strategy"] == strategy for t in trials)
    for t in trials:  # every proposal went through the budget check; the params are NNI's
        assert t.user_attrs["status"] in {"trained", "over_budget", "duplicate", "invalid"}
        assert run.space.contains(run.space.sample(optuna.trial.FixedTrial(t.params)))
    assert all(t.user_attrs["latency_ms"] <= t.user_attrs["budget_ms"] for t in trained)
    assert study.sampler.__class__.__name__ != "PartialFixedSampler"  # restored


def test_evolution_mutates_the_best_and_reports_the_worst_for_over_budget(project, monkeypatch):
    from tacnas.nas import nni_search

    told = []
    real = nni_search.nni_value
    monkeypatch.setattr(nni_search, "nni_value", lambda t, w: told.append(
        (t.user_attrs["status"], real(t, w))) or told[-1][1])
    # a parameter budget: over-budget candidates whatever this machine's speed (~40% of the space)
    run, study = _run(project, monkeypatch, "nni-evolution", "nni.population_size=2",
                      "nni.sample_size=2", "budget.speedup=null", f"budget.max_params={CAP}")
    run_search(run, study, n_trials=4, timeout=None, driver=nni_driver(run, study))
    scores = {t.number: t.user_attrs.get("score") for t in study.trials}
    assert len(told) == len(study.trials)
    assert any(s == "over_budget" for s, _ in told) and any(s == "trained" for s, _ in told)
    for (status, value), t in zip(told, study.trials):
        assert status == t.user_attrs["status"]
        assert value == (0.0 if status in {"over_budget", "invalid"} else scores[t.number])


def test_cli_search_status_export_resume_with_nni(project):
    out = cli("search", "--config", "tiny.yaml", "--study", "evo", "--n-trials", "3",
              "--set", "search.strategy=nni-evolution", "--set", "nni.population_size=2",
              "--set", "nni.sample_size=1", "--set", "proxy.steps=10",
              "--set", "budget.speedup=null", "--set", f"budget.max_params={CAP}",
              cwd=project).stdout
    assert "3 trained of 3 requested" in out
    cli("resume", "--study", "evo", "--n-trials", "4", cwd=project)
    study = optuna.load_study(study_name="evo",
                              storage=f"sqlite:///{project}/runs/evo/study.db")
    trained = [t for t in study.trials if t.user_attrs.get("status") == "trained"]
    assert len(trained) == 4 and len({t.user_attrs["arch_name"] for t in trained}) == 4
    cli("export", "--study", "evo", "--out", "exp", "--runtimes", "torch", cwd=project)
    assert (project / "exp" / "model.safetensors").is_file()


def test_nni_config_mistakes_exit_2(project):
    p = cli("search", "--config", "tiny.yaml", "--set", "search.strategy=nni-evolution",
            "--set", "search.multi_objective=true", cwd=project, check=False)
    assert p.returncode == 2 and "search.strategy" in p.stderr and "Traceback" not in p.stderr
    p = cli("search", "--config", "tiny.yaml", "--set", "search.strategy=nni-evolution",
            "--set", "nni.sample_size=9", cwd=project, check=False)
    assert p.returncode == 2 and "nni.sample_size" in p.stderr

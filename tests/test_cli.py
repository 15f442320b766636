"""End to end through the CLI on configs/tiny.yaml: search, status, resume, export, kill."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification

from tacnas.nas.study import feasible_trained
from tests.conftest import ROOT, alive, children, cli, cli_here

pytestmark = pytest.mark.slow


def _study(project: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{project}/runs/{name}/study.db")


def test_search_resume_export_and_load(project):
    out = cli_here("search", "--config", "tiny.yaml", "--n-trials", "3", cwd=project).stdout
    assert "3 trained of 3 requested" in out and "best: #" in out
    resolved = yaml.safe_load((project / "runs" / "tiny" / "config.yaml").read_text())
    assert resolved["search"]["n_trials"] == 3 and resolved["proxy"]["init"] == "teacher"
    first = {t.number: t.values for t in _study(project).trials}

    cli_here("resume", "--study", "tiny", "--n-trials", "5", cwd=project)
    study = _study(project)
    trained = [t for t in study.trials if t.user_attrs.get("status") == "trained"]
    assert len(trained) == 5
    assert all(study.trials[n].values == v for n, v in first.items())  # nothing lost or redone
    assert len({t.user_attrs["arch_name"] for t in trained}) == 5

    status = cli_here("status", "--study", "tiny", cwd=project).stdout
    assert "score ± s.e." in status and "best: #" in status
    assert "score: dev accuracy (" in status  # what ranked the candidates, with the dev size
    assert "weak teacher" not in status  # the tiny teacher is a real one

    out = cli_here("export", "--study", "tiny", "--out", "exported", "--runtimes", "torch",
              cwd=project).stdout
    assert "speedup" in out and "teacher" in out
    # the speedup budget's check, as the search checks finalists: paired with the teacher
    rep = json.loads((project / "exported" / "report.json").read_text())
    verdict = "within" if rep["paired_speedup"] >= 1.3 else "OVER"
    assert rep["budget_speedup"] == 1.3
    assert f"{rep['paired_speedup']:.2f}x, {verdict} the 1.3x budget" in out
    exp = project / "exported"
    for f in ("config.json", "model.safetensors", "arch.json", "report.json", "tokenizer.json"):
        assert (exp / f).is_file(), f
    model = AutoModelForSequenceClassification.from_pretrained(exp).eval()
    # the best trial within the study's final budget (a faster teacher reading during resume
    # can tighten it after a trial was checked, and export never ships an over-budget trial)
    best = max(feasible_trained(_study(project)), key=lambda t: t.value)
    assert json.loads((exp / "report.json").read_text())["trial"] == best.number
    ckpt = AutoModelForSequenceClassification.from_pretrained(
        project / "runs" / "tiny" / "checkpoints" / f"trial_{best.number}").eval()
    x = torch.randint(5, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ckpt(input_ids=x).logits)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(exp)("good day")["input_ids"][0] == 2  # [CLS]

    # the final distillation of the chosen trial writes the same kind of folder
    out = cli_here("distill", "--from", f"tiny:{best.number}", "--set", "distill.max_steps=20",
              "--set", "distill.eval_every=10", "--out", "final", "--runtimes", "torch",
              cwd=project).stdout
    rep = json.loads((project / "final" / "report.json").read_text())
    assert rep["trial"] == best.number and rep["distill"]["steps_run"] == 20
    assert f"distilled (trial #{best.number})" in out and rep["student"]["arch"] in out
    assert AutoModelForSequenceClassification.from_pretrained(project / "final").num_parameters() \
        == rep["student"]["params"]
    p = cli("distill", "--arch", "exported/arch.json", "--config", "tiny.yaml",
            "--teacher-layers", "0,99", "--out", "bad", cwd=project, check=False)
    assert p.returncode == 2 and "teacher layers" in p.stderr and "Traceback" not in p.stderr


def test_sigkill_mid_trial_then_resume_keeps_every_finished_trial(project):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, str(ROOT / "run_search.py"), "--quiet", "search", "--config",
            "tiny.yaml", "--n-trials", "4", "--set", "proxy.steps=300", "--set", "proxy.eval_every=0",
            "--set", "search.heartbeat_interval=1", "--set", "search.grace_period=2"]
    proc = subprocess.Popen(args, cwd=project, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    db = project / "runs" / "tiny" / "study.db"
    deadline = time.time() + 240
    killed_number = None
    try:
        while time.time() < deadline and killed_number is None:  # 1 trained, 1 training
            time.sleep(0.2)
            if not db.exists():
                continue
            try:
                con = sqlite3.connect(db, timeout=5)
                rows = con.execute(
                    "select t.number, t.state, (select count(*) from trial_user_attributes a "
                    "where a.trial_id = t.trial_id and a.key = 'latency_ms') from trials t").fetchall()
                con.close()
            except sqlite3.OperationalError:
                continue
            done = [r for r in rows if r[1] == "COMPLETE"]
            training = [r for r in rows if r[1] == "RUNNING" and r[2]]
            if done and training:
                trained_now = [t for t in _study(project).trials
                               if t.user_attrs.get("status") == "trained"]
                if trained_now:
                    workers = children(proc.pid)  # the latency worker, started by now
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_number = training[0][0]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert killed_number is not None, "never caught the search mid-trial"
    before = {t.number: (t.state, t.values) for t in _study(project).trials
              if t.state == optuna.trial.TrialState.COMPLETE}
    killed_params = _study(project).trials[killed_number].params
    time.sleep(3)  # past the grace period: the silent RUNNING trial is stale

    assert workers, "the search had started no latency worker"
    assert not [p for p in workers if alive(p)], "the latency worker outlived its search"
    cli("resume", "--study", "tiny", cwd=project)
    study = _study(project)
    for n, (state, values) in before.items():
        assert study.trials[n].state == state and study.trials[n].values == values
    assert study.trials[killed_number].state == optuna.trial.TrialState.FAIL
    rerun = [t for t in study.trials[killed_number + 1:] if t.params == killed_params]
    assert rerun and rerun[0].user_attrs.get("status") in ("trained", "duplicate")
    trained = [t for t in study.trials if t.user_attrs.get("status") == "trained"]
    assert len(trained) == 4
    assert len({t.user_attrs["arch_name"] for t in trained}) == 4


def test_bad_config_exits_2_naming_the_key(project):
    bad = project / "bad.yaml"
    bad.write_text((project / "tiny.yaml").read_text().replace("sampler: tpe", "samplr: tpe"))
    p = cli("search", "--config", "bad.yaml", cwd=project, check=False)
    assert p.returncode == 2
    assert "search.samplr" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, fragment", [
    (["--set", "budget.speedup=500"], "budget.speedup=500"),
    (["--set", "task.label_field=sentiment"], "task.label_field"),
    (["--set", "teacher.model=missing/teacher"], "teacher"),
    (["--storage", "nosuchdb://x"], "--storage"),
])
def test_user_mistakes_exit_2_with_one_line(project, args, fragment):
    p = cli("search", "--config", "tiny.yaml", "--study", "oops", *args, cwd=project, check=False)
    assert p.returncode == 2, p.stderr
    assert fragment in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_resume_of_an_unknown_study_exits_2(project):
    p = cli("resume", "--study", "nope", cwd=project, check=False)
    assert p.returncode == 2 and "--study nope" in p.stderr


def test_profile_saves_a_table_that_search_reuses_and_other_devices_refuse(project):
    out = cli_here("profile", "--config", "tiny.yaml", cwd=project).stdout
    path = Path(out.splitlines()[0].removeprefix("latency table "))
    table = json.loads(path.read_text())
    assert table["blocks"] and table["fit_points"] and table["unit_ms"] > 0
    assert table["fingerprint"]["batch_size"] == 1 and table["fingerprint"]["threads"] == 1
    assert "teacher" in out and "predicted ms" in out
    again = cli_here("profile", "--config", "tiny.yaml", cwd=project).stdout
    assert "profiled now: 0 blocks, 0 whole models" in again

    # the search predicts from it; every trained candidate's latency is recorded with its source
    cli_here("search", "--config", "tiny.yaml", "--n-trials", "2", cwd=project)
    trials = [t for t in _study(project).trials if "budget_ms" in t.user_attrs]
    assert trials and all(t.user_attrs["latency_source"].startswith(("predicted", "measured"))
                          and t.user_attrs["predicted_ms"] > 0 for t in trials)
    assert json.loads(path.read_text())["blocks"] == table["blocks"]  # nothing re-profiled

    # the same table, claimed by another machine, is refused with one line
    table["fingerprint"]["cpu"] = "Another CPU"
    other = project / "other.json"
    other.write_text(json.dumps(table))
    p = cli("search", "--config", "tiny.yaml", "--study", "elsewhere", "--set",
            f"budget.latency_table={other}", cwd=project, check=False)
    assert p.returncode == 2 and "budget.latency_table" in p.stderr and "cpu" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_multi_objective_tpe_report_and_pareto_export(project):
    cli_here("search", "--config", "tiny.yaml", "--study", "mo", "--n-trials", "4",
        "--set", "search.multi_objective=true", cwd=project)
    study = _study(project, "mo")
    assert len(study.directions) == 2
    status = cli_here("status", "--study", "mo", cwd=project).stdout
    assert "Pareto front (feasible, trained)" in status

    out = cli_here("report", "--study", "mo", "--out", "rep", cwd=project).stdout
    png = project / "rep" / "trials.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    md = (project / "rep" / "report.md").read_text()
    assert "## Pareto front" in md and "trials.png" in md
    front = [int(x) for x in out.rsplit("Pareto front:", 1)[1].replace("#", "").split(",")]
    assert front

    cli_here("export", "--study", "mo", "--pareto", "--out", "front", "--runtimes", "torch",
        cwd=project)
    for n in front:
        folder = project / "front" / f"trial_{n}"
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        report = json.loads((folder / "report.json").read_text())
        assert report["trial"] == n and model.num_parameters() == report["student"]["params"]
        assert report["student"]["predicted_ms"] > 0  # predicted beside measured


@pytest.mark.skipif(importlib.util.find_spec("nni") is not None, reason="NNI is installed here")
def test_nni_strategy_without_nni_exits_2_with_the_install_line(project):
    p = cli("search", "--config", "tiny.yaml", "--set", "search.strategy=nni-evolution",
            cwd=project, check=False)
    assert p.returncode == 2 and "tacnas[nni]" in p.stderr and "Traceback" not in p.stderr


def test_compress_with_finalists_trains_the_top_k_fully_and_ships_the_chosen_one(project,
                                                                                 monkeypatch):
    from tacnas.evaluators.training import predict_logits
    from tacnas.nas.config import load_config
    from tacnas.nas.pipeline import prepare

    recipe = ["--set", "distill.max_steps=20", "--set", "distill.eval_every=10"]
    finalists = ["--set", "search.rescore_top_k=2", "--set", "search.rescore_recipe=distill"]
    out = cli_here("compress", "--config", "tiny.yaml", "--study", "fin", "--n-trials", "4",
                   *finalists, "--set", "search.rescore_objective=agreement", *recipe,
                   "--out", "shipped", "--runtimes", "torch", cwd=project).stdout
    study = _study(project, "fin")
    top = sorted(feasible_trained(study), key=lambda t: (-t.value, t.number))[:2]
    scores = {int(k): v for k, v in study.user_attrs["rescored"].items()}
    assert set(scores) == {t.number for t in top}
    # each score is the fully trained finalist's agreement with the teacher on dev
    monkeypatch.chdir(project)
    run = prepare(load_config("tiny.yaml", ["distill.max_steps=20", "distill.eval_every=10"]),
                  progress=False)
    tags = list((project / "runs" / "fin" / "finalists").iterdir())
    assert len(tags) == 1
    teacher_pred = run.proxy.dev_logits.argmax(-1)
    for n, v in scores.items():
        best = AutoModelForSequenceClassification.from_pretrained(
            tags[0] / study.trials[n].user_attrs["arch_name"] / "best").eval()
        agree = (predict_logits(best, run.data.dev).argmax(-1) == teacher_pred).float().mean()
        assert v == pytest.approx(agree.item())
    pick = max(scores, key=lambda n: (scores[n], study.trials[n].value, -n))
    rep = json.loads((project / "shipped" / "report.json").read_text())
    assert rep["trial"] == pick and "by agreement with the teacher" in out
    # the winner is not trained twice: compress continues from the finalist's finished run
    assert "trained it already" in out and rep["distill"]["steps_run"] == 20
    state = tags[0] / study.trials[pick].user_attrs["arch_name"] / "checkpoint" / "state.json"
    assert rep["distill"]["train_seconds"] == json.loads(state.read_text())["seconds"]
    shipped = AutoModelForSequenceClassification.from_pretrained(project / "shipped").eval()
    x = torch.randint(5, shipped.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(shipped(input_ids=x).logits, best_of(tags[0], study, pick)(input_ids=x)
                           .logits)

    # another objective re-decides from the same finalists, none trained again
    before = state.read_text()
    cli_here("search", "--config", "tiny.yaml", "--study", "fin", "--n-trials", "4", *finalists,
             "--set", "search.rescore_objective=metric", *recipe, cwd=project)
    again = {int(k): v for k, v in _study(project, "fin").user_attrs["rescored"].items()}
    assert set(again) == set(scores) and state.read_text() == before
    for n, v in again.items():
        best = best_of(tags[0], study, n)
        acc = (predict_logits(best, run.data.dev).argmax(-1) == run.data.dev.labels).float()
        assert v == pytest.approx(acc.mean().item())


def test_finalists_below_the_lead_of_those_before_them_are_pruned_and_never_chosen(project):
    from tacnas.evaluators.checkpoint import read_state
    from tacnas.nas.study import best_trial

    margin = 0.02
    cli_here("search", "--config", "tiny.yaml", "--study", "prune", "--n-trials", "5",
             "--set", "search.rescore_top_k=4", "--set", "search.rescore_recipe=distill",
             "--set", f"search.rescore_prune={margin}", "--set", "distill.max_steps=30",
             "--set", "distill.eval_every=5", "--set", "distill.patience=0", cwd=project)
    study = _study(project, "prune")
    assert study.user_attrs["rescore_setting"]["prune"] == margin
    top = sorted(feasible_trained(study), key=lambda t: (-t.value, t.number))[:4]
    scores = {int(k): v for k, v in study.user_attrs["rescored"].items()}
    (tag,) = (project / "runs" / "prune" / "finalists").iterdir()
    lead, seen = {}, set()
    for t in top:  # trained in this order, each against the finished ones before it
        name = t.user_attrs["arch_name"]
        if name in seen:
            continue
        seen.add(name)
        state = read_state(tag / name / "checkpoint")
        below = [s for s, v in state["curve"] if s in lead and v < lead[s] - margin]
        if scores[t.number] is None:  # pruned at the first evaluation below the lead
            assert state["pruned_at"] == below[0] == state["curve"][-1][0] < 30
        else:
            assert not below and state["step"] == 30 and not state.get("pruned_at")
            for s, v in state["curve"]:
                lead[s] = max(lead.get(s, v), v)
    assert scores[top[0].number] is not None  # the first has no lead to keep up with
    assert None in scores.values()  # here a 3-layer, 32-wide finalist is 0.4 behind at step 5
    assert scores[best_trial(study).number] is not None


def best_of(folder: Path, study: optuna.Study, n: int):
    return AutoModelForSequenceClassification.from_pretrained(
        folder / study.trials[n].user_attrs["arch_name"] / "best").eval()

"""The faults a user meets, through the CLI on the tiny config: a bad input exits 2 with one
line naming the field (no traceback, nothing written outside the run folder, an existing study
unharmed); a diverged trial fails instead of counting; a study name is never a path; a cache
that does not load is rebuilt with a one-line warning; a mistake found after a study exists
does not lock its name; Ctrl-C is one line and exit 130."""

from __future__ import annotations

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
from safetensors.torch import load_file, save_file

from tacnas.nas.record import TrialRecord, TrialStatus
from tests import tiny_assets
from tests.conftest import ROOT, cli, cli_here, default_sigint

pytestmark = pytest.mark.slow


def _study(folder: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder}/runs/{name}/study.db")


def _snapshot(study: optuna.Study) -> list:
    return [(t.number, t.state, t.values, t.user_attrs) for t in study.get_trials()]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A project with a finished tiny study ("tiny", 2 trained) and the bad inputs' files."""
    proj = tmp_path_factory.mktemp("faults")
    tiny_assets.build(proj / "tiny")
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    (proj / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    env = {"TACNAS_CACHE": str(proj / "cache")}
    cli_here("search", "--config", "tiny.yaml", "--n-trials", "2", cwd=proj, env=env)
    (proj / "latin1.yaml").write_bytes("task: {dataset: caf\xe9.csv}\n".encode("latin-1"))
    (proj / "five.csv").write_text("text,label\n" + "".join(
        f"good film number {i},{'positive' if i % 2 else 'negative'}\n" for i in range(5)))
    (proj / "one.csv").write_text("text,label\n" + "".join(
        f"a fine text number {i},positive\n" for i in range(40)))
    (proj / "mine").mkdir()
    (proj / "mine" / "config.json").write_text("{}")  # a user's own folder
    return proj, env


BAD = {
    "malformed --set value": (["search", "--config", "tiny.yaml", "--study", "b",
                               "--set", "search.n_trials=[1"], "--set search.n_trials"),
    "non-UTF-8 config": (["search", "--config", "latin1.yaml", "--study", "b"], "--config"),
    "5-row dataset": (["search", "--config", "tiny.yaml", "--study", "b",
                       "--set", "task.dataset=five.csv"], "task.split"),
    "single-class dataset": (["search", "--config", "tiny.yaml", "--study", "b",
                              "--set", "task.dataset=one.csv"], "task.label_field"),
    "unwritable cache_dir": (["search", "--config", "tiny.yaml", "--study", "b",
                              "--set", "cache_dir=tiny.yaml/cache"], "cache_dir"),
    "groups that do not divide the layers": (
        ["search", "--config", "tiny.yaml", "--study", "b", "--set", "space.num_layers=[3]",
         "--set", "space.num_hidden_groups=[2]"], "num_hidden_groups"),
    "embedding wider than hidden": (
        ["search", "--config", "tiny.yaml", "--study", "b", "--set",
         "space.embedding_size=[128]"], "embedding_size"),
    "study name with ..": (["search", "--config", "tiny.yaml", "--study", "../../x"], "--study"),
    "absolute study name": (["search", "--config", "tiny.yaml", "--study", "/tmp/x"], "--study"),
    "status of a path": (["status", "--study", "../tiny"], "--study"),
    "resume --n-trials -3": (["resume", "--study", "tiny", "--n-trials", "-3"], "--n-trials"),
    "search --timeout -5": (["search", "--config", "tiny.yaml", "--timeout", "-5"], "--timeout"),
    "export --out a file": (["export", "--study", "tiny", "--out", "tiny.yaml"], "--out"),
    "export into a user's folder": (["export", "--study", "tiny", "--out", "mine"], "--out"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_input_exits_2_with_one_line_and_harms_nothing(searched, case):
    proj, env = searched
    args, field = BAD[case]
    before = _snapshot(_study(proj, "tiny"))
    outside = {p.name for p in proj.parent.iterdir()}
    top = {p.name for p in proj.iterdir()}
    p = cli(*args, cwd=proj, check=False, env=env)
    assert p.returncode == 2, (case, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in p.stderr, (case, lines)
    assert {p.name for p in proj.parent.iterdir()} == outside  # nothing beside the project
    assert {p.name for p in proj.iterdir()} <= top | {"runs"}
    assert _snapshot(_study(proj, "tiny")) == before  # the existing study is unharmed
    assert (proj / "mine" / "config.json").read_text() == "{}"
    assert not (proj / "runs" / "b" / "study.db").exists() or not optuna.get_all_study_names(
        f"sqlite:///{proj}/runs/b/study.db")  # no study was made from a bad config


def test_a_diverged_trial_fails_and_is_never_exported(searched):
    proj, env = searched
    p = cli("search", "--config", "tiny.yaml", "--study", "nan", "--set", "proxy.lr=1e8",
            cwd=proj, check=False, env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    *warnings, error = p.stderr.strip().splitlines()  # a line per failed trial, then the error
    assert error.startswith("error: proxy.lr") and "lower proxy.lr" in error, p.stderr
    # every line before the error is a warning (a timing one may come first: the tiny teacher's
    # 1 ms reading can move past the latency table's 15% tolerance), one per failed trial
    assert all(w.startswith("WARNING ") for w in warnings), p.stderr
    trials = [w for w in warnings if " failed: " in w]
    assert len(trials) >= 3 and all("failed: proxy.lr: training diverged" in w for w in trials), \
        p.stderr
    study = _study(proj, "nan")
    failed = [(t, TrialRecord.read(t)) for t in study.trials
              if TrialRecord.read(t).status is TrialStatus.DIVERGED]
    assert len(failed) >= 3 and not any(TrialRecord.read(t).trained for t in study.trials)
    for t, r in failed:  # Optuna FAIL, the reason recorded, no checkpoint written
        assert t.state == optuna.trial.TrialState.FAIL and "proxy.lr" in r.reason
        assert not (proj / "runs" / "nan" / "checkpoints" / f"trial_{t.number}").exists()
    p = cli("export", "--study", "nan", "--out", "nan_export", cwd=proj, check=False, env=env)
    assert p.returncode == 2 and not (proj / "nan_export").exists()


def test_export_refuses_non_finite_weights(searched):
    proj, env = searched
    trial = next(t for t in _study(proj, "tiny").trials if TrialRecord.read(t).trained)
    weights = proj / "runs" / "tiny" / "checkpoints" / f"trial_{trial.number}" / "model.safetensors"
    good = weights.read_bytes()
    try:
        state = load_file(weights)
        state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                 for k, v in state.items()}
        save_file(state, weights)
        p = cli("export", "--study", "tiny", "--trial", str(trial.number), "--out", "nan_out",
                cwd=proj, check=False, env=env)
        assert p.returncode == 2 and "non-finite" in p.stderr, p.stderr
        assert not (proj / "nan_out").exists()
    finally:
        weights.write_bytes(good)


def test_a_mistake_found_after_the_study_exists_does_not_lock_its_name(searched):
    proj, env = searched
    p = cli("search", "--config", "tiny.yaml", "--study", "late", "--set", "budget.speedup=500",
            cwd=proj, check=False, env=env)  # found late: after the data, teacher and table
    assert p.returncode == 2 and "budget.speedup" in p.stderr
    out = cli("search", "--config", "tiny.yaml", "--study", "late", "--n-trials", "1",
              cwd=proj, env=env)
    assert "1 trained of 1 requested" in out.stdout
    assert "config is replaced" in out.stderr


def test_ctrl_c_is_one_line_and_exit_130(searched):
    proj, env = searched
    args = [sys.executable, str(ROOT / "run_search.py"), "--quiet", "search", "--config",
            "tiny.yaml", "--study", "ctrlc", "--n-trials", "3", "--set", "proxy.steps=3000"]
    proc = subprocess.Popen(args, cwd=proj, env={**os.environ, **env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=default_sigint)
    db = proj / "runs" / "ctrlc" / "study.db"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # until a candidate is training
            time.sleep(0.3)
            try:
                con = sqlite3.connect(db, timeout=5)
                running = con.execute(
                    "select count(*) from trials t join trial_user_attributes a on "
                    "a.trial_id = t.trial_id where t.state = 'RUNNING' and a.key = 'latency_ms'"
                ).fetchone()[0]
                con.close()
            except sqlite3.OperationalError:
                continue
            if running:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    # one line for the interrupt (warnings the run printed before it, e.g. a timing one, aside)
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("WARNING ")]
    assert "Traceback" not in err and len(lines) == 1, err


def _first_file(folder: Path, pattern: str) -> Path:
    found = sorted(folder.rglob(pattern))
    assert found, f"no {pattern} under {folder}"
    return found[0]


CACHES = {  # what to truncate, found after a first run
    "teacher": lambda proj: _first_file(proj / "cache" / "teachers", "model.safetensors"),
    "logits": lambda proj: _first_file(proj / "cache" / "logits", "*.safetensors"),
    "latency table": lambda proj: _first_file(proj / "cache" / "latency", "*.json"),
    "supernet": lambda proj: _first_file(proj / "cache" / "supernet", "supernet.safetensors"),
    "trial checkpoint": lambda proj: _first_file(proj / "runs" / "sn" / "checkpoints",
                                                 "model.safetensors"),
}


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A fine-tuned teacher, its logits, the latency table, a supernet and a trial checkpoint,
    all in this project's own cache."""
    proj = tmp_path_factory.mktemp("caches")
    tiny_assets.build(proj / "tiny")
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["teacher"] = {"finetune_from": "tiny/teacher", "epochs": 0.2, "lr": 1e-4}
    cfg["proxy"].update(kind="supernet", supernet_steps=20, steps=5, eval_every=0,
                        repeats=2)  # a search with repeated candidates, and its export
    (proj / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    env = {"TACNAS_CACHE": str(proj / "cache")}
    cli_here("search", "--config", "tiny.yaml", "--study", "sn", "--n-trials", "1", cwd=proj, env=env)
    return proj, env


def test_every_cache_that_does_not_load_is_rebuilt_with_one_warning_each(cached):
    """The fine-tuned teacher, its logits, the latency table and the supernet, truncated
    together: the next search rebuilds each, with one warning naming each file."""
    proj, env = cached
    paths = {kind: CACHES[kind](proj) for kind in ("teacher", "logits", "latency table",
                                                   "supernet")}
    for path in paths.values():
        path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])  # truncated
    p = cli("search", "--config", "tiny.yaml", "--study", "again", "--n-trials", "1", cwd=proj,
            env=env)
    warnings = [line for line in p.stderr.splitlines() if "does not load" in line]
    assert "Traceback" not in p.stderr and len(warnings) == len(paths), p.stderr
    for kind, path in paths.items():
        folder = path.parent if kind == "teacher" else path  # a teacher is a folder
        assert sum(str(folder) in w for w in warnings) == 1, (kind, warnings)
        assert all("rebuilt" in w for w in warnings)
        assert path.is_file() and path.stat().st_size > 0, kind  # made again


def test_a_trial_checkpoint_that_does_not_load_is_trained_again_at_export(cached):
    proj, env = cached
    path = CACHES["trial checkpoint"](proj)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    trained = next(t.number for t in _study(proj, "sn").trials if TrialRecord.read(t).trained)
    p = cli("export", "--study", "sn", "--trial", str(trained), "--out", "exp", "--runtimes",
            "torch", cwd=proj, env=env)  # that trial (the study's final budget may have tightened past it)
    warnings = [line for line in p.stderr.splitlines() if "does not load" in line]
    assert len(warnings) == 1 and str(path.parent) in warnings[0], p.stderr
    assert (proj / "exp" / "report.json").is_file() and path.stat().st_size > 0

"""Scores with their uncertainty: standard errors, the weak-teacher and not-separated warnings,
and the label-free objective (agreement with the teacher on an unlabeled pool)."""

from __future__ import annotations

import csv
import json

import numpy as np
import optuna
import pytest
import torch
from sklearn.metrics import f1_score, matthews_corrcoef
from transformers import BertForSequenceClassification

from tacnas.evaluators.metrics import (
    baseline_metrics,
    compute_metrics,
    overlapping,
    weak_teacher,
)
from tacnas.nas.optuna_search import run_search
from tacnas.nas.report import status_text
from tacnas.nas.study import create_or_load, default_storage
from tests import tiny_assets
from tests.conftest import cli, cli_here, fake_run


def _noisy(n: int, seed: int, k: int = 3, signal: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g)
    logits[torch.arange(n), y] += signal
    return logits, y


def test_standard_errors_match_a_direct_bootstrap_over_examples():
    logits, y = _noisy(400, 0)
    teacher, _ = _noisy(400, 1)
    m = compute_metrics(logits, y, teacher)
    assert m["n"] == 400
    pred, t, yy = logits.argmax(-1).numpy(), teacher.argmax(-1).numpy(), y.numpy()
    rng = np.random.default_rng(7)
    draws = {"accuracy": [], "f1_macro": [], "mcc": [], "agreement": []}
    for _ in range(1500):
        i = rng.integers(0, 400, 400)
        draws["accuracy"].append((yy[i] == pred[i]).mean())
        draws["f1_macro"].append(f1_score(yy[i], pred[i], average="macro", zero_division=0))
        draws["mcc"].append(matthews_corrcoef(yy[i], pred[i]))
        draws["agreement"].append((t[i] == pred[i]).mean())
    for k, v in draws.items():
        assert m[f"{k}_se"] == pytest.approx(np.std(v, ddof=1), rel=0.12), k
    # binomial arithmetic for accuracy, and more data is less uncertain
    p = m["accuracy"]
    assert m["accuracy_se"] == pytest.approx((p * (1 - p) / 400) ** 0.5, rel=0.1)
    big = compute_metrics(*_noisy(6400, 0))
    assert big["accuracy_se"] < m["accuracy_se"] / 3


def test_weak_teacher_fires_near_the_majority_baseline_and_not_for_a_real_teacher():
    y = torch.tensor([0] * 60 + [1] * 25 + [2] * 15)  # majority class 0: accuracy .60
    base = baseline_metrics(y, y, 3)
    assert base["accuracy"] == pytest.approx(0.60)
    near = torch.zeros(100, 3)
    near[:, 0] = 1.0
    near[60:66, 1] = 2.0  # 6 of class 1 right, 0 wrong: accuracy .66
    line = weak_teacher(compute_metrics(near, y), base, "accuracy")
    assert line is not None and "weak teacher" in line and "0.600" in line and "\n" not in line
    good = torch.nn.functional.one_hot(y, 3).float()
    good[:8] = torch.tensor([0.0, 1.0, 0.0])  # 92% right
    assert weak_teacher(compute_metrics(good, y), base, "accuracy") is None


def test_not_separated_fires_only_when_the_best_interval_overlaps_another():
    far = [("#0 a", 0.80, 0.01), ("#1 b", 0.70, 0.01), ("#2 c", 0.60, 0.01)]
    assert overlapping(far, n=3000, what="dev") is None
    near = [("#0 a", 0.80, 0.03), ("#1 b", 0.76, 0.03), ("#2 c", 0.60, 0.01)]
    line = overlapping(near, n=90, what="dev")
    assert line is not None and "#0 a" in line and "1 other " in line and "#1 b" in line
    assert "90 examples" in line and "task.unlabeled" in line
    assert overlapping([("#0 a", 0.8, None), ("#1 b", 0.79, None)], n=None, what="dev") is None


@pytest.mark.parametrize("se, warned", [(0.2, True), (1e-4, False)])
def test_status_shows_each_score_with_its_error_and_warns_when_noise_ranks(tmp_path, se, warned):
    run = fake_run(tmp_path, "tpe", n_trials=6, se=se)
    study = create_or_load("s", default_storage(run.cfg.run_dir, "s"), run.cfg)
    run_search(run, study, n_trials=6, timeout=None)
    text = status_text(study)
    assert f"± {se:.4f}" in text
    assert ("not separated" in text) is warned
    assert "score: dev accuracy (synthetic)" in text


def test_a_weak_teacher_is_warned_in_one_line_and_kept_in_status_and_the_report(project):
    # an untrained teacher of the tiny shape answers about as well as the majority class
    tok = tiny_assets.make_tokenizer()
    torch.manual_seed(3)
    weak = BertForSequenceClassification(tiny_assets.tiny_teacher_config(tok.vocab_size))
    weak.save_pretrained(project / "weak")
    tok.save_pretrained(project / "weak")
    # speedup 1.0: every candidate (at most 3 of the teacher's 4 layers) stays within the
    # budget however the teacher's 1 ms reading moves between search and export
    p = cli("search", "--config", "tiny.yaml", "--study", "w", "--n-trials", "1",
            "--set", "teacher.model=weak", "--set", "proxy.steps=5",
            "--set", "budget.speedup=1.0", cwd=project)
    warn = [ln for ln in p.stderr.splitlines() if "weak teacher" in ln]
    assert len(warn) == 1 and "teacher.epochs" in warn[0]
    assert "warning: weak teacher" in cli_here("status", "--study", "w", cwd=project).stdout
    cli_here("export", "--study", "w", "--out", "ex", "--runtimes", "torch", cwd=project)
    rep = json.loads((project / "ex" / "report.json").read_text())
    assert any("weak teacher" in w for w in rep["warnings"])


def test_label_free_objective_ranks_by_agreement_on_the_unlabeled_pool(project):
    rows = tiny_assets.make_rows(500, seed=11)  # other texts of the same task, labels dropped
    with open(project / "pool.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        w.writerows([r[0]] for r in rows)
    out = cli_here("search", "--config", "tiny.yaml", "--study", "u", "--n-trials", "2",
              "--set", "task.unlabeled=pool.csv", "--set", "proxy.objective=agreement",
              "--set", "proxy.steps=10", "--set", "budget.speedup=1.0", cwd=project).stdout
    assert "trained" in out
    storage = f"sqlite:///{project / 'runs' / 'u' / 'study.db'}"
    study = optuna.load_study(study_name="u", storage=storage)
    trained = [t for t in study.trials if t.user_attrs.get("status") == "trained"]
    assert len(trained) == 2
    for t in trained:
        m = t.user_attrs["metrics"]
        assert t.value == m["pool_agreement"] and t.user_attrs["score_se"] == m["pool_agreement_se"]
        assert 400 <= m["pool_n"] <= 520 and m["n"] < m["pool_n"]  # the pool, not dev
        assert "accuracy" in m and "accuracy_se" in m  # the dev metric is kept beside it
    status = cli_here("status", "--study", "u", cwd=project).stdout
    assert "score: agreement with the teacher on" in status and "unlabeled texts" in status
    exp = cli_here("export", "--study", "u", "--out", "ex", "--runtimes", "torch", cwd=project).stdout
    rep = json.loads((project / "ex" / "report.json").read_text())
    assert "unlabeled" in rep["ranked_by"]
    for side in ("student", "teacher"):
        for split in ("dev", "test"):
            m = rep[side][split]
            assert m["accuracy_se"] > 0 or m["accuracy"] == 1.0, (side, split)  # none at 100%
    assert "±" in exp and "ranked candidates by agreement" in exp
    # a pool file without the text column is one line naming the field
    (project / "bad.csv").write_text("body\nhello\n")
    p = cli("search", "--config", "tiny.yaml", "--study", "b", "--n-trials", "1",
            "--set", "task.unlabeled=bad.csv", cwd=project, check=False)
    assert p.returncode == 2 and "task.unlabeled" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1

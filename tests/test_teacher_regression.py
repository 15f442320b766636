"""Fine-tuning a teacher here (cached), and a regression task scored by Pearson."""

from __future__ import annotations

import csv

import pytest

from tacnas.errors import UserError
from tacnas.evaluators.data import load_task
from tacnas.evaluators.teacher import cache_root
from tacnas.nas.config import config_from_dict
from tacnas.nas.pipeline import prepare
from tacnas.searchspace.arch import ArchConfig
from tests.tiny_assets import NEG, POS, make_rows


def _cfg(tiny_dir, tmp_path, **task):
    return config_from_dict(dict(
        task=dict(dataset=str(tmp_path / "scores.csv"), max_length=32, **task),
        teacher=dict(finetune_from=str(tiny_dir / "tiny" / "teacher"), epochs=3, lr=1e-3),
        space=dict(num_layers=[1, 2], hidden_size=[32, 64], intermediate_size=[64]),
        budget=dict(speedup=1.2, seq_len=32, threads=1),
        proxy=dict(steps=80, lr=1e-3),
        run_dir=str(tmp_path / "runs"),
    ))


@pytest.fixture
def scores_csv(tmp_path):
    with open(tmp_path / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "score"])
        for text, _ in make_rows(900, seed=7):
            words = text.split()
            w.writerow([text, sum(x in POS for x in words) - sum(x in NEG for x in words)])
    return tmp_path


def test_regression_teacher_is_fine_tuned_once_and_students_score_pearson(tiny_dir, scores_csv):
    cfg = _cfg(tiny_dir, scores_csv, problem="regression", label_field="score")
    assert cfg.task.metric == "pearson"
    run = prepare(cfg, progress=False)
    assert run.data.num_labels == 1 and run.teacher.model.config.num_labels == 1
    assert run.teacher_dev["pearson"] > 0.8, run.teacher_dev
    folders = list((cache_root(None) / "teachers").iterdir())
    again = prepare(cfg, progress=False)  # the cached teacher is reused, not fine-tuned again
    assert list((cache_root(None) / "teachers").iterdir()) == folders
    assert again.teacher.path == run.teacher.path

    result, model = run.proxy.evaluate(ArchConfig(2, 64, 4, 64, 64, 2), progress=False)
    assert result.score == result.metrics["pearson"] > 0.5, result.metrics
    assert model.config.num_labels == 1


def test_regression_needs_numeric_labels_and_a_fitting_metric(tiny_dir, scores_csv):
    with pytest.raises(UserError, match="task.metric 'accuracy' does not fit a regression"):
        _cfg(tiny_dir, scores_csv, problem="regression", metric="accuracy", label_field="score")
    (scores_csv / "scores.csv").write_text("text,score\ngood day,high\nbad day,1\n")
    cfg = _cfg(tiny_dir, scores_csv, problem="regression", label_field="score")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir / "tiny" / "teacher")
    with pytest.raises(UserError, match="holds 'high', not a number"):
        load_task(cfg.task, tok)

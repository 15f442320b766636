"""Deployment runtimes: the ONNX graphs an export ships, the int8 budget backend, and the
one-line errors where ONNX Runtime is missing (evaluators/runtime.py, nas/deploy.py)."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import cli, cli_here

pytestmark = pytest.mark.slow
ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")

FP32_ATOL = 1e-4  # fp32 ONNX Runtime against PyTorch: max |logit difference|
INT8_AGREEMENT = 0.9  # int8 predictions equal to the fp32 model's, on the tiny test set


def _texts(project, n: int = 64) -> list[str]:
    import csv

    with open(project / "tiny" / "data.csv", newline="") as f:
        return [row["text"] for _, row in zip(range(n), csv.DictReader(f))]


def test_export_ships_onnx_graphs_that_plain_onnxruntime_runs(project):
    # an ALBERT-style student (factorized embedding, one shared group): the harder export
    (project / "arch.json").write_text(json.dumps({
        "num_layers": 2, "hidden_size": 64, "num_heads": 4, "intermediate_size": 128,
        "embedding_size": 16, "num_hidden_groups": 1}))
    cli_here("distill", "--arch", "arch.json", "--config", "tiny.yaml", "--set",
        "distill.max_steps=30", "--out", "shipped", cwd=project)
    out = project / "shipped"
    assert (out / "model.onnx").is_file() and (out / "model.int8.onnx").is_file()
    assert (out / "model.int8.onnx").stat().st_size < 0.8 * (out / "model.onnx").stat().st_size
    # every linear layer of both (shared) layers runs in int8, the shared weights included:
    # 6 per layer (query, key, value, output, FFN in and out), called twice
    import onnx

    ops = [n.op_type for n in onnx.load(out / "model.int8.onnx").graph.node]
    assert ops.count("MatMulInteger") >= 2 * 6

    # what a user does: the tokenizer and a plain ONNX Runtime session, no tacnas
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(_texts(project), padding=True, truncation=True, max_length=32, return_tensors="np")
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy()
    outputs = {}
    for name in ("model.onnx", "model.int8.onnx"):
        s = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        feeds = {i.name: enc[i.name] for i in s.get_inputs()}
        (outputs[name],) = s.run(["logits"], feeds)
    assert np.abs(outputs["model.onnx"] - ref).max() < FP32_ATOL
    agree = (outputs["model.int8.onnx"].argmax(-1) == ref.argmax(-1)).mean()
    assert agree >= INT8_AGREEMENT

    rep = json.loads((out / "report.json").read_text())
    rows = {r["backend"]: r for r in rep["runtimes"]}
    assert set(rows) == {"torch", "onnxruntime", "onnxruntime-int8"}
    for r in rows.values():
        assert r["student_ms"] > 0 and r["teacher_ms"] > 0 and np.isfinite(r["speedup"])
        assert r["paired_speedup"] > 0 and np.isfinite(r["paired_speedup"])
        assert 0 <= r["student_test"]["accuracy"] <= 1 and 0 <= r["agreement"] <= 1
    assert rows["torch"]["agreement"] == 1.0 and rows["onnxruntime"]["agreement"] == 1.0
    assert rows["onnxruntime"]["max_logit_diff"] < FP32_ATOL
    assert rows["onnxruntime-int8"]["agreement"] >= INT8_AGREEMENT
    assert rep["student"]["latency_ms"] == rows["torch"]["student_ms"]  # budget.backend: torch
    assert "onnxruntime-int8" in (out / "report.md").read_text()
    assert rep["paired_speedup"] == rows["torch"]["paired_speedup"]


def test_int8_backend_budgets_and_scores_the_int8_student(project):
    out = cli_here("search", "--config", "tiny.yaml", "--study", "i8", "--n-trials", "1",
              "--set", "budget.backend=onnxruntime-int8", "--set", "budget.latency=measure",
              cwd=project).stdout
    assert "1 trained of 1 requested" in out
    study = optuna.load_study(study_name="i8",
                              storage=f"sqlite:///{project / 'runs' / 'i8' / 'study.db'}")
    trained = [t for t in study.trials if t.user_attrs.get("status") == "trained"]
    assert len(trained) == 1
    for t in trained:  # scored in the runtime it ships in; the fp32 score beside it
        a = t.user_attrs
        assert t.value == a["score"] and 0 <= a["fp32_score"] <= 1
        assert abs(a["score"] - a["fp32_score"]) <= 0.1
        assert a["latency_ms"] <= a["budget_ms"]
    status = cli_here("status", "--study", "i8", cwd=project).stdout
    assert "score ± s.e. (int8)" in status and "fp32 score" in status
    cli_here("export", "--study", "i8", "--runtimes", "onnxruntime-int8", "--out", "exp", cwd=project)
    rep = json.loads((project / "exp" / "report.json").read_text())
    assert rep["backend"] == "onnxruntime-int8"
    assert [r["backend"] for r in rep["runtimes"]] == ["onnxruntime-int8"]
    row = rep["runtimes"][0]
    assert rep["student"]["latency_ms"] == row["student_ms"]
    assert rep["student"]["test"] == row["student_test"]  # the main figures are int8's
    assert (project / "exp" / "model.int8.onnx").is_file()


def test_missing_onnxruntime_is_one_line_with_the_install(project, without_onnx):
    p = cli("search", "--config", "tiny.yaml", "--set", "budget.backend=onnxruntime-int8",
            cwd=project, check=False, env=without_onnx)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "budget.backend=onnxruntime-int8" in p.stderr and "pip install 'tacnas[onnx]'" in p.stderr
    p = cli("export", "--study", "none", "--runtimes", "torch,onnxruntime", "--out", "x",
            cwd=project, check=False, env=without_onnx)
    assert p.returncode == 2 and "--runtimes" in p.stderr and "tacnas[onnx]" in p.stderr
    p = cli("export", "--study", "none", "--runtimes", "tensorrt", "--out", "x", cwd=project,
            check=False)
    assert p.returncode == 2 and "--runtimes tensorrt" in p.stderr and "Traceback" not in p.stderr

    # without the extra, an export still ships the transformers folder, measured in PyTorch
    (project / "arch.json").write_text(json.dumps({
        "num_layers": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64,
        "embedding_size": 32, "num_hidden_groups": 1}))
    p = cli("distill", "--arch", "arch.json", "--config", "tiny.yaml", "--set",
            "distill.max_steps=5", "--out", "plain", cwd=project, env=without_onnx)
    assert "ONNX Runtime is not installed" in p.stderr
    rep = json.loads((project / "plain" / "report.json").read_text())
    assert [r["backend"] for r in rep["runtimes"]] == ["torch"]
    assert not (project / "plain" / "model.onnx").exists()

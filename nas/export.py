"""Export a trial as a Hugging Face folder, with arch.json and a report measured again.

What the proxy trained is what is written: the trial's checkpoint (saved by the search). If the
checkpoint is not on this machine (a worker elsewhere ran the trial), the candidate is trained
again with the same proxy and seed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import optuna
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tacnas.errors import UserError
from tacnas.evaluators.latency_table import cpu_name
from tacnas.evaluators.metrics import compute_metrics
from tacnas.evaluators.training import predict_logits
from tacnas.nas.pipeline import Run
from tacnas.nas.record import TrialRecord, TrialStatus
from tacnas.nas.report import comparison_text
from tacnas.nas.study import best_trial, checkpoint_dir

log = logging.getLogger(__name__)


def pick_trial(study: optuna.Study, number: int | None) -> optuna.trial.FrozenTrial:
    """The study's best trial, or trial ``number`` (a duplicate: the trial that trained it)."""
    if number is None:
        best = best_trial(study)
        if best is None:
            raise UserError(f"--study {study.study_name}: no trained candidate within the budget yet")
        return best
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise UserError(f"--trial {number}: the study has trials 0..{len(trials) - 1}")
    t = trials[number]
    r = TrialRecord.read(t)
    if r.status is TrialStatus.DUPLICATE:  # the architecture was trained by another trial
        t = trials[r.duplicate_of]
        r = TrialRecord.read(t)
    if not r.trained:
        status = r.status.value if r.status is not None else t.state.name
        raise UserError(f"--trial {number}: it was not trained (status {status}); pick a trained "
                        "trial from `status`")
    return t


def search_summary(study_name: str, trial: optuna.trial.FrozenTrial) -> dict:
    """What the search recorded of a trial, for the export's report."""
    r = TrialRecord.read(trial)
    return {"study": study_name, "trial": trial.number, "search_latency_ms": r.latency_ms,
            "search_latency_source": r.latency_source or "measured",
            "search_dev_score": r.score}


def export_trial(run: Run, study: optuna.Study, trial: optuna.trial.FrozenTrial, out: Path) -> dict:
    arch = TrialRecord.read(trial).arch
    ckpt = checkpoint_dir(run.cfg.run_dir, study.study_name, trial.number)
    if (ckpt / "config.json").is_file():
        model = AutoModelForSequenceClassification.from_pretrained(ckpt)
    else:
        log.warning("checkpoint %s not found here: training trial %d again", ckpt, trial.number)
        _, model = run.proxy.evaluate(arch, progress=run.progress)
    return write_folder(run, model, arch, out, label=f"student (trial #{trial.number})",
                        title=f"{study.study_name} trial {trial.number}: {arch.name}",
                        budget_ms=study.user_attrs.get("budget_ms"),
                        search=search_summary(study.study_name, trial))


def write_folder(run: Run, model, arch, out: Path, *, label: str, title: str,
                 budget_ms: float | None, search: dict | None = None,
                 extra: dict | None = None) -> dict:
    """The Hugging Face folder (weights, tokenizer, arch.json) and its report: latency measured
    here (and predicted), beside the teacher's, in one run; dev and test scores of both."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(run.teacher.path).save_pretrained(out)
    (out / "arch.json").write_text(json.dumps(arch.to_dict(), indent=2) + "\n")

    # measure what a user loads, the teacher beside it, in this one run
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    try:
        student_ms = run.meter.folder_ms(out)
        teacher_ms = run.meter.teacher_ms()
    finally:
        run.meter.close()
    predicted = run.latency.raw(arch)
    teacher_predicted = run.latency.teacher_predicted()
    data = run.data
    s_dev = compute_metrics(predict_logits(loaded, data.dev), data.dev.labels)
    s_test = compute_metrics(predict_logits(loaded, data.test), data.test.labels)
    b = run.cfg.budget
    search = search or {}
    report = {
        "label": label,
        "study": search.get("study"),
        "trial": search.get("trial"),
        "metric": data.metric,
        "budget_ms": budget_ms,
        "speedup": teacher_ms / student_ms,
        "student": {
            "arch": arch.name, "class": type(loaded).__name__, "latency_ms": student_ms,
            "search_latency_ms": search.get("search_latency_ms"),
            "search_latency_source": search.get("search_latency_source"),
            "predicted_ms": predicted,
            "params": sum(p.numel() for p in loaded.parameters()),
            "dev": s_dev, "test": s_test, "search_dev_score": search.get("search_dev_score"),
        },
        "teacher": {
            "arch": "L{num_hidden_layers}-H{hidden_size}-A{num_attention_heads}-"
                    "F{intermediate_size}".format(**run.teacher.model.config.to_dict()),
            "path": run.teacher.path, "latency_ms": teacher_ms, "predicted_ms": teacher_predicted,
            "params": run.teacher_params,
            "dev": run.teacher_dev, "test": run.teacher_test(),
        },
        "measurement": {
            "batch_size": b.batch_size, "seq_len": b.seq_len, "threads": b.threads,
            "repeats": b.repeats, "rounds": b.rounds, "device": cpu_name(),
            "torch": torch.__version__, "unit_ms": run.meter.unit_ms,
            "latency_table": str(run.latency.path) if run.latency.path else None,
        },
        **(extra or {}),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    text = comparison_text(report)
    (out / "report.md").write_text(f"# {title}\n\n```\n{text}\n```\n")
    return report

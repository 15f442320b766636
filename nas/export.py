"""Export a trial as a Hugging Face folder, with arch.json and a report measured again.

What the proxy trained is what is written: the trial's checkpoint (saved by the search). If the
checkpoint is not on this machine (a worker elsewhere ran the trial), the candidate is trained
again with the same proxy and seed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import optuna
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tacnas.errors import UserError
from tacnas.evaluators.checkpoint import discard
from tacnas.evaluators.latency_table import cpu_name
from tacnas.evaluators.metrics import compute_metrics
from tacnas.evaluators.runtime import runtime_versions, write_onnx
from tacnas.evaluators.training import check_finite, predict_logits
from tacnas.nas.deploy import choose_runtimes, measure_runtimes
from tacnas.nas.pipeline import Run
from tacnas.nas.record import TrialRecord, TrialStatus
from tacnas.nas.report import comparison_text
from tacnas.nas.study import best_trial, checkpoint_dir, finalist_ms, finalist_source, floor_unmet

log = logging.getLogger(__name__)


def pick_trial(study: optuna.Study, number: int | None) -> optuna.trial.FrozenTrial:
    """The study's best trial, or trial ``number`` (a duplicate: the trial that trained it)."""
    if number is None:
        best = best_trial(study)
        if best is None:
            raise UserError(floor_unmet(study) or
                            f"--study {study.study_name}: no trained candidate within the budget yet")
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


def search_summary(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict:
    """What the search recorded of a trial, for the export's report: its score with the
    standard error, what ranked the candidates, and the study's warnings on its scores."""
    from tacnas.nas.report import score_warnings

    r = TrialRecord.read(trial)
    measured = finalist_ms(study).get(trial.number)
    return {"study": study.study_name, "trial": trial.number,
            "search_latency_ms": r.latency_ms if measured is None else measured,
            "search_latency_source": (finalist_source(study, trial.number)
                                      if measured is not None else r.latency_source or "measured"),
            "search_dev_score": r.score, "search_score_se": r.score_se,
            "ranked_by": study.user_attrs.get("ranked_by", {}).get("name"),
            "warnings": score_warnings(study)}


def export_trial(run: Run, study: optuna.Study, trial: optuna.trial.FrozenTrial, out: Path, *,
                 runtimes: tuple[str, ...] | None = None) -> dict:
    arch = TrialRecord.read(trial).arch
    ckpt = checkpoint_dir(run.cfg.run_dir, study.study_name, trial.number)
    model = None
    if (ckpt / "config.json").is_file():
        try:
            model = AutoModelForSequenceClassification.from_pretrained(ckpt)
        except Exception as e:  # truncated: as if it were on another machine
            discard(ckpt, e)
    else:
        log.warning("checkpoint %s not found here: training trial %d again", ckpt, trial.number)
    if model is None:
        # the trial's model: its proxy run (the first, where proxy.repeats runs several)
        _, model = run.proxy.repeat(0).evaluate(arch, progress=run.progress)
        model.save_pretrained(ckpt)  # the next export of it loads it
    return write_folder(run, model, arch, out, label=f"student (trial #{trial.number})",
                        title=f"{study.study_name} trial {trial.number}: {arch.name}",
                        budget_ms=study.user_attrs.get("budget_ms"),
                        search=search_summary(study, trial), runtimes=runtimes)


def write_folder(run: Run, model, arch, out: Path, *, label: str, title: str,
                 budget_ms: float | None, search: dict | None = None,
                 extra: dict | None = None, lr_key: str = "proxy.lr",
                 runtimes: tuple[str, ...] | None = None) -> dict:
    """The Hugging Face folder (weights, tokenizer, arch.json), the ONNX graphs (fp32 and int8)
    and its report: latency measured here (and predicted) in every runtime, beside the
    teacher's, in one run; dev and test scores of both (test scores in every runtime)."""
    check_finite(model, what=f"{label} ({arch.name})", lr_key=lr_key)
    check_out(out)
    final, out = out, out.with_name(out.name + ".tmp")  # built aside, swapped in when complete
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(run.teacher.path).save_pretrained(out)
    (out / "arch.json").write_text(json.dumps(arch.to_dict(), indent=2) + "\n")

    b = run.cfg.budget
    runtimes = choose_runtimes(runtimes, b.backend)
    if any(r != "torch" for r in runtimes):
        write_onnx(model, out)  # model.onnx and model.int8.onnx, beside the transformers folder

    # measure what a user loads, the teacher beside it, in every runtime, in this one run
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    rows = measure_runtimes(run, out, loaded, runtimes)
    main = next(r for r in rows if r["backend"] == b.backend)
    student_ms, teacher_ms = main["student_ms"], main["teacher_ms"]
    predicted = run.latency.raw(arch)
    teacher_predicted = run.latency.teacher_predicted()
    data = run.data
    # with agreement with the teacher's dev predictions (the proxy's label-free objective)
    s_dev = compute_metrics(predict_logits(loaded, data.dev), data.dev.labels,
                            run.proxy.dev_logits)
    s_test = main["student_test"]
    search = search or {}
    report = {
        "label": label,
        "study": search.get("study"),
        "trial": search.get("trial"),
        "metric": data.metric,
        "budget_ms": budget_ms,
        "speedup": teacher_ms / student_ms,
        "paired_speedup": main["paired_speedup"],  # the two alternated call by call
        "budget_speedup": b.speedup,
        "student": {
            "arch": arch.name, "class": type(loaded).__name__, "latency_ms": student_ms,
            "search_latency_ms": search.get("search_latency_ms"),
            "search_latency_source": search.get("search_latency_source"),
            "predicted_ms": predicted,
            "params": sum(p.numel() for p in loaded.parameters()),
            "dev": s_dev, "test": s_test, "search_dev_score": search.get("search_dev_score"),
            "search_score_se": search.get("search_score_se"),
        },
        "ranked_by": search.get("ranked_by"),
        "warnings": list(dict.fromkeys([*run.warnings, *search.get("warnings", [])])),
        "teacher": {
            "arch": "L{num_hidden_layers}-H{hidden_size}-A{num_attention_heads}-"
                    "F{intermediate_size}".format(**run.teacher.model.config.to_dict()),
            "path": run.teacher.path, "latency_ms": teacher_ms, "predicted_ms": teacher_predicted,
            "params": run.teacher_params,
            "dev": run.teacher_dev, "test": main["teacher_test"],
        },
        "backend": b.backend,
        "runtimes": rows,
        "measurement": {
            "batch_size": b.batch_size, "seq_len": b.seq_len, "threads": b.threads,
            "repeats": b.repeats, "rounds": b.rounds, "device": cpu_name(),
            "torch": torch.__version__, "unit_ms": run.meter.unit_ms,
            "units_ms": dict(run.meter.units), "runtimes": runtime_versions(runtimes),
            "latency_table": str(run.latency.path) if run.latency.path else None,
        },
        **(extra or {}),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    text = comparison_text(report)
    (out / "report.md").write_text(f"# {title}\n\n```\n{text}\n```\n")
    _swap_in(out, final, keep=WORK_FOLDERS)
    return report


WORK_FOLDERS = ("checkpoint", "best")  # a distillation's own, kept in its output folder


def check_out(out: Path) -> None:
    """``--out`` must be a folder that is new, empty, or an earlier export or distillation
    (replaced); a user's own files are never overwritten."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; name a folder (it is created)")
    if out.is_dir():
        entries = {p.name for p in out.iterdir()}
        ours = "arch.json" in entries or any(w in entries for w in WORK_FOLDERS)
        if entries and not ours:
            raise UserError(f"--out {out}: holds other files ({', '.join(sorted(entries)[:3])}"
                            f"{', ...' if len(entries) > 3 else ''}); name a new or empty folder")


def _swap_in(tmp: Path, out: Path, *, keep: tuple[str, ...] = ()) -> None:
    """Replace ``out`` by the complete ``tmp`` (the entries named in ``keep`` move across), so
    a killed export leaves the previous folder or none, never half of one."""
    if not out.exists():
        tmp.rename(out)
        return
    for name in keep:
        if (out / name).exists():
            os.replace(out / name, tmp / name)
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old)

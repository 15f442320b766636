"""Plain-text tables for `status` and the demo: trials, the best one, the teacher beside it."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial

from tacnas.evaluators.metrics import FIX_DEV, fmt_score, overlapping, se_key
from tacnas.nas.record import TrialRecord, TrialStatus
from tacnas.nas.study import (
    best_trial,
    best_trials,
    feasible_trained,
    floor_unmet,
    min_retention,
    pareto_front,
    rescored,
    rescored_under,
    trained_count,
)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def trial_row(t: FrozenTrial, *, fp32: bool = False) -> list[str]:
    """A trial's row of ``status``; ``fp32``: with its fp32 dev score beside (int8 studies)."""
    r = TrialRecord.read(t)
    status = r.status.value if r.status is not None else t.state.name.lower()
    if r.duplicate_of is not None:
        status += f" of #{r.duplicate_of}"
    return [
        str(t.number), t.state.name, status, r.arch_name or "-",
        _fmt(r.latency_ms, ".2f"), _fmt(r.params, ","), fmt_score(r.score, r.score_se),
    ] + ([_fmt(r.fp32_score, ".4f")] if fp32 else [])


def _brief(t: FrozenTrial) -> str:
    r = TrialRecord.read(t)
    return f"#{t.number} {r.arch_name} ({fmt_score(r.score, r.score_se)}, {r.latency_ms:.2f} ms)"


def score_warnings(study: optuna.Study) -> list[str]:
    """One line each: what the run found about its scores (a weak teacher), and whether the
    best feasible candidate is separated from the others on the split that ranked them."""
    attrs = study.user_attrs
    lines = list(attrs.get("warnings", []))
    floor = attrs.get("floor_score")
    if min_retention(study) is not None and floor is not None:
        t = best_trial(study)
        if t is not None:
            r = TrialRecord.read(t)
            if r.score_se and r.score - floor < 2 * r.score_se:
                lines.append(
                    f"#{t.number} {r.arch_name} keeps the floor ({floor:.4f}) by "
                    f"{r.score - floor:.4f}, less than twice its standard error ({r.score_se:.4f}): "
                    "the next slower candidate is the safer pick, and more dev data "
                    "(task.split.dev) would make the check firmer")
    elif len(study.directions) == 1:
        key = attrs.get("ranked_by", {}).get("key", _metric(study))
        scored, n = [], None
        for t in feasible_trained(study):
            r = TrialRecord.read(t)
            scored.append((f"#{t.number} {r.arch_name}", r.score, r.score_se))
            n = n or (r.metrics or {}).get("pool_n" if key == "pool_agreement" else "n")
        pool = key == "pool_agreement"
        fix = ("a larger pool (task.unlabeled, task.max_unlabeled_samples) or a longer proxy "
               "(proxy.steps) would separate them") if pool else FIX_DEV
        if (line := overlapping(scored, n=n, what="the pool" if pool else "dev", fix=fix)):
            lines.append(line)
    return lines


def status_text(study: optuna.Study) -> str:
    attrs = study.user_attrs
    backend = attrs.get("config", {}).get("budget", {}).get("backend", "torch")
    int8 = backend == "onnxruntime-int8"  # trials scored by their int8 graph, fp32 beside
    rows = [trial_row(t, fp32=int8) for t in study.get_trials(deepcopy=False)]
    head = ["#", "state", "status", "architecture", f"latency ms ({backend})", "params",
            "score ± s.e. (int8)" if int8 else "score ± s.e."] + (["fp32 score"] if int8 else [])
    teacher_dev = attrs.get("teacher_dev", {})
    metric = _metric(study)
    frac, floor = min_retention(study), attrs.get("floor_score")
    floor_line = ([] if frac is None else [
        f"accuracy floor: the fastest candidate keeping {frac:.1%} of the teacher's score "
        f"(score >= {_fmt(floor, '.4f')})"])
    if (use := attrs.get("config", {}).get("budget", {}).get("min_use")) is not None:
        unused = sum(TrialRecord.read(t).status is TrialStatus.UNUSED
                     for t in study.get_trials(deepcopy=False))
        floor_line.append(f"budget use: candidates predicted under {use:.0%} of the budget are "
                          f"rejected untrained ({unused} so far)")
    lines = [
        f"study {study.study_name}: {len(rows)} trials, {trained_count(study)} trained "
        f"(target {attrs.get('n_trials', '-')}), space of {attrs.get('space_size', '?')} "
        f"architectures",
        f"budget {_fmt(attrs.get('budget_ms'), '.2f')} ms; teacher "
        f"{_fmt(attrs.get('teacher_ms'), '.2f')} ms, {_fmt(attrs.get('teacher_params'), ',')} params,"
        f" dev {metric} {fmt_score(teacher_dev.get(metric), teacher_dev.get(se_key(metric)))}",
        "score: " + attrs.get("ranked_by", {}).get("name", f"dev {metric}")
        + "; s.e.: its standard error on that split",
        *floor_line,
        "",
        table(head, rows),
        "",
    ]
    best = best_trials(study)
    if best:
        title = "best" if len(study.directions) == 1 else "Pareto front (feasible, trained)"
        if frac is not None and len(study.directions) == 1:
            title = "fastest keeping the floor"
        if longer := rescored(study):
            how = rescored_under(study)
            recipe = ("with the distill recipe" if how["recipe"] == "distill"
                      else f"at {how['steps']} KD steps")
            by = {"metric": f" by dev {metric}",
                  "agreement": " by agreement with the teacher"}.get(how["objective"], "")
            scores = ", ".join(f"#{n} {'diverged' if v is None else f'{v:.4f}'}"
                               for n, v in sorted(longer.items()))
            title += f" after re-scoring the top {len(longer)} {recipe}{by} ({scores})"
        lines.append(f"{title}: " + ", ".join(_brief(t) for t in best))
    else:
        lines.append(floor_unmet(study) or "no trained candidate within the budget yet")
    lines += [f"warning: {w}" for w in score_warnings(study)]
    return "\n".join(lines)


def _metric(study: optuna.Study) -> str:
    return study.user_attrs.get("config", {}).get("task", {}).get("metric", "accuracy")


def comparison_text(report: dict) -> str:
    """The teacher and the exported student side by side (the demo's final table)."""
    s, t = report["student"], report["teacher"]
    metric = report["metric"]
    def score(split: dict) -> str:
        return fmt_score(split[metric], split.get(se_key(metric)))

    rows = [
        ["teacher", t["arch"], f"{t['latency_ms']:.2f}", _fmt(t.get("predicted_ms"), ".2f"),
         "1.00x", f"{t['params']:,}", score(t["dev"]), score(t["test"]), "100.0"],
        [report.get("label") or f"student (trial #{report['trial']})", s["arch"], f"{s['latency_ms']:.2f}",
         _fmt(s.get("predicted_ms"), ".2f"), f"{report['speedup']:.2f}x", f"{s['params']:,}",
         score(s["dev"]), score(s["test"]),
         f"{100 * s['test'][metric] / t['test'][metric]:.1f}"],
    ]
    head = ["model", "architecture", "measured ms", "predicted ms", "speedup", "params",
            f"dev {metric} ± s.e.", f"test {metric} ± s.e.", "% of teacher (test)"]
    m = report["measurement"]
    paired = report.get("paired_speedup")
    return (
        f"measured here: batch {m['batch_size']}, seq_len {m['seq_len']}, {m['threads']} threads, "
        f"median of {m['rounds']} rounds of {m['repeats']} passes against the reference "
        f"({m['device']}); budget {_fmt(report['budget_ms'], '.2f')} ms"
        + (f" and {report['budget_speedup']:g}x" if report.get("budget_speedup") else "")
        + (f" (during the search: {s['search_latency_ms']:.2f} ms, "
           f"{s.get('search_latency_source') or 'measured'})"
           if s.get("search_latency_ms") is not None else "") + "\n"
        + table(head, rows)
        + (f"\npaired with the teacher (the two alternated call by call, as the search checks "
           f"its finalists): {paired:.2f}x"
           + (f", {'within' if paired >= report['budget_speedup'] else 'OVER'} the "
              f"{report['budget_speedup']:g}x budget" if report.get("budget_speedup") else "")
           if paired is not None else "")
        + (f"\nthe search ranked candidates by {report['ranked_by']}; this one scored "
           f"{fmt_score(s.get('search_dev_score'), s.get('search_score_se'))} there"
           if report.get("ranked_by") and s.get("search_dev_score") is not None else "")
        + "".join(f"\nwarning: {w}" for w in report.get("warnings") or [])
        + runtimes_text(report)
    )


def runtimes_text(report: dict) -> str:
    """The student and the teacher in every runtime the export measured (see nas/deploy.py)."""
    rows = report.get("runtimes") or []
    if len(rows) < 2:
        return ""
    metric = report["metric"]
    body = [[r["backend"], f"{r['teacher_ms']:.2f}", f"{r['student_ms']:.2f}",
             f"{r['speedup']:.2f}x", _fmt(r.get("paired_speedup"), ".2f") + "x",
             _fmt(r.get("speedup_vs_torch_teacher"), ".2f") + "x",
             f"{r['teacher_test'][metric]:.4f}", f"{r['student_test'][metric]:.4f}",
             _fmt(None if r.get("retention") is None else 100 * r["retention"], ".1f"),
             f"{100 * r['agreement']:.1f}", f"{100 * r['teacher_agreement']:.1f}"]
            for r in rows]
    head = ["runtime", "teacher ms", "student ms", "speedup", "paired speedup",
            "vs torch teacher",
            f"teacher test {metric}", f"student test {metric}", "% of teacher",
            "student agrees with fp32 %", "teacher agrees with fp32 %"]
    return ("\n\nin each runtime (latency and test scores measured in it; agreement: test "
            "predictions equal to the same model's in PyTorch fp32):\n" + table(head, body))


def write_report(study: optuna.Study, out) -> dict:
    """``run_search.py report``: ``trials.png`` (every trial's latency against its dev score:
    feasible and infeasible, the Pareto front, the budget line; and Optuna's parameter
    importances over the trained trials) and ``report.md`` (the summary and the front's table)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    attrs = study.user_attrs
    budget = attrs.get("budget_ms")
    trials = study.get_trials(deepcopy=False)
    rec = {t.number: TrialRecord.read(t) for t in trials}
    trained = [t for t in trials if t.state.name == "COMPLETE" and rec[t.number].trained]
    feasible = feasible_trained(study)
    infeasible = [t for t in trained if t not in feasible]
    rejected = [t for t in trials if rec[t.number].status in (TrialStatus.OVER_BUDGET,
                                                              TrialStatus.UNUSED)]
    front = pareto_front(feasible)
    metric = _metric(study)

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    lat = lambda ts: [rec[t.number].latency_ms for t in ts]  # noqa: E731
    score = lambda ts: [rec[t.number].score for t in ts]  # noqa: E731
    ax.scatter(lat(feasible), score(feasible), s=28, c="tab:blue", label="trained, within budget")
    if infeasible:
        ax.scatter(lat(infeasible), score(infeasible), s=28, c="tab:orange",
                   label="trained, over the final budget")
    if front:
        ax.plot(lat(front), score(front), "-o", c="tab:green", ms=8, mfc="none", mew=2,
                label="Pareto front")
        for t in front:
            ax.annotate(f"#{t.number}", (rec[t.number].latency_ms, rec[t.number].score),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    if rejected:
        low = min(score(trained)) if trained else 0.0
        ax.scatter(lat(rejected), [low] * len(rejected), marker="|", s=200, c="tab:gray",
                   label="outside the budget (rejected, never trained)")
    if budget is not None:
        ax.axvline(budget, ls="--", c="tab:red", label=f"budget {budget:.2f} ms")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel(f"dev {metric} (proxy)")
    ax.set_title(f"study {study.study_name}: {len(trials)} trials, {len(trained)} trained")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")

    importances = _importances(trained)
    if importances:
        names = list(importances)[::-1]
        ax2.barh(names, [importances[n] for n in names], color="tab:purple")
        ax2.set_title("parameter importance (fANOVA, trained trials)")
    else:
        ax2.text(0.5, 0.5, "too few trained trials for importances", ha="center")
        ax2.set_axis_off()
    fig.tight_layout()
    png = out / "trials.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)

    rows = [[str(t.number), r.arch_name, f"{r.score:.4f}", f"{r.latency_ms:.2f}", f"{r.params:,}"]
            for t, r in ((t, rec[t.number]) for t in front)]
    md = [f"# Study {study.study_name}", "", "```", status_text(study), "```", "",
          "## Pareto front (feasible, trained; score up, latency down)", "", "```",
          table(["#", "architecture", f"dev {metric}", "latency ms", "params"], rows), "```", ""]
    if importances:
        md += ["## Parameter importance", "", "```",
               table(["parameter", "importance"],
                     [[k, f"{v:.3f}"] for k, v in importances.items()]), "```", ""]
    md += ["![trials](trials.png)", ""]
    (out / "report.md").write_text("\n".join(md))
    return {"png": png, "md": out / "report.md", "front": [t.number for t in front],
            "importances": importances}


def _importances(trained) -> dict[str, float]:
    """Optuna's fANOVA importances of the dev score over the trained trials only (over-budget
    trials have no score, and counting them as 0 would measure the budget, not the score)."""
    distinct = {TrialRecord.read(t).arch_name for t in trained}
    if len(distinct) < 3:
        return {}
    copy = optuna.create_study(direction="maximize")
    for t in trained:
        copy.add_trial(optuna.trial.create_trial(
            params=t.params, distributions=t.distributions, value=TrialRecord.read(t).score))
    try:
        return dict(optuna.importance.get_param_importances(
            copy, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)))
    except (RuntimeError, ValueError):
        return {}

"""Plain-text tables for `status` and the demo: trials, the best one, the teacher beside it."""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial

from nas.optuna_search import best_trials, trained_count


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def trial_row(t: FrozenTrial) -> list[str]:
    a = t.user_attrs
    status = a.get("status", t.state.name.lower())
    if a.get("duplicate_of") is not None:
        status += f" of #{a['duplicate_of']}"
    return [
        str(t.number), t.state.name, status, a.get("arch_name", "-"),
        _fmt(a.get("latency_ms"), ".2f"), _fmt(a.get("params"), ","), _fmt(a.get("score"), ".4f"),
    ]


def status_text(study: optuna.Study) -> str:
    attrs = study.user_attrs
    rows = [trial_row(t) for t in study.get_trials(deepcopy=False)]
    lines = [
        f"study {study.study_name}: {len(rows)} trials, {trained_count(study)} trained "
        f"(target {attrs.get('n_trials', '-')}), space of {attrs.get('space_size', '?')} "
        f"architectures",
        f"budget {_fmt(attrs.get('budget_ms'), '.2f')} ms; teacher "
        f"{_fmt(attrs.get('teacher_ms'), '.2f')} ms, {_fmt(attrs.get('teacher_params'), ',')} params,"
        f" dev {attrs.get('teacher_dev', {}).get(_metric(study), float('nan')):.4f}",
        "",
        table(["#", "state", "status", "architecture", "latency ms", "params", "dev score"], rows),
        "",
    ]
    best = best_trials(study)
    if best:
        title = "best" if len(study.directions) == 1 else "Pareto front (feasible, trained)"
        lines.append(f"{title}: " + ", ".join(
            f"#{t.number} {t.user_attrs['arch_name']} ({t.user_attrs['score']:.4f}, "
            f"{t.user_attrs['latency_ms']:.2f} ms)" for t in best))
    else:
        lines.append("no trained candidate within the budget yet")
    return "\n".join(lines)


def _metric(study: optuna.Study) -> str:
    return study.user_attrs.get("config", {}).get("task", {}).get("metric", "accuracy")


def comparison_text(report: dict) -> str:
    """The teacher and the exported student side by side (the demo's final table)."""
    s, t = report["student"], report["teacher"]
    metric = report["metric"]
    rows = [
        ["teacher", t["arch"], f"{t['latency_ms']:.2f}", _fmt(t.get("predicted_ms"), ".2f"),
         "1.00x", f"{t['params']:,}", f"{t['dev'][metric]:.4f}", f"{t['test'][metric]:.4f}",
         "100.0"],
        [f"student (trial #{report['trial']})", s["arch"], f"{s['latency_ms']:.2f}",
         _fmt(s.get("predicted_ms"), ".2f"), f"{report['speedup']:.2f}x", f"{s['params']:,}",
         f"{s['dev'][metric]:.4f}", f"{s['test'][metric]:.4f}",
         f"{100 * s['test'][metric] / t['test'][metric]:.1f}"],
    ]
    head = ["model", "architecture", "measured ms", "predicted ms", "speedup", "params",
            f"dev {metric}", f"test {metric}", "% of teacher (test)"]
    m = report["measurement"]
    return (
        f"measured here: batch {m['batch_size']}, seq_len {m['seq_len']}, {m['threads']} threads, "
        f"median of {m['rounds']} rounds of {m['repeats']} passes against the reference "
        f"({m['device']}); budget {_fmt(report['budget_ms'], '.2f')} ms (during the search: "
        f"{s['search_latency_ms']:.2f} ms, {s.get('search_latency_source', 'measured')})\n"
        + table(head, rows)
    )

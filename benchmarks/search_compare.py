"""Four searches, one wall-clock budget each, the same final distillation: which finds more?

On the demo task and budget (configs/demo.yaml: 4x faster than the teacher at batch 1,
seq_len 64, this machine):

- ``differentiable``: the Gumbel-softmax search over the weight-sharing supernet (its supernet
  training is part of its time),
- ``tpe / distill proxy``: Optuna TPE, each candidate teacher-initialised and distilled for the
  demo's proxy steps,
- ``tpe / supernet proxy``: Optuna TPE, each candidate inheriting a trained supernet's slice plus
  a few KD steps (the supernet's one-off training is counted in its time),
- ``random / distill proxy``: random search with the demo's proxy,

each stopped at ``--seconds`` of wall time. Each found architecture is then finished with the
config's ``distill`` settings, and one latency pass measures every student and the teacher in
alternation. One table. Everything lives under ``--work``; a rerun reuses finished parts.

    python benchmarks/search_compare.py --seconds 300
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from real_task import (  # noqa: E402  (benchmarks/ is the script's folder)
    MEASURED_SEARCH,
    latency_pass,
    resumable,
)
from search_vs_hand import GUMBEL  # noqa: E402  (the estimator it ran with)

from tacnas.nas.config import load_config  # noqa: E402
from tacnas.nas.differentiable import differentiable_search  # noqa: E402
from tacnas.nas.distill import distill  # noqa: E402
from tacnas.nas.optuna_search import run_search  # noqa: E402
from tacnas.nas.pipeline import prepare  # noqa: E402
from tacnas.nas.record import TrialRecord  # noqa: E402
from tacnas.nas.report import table as text_table  # noqa: E402
from tacnas.nas.study import (  # noqa: E402
    best_trial,
    create_or_load,
    default_storage,
)

METHODS = {
    "differentiable": [*GUMBEL, "search.strategy=differentiable", "differentiable.steps=400",
                       "differentiable.warmup_steps=150"],
    "tpe / distill proxy": ["search.sampler=tpe", "proxy.kind=distill", "proxy.steps=200"],
    "tpe / supernet proxy": ["search.sampler=tpe", "proxy.kind=supernet", "proxy.steps=20",
                             "proxy.supernet_steps=800"],
    "random / distill proxy": ["search.sampler=random", "proxy.kind=distill", "proxy.steps=200"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--seconds", type=float, default=300.0, help="wall time of each search")
    ap.add_argument("--work", default="runs/bench_compare")
    ap.add_argument("--sweeps", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work, results, save = resumable(args.work)

    found = {}
    run = None
    for i, (method, extra) in enumerate(METHODS.items()):
        name = f"m{i}"
        cfg = load_config(args.config, [*MEASURED_SEARCH, f"run_dir={work / 'runs'}",
                                        "search.n_trials=1000",
                                        "distill.epochs=2", *extra, *args.set])  # as measured
        run = prepare(cfg, progress=True)
        study = create_or_load(name, default_storage(cfg.run_dir, name), cfg)
        if method not in results:
            t0 = time.perf_counter()
            supernet_s = None
            if cfg.search.strategy == "differentiable":
                differentiable_search(run, study, timeout=args.seconds)
            else:
                left = args.seconds
                if run.cfg.proxy.kind == "supernet":  # its training counts toward the budget
                    run.proxy.prepare(progress=True)
                    left -= time.perf_counter() - t0
                    supernet_s = time.perf_counter() - t0
                run_search(run, study, n_trials=None, timeout=max(1.0, left))
            trained = [r for t in study.get_trials(deepcopy=False)
                       if (r := TrialRecord.read(t)).counts]
            secs = sorted(r.train_seconds for r in trained if r.train_seconds is not None)
            results[method] = {"wall_s": time.perf_counter() - t0, "trained": len(trained),
                               "budget_ms": study.user_attrs["budget_ms"],
                               "proxy_s": secs[len(secs) // 2] if secs else None,
                               "supernet_s": supernet_s}
            save()
        best = TrialRecord.read(best_trial(study))
        found[method] = (best.arch, best.score, best)
        run.meter.close()

    # the same final distillation (the last run's data and teacher are the shared ones)
    reports = {}
    for method, (arch, _, _) in found.items():
        out = work / "distilled" / arch.name
        if not (out / "report.json").is_file():
            t0 = time.perf_counter()
            distill(run, arch, out, label=arch.name)
            results.setdefault("distill_seconds", {})[arch.name] = time.perf_counter() - t0
            save()
        reports[method] = json.loads((out / "report.json").read_text())

    archs = sorted({a for a, _, _ in found.values()}, key=lambda a: a.name)
    ms, teacher_ms = latency_pass(run, archs, args.sweeps)
    run.meter.close()
    first = next(iter(reports.values()))
    t_test = first["teacher"]["test"]["accuracy"]
    budget_ms = teacher_ms / run.cfg.budget.speedup if run.cfg.budget.speedup else \
        run.cfg.budget.latency_ms
    rows = [["teacher", "-", "-", "-", "-", f"{teacher_ms:.2f}", "1.00x", f"{run.teacher_params:,}",
             "-", f"{first['teacher']['dev']['accuracy']:.4f}", f"{t_test:.4f}", "100.0"]]
    for method, (a, score, _) in found.items():
        r, rep = results[method], reports[method]
        px = "-" if r.get("proxy_s") is None or method == "differentiable" else \
            f"{r['proxy_s']:.1f}"
        rows.append([method, f"{r['wall_s']:.0f}", str(r["trained"]), px, a.name, f"{ms[a.name]:.2f}",
                     f"{teacher_ms / ms[a.name]:.2f}x", f"{rep['student']['params']:,}",
                     f"{score:.4f}", f"{rep['student']['dev']['accuracy']:.4f}",
                     f"{rep['student']['test']['accuracy']:.4f}",
                     f"{100 * rep['student']['test']['accuracy'] / t_test:.1f}"])
    print(f"\nsearch budget: {args.seconds:.0f} s of wall time each; latency budget "
          f"{run.cfg.budget.speedup}x = {budget_ms:.2f} ms now (teacher {teacher_ms:.2f} ms; "
          f"batch {run.cfg.budget.batch_size}, seq_len {run.cfg.budget.seq_len}, "
          f"{run.cfg.budget.threads} threads, median of {args.sweeps} sweeps)")
    print("final distillation for every student: " + json.dumps(run.cfg.to_dict()["distill"]))
    print()
    print(text_table(["search", "wall s", "trained", "proxy s / cand", "architecture", "ms", "speedup", "params",
                      "search score", "dev acc", "test acc", "% of teacher"], rows))
    diff = found.get("differentiable")
    if diff:
        r = diff[2]
        print(f"\ndifferentiable: {r.extra['steps']} steps, derived {r.arch_name} "
              f"({r.extra['derived']}); predicted {r.predicted_ms * r.latency_scale:.2f}"
              f" ms against the search's budget {r.budget_ms:.2f} ms; final entropy "
              + ", ".join(f"{k} {v:.2f}" for k, v in r.extra["final_entropy"].items()))
    for method, r in results.items():
        if isinstance(r, dict) and r.get("supernet_s"):
            print(f"{method}: supernet trained once in {r['supernet_s']:.0f} s (part of its wall s)")
    ds = results.get("distill_seconds", {})
    if ds:
        print("final distillations (s): " + ", ".join(f"{k} {v:.0f}" for k, v in ds.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Task-adaptive, shown: does the architecture found for a task beat the one found for another
task, on the first task, at the same budget? And how fast a student keeps 99% of each teacher?

Two real offline tasks, each with its own MiniLM teacher fine-tuned here:

- ``tweets``: configs/demo.yaml (3-class tweet sentiment, 8,000 training tweets),
- ``spam``: configs/spam.yaml (the SpamAssassin mail corpus converted by
  benchmarks/spam_assassin.py, spam or ham, truncated at 128 tokens),

both with the budget measured at the task's own length (``budget.seq_len: task``, the 90th
percentile of the dev split's token counts), batch 1, 2 threads, this machine, and the same space,
search (TPE, supernet proxy, 20 trained candidates) and distillation recipe (each config's
``distill`` section: 3 epochs, lr 3e-4, KD at T=2 with 0.5 CE, early stopping on dev).

1. the matrix: search each task at ``--speedup`` (4x), then final-distill each task's found
   architecture on both tasks with ``--seeds`` (0 1 2); test accuracy, mean and std per cell;
2. the floor: search each task for the fastest student whose (proxy) dev accuracy keeps
   ``--floor`` (99%) of its teacher's, with no latency budget; the found student is then
   final-distilled once (seed 0) and its test accuracy and speedup reported;
3. one latency pass per task at its own length: every architecture above and the teacher,
   alternating, median of ``--sweeps`` sweeps.

Everything is kept under ``--work``: a killed run continues where it stopped (each finished
search, student and seed is written when done). Writes ``benchmarks/results/task_adaptive.json``:
records ``kind`` (matrix or floor), ``arch_from``, ``eval_task``, ``arch``, ``seed``,
``test_score``, ``latency_ms`` (at the eval task's length), ``speedup``, ``seq_len``,
``teacher_test_score``.

    python benchmarks/task_adaptive.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path

import spam_assassin  # benchmarks/ is the script's folder
from real_task import MEASURED_SEARCH, distill_seed, latency_pass, resumable

from tacnas.errors import UserError
from tacnas.evaluators.latency_table import cpu_name
from tacnas.nas.config import load_config
from tacnas.nas.optuna_search import run_search
from tacnas.nas.pipeline import prepare
from tacnas.nas.record import TrialRecord
from tacnas.nas.report import table as text_table
from tacnas.nas.study import best_trial, create_or_load, default_storage
from tacnas.searchspace.arch import ArchConfig

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("task_adaptive")


def configs(work: Path, data: Path, extra: list[str]) -> dict[str, list]:
    """Per task: (config file, overrides)."""
    common = [*MEASURED_SEARCH, f"run_dir={work / 'runs'}", "budget.seq_len=task", *extra]
    return {"tweets": [ROOT / "configs" / "demo.yaml", common],
            "spam": [ROOT / "configs" / "spam.yaml", [f"task.dataset={data}", *common]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="runs/bench_task_adaptive")
    ap.add_argument("--speedup", type=float, default=4.0)
    ap.add_argument("--floor", type=float, default=0.99)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sweeps", type=int, default=5)
    ap.add_argument("--no-floor-distill", action="store_true",
                    help="report the floors' students by their search figures only")
    ap.add_argument("--data", type=Path, default=spam_assassin.default_out(),
                    help="the converted SpamAssassin file (made if missing)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for both tasks")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work, results, save = resumable(args.work)
    secs = results.setdefault("seconds", {})
    if not args.data.is_file():
        spam_assassin.ensure(args.data)
    tasks = configs(work, args.data, args.set)

    # 1. teachers and data (cached), each task's length
    runs, cfgs = {}, {}
    for t, (path, over) in tasks.items():
        cfgs[t] = load_config(path, [*over, f"budget.speedup={args.speedup}"])
        t0 = time.perf_counter()
        runs[t] = prepare(cfgs[t], progress=True)
        secs.setdefault(f"prepare_{t}", time.perf_counter() - t0)
        save()
    runs_seq = {t: r.cfg.budget.seq_len for t, r in runs.items()}

    def search(t: str, name: str, cfg) -> dict:
        """Run (or reload) a search; its chosen trial's arch and figures."""
        study = create_or_load(name, default_storage(cfg.run_dir, name), cfg)
        key = f"search_{name}"
        found = results.setdefault("searches", {})
        if name not in found:
            t0 = time.perf_counter()
            error = None
            try:
                run_search(dataclasses.replace(runs[t], cfg=dataclasses.replace(
                    cfg, budget=dataclasses.replace(cfg.budget, seq_len=runs_seq[t]))),
                    study, n_trials=cfg.search.n_trials, timeout=None)
            except UserError as e:  # a floor no candidate meets: a finding, kept
                error = str(e)
            secs[key] = time.perf_counter() - t0
            best = best_trial(study)
            r = TrialRecord.read(best) if best is not None else None
            found[name] = {
                "arch": None if r is None else r.arch.to_dict(), "error": error,
                "trial": None if best is None else best.number,
                "proxy_score": None if r is None else r.score,
                "search_latency_ms": None if r is None else r.latency_ms,
                "teacher_ms": study.user_attrs["teacher_ms"],
                "budget_ms": study.user_attrs.get("budget_ms"),
                "floor_score": study.user_attrs.get("floor_score"),
                "teacher_dev": study.user_attrs["teacher_dev"]["accuracy"],
                "trained": sum(1 for x in study.trials if TrialRecord.read(x).trained)}
            save()
        return found[name]

    # 2. each task's search at the speedup budget
    found = {t: search(t, f"{t}_{args.speedup:g}x", cfgs[t]) for t in tasks}
    arch = {t: ArchConfig.from_dict(f["arch"]) for t, f in found.items()}

    # 3. the matrix: each found architecture distilled on each task, seed by seed
    units = results.setdefault("units", {})

    def finish(from_t: str, a: ArchConfig, eval_t: str, seed: int, tag: str) -> dict:
        key = f"{tag}/{from_t}->{eval_t}/s{seed}"
        same = [u for k, u in units.items() if u["arch"] == a.name
                and k.endswith(f"->{eval_t}/s{seed}")]
        if key not in units and same:  # the same student on the same task: trained already
            units[key] = dict(same[0], seconds=0.0)
            save()
        if key not in units:
            out = work / "distilled" / key.replace("/", "_").replace(">", "")
            units[key] = {"arch": a.name, **distill_seed(runs[eval_t], a, out, seed, label=key)}
            save()
        return units[key]

    for seed in args.seeds:
        for from_t in tasks:
            for eval_t in tasks:
                finish(from_t, arch[from_t], eval_t, seed, "matrix")

    # 4. the accuracy floor on each task (no latency budget), its student distilled once
    floors = {}
    for t, (path, over) in tasks.items():
        cfg = load_config(path, [*over, "budget.speedup=null",
                                 f"budget.min_retention={args.floor}"])
        floors[t] = search(t, f"{t}_floor{args.floor:g}", cfg)
        if floors[t]["arch"] is not None and not args.no_floor_distill:
            finish(t, ArchConfig.from_dict(floors[t]["arch"]), t, 0, "floor")

    # 5. one latency pass per task at its own length
    lat = results.setdefault("latency", {})
    for t in tasks:
        if t not in lat:
            archs = {*arch.values(), *(ArchConfig.from_dict(f["arch"]) for f in floors.values()
                                       if f["arch"] is not None)}
            ms, teacher_ms = latency_pass(runs[t], sorted(archs, key=lambda a: a.name),
                                          args.sweeps)
            runs[t].meter.close()
            lat[t] = {"ms": ms, "teacher_ms": teacher_ms, "seq_len": runs_seq[t]}
            save()

    # the table, the records
    records, rows = [], []
    for key, u in units.items():
        tag, pair, seed = key.split("/")
        from_t, eval_t = pair.split("->")
        ms = lat[eval_t]["ms"][u["arch"]]
        records.append({
            "kind": tag, "arch_from": from_t, "eval_task": eval_t, "arch": u["arch"],
            "seed": int(seed[1:]), "test_score": u["test"], "dev_score": u["dev"],
            "latency_ms": ms, "speedup": lat[eval_t]["teacher_ms"] / ms,
            "seq_len": lat[eval_t]["seq_len"], "teacher_test_score": u["teacher_test"]})
    for r in records:
        if r["kind"] == "floor":
            f = floors[r["arch_from"]]
            r.update(proxy_dev_score=f["proxy_score"], floor_score=f["floor_score"])
    for t, f in floors.items():  # a floor's student not final-distilled: its search figures
        if f["arch"] is not None and f"floor/{t}->{t}/s0" not in units:
            a = ArchConfig.from_dict(f["arch"])
            ms = lat[t]["ms"][a.name]
            records.append({"kind": "floor", "arch_from": t, "eval_task": t, "arch": a.name,
                            "seed": None, "test_score": None, "latency_ms": ms,
                            "speedup": lat[t]["teacher_ms"] / ms, "seq_len": lat[t]["seq_len"],
                            "proxy_dev_score": f["proxy_score"], "floor_score": f["floor_score"]})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "task_adaptive.json").write_text(json.dumps(records, indent=1) + "\n")

    print(f"\n{cpu_name()}, batch 1, 2 threads; each task at its own length (budget.seq_len: "
          f"task, 90th percentile of dev token counts): "
          + ", ".join(f"{t} {lat[t]['seq_len']} tokens (teacher {lat[t]['teacher_ms']:.2f} ms)"
                      for t in tasks))
    print(f"searched at {args.speedup:g}x: " + "; ".join(
        f"{t}: {arch[t].name} (proxy dev "
        f"{found[t]['proxy_score']:.4f}, {found[t]['trained']} trained, "
        f"{secs.get(f'search_{t}_{args.speedup:g}x', 0):.0f} s)" for t in tasks))
    head = ["architecture from", "evaluated on", "architecture", "ms", "speedup", "seeds",
            "test acc mean", "std", "% of teacher"]
    cells = {}
    for r in records:
        if r["kind"] == "matrix":
            cells.setdefault((r["arch_from"], r["eval_task"]), []).append(r)
    for (f, e), rs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][1] != kv[0][0])):
        s = [r["test_score"] for r in rs]
        sd = statistics.stdev(s) if len(s) > 1 else float("nan")
        rows.append([f, e, rs[0]["arch"], f"{rs[0]['latency_ms']:.2f}",
                     f"{rs[0]['speedup']:.2f}x", str(len(s)), f"{statistics.mean(s):.4f}",
                     f"{sd:.4f}", f"{100 * statistics.mean(s) / rs[0]['teacher_test_score']:.1f}"])
    print(text_table(head, rows))
    for e in tasks:
        own, other = cells.get((e, e)), cells.get((next(x for x in tasks if x != e), e))
        if own and other:
            a = [r["test_score"] for r in own]
            b = [r["test_score"] for r in other]
            if len(a) > 1 and len(b) > 1:
                pooled = ((statistics.variance(a) + statistics.variance(b)) / 2) ** 0.5
                d = statistics.mean(a) - statistics.mean(b)
                print(f"on {e}: own architecture {'+' if d >= 0 else ''}{100 * d:.2f} points "
                      f"over the other task's (pooled seed std {100 * pooled:.2f}): "
                      + ("diagonal wins" if d > pooled else "not beyond the seed spread"))
    print(f"\naccuracy floor {args.floor:.0%} of the teacher's dev accuracy (the search's proxy "
          "score), no latency budget:")
    for t, f in floors.items():
        if f["arch"] is None:
            print(f"  {t}: {f['error']}")
            continue
        a = ArchConfig.from_dict(f["arch"])
        u = units.get(f"floor/{t}->{t}/s0")
        ms = lat[t]["ms"][a.name]
        final = "not final-distilled (--no-floor-distill)" if u is None else (
            f"after the final recipe (seed 0): dev {u['dev']:.4f} "
            f"({100 * u['dev'] / u['teacher_dev']:.1f}%), test {u['test']:.4f} "
            f"({100 * u['test'] / u['teacher_test']:.1f}% of {u['teacher_test']:.4f})")
        print(f"  {t}: {a.name}, proxy dev {f['proxy_score']:.4f} >= floor "
              f"{f['floor_score']:.4f} (teacher dev {f['teacher_dev']:.4f}); {ms:.2f} ms, "
              f"{lat[t]['teacher_ms'] / ms:.2f}x faster than its teacher; {final}; "
              f"{f['trained']} trained")
    print("\nwall time (s): " + "; ".join(f"{k} {v:.0f}" for k, v in secs.items())
          + f"; distillations {sum(u['seconds'] for u in units.values()):.0f} "
          f"({len(units)} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Small data: pick the searched student by labelled dev score, or by agreement with the teacher
on unlabelled text?

A user with a few hundred labelled texts has a dev set of a hundred or two, whose standard error
(several points) is larger than the differences between candidates. Distillation needs no
labels, so the teacher's agreement can be scored on any unlabelled text of the task. This
benchmark measures which choice gives the better student.

The task, from the tweets corpus (the usual deduplicated, seeded 80/10/10 split; ``task_texts``):

- train: a seeded, stratified subsample of ``--train`` texts (600) of the usual train split,
- dev: a seeded, stratified subsample of ``--dev`` texts (150) of the usual dev split,
- test: the usual test split, whole (about 3.8k texts),
- unlabelled pool: ``--pool`` texts (8,000) of the rest of the usual train split, labels dropped.

A MiniLM teacher is fine-tuned on the 600 texts. One random search (a random sampler, so the
candidates favour neither selector) trains ``--candidates`` students within 4x of the teacher's
latency (batch 1, seq_len 64, this machine) with the distillation proxy; every candidate records
its dev accuracy and its agreement with the teacher on the pool. Then:

- ``dev``: the candidate with the best dev accuracy, and ``agreement``: the one with the best pool
  agreement, are each finished by the same final recipe with 3 seeds;
- every candidate is finished once (seed 0), for each selector's Kendall tau against the final
  test accuracy.

Everything is kept under ``--work``: a killed run continues where it stopped (each finished
student and seed is written when done). Writes ``benchmarks/results/small_data.json`` (records
``selector``, ``arch``, ``seed``, ``test_score``) and ``small_data.candidates.json``.

    python benchmarks/small_data.py
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
from real_task import MEASURED_SEARCH, resumable  # benchmarks/ is the script's folder
from scipy.stats import kendalltau
from sklearn.model_selection import train_test_split

from tacnas.evaluators.data import task_texts
from tacnas.nas.config import apply_overrides, config_from_dict, load_config
from tacnas.nas.distill import distill
from tacnas.nas.optuna_search import run_search
from tacnas.nas.pipeline import prepare
from tacnas.nas.record import TrialRecord
from tacnas.nas.report import table as text_table
from tacnas.nas.study import create_or_load, default_storage

RESULTS = Path(__file__).resolve().parent / "results"
SEEDS = (0, 1, 2)


def write_task(folder: Path, base, n_train: int, n_dev: int, n_pool: int, seed: int) -> dict:
    """The small task's files (train, dev, test with labels; the pool without), once."""
    files = {k: folder / f"{k}.csv" for k in ("train", "dev", "test", "pool")}
    if all(f.is_file() for f in files.values()):
        return files
    folder.mkdir(parents=True, exist_ok=True)
    splits, names = task_texts(base.task, seed=base.seed)
    tr_t, tr_y = splits["train"]
    small_t, rest_t, small_y, _ = train_test_split(tr_t, tr_y, train_size=n_train,
                                                   random_state=seed, stratify=tr_y)
    dev_t, _, dev_y, _ = train_test_split(*splits["dev"], train_size=n_dev, random_state=seed,
                                          stratify=splits["dev"][1])
    rest = list(rest_t)
    pool = [rest[i] for i in sorted(np.random.default_rng(seed).choice(len(rest), n_pool,
                                                                       replace=False))]
    field = base.task.text_fields[0]
    for name, texts, labels in (("train", small_t, small_y), ("dev", dev_t, dev_y),
                                ("test", *splits["test"]), ("pool", pool, None)):
        with open(files[name], "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow([field] + ([] if labels is None else [base.task.label_field]))
            for i, t in enumerate(texts):
                w.writerow([t[0]] + ([] if labels is None else [names[labels[i]]]))
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml", help="the task, space and budget")
    ap.add_argument("--work", default="runs/bench_small")
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--dev", type=int, default=150)
    ap.add_argument("--pool", type=int, default=8000)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work, results, save = resumable(args.work)

    base = load_config(args.config, ["task.max_train_samples=null", *MEASURED_SEARCH])
    files = write_task(work / "data", base, args.train, args.dev, args.pool, base.seed)
    data = base.to_dict()
    data["task"].update(dataset=str(files["train"]), max_train_samples=None,
                        data_files={k: str(files[k]) for k in ("train", "dev", "test")},
                        unlabeled=str(files["pool"]), encoding=None)
    data["teacher"].update(epochs=8, lr=1e-4)  # 600 texts: 150 steps
    data["search"].update(sampler="random", n_trials=args.candidates, strategy="optuna")
    data["proxy"].update(kind="distill", steps=100, objective="metric", eval_every=0)
    # the same final recipe for every student: 200 steps (about 11 epochs of 600 texts), the
    # last step's model (one dev score at the end, so the small dev set picks no checkpoint)
    data["distill"].update(max_steps=200, eval_every=200, patience=0, checkpoint_every=100,
                           lr=3e-4)
    data["run_dir"] = str(work / "runs")
    cfg = config_from_dict(apply_overrides(data, args.set), source="small_data")
    t0 = time.perf_counter()
    run = prepare(cfg, progress=True)
    results.setdefault("seconds", {})["prepare"] = time.perf_counter() - t0
    teacher_test = run.teacher_test()
    results["teacher"] = {"dev": run.teacher_dev, "test": teacher_test, "warnings": run.warnings}
    save()

    study = create_or_load("small", default_storage(cfg.run_dir, "small"), cfg)
    if "search" not in results["seconds"]:
        t0 = time.perf_counter()
        run_search(run, study, n_trials=args.candidates, timeout=None)
        results["seconds"]["search"] = time.perf_counter() - t0
        save()
    cands = {}
    for t in study.get_trials(deepcopy=False):
        r = TrialRecord.read(t)
        if r.trained and r.arch_name not in cands:
            m = r.metrics
            cands[r.arch_name] = {"arch": r.arch, "trial": t.number, "dev": m["accuracy"],
                                  "dev_se": m["accuracy_se"], "pool": m["pool_agreement"],
                                  "pool_se": m["pool_agreement_se"], "dev_n": m["n"],
                                  "pool_n": m["pool_n"]}
    picks = {"dev": max(cands, key=lambda a: cands[a]["dev"]),
             "agreement": max(cands, key=lambda a: cands[a]["pool"])}

    finals = results.setdefault("final", {})

    def final(name: str, seed: int) -> float:
        key = f"{name}/{seed}"
        if key not in finals:
            out = work / "distilled" / f"{name}-s{seed}"
            seeded = dataclasses.replace(run, cfg=dataclasses.replace(cfg, seed=seed))
            t0 = time.perf_counter()
            rep = distill(seeded, cands[name]["arch"], out, label=name, runtimes=("torch",))
            finals[key] = {"test": rep["student"]["test"]["accuracy"],
                           "test_se": rep["student"]["test"]["accuracy_se"],
                           "seconds": time.perf_counter() - t0}
            save()
        return finals[key]["test"]

    for name in dict.fromkeys(picks.values()):
        for s in SEEDS:
            final(name, s)
    for name in cands:  # every candidate once, for the selectors' fidelity
        final(name, 0)

    t_test = teacher_test["accuracy"]
    records, rows = [], []
    for sel, name in picks.items():
        scores = [finals[f"{name}/{s}"]["test"] for s in SEEDS]
        for s, v in zip(SEEDS, scores):
            records.append({"selector": sel, "arch": name, "seed": s, "test_score": v,
                            "dev_score": cands[name]["dev"], "pool_agreement": cands[name]["pool"],
                            "teacher_test_score": t_test})
        c = cands[name]
        rows.append([sel, name, f"{c['dev']:.4f} ± {c['dev_se']:.4f}",
                     f"{c['pool']:.4f} ± {c['pool_se']:.4f}", f"{statistics.mean(scores):.4f}",
                     f"{statistics.stdev(scores):.4f}", f"{100 * statistics.mean(scores) / t_test:.1f}"])
    fin0 = {a: finals[f"{a}/0"]["test"] for a in cands}
    taus = {k: kendalltau([cands[a][k] for a in cands], [fin0[a] for a in cands]).statistic
            for k in ("dev", "pool")}
    cand_rows = sorted(cands, key=lambda a: -fin0[a])

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "small_data.json").write_text(json.dumps(records, indent=1) + "\n")
    (RESULTS / "small_data.candidates.json").write_text(json.dumps(
        [{"arch": a, "trial": cands[a]["trial"], "dev_score": cands[a]["dev"],
          "dev_se": cands[a]["dev_se"], "pool_agreement": cands[a]["pool"],
          "pool_se": cands[a]["pool_se"], "test_score_seed0": fin0[a]} for a in cand_rows]
        + [{"kendall_tau_dev": taus["dev"], "kendall_tau_agreement": taus["pool"],
            "n": len(cands)}], indent=1) + "\n")

    c0 = next(iter(cands.values()))
    print(f"\nsmall tweets task: train {len(run.data.train)}, dev {c0['dev_n']}, test "
          f"{len(run.data.test)}, unlabelled pool {c0['pool_n']}; teacher (MiniLM fine-tuned on "
          f"the {len(run.data.train)}): dev {run.teacher_dev['accuracy']:.4f} ± "
          f"{run.teacher_dev['accuracy_se']:.4f}, test {t_test:.4f} ± "
          f"{teacher_test['accuracy_se']:.4f}")
    for w in run.warnings:
        print(f"warning: {w}")
    print(f"search: random sampler, {len(cands)} trained candidates within "
          f"{cfg.budget.speedup:g}x (batch {cfg.budget.batch_size}, seq_len {cfg.budget.seq_len}),"
          f" {cfg.proxy.steps}-step distillation proxy")
    print("final recipe for every student: " + json.dumps(
        {k: v for k, v in cfg.to_dict()["distill"].items() if v is not None}) + "\n")
    print(text_table(["selector", "chosen architecture", "dev acc ± s.e. (150)",
                      f"pool agreement ± s.e. ({c0['pool_n']})", "test acc (3 seeds)", "std",
                      "% of teacher"], rows))
    print(f"\nevery candidate, finished once (seed 0): Kendall tau against the final test "
          f"accuracy: dev accuracy {taus['dev']:.3f}, pool agreement {taus['pool']:.3f} "
          f"(n={len(cands)})\n")
    print(text_table(["architecture", "dev acc", "pool agreement", "final test (seed 0)"],
                     [[a, f"{cands[a]['dev']:.4f}", f"{cands[a]['pool']:.4f}", f"{fin0[a]:.4f}"]
                      for a in cand_rows]))
    secs = results["seconds"]
    ds = [v["seconds"] for v in finals.values()]
    print(f"\nwall time (s): prepare {secs['prepare']:.0f} (this run), search {secs['search']:.0f},"
          f" {len(ds)} final distillations {sum(ds):.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

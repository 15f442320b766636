"""Many workers on one study: throughput with 1, 2 and 4 search processes against one
PostgreSQL study (configs/tiny.yaml's task), and the storage's own cost per trial (SQLite vs
PostgreSQL vs a journal file), from one run on this machine.

    python benchmarks/workers.py                 # workers 1 2 4, 8 trained trials each
    python benchmarks/workers.py --workers 1 2 --n-trials 6
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import optuna  # noqa: E402

from tacnas.nas.record import TrialRecord  # noqa: E402
from tacnas.nas.report import table  # noqa: E402
from tacnas.nas.study import open_storage  # noqa: E402
from tests import postgres, tiny_assets  # noqa: E402


def cli(project: Path, *args: str, wait: bool = True, threads: int | None = None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TACNAS_CACHE": str(project / "cache")}
    if threads:  # workers sharing one machine share its cores (oversubscribed OpenMP spins)
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(ROOT / "run_search.py"), "--quiet", *args]
    p = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"{' '.join(args)} failed:\n{err[-3000:]}")
    return p


def run_workers(project: Path, url: str, k: int, n_trials: int, steps: int) -> list[str]:
    study = f"w{k}"
    args = ["search", "--config", "tiny.yaml", "--study", study, "--storage", url,
            "--n-trials", str(n_trials), "--set", f"proxy.steps={steps}",
            "--set", "proxy.eval_every=0"]
    threads = max(1, (os.cpu_count() or 1) // k)
    t0 = time.perf_counter()
    first = cli(project, *args, wait=False, threads=threads)
    while True:  # the others join once the first has created the study
        time.sleep(0.5)
        try:
            if "config" in optuna.load_study(study_name=study, storage=url).user_attrs:
                break
        except KeyError:
            pass
        if first.poll() is not None:
            raise SystemExit(first.stderr.read()[-3000:])
    procs = [first] + [cli(project, *args, wait=False, threads=threads) for _ in range(k - 1)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"worker failed:\n{err[-3000:]}")
    wall = time.perf_counter() - t0
    s = optuna.load_study(study_name=study, storage=url)
    records = [TrialRecord.read(t) for t in s.trials]
    trained = [r for r in records if r.trained]
    names = [r.arch_name for r in trained]
    starts = [t.datetime_start for t in s.trials if t.datetime_start]
    ends = [t.datetime_complete for t in s.trials if t.datetime_complete]
    busy = (max(ends) - min(starts)).total_seconds()
    workers = {r.worker for r in records}
    return [str(k), str(len(trained)), str(len(s.trials)), str(len(workers)),
            str(len(names) - len(set(names))), f"{wall:.0f}", f"{busy:.0f}",
            f"{60 * len(trained) / busy:.2f}"]


def storage_cost(url: str, n: int) -> float:
    """ms per trial of a no-op objective that writes what a tacnas trial writes."""
    storage = open_storage(url)
    study = optuna.create_study(study_name=f"cost{time.time_ns()}", storage=storage,
                                sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        for name, choices in (("num_layers", [1, 2, 3, 4]), ("hidden_size", [128, 256, 384]),
                              ("intermediate_size", [256, 512, 1024]),
                              ("embedding_size", [128, "hidden"]),
                              ("num_hidden_groups", [1, "all"])):
            trial.suggest_categorical(name, choices)
        for key in ("worker", "arch", "arch_name", "latency_ms", "latency_source",
                    "predicted_ms", "budget_ms", "params", "budget_check_s", "status", "score",
                    "metrics", "train_seconds"):
            trial.set_user_attr(key, 1.0)
        trial.set_constraint("budget", -0.1)
        return 0.5

    t0 = time.perf_counter()
    study.optimize(objective, n_trials=n)
    return 1000 * (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--n-trials", type=int, default=8, help="trained trials per study")
    p.add_argument("--steps", type=int, default=150, help="proxy steps per trial")
    p.add_argument("--storage-trials", type=int, default=100)
    args = p.parse_args()

    project = Path(tempfile.mkdtemp(prefix="tacnas-workers-"))
    try:
        tiny_assets.build(project / "tiny")
        shutil.copy(ROOT / "configs" / "tiny.yaml", project / "tiny.yaml")
        cli(project, "profile", "--config", "tiny.yaml")  # one latency table for every worker
        with postgres.cluster() as url:
            rows = []
            for k in args.workers:
                print(f"{k} worker(s)...", flush=True)
                rows.append(run_workers(project, url, k, args.n_trials, args.steps))
            base = float(rows[0][-1])
            for r in rows:
                r.append(f"{float(r[-1]) / base:.2f}x")
            costs = [
                ("SQLite (file)", storage_cost(f"sqlite:///{project}/cost.db", args.storage_trials)),
                ("PostgreSQL 127.0.0.1", storage_cost(url, args.storage_trials)),
                ("Journal (file)", storage_cost(f"journal://{project}/cost.log",
                                                args.storage_trials)),
            ]
    finally:
        shutil.rmtree(project, ignore_errors=True)
    print(f"\nconfigs/tiny.yaml, proxy {args.steps} steps, {args.n_trials} trained trials per "
          f"study, one PostgreSQL study per row; {os.cpu_count()} CPU cores shared by the "
          "workers (OMP_NUM_THREADS = cores / workers)")
    print(table(["workers", "trained", "trials", "workers seen", "trained twice", "wall s",
                 "first start to last end s", "trained / min", "vs 1 worker"], rows))
    print(f"\nstorage cost: a no-op objective writing a tacnas trial's fields, "
          f"{args.storage_trials} trials")
    print(table(["storage", "ms per trial"], [[n, f"{c:.1f}"] for n, c in costs]))


if __name__ == "__main__":
    main()

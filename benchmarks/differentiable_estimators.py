"""What takes the differentiable search where it goes: the estimator of the architecture
gradient, or the supernet's weight steps?

At 4x@1 the search at its earlier defaults (AdaBERT's straight-through Gumbel-softmax through the
gated supernet, each weight step on a slice drawn from the distributions) went to 3-layer,
256-wide students with E = 128, 0.76 points below the Optuna search's pick (2 layers, 384 wide,
E = H), and its distributions ranked proxy_fidelity's band of 36 finished students at Kendall
tau 0.15 (differentiable_ranking.py). This runs the search (the shipped config's budget, floor
and data; nothing trained in full) four ways, 2 x 2:

- ``estimator``: ``gumbel`` (straight-through, through the gated supernet) or ``reinforce``
  (the score function of 8 slices drawn from the distributions, scored on the same dev batch
  against the others' mean);
- ``weights``: ``sampled`` (a weight step trains a slice drawn from the distributions) or
  ``uniform`` (drawn uniformly throughout, as the supernet proxy trains).

Per arm: the search's wall time, each dimension's final entropy over uniform, the derived
student, the 8 most likely within the budget (the finalists the search would train), and over
the band's 36 students (each finished by search_vs_hand's kd2 recipe, 3 seeds): Kendall tau
against the final test mean of the slice's dev agreement with the teacher (the supernet) and
of the log-likelihood under the final distributions (the search), and the likelihood rank of
the Optuna pick among the space's architectures.

``--seeds`` runs the arms at other seeds of the search (the supernet's initialisation, the
draws and the batches; the teacher and the data splits stay the config's seed 0's), and
``--budget`` at other budgets: there the band (4x@1's) has no finished student, so its taus and
the Optuna pick's rank are left out (null).

Resumable: each arm's study lives in ``--work``/ARM (``ARM/s1`` at seed 1, ``BUDGET/ARM``
outside 4x@1) and its numbers are written to ``--work``/results.json when done. Prints its
table and writes ``benchmarks/results/differentiable_estimators.json``: records ``arm``,
``seed``, ``estimator``, ``weights``, ``budget``, ``search_seconds``, ``entropy_over_uniform``, ``derived``,
``likely`` (``arch``, ``final_test_mean`` where the band or a committed benchmark finished
it with 3 seeds, ``use``), ``tau_slice_agreement``,
``tau_log_likelihood``, ``n``, ``optuna_pick_rank``, ``space_size``, ``cpu``.

    python benchmarks/differentiable_estimators.py    # about 20 min on 2 CPU cores
    python benchmarks/differentiable_estimators.py --arms reinforce-uniform --seeds 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
from pathlib import Path

import torch
from finalist_search import (  # benchmarks/
    DIFFERENTIABLE,
    base_overrides,
    finished_elsewhere,
    study_overrides,
)
from real_task import resumable
from scipy.stats import kendalltau
from search_vs_hand import entropy_over_uniform

from tacnas.evaluators.latency_table import cpu_name
from tacnas.nas.budget import Budget
from tacnas.nas.config import load_config
from tacnas.nas.differentiable import checkpointed, differentiable_search, likely, log_prob
from tacnas.nas.pipeline import prepare
from tacnas.nas.record import TrialRecord
from tacnas.nas.report import table as text_table
from tacnas.nas.study import best_trial, create_or_load, default_storage
from tacnas.searchspace.arch import ArchConfig

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = {f"{e}-{w}": (e, w) for e in ("gumbel", "reinforce") for w in ("sampled", "uniform")}
OPTUNA_PICK = "L2-H384-A12-F256-E384-G2"  # finalist_search's shipped study at 4x@1
BAND_BUDGET = "4x@1"  # proxy_fidelity's band of 36 finished students lies at this budget


def unit_key(budget: str, arm: str, seed: int) -> str:
    """``4x@1/reinforce-uniform`` (seed 0, as the first sitting wrote it) or ``.../s1``."""
    return f"{budget}/{arm}" + (f"/s{seed}" if seed else "")


def run_arm(args, arm: str, seed: int, band: dict) -> dict:
    estimator, weights = ARMS[arm]
    key = unit_key(args.budget, arm, seed)  # at 4x@1 without the budget, as the first sitting
    folder = Path(args.work).absolute() / (key.split("/", 1)[1] if args.budget == BAND_BUDGET
                                           else key)
    cfg = load_config(args.config, [
        *base_overrides(folder, args.budget),
        *study_overrides(args.config)[DIFFERENTIABLE], f"differentiable.estimator={estimator}",
        f"differentiable.weights={weights}", "search.rescore_top_k=0",  # no finalists
        "search.rescore_recipe=proxy", "search.rescore_objective=proxy",
        "search.rescore_prune=null"])
    run = prepare(cfg, progress=True)  # the teacher and data at the config's seed
    run = dataclasses.replace(run, cfg=dataclasses.replace(cfg, seed=seed))
    study = create_or_load(DIFFERENTIABLE, default_storage(cfg.run_dir, DIFFERENTIABLE), cfg)
    differentiable_search(run, study)
    rec = TrialRecord.read(best_trial(study))
    budget = Budget.resolve(run, study)
    net, alpha = checkpointed(run, study)
    net.eval()
    logp = log_prob(net, alpha)
    rows = []
    for name, final in (band.items() if args.budget == BAND_BUDGET else ()):
        arch = ArchConfig.from_name(name)
        with torch.no_grad():
            metrics, _ = run.proxy.final_scores(net.extract(arch))
        rows.append((final, metrics["agreement"], logp(arch)))
    final = [r[0] for r in rows]
    names = [a.name for a in sorted(run.space.all_archs(), key=lambda a: -logp(a))]
    out = {
        "arm": arm, "seed": seed, "estimator": estimator, "weights": weights, "budget": args.budget,
        "search_seconds": rec.train_seconds,
        "entropy_over_uniform": entropy_over_uniform(rec.extra["final_entropy"], run.space),
        "derived": rec.arch_name,
        "likely": [{"arch": a.name, "final_test_mean": band.get(a.name),
                    "use": budget.check(a).latency_ms / budget.budget_ms}
                   for a in likely(run, net, alpha, budget, 8)],
        "tau_slice_agreement": float(kendalltau(final, [r[1] for r in rows])[0]) if rows else None,
        "tau_log_likelihood": float(kendalltau(final, [r[2] for r in rows])[0]) if rows else None,
        "n": len(rows),
        "optuna_pick_rank": names.index(OPTUNA_PICK) + 1
        if OPTUNA_PICK in names and rows else None,
        "space_size": len(names), "cpu": cpu_name()}
    run.meter.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--budget", default="4x@1")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="the search's seeds (supernet, draws, batches; the teacher and the "
                    "data splits stay the config's)")
    ap.add_argument("--work", default="runs/bench_differentiable_estimators")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work, results, save = resumable(args.work)
    band = {a["arch"]: a["final_test_mean"]
            for a in json.loads((RESULTS / "proxy_fidelity.archs.json").read_text())}
    for arm in args.arms:
        for seed in args.seeds:
            key = unit_key(args.budget, arm, seed)
            if key not in results:
                results[key] = run_arm(args, arm, seed, band)
                save()
    recs = [{"seed": 0, **results[k]} for k in sorted(results)]  # all sittings'
    for r in recs:  # the likely students finished outside the band, where any were
        for a in r["likely"]:
            if a["final_test_mean"] is None:
                a["final_test_mean"] = finished_mean(a["arch"])
    print(f"the differentiable search (search only; {recs[0]['cpu']}, 2 cores, nothing else "
          f"running); taus over proxy_fidelity's {BAND_BUDGET} band of 36 students (kd2, 3 seeds)")
    print(text_table(
        ["budget", "arm", "seed", "search s", "max entropy / uniform", "derived",
         "tau slice agreement", "tau log-likelihood", "Optuna pick's likelihood rank",
         "mean final test of the likely 8"],
        [[r["budget"], r["arm"], str(r["seed"]), f"{r['search_seconds']:.0f}",
          f"{max(r['entropy_over_uniform'].values()):.2f}", r["derived"],
          _fmt(r["tau_slice_agreement"]), _fmt(r["tau_log_likelihood"]),
          f"{r['optuna_pick_rank']} of {r['space_size']}" if r["optuna_pick_rank"] else "-",
          _known_mean(r["likely"])] for r in recs]))
    for r in recs:
        print(f"{r['budget']} {r['arm']} seed {r['seed']}: entropy over uniform "
              + ", ".join(f"{d} {v:.2f}" for d, v in r["entropy_over_uniform"].items()))
        for i, a in enumerate(r["likely"], 1):
            known = f"{a['final_test_mean']:.4f}" if a["final_test_mean"] is not None else "-"
            print(f"  likely #{i} {a['arch']}  use {a['use']:.2f}  final test {known}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "differentiable_estimators.json").write_text(json.dumps(recs, indent=1) + "\n")
    return 0


COMMITTED = [str(RESULTS / f"{name}.json")
             for name in ("finalist_search", "best_in_space", "search_vs_hand")]


def finished_mean(arch: str) -> float | None:
    """``arch``'s test mean over seeds 0, 1 and 2 where committed benchmarks finished all three
    (``finished_elsewhere``: the kd2 recipe, the full-data teacher; finalist_search's units
    first, as its table quotes them)."""
    units = [finished_elsewhere(COMMITTED, f"{arch}/s{seed}") for seed in (0, 1, 2)]
    return statistics.mean(u["test"] for u in units) if all(units) else None


def _fmt(tau: float | None) -> str:
    return "-" if tau is None else f"{tau:.3f}"


def _known_mean(likely: list[dict]) -> str:
    known = [a["final_test_mean"] for a in likely if a["final_test_mean"] is not None]
    return f"{statistics.mean(known):.4f} ({len(known)} of {len(likely)} finished)" \
        if known else "-"


if __name__ == "__main__":
    raise SystemExit(main())

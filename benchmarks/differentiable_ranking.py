"""How the differentiable search's supernet ranks the band its finalists come from.

finalist_search.py's differentiable study at 4x@1 trained its 8 most likely architectures in
full, all of them 3-layer students, 0.76 points below the shipped Optuna search's pick
(L2-H384-F256-E384-G2, which the distributions gave a probability near 0). Is the choice of
finalists (the most likely) at fault, or the supernet itself? This loads that study's finished
search (its last checkpoint: supernet and distributions; nothing is trained) and scores,
for proxy_fidelity's 36 architectures of one latency band near the 4x budget (each finished by
search_vs_hand's kd2 recipe, 3 seeds) and the Optuna pick: the extracted supernet slice's dev
agreement with the teacher and dev accuracy, and the architecture's log-likelihood under the
final distributions. Kendall tau of each against the final test mean, over the 36.

Prints the table and writes ``benchmarks/results/differentiable_ranking.json``: records
``arch``, ``final_test_mean``, ``slice_agreement``, ``slice_accuracy``, ``log_likelihood``,
``in_fidelity_band`` and, per score, ``{"score", "tau", "n"}`` under ``"taus"``.

    python benchmarks/differentiable_ranking.py     # about 3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

import torch
from finalist_search import (  # benchmarks/
    DIFFERENTIABLE,
    GUMBEL_STUDY,
    base_overrides,
    study_overrides,
)
from scipy.stats import kendalltau

from tacnas.nas.config import load_config
from tacnas.nas.differentiable import checkpointed, log_prob
from tacnas.nas.pipeline import prepare
from tacnas.nas.report import table as text_table
from tacnas.nas.study import create_or_load, default_storage
from tacnas.searchspace.arch import ArchConfig

RESULTS = Path(__file__).resolve().parent / "results"
OPTUNA_PICK = "L2-H384-A12-F256-E384-G2"  # finalist_search's shipped study at 4x@1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--work", default="runs/bench_finalist_search",
                    help="finalist_search.py's --work, holding its 4x@1 differentiable study")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, [*base_overrides(Path(args.work).absolute(), "4x@1"),
                                    *study_overrides(args.config)[GUMBEL_STUDY]])
    run = prepare(cfg, progress=True)
    # the Gumbel study ran under the name "differentiable", before the defaults changed
    study = create_or_load(DIFFERENTIABLE, default_storage(cfg.run_dir, DIFFERENTIABLE), cfg)
    net, alpha = checkpointed(run, study)
    net.eval()
    logp = log_prob(net, alpha)
    band = json.loads((RESULTS / "proxy_fidelity.archs.json").read_text())
    optuna_pick = json.loads((RESULTS / "finalist_search.json").read_text())
    pick_test = [r["test_score"] for r in optuna_pick
                 if r["budget"] == "4x@1" and r["student"] == "shipped"]
    rows = [{"arch": a["arch"], "final_test_mean": a["final_test_mean"], "in_fidelity_band": True}
            for a in band]
    rows.append({"arch": OPTUNA_PICK, "final_test_mean": statistics.mean(pick_test),
                 "in_fidelity_band": False})
    for r in rows:
        arch = ArchConfig.from_name(r["arch"])
        with torch.no_grad():
            metrics, _ = run.proxy.final_scores(net.extract(arch))
        r.update(slice_agreement=metrics["agreement"], slice_accuracy=metrics["accuracy"],
                 log_likelihood=logp(arch))
    run.meter.close()
    scored = [r for r in rows if r["in_fidelity_band"]]
    final = [r["final_test_mean"] for r in scored]
    taus = [{"score": k, "tau": float(kendalltau(final, [r[k] for r in scored])[0]),
             "n": len(scored)} for k in ("slice_agreement", "slice_accuracy", "log_likelihood")]
    rows.sort(key=lambda r: -r["slice_agreement"])
    print("4x@1: the differentiable study's supernet (finalist_search, its last checkpoint) "
          "on proxy_fidelity's band and the Optuna pick; final test: kd2, 3 seeds")
    print(text_table(["architecture", "final test", "slice agreement", "slice accuracy",
                      "log-likelihood"],
                     [[r["arch"] + ("" if r["in_fidelity_band"] else " (Optuna pick)"),
                       f"{r['final_test_mean']:.4f}", f"{r['slice_agreement']:.4f}",
                       f"{r['slice_accuracy']:.4f}", f"{r['log_likelihood']:.1f}"]
                      for r in rows]))
    for t in taus:
        print(f"Kendall tau of {t['score']} against the final test mean: {t['tau']:.3f} "
              f"(n {t['n']})")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "differentiable_ranking.json").write_text(
        json.dumps({"records": rows, "taus": taus}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

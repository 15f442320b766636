"""Would pruning the finalists have changed what the finalist search chose? A replay.

The finalist search (``search.rescore_top_k: 8``, ``rescore_recipe: distill``) trains its 8
finalists one after another by the full recipe, and the stage costs 8 full trainings: about
90% of the differentiable search's wall time at 8x@1. ``search.rescore_prune: m`` stops a
finalist at the first evaluation where its dev accuracy is more than ``m`` below the best the
finished finalists (trained in full, not pruned) had at the same step; it is then not chosen.

This replays the rule on finalist searches that trained every finalist in full: each
finalist's dev curve (every ``distill.eval_every`` steps, in its checkpoint's state), in the
order ``rescore`` trained them (the study's trials by proxy value, as it sorts them); a pruned
finalist's cost is its training seconds up to the pruning step. What it reports per study and
margin: the finalists kept, the share of the finalists' training seconds spent, and the pick
(dev agreement among those kept, as the search chooses) against the study's actual pick, with
that pick's seed-0 test accuracy. Nothing is trained; the numbers are those the studies
recorded (finalist_search.py's ``--work`` folders).

Prints its table and writes ``benchmarks/results/finalist_pruning.json``: records ``work``,
``budget``, ``study``, ``margin``, ``n``, ``kept``, ``seconds_full``, ``seconds_replayed``,
``share``, ``pick``, ``replayed_pick``, ``same_pick``, ``pick_test``, ``replayed_pick_test``.

    python benchmarks/finalist_pruning.py   # seconds
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import optuna

from tacnas.evaluators.checkpoint import read_state
from tacnas.nas.distill import fell_behind, lead_of
from tacnas.nas.report import table as text_table
from tacnas.nas.study import rescored
from tacnas.searchspace.arch import ArchConfig

RESULTS = Path(__file__).resolve().parent / "results"
MARGINS = (0.005, 0.01, 0.02, 0.03)
WORK = ("runs/bench_finalist_search", "runs/bench_finalist_search_rf",
        "runs/bench_finalist_search_tight")


def finalist_searches(work: Path):
    """``(budget, study name, results entry, [(arch, state)] in training order)`` of each
    finalist search in ``work`` whose finalists were trained (and kept) there."""
    results = json.loads((work / "results.json").read_text())
    for budget, mine in results.items():
        for name, s in mine.get("searches", {}).items():
            # finalist_search.json renamed the earlier differentiable studies; not their folders
            folder = work / "runs" / budget / name.removesuffix("-gumbel")
            tags = list((folder / "finalists").glob("*/")) if "finalists" in s else []
            if len(tags) != 1:
                continue
            study = optuna.load_study(study_name=folder.name,
                                      storage=f"sqlite:///{folder / 'study.db'}")
            trials = study.get_trials(deepcopy=False)
            order, seen = [], set()
            for n in sorted(rescored(study), key=lambda n: (-trials[n].value, n)):
                arch = trials[n].user_attrs["arch_name"]
                if arch not in seen:
                    seen.add(arch)
                    order.append((arch, read_state(tags[0] / arch / "checkpoint")))
            yield budget, name, s, order


def replay(order: list, margin: float) -> tuple[list[str], float]:
    """The finalists kept under ``margin`` (the search's own rule: ``lead_of`` the kept ones'
    curves, ``fell_behind`` it), and the seconds their training took."""
    kept, seconds, curves = [], 0.0, []
    for arch, state in order:
        pruned = fell_behind(state["curve"], lead_of(curves, margin))
        if pruned is None:
            kept.append(arch)
            seconds += state["seconds"]
            curves.append(state["curve"])
        else:
            seconds += state["seconds"] * pruned / state["step"]
    return kept, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", nargs="+", default=list(WORK))
    args = ap.parse_args()
    records, rows = [], []
    for folder in args.work:
        work = Path(folder)
        if not (work / "results.json").is_file():
            continue
        for budget, name, s, order in finalist_searches(work):
            fin = s["finalists"]
            pick = ArchConfig.from_dict(s["arch"]).name
            full = sum(state["seconds"] for _, state in order)
            for margin in MARGINS:
                kept, seconds = replay(order, margin)
                mine = max(kept, key=lambda a: fin[a]["dev_agreement"])
                records.append({"work": work.name, "budget": budget, "study": name,
                                "margin": margin, "n": len(order), "kept": len(kept),
                                "seconds_full": full, "seconds_replayed": seconds,
                                "share": seconds / full, "pick": pick, "replayed_pick": mine,
                                "same_pick": mine == pick, "pick_test": fin[pick]["test"],
                                "replayed_pick_test": fin[mine]["test"]})
                rows.append([work.name, budget, name, f"{margin:g}", f"{len(kept)}/{len(order)}",
                             f"{seconds:.0f} of {full:.0f}", f"{seconds / full:.2f}",
                             "yes" if mine == pick else f"NO: {mine}",
                             f"{fin[mine]['test']:.4f} ({fin[pick]['test']:.4f})"])
    print("the finalist stage replayed with search.rescore_prune (the studies' own curves; "
          "seconds: the finalists' training on the CPU that ran them)")
    print(text_table(["work", "budget", "study", "margin", "kept", "finalist seconds",
                      "share", "same pick", "pick test s0 (actual)"], rows))
    for margin in MARGINS:
        mine = [r for r in records if r["margin"] == margin]
        if mine:
            print(f"margin {margin:g}: the same pick in {sum(r['same_pick'] for r in mine)} of "
                  f"{len(mine)} studies; share of the finalists' seconds "
                  f"{min(r['share'] for r in mine):.2f}-{max(r['share'] for r in mine):.2f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "finalist_pruning.json").write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

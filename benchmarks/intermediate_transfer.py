"""Does intermediate-layer transfer separate a searched student from the hand-designed one?

search_vs_hand's 4x@1 row ties: the best searched student (TPE's) is +0.34 points over the
teacher's first layer at full width, under a final recipe of logit distillation only (kd2). This
finishes those two students again, on this machine, with the same recipe plus TinyBERT's
hidden-state transfer (``distill.hidden_weight`` 1, every student layer's hidden state and the
embedding output against a teacher layer, through a learned projection where the widths differ)
with TinyBERT's uniform layer map (``distill.intermediate_map: uniform``: the student's last layer
against the teacher's last, whatever layer it starts from; the default map, the one it starts
from, would match the first-layer student against teacher layer 0, the layer it already is), and
with kd2 itself here, so both recipes' numbers come from one device.

The students are read from ``benchmarks/results/search_vs_hand.json`` (``--budget``): the searched
one and the hand-designed one that fits with the best kd2 mean test score there; a hand student
starts from the teacher layers its family names, a searched one from layers spread over the
teacher's depth, as in search_vs_hand. The teacher and data are search_vs_hand's (the full-data
teacher, cached once).

Resumable: each (recipe, student, seed) is written to ``--work``/results.json when done and
skipped on rerun. Prints one table and writes ``benchmarks/results/intermediate_transfer.json``:
records ``task``, ``budget``, ``student``, ``kind``, ``arch``, ``recipe``, ``seed``,
``test_score``, ``dev_score``, ``teacher_test_score``, ``steps``, ``seconds``, ``device``.

    python benchmarks/intermediate_transfer.py
    python benchmarks/intermediate_transfer.py --recipes kd2-hidden --seeds 0   # a first sitting
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics

from real_task import distill_seed, resumable  # benchmarks/ is the script's folder
from search_vs_hand import FULL_DATA, RESULTS, _sd, hand_students, parse_budget

from tacnas.evaluators.latency_table import cpu_name
from tacnas.nas.config import load_config
from tacnas.nas.pipeline import prepare
from tacnas.nas.report import table as text_table
from tacnas.searchspace.arch import ArchConfig

# the final recipes compared: search_vs_hand's (kd2: KD at T=2 with 0.5 CE, 2 epochs) and the
# same plus hidden-state transfer under TinyBERT's uniform layer map
RECIPES = {
    "kd2": [],
    "kd2-hidden": ["distill.hidden_weight=1.0", "distill.intermediate_map=uniform"],
}
log = logging.getLogger("intermediate_transfer")


def pair_of(records: list[dict], budget: str) -> dict[str, dict]:
    """The best searched and the best fitting hand-designed student of ``budget`` (by kd2 mean
    test score), keyed by architecture: ``{arch: {names, kind, kd2_table}}``; ``names`` are the
    searches (or hand families) that arrived at it, as search_vs_hand lists them."""
    by = {}
    for r in records:
        if r["budget"] == budget and r.get("recipe", "kd2") == "kd2" and r["fits"]:
            st = by.setdefault((r["kind"], r["arch"]), {"names": [], "scores": {}})
            if r["student"] not in st["names"]:
                st["names"].append(r["student"])
            st["scores"].setdefault(r["student"], []).append(r["test_score"])
    out = {}
    for kind in ("search", "hand"):
        cands = [(statistics.mean(st["scores"][st["names"][0]]), arch, st)
                 for (k, arch), st in by.items() if k == kind]
        if not cands:
            raise SystemExit(f"--budget {budget}: search_vs_hand.json has no fitting {kind} "
                             "student there; pick a budget with both (e.g. 4x@1)")
        mean, arch, st = max(cands, key=lambda c: c[0])
        out[arch] = {"names": st["names"], "kind": kind, "kd2_table": mean}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--budget", default="4x@1")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipes", nargs="+", default=["kd2-hidden", "kd2"], choices=list(RECIPES))
    ap.add_argument("--work", default="runs/bench_intermediate_transfer")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work, results, save = resumable(args.work)
    units = results.setdefault("units", {})
    speedup, batch = parse_budget(args.budget)
    pair = pair_of(json.loads((RESULTS / "search_vs_hand.json").read_text()), args.budget)

    runs = {}

    def run_for(recipe: str):
        if recipe not in runs:
            runs[recipe] = prepare(load_config(args.config, [
                *FULL_DATA, *RECIPES[recipe], f"budget.batch_size={batch}",
                f"run_dir={work / 'runs'}"]), progress=True)
        return runs[recipe]

    hand = hand_students(run_for(args.recipes[0]), speedup)
    for name, st in pair.items():
        st["layers"] = None  # a searched student: layers spread over the teacher's depth
        if st["kind"] == "hand":
            arch, st["layers"], _ = hand[st["names"][0]]
            if arch.name != name:
                raise SystemExit(f"{args.budget}/{st['names'][0]}: the latency table here picks "
                                 f"{arch.name}, search_vs_hand's table {name}")
    for recipe in args.recipes:  # recipe by recipe; within one, both students of a seed together
        for seed in args.seeds:
            for name, st in pair.items():
                unit = f"{recipe}/{name}/s{seed}"
                if unit in units:
                    continue
                units[unit] = {**distill_seed(run_for(recipe), ArchConfig.from_name(name),
                                              work / "distilled" / unit.replace("/", "_"), seed,
                                              label=unit, layers=st["layers"]),
                               "device": "cpu"}
                save()
                print(f"{unit}: test {units[unit]['test']:.4f} ({units[unit]['seconds']:.0f} s)",
                      flush=True)

    records, rows, means = [], [], {}
    for recipe in args.recipes:
        for name, st in pair.items():
            student = " = ".join(st["names"])
            got = [units.get(f"{recipe}/{name}/s{s}") for s in args.seeds]
            if any(u is None for u in got):
                continue
            for s, u in zip(args.seeds, got):
                records.append({"task": "tweets", "budget": args.budget, "student": student,
                                "kind": st["kind"], "arch": name, "recipe": recipe,
                                "seed": s, "test_score": u["test"], "dev_score": u["dev"],
                                "teacher_test_score": u["teacher_test"], "steps": u["steps"],
                                "seconds": u["seconds"], "device": cpu_name()})
            test = [u["test"] for u in got]
            dev = [u["dev"] for u in got]
            means[(recipe, st["kind"])] = (statistics.mean(test), _sd(test))
            rows.append([recipe, student, st["kind"], name,
                         f"{statistics.mean(dev):.4f} ± {_sd(dev):.4f}",
                         f"{statistics.mean(test):.4f} ± {_sd(test):.4f}",
                         f"{100 * statistics.mean(test) / got[0]['teacher_test']:.1f}",
                         f"{statistics.mean(u['steps'] for u in got):.0f}",
                         f"{statistics.mean(u['seconds'] for u in got):.0f}"])
    if not rows:
        print("no (recipe, student) has every seed yet; rerun to continue")
        return 0
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "intermediate_transfer.json").write_text(json.dumps(records, indent=1) + "\n")
    print(f"\n{args.budget}: trained on the CPU here ({cpu_name()}, 2 threads); seeds "
          f"{args.seeds}; test accuracy on the tweets task; recipes: "
          + "; ".join(f"{r} = kd2 {' '.join(RECIPES[r])}".rstrip() for r in args.recipes))
    print(text_table(["recipe", "student", "kind", "architecture", "dev mean ± std",
                      "test mean ± std", "% of teacher", "steps run", "s per seed"], rows))
    for recipe in args.recipes:
        if (recipe, "search") in means and (recipe, "hand") in means:
            (s, ss), (h, hs) = means[(recipe, "search")], means[(recipe, "hand")]
            pooled = ((ss ** 2 + hs ** 2) / 2) ** 0.5
            print(f"{recipe}: searched - hand-designed {100 * (s - h):+.2f} points (twice the "
                  f"pooled seed std {200 * pooled:.2f}; target +1.0 and more than that)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

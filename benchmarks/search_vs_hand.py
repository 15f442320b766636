"""Does the search pay? Searched students against hand-designed ones, 3 seeds each, the same
final recipe for all, on the full-data teacher.

The tweets task (configs/demo.yaml) with its teacher fine-tuned on every training tweet
(``task.max_train_samples=null``, cached once; the same teacher for every student). Budgets
(``--budgets``, default ``4x@1 8x@1 4x@32``): speedup over the teacher at batch size 1 or 32,
seq_len 64, 2 threads, this machine. Per budget:

- ``tpe``: Optuna TPE with the config's default proxy and 20 trained candidates,
- ``tpe-sn3000``: the same with the supernet trained 3000 steps (``proxy.supernet_steps``; the
  demo's 800 keep ``make demo`` within 15 minutes),
- ``tpe-rescored``: a copy of that TPE study, its 4 best re-scored by the 800-step distillation
  proxy (``search.rescore_top_k``), the best by that score kept,
- ``differentiable``: the Gumbel-softmax search over the supernet (``--diff-steps``) at its
  defaults (``arch_lr`` 0.1, the expected hinge as its latency term, architecture steps that
  skip the layers only unlikely layer counts run); ``differentiable-noskip`` the same with every
  layer in every architecture step (``skip_below`` 0, as all the rows below);
  ``differentiable-alr0.01`` at its earlier defaults (``arch_lr`` 0.01, the hinge of the
  expected latency) and ``differentiable-alr0.1-hoe`` those at ``arch_lr`` 0.1;
  ``differentiable-b0.9`` the no-skip defaults with Adam's beta1 0.9 for the logits, for its
  convergence only (its student is not finished),
- hand-designed students, each family's fastest member that fits the budget under the latency
  table (or, where none fits, its fastest member, marked as not fitting): the teacher's first k
  layers; every other layer (a stride of 6/k); the whole teacher uniformly narrowed (hidden and
  FFN together, whole heads); the teacher's first layer at full width.

Every student is finished by the same recipe (the config's ``distill`` section, on the full
training split: 2 epochs, lr 3e-4, KD at T=2 with 0.5 CE, early stopping on dev every 200
steps, patience 3; hand students start from the teacher layers their family names, searched ones
from layers spread over the teacher's depth) with each of ``--seeds``. One latency pass per batch
size measures every student and the teacher alternating (median of ``--sweeps``); ``fits`` is
that measurement against the budget.

The searched students of ``LAYER_VARIANTS`` are also finished from the teacher's first k layers
where that start differs from the default one (the same recipe and seeds; printed above the
table, records in
``benchmarks/results/search_vs_hand.layers.json``): whether the start a student is given, not
its architecture, is what separates it from the hand-designed first layer.

``--recipe kd4`` finishes the same students (the kd2 sittings' searches; no search runs) with
4 epochs instead of 2, the rest of the recipe unchanged, and prints each student's dev and test
under both recipes above its own table (``benchmarks/results/search_vs_hand.kd4.json``, the same
records with ``recipe``): is the hand-designed student's tie with the searched ones an artefact of
a short final recipe?

Resumable: each search, and each (student, seed), is written to ``--work``/results.json when
done and skipped on rerun, so the benchmark can span sittings (the distillations are most of its
time: see ``--distill-only`` to run a subset; ``--repeat`` trains students again on this machine,
where the table's runs came from another device). Prints one table and writes
``benchmarks/results/search_vs_hand.json``: records ``task``, ``budget``, ``student``, ``kind``
(search or hand), ``fits``, ``arch``, ``latency_ms``, ``speedup``, ``seed``, ``test_score``,
``teacher_test_score``.

    python benchmarks/search_vs_hand.py
    python benchmarks/search_vs_hand.py --budgets 4x@1 --seeds 0      # a first sitting
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import time
from pathlib import Path

import optuna
from real_task import (  # benchmarks/ is the script's folder
    MEASURED_SEARCH,
    distill_seed,
    hand_families,
    latency_pass,
    resumable,
)
from unit_keys import ident_of

from tacnas.evaluators.latency_table import cpu_name
from tacnas.nas.config import load_config
from tacnas.nas.pipeline import prepare
from tacnas.nas.record import TrialRecord
from tacnas.nas.report import table as text_table
from tacnas.nas.strategy import search
from tacnas.nas.study import best_trial, create_or_load, default_storage
from tacnas.searchspace.arch import ArchConfig
from tacnas.searchspace.build import group_layers, select_layers

RESULTS = Path(__file__).resolve().parent / "results"
FULL_DATA = ["task.max_train_samples=null", "distill.epochs=2", "distill.eval_every=200",
             *MEASURED_SEARCH]
# the differentiable search's estimator and weight steps as these arms ran (the defaults until
# benchmarks/differentiable_estimators.py measured the score function against them)
GUMBEL = ["differentiable.estimator=gumbel", "differentiable.weights=sampled"]
DIFF = [*GUMBEL, "search.strategy=differentiable"]
SEARCHES = {
    "tpe": [],  # the config's default sampler and proxy
    # the same with the supernet trained 3000 steps instead of the demo's 800 (proxy_fidelity:
    # tau 0.589 against 0.540 on its first 24 architectures, 0.547 against 0.573 on all 36)
    "tpe-sn3000": ["proxy.supernet_steps=3000"],
    # the same TPE trials, then multi-fidelity: its 4 best re-scored by 800 distillation steps
    "tpe-rescored": ["search.rescore_top_k=4", "search.rescore_steps=800"],
    # the differentiable search at its defaults then (arch_lr 0.1, the expected hinge,
    # architecture steps that skip the layers only unlikely layer counts run; the
    # straight-through Gumbel estimator, weights trained on sampled slices: GUMBEL)
    "differentiable": DIFF,
    # the same without that skip (every architecture step runs every supernet layer)
    "differentiable-noskip": [*DIFF, "differentiable.skip_below=0"],
    # with AdaBERT's size term (a pull towards fewer parameters) besides the latency hinge
    "differentiable-size0.1": [*DIFF, "differentiable.size_weight=0.1"],
    # its earlier defaults: arch_lr 0.01 and the hinge of the expected latency ...
    "differentiable-alr0.01": [*DIFF, "differentiable.arch_lr=0.01",
                               "differentiable.latency_loss=hinge_of_expected",
                               "differentiable.skip_below=0"],
    # ... and those at 10x the architecture learning rate
    "differentiable-alr0.1-hoe": [*DIFF, "differentiable.arch_lr=0.1",
                                  "differentiable.latency_loss=hinge_of_expected",
                                  "differentiable.skip_below=0"],
    # the defaults without the skip, with Adam's beta1 0.9 for the logits (the samples' noise
    # averaged, not followed): measured for convergence only (SEARCH_ONLY)
    "differentiable-b0.9": [*DIFF, "differentiable.arch_beta1=0.9",
                            "differentiable.skip_below=0"],
}
SEARCH_ONLY = {"differentiable-b0.9"}  # their entropies are reported, their students not finished
# searched students finished a second time from the teacher's first k layers (the hand
# first-layer student's start) instead of layers spread over its depth: does the start matter?
# (only where the two starts differ: a student whose layers share one group starts from the
# teacher's first layer either way)
LAYER_VARIANTS = ("4x@1/tpe", "4x@1/differentiable", "8x@1/tpe", "8x@1/differentiable-noskip")
# the final recipe: the config's ``distill`` section on the full data (``kd2``, the table's);
# ``--recipe kd4`` finishes the same students (searched once, under kd2) with twice the epochs:
# their dev scores were still rising at the end of kd2's 2 epochs (best step 1600-1862 of 1862)
RECIPES = {"kd2": [], "kd4": ["distill.epochs=4"]}
DEFAULT_RECIPE = "kd2"
RESCORES = {"tpe-rescored": "tpe"}  # starts from a copy of that search's finished study
log = logging.getLogger("search_vs_hand")


def entropy_over_uniform(entropy: dict, space) -> dict:
    """Each searched dimension's final entropy over the uniform distribution's (dimensions
    with one choice left out): the differentiable search's convergence, 0 to 1."""
    return {d: h / math.log(len(getattr(space, d))) for d, h in entropy.items()
            if len(getattr(space, d)) > 1}


def parse_budget(text: str) -> tuple[float, int]:
    """``"4x@1"`` -> (4.0, 1)."""
    speed, _, batch = text.partition("@")
    return float(speed.rstrip("x")), int(batch or 1)


def hand_students(run, speedup: float) -> dict[str, tuple[ArchConfig, list[int], bool]]:
    """Per family: (arch, teacher layers, fits under the table) for the budget."""
    tc = run.teacher.model.config
    head = tc.hidden_size // tc.num_attention_heads
    fams = hand_families(tc.num_hidden_layers, tc.hidden_size, tc.intermediate_size, head)
    fams["first-layer"] = [(ArchConfig(1, tc.hidden_size, tc.num_attention_heads,
                                       tc.intermediate_size, tc.hidden_size, 1), [0])]
    teacher_ms = run.latency.ms(_teacher(run))
    budget = teacher_ms / speedup
    out = {}
    for fam, members in fams.items():
        ms = {m[0].name: _ms(run, m[0]) for m in members}
        fit = [m for m in members if ms[m[0].name] <= budget]
        # the fastest member that fits is the weakest; the strongest that fits is the slowest
        # one within the budget: a hand designer spends the budget
        pick = max(fit, key=lambda m: ms[m[0].name]) if fit else \
            min(members, key=lambda m: ms[m[0].name])
        out[fam] = (pick[0], pick[1], bool(fit))
    return out


def _ms(run, arch: ArchConfig) -> float:
    """The latency model's prediction; measured where the table lacks one of the arch's blocks
    (a hand-designed student outside the space, e.g. hidden 320 with FFN 1280)."""
    try:
        return run.latency.ms(arch)
    except KeyError:
        return run.meter.arch_ms(arch)


def recipe_units(results: dict, recipe: str) -> dict:
    """The (student, seed) results of ``recipe``, keyed ``IDENT/sSEED``: the default recipe's
    are ``results["units"]``, another's ``results["recipes"][recipe]``."""
    if recipe == DEFAULT_RECIPE:
        return results.setdefault("units", {})
    return results.setdefault("recipes", {}).setdefault(recipe, {})


def distilled_dir(recipe: str) -> str:
    return "distilled" if recipe == DEFAULT_RECIPE else f"distilled-{recipe}"


def recipe_rows(students: dict, base: dict, units: dict, args) -> None:
    """Each student finished by the default recipe and by ``args.recipe`` (the same seeds):
    dev (what a user picking a recipe would look at) and test, mean ± std."""
    rows, seen = [], set()
    for key, st in students.items():
        arch, ident = ident_of(st)
        if key.split("/")[0] not in args.budgets or ident in seen:
            continue
        seen.add(ident)
        keys = [f"{ident}/s{s}" for s in args.seeds]
        if any(k not in base for k in keys):
            continue
        cells = []
        for split in ("dev", "test"):
            a = [base[k][split] for k in keys]
            b = [units[k][split] for k in keys]
            cells += [f"{statistics.mean(a):.4f} ± {_sd(a):.4f}",
                      f"{statistics.mean(b):.4f} ± {_sd(b):.4f}",
                      f"{100 * (statistics.mean(b) - statistics.mean(a)):+.2f}"]
        steps = statistics.mean(units[k]["steps"] for k in keys)
        rows.append([ident, st["kind"], *cells, f"{steps:.0f}"])
    print(f"\nthe same students finished by {DEFAULT_RECIPE} and by {args.recipe} "
          f"({' '.join(RECIPES[args.recipe])}), seeds {args.seeds}:")
    print(text_table(["student", "kind", f"dev {DEFAULT_RECIPE}", f"dev {args.recipe}",
                      "dev diff (points)", f"test {DEFAULT_RECIPE}", f"test {args.recipe}",
                      "test diff (points)", f"steps run ({args.recipe})"], rows))


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def layer_rows(students: dict, variants: dict, units: dict, seeds: list[int],
               n_teacher: int) -> None:
    """Print (and write) each searched student from its default start against the same student
    from the teacher's first k layers, where every seed of both is in."""
    records, rows = [], []
    for key, var in variants.items():
        st = students[key]
        pair = [(ident_of(st)[1], None), (ident_of(var)[1], var["layers"])]
        if any(f"{ident}/s{s}" not in units for ident, _ in pair for s in seeds):
            continue
        arch = ArchConfig.from_dict(st["arch"])
        teacher_layers = select_layers(n_teacher, arch.num_layers)
        means = []
        for (ident, layers), start in zip(pair, ("spread", "first-k")):
            scores = [units[f"{ident}/s{s}"]["test"] for s in seeds]
            for s, v in zip(seeds, scores):
                records.append({"budget": key.split("/")[0], "student": key.split("/")[1],
                                "arch": arch.name, "start": start,
                                "teacher_layers": layers or teacher_layers, "seed": s,
                                "test_score": v})
            means.append((statistics.mean(scores), _sd(scores)))
        devices = {units[f"{i}/s{s}"].get("device", "cpu") for i, _ in pair for s in seeds}
        rows.append([key, arch.name, f"{teacher_layers}", f"{means[0][0]:.4f} ± {means[0][1]:.4f}",
                     f"{var['layers']}", f"{means[1][0]:.4f} ± {means[1][1]:.4f}",
                     f"{100 * (means[1][0] - means[0][0]):+.2f}", ", ".join(sorted(devices))])
    if rows:
        (RESULTS / "search_vs_hand.layers.json").write_text(json.dumps(records, indent=1) + "\n")
        print("\nthe teacher layers a searched student starts from (the same recipe and seeds):")
        print(text_table(["student", "architecture", "spread (default)", "test mean ± std",
                          "first k", "test mean ± std", "first k - spread (points)",
                          "trained on"], rows))


def device_rows(repeats: dict, units: dict) -> None:
    """The same (student, seed) trainings run twice (on one device or two): ``repeats`` holds
    the second run's results, keyed as ``units``."""
    by_ident = {}
    for key, other in repeats.items():
        ident = key.rpartition("/s")[0]
        if key in units:
            by_ident.setdefault(ident, []).append((units[key], other))
    rows = []
    for ident, pairs in by_ident.items():
        a = [p[0]["test"] for p in pairs]
        b = [p[1]["test"] for p in pairs]
        rows.append([ident, str(len(pairs)), pairs[0][0].get("device", "cpu"),
                     f"{statistics.mean(a):.4f} ± {_sd(a):.4f}",
                     pairs[0][1].get("device", "cpu"), f"{statistics.mean(b):.4f} ± {_sd(b):.4f}",
                     f"{100 * (statistics.mean(b) - statistics.mean(a)):+.2f}"])
    if rows:
        print("\nthe same trainings (recipe, seeds, teacher start) run twice:")
        print(text_table(["student", "seeds", "in the table", "test mean ± std", "again on",
                          "test mean ± std", "difference (points)"], rows))


def _teacher(run) -> ArchConfig:
    from tacnas.evaluators.latency_table import teacher_arch

    return teacher_arch(run.teacher.model.config)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--budgets", nargs="+", default=["4x@1", "8x@1", "4x@32"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--searches", nargs="+", default=list(SEARCHES), choices=list(SEARCHES),
                    help="which searches to run (a budget's table shows the ones that ran)")
    ap.add_argument("--diff-steps", type=int, default=600)
    ap.add_argument("--work", default="runs/bench_search_vs_hand")
    ap.add_argument("--sweeps", type=int, default=5)
    ap.add_argument("--repeat", nargs="*", metavar="BUDGET/STUDENT",
                    help="train these students' seeds again here (printed beside the table's: "
                         "the same training on two devices)")
    ap.add_argument("--distill-only", nargs="*", metavar="BUDGET/STUDENT",
                    help="finish only these students (e.g. 4x@1/tpe); the table waits for all")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every part (e.g. distill.epochs=3)")
    ap.add_argument("--recipe", default=DEFAULT_RECIPE, choices=list(RECIPES),
                    help="the final recipe: another than kd2 finishes the students the kd2 "
                         "sittings searched (each at --budgets), compares them with kd2 and "
                         "writes results/search_vs_hand.RECIPE.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work, results, save = resumable(args.work)
    secs = results.setdefault("seconds", {})
    over = [*FULL_DATA, *RECIPES[args.recipe], *args.set, f"run_dir={work / 'runs'}"]
    other_recipe = args.recipe != DEFAULT_RECIPE

    runs = {}  # batch size -> a prepared run (the teacher and data are cached across them)

    def run_for(batch: int):
        if batch not in runs:
            t0 = time.perf_counter()
            runs[batch] = prepare(load_config(args.config, [*over, f"budget.batch_size={batch}"]),
                                  progress=True)
            secs.setdefault(f"prepare_b{batch}", time.perf_counter() - t0)
            save()
        return runs[batch]

    students = results.setdefault("students", {})  # "4x@1/tpe" -> {arch, layers, kind}
    search_only = results.setdefault("search_only", {})  # the same, never finished
    for b in args.budgets:
        speedup, batch = parse_budget(b)
        run = run_for(batch)
        for name, extra in SEARCHES.items():
            key = f"{b}/{name}"
            if key in students or key in search_only or name not in args.searches:
                continue
            if other_recipe:  # the students are the kd2 sittings' (the search ignores distill)
                print(f"--recipe {args.recipe}: {key} not searched by a {DEFAULT_RECIPE} "
                      "sitting, left out")
                continue
            cfg = load_config(args.config, [*over, *extra, f"budget.batch_size={batch}",
                                            f"budget.speedup={speedup}",
                                            f"differentiable.steps={args.diff_steps}"])
            study_name = f"{name}_{b.replace('@', '_b')}"
            storage = default_storage(cfg.run_dir, study_name)
            if name in RESCORES and study_name not in optuna.get_all_study_names(storage):
                src = f"{RESCORES[name]}_{b.replace('@', '_b')}"
                optuna.copy_study(from_study_name=src, to_study_name=study_name,
                                  from_storage=default_storage(cfg.run_dir, src),
                                  to_storage=storage)
            study = create_or_load(study_name, storage, cfg)
            t0 = time.perf_counter()
            # the prepared run's proxy was built from its own config: a search that changes the
            # proxy's construction gets a run of its own (teacher, data and latency table cached)
            srun = (prepare(cfg, progress=True) if any(e.startswith("proxy.") for e in extra)
                    else dataclasses.replace(run, cfg=cfg))
            search(srun, study, n_trials=cfg.search.n_trials, timeout=None)
            secs[f"search_{key}"] = time.perf_counter() - t0
            best = best_trial(study)
            r = TrialRecord.read(best)
            (search_only if name in SEARCH_ONLY else students)[key] = {
                "arch": r.arch.to_dict(), "layers": None, "kind": "search", "proxy": r.score,
                "trial": best.number, "entropy": (r.extra or {}).get("final_entropy")}
            save()
        for fam, (arch, layers, fits) in hand_students(run, speedup).items():
            students.setdefault(f"{b}/{fam}", {"arch": arch.to_dict(), "layers": layers,
                                               "kind": "hand", "table_fits": fits})
        save()
    # "4x@1/tpe" -> the same student from the teacher's first k layers (default recipe only)
    variants = {} if other_recipe else results.setdefault("variants", {})
    # the teacher is the same at every batch size: any prepared run's (no batch-1 run prepared
    # for a batch-32-only sitting)
    n_teacher = run_for(parse_budget(args.budgets[0])[1]).teacher.model.config.num_hidden_layers
    for key in LAYER_VARIANTS:
        if key in students and key not in variants:
            arch = ArchConfig.from_dict(students[key]["arch"])
            first = list(range(arch.num_layers))
            if group_layers(arch, first) != group_layers(arch, select_layers(n_teacher,
                                                                             arch.num_layers)):
                variants[key] = {**students[key], "layers": first}
    save()

    # the same final recipe for every (student, seed); a student shared by two budgets is
    # trained once; the layer variants after the students
    units = recipe_units(results, args.recipe)
    wanted = set(args.distill_only) if args.distill_only else None
    for seed in args.seeds:
        for key, st in [*students.items(), *((f"{k}@first-k", v) for k, v in variants.items())]:
            b = key.split("/")[0]
            if b not in args.budgets or (wanted is not None and key not in wanted):
                continue
            arch, ident = ident_of(st)
            unit = f"{ident}/s{seed}"
            if unit in units:
                continue
            units[unit] = distill_seed(run_for(parse_budget(b)[1]), arch,
                                       work / distilled_dir(args.recipe) / unit.replace("/", "_"),
                                       seed,
                                       label=unit, layers=st["layers"])
            save()
            print(f"{key} seed {seed}: test {units[unit]['test']:.4f}", flush=True)
    # the same trainings again on this machine (where the table's came from another device)
    repeats = results.setdefault("repeats", {})
    if other_recipe and args.repeat:
        raise SystemExit("--repeat: only with the default recipe")
    for key in args.repeat or []:
        if key not in students:
            raise SystemExit(f"--repeat {key}: no such student (BUDGET/STUDENT, e.g. 4x@1/tpe)")
        arch, ident = ident_of(students[key])
        for seed in args.seeds:
            unit = f"{ident}/s{seed}"
            if unit not in repeats:
                repeats[unit] = distill_seed(run_for(parse_budget(key.split("/")[0])[1]), arch,
                                             work / "repeats" / unit.replace("/", "_"), seed,
                                             label=f"again {unit}", layers=students[key]["layers"])
                save()

    # one latency pass per batch size, once every unit is in
    missing = [f"{ident_of(st)[1]}/s{s}" for k, st in students.items() for s in args.seeds
               if k.split("/")[0] in args.budgets and f"{ident_of(st)[1]}/s{s}" not in units]
    if missing:
        print(f"{len(missing)} (student, seed) runs still to do; rerun to continue "
              f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
        return 0
    lat = results.setdefault("latency", {})
    for batch in sorted({parse_budget(b)[1] for b in args.budgets}):
        archs = {ident_of(st)[0] for k, st in students.items()
                 if parse_budget(k.split("/")[0])[1] == batch}
        have = lat.get(str(batch), {}).get("ms", {})
        if any(a.name not in have for a in archs):
            # a student joined after the pass: measure them all again, in one pass against the
            # teacher (ratios from two passes are not comparable); the earlier pass is kept
            if have:
                results.setdefault("latency_earlier", {}).setdefault(str(batch), []).append(
                    lat[str(batch)])
            ms, teacher_ms = latency_pass(run_for(batch), sorted(archs, key=lambda a: a.name),
                                          args.sweeps)
            lat[str(batch)] = {"ms": ms, "teacher_ms": teacher_ms}
            save()
    if other_recipe:
        recipe_rows(students, results["units"], units, args)
    else:
        layer_rows(students, variants, units, args.seeds, n_teacher)
        device_rows(results.get("repeats", {}), units)

    records, rows, by_budget = [], [], {}
    order = {b: i for i, b in enumerate(args.budgets)}  # rows by budget, searches first
    for key, st in sorted(students.items(), key=lambda kv: (
            order.get(kv[0].split("/")[0], len(order)), kv[1]["kind"] != "search")):
        b, student = key.split("/")
        if b not in args.budgets:
            continue
        speedup, batch = parse_budget(b)
        a, ident = ident_of(st)
        ms = lat[str(batch)]["ms"][a.name]
        sp = lat[str(batch)]["teacher_ms"] / ms
        scores = []
        for s in args.seeds:
            u = units[f"{ident}/s{s}"]
            scores.append(u["test"])
            records.append({"task": "tweets", "budget": b, "student": student,
                            "kind": st["kind"], "fits": sp >= speedup, "arch": a.name,
                            "latency_ms": ms, "speedup": sp, "seed": s, "test_score": u["test"],
                            "teacher_test_score": u["teacher_test"], "recipe": args.recipe})
        mean, sd = statistics.mean(scores), _sd(scores)
        teacher = records[-1]["teacher_test_score"]
        by_budget.setdefault(b, []).append((student, st["kind"], sp >= speedup, mean, sd))
        rows.append([b, student, st["kind"], a.name, f"{ms:.2f}", f"{sp:.2f}x",
                     "yes" if sp >= speedup else "NO", f"{mean:.4f}", f"{sd:.4f}",
                     f"{100 * mean / teacher:.1f}"])
    RESULTS.mkdir(exist_ok=True)
    out = "search_vs_hand.json" if not other_recipe else f"search_vs_hand.{args.recipe}.json"
    (RESULTS / out).write_text(json.dumps(records, indent=1) + "\n")
    first = run_for(parse_budget(args.budgets[0])[1])
    recipe = {k: v for k, v in first.cfg.to_dict()["distill"].items()
              if k not in ("checkpoint_every", "device", "feature_cache_gb")}
    devices = sorted({u.get("device", "cpu") for u in units.values()})
    print(f"\nlatency: {cpu_name()}, 2 threads, seq_len 64; seeds {args.seeds}; final recipe "
          f"(trained on {', '.join(devices)}): " + json.dumps(recipe))
    print(text_table(["budget", "student", "kind", "architecture", "ms", "speedup", "fits",
                      "test mean", "std", "% of teacher"], rows))
    for b, entries in by_budget.items():
        fit = [e for e in entries if e[2]]
        s = max((e for e in fit if e[1] == "search"), key=lambda e: e[3], default=None)
        h = max((e for e in fit if e[1] == "hand"), key=lambda e: e[3], default=None)
        if s and h:
            pooled = ((s[4] ** 2 + h[4] ** 2) / 2) ** 0.5
            d = s[3] - h[3]
            print(f"{b}: best searched {s[0]} {s[3]:.4f} vs best hand-designed {h[0]} "
                  f"{h[3]:.4f}: {100 * d:+.2f} points (pooled seed std {100 * pooled:.2f}; "
                  f"target +1.0 and > {200 * pooled:.2f})")
        elif s:
            print(f"{b}: best searched {s[0]} {s[3]:.4f}; no hand-designed student fits this "
                  "budget (each family's fastest member is slower)")
    for key, st in {**students, **search_only}.items():  # did the differentiable ones converge?
        if st.get("entropy") and key.split("/")[0] in args.budgets:
            rel = entropy_over_uniform(st["entropy"], first.space)
            print(f"{key}: final entropy / uniform " + ", ".join(
                f"{d} {r:.2f}" for d, r in sorted(rel.items()))
                  + f" ({'all' if max(rel.values()) < 0.5 else 'not all'} below 0.5; "
                  + (f"derived {ArchConfig(**st['arch']).name}, not finished)"
                     if key in search_only else f"{secs[f'search_{key}']:.0f} s)"))
    by_device = {}
    for u in units.values():
        n, t = by_device.get(u.get("device", "cpu"), (0, 0.0))
        by_device[u.get("device", "cpu")] = (n + 1, t + u["seconds"])
    print("wall time (s): " + "; ".join(f"{k} {v:.0f}" for k, v in secs.items()) + "; "
          + "; ".join(f"distillations on {d} {t:.0f} ({n}; benchmarks/on_device.py where not "
                      "the cpu: accuracy only)" if d != "cpu" else f"distillations {t:.0f} ({n})"
                      for d, (n, t) in by_device.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

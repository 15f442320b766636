"""The shipped finalist search at a budget it was not designed on, with and without a floor on
the budget's use.

best_in_space.py designed both rules at 4x@1: the finalist stage (the proxy's 8 best trained in
full by the final recipe, chosen by dev agreement with the teacher) and ``budget.min_use``
(candidates predicted under 0.85 of the budget rejected untrained, so the 8 come from the top of
the budget). This benchmark runs the shipped search elsewhere, on the same full-data teacher and
the same final recipe (search_vs_hand's kd2), as two Optuna studies per budget:

- ``finalists``: the config's TPE and default proxy, then ``search.rescore_top_k: 8``,
  ``rescore_recipe: distill``, ``rescore_objective: agreement``;
- ``finalists-use85``: the same with ``budget.min_use: 0.85``;
- ``shipped``: the search as ``--config`` ships it (its floor, finalists and proxy; the demo
  config's proxy is now the mean dev agreement of 5 runs where the two above ran one, scored
  by dev accuracy);
- ``differentiable``: the same with ``search.strategy: differentiable`` at its defaults: the
  search over its own supernet (the score-function estimator, weights trained on uniformly
  drawn slices), then its 8 most likely architectures within the budget (``budget.min_use``
  included) in place of TPE's proxy-ranked 8, trained in full and chosen by dev agreement
  alike;
- ``shipped-prune``, ``differentiable-prune``: ``shipped`` and ``differentiable`` with
  ``search.rescore_prune: 0.01``: the finalists train one after another, and one whose dev
  accuracy at an evaluation falls more than 0.01 below the best of the finished ones' at that
  step stops there and is not chosen. The demo config ships it since these ran, so
  ``shipped``, ``differentiable`` and ``differentiable-gumbel`` run again would prune too; the
  studies recorded under those names so far trained every finalist in full;
- ``differentiable-measured``: ``differentiable-prune`` again, since a finalist is measured
  before it is trained (``Budget.confirm``: one the latency table lets in over the budget gives
  its place to the next most likely). The 4x@32 ``differentiable-prune`` study ran before, and
  its pick measured 1% over the budget;
- ``shipped-paired``: ``shipped-prune``'s trained candidates (its study copied, where this
  ``--work`` holds it, less what its finalist stage recorded) through the finalist stage again,
  since a finalist under a ``speedup`` budget is measured paired with the teacher
  (``Budget.confirm``, ``LatencyMeter.arch_share``). At 4x@32 ``shipped-prune`` dropped its 16
  best finalists, 2-19% over a budget set by the teacher's lowest reading;
- ``differentiable-paired``: ``differentiable-prune`` again, since its finalists under a
  ``speedup`` budget are measured paired with the teacher;
- ``differentiable-gumbel``: the same at its earlier defaults (AdaBERT's straight-through
  Gumbel-softmax, weights trained on slices drawn from the distributions). Its studies ran
  under the name ``differentiable``, before the defaults changed.

Each study's pick is its seed-0 finalist (trained by the search, on this CPU) and is finished
with seeds 1 and 2 too. Beside them: search_vs_hand.json's students at the same budget (3 seeds,
the same recipe; trained on a lent H100 or this CPU, as recorded there), and one latency pass of
the picks against the teacher, then ``--sweeps`` passes of each pick paired with the teacher
(``paired_pass``: the figure the finalists are now checked by). A pick's seed that best_in_space already finished (``--reuse``:
the same recipe on the same teacher; a folder's results.json, or a committed JSON of records
with ``arch``, ``seed`` and ``test_score``) is taken from there and marked so.

Resumable: the studies live in ``--work``/runs; each (student, seed) is written to
``--work``/results.json when done and skipped on rerun. Prints its tables and writes
``benchmarks/results/finalist_search.json``: records ``task``, ``budget``, ``student``,
``kind`` ("search"), ``fits``, ``arch``, ``latency_ms``, ``speedup``, ``seed``,
``test_score``, ``teacher_test_score``, ``dev_score``, ``dev_agreement``, ``device``,
``paired_speedup`` (the median of the paired passes), ``paired_speedups``, ``fits_paired`` (and
``from``, the benchmark folder, on a reused seed), and for
the finalists of each study (kind "search-finalist", seed 0) the same (and ``pruned_at`` on a
finalist ``search.rescore_prune`` stopped: its scores are its best checkpoint's).

    python benchmarks/finalist_search.py --budget 8x@1     # about 40 min on 2 CPU cores
    python benchmarks/finalist_search.py --budget 4x@1 --studies shipped   # about 56 min
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
from pathlib import Path

from best_in_space import FINALIST_SEARCH, run_finalist_search, score_finalists

from tacnas.searchspace.arch import ArchConfig

RESULTS = Path(__file__).resolve().parent / "results"
BENCH = "finalist_search"
STUDIES = {"finalists-use85": [*FINALIST_SEARCH, "budget.min_use=0.85"],
           "finalists": FINALIST_SEARCH}
# and "shipped": the search as --config ships it (real_task.shipped_search: its floor, its
# finalists and its proxy, which since the two above ran scores the mean agreement of 5 runs)
SHIPPED = "shipped"
DIFFERENTIABLE = "differentiable"  # the shipped config with search.strategy: differentiable
GUMBEL_STUDY = "differentiable-gumbel"  # the same at the earlier estimator and weight steps
PRUNE = ["search.rescore_prune=0.01"]  # finalists behind the finished ones' lead stop early
MEASURED = "differentiable-measured"  # differentiable-prune, its finalists measured first
PAIRED = "shipped-paired"  # shipped-prune's trained candidates, finalists checked paired
DIFF_PAIRED = "differentiable-paired"  # differentiable-prune, its finalists checked paired


def _trained_on(units: dict, arch: str, seeds: list[int]) -> str:
    """Where each seed of ``arch`` was trained: ``cpu (s0), NVIDIA H200 (s1, s2)``, and by
    which benchmark where it was not this one."""
    by = {}
    for seed in seeds:
        u = units[f"{arch}/s{seed}"]
        where = u.get("device", "cpu") + (f", {Path(u['from']).name}" if "from" in u else "")
        by.setdefault(where, []).append(f"s{seed}")
    return "; ".join(f"{d} ({', '.join(s)})" for d, s in by.items())


def finished_elsewhere(folders: list[str], key: str) -> dict | None:
    """``key`` (``arch/sSEED``) as another benchmark finished it with the same recipe on the
    same teacher (best_in_space's searched students: search_vs_hand's kd2, FULL_DATA, the
    default teacher layers), marked ``from`` that benchmark's folder; None where none did."""
    arch, seed = key.rsplit("/s", 1)
    for folder in folders:
        if folder.endswith(".json"):  # committed records (best_in_space.json, ...)
            path = Path(folder)
            recs = json.loads(path.read_text()) if path.is_file() else []
            for r in recs:
                if r["arch"] == arch and r["seed"] == int(seed) and r["kind"] != "hand" \
                        and r.get("recipe", "kd2") == "kd2":
                    return {"test": r["test_score"], "dev": r.get("dev_score"),
                            "dev_agreement": r.get("dev_agreement"),
                            "teacher_test": r["teacher_test_score"],
                            "device": r.get("device", "cpu"), "from": folder}
            continue
        path = Path(folder) / "results.json"
        unit = json.loads(path.read_text()).get("units", {}).get(key) if path.is_file() else None
        if unit is not None:
            return {**unit, "from": folder}
    return None


def base_overrides(work: Path, budget: str) -> list[str]:
    """The overrides every study at ``budget`` shares: the full-data teacher and recipe, the
    run folder under ``work`` (absolute: it is part of a study's stored config), the budget."""
    from search_vs_hand import FULL_DATA, parse_budget

    speedup, batch = parse_budget(budget)
    return [*FULL_DATA, f"run_dir={work / 'runs' / budget}", f"budget.speedup={speedup}",
            f"budget.batch_size={batch}"]


def study_overrides(config: str) -> dict[str, list[str]]:
    """Each study's own overrides on top of ``base_overrides``."""
    from real_task import shipped_search
    from search_vs_hand import DIFF

    shipped = shipped_search(config)
    return {**STUDIES, SHIPPED: shipped,
            DIFFERENTIABLE: [*shipped, "search.strategy=differentiable"],
            f"{SHIPPED}-prune": [*shipped, *PRUNE],
            f"{DIFFERENTIABLE}-prune": [*shipped, "search.strategy=differentiable", *PRUNE],
            MEASURED: [*shipped, "search.strategy=differentiable", *PRUNE],
            PAIRED: [*shipped, *PRUNE],
            DIFF_PAIRED: [*shipped, "search.strategy=differentiable", *PRUNE],
            GUMBEL_STUDY: [*shipped, *DIFF]}


def seed_study(cfg, name: str, source: str) -> bool:
    """``name`` starts as a copy of the study ``source`` in the same run folder, less what its
    finalist stage recorded (which finalists were measured, and how, and their scores): the
    same trained candidates, under the same config, go through today's finalist stage. False
    (nothing done) where ``name`` exists or ``source`` does not."""
    import optuna

    from tacnas.nas.study import default_storage, run_folder

    if (run_folder(cfg.run_dir, name) / "study.db").is_file() or \
            not (run_folder(cfg.run_dir, source) / "study.db").is_file():
        return False
    optuna.copy_study(from_study_name=source, from_storage=default_storage(cfg.run_dir, source),
                      to_storage=default_storage(cfg.run_dir, name), to_study_name=name)
    study = optuna.load_study(study_name=name, storage=default_storage(cfg.run_dir, name))
    for key in ("finalist_ms", "finalist_share", "rescored", "rescore_setting"):
        study.set_user_attr(key, None)
    study.set_user_attr("seeded_from", source)
    return True


def main() -> int:
    from real_task import distill_seed, latency_pass, paired_pass, resumable
    from search_vs_hand import _sd, parse_budget

    from tacnas.evaluators.latency_table import cpu_name, teacher_arch
    from tacnas.nas.config import load_config
    from tacnas.nas.pipeline import prepare
    from tacnas.nas.report import table as text_table
    from tacnas.nas.study import create_or_load, default_storage

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--budget", default="8x@1")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="the first is the search's own (its finalist)")
    ap.add_argument("--work", default="runs/bench_finalist_search")
    ap.add_argument("--sweeps", type=int, default=5)
    ap.add_argument("--studies", nargs="+",
                    choices=[*STUDIES, SHIPPED, DIFFERENTIABLE, GUMBEL_STUDY, f"{SHIPPED}-prune",
                             f"{DIFFERENTIABLE}-prune", MEASURED, PAIRED, DIFF_PAIRED],
                    default=[*STUDIES, SHIPPED, DIFFERENTIABLE],
                    help="run these (the others' finished results are still reported)")
    ap.add_argument("--reuse", nargs="*", default=[
        "runs/bench_best_in_space", str(RESULTS / "best_in_space.json"),
        str(RESULTS / "finalist_search.json")],
                    help="benchmark folders whose finished (student, seed) units of a pick are "
                    "taken instead of training them again (the same recipe and teacher)")
    ap.add_argument("--searches-only", action="store_true",
                    help="stop after the searches (and their finalists): the picks' other seeds "
                    "can then train on a lent GPU (benchmarks/on_device.py pack)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work, results, save = resumable(args.work)
    speedup, _ = parse_budget(args.budget)
    mine = results.setdefault(args.budget, {})
    over = base_overrides(work, args.budget)
    run = prepare(load_config(args.config, over), progress=True)
    if run.cfg.seed != args.seeds[0]:
        raise SystemExit(f"--seeds: the first must be the config's seed {run.cfg.seed}")
    searches = mine.setdefault("searches", {})
    units = mine.setdefault("units", {})
    for name, extra in study_overrides(args.config).items():
        if name not in args.studies and name not in searches:
            continue
        s = searches.get(name)
        if s is None or "finalists" not in s:  # the search, or its finalists' scores, to do
            cfg = load_config(args.config, [*over, *extra])
            # the same teacher, data, proxy and meter; a study with another proxy (shipped) is
            # prepared from its own config (the teacher, its logits and the supernet are cached)
            srun = (dataclasses.replace(run, cfg=cfg) if cfg.proxy == run.cfg.proxy
                    else prepare(cfg, progress=True))
            if name == PAIRED and s is None:
                seed_study(cfg, name, f"{SHIPPED}-prune")
            study = create_or_load(name, default_storage(cfg.run_dir, name), cfg)
            if s is None:
                s = run_finalist_search(srun, study)
                if source := study.user_attrs.get("seeded_from"):
                    s["seeded_from"] = source
                searches[name] = s
                save()
            if "finalists" not in s:  # dev, agreement (what chose) and test of each, seed 0
                teacher = {"teacher_test": run.teacher_test()["accuracy"],
                           "teacher_dev": run.teacher_dev["accuracy"]}
                s["finalists"] = {a: {**u, **teacher} for a, u in
                                  score_finalists(srun, study, s["proxy_order"]).items()}
                save()
        done = s["finalists"]
        pick = ArchConfig.from_dict(s["arch"])
        units.setdefault(f"{pick.name}/s{args.seeds[0]}", done[pick.name])  # the search's own
    if args.searches_only:
        print("the searches are done; their picks' other seeds: benchmarks/on_device.py, or "
              "this again without --searches-only")
        return 0
    for s in searches.values():
        pick = ArchConfig.from_dict(s["arch"])
        for seed in args.seeds[1:]:
            key = f"{pick.name}/s{seed}"
            if key not in units:
                units[key] = (finished_elsewhere(args.reuse, key)
                              or distill_seed(run, pick, work / "distilled" / args.budget /
                                              key.replace("/", "_"), seed, label=key))
                save()
                print(f"{key}: test {units[key]['test']:.4f}", flush=True)

    picks = sorted({ArchConfig.from_dict(s["arch"]) for s in searches.values()},
                   key=lambda a: a.name)
    if set(mine.get("latency", {}).get("ms", {})) != {a.name for a in picks}:
        ms, teacher_ms = latency_pass(run, picks, args.sweeps)
        mine["latency"] = {"ms": ms, "teacher_ms": teacher_ms, "cpu": cpu_name()}
        save()
    lat = mine["latency"]
    if set(mine.get("paired", {}).get("speedups", {})) != {a.name for a in picks}:
        mine["paired"] = {"speedups": paired_pass(run, picks, args.sweeps), "cpu": cpu_name()}
        save()
    paired = mine["paired"]["speedups"]

    records, rows = [], []
    # the finalists' latency: the table's prediction against the table's teacher
    t_pred = run.latency.ms(teacher_arch(run.teacher.model.config))
    earlier = [r for r in json.loads((RESULTS / "search_vs_hand.json").read_text())
               if r["budget"] == args.budget and r.get("recipe", "kd2") == "kd2"]
    for name, s in searches.items():
        pick = ArchConfig.from_dict(s["arch"])
        ms = lat["ms"][pick.name]
        sp = lat["teacher_ms"] / ms
        test = [units[f"{pick.name}/s{seed}"]["test"] for seed in args.seeds]
        teacher_test = units[f"{pick.name}/s{args.seeds[0]}"]["teacher_test"]
        sps = paired[pick.name]
        sp_paired = statistics.median(sps)
        for seed in args.seeds:
            u = units[f"{pick.name}/s{seed}"]
            records.append({"task": "tweets", "budget": args.budget, "student": name,
                            "kind": "search", "fits": sp >= speedup, "arch": pick.name,
                            "latency_ms": ms, "speedup": sp, "seed": seed,
                            "paired_speedup": sp_paired, "paired_speedups": sps,
                            "fits_paired": sp_paired >= speedup,
                            "test_score": u["test"], "teacher_test_score": u["teacher_test"],
                            "dev_score": u["dev"], "dev_agreement": u["dev_agreement"],
                            "device": u.get("device", "cpu"),
                            **({"from": u["from"]} if "from" in u else {})})
        rows.append([name, pick.name, f"{ms:.2f}", f"{sp:.2f}x", "yes" if sp >= speedup else "NO",
                     f"{sp_paired:.2f}x ({min(sps):.2f}-{max(sps):.2f})",
                     "yes" if sp_paired >= speedup else "NO",
                     f"{ms / (lat['teacher_ms'] / speedup):.2f}",
                     f"{statistics.mean(test):.4f} ± {_sd(test):.4f}",
                     f"{100 * statistics.mean(test) / teacher_test:.1f}",
                     "this CPU", _trained_on(units, pick.name, args.seeds)])
        for arch_name, u in s["finalists"].items():
            a_ms, a_teacher, how = run.latency.ms(ArchConfig.from_name(arch_name)), t_pred, \
                "predicted"
            checked = s.get("finalist_latency", {}).get(arch_name)
            if checked and checked["source"].startswith("measured (finalist"):
                # as the search measured it, against its teacher (budget_ms x the speedup)
                a_ms, a_teacher, how = checked["ms"], s["budget_ms"] * speedup, "measured"
            records.append({"task": "tweets", "budget": args.budget, "student": arch_name,
                            "kind": "search-finalist", "search": name,
                            "fits": a_teacher / a_ms >= speedup, "arch": arch_name,
                            "latency_ms": a_ms, "speedup": a_teacher / a_ms, "latency": how,
                            "seed": args.seeds[0], "test_score": u["test"],
                            "teacher_test_score": u["teacher_test"], "dev_score": u["dev"],
                            "dev_agreement": u["dev_agreement"], "device": "cpu",
                            **({"pruned_at": u["pruned_at"]} if u.get("pruned_at") else {})})
    # this budget's studies finished in another sitting's --work (their records in the JSON)
    path = RESULTS / f"{BENCH}.json"
    before = json.loads(path.read_text()) if path.is_file() else []
    other = {}
    for r in before:
        if r["budget"] == args.budget and r["kind"] == "search" and r["student"] not in searches:
            other.setdefault(r["student"], []).append(r)
    for name, recs in other.items():
        test = [r["test_score"] for r in recs]
        r = recs[0]
        rows.append([f"{name} (earlier sitting)", r["arch"], f"{r['latency_ms']:.2f}",
                     f"{r['speedup']:.2f}x", "yes" if r["fits"] else "NO", "", "", "",
                     f"{statistics.mean(test):.4f} ± {_sd(test):.4f}",
                     f"{100 * statistics.mean(test) / r['teacher_test_score']:.1f}",
                     "its own pass", ", ".join(sorted({x.get("device", "cpu") for x in recs}))])
    by_student = {}
    for r in earlier:
        by_student.setdefault((r["student"], r["kind"], r["arch"], r["latency_ms"],
                               r["speedup"], r["fits"]), []).append(r["test_score"])
    for (student, kind, arch, ms, sp, fits), test in sorted(
            by_student.items(), key=lambda kv: -statistics.mean(kv[1])):
        rows.append([f"{student} ({kind}, search_vs_hand)", arch, f"{ms:.2f}", f"{sp:.2f}x",
                     "yes" if fits else "NO", "", "", "",
                     f"{statistics.mean(test):.4f} ± {_sd(test):.4f}"
                     if len(test) > 1 else f"{test[0]:.4f}", "", "search_vs_hand's pass",
                     "search_vs_hand"])
    print(f"{args.budget}: the shipped finalist search, latency in one pass on {lat['cpu']} "
          f"(teacher {lat['teacher_ms']:.2f} ms; search_vs_hand's rows: its own pass), then "
          f"paired with the teacher, {args.sweeps} times (median, min-max); test accuracy over "
          f"seeds {args.seeds}, search_vs_hand's kd2 recipe")
    print(text_table(["student", "architecture", "ms", "speedup", "fits", "paired speedup",
                      "fits paired", "use of budget",
                      "test mean ± std", "% of teacher", "latency from", "trained on"], rows))
    for name, s in searches.items():
        pick = ArchConfig.from_dict(s["arch"]).name
        how = (f"the differentiable search ({s.get('search_seconds', 0):.0f} s), then its "
               f"{len(s['proxy_order'])} most likely architectures"
               if name.startswith(DIFFERENTIABLE)
               else f"{s['trained']} trained candidates, then its {len(s['proxy_order'])} best "
               "by the proxy")
        if s.get("seeded_from"):
            src = searches.get(s["seeded_from"], {})
            how = (f"{s['seeded_from']}'s {s['trained']} trained candidates (searched within "
                   f"its {src.get('seconds', 0):.0f} s, not counted here), then its "
                   f"{len(s['proxy_order'])} best by the proxy")
        print(f"{name}: {s['seconds']:.0f} s on 2 cores ({how} trained in full, seed "
              f"{args.seeds[0]}; budget {s['budget_ms']:.2f} ms); chosen by dev agreement: {pick}")
        rank_by = "likely" if name.startswith(DIFFERENTIABLE) else "proxy"
        for arch_name, d in s.get("dropped", {}).items():
            print(f"  dropped before training: {arch_name} measured {d['measured_ms']:.2f} ms "
                  f"against {d['budget_ms']:.2f} ms (the table: {d['predicted_ms']:.2f} ms)")
        for rank, arch_name in enumerate(s["proxy_order"], 1):
            u = s["finalists"][arch_name]
            use = run.latency.ms(ArchConfig.from_name(arch_name)) / (t_pred / speedup)
            checked = s.get("finalist_latency", {}).get(arch_name)
            if checked and checked["source"].startswith("measured (finalist"):
                use = checked["ms"] / s["budget_ms"]  # as the search measured it
            print(f"  {rank_by} #{rank} {arch_name}  use {use:.2f}  dev {u['dev']:.4f}  agreement "
                  f"{u['dev_agreement']:.4f}  test {u['test']:.4f}"
                  + (f"  (pruned at step {u['pruned_at']})" if u.get("pruned_at") else "")
                  + ("  <- chosen" if arch_name == pick else ""))
    RESULTS.mkdir(exist_ok=True)
    # another budget's records, and this budget's of studies this --work does not hold (a
    # study run in another sitting's folder), are kept
    kept = [r for r in before if r["budget"] != args.budget or r.get("search", r["student"]) not in searches]
    path.write_text(json.dumps(kept + records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

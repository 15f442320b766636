"""How far above the hand-designed first layer can a student of one budget be, and does a search
with the most faithful proxy get there?

search_vs_hand.py found TPE's 4x@1 student +0.34 points above the teacher's first layer at full
width (target +1.0), and proxy_fidelity.py's 36 architectures near the budget held one at +0.82.
This benchmark asks the two questions that leaves, on the same full-data teacher and the same
final recipe (search_vs_hand's kd2):

1. **The top of the budget.** Every architecture of the space whose predicted latency is within
   ``[--low, 1]`` of the budget (``--low`` 0.85: 43 at 4x@1), finished with seed 0. The
   ``--top-k`` best by seed 0's *dev* score are finished with the other seeds too. Their test
   mean over the other seeds only is the unbiased estimate: seed 0 chose them, so its scores are
   the maximum of many noisy draws (the winner's curse) and are printed apart.
2. **TPE with the 800-step distillation proxy** (``tpe-d800``: proxy_fidelity's most faithful
   proxy, Kendall tau 0.661 against 0.573 for the default supernet proxy), 20 trained
   candidates like the default search; its pick finished with every seed.

The teacher's first layer at full width (the best hand-designed student at 4x@1) is finished
with every seed beside them, the reference. The shortlist is chosen among by two rules a search
could use, the dev accuracy and the dev agreement with the teacher's predictions (the proxy's
label-free objective), each the mean over the seeds; and by the test set, which no rule may use.
``--proxy-scores`` scores the band with the config's proxy (the search's default) under both
objectives and prints their Kendall tau against the finals; ``--finalists K`` then finishes
the proxy's K best once on this CPU and chooses among them by both rules (a multi-fidelity
search over the band). ``--finalist-search [NAME]`` runs the shipped multi-fidelity search
end to end (``tpe-finalists``: TPE, the default proxy, its 8 best trained in full and chosen
by dev agreement; ``tpe-finalists-use85``: the same with ``budget.min_use: 0.85``). One
latency pass measures the top-k, the searches' picks and the first layer against the teacher
(the others keep the table's prediction).

Resumable: the search is an Optuna study in ``--work``; each (student, seed) is written to
``--work``/results.json when done and skipped on rerun. The finals can run on a lent GPU
(``benchmarks/on_device.py pack`` packs this benchmark's missing units, the top-k's extra seeds
chosen there once seed 0 is in) or here (``--here``). Prints its tables and writes
``benchmarks/results/best_in_space.json``: records ``task``, ``budget``, ``student``, ``kind``
(search, hand or space), ``fits``, ``arch``, ``latency_ms``, ``speedup``, ``seed``,
``dev_score``, ``dev_agreement`` (the shortlist's), ``test_score``, ``teacher_test_score``,
``selected`` (one of the top-k), ``device``.

    python benchmarks/best_in_space.py                 # the search, then what is left to train
    python benchmarks/best_in_space.py --here          # the finals on this CPU (hours)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path

from unit_keys import ident_of  # benchmarks/ is the script's folder

from tacnas.searchspace.arch import ArchConfig

RESULTS = Path(__file__).resolve().parent / "results"
SEARCH = ["proxy.kind=distill", "proxy.steps=800"]  # tpe-d800: the config's TPE, this proxy
# tpe-finalists: the config's TPE and default proxy, then its 8 best trained in full by the
# distill recipe (search_vs_hand's kd2, seed 0, this CPU) and chosen by dev agreement: the
# multi-fidelity search as shipped (search.rescore_*), end to end
FINALIST_SEARCH = ["search.rescore_top_k=8", "search.rescore_recipe=distill",
                   "search.rescore_objective=agreement"]
# the finalist searches (--finalist-search NAME): student name -> (results key, overrides);
# tpe-finalists-use85 is the same with budget.min_use 0.85: candidates predicted under 0.85 of
# the budget rejected untrained, so TPE's 20 trained candidates and the 8 finalists all come
# from the top of the budget, where the band's best students are
FINALIST_SEARCHES = {
    "tpe-finalists": ("finalist_search", FINALIST_SEARCH),
    "tpe-finalists-use85": ("finalist_search_use85", [*FINALIST_SEARCH, "budget.min_use=0.85"]),
}
BENCH = "best_in_space"


def top_of_budget(run, speedup: float, low: float) -> tuple[list[ArchConfig], float]:
    """The space's architectures predicted within ``[low, 1]`` of the budget, fastest first."""
    from tacnas.evaluators.latency_table import teacher_arch

    target = run.latency.ms(teacher_arch(run.teacher.model.config)) / speedup
    archs = [a for a in run.space.all_archs() if low * target <= run.latency.ms(a) <= target]
    return sorted(archs, key=lambda a: (run.latency.ms(a), a.name)), target


def selected(results: dict, top_k: int) -> list[str] | None:
    """The band's ``top_k`` architectures by the first seed's dev score (ties by name), once
    every one of them has it; None before."""
    dev = {}
    for name in results.get("band", []):
        unit = results.get("units", {}).get(f"{name}/s{results['seeds'][0]}")
        if unit is None:
            return None
        dev[name] = unit["dev"]
    return sorted(dev, key=lambda n: (-dev[n], n))[:top_k]


def students(results: dict, hand: dict) -> dict:
    """``name -> {arch, layers, kind}``: the band, the first layer and the search's pick."""
    out = {name: {"arch": ArchConfig.from_name(name).to_dict(), "layers": None, "kind": "space"}
           for name in results.get("band", [])}
    out["first-layer"] = {**hand, "kind": "hand"}
    if "search" in results:
        out["tpe-d800"] = {"arch": results["search"]["arch"], "layers": None, "kind": "search"}
    for name, (key, _) in FINALIST_SEARCHES.items():
        if key in results:
            out[name] = {"arch": results[key]["arch"], "layers": None, "kind": "search"}
    return out


def missing_units(results: dict) -> list[dict]:
    """The (student, seed) finals still to do, as ``{key, arch, layers, seed}``: the first seed
    of the band; every seed of the first layer, the search's pick and (once the band's first
    seed is all in) the top-k, each with its dev agreement with the teacher. The same (arch,
    layers) is one unit whoever asks for it."""
    if "hand" not in results:
        return []
    seeds = results["seeds"]
    sts = students(results, results["hand"])
    top = selected(results, results["top_k"]) or []
    units = results.get("units", {})
    out, seen = [], set()
    for seed in seeds:
        for name, st in sts.items():
            shortlisted = st["kind"] != "space" or name in top
            if seed != seeds[0] and not shortlisted:
                continue
            arch, ident = ident_of(st)
            key = f"{ident}/s{seed}"
            have = units.get(key)
            # the shortlist is also ranked by dev agreement with the teacher: its units trained
            # before that was recorded are trained again (the same seed: the same model)
            if key in seen or (have and (not shortlisted or have.get("dev_agreement") is not None)):
                continue
            seen.add(key)
            out.append({"key": key, "arch": arch.to_dict(), "layers": st["layers"], "seed": seed})
    return out


def proxy_objectives(run, results: dict, save, units: dict, top: list[str],
                     distill_run=None) -> None:
    """The config's proxy (the search's default) scores every band architecture once; Kendall
    tau of its two objectives, dev accuracy and dev agreement with the teacher, against the
    finals: is agreement the better ranking before the final recipe too?"""
    from scipy.stats import kendalltau

    scores = results.setdefault("proxy_scores", {})
    run.proxy.prepare(progress=True)
    for name in results["band"]:
        if name not in scores:
            t0 = time.perf_counter()
            result, _ = run.proxy.evaluate(ArchConfig.from_name(name), progress=False)
            scores[name] = {"accuracy": result.metrics["accuracy"],
                            "agreement": result.metrics["agreement"],
                            "seconds": time.perf_counter() - t0}
            save()
    band = results["band"]
    first = results["seeds"][0]
    final = {n: units[f"{n}/s{first}"] for n in band}
    mean_test = {n: statistics.mean(units[f"{n}/s{s}"]["test"] for s in results["seeds"])
                 for n in top}
    each = statistics.mean(v["seconds"] for v in scores.values())
    print(f"the config's proxy ({run.cfg.proxy.kind}, {run.cfg.proxy.steps} steps) on the "
          f"{len(band)} band architectures, {each:.1f} s each; Kendall tau against the finals:")
    for obj in ("accuracy", "agreement"):
        x = [scores[n][obj] for n in band]
        t_test = kendalltau(x, [final[n]["test"] for n in band]).statistic
        t_dev = kendalltau(x, [final[n]["dev"] for n in band]).statistic
        t_top = kendalltau([scores[n][obj] for n in top], [mean_test[n] for n in top]).statistic
        print(f"  proxy {obj:9s}: vs seed {first}'s final test {t_test:.3f}, its final dev "
              f"{t_dev:.3f} ({len(band)}); vs the top {len(top)}'s 3-seed test mean {t_top:.3f}")
    # where the proxy errs: students with a factorized embedding (E < H) start the proxy from
    # the supernet's trained E x H projection, the final recipe from the teacher's truncated
    # one; the distillation proxy (200 steps) starts where the final recipe starts
    others = results.setdefault("proxy_scores_by", {})
    if distill_run is not None:
        d200 = others.setdefault("distill-200", {})
        for name in results["band"]:
            if name not in d200:
                t0 = time.perf_counter()
                result, _ = distill_run.proxy.evaluate(ArchConfig.from_name(name),
                                                       progress=False)
                d200[name] = {"accuracy": result.metrics["accuracy"],
                              "agreement": result.metrics["agreement"],
                              "seconds": time.perf_counter() - t0}
                save()
    whole = {n: (a := ArchConfig.from_name(n)).embedding_size == a.hidden_size for n in band}
    for proxy_name, these in (("supernet-20", scores), *others.items()):
        if len(these) < len(band):
            continue
        for label, keep in (("all", None), ("E = H", True), ("E < H", False)):
            part = [n for n in band if keep is None or whole[n] == keep]
            fit = kendalltau([these[n]["accuracy"] for n in part],
                             [final[n]["test"] for n in part])
            print(f"  {proxy_name} {label} ({len(part)}): proxy accuracy vs seed {first}'s "
                  f"final test: tau {fit.statistic:.3f} (p {fit.pvalue:.1g}); proxy mean "
                  f"{statistics.mean(these[n]['accuracy'] for n in part):.4f}, final test "
                  f"mean {statistics.mean(final[n]['test'] for n in part):.4f}"
                  + (f"; {statistics.mean(v['seconds'] for v in these.values()):.1f} s each"
                     if keep is None else ""))


def finalists(run, results: dict, save, units: dict, k: int, work: Path, distill_seed) -> dict:
    """A multi-fidelity search over the band: the config's proxy's ``k`` best by dev accuracy
    (``--proxy-scores``), each finished once here (the first seed, this CPU: one device for all
    of them), then chosen among by dev accuracy and by dev agreement with the teacher; returns
    their results."""
    scores = results.get("proxy_scores", {})
    if len(scores) < len(results["band"]):
        raise SystemExit("--finalists: run --proxy-scores first")
    seed = results["seeds"][0]
    picked = sorted(results["band"], key=lambda n: (-scores[n]["accuracy"], n))[:k]
    done = results.setdefault("finalists", {})
    for name in picked:
        if name not in done:
            done[name] = distill_seed(run, ArchConfig.from_name(name),
                                      work / "finalists" / f"{name}_s{seed}", seed,
                                      label=f"finalist {name}")
            save()
            print(f"finalist {name}: dev {done[name]['dev']:.4f} agreement "
                  f"{done[name]['dev_agreement']:.4f} test {done[name]['test']:.4f}", flush=True)
    print(f"finalists: the config's proxy's top {k} of the band by dev accuracy, each finished "
          f"once (seed {seed}, on the cpu):")
    for name in picked:
        d = done[name]
        three = [units.get(f"{name}/s{s}", {}).get("test") for s in results["seeds"]]
        print(f"  {name}  dev {d['dev']:.4f}  agreement {d['dev_agreement']:.4f}  test "
              f"{d['test']:.4f}  ({d['seconds']:.0f} s)" + (
                  f"  H100 3-seed test mean {statistics.mean(three):.4f}"
                  if None not in three else ""))
    for obj in ("dev", "dev_agreement"):
        best = max(picked, key=lambda n: done[n][obj])
        print(f"  chosen by {obj}: {best}")
    return {n: done[n] for n in picked}


def run_finalist_search(run, study) -> dict:
    """A finalist search (``search.rescore_recipe: distill``) in ``study``: its pick, wall time
    (this process's: a resumed search, its part), trained candidates, the finalists' scores and
    their order by the proxy."""
    from tacnas.nas.record import TrialRecord
    from tacnas.nas.strategy import search
    from tacnas.nas.study import best_trial, finalist_ms, finalist_source

    t0 = time.perf_counter()
    summary = search(run, study, n_trials=run.cfg.search.n_trials, timeout=None)
    best = best_trial(study)
    r = TrialRecord.read(best)
    names = {n: TrialRecord.read(study.trials[n]).arch_name for n in summary["rescored"]}
    measured = finalist_ms(study)
    # each finalist's latency as the search last checked it (measured before training, or the
    # latency table's prediction in a study that ran before finalists were measured)
    checked = {names[n]: {"ms": measured.get(n, (rec := TrialRecord.read(study.trials[n])).latency_ms),
                          "source": finalist_source(study, n) if n in measured
                          else rec.latency_source}
               for n in summary["rescored"]}
    return {"arch": r.arch.to_dict(), "proxy": r.score, "trial": best.number,
            "finalist_latency": checked,
            "dropped": _dropped(run, study, summary, measured),
            "seconds": time.perf_counter() - t0, "trained": summary["trained"],
            "search_seconds": summary.get("seconds"), "budget_ms": study.user_attrs["budget_ms"],
            "rescored": {names[n]: v for n, v in summary["rescored"].items()},
            # the differentiable search's finalists: most likely first
            "proxy_order": study.user_attrs.get("differentiable_finalists") or [
                names[n] for n in sorted(summary["rescored"],
                                         key=lambda n: (-study.trials[n].value, n))]}


def _dropped(run, study, summary: dict, measured: dict[int, float]) -> dict[str, dict]:
    """The candidates a finalist search measured over the budget before training them (not
    trained; the next took their place): arch -> its measurement and the table's figure. The
    differentiable search records none as a trial: those more likely than its last finalist
    that the latency table let in and that are not finalists (their measurements are cached in
    this process's meter)."""
    from tacnas.nas.budget import Budget
    from tacnas.nas.differentiable import checkpointed, log_prob
    from tacnas.nas.record import TrialRecord

    budget = Budget.resolve(run, study)
    names = study.user_attrs.get("differentiable_finalists")
    if names is None:
        return {(r := TrialRecord.read(study.trials[n])).arch_name:
                {"measured_ms": ms, "predicted_ms": r.latency_ms, "budget_ms": budget.budget_ms}
                for n, ms in measured.items() if n not in summary["rescored"]}
    net, alpha = checkpointed(run, study)
    logp = log_prob(net, alpha)
    last = min(logp(ArchConfig.from_name(n)) for n in names)
    return {a.name: {"measured_ms": budget.confirm(a).latency_ms,  # cached: likely measured it
                     "predicted_ms": run.latency.ms(a), "budget_ms": budget.budget_ms}
            for a in run.space.all_archs()
            if a.name not in names and logp(a) > last and budget.check(a).fits}


def score_finalists(run, study, names: list[str]) -> dict:
    """The finalists a finalist search trained (its ``finalist_dir``), read where they are:
    each one's dev accuracy, dev agreement with the teacher (what chose) and test accuracy, as
    its best checkpoint stands (and ``pruned_at``: the step ``search.rescore_prune`` stopped it
    at, where it did; such a finalist was not chosen)."""
    from transformers import AutoModelForSequenceClassification

    from tacnas.evaluators.checkpoint import read_state
    from tacnas.evaluators.metrics import compute_metrics
    from tacnas.evaluators.training import predict_logits
    from tacnas.nas.optuna_search import finalist_dir

    out = {}
    for name in names:
        model = AutoModelForSequenceClassification.from_pretrained(
            finalist_dir(run, study, name) / "best").eval()
        dev = run.proxy.final_scores(model)[0]
        test = compute_metrics(predict_logits(model, run.data.test), run.data.test.labels)
        out[name] = {"dev": dev["accuracy"], "dev_agreement": dev["agreement"],
                     "test": test["accuracy"]}
        state = read_state(finalist_dir(run, study, name) / "checkpoint") or {}
        if state.get("pruned_at"):
            out[name]["pruned_at"] = state["pruned_at"]
    return out


def finalist_search_report(run, study_name: str, storage: str, results: dict, save,
                           units: dict) -> None:
    """``--finalist-search``: each finalist's dev accuracy, dev agreement (what chose) and
    test accuracy (seed 0, as the search trained it on this CPU), proxy order first."""
    from tacnas.evaluators.latency_table import teacher_arch
    from tacnas.nas.study import create_or_load

    fs = results[FINALIST_SEARCHES[study_name][0]]
    if "scores" not in fs:
        fs["scores"] = score_finalists(run, create_or_load(study_name, storage, run.cfg),
                                       fs["proxy_order"])
        save()
    pick = ArchConfig.from_dict(fs["arch"]).name
    # use of the budget: the table's prediction against the table's teacher over the speedup
    budget = run.latency.ms(teacher_arch(run.teacher.model.config)) / run.cfg.budget.speedup
    print(f"{study_name} search: {fs['seconds']:.0f} s on 2 cores (the TPE search, then its "
          f"{len(fs['proxy_order'])} best by the proxy trained in full, seed 0), "
          f"{fs['trained']} trained candidates; chosen by dev agreement: {pick}")
    for rank, name in enumerate(fs["proxy_order"], 1):
        d = fs["scores"][name]
        three = [units.get(f"{name}/s{s}", {}).get("test") for s in results["seeds"]]
        use = run.latency.ms(ArchConfig.from_name(name)) / budget
        print(f"  proxy #{rank} {name}  use {use:.2f}  dev {d['dev']:.4f}  agreement "
              f"{d['dev_agreement']:.4f}"
              f"  test {d['test']:.4f}" + (f"  3-seed test mean {statistics.mean(three):.4f}"
                                           if None not in three else "")
              + ("  <- chosen" if name == pick else ""))


def main() -> int:
    # here, not above: on_device.py imports this module's unit rules on a GPU machine that has
    # PyTorch and little else
    from real_task import distill_seed, latency_pass, resumable
    from search_vs_hand import FULL_DATA, _sd, hand_students, parse_budget

    from tacnas.evaluators.latency_table import cpu_name, teacher_arch
    from tacnas.nas.config import load_config
    from tacnas.nas.optuna_search import reuse_finalist
    from tacnas.nas.pipeline import prepare
    from tacnas.nas.record import TrialRecord
    from tacnas.nas.report import table as text_table
    from tacnas.nas.strategy import search
    from tacnas.nas.study import best_trial, create_or_load, default_storage

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--budget", default="4x@1")
    ap.add_argument("--low", type=float, default=0.85,
                    help="the band's lower end, a fraction of the budget's latency")
    ap.add_argument("--top-k", type=int, default=8, help="(the first run's is kept)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="the first selects the top-k (the first run's are kept)")
    ap.add_argument("--work", default="runs/bench_best_in_space")
    ap.add_argument("--sweeps", type=int, default=5)
    ap.add_argument("--no-search", action="store_true", help="skip the tpe-d800 search for now")
    ap.add_argument("--finalist-search", action="append", nargs="?", const="tpe-finalists",
                    choices=list(FINALIST_SEARCHES), default=[], metavar="NAME",
                    help="run the shipped multi-fidelity search (tpe-finalists, or "
                         "tpe-finalists-use85 with budget.min_use 0.85; about an hour on CPU)")
    ap.add_argument("--here", action="store_true", help="train the missing finals on this CPU")
    ap.add_argument("--proxy-scores", action="store_true",
                    help="score the band with the config's proxy, both objectives (CPU)")
    ap.add_argument("--finalists", type=int, default=0, metavar="K",
                    help="finish the proxy's K best once here and choose among them (CPU)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work, results, save = resumable(args.work)
    speedup, batch = parse_budget(args.budget)
    over = [*FULL_DATA, f"run_dir={work / 'runs'}", f"budget.speedup={speedup}",
            f"budget.batch_size={batch}"]
    secs = results.setdefault("seconds", {})
    if results.setdefault("budget", args.budget) != args.budget:
        raise SystemExit(f"{work / 'results.json'} is for {results['budget']}: use another --work")
    t0 = time.perf_counter()
    run = prepare(load_config(args.config, over), progress=True)
    secs.setdefault("prepare", time.perf_counter() - t0)
    if "band" not in results:
        band, target = top_of_budget(run, speedup, args.low)
        results.update(band=[a.name for a in band], target_ms=target, low=args.low)
        arch, layers, fits = hand_students(run, speedup)["first-layer"]
        results["hand"] = {"arch": arch.to_dict(), "layers": layers, "table_fits": fits}
        save()
    results.setdefault("top_k", args.top_k)
    results.setdefault("seeds", args.seeds)
    save()
    print(f"{len(results['band'])} architectures predicted within {results['low']:.2f}-1 of "
          f"the {args.budget} budget ({results['target_ms']:.2f} ms, {cpu_name()})")

    if "search" not in results and not args.no_search:
        cfg = load_config(args.config, [*over, *SEARCH])
        storage = default_storage(cfg.run_dir, "tpe-d800")
        study = create_or_load("tpe-d800", storage, cfg)
        srun = prepare(cfg, progress=True)
        t0 = time.perf_counter()
        summary = search(srun, study, n_trials=cfg.search.n_trials, timeout=None)
        best = best_trial(study)
        r = TrialRecord.read(best)
        results["search"] = {"arch": r.arch.to_dict(), "proxy": r.score, "trial": best.number,
                             "seconds": time.perf_counter() - t0, "trained": summary["trained"]}
        save()

    fin = {}  # finalist search name -> (its run, its storage)
    for name, (key, extra) in FINALIST_SEARCHES.items():
        fin_cfg = load_config(args.config, [*over, *extra])
        fin_run = dataclasses.replace(run, cfg=fin_cfg)  # the same proxy, the search's rescore_*
        fin_storage = default_storage(fin_cfg.run_dir, name)
        fin[name] = fin_run, fin_storage
        if name in args.finalist_search and key not in results:
            results[key] = run_finalist_search(fin_run, create_or_load(name, fin_storage, fin_cfg))
            save()
    units = results.setdefault("units", {})
    for name, (key, _) in FINALIST_SEARCHES.items():
        if key not in results:
            continue
        fin_run, fin_storage = fin[name]  # its pick's first seed is the finalist it trained
        st = students(results, results["hand"])[name]
        ukey = f"{ident_of(st)[1]}/s{fin_run.cfg.seed}"
        if ukey not in units and fin_run.cfg.seed in results["seeds"]:
            study = create_or_load(name, fin_storage, fin_run.cfg)
            out = work / "distilled" / ukey.replace("/", "_")
            if reuse_finalist(fin_run, study, ident_of(st)[0], out):
                units[ukey] = distill_seed(run, ident_of(st)[0], out, fin_run.cfg.seed,
                                           label=ukey)
                save()
    while True:  # the top-k's seeds become known once the band's seed 0 is in
        todo = missing_units(results)
        if not todo or not args.here:
            break
        for u in todo:
            units[u["key"]] = distill_seed(run, ArchConfig.from_dict(u["arch"]),
                                           work / "distilled" / u["key"].replace("/", "_"),
                                           u["seed"], label=u["key"], layers=u["layers"])
            save()
            print(f"{u['key']}: dev {units[u['key']]['dev']:.4f} test "
                  f"{units[u['key']]['test']:.4f}", flush=True)
    if todo:
        print(f"{len(todo)} (student, seed) finals still to do ({todo[0]['key']}, ...): "
              "--here trains them on this CPU, benchmarks/on_device.py on a GPU")
        return 0
    if "search" not in results:
        print("the tpe-d800 search has not run (--no-search): its row is left out")

    top = selected(results, results["top_k"])
    args.seeds, args.top_k = results["seeds"], results["top_k"]
    sts = students(results, results["hand"])
    measured = [n for n in sts if n in top or sts[n]["kind"] != "space"]
    if set(results.get("latency", {}).get("ms", {})) != {
            ident_of(sts[n])[0].name for n in measured}:
        ms, teacher_ms = latency_pass(run, sorted({ident_of(sts[n])[0] for n in measured},
                                                  key=lambda a: a.name), args.sweeps)
        results["latency"] = {"ms": ms, "teacher_ms": teacher_ms, "cpu": cpu_name()}
        save()
    lat = results["latency"]
    teacher_ms = run.latency.ms(teacher_arch(run.teacher.model.config))

    def score(name: str, field: str, seeds: list[int]) -> list[float]:
        return [units[f"{ident_of(sts[name])[1]}/s{s}"][field] for s in seeds]

    rows, records, fits = [], [], {}
    for name, st in sts.items():
        arch, _ = ident_of(st)
        sel = name in top
        these = args.seeds if (sel or st["kind"] != "space") else args.seeds[:1]
        if arch.name in lat["ms"]:
            ms, sp = lat["ms"][arch.name], lat["teacher_ms"] / lat["ms"][arch.name]
        else:  # the table's prediction, against the table's teacher
            ms, sp = run.latency.ms(arch), teacher_ms / run.latency.ms(arch)
        for s in these:
            u = units[f"{ident_of(st)[1]}/s{s}"]
            records.append({"task": "tweets", "budget": args.budget, "student": name,
                            "kind": st["kind"], "fits": sp >= speedup, "arch": arch.name,
                            "latency_ms": ms, "speedup": sp,
                            "latency": "measured" if arch.name in lat["ms"] else "predicted",
                            "seed": s, "dev_score": u["dev"], "test_score": u["test"],
                            "dev_agreement": u.get("dev_agreement"),
                            "teacher_test_score": u["teacher_test"], "selected": sel,
                            "device": u.get("device", "cpu")})
        test, dev = score(name, "test", these), score(name, "dev", these)
        agree = score(name, "dev_agreement", these) if len(these) > 1 else []
        rest = score(name, "test", these[1:]) if len(these) > 1 else []
        fits[name] = sp >= speedup
        rows.append([name if st["kind"] != "space" else "", st["kind"], arch.name, f"{ms:.2f}",
                     f"{sp:.2f}x", "yes" if sp >= speedup else "NO", f"{dev[0]:.4f}",
                     f"{test[0]:.4f}", f"{statistics.mean(dev):.4f}" if rest else "",
                     f"{statistics.mean(agree):.4f}" if agree else "",
                     f"{statistics.mean(test):.4f} ± {_sd(test):.4f}" if rest else "",
                     f"{statistics.mean(rest):.4f}" if rest else "",
                     "top" if sel else ""])
    rows.sort(key=lambda r: (r[-1] != "top" and r[1] == "space", -float(r[6])))
    devices = sorted({u.get("device", "cpu") for u in units.values()})
    print(f"latency: {lat['cpu']}, 2 threads, seq_len 64 (measured in one pass for the top "
          f"{args.top_k}, the search's pick and the first layer; the table's prediction for the "
          f"others); finals: search_vs_hand's kd2 recipe, trained on {', '.join(devices)}")
    print(text_table(["student", "kind", "architecture", "ms", "speedup", "fits", "dev s0",
                      "test s0", "dev mean", "dev agreement",
                      f"test mean ± std (seeds {args.seeds})",
                      f"test mean (seeds {args.seeds[1:]})", ""], rows))
    hand = score("first-layer", "test", args.seeds)
    h, hs = statistics.mean(hand), _sd(hand)
    hrest = statistics.mean(score("first-layer", "test", args.seeds[1:]))

    def versus(name: str) -> str:
        t = score(name, "test", args.seeds)
        pooled = ((_sd(t) ** 2 + hs ** 2) / 2) ** 0.5
        rest = statistics.mean(score(name, "test", args.seeds[1:]))
        return (f"{ident_of(sts[name])[0].name} {statistics.mean(t):.4f}: "
                f"{100 * (statistics.mean(t) - h):+.2f} points over the first layer ({h:.4f}; "
                f"twice the pooled seed std {200 * pooled:.2f}), {100 * (rest - hrest):+.2f} on "
                f"seeds {args.seeds[1:]} alone" + ("" if fits[name] else " [does NOT fit]"))

    searched = [n for n in ("tpe-d800", *FINALIST_SEARCHES) if n in sts]
    for name in [*top, *searched]:
        print(f"{name if name in searched else 'top'}: {versus(name)}")
    fit_top = [n for n in top if fits[n]]
    by_dev = max(fit_top, key=lambda n: statistics.mean(score(n, "dev", args.seeds)))
    by_test = max(fit_top, key=lambda n: statistics.mean(score(n, "test", args.seeds)))
    print(f"chosen by dev (the mean over {args.seeds} of the top {args.top_k} that fit, the "
          f"rule a search can use): {versus(by_dev)}")
    by_agree = max(fit_top, key=lambda n: statistics.mean(score(n, "dev_agreement",
                                                                args.seeds)))
    print(f"chosen by dev agreement with the teacher (the mean over {args.seeds}; the proxy's "
          f"label-free objective): {versus(by_agree)}")
    print(f"best by test (chosen by the test set itself: no rule can use it): {versus(by_test)}")
    if args.proxy_scores:
        # the 200-step distillation proxy too (teacher-initialised, as the final recipe starts)
        distill_run = prepare(load_config(args.config, [*over, "proxy.kind=distill",
                                                        "proxy.steps=200"]), progress=True)
        proxy_objectives(run, results, save, units, top, distill_run)
    if args.finalists:
        for name, u in finalists(run, results, save, units, args.finalists, work,
                                 distill_seed).items():
            ms = run.latency.ms(ArchConfig.from_name(name))
            records.append({"task": "tweets", "budget": args.budget, "student": name,
                            "kind": "finalist", "fits": teacher_ms / ms >= speedup,
                            "arch": name, "latency_ms": ms, "speedup": teacher_ms / ms,
                            "latency": "predicted", "seed": results["seeds"][0],
                            "dev_score": u["dev"], "test_score": u["test"],
                            "dev_agreement": u["dev_agreement"],
                            "teacher_test_score": u["teacher_test"], "selected": False,
                            "device": "cpu"})
    for name, (key, _) in FINALIST_SEARCHES.items():
        if key not in results:
            continue
        fin_run, fin_storage = fin[name]
        finalist_search_report(fin_run, name, fin_storage, results, save, units)
        for arch_name, u in results[key]["scores"].items():
            ms = run.latency.ms(ArchConfig.from_name(arch_name))
            records.append({"task": "tweets", "budget": args.budget, "student": arch_name,
                            "kind": "search-finalist", "search": name,
                            "fits": teacher_ms / ms >= speedup,
                            "arch": arch_name, "latency_ms": ms, "speedup": teacher_ms / ms,
                            "latency": "predicted", "seed": fin_run.cfg.seed,
                            "dev_score": u["dev"], "test_score": u["test"],
                            "dev_agreement": u["dev_agreement"],
                            "teacher_test_score": score("first-layer", "teacher_test",
                                                        args.seeds[:1])[0],
                            "selected": False, "device": "cpu"})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{BENCH}.json").write_text(json.dumps(records, indent=1) + "\n")
    if "search" in results:
        s = results["search"]
        print(f"tpe-d800 search: {s['seconds']:.0f} s on 2 cores ({cpu_name()}), "
              f"{s['trained']} trained candidates, pick {ArchConfig.from_dict(s['arch']).name} "
              f"(proxy dev {s['proxy']:.4f})")
    by_device = {}
    for u in units.values():
        n, t = by_device.get(u.get("device", "cpu"), (0, 0.0))
        by_device[u.get("device", "cpu")] = (n + 1, t + u["seconds"])
    print("finals: " + "; ".join(f"{n} on {d}, {t:.0f} s summed"
                                 for d, (n, t) in by_device.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

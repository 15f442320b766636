"""Proxy fidelity where it matters: at one latency, which proxy ranks students as the final
recipe does?

The tweets task on the full-data teacher (as benchmarks/search_vs_hand.py). ``--n`` (36)
architectures of the demo space whose predicted latency (the table, batch 1, seq_len 64, this
machine) is within ±15% of the 4x budget, drawn seeded and spread over the layer counts (a larger
``--n`` keeps the architectures a smaller one drew, and adds to them). Each is finished by
search_vs_hand's final recipe with every seed of ``--seeds`` (0 1 2), and scored by every proxy:

- ``distill-200``: teacher-initialised, 200 KD steps (the distillation proxy's setting so far),
- ``distill-800``: the same, 800 steps,
- ``supernet-20``: the supernet proxy (800-step supernet, cached; 20 KD steps), the demo default,
- ``supernet3000-20``: the same from a supernet trained 3000 steps (its own cache),
- ``params``: non-embedding parameters (zero-cost; no training),
- ``multi-fidelity``: distill-200 for all, distill-800 for its top ``--top-k`` (4), which are
  ranked above the rest by their longer score,
- ``supernet-20+distill-800``: the same rule on the supernet proxy (``search.rescore_top_k``).

Kendall tau of each against the final test accuracy (the mean over the seeds), with a bootstrap
95% interval over the architectures; and, as a reference for how well anything can rank final
scores this noisy, ``final, another seed``: the final recipe itself at one seed against the mean
of the other seeds (averaged over the seeds). Resumable: each (architecture, proxy) and each
(architecture, seed) final distillation is written to ``--work``/results.json when done. Writes
``benchmarks/results/proxy_fidelity.json``: records ``proxy``, ``tau``, ``tau_ci95``, ``n``,
``latency_band_ms``, ``final_seeds`` and ``default: true`` on the proxy the demo config searched
with when it ran (one run scored by dev accuracy; the default since, the mean agreement of 5
runs, is measured on the same 36 by proxy_objectives.py and marked default in its JSON); and
``benchmarks/results/proxy_fidelity.archs.json``, one record per architecture (``arch``,
``latency_ms``, ``final_seeds``, ``final_test``, ``final_test_mean``, ``final_test_std``,
``scores``).

    python benchmarks/proxy_fidelity.py
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import statistics
import time
from pathlib import Path

import numpy as np
from real_task import distill_seed, resumable  # benchmarks/ is the script's folder
from scipy.stats import bootstrap, kendalltau
from search_vs_hand import FULL_DATA

from tacnas.evaluators.latency_table import cpu_name, teacher_arch
from tacnas.nas.config import load_config
from tacnas.nas.pipeline import prepare
from tacnas.nas.report import table as text_table
from tacnas.searchspace.arch import ArchConfig

RESULTS = Path(__file__).resolve().parent / "results"
ARCHS = "proxy_fidelity.archs.json"  # each architecture's finals and proxy scores
DEFAULT = "supernet-20"  # what configs/demo.yaml searched with when this ran (now: x3, agreement)
# supernet proxies besides the config's: name -> overrides of its proxy section
SUPERNETS = {"supernet3000-20": ["proxy.supernet_steps=3000"]}


def band(run, speedup: float, n: int, seed: int, width: float = 0.15):
    """``n`` archs predicted within ``width`` of the budget, spread over the layer counts."""
    target = run.latency.ms(teacher_arch(run.teacher.model.config)) / speedup
    near = [a for a in run.space.all_archs() if abs(run.latency.ms(a) / target - 1) <= width]
    rng = random.Random(seed)
    by_layers = {}
    for a in sorted(near, key=lambda a: a.name):
        by_layers.setdefault(a.num_layers, []).append(a)
    for group in by_layers.values():
        rng.shuffle(group)
    picked = []
    while len(picked) < n and any(by_layers.values()):
        for k in sorted(by_layers):
            if by_layers[k] and len(picked) < n:
                picked.append(by_layers[k].pop())
    return picked, target, len(near)


def finals_by_seed(results: dict) -> dict:
    """``results["final"]`` keyed ``ARCH/sSEED``; the first runs kept one seed, keyed ``ARCH``:
    those are seed 0."""
    finals = results.setdefault("final", {})
    for key in [k for k in finals if "/s" not in k]:
        finals[f"{key}/s0"] = finals.pop(key)
    return finals


def _tau(x, y) -> tuple[float, float, float]:
    """Kendall tau of ``x`` against ``y`` and its bootstrap 95% interval over the pairs."""
    tau = kendalltau(x, y).statistic
    ci = bootstrap((np.asarray(x, float), np.asarray(y, float)),
                   lambda a, b: kendalltau(a, b).statistic, paired=True, vectorized=False,
                   n_resamples=2000, method="percentile",
                   rng=np.random.default_rng(0)).confidence_interval
    return float(tau), float(ci.low), float(ci.high)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--speedup", type=float, default=4.0)
    ap.add_argument("--n", type=int, default=36)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="seeds of the final recipe (a proxy is ranked against their mean)")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="which architectures are drawn")
    ap.add_argument("--work", default="runs/bench_proxy_fidelity")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--here", nargs="*", default=None, metavar="PROXY",
                    help="compute only these proxies here and no final distillation (the rest "
                         "comes from benchmarks/on_device.py on a GPU); default: everything")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work, results, save = resumable(args.work)
    over = [*FULL_DATA, *args.set, f"run_dir={work / 'runs'}"]
    t0 = time.perf_counter()
    run = prepare(load_config(args.config, over), progress=True)  # the supernet proxy
    results.setdefault("seconds", {}).setdefault("prepare", time.perf_counter() - t0)
    dist = prepare(load_config(args.config, [*over, "proxy.kind=distill", "proxy.steps=200"]),
                   progress=False)
    if len(results.get("archs", [])) < args.n:
        archs, target, pool = band(run, args.speedup, args.n, args.seed)
        had = results.get("archs", [])
        if [a.to_dict() for a in archs[:len(had)]] != had:
            raise SystemExit(f"{work / 'results.json'} holds architectures this draw does not "
                             "(another --seed, --speedup or latency table): use another --work")
        results["archs"] = [a.to_dict() for a in archs]
        results["band"] = {"target_ms": target, "candidates_in_band": pool}
        save()
    archs = [ArchConfig.from_dict(d) for d in results["archs"][:args.n]]
    target = results["band"]["target_ms"]
    scores = results.setdefault("scores", {})

    long = copy.copy(dist.proxy)
    long.steps = 800
    proxies = {"supernet-20": run.proxy, "distill-200": dist.proxy, "distill-800": long}
    run.proxy.prepare(progress=True)
    for name, extra in SUPERNETS.items():
        if args.here is None or name in args.here:
            t0 = time.perf_counter()
            proxies[name] = prepare(load_config(args.config, [*over, *extra]),
                                    progress=False).proxy
            proxies[name].prepare(progress=True)
            results["seconds"].setdefault(f"prepare_{name}", time.perf_counter() - t0)
            save()
        else:
            proxies[name] = None  # its scores come from an earlier sitting
    for name, proxy in proxies.items():
        if args.here is not None and name not in args.here:
            continue
        for a in archs:
            key = f"{name}/{a.name}"
            if key in scores:
                continue
            t0 = time.perf_counter()
            result, _ = proxy.evaluate(a, progress=False)
            scores[key] = {"score": result.score, "seconds": time.perf_counter() - t0}
            save()
    finals = finals_by_seed(results)
    for seed in args.seeds:
        for a in archs:
            unit = f"{a.name}/s{seed}"
            if unit not in finals and args.here is None:
                finals[unit] = distill_seed(run, a, work / "distilled" / unit.replace("/", "_"),
                                            seed, label=unit)
                save()

    missing = [f"{a.name}/s{s}" for s in args.seeds for a in archs
               if f"{a.name}/s{s}" not in finals] + [
        k for k in (f"{n}/{a.name}" for n in proxies for a in archs) if k not in scores]
    if missing:
        print(f"{len(missing)} scores still to do ({', '.join(missing[:4])}, ...); rerun without "
              "--here, or finish them with benchmarks/on_device.py")
        return 0
    per_seed = {s: [finals[f"{a.name}/s{s}"]["test"] for a in archs] for s in args.seeds}
    final = [statistics.mean(v) for v in zip(*per_seed.values())]
    ranks = {name: [scores[f"{name}/{a.name}"]["score"] for a in archs] for name in proxies}
    # non-embedding parameters: the encoder layers actually stored (shared ones once)
    ranks["params"] = [(a.num_hidden_groups if a.is_albert else a.num_layers) * a.layer_params()
                       for a in archs]
    for name, first in (("multi-fidelity", "distill-200"),
                        ("supernet-20+distill-800", "supernet-20")):  # search.rescore_top_k
        short = ranks[first]
        top = sorted(range(len(archs)), key=lambda i: -short[i])[:args.top_k]
        ranks[name] = [1.0 + ranks["distill-800"][i] if i in top else short[i]
                       for i in range(len(archs))]
    lo, hi = 0.85 * target, 1.15 * target
    records, rows = [], []
    taus = {name: _tau(vals, final) for name, vals in ranks.items()}
    if len(args.seeds) > 1:  # the ceiling: the final recipe itself, at one seed
        rest = {s: [statistics.mean(per_seed[t][i] for t in args.seeds if t != s)
                    for i in range(len(archs))] for s in args.seeds}
        taus["final, another seed"] = tuple(
            statistics.mean(_tau(per_seed[s], rest[s])[j] for s in args.seeds) for j in range(3))
    for name, (tau, low, high) in taus.items():
        records.append({"proxy": name, "tau": tau, "tau_ci95": [low, high], "n": len(archs),
                        "latency_band_ms": [lo, hi], "default": name == DEFAULT,
                        "final_seeds": args.seeds})
        cost = sum(scores[f"{name}/{a.name}"]["seconds"] for a in archs) \
            if name in proxies else None
        where = {scores[f"{name}/{a.name}"].get("device", "cpu") for a in archs} \
            if name in proxies else {"-"}
        rows.append([name, f"{tau:.3f}", f"{low:.2f} to {high:.2f}", str(len(archs)),
                     "-" if cost is None else f"{cost / len(archs):.1f}", ", ".join(where),
                     "yes" if name == DEFAULT else ""])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "proxy_fidelity.json").write_text(json.dumps(records, indent=1) + "\n")
    # per architecture, so that a proxy added later is ranked against these finals without
    # running them again (benchmarks/proxy_objectives.py)
    (RESULTS / ARCHS).write_text(json.dumps([
        {"arch": a.name, "latency_ms": run.latency.ms(a), "final_seeds": args.seeds,
         "final_test": [per_seed[s][i] for s in args.seeds], "final_test_mean": final[i],
         "final_test_std": statistics.stdev(per_seed[s][i] for s in args.seeds)
         if len(args.seeds) > 1 else 0.0,
         "scores": {n: scores[f"{n}/{a.name}"]["score"] for n in proxies}}
        for i, a in enumerate(archs)], indent=1) + "\n")
    print(f"\n{cpu_name()}; {len(archs)} architectures predicted within {lo:.2f}-{hi:.2f} ms "
          f"(4x budget {target:.2f} ms; {results['band']['candidates_in_band']} in the band)")
    print(text_table(["proxy", "Kendall tau vs final test", "95% interval", "n",
                      "s per candidate", "trained on", "default"], rows))
    devices = {finals[f"{a.name}/s{s}"].get("device", "cpu") for a in archs for s in args.seeds}
    print(f"final recipe (search_vs_hand's, seeds {args.seeds}; test mean ± std) trained on: "
          + ", ".join(sorted(devices)))
    for i, a in enumerate(archs):
        sd = statistics.stdev(per_seed[s][i] for s in args.seeds) if len(args.seeds) > 1 else 0
        print(f"  {a.name:<26} {run.latency.ms(a):.2f} ms  final test {final[i]:.4f} ± {sd:.4f}  "
              + "  ".join(f"{n} {scores[f'{n}/{a.name}']['score']:.4f}" for n in proxies))
    fit = [i for i, a in enumerate(archs) if run.latency.ms(a) <= target]
    if fit:
        best = max(fit, key=lambda i: final[i])
        print(f"best final of the {len(fit)} predicted within the 4x budget ({target:.2f} ms): "
              f"{archs[best].name} {final[best]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

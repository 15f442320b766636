"""Proxy fidelity where it matters: at one latency, which proxy ranks students as the final
recipe does?

The tweets task on the full-data teacher (as benchmarks/search_vs_hand.py). ``--n`` (12)
architectures of the demo space whose predicted latency (the table, batch 1, seq_len 64, this
machine) is within ±15% of the 4x budget, drawn seeded and spread over the layer counts. Each is
finished once by search_vs_hand's final recipe (seed 0), and scored by every proxy:

- ``distill-200``: teacher-initialised, 200 KD steps (the distillation proxy's setting so far),
- ``distill-800``: the same, 800 steps,
- ``supernet-20``: the supernet proxy (800-step supernet, cached; 20 KD steps), the demo default,
- ``params``: non-embedding parameters (zero-cost; no training),
- ``multi-fidelity``: distill-200 for all, distill-800 for its top ``--top-k`` (4), which are
  ranked above the rest by their longer score,
- ``supernet-20+distill-800``: the same rule on the supernet proxy (``search.rescore_top_k``).

Kendall tau of each against the final test accuracy. Resumable: each (architecture, proxy) and
each final distillation is written to ``--work``/results.json when done. Writes
``benchmarks/results/proxy_fidelity.json``: records ``proxy``, ``tau``, ``n``,
``latency_band_ms`` and ``default: true`` on the proxy the demo config searches with.

    python benchmarks/proxy_fidelity.py
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import time
from pathlib import Path

from real_task import resumable  # benchmarks/ is the script's folder
from scipy.stats import kendalltau
from search_vs_hand import FULL_DATA

from tacnas.evaluators.latency_table import cpu_name, teacher_arch
from tacnas.nas.config import load_config
from tacnas.nas.distill import distill
from tacnas.nas.pipeline import prepare
from tacnas.nas.report import table as text_table
from tacnas.searchspace.arch import ArchConfig

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT = "supernet-20"  # what configs/demo.yaml searches with


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--speedup", type=float, default=4.0)
    ap.add_argument("--n", type=int, default=12)
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
    if "archs" not in results:
        archs, target, pool = band(run, args.speedup, args.n, args.seed)
        results["archs"] = [a.to_dict() for a in archs]
        results["band"] = {"target_ms": target, "candidates_in_band": pool}
        save()
    archs = [ArchConfig.from_dict(d) for d in results["archs"]]
    target = results["band"]["target_ms"]
    scores = results.setdefault("scores", {})

    long = copy.copy(dist.proxy)
    long.steps = 800
    proxies = {"supernet-20": run.proxy, "distill-200": dist.proxy, "distill-800": long}
    run.proxy.prepare(progress=True)
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
    finals = results.setdefault("final", {})
    for a in archs:
        if a.name not in finals and args.here is None:
            t0 = time.perf_counter()
            rep = distill(run, a, work / "distilled" / a.name, label=a.name)
            finals[a.name] = {"test": rep["student"]["test"]["accuracy"],
                              "seconds": time.perf_counter() - t0}
            save()

    missing = [a.name for a in archs if a.name not in finals] + [
        k for k in (f"{n}/{a.name}" for n in proxies for a in archs) if k not in scores]
    if missing:
        print(f"{len(missing)} scores still to do ({', '.join(missing[:4])}, ...); rerun without "
              "--here, or finish them with benchmarks/on_device.py")
        return 0
    final = [finals[a.name]["test"] for a in archs]
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
    for name, vals in ranks.items():
        tau = kendalltau(vals, final).statistic
        records.append({"proxy": name, "tau": tau, "n": len(archs),
                        "latency_band_ms": [lo, hi], "default": name == DEFAULT})
        cost = sum(scores[f"{name}/{a.name}"]["seconds"] for a in archs) \
            if name in proxies else None
        where = {scores[f"{name}/{a.name}"].get("device", "cpu") for a in archs} \
            if name in proxies else {"-"}
        rows.append([name, f"{tau:.3f}", str(len(archs)),
                     "-" if cost is None else f"{cost / len(archs):.1f}", ", ".join(where),
                     "yes" if name == DEFAULT else ""])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "proxy_fidelity.json").write_text(json.dumps(records, indent=1) + "\n")
    print(f"\n{cpu_name()}; {len(archs)} architectures predicted within {lo:.2f}-{hi:.2f} ms "
          f"(4x budget {target:.2f} ms; {results['band']['candidates_in_band']} in the band)")
    print(text_table(["proxy", "Kendall tau vs final test", "n", "s per candidate", "trained on",
                      "default"], rows))
    devices = {f.get("device", "cpu") for f in finals.values()}
    print("final recipe (search_vs_hand's, seed 0) trained on: " + ", ".join(devices))
    for a, f in zip(archs, final):
        print(f"  {a.name:<26} final test {f:.4f}  " + "  ".join(
            f"{n} {scores[f'{n}/{a.name}']['score']:.4f}" for n in proxies))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

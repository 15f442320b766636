"""Finish the benchmarks' trainings on a GPU: accuracy only (latency is always measured on the
CPU the budget names).

The distillations of benchmarks/search_vs_hand.py, benchmarks/proxy_fidelity.py,
benchmarks/best_in_space.py and benchmarks/finalist_search.py are most of their time (hours on
2 CPU cores). Where a GPU machine is lent, this script moves exactly that part there, with the project's own training code
(``train_student``, ``DistillationProxy``) and the same recipe, and nothing else:

1. ``pack`` (here): prepares the run as the benchmarks do (the full-data teacher and its cached
   logits), and writes ``--bundle``: the teacher's weights (fp16, to travel; upcast to fp32
   there, which moves a student's initial weights by at most ~1e-3 relative), the tokenized
   splits, the teacher's train and dev logits, the recipe, and every unit still missing from the
   benchmarks' ``results.json``: each (student, seed) of search_vs_hand; each
   (architecture, seed) final and each ``distill-200``/``distill-800`` proxy score of
   proxy_fidelity; best_in_space's missing finals, with its state, so that the run asks it for
   the top-k's other seeds once the first seed of every architecture is in; the other seeds of
   each finished finalist_search pick (its seed 0 is the search's own, trained here; run that
   benchmark with ``--searches-only`` first).
2. ``run`` (on the GPU machine): trains every unit, ``--workers`` processes sharing the GPU,
   appending one JSON line per finished unit to ``--results`` (so a cut run keeps what it did).
3. ``ingest`` (here): writes those lines into the benchmarks' ``results.json`` (each unit marked
   with the device it trained on); rerunning the benchmarks then measures latency here and
   prints their tables.

    python benchmarks/on_device.py pack --bundle gpu_bundle
    python benchmarks/on_device.py run --bundle gpu_bundle --results $OUT/units.jsonl
    python benchmarks/on_device.py ingest --results units.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

SPLITS = ("train", "dev", "test")


# ---------------------------------------------------------------------------------------- pack
def _units(svh: dict, fid: dict, recipe: str, budgets=None) -> list[dict]:
    """Every unit the two benchmarks still miss, seed 0 of everything first (a cut run then
    leaves whole seeds rather than whole students undone). Under another ``recipe`` than the
    default: search_vs_hand's students at ``budgets`` only (bench ``search_vs_hand.RECIPE``)."""
    from proxy_fidelity import finals_by_seed
    from search_vs_hand import DEFAULT_RECIPE, recipe_units
    from unit_keys import ident_of

    from tacnas.searchspace.arch import ArchConfig

    finals = finals_by_seed(fid)
    other = recipe != DEFAULT_RECIPE
    done = recipe_units(svh, recipe)
    bench = f"search_vs_hand.{recipe}" if other else "search_vs_hand"
    out, seen = [], set()
    for seed in (0, 1, 2):
        for key, st in [*svh.get("students", {}).items(),
                        *(() if other else svh.get("variants", {}).items())]:
            if budgets and key.split("/")[0] not in budgets:
                continue
            arch, ident = ident_of(st)
            unit = f"{ident}/s{seed}"
            if unit in seen or unit in done:
                continue
            seen.add(unit)
            out.append({"bench": bench, "key": unit, "what": "final",
                        "arch": arch.to_dict(), "layers": st["layers"], "seed": seed})
        for a in ([] if other else fid.get("archs", [])):
            name = ArchConfig.from_dict(a).name
            if f"{name}/s{seed}" not in finals:
                out.append({"bench": "proxy_fidelity", "key": f"{name}/s{seed}",
                            "what": "final", "arch": a, "layers": None, "seed": seed})
            if seed == 0:
                for steps in (200, 800):
                    key = f"distill-{steps}/{name}"
                    if key not in fid.get("scores", {}):
                        out.append({"bench": "proxy_fidelity", "key": key, "what": "proxy",
                                    "arch": a, "layers": None, "seed": 0, "steps": steps})
    return out


def _finalist_units(fs: dict, seeds=(1, 2)) -> list[dict]:
    """finalist_search's picks' missing seeds (the search trained seed 0 itself); keys
    ``BUDGET/ARCH/sSEED``."""
    from tacnas.searchspace.arch import ArchConfig

    out = []
    for budget, mine in fs.items():
        for s in mine.get("searches", {}).values():
            pick = ArchConfig.from_dict(s["arch"])
            for seed in seeds:
                key = f"{budget}/{pick.name}/s{seed}"
                if f"{pick.name}/s{seed}" not in mine.get("units", {}) and \
                        all(u["key"] != key for u in out):
                    out.append({"bench": "finalist_search", "key": key, "what": "final",
                                "arch": pick.to_dict(), "layers": None, "seed": seed})
    return out


def pack(args) -> int:
    from real_task import resumable
    from search_vs_hand import DEFAULT_RECIPE, FULL_DATA, RECIPES

    from tacnas.nas.config import load_config
    from tacnas.nas.pipeline import prepare

    _, svh, _ = resumable(args.svh_work)
    _, fid, _ = resumable(args.fidelity_work)
    recipe = args.recipe or DEFAULT_RECIPE
    units = _units(svh, fid, recipe, args.budgets)
    then = None
    if recipe == DEFAULT_RECIPE and Path(args.bis_work, "results.json").is_file():
        # best_in_space: what is missing now; its top-k's other seeds are chosen on the GPU
        # once the band's first seed is in (``then``: its state, asked again after each round)
        from best_in_space import BENCH, missing_units

        _, bis, _ = resumable(args.bis_work)
        units += [{"bench": BENCH, "what": "final", **u} for u in missing_units(bis)]
        then = {"bench": BENCH, "state": bis}
    if recipe == DEFAULT_RECIPE and Path(args.fs_work, "results.json").is_file():
        _, fs, _ = resumable(args.fs_work)
        units += _finalist_units(fs)
    over = [*FULL_DATA, *RECIPES[recipe], *args.set, "proxy.kind=distill", "proxy.steps=200",
            "budget.latency=measure"]  # no latency here: the table is not needed
    run = prepare(load_config(args.config, over), progress=True)
    bundle = Path(args.bundle)
    bundle.mkdir(parents=True, exist_ok=True)
    tm = run.teacher.model
    save_file({k: v.half().contiguous() for k, v in tm.state_dict().items()},
              bundle / "teacher.safetensors")
    tensors = {}
    small = tm.config.vocab_size < 2 ** 15
    for name in SPLITS:
        sp = getattr(run.data, name)
        tensors[f"{name}.input_ids"] = sp.input_ids.to(torch.int16 if small else torch.int32)
        tensors[f"{name}.token_type_ids"] = sp.token_type_ids.to(torch.int8)
        tensors[f"{name}.lengths"] = sp.lengths.to(torch.int32)
        tensors[f"{name}.labels"] = sp.labels
    tensors["train_logits"] = run.proxy.train_logits
    tensors["dev_logits"] = run.proxy.dev_logits
    save_file({k: v.contiguous() for k, v in tensors.items()}, bundle / "data.safetensors")
    p = run.proxy
    meta = {
        "teacher_config": tm.config.to_dict(),
        "label_names": run.data.label_names, "metric": run.data.metric,
        "distill": {**run.cfg.to_dict()["distill"], "checkpoint_every": 10 ** 9},
        "init": run.cfg.proxy.init,
        "proxy": {"batch_size": p.batch_size, "lr": p.lr, "warmup_ratio": p.warmup_ratio,
                  "temperature": p.temperature, "alpha_ce": p.alpha_ce, "init": p.init,
                  "seed": p.seed},
        "teacher_dev": run.teacher_dev[run.data.metric],
        "teacher_test": run.teacher_test()[run.data.metric],
        "units": units,
        "then": then,
    }
    (bundle / "meta.json").write_text(json.dumps(meta, indent=1))
    size = sum(f.stat().st_size for f in bundle.iterdir()) / 2 ** 20
    print(f"{len(units)} units packed into {bundle} ({size:.1f} MiB; recipe {recipe}): "
          + ", ".join(f"{sum(u['bench'] == b for u in units)} {b}"
                      for b in sorted({u["bench"] for u in units})))
    return 0


# ----------------------------------------------------------------------------------------- run
_STATE: dict = {}


def _load(bundle: Path, device: str) -> None:
    """One worker's copy of the bundle: the teacher (fp32, on the CPU: it only initialises the
    students), the splits and the recipe."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from tacnas.evaluators.data import Split, TaskData
    from tacnas.evaluators.proxy import DistillationProxy

    torch.set_num_threads(1)
    meta = json.loads((bundle / "meta.json").read_text())
    tc = dict(meta["teacher_config"])
    config = AutoConfig.for_model(tc.pop("model_type"), **tc)
    teacher = AutoModelForSequenceClassification.from_config(config)
    teacher.load_state_dict({k: v.float() for k, v in
                             load_file(bundle / "teacher.safetensors").items()})
    teacher.eval()
    t = load_file(bundle / "data.safetensors")
    splits = {n: Split(t[f"{n}.input_ids"].long(), t[f"{n}.token_type_ids"].long(),
                       t[f"{n}.lengths"].long(), t[f"{n}.labels"]) for n in SPLITS}
    data = TaskData(**splits, label_names=meta["label_names"], metric=meta["metric"])
    p = meta["proxy"]
    _STATE.update(meta=meta, teacher=teacher, data=data, device=device,
                  train_logits=t["train_logits"], dev_logits=t["dev_logits"],
                  proxy=lambda steps: DistillationProxy(
                      teacher=teacher, data=data, train_logits=t["train_logits"],
                      dev_logits=t["dev_logits"], steps=steps, eval_every=0, device=device, **p))


def _work(unit: dict) -> dict:
    from tacnas.evaluators.metrics import compute_metrics
    from tacnas.evaluators.training import predict_logits
    from tacnas.nas.distill import train_student
    from tacnas.searchspace.arch import ArchConfig

    s = _STATE
    arch = ArchConfig.from_dict(unit["arch"])
    t0 = time.perf_counter()
    try:
        if unit["what"] == "proxy":
            result, _ = s["proxy"](unit["steps"]).evaluate(arch, progress=False)
            out = {"score": result.score}
        else:
            meta = s["meta"]
            cfg = SimpleNamespace(distill=SimpleNamespace(**{**meta["distill"],
                                                             "device": s["device"]}),
                                  seed=unit["seed"], proxy=SimpleNamespace(init=meta["init"]))
            run = SimpleNamespace(cfg=cfg, data=s["data"], teacher=SimpleNamespace(
                model=s["teacher"]), proxy=SimpleNamespace(train_logits=s["train_logits"]),
                progress=False)
            # by benchmark too: the same (arch, seed) in both would resume the other's run
            folder = Path("/tmp/on_device") / f"{unit['bench']}_{unit['key'].replace('/', '_')}"
            extra = train_student(run, arch, folder, layers=unit["layers"])
            from transformers import AutoModelForSequenceClassification

            best = AutoModelForSequenceClassification.from_pretrained(folder / "best")
            best.to(s["device"]).eval()
            metric = meta["metric"]
            scores = {n: compute_metrics(predict_logits(best, getattr(s["data"], n)),
                                         getattr(s["data"], n).labels,
                                         s["dev_logits"] if n == "dev" else None)
                      for n in ("dev", "test")}
            out = {"test": scores["test"][metric], "dev": scores["dev"][metric],
                   "dev_agreement": scores["dev"]["agreement"],
                   "teacher_test": meta["teacher_test"], "teacher_dev": meta["teacher_dev"],
                   "steps": extra["steps_run"], "best_step": extra["best_step"]}
    except Exception as e:  # one unit's failure is reported, the others go on
        return {**unit, "error": f"{type(e).__name__}: {e}"}
    return {**unit, "result": {**out, "seconds": time.perf_counter() - t0,
                               "device": torch.cuda.get_device_name() if
                               s["device"].startswith("cuda") else "cpu"}}


def _then_units(then: dict | None, lines: list[dict]) -> list[dict]:
    """The units a benchmark asks for once the results so far (``lines``) are in its state
    (best_in_space's top-k seeds, chosen by the first seed's dev scores)."""
    if not then:
        return []
    from best_in_space import missing_units

    state = json.loads(json.dumps(then["state"]))
    units = state.setdefault("units", {})
    for r in lines:
        if r["bench"] == then["bench"] and "result" in r:
            units[r["key"]] = r["result"]
    return [{"bench": then["bench"], "what": "final", **u} for u in missing_units(state)]


def run_units(args) -> int:
    import multiprocessing as mp

    bundle = Path(args.bundle)
    meta = json.loads((bundle / "meta.json").read_text())
    res = Path(args.results)
    lines = [json.loads(line) for line in res.read_text().splitlines()] if res.is_file() else []
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    units, ran = meta["units"], 0
    with ctx.Pool(args.workers, initializer=_load, initargs=(bundle, device)) as pool, \
            res.open("a") as f:
        while True:  # a round, then the units the benchmarks ask for once it is in
            done = {(r["bench"], r["key"]) for r in lines if "result" in r}
            todo = [u for u in units if (u["bench"], u["key"]) not in done]
            if args.limit:
                todo = todo[:max(0, args.limit - ran)]
            if not todo:
                break
            print(f"{len(todo)} units on {device} with {args.workers} workers", flush=True)
            for i, r in enumerate(pool.imap_unordered(_work, todo), 1):
                f.write(json.dumps(r) + "\n")
                f.flush()
                lines.append(r)
                what = r.get("error") or {k: round(v, 4) for k, v in r["result"].items()
                                          if isinstance(v, float)}
                print(f"[{i}/{len(todo)} {time.perf_counter() - t0:.0f}s] {r['bench']} "
                      f"{r['key']}: {what}", flush=True)
            ran += len(todo)
            units = [*units, *_then_units(meta.get("then"), lines)]
            if any("error" in r for r in lines[-len(todo):]):
                break  # a failed unit would be asked for again: stop, the errors are above
    return 0


# -------------------------------------------------------------------------------------- ingest
def ingest(args) -> int:
    from proxy_fidelity import finals_by_seed
    from real_task import resumable
    from search_vs_hand import DEFAULT_RECIPE, recipe_units

    _, svh, save_svh = resumable(args.svh_work)
    _, fid, save_fid = resumable(args.fidelity_work)
    _, bis, save_bis = resumable(args.bis_work)
    _, fs, save_fs = resumable(args.fs_work)
    n = errors = 0
    for line in Path(args.results).read_text().splitlines():
        r = json.loads(line)
        if "result" not in r:
            errors += 1
            print(f"not ingested: {r['bench']} {r['key']}: {r['error']}")
            continue
        res = r["result"]
        if r["bench"] == "best_in_space":
            bis.setdefault("units", {})[r["key"]] = res
        elif r["bench"] == "finalist_search":  # BUDGET/ARCH/sSEED
            budget, _, key = r["key"].partition("/")
            fs.setdefault(budget, {}).setdefault("units", {})[key] = res
        elif r["bench"].startswith("search_vs_hand"):  # search_vs_hand[.RECIPE]
            recipe = r["bench"].partition(".")[2] or DEFAULT_RECIPE
            recipe_units(svh, recipe)[r["key"]] = res
        elif r["what"] == "final":
            finals_by_seed(fid)[r["key"]] = res
        else:
            fid.setdefault("scores", {})[r["key"]] = res
        n += 1
    save_svh()
    save_fid()
    save_bis()
    save_fs()
    print(f"{n} units ingested ({errors} failed)")
    return 1 if errors else 0


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("pack", "ingest"):
        p = sub.add_parser(name)
        p.add_argument("--svh-work", default="runs/bench_search_vs_hand")
        p.add_argument("--fidelity-work", default="runs/bench_proxy_fidelity")
        p.add_argument("--bis-work", default="runs/bench_best_in_space")
        p.add_argument("--fs-work", default="runs/bench_finalist_search")
    p = sub.choices["pack"]
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--bundle", default="gpu_bundle")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--recipe", default=None, help="one of search_vs_hand's RECIPES (default: "
                   "its default); another packs that recipe's search_vs_hand units only")
    p.add_argument("--budgets", nargs="*", default=None, help="only these budgets' students")
    sub.choices["ingest"].add_argument("--results", required=True)
    p = sub.add_parser("run")
    p.add_argument("--bundle", default="gpu_bundle")
    p.add_argument("--results", required=True)
    p.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    p.add_argument("--device", default=None, help="default: cuda if there is one")
    p.add_argument("--limit", type=int, default=0, help="only the first N units (a smoke run)")
    args = ap.parse_args()
    return {"pack": pack, "run": run_units, "ingest": ingest}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())

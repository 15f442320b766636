"""How well does the latency table predict whole candidates on this machine?

For each batch size: profile the blocks of the demo space from scratch (a fresh table, wall time
reported), draw random architectures of the space that were not used to fit the correction,
build and measure each, and compare. Measurement noise is measured the same way the truth is:
every held-out model is measured in two independent passes (A and B), each the median of
``--sweeps`` sweeps over all models in a shuffled order, against the reference model (see
evaluators/latency.py); |A - B| bounds what any predictor can reach against a single pass. The
truth for the predictor is the mean of A and B.

    python benchmarks/latency_model.py                      # batch 1 and 32, 50 archs each
    python benchmarks/latency_model.py --batch 1 --n 60
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from scipy.stats import kendalltau  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from tacnas.evaluators.latency import LatencyMeter  # noqa: E402
from tacnas.evaluators.latency_table import (  # noqa: E402
    LatencyTable,
    arch_blocks,
    cpu_name,
    device_fingerprint,
    teacher_arch,
)
from tacnas.evaluators.profile import ensure_profiled  # noqa: E402
from tacnas.evaluators.runtime import BACKENDS  # noqa: E402
from tacnas.evaluators.teacher import resolve_source  # noqa: E402
from tacnas.nas.config import load_config  # noqa: E402
from tacnas.nas.report import table as text_table  # noqa: E402


def measure_pass(meter, archs, sweeps, rng, desc):
    """Per model: (ms against the reference, in the table's unit: the median of the sweeps'
    ratios; raw ms: the lowest of the sweeps' medians)."""
    ratios = {a.name: [] for a in archs}
    raw = {a.name: float("inf") for a in archs}
    for _ in tqdm(range(sweeps), desc=desc, unit="sweep", leave=False):
        order = archs[:]
        rng.shuffle(order)
        for a in order:
            r, ref_ms = meter.arch_ratio(a)  # one round, the model kept built for the next
            ratios[a.name].append(r)
            raw[a.name] = min(raw[a.name], r * ref_ms)
    return ({k: statistics.median(v) * meter.unit_ms for k, v in ratios.items()}, raw)


def run(batch: int, args, space, teacher_config) -> list[str]:
    repeats = args.repeats if batch == 1 else max(3, args.repeats // 4)
    meter = LatencyMeter(teacher_config, batch_size=batch, seq_len=args.seq_len,
                         threads=args.threads, warmup=3, repeats=repeats, rounds=args.sweeps,
                         backend=args.backend)
    try:
        fp = device_fingerprint(batch_size=batch, seq_len=args.seq_len, threads=args.threads,
                                backend=args.backend)
        table = LatencyTable(fp)
        archs = list(space.all_archs())
        teacher = teacher_arch(teacher_config)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            info = ensure_profiled(table, meter, [*archs, teacher], path=Path(tmp) / "table.json")
            profile_s = time.perf_counter() - t0
        rng = random.Random(args.seed)
        pool = [a for a in archs if a.name not in table.fit_points]
        test = rng.sample(pool, min(args.n, len(pool)))
        both = [*test, teacher]  # the teacher too: the search calibrates predictions with it
        a_pass, a_raw = measure_pass(meter, both, args.sweeps, rng, f"batch {batch} pass A")
        b_pass, b_raw = measure_pass(meter, both, args.sweeps, rng, f"batch {batch} pass B")
        meter.forget()

        # the cost of one budget check each way
        t0 = time.perf_counter()
        for _ in range(100):
            preds = [table.predict_ms(a) for a in test]
        predict_us = (time.perf_counter() - t0) / (100 * len(test)) * 1e6
        t0 = time.perf_counter()
        for a in test[:5]:  # what the search did before: build the model and measure it
            meter.arch_ms(a)
        measure_s = (time.perf_counter() - t0) / 5
    finally:
        meter.close()

    truth = [(a_pass[a.name] + b_pass[a.name]) / 2 for a in test]
    if args.dump:  # every figure behind the row, for fitting other correction forms offline
        def parts(a):
            return {b.kind: table.blocks[b.key] for b, _ in arch_blocks(a)}
        known = {a.name: a for a in archs} | {teacher.name: teacher}
        dump = {"batch": batch, "table": table.to_dict(),
                "held_out": [{"arch": a.to_dict(), "parts": parts(a), "pred": p,
                              "a": a_pass[a.name], "b": b_pass[a.name]}
                             for a, p in zip(test, preds)],
                "fit": [{"arch": known[n].to_dict(), "parts": parts(known[n]), "ms": ms}
                        for n, ms in table.fit_points.items() if n in known],
                "teacher": {"arch": teacher.to_dict(), "parts": parts(teacher),
                            "a": a_pass[teacher.name], "b": b_pass[teacher.name]}}
        out = Path(f"{args.dump}.b{batch}.json")
        out.write_text(json.dumps(dump, indent=1))
        print(f"batch {batch}: every figure in {out}")
    err = [(p - m) / m for p, m in zip(preds, truth)]
    # against the teacher: scale by the teacher measured (as the truth is: passes A and B) over the
    # teacher predicted. This is the error of the predicted speedup over the teacher, which is
    # all a `speedup` budget decides on (the search scales predictions the same way).
    teacher_ms = (a_pass[teacher.name] + b_pass[teacher.name]) / 2
    scale = teacher_ms / table.predict_ms(teacher)
    cal = [(scale * p - m) / m for p, m in zip(preds, truth)]
    noise = [abs(a_pass[a.name] - b_pass[a.name]) / min(a_pass[a.name], b_pass[a.name])
             for a in test]
    tau = kendalltau(preds, truth).statistic
    tau_ab = kendalltau([a_pass[a.name] for a in test], [b_pass[a.name] for a in test]).statistic
    raw_noise = [abs(a_raw[a.name] - b_raw[a.name]) / min(a_raw[a.name], b_raw[a.name])
                 for a in test]
    print(f"batch {batch}: raw lowest-of-{args.sweeps}-medians (no reference) pass A vs B: "
          f"mean gap {100 * statistics.mean(raw_noise):.1f}%, within ±10% "
          f"{100 * sum(n <= 0.10 for n in raw_noise) / len(raw_noise):.0f}%")
    worst = max(range(len(test)), key=lambda i: abs(err[i]))
    print(f"batch {batch}: teacher measured {teacher_ms:.2f} ms (passes A and B: "
          f"{a_pass[teacher.name]:.2f}, {b_pass[teacher.name]:.2f}), predicted "
          f"{table.predict_ms(teacher):.2f} ms: scale {scale:.3f}")
    print(f"batch {batch}: correction {table.correction} ({info['forms']}); worst "
          f"{test[worst].name} predicted {preds[worst]:.2f} ms, measured {truth[worst]:.2f} ms")
    return [
        str(batch), f"{profile_s:.0f}", str(info["blocks"]), str(info["whole_models"]),
        str(len(test)), f"{min(truth):.2f}-{max(truth):.2f}",
        f"{100 * statistics.mean(abs(e) for e in err):.1f}",
        f"{100 * sum(abs(e) <= 0.10 for e in err) / len(err):.0f}", f"{tau:.3f}",
        f"{100 * statistics.mean(abs(e) for e in cal):.1f}",
        f"{100 * sum(abs(e) <= 0.10 for e in cal) / len(cal):.0f}",
        f"{100 * statistics.mean(noise):.1f}",
        f"{100 * sum(n <= 0.10 for n in noise) / len(noise):.0f}", f"{tau_ab:.3f}",
        f"{predict_us:.1f}", f"{measure_s:.2f}", f"{measure_s * 1e6 / predict_us:,.0f}x",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml", help="its space and teacher")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=50, help="held-out architectures per batch size")
    p.add_argument("--sweeps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20, help="timed passes per sweep (batch 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="torch", choices=BACKENDS)
    p.add_argument("--dump", help="also write every figure to DUMP.b<batch>.json")
    args = p.parse_args()
    cfg = load_config(args.config)
    t = cfg.teacher
    source = t.model or resolve_source(t.finetune_from)
    teacher_config = AutoConfig.from_pretrained(source)
    teacher_config.num_labels = 3
    space = cfg.space.build(teacher_config.hidden_size // teacher_config.num_attention_heads)
    rows = [run(b, args, space, teacher_config) for b in args.batch]
    print(f"\n{cpu_name()}, {args.backend}, {args.threads} threads, seq_len {args.seq_len}, space of "
          f"{space.size} architectures ({args.config}); truth = mean of passes A and B, each the median of {args.sweeps} sweeps against the reference; "
          "noise = pass A vs pass B of the same models; vs teacher = predictions scaled by the teacher "
          "measured like the truth over the teacher predicted (the error of a predicted speedup)")
    print(text_table(
        ["batch", "profile s", "blocks", "fit models", "held out", "measured ms", "MAPE %",
         "within ±10% %", "Kendall tau", "vs teacher MAPE %", "vs teacher within ±10% %",
         "noise MAPE %", "noise within ±10% %", "noise tau",
         "predict µs", "build+measure s", "ratio"], [r for r in rows]))


if __name__ == "__main__":
    main()

"""The teacher and searched students in every deployment runtime, on the tweets task.

Each model runs in PyTorch eager fp32, ONNX Runtime fp32 and ONNX Runtime int8 (the shipped
``model.onnx`` / ``model.int8.onnx`` of each student folder; the teacher's graphs exported the
same way). Latency: batch 1 (``--batch``), seq_len 64, the budget's threads, every model and
runtime measured in one pass against the reference (evaluators/latency.py), the teacher in the
same pass. ``--passes`` such passes (default 3), each with fresh latency workers: the median and
the range over passes (ONNX Runtime int8's figures moved most between processes here). Test
score: computed in that runtime. Agreement: test predictions equal to the same
model's in PyTorch fp32.

    python benchmarks/deploy.py runs/demo4x/final runs/demo8x/final runs/demo4x-i8/final \
        runs/demo12x-i8/final

writes benchmarks/results/deploy.json (records: model, arch, searched_under, backend,
latency_ms, latency_ms_passes, speedup_vs_torch_teacher, speedup_vs_same_runtime_teacher, test_score,
pct_of_torch_teacher, pct_of_same_runtime_teacher, agreement, cpu).

Why not time every row in one process, interleaved round by round (no unit per runtime)? Tried
(30 rounds, 20 ms of sleep between turns): PyTorch beside ONNX Runtime's threads ran the
teacher in 20.6 ms against 10.9 ms in its own worker, which inflated every ONNX Runtime
speedup over it 1.3-2x. Each runtime keeps its own worker.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from tacnas.evaluators.latency_table import cpu_name
from tacnas.evaluators.metrics import compute_metrics
from tacnas.evaluators.runtime import BACKENDS, ONNX_FILES, OnnxClassifier
from tacnas.evaluators.teacher import teacher_logits
from tacnas.evaluators.training import predict_logits
from tacnas.nas.config import load_config
from tacnas.nas.deploy import teacher_graphs
from tacnas.nas.pipeline import prepare
from tacnas.nas.report import table

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("students", nargs="+", help="student folders (export/distill/compress)")
    p.add_argument("--config", default="configs/demo.yaml", help="the task and teacher")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--passes", type=int, default=3, help="latency passes, fresh workers each")
    p.add_argument("--out", default=str(RESULTS / "deploy.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from transformers import AutoModelForSequenceClassification

    cfg = load_config(args.config, [f"budget.batch_size={args.batch}"])
    run = prepare(cfg, progress=False)
    data, metric = run.data, run.data.metric
    models = [("teacher", None)] + [(str(Path(s)), Path(s)) for s in args.students]
    info = {"teacher": {"arch": "L{num_hidden_layers}-H{hidden_size}-A{num_attention_heads}-F"
                                "{intermediate_size}".format(**run.teacher.model.config.to_dict()),
                        "searched_under": None}}
    for name, folder in models[1:]:
        rep = json.loads((folder / "report.json").read_text())
        missing = [f for f in ONNX_FILES.values() if not (folder / f).is_file()]
        if missing:
            raise SystemExit(f"{folder}: no {', '.join(missing)} (export it with onnxruntime "
                             "installed)")
        info[name] = {"arch": rep["student"]["arch"],
                      "searched_under": f"{rep.get('backend', 'torch')}, budget "
                                        f"{rep['budget_ms']:.2f} ms"}

    # latency: every model in every runtime in one pass, the teacher in it; --passes passes,
    # each with fresh latency workers (a fresh calibration of each runtime's unit): the median
    # and the spread over passes
    t0 = time.perf_counter()
    meter = run.meter
    passes: dict[tuple, list[float]] = {}
    for i in range(args.passes):
        try:
            for backend in BACKENDS:
                for name, folder in models:
                    ms = (meter.teacher_ms(backend=backend) if folder is None
                          else meter.folder_ms(folder, backend=backend))
                    passes.setdefault((name, backend), []).append(ms)
                    print(f"pass {i + 1} {name:24s} {backend:17s} {ms:8.2f} ms", flush=True)
        finally:
            meter.close()
            meter.units.clear()
    latency = {k: statistics.median(v) for k, v in passes.items()}
    latency_s = time.perf_counter() - t0

    # test scores in each runtime
    graphs = teacher_graphs(run, BACKENDS)
    logits = {}
    for name, folder in models:
        for backend in BACKENDS:
            if backend == "torch":
                logits[name, backend] = (
                    teacher_logits(run.teacher, data.test, name="test", cache_dir=run.cache,
                                   progress=False) if folder is None else
                    predict_logits(AutoModelForSequenceClassification.from_pretrained(folder),
                                   data.test))
            else:
                path = graphs[backend] if folder is None else folder / ONNX_FILES[backend]
                logits[name, backend] = OnnxClassifier(path).logits(data.test)
    scores = {k: compute_metrics(v, data.test.labels)[metric] for k, v in logits.items()}

    cpu = cpu_name()
    records = []
    for name, _ in models:
        for backend in BACKENDS:
            key = (name, backend)
            agree = (logits[key].argmax(-1) == logits[name, "torch"].argmax(-1))
            records.append({
                "model": name, "arch": info[name]["arch"],
                "searched_under": info[name]["searched_under"], "backend": backend,
                "batch_size": args.batch, "seq_len": cfg.budget.seq_len,
                "threads": cfg.budget.threads, "latency_ms": latency[key],
                "latency_ms_passes": passes[key],
                "speedup_vs_torch_teacher": latency["teacher", "torch"] / latency[key],
                "speedup_vs_same_runtime_teacher": latency["teacher", backend] / latency[key],
                "test_score": scores[name, backend],
                "pct_of_torch_teacher": 100 * scores[name, backend] / scores["teacher", "torch"],
                "pct_of_same_runtime_teacher":
                    100 * scores[name, backend] / scores["teacher", backend],
                "agreement": float(agree.float().mean()),
                "cpu": cpu,
            })
    rows = [[r["model"], r["arch"], r["backend"], f"{r['latency_ms']:.2f}",
             f"{min(r['latency_ms_passes']):.2f}-{max(r['latency_ms_passes']):.2f}",
             f"{r['speedup_vs_torch_teacher']:.2f}x", f"{r['speedup_vs_same_runtime_teacher']:.2f}x",
             f"{r['test_score']:.4f}", f"{r['pct_of_torch_teacher']:.1f}",
             f"{r['pct_of_same_runtime_teacher']:.1f}", f"{100 * r['agreement']:.1f}"]
            for r in records]
    print(f"\n{cpu}, batch {args.batch}, seq_len {cfg.budget.seq_len}, {cfg.budget.threads} "
          f"threads; latency: the median of {args.passes} passes over every row, each with "
          f"fresh workers per runtime ({latency_s:.0f} s); speedups from the medians; test "
          f"{metric} on "
          f"{len(data.test)} tweets, computed in each runtime")
    print(table(["model", "arch", "runtime", "ms", "passes", "vs torch teacher",
                 "vs same-runtime teacher",
                 f"test {metric}", "% of torch teacher", "% of same-runtime teacher",
                 "agrees with fp32 %"], rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()

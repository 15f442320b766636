"""The teacher and searched students in every deployment runtime, on the tweets task.

Each model runs in PyTorch eager fp32, ONNX Runtime fp32 and ONNX Runtime int8 (the shipped
``model.onnx`` / ``model.int8.onnx`` of each student folder; the teacher's graphs exported the
same way). Latency: batch 1 (``--batch``), seq_len 64, the budget's threads, every model and
runtime measured in one pass against the reference (evaluators/latency.py), the teacher in the
same pass. Test score: computed in that runtime. Agreement: test predictions equal to the same
model's in PyTorch fp32.

    python benchmarks/deploy.py runs/demo4x/final runs/demo8x/final runs/demo4x-int8/final

writes benchmarks/results/deploy.json (records: model, arch, searched_under, backend,
latency_ms, speedup_vs_torch_teacher, speedup_vs_same_runtime_teacher, test_score,
pct_of_torch_teacher, pct_of_same_runtime_teacher, agreement, cpu).
"""

from __future__ import annotations

import argparse
import json
import logging
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

    # latency: every model in every runtime, one pass, the teacher in it
    t0 = time.perf_counter()
    meter = run.meter
    latency = {}
    try:
        for backend in BACKENDS:
            for name, folder in models:
                latency[name, backend] = (meter.teacher_ms(backend=backend) if folder is None
                                          else meter.folder_ms(folder, backend=backend))
                print(f"{name:28s} {backend:17s} {latency[name, backend]:8.2f} ms", flush=True)
    finally:
        meter.close()
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
            ms = latency[name, backend]
            agree = (logits[name, backend].argmax(-1) == logits[name, "torch"].argmax(-1))
            records.append({
                "model": name, "arch": info[name]["arch"],
                "searched_under": info[name]["searched_under"], "backend": backend,
                "batch_size": args.batch, "seq_len": cfg.budget.seq_len,
                "threads": cfg.budget.threads, "latency_ms": ms,
                "speedup_vs_torch_teacher": latency["teacher", "torch"] / ms,
                "speedup_vs_same_runtime_teacher": latency["teacher", backend] / ms,
                "test_score": scores[name, backend],
                "pct_of_torch_teacher": 100 * scores[name, backend] / scores["teacher", "torch"],
                "pct_of_same_runtime_teacher":
                    100 * scores[name, backend] / scores["teacher", backend],
                "agreement": float(agree.float().mean()),
                "cpu": cpu,
            })
    rows = [[r["model"], r["arch"], r["backend"], f"{r['latency_ms']:.2f}",
             f"{r['speedup_vs_torch_teacher']:.2f}x", f"{r['speedup_vs_same_runtime_teacher']:.2f}x",
             f"{r['test_score']:.4f}", f"{r['pct_of_torch_teacher']:.1f}",
             f"{r['pct_of_same_runtime_teacher']:.1f}", f"{100 * r['agreement']:.1f}"]
            for r in records]
    print(f"\n{cpu}, batch {args.batch}, seq_len {cfg.budget.seq_len}, {cfg.budget.threads} "
          f"threads; latency of every row in one pass ({latency_s:.0f} s); test {metric} on "
          f"{len(data.test)} tweets, computed in each runtime")
    print(table(["model", "arch", "runtime", "ms", "vs torch teacher", "vs same-runtime teacher",
                 f"test {metric}", "% of torch teacher", "% of same-runtime teacher",
                 "agrees with fp32 %"], rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()

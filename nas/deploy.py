"""What an export ships and how it runs there: the ONNX graphs beside the transformers folder,
and the student and the teacher measured in every runtime (``evaluators/runtime.py``).

For each runtime the report gives the latency measured in it (the shipped graph, loaded as a
user's session would load it; apart, and paired with the teacher call by call as the search
checks its finalists), the test score computed in it, and how often its predictions
agree with the same model's in PyTorch fp32 (ONNX Runtime's int8 kernels differ across CPUs:
microsoft/onnxruntime#5849, #14642), for the student and the teacher alike. The teacher's graphs
are exported once per teacher and kept in the cache.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from tacnas.errors import UserError
from tacnas.evaluators.checkpoint import discard
from tacnas.evaluators.metrics import compute_metrics
from tacnas.evaluators.runtime import (
    BACKENDS,
    INSTALL,
    ONNX_FILES,
    OnnxClassifier,
    onnx_missing,
    require_onnx,
    write_onnx,
)
from tacnas.evaluators.teacher import teacher_logits
from tacnas.evaluators.training import predict_logits
from tacnas.nas.pipeline import Run

log = logging.getLogger(__name__)


def parse_runtimes(text: str | None) -> tuple[str, ...] | None:
    """``--runtimes torch,onnxruntime,onnxruntime-int8`` (None: every installed one)."""
    if text is None:
        return None
    names = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    bad = [n for n in names if n not in BACKENDS]
    if bad or not names:
        raise UserError(f"--runtimes {text}: expected names among {', '.join(BACKENDS)}, "
                        "separated by commas")
    if any(n != "torch" for n in names):
        require_onnx(f"--runtimes {text}")
    return names


def choose_runtimes(requested: tuple[str, ...] | None, backend: str) -> tuple[str, ...]:
    """The runtimes an export measures: those asked for (default: all, or only ``torch`` with a
    one-line warning when ONNX Runtime is not installed), always with the budget's backend."""
    if requested is None:
        if onnx_missing():
            log.warning("ONNX Runtime is not installed: the export holds no ONNX graph and is "
                        "measured in PyTorch only (%s)", INSTALL)
            requested = ("torch",)
        else:
            requested = BACKENDS
    return tuple(b for b in BACKENDS if b in requested or b == backend)


def teacher_graphs(run: Run, backends: tuple[str, ...]) -> dict[str, Path]:
    """The teacher's shipped graphs, exported once per teacher into the cache (rebuilt if a
    kept one does not load)."""
    folder = run.cache / "onnx" / run.teacher.fingerprint
    wanted = [b for b in backends if b != "torch"]
    paths = {b: folder / ONNX_FILES[b] for b in wanted}
    if all(p.is_file() for p in paths.values()):
        try:
            for p in paths.values():
                OnnxClassifier(p, threads=1)
            return paths
        except Exception as e:  # truncated or corrupt: export again
            discard(folder, e)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_onnx(run.teacher.model, tmp, backends=tuple(wanted))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return paths


def measure_runtimes(run: Run, folder: Path, student, runtimes: tuple[str, ...]) -> list[dict]:
    """One row per runtime: latency (student and teacher, in that runtime, in one pass; and
    the student paired with the teacher, ``LatencyMeter.folder_share``), test scores computed
    in it, agreement with the fp32 PyTorch predictions."""
    data, metric = run.data, run.data.metric
    meter = run.meter
    graphs = teacher_graphs(run, runtimes) if any(b != "torch" for b in runtimes) else {}
    try:  # apart (each against the reference), then paired with the teacher call by call
        times = {b: (meter.folder_ms(folder, backend=b), meter.teacher_ms(backend=b),
                     meter.folder_share(folder, backend=b)) for b in runtimes}
    finally:
        meter.close()
    s_fp32 = predict_logits(student, data.test)
    t_fp32 = teacher_logits(run.teacher, data.test, name="test", cache_dir=run.cache,
                            progress=False)
    torch_teacher_ms = times["torch"][1] if "torch" in times else None
    rows = []
    for b in runtimes:
        if b == "torch":
            s_logits, t_logits = s_fp32, t_fp32
        else:
            s_logits = OnnxClassifier(Path(folder) / ONNX_FILES[b]).logits(data.test)
            t_logits = OnnxClassifier(graphs[b]).logits(data.test)
        s_ms, t_ms, share = times[b]
        s_test = compute_metrics(s_logits, data.test.labels)
        t_test = compute_metrics(t_logits, data.test.labels)
        rows.append({
            "backend": b, "student_ms": s_ms, "teacher_ms": t_ms, "speedup": t_ms / s_ms,
            "paired_speedup": 1.0 / share,
            "speedup_vs_torch_teacher": (torch_teacher_ms / s_ms) if torch_teacher_ms else None,
            "student_test": s_test, "teacher_test": t_test,
            "retention": s_test[metric] / t_test[metric] if t_test[metric] else None,
            "agreement": _agree(s_logits, s_fp32), "teacher_agreement": _agree(t_logits, t_fp32),
            "max_logit_diff": float((s_logits - s_fp32).abs().max()),
        })
    return rows


def _agree(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape[-1] == 1:  # regression: no argmax to agree on
        return float("nan")
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())

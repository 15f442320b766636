"""Deployment runtimes: what a user ships and where latency and scores are measured.

Three backends, chosen by measurement on this project's machines (batch 1, seq_len 64, 2
threads, AMD EPYC with AVX-512 VNNI; one raw timing of three models in one process, medians
of 50 passes): for the 6-layer/384 teacher, PyTorch eager fp32 17.6 ms, ONNX Runtime fp32
10.5 ms, ONNX Runtime int8 4.9 ms, PyTorch's own dynamic int8 8.0 ms and bf16 9.8 ms; for a
2-layer/256 and a 1-layer/384 student, PyTorch int8 (2.0, 1.8 ms) and bf16 (2.5, 2.0 ms) also
lost to ONNX Runtime int8 (0.8, 0.8 ms). ONNX Runtime's transformer fusions
(``onnxruntime.transformers.optimizer``) changed nothing beyond noise at these sizes. So PyTorch
int8 and bf16 are not offered.

- ``torch``: the transformers model in PyTorch eager, fp32.
- ``onnxruntime``: the model exported to ONNX (torch's dynamo exporter) and run by an ONNX
  Runtime CPU session, fp32.
- ``onnxruntime-int8``: that graph with every MatMul's weights quantized to int8 (per tensor,
  symmetric) and its activations quantized at run time (``onnxruntime.quantization.
  quantize_dynamic``): the deployment FastFormers and Intel's recipes use on CPUs.

A shipped graph takes the tokenizer's own outputs, ``input_ids``, ``attention_mask`` and
``token_type_ids`` (int64, any batch size and length), and returns ``logits``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from tacnas.errors import UserError

BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8")
ONNX_FILES = {"onnxruntime": "model.onnx", "onnxruntime-int8": "model.int8.onnx"}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
INSTALL = "pip install 'tacnas[onnx]'"


def onnx_missing() -> list[str]:
    """The packages of the [onnx] extra that cannot be imported here."""
    missing = []
    for name in ("onnxruntime", "onnx", "onnxscript"):
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


def runtime_versions(backends) -> dict:
    """The library versions behind ``backends``."""
    out = {"torch": torch.__version__}
    if any(b != "torch" for b in backends):
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    return out


def require_onnx(what: str) -> None:
    """One line naming what needs ONNX Runtime and how to install it (a ``UserError``)."""
    missing = onnx_missing()
    if missing:
        raise UserError(f"{what}: {', '.join(missing)} not installed; {INSTALL} "
                        "(or use budget.backend: torch)")


class Classifier(torch.nn.Module):
    """A transformers classifier as ``(input_ids, attention_mask, token_type_ids) -> logits``:
    the signature of a shipped graph."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).logits


@contextlib.contextmanager
def _quiet():
    """The exporter's and quantizer's progress prints and advice, kept off the user's screen."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_module(module: torch.nn.Module, inputs: tuple, path: Path, *,
                  names: tuple[str, ...] | None = None, dynamic: bool = False) -> Path:
    """``module(*inputs)`` as an ONNX graph at ``path`` (one file, weights inside). With
    ``dynamic``, every input's first two dimensions (batch, length) are free."""
    module.eval()
    names = names or tuple(f"x{i}" for i in range(len(inputs)))
    kw = {}
    if dynamic:
        batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
        kw["dynamic_shapes"] = tuple({0: batch, 1: length} for _ in inputs)
    with _quiet(), torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(module, inputs, dynamo=True, input_names=list(names),
                                    output_names=["logits"], verbose=False, **kw)
        program.save(str(path), external_data=False)
    return path


def export_classifier(model, path: Path) -> Path:
    """The shipped fp32 graph of a transformers classifier (inputs named as the tokenizer's)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (2, 16), generator=g)
    ones = torch.ones_like(ids)
    return export_module(Classifier(model), (ids, ones, torch.zeros_like(ids)), path,
                         names=INPUTS, dynamic=True)


def quantize_int8(src: Path, dst: Path) -> Path:
    """Dynamic int8 quantization of ``src``'s MatMuls (the linear layers) into ``dst``.

    The graph is constant-folded first (ONNX Runtime's basic optimizations, saved): a layer
    shared across depth
    (ALBERT's groups) is exported as ``MatMul(x, Transpose(W))``, computed at run time, which
    the quantizer cannot see as a weight and left in fp32 (measured: a 3-layer student sharing
    one group ran as fast in "int8" as in fp32)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet(), tempfile.TemporaryDirectory(prefix="tacnas-q-") as tmp:
        folded = Path(tmp) / "folded.onnx"
        session(src, threads=1, save_basic=folded)  # constant folding, hardware-independent
        quantize_dynamic(str(folded), str(dst), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"],
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return dst


_POOL: list[int] = []  # the threads of this process's global ONNX Runtime pool, once made


def session(path: Path, *, threads: int, shared: bool = False, save_basic: Path | None = None):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (spinning, as ONNX
    Runtime's default).

    ``shared``: the session runs on one thread pool for the whole process (made on first use,
    and used by every later session of the process). The latency worker alternates two
    sessions (a model and the reference) pass by pass; with a pool each, one session's
    spinning threads slowed the other's passes on 2 cores (measured here: a 1.5 ms student read
    1.8-2.8 ms alternated, and 5.4 ms in one export's report). On one shared pool, alternated
    and alone agree (2.25 vs 2.26 ms) and match a session of its own (2.25); turning spinning
    off instead also made them agree, but cost small models 10-35% (wake-ups on every
    operator), which a deployment does not pay.

    ``save_basic``: write the graph after ONNX Runtime's basic (hardware-independent)
    optimizations, constant folding among them, to that path."""
    import onnxruntime as ort

    if shared and not _POOL:
        ort.set_global_thread_pool_sizes(threads, 1)
        _POOL.append(threads)
    options = ort.SessionOptions()
    if _POOL:  # once a process has the global pool, every session must use it
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if save_basic is not None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(save_basic)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_runner(module: torch.nn.Module, inputs: tuple, *, backend: str, threads: int,
                shared: bool = False):
    """``fn()`` running ``module(*inputs)`` once in ONNX Runtime (exported at these inputs'
    shapes; quantized for ``onnxruntime-int8``; ``shared``: see ``session``)."""
    with tempfile.TemporaryDirectory(prefix="tacnas-ort-") as tmp:  # the session keeps it
        path = export_module(module, inputs, Path(tmp) / "m.onnx")
        if backend == "onnxruntime-int8":
            path = quantize_int8(path, Path(tmp) / "m.int8.onnx")
        s = session(path, threads=threads, shared=shared)
    feeds = {i.name: x.numpy() for i, x in zip(s.get_inputs(), inputs)}
    return lambda: s.run(None, feeds)


def shipped_runner(folder: Path, backend: str, *, batch_size: int, seq_len: int,
                   threads: int, vocab_size: int | None = None, shared: bool = False):
    """``fn()`` running the shipped graph of ``backend`` in ``folder`` on random tokens, as a
    user's session would (token ids below ``vocab_size``, default: the folder's config's;
    ``shared``: see ``session``)."""
    import json

    s = session(Path(folder) / ONNX_FILES[backend], threads=threads, shared=shared)
    vocab = vocab_size or json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch_size, seq_len), generator=g).numpy()
    values = {"input_ids": ids, "attention_mask": np.ones_like(ids),
              "token_type_ids": np.zeros_like(ids)}
    feeds = {i.name: values[i.name] for i in s.get_inputs()}
    return lambda: s.run(None, feeds)


class OnnxClassifier:
    """A shipped graph scored like a model: ``logits(split)`` in the runtime."""

    def __init__(self, path: Path, *, threads: int | None = None):
        self.path = Path(path)
        self.session = session(self.path, threads=threads or min(4, os.cpu_count() or 1))
        self.names = {i.name for i in self.session.get_inputs()}

    def logits(self, split, *, batch_size: int = 64) -> torch.Tensor:
        order = torch.argsort(split.lengths, descending=True)
        out = None
        for i in range(0, len(split), batch_size):
            idx = order[i:i + batch_size]
            feeds = {k: v.numpy() for k, v in split.batch(idx).items() if k in self.names}
            (logits,) = self.session.run(["logits"], feeds)
            if out is None:
                out = torch.empty(len(split), logits.shape[-1])
            out[idx] = torch.from_numpy(logits).float()
        return out


def write_onnx(model, folder: Path, backends=("onnxruntime", "onnxruntime-int8")) -> dict:
    """``model.onnx`` (and ``model.int8.onnx``) in ``folder``: ``{backend: path}``."""
    folder = Path(folder)
    fp32 = export_classifier(model, folder / ONNX_FILES["onnxruntime"])
    paths = {"onnxruntime": fp32}
    if "onnxruntime-int8" in backends:
        paths["onnxruntime-int8"] = quantize_int8(fp32, folder / ONNX_FILES["onnxruntime-int8"])
    return paths


def runtime_logits(model, split, backend: str, *, threads: int | None = None) -> torch.Tensor:
    """``model``'s logits on ``split`` in ``backend``: exported (and quantized) to a temporary
    folder and run by ONNX Runtime, or in PyTorch for ``torch``."""
    if backend == "torch":
        from tacnas.evaluators.training import predict_logits

        return predict_logits(model, split)
    with tempfile.TemporaryDirectory(prefix="tacnas-ort-") as d:
        paths = write_onnx(model, Path(d), backends=(backend,))
        return OnnxClassifier(paths[backend], threads=threads).logits(split)

"""Fixtures: a tiny task and teacher built once per session (seconds), an isolated cache."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)

from tacnas.evaluators.data import Split, TaskData
from tacnas.evaluators.proxy import EvalResult
from tacnas.nas.budget import MeasuredLatency, PredictedLatency
from tacnas.nas.config import config_from_dict
from tacnas.searchspace.arch import ArchConfig
from tests import tiny_assets

ROOT = Path(__file__).resolve().parent.parent

# torch, transformers and optuna are imported: what they hold lives as long as the session, so
# the garbage collector stops scanning it (each search's collection after a trained trial would
# otherwise walk it all: ~0.5 s a trial in this process)
gc.freeze()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TACNAS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A folder with ``tiny/data.csv`` and ``tiny/teacher/`` (what configs/tiny.yaml names)."""
    root = tmp_path_factory.mktemp("tinyproj")
    tiny_assets.build(root / "tiny")
    return root


@pytest.fixture
def project(tiny_dir, tmp_path):
    """A working folder holding tiny/ and tiny.yaml, as a user would have."""
    (tmp_path / "tiny").symlink_to(tiny_dir / "tiny")
    shutil.copy(ROOT / "configs" / "tiny.yaml", tmp_path / "tiny.yaml")
    return tmp_path


@pytest.fixture(scope="session")
def tiny_teacher(tiny_dir):
    return AutoModelForSequenceClassification.from_pretrained(tiny_dir / "tiny" / "teacher").eval()


@pytest.fixture
def random_teacher():
    """An untrained BERT in the shape of tests' teachers: 4 layers, hidden 64, 4 heads of 16."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="session")
def postgres_url():
    """A throw-away PostgreSQL on 127.0.0.1 for the session. Skipped, with the reason shown,
    only where no server can be had; with TACNAS_REQUIRE_POSTGRES=1 (CI) it fails instead."""
    import importlib.util

    from tests import postgres

    reason = None
    if postgres.bindir() is None:
        reason = "PostgreSQL is not installed (Debian: apt-get install postgresql)"
    elif importlib.util.find_spec("psycopg") is None:
        reason = "psycopg is not installed (pip install 'tacnas[postgres]')"
    if reason:
        if os.environ.get("TACNAS_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"TACNAS_REQUIRE_POSTGRES=1 but {reason}")
        pytest.skip(reason)
    with postgres.cluster() as url:
        yield url


# ------------------------------------------------------------------- helpers shared by tests


def cli(*args, cwd: Path, check: bool = True, timeout: int = 300,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """``run_search.py --quiet ARGS`` in ``cwd`` (``env``: variables to add)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    p = subprocess.run([sys.executable, str(ROOT / "run_search.py"), "--quiet", *args], cwd=cwd,
                       env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def cli_here(*args, cwd: Path, check: bool = True,
             env: dict | None = None) -> SimpleNamespace:
    """``cli`` in this process: the same ``main`` with the same arguments, its stdout, stderr
    (warnings logged as the CLI's own handler writes them) and exit code, without starting an
    interpreter and importing torch and transformers again (seconds a call). For the commands a
    test builds on; what a user sees of a failing command (its exit code and one stderr line,
    no traceback) is tested through ``cli``, a real process."""
    from tacnas.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    saved_env, saved_cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    os.environ.update(env or {})
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(["--quiet", *map(str, args)])
            except SystemExit as e:  # argparse's own errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        root.handlers[:] = handlers  # also drops one a basicConfig may have added
        root.setLevel(level)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)
    p = SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    if check and code != 0:
        raise AssertionError(f"exit {code}\n{p.stdout}\n{p.stderr}")
    return p


# A synthetic search: latency and score are known functions of the architecture, so the Optuna
# search, the budget and the strategies are tested in seconds, without training.


def fake_ms(arch: ArchConfig) -> float:
    """The synthetic search's true latency of ``arch``: its FLOPs at batch 1, seq_len 16."""
    return arch.flops(batch_size=1, seq_len=16) / 1e6


class FakeMeter:
    def __init__(self):
        self.measured = []

    def arch_ms(self, arch: ArchConfig) -> float:
        self.measured.append(arch)
        return fake_ms(arch)

    def teacher_ms(self) -> float:
        return fake_ms(TEACHER)

    def arch_share(self, arch: ArchConfig, *, fresh: bool = False) -> float:
        """Paired with the teacher: the true ratio, whatever ``teacher_ms`` reads."""
        self.measured.append(arch)
        return fake_ms(arch) / fake_ms(TEACHER)

    def close(self) -> None:
        pass


def true_score(arch: ArchConfig) -> float:
    """Bigger is better, depth most: the optimum sits on the budget's boundary."""
    return 0.3 + 0.1 * arch.num_layers + arch.hidden_size / 1000 + arch.intermediate_size / 4000


class FakeProxy:
    score_key = "accuracy"

    def __init__(self, se: float | None = None, bias=None):
        self.trained = []
        self.se = se  # the standard error every synthetic score carries (None: none)
        self.bias = bias  # arch -> what this proxy adds to the true score (a misleading proxy)
        self.rescorer = None

    def longer(self, steps: int) -> FakeProxy:
        """The longer proxy of ``search.rescore_top_k``: the true score, without the bias."""
        self.rescorer = self.rescorer or FakeProxy(self.se)
        return self.rescorer

    def score_name(self) -> str:
        return "dev accuracy (synthetic)"

    def prepare(self, *, progress=False):
        pass

    def evaluate(self, arch, *, report=None, progress=False):
        self.trained.append(arch)
        s = true_score(arch) + (self.bias(arch) if self.bias else 0.0)
        if report is not None:
            report(1, s)
        metrics = {"accuracy": s, **({} if self.se is None else {"accuracy_se": self.se, "n": 100})}
        return EvalResult(s, metrics, [(1, s)]), SimpleNamespace(save_pretrained=lambda p: None)

    def final_scores(self, model):
        """A trained model's dev metrics, as the real proxy computes them in PyTorch (the
        differentiable search scores its derived student with it)."""
        from tacnas.evaluators.metrics import compute_metrics
        from tacnas.evaluators.training import predict_logits

        logits = predict_logits(model, self.data.dev)
        return compute_metrics(logits, self.data.dev.labels, self.dev_logits), None


TEACHER = ArchConfig(4, 128, 8, 256, 128, 4)  # the synthetic run's teacher


class FlopsTable:
    """A latency table that predicts exactly what ``FakeMeter`` measures."""

    def predict_ms(self, arch: ArchConfig) -> float:
        return fake_ms(arch)


class OptimisticTable:
    """A latency table that predicts ``fake_run``'s teacher exactly and every other
    architecture 15% under what ``FakeMeter`` measures (so calibrating by the teacher does not
    remove the error)."""

    teacher = ArchConfig(4, 128, 8, 256, 128, 4)  # fake_run's teacher

    def predict_ms(self, arch: ArchConfig) -> float:
        truth = fake_ms(arch)
        return truth if arch == self.teacher else 0.85 * truth


def _synthetic_split(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 16, (n,), generator=g)
    ids = torch.randint(5, 99, (n, 16), generator=g) * (torch.arange(16) < lengths[:, None])
    return Split(ids, torch.zeros_like(ids), lengths, torch.randint(0, 2, (n,), generator=g))


def fake_run(tmp_path, sampler="tpe", n_trials=12, speedup=2.0, strategy="optuna",
             se: float | None = None, min_retention: float | None = None,
             min_use: float | None = None, predicted: bool = False):
    """A search on a synthetic evaluator: latency is the architecture's FLOPs (measured and
    predicted alike), the proxy's score is ``true_score``, so the feasible optimum is known
    (``speedup=None``: no latency budget; ``min_retention``: an accuracy floor, teacher 0.9;
    ``min_use``: a floor on the budget's use; ``predicted``: a latency table predicting exactly
    what is measured, as the differentiable search always has).
    With ``strategy: differentiable`` it also has what that search trains: a random BERT
    teacher (4 layers, hidden 128, 8 heads of 16, FFN 256), random token data and logits."""
    cfg = config_from_dict(dict(
        task=dict(dataset="x.csv"), teacher=dict(model="t"),
        space=dict(num_layers=[1, 2, 3, 4], hidden_size=[32, 64, 96, 128],
                   intermediate_size=[64, 128, 256]),
        budget=dict(speedup=speedup, min_retention=min_retention, min_use=min_use),
        search=dict(sampler=sampler, n_trials=n_trials, n_startup_trials=4, max_rejections=60,
                    strategy=strategy),
        differentiable=dict(steps=12, warmup_steps=4, batch_size=8, log_every=4,
                            checkpoint_every=4),
        run_dir=str(tmp_path),
    ))
    meter = FakeMeter()
    run = SimpleNamespace(
        cfg=cfg, space=cfg.space.build(teacher_head_size=16), meter=meter, proxy=FakeProxy(se),
        params_of=lambda a: a.num_params(vocab_size=99, num_labels=2),
        teacher_dev={"accuracy": 0.9}, teacher_params=1, progress=False, warnings=[],
        latency=MeasuredLatency(meter),
    )
    if predicted or strategy == "differentiable":
        meter.teacher_config = BertConfig(
            vocab_size=99, hidden_size=128, num_hidden_layers=4, num_attention_heads=8,
            intermediate_size=256, max_position_embeddings=32, num_labels=2)
        run.latency = PredictedLatency(FlopsTable(), meter)
    if strategy == "differentiable":
        torch.manual_seed(0)
        teacher = BertForSequenceClassification(meter.teacher_config).eval()
        run.teacher = SimpleNamespace(model=teacher)
        run.data = TaskData(_synthetic_split(64, 1), _synthetic_split(32, 2),
                            _synthetic_split(32, 3), ["a", "b"], "accuracy")
        run.proxy.train_logits = torch.randn(64, 2, generator=torch.Generator().manual_seed(4))
        run.proxy.dev_logits = torch.randn(32, 2, generator=torch.Generator().manual_seed(5))
        run.proxy.data = run.data
    return run


# ------------------------------------------------------------------ processes and interrupts


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children(pid: int, command: str = "spawn_main") -> list[int]:
    """The live child processes of ``pid`` whose command line holds ``command`` (default:
    multiprocessing's spawned workers, such as the latency worker), from Linux's /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None and int(st[1]) == pid:
            try:
                cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if command in cmdline:
                out.append(int(d.name))
    return out


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"  # a zombie has exited


@contextlib.contextmanager
def interrupt_when(condition, *, poll: float = 0.002, timeout: float = 600):
    """Send this process a real SIGINT (what Ctrl-C sends) as soon as ``condition()`` holds,
    e.g. once a checkpoint exists: the code under test sees KeyboardInterrupt wherever it is."""
    done = threading.Event()

    def watch():
        deadline = time.monotonic() + timeout
        while not done.is_set() and time.monotonic() < deadline:
            if condition():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(poll)

    # a process started with SIGINT ignored (a background job of a shell without job control,
    # nohup-like launchers) never sees it: give this one Python's own handler while it waits
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        signal.signal(signal.SIGINT, previous)


def default_sigint() -> None:
    """``preexec_fn`` for a child that a test interrupts: SIGINT at its default disposition,
    whatever this process inherited, so the child's Python raises KeyboardInterrupt on it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def checkpoint_step(folder: Path) -> int | None:
    """The step of the checkpoint in ``folder`` (``state.json``), if it has one."""
    try:
        return json.loads((folder / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture
def without_onnx(tmp_path):
    """Environment variables for ``cli(env=...)`` under which onnxruntime, onnx and onnxscript
    cannot be imported (as on a machine without the [onnx] extra)."""
    block = tmp_path / "no_onnx"
    block.mkdir()
    (block / "sitecustomize.py").write_text(  # None in sys.modules: "not installed"
        "import sys\n"
        "for name in ('onnxruntime', 'onnx', 'onnxscript'):\n"
        "    sys.modules[name] = None\n")
    return {"PYTHONPATH": f"{block}{os.pathsep}{ROOT}"}

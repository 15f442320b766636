"""The distillation proxy: train a candidate briefly with knowledge distillation, score it on dev.

Every candidate is trained under the same rule (same initialisation scheme, steps, batches and
seed), so their scores are comparable. Intermediate dev scores are reported through a callback so
that an Optuna pruner can stop bad candidates early.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from tacnas.evaluators.data import TaskData
from tacnas.evaluators.metrics import agreement_metrics, compute_metrics, se_key
from tacnas.evaluators.training import (
    Diverged,
    check_finite,
    kd_loss,
    make_optimizer,
    optimizer_step,
    predict_logits,
    shuffled_batches,
)
from tacnas.searchspace.arch import ArchConfig
from tacnas.searchspace.build import build_student


class Stopped(Exception):
    """Raised out of ``evaluate`` when ``report`` says the candidate should stop (pruned)."""

    def __init__(self, step: int, score: float):
        super().__init__(f"stopped at step {step} with score {score:.4f}")
        self.step, self.score = step, score


@dataclass
class EvalResult:
    score: float  # the proxy's objective: the task metric on dev, or agreement (score_key)
    metrics: dict  # every dev metric, plus agreement with the teacher (and on the pool)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, dev score)
    train_seconds: float = 0.0
    # with budget.backend: onnxruntime-int8, score and metrics are the int8 graph's in ONNX
    # Runtime (what ships; quantization can reorder candidates) and these the fp32 model's
    fp32_metrics: dict | None = None
    repeat_scores: list[float] | None = None  # with proxy.repeats > 1: each run's score


class DistillationProxy:
    def __init__(
        self,
        *,
        teacher: PreTrainedModel,
        data: TaskData,
        train_logits: torch.Tensor,
        dev_logits: torch.Tensor,
        steps: int,
        batch_size: int,
        lr: float,
        warmup_ratio: float,
        temperature: float,
        alpha_ce: float,
        eval_every: int = 0,
        init: str = "teacher",
        seed: int = 0,
        backend: str = "torch",
        objective: str = "metric",
        pool_logits: torch.Tensor | None = None,
        device: str = "cpu",
        repeats: int = 1,
    ):
        self.teacher, self.data = teacher, data
        self.train_logits, self.dev_logits = train_logits, dev_logits
        self.steps, self.batch_size, self.lr, self.warmup_ratio = steps, batch_size, lr, warmup_ratio
        self.temperature, self.alpha_ce = temperature, alpha_ce
        self.eval_every, self.init, self.seed = eval_every, init, seed
        self.backend = backend
        self.objective, self.pool_logits = objective, pool_logits
        self.device = torch.device(device)  # where candidates train (the search uses the CPU)
        self.repeats = repeats  # runs per candidate at seeds seed, seed+1, ...; scored by the mean

    @property
    def score_key(self) -> str:
        """The key of the metrics dict that ranks candidates (``proxy.objective``)."""
        return self.key_for(self.objective)

    def key_for(self, objective: str) -> str:
        """The metrics key of an objective: ``metric`` the task metric, ``agreement`` agreement
        with the teacher (on the unlabeled pool where there is one)."""
        if objective == "metric":
            return self.data.metric
        return "pool_agreement" if self.pool_logits is not None else "agreement"

    def score_name(self) -> str:
        """What ranks the candidates, in words (for status and reports)."""
        runs = f", the mean of {self.repeats} runs" if self.repeats > 1 else ""
        if self.objective == "metric":
            return f"dev {self.data.metric} ({len(self.data.dev):,} labelled examples{runs})"
        if self.pool_logits is not None:
            return (f"agreement with the teacher on {len(self.data.pool):,} unlabeled texts "
                    f"(task.unlabeled; no labels{runs})")
        return (f"agreement with the teacher on the {len(self.data.dev):,} dev texts "
                f"(no labels{runs})")

    def prepare(self, *, progress: bool = True) -> None:
        """Whatever is done once before the candidates (nothing here)."""

    def longer(self, steps: int) -> DistillationProxy:
        """The distillation proxy with this one's data, recipe and scoring, at ``steps`` KD
        steps from the teacher's weights (a supernet proxy's re-scoring is a plain one)."""
        return DistillationProxy(
            teacher=self.teacher, data=self.data, train_logits=self.train_logits,
            dev_logits=self.dev_logits, steps=steps, batch_size=self.batch_size, lr=self.lr,
            warmup_ratio=self.warmup_ratio, temperature=self.temperature, alpha_ce=self.alpha_ce,
            eval_every=0, init=self.init, seed=self.seed, backend=self.backend,
            objective=self.objective, pool_logits=self.pool_logits, device=str(self.device))

    def initial_model(self, arch: ArchConfig, *, progress: bool = False) -> PreTrainedModel:
        """The candidate before its KD steps: teacher-initialised (or random)."""
        return build_student(arch, self.teacher, init=self.init, seed=self.seed)

    def score(self, model: PreTrainedModel) -> dict:
        logits = predict_logits(model, self.data.dev)
        if not torch.isfinite(logits).all():
            raise Diverged("proxy.lr: a candidate's dev logits are not finite (the training "
                           "diverged); lower proxy.lr")
        return self._with_pool(model, compute_metrics(logits, self.data.dev.labels,
                                                       self.dev_logits))

    def _with_pool(self, model, metrics: dict) -> dict:
        """``metrics`` plus agreement with the teacher on the unlabeled pool, if there is one
        (``pool_agreement``, its standard error and ``pool_n``)."""
        if self.pool_logits is None:
            return metrics
        return {**metrics, **self._pool(predict_logits(model, self.data.pool, batch_size=128))}

    def _pool(self, logits: torch.Tensor) -> dict:
        """Agreement of ``logits`` (on the pool) with the teacher's, under the pool's keys."""
        pool = agreement_metrics(logits, self.pool_logits)
        return {"pool_agreement": pool["agreement"], "pool_n": pool["n"],
                se_key("pool_agreement"): pool[se_key("agreement")]}

    def final_scores(self, model: PreTrainedModel) -> tuple[dict, dict | None]:
        """``(metrics, fp32 metrics)`` of a trained candidate: its dev metrics where it is
        deployed. In ``onnxruntime-int8`` the candidate is exported, quantized and scored by
        ONNX Runtime (seconds), and the second item is its fp32 metrics; otherwise that item is
        None (fp32 ONNX Runtime scores as PyTorch does, to ~1e-7 in the logits)."""
        metrics = self.score(model)
        if self.backend != "onnxruntime-int8":
            return metrics, None
        model = model.cpu()
        from tacnas.evaluators.runtime import runtime_logits

        logits = runtime_logits(model, self.data.dev, self.backend)
        deployed = compute_metrics(logits, self.data.dev.labels, self.dev_logits)
        if self.pool_logits is not None:
            deployed.update(self._pool(runtime_logits(model, self.data.pool, self.backend)))
        return deployed, metrics

    def evaluate(
        self,
        arch: ArchConfig,
        *,
        report: Callable[[int, float], bool] | None = None,
        progress: bool = True,
    ) -> tuple[EvalResult, PreTrainedModel]:
        """Train ``arch`` for ``steps`` KD steps; ``report(step, score)`` returning True stops it.
        With ``repeats`` > 1, ``repeats`` times (seeds ``seed``, ``seed + 1``, ...): every dev
        metric is the mean over the runs and the model is the first run's."""
        if self.repeats > 1:
            return self._repeated(arch, report=report, progress=progress)
        model = self.initial_model(arch, progress=progress).to(self.device)
        metric = self.score_key
        opt, sched = make_optimizer(model, lr=self.lr, steps=self.steps,
                                    warmup_ratio=self.warmup_ratio)
        batches = shuffled_batches(len(self.data.train), self.batch_size, self.seed,
                                   self.data.train.lengths)
        curve: list[tuple[int, float]] = []
        start = time.perf_counter()
        model.train()
        bar = tqdm(range(1, self.steps + 1), desc=f"distill {arch.name}", disable=not progress,
                   unit="step", leave=False)
        for step in bar:
            idx = next(batches)
            batch = {k: v.to(self.device) for k, v in self.data.train.batch(idx).items()}
            out = model(**batch).logits
            loss = kd_loss(out, self.train_logits[idx].to(self.device),
                           self.data.train.labels[idx].to(self.device),
                           temperature=self.temperature, alpha_ce=self.alpha_ce)
            optimizer_step(loss, opt, params=model.parameters(), scheduler=sched,
                           lr_key="proxy.lr")
            if self.eval_every and step % self.eval_every == 0 and step < self.steps:
                s = self.score(model)[metric]
                curve.append((step, s))
                bar.set_postfix(loss=f"{loss.item():.3f}", dev=f"{s:.3f}")
                if report is not None and report(step, s):
                    raise Stopped(step, s)
        seconds = time.perf_counter() - start
        check_finite(model, what=f"candidate {arch.name}", lr_key="proxy.lr")
        metrics, fp32 = self.final_scores(model)
        curve.append((self.steps, (fp32 or metrics)[metric]))
        if report is not None:
            report(self.steps, (fp32 or metrics)[metric])
        model.eval()
        return EvalResult(metrics[metric], metrics, curve, seconds, fp32), model

    def repeat(self, i: int) -> DistillationProxy:
        """Run ``i`` of ``repeats`` alone (seed ``seed + i``); run 0 trains the model that a
        repeated candidate keeps, so a lost checkpoint is trained again by it alone."""
        one = copy.copy(self)
        one.seed, one.repeats = self.seed + i, 1
        return one

    def _repeated(self, arch: ArchConfig, *, report, progress: bool):
        self.prepare(progress=progress)  # a supernet is trained (or loaded) once, shared below
        runs = [self.repeat(i).evaluate(arch, progress=progress) for i in range(self.repeats)]
        results = [r for r, _ in runs]

        def mean(dicts):  # of every score; counts (the examples scored, n) are the first's
            return {k: statistics.fmean(d[k] for d in dicts) if isinstance(v, float) else v
                    for k, v in dicts[0].items()}

        metrics = mean([r.metrics for r in results])
        fp32 = None if results[0].fp32_metrics is None else mean([r.fp32_metrics
                                                                   for r in results])
        score = (fp32 or metrics)[self.score_key]
        if report is not None:
            report(self.steps, score)
        return EvalResult(metrics[self.score_key], metrics, [(self.steps, score)],
                          sum(r.train_seconds for r in results), fp32,
                          [r.score for r in results]), runs[0][1]


class SupernetProxy(DistillationProxy):
    """``proxy.kind: supernet``: a candidate inherits its weights from a weight-sharing supernet
    (``searchspace/supernet.py``) trained once for the space, then takes ``steps`` KD steps (a
    few dozen, against the distillation proxy's hundreds) before its dev score.

    The supernet is trained on first use: ``supernet_steps`` KD steps, each on the slice of an
    architecture drawn uniformly from the space (HAT/AutoFormer's single-path training), with
    checkpoints every 100 steps (a killed training resumes), and kept in the cache keyed by the
    teacher, the data, the space and the recipe, so every study and worker on the task reuses it.
    """

    def __init__(self, *, space, path, supernet_steps: int, supernet_lr: float, **kw):
        super().__init__(**kw)
        self.space, self.path = space, path
        self.supernet_steps, self.supernet_lr = supernet_steps, supernet_lr
        self._net = None

    def supernet(self, *, progress: bool = True):
        if self._net is None:
            self._net = train_supernet(self, progress=progress)
        return self._net

    def prepare(self, *, progress: bool = True) -> None:
        """Train (or load) the supernet once, before the candidates."""
        self.supernet(progress=progress)

    def initial_model(self, arch: ArchConfig, *, progress: bool = False) -> PreTrainedModel:
        model = self.supernet(progress=progress).extract(arch)
        # seeded as build_student seeds the distillation proxy's: a candidate's dropout masks
        # do not depend on which candidates, latency measurements or searches ran before it
        # in the process (unseeded, three runs over the same 36 tweet candidates differed by up
        # to 0.8 points of dev accuracy, 0.2 on average)
        torch.manual_seed(self.seed)
        return model


def train_supernet(proxy: SupernetProxy, *, progress: bool):
    import random

    from safetensors.torch import load_file, save_file

    from tacnas.evaluators.checkpoint import discard, resume, save_checkpoint
    from tacnas.searchspace.supernet import Supernet

    torch.manual_seed(proxy.seed)
    net = Supernet(proxy.space, proxy.teacher)
    final = proxy.path / "supernet.safetensors"
    if final.is_file():
        try:
            weights = load_file(final)
            net.load_state_dict(weights)
            return net.eval()
        except Exception as e:  # a truncated cache: train it again
            discard(final, e)
            torch.manual_seed(proxy.seed)
            net = Supernet(proxy.space, proxy.teacher)
    archs = list(proxy.space.all_archs())
    opt = torch.optim.AdamW(net.parameters(), lr=proxy.supernet_lr, weight_decay=0.01)
    ckpt = proxy.path / "training"
    parts = {"modules": {"supernet": net}, "objects": {"optimizer": opt}}
    saved = resume(ckpt, **parts)
    step = saved["step"] if saved else 0
    rng = random.Random(proxy.seed)
    picks = [rng.randrange(len(archs)) for _ in range(proxy.supernet_steps)]
    batches = shuffled_batches(len(proxy.data.train), proxy.batch_size, proxy.seed,
                               proxy.data.train.lengths, start=step)
    net.train()
    bar = tqdm(total=proxy.supernet_steps, initial=step, desc="train supernet", unit="step",
               disable=not progress)
    while step < proxy.supernet_steps:
        idx = next(batches)
        out = net(archs[picks[step]], **proxy.data.train.batch(idx)).logits
        loss = kd_loss(out, proxy.train_logits[idx], proxy.data.train.labels[idx],
                       temperature=proxy.temperature, alpha_ce=proxy.alpha_ce)
        optimizer_step(loss, opt, params=net.parameters(), lr_key="proxy.supernet_lr")
        step += 1
        bar.update(1)
        if step % 100 == 0 or step == proxy.supernet_steps:
            save_checkpoint(ckpt, **parts, state={"step": step})
    bar.close()
    tmp = final.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp)
    tmp.rename(final)
    return net.eval()

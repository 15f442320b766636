"""Differentiable, AdaBERT-style search over the weight-sharing supernet, under the budget.

Architecture parameters are one logit vector per dimension of the space (layers, hidden size,
FFN size, embedding size, sharing groups; heads follow the hidden size). Each step:

1. a weight step: an architecture is drawn (uniformly during the warm-up, then from the current
   distributions), its slice of the supernet is trained on a train batch with the distillation
   loss (T²·KL + alpha_ce·CE against the cached teacher logits);
2. after the warm-up, an architecture step on a dev batch: a hard, straight-through
   Gumbel-softmax sample of every dimension gates the supernet (``Supernet.gated_forward``), and
   the logits are updated with ``L = L_KD + beta * max(0, E[latency] / budget - 1)``, where
   ``E[latency]`` is the latency table's expected latency under the distributions
   (``ExpectedLatency``, calibrated as the search's predictions are).

The latency term is a hinge: below the budget it exerts no pull, so the distributions are not
dragged onto the smallest choices (a reproduction of AdaBERT collapsed onto parameter-free
operations); its entropy per dimension is logged so that a collapse would show. The Gumbel
temperature anneals exponentially from ``tau_start`` to ``tau_end``.

The derived architecture is the most likely one (each dimension's argmax) if it is valid and
within every budget under the latency model; otherwise the most likely (highest joint
probability) architecture of the space that is. It is written into the study as a trial with
the same params and user attrs as an Optuna trial (``status``, ``export``, ``distill --from``
work on it), with its extracted supernet slice as the trial's checkpoint. Checkpoints of the
supernet, the logits and both optimizers (safetensors; optimizer states loaded with
``weights_only=True``) are written every ``checkpoint_every`` steps: ``resume`` continues from
the last one at the same step, with the same batches and random state.
"""

from __future__ import annotations

import json
import logging
import math
import time

import optuna
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tacnas.errors import UserError
from tacnas.evaluators.checkpoint import load_checkpoint, read_state, save_checkpoint
from tacnas.evaluators.latency_model import ExpectedLatency
from tacnas.evaluators.metrics import compute_metrics
from tacnas.evaluators.training import kd_loss, predict_logits, shuffled_batches
from tacnas.nas.optuna_search import (
    TRAINED,
    WORKER,
    Objective,
    checkpoint_dir,
    resolve_budget,
    run_folder,
)
from tacnas.nas.pipeline import Run
from tacnas.searchspace.arch import ArchConfig, InvalidArch
from tacnas.searchspace.supernet import Supernet

log = logging.getLogger(__name__)


class ArchParams(torch.nn.Module):
    """One logit vector per dimension (zeros: uniform)."""

    def __init__(self, dims: list[tuple[str, tuple]]):
        super().__init__()
        self.choices = dict(dims)
        self.logits = torch.nn.ParameterDict(
            {n: torch.nn.Parameter(torch.zeros(len(c))) for n, c in dims})

    def probs(self) -> dict[str, torch.Tensor]:
        return {n: p.softmax(-1) for n, p in self.logits.items()}

    def entropy(self) -> dict[str, float]:
        return {n: float(-(p * p.clamp_min(1e-12).log()).sum()) for n, p in self.probs().items()}

    def gumbel(self, tau: float) -> dict[str, torch.Tensor]:
        return {n: F.gumbel_softmax(p, tau=tau, hard=True) for n, p in self.logits.items()}

    def sample_index(self, uniform: bool) -> dict[str, int]:
        return {n: int(torch.multinomial(torch.ones_like(p) if uniform else p.softmax(-1), 1))
                for n, p in self.logits.items()}

    def readable(self) -> dict[str, dict[str, float]]:
        return {n: {str(c): round(float(v), 4) for c, v in zip(self.choices[n], p)}
                for n, p in self.probs().items()}


def _valid(net: Supernet, index: dict[str, int]) -> ArchConfig | None:
    try:
        return net.arch_of(index)
    except InvalidArch:
        return None


def _draw(net: Supernet, alpha: ArchParams, *, uniform: bool, tries: int = 100) -> ArchConfig:
    for _ in range(tries):
        arch = _valid(net, alpha.sample_index(uniform))
        if arch is not None:
            return arch
    raise RuntimeError("no valid architecture drawn in 100 tries")  # the space has none?


def _gates(net: Supernet, alpha: ArchParams, tau: float, tries: int = 100):
    for _ in range(tries):
        gates = alpha.gumbel(tau)
        if _valid(net, {n: int(g.argmax()) for n, g in gates.items()}) is not None:
            return gates
    raise RuntimeError("no valid architecture drawn in 100 tries")


def derive(run: Run, net: Supernet, alpha: ArchParams, budget_ms: float | None,
           objective: Objective) -> tuple[ArchConfig, str]:
    """The most likely architecture within every budget (see the module docstring)."""
    probs = {n: p.detach().log_softmax(-1) for n, p in alpha.logits.items()}

    def fits(arch: ArchConfig) -> bool:
        # the search's own check: the prediction, or a measurement (cached) within the guard
        # band of the budget, so the derived architecture passes the check it is recorded with
        return max(objective._violations(objective.latency(arch)[0], run.params_of(arch))) <= 0

    top = _valid(net, {n: int(p.argmax()) for n, p in probs.items()})
    if top is not None and fits(top):
        return top, "most likely"
    best, best_lp = None, -math.inf
    index_of = {n: {c: i for i, c in enumerate(ch)} for n, ch in net.dims()}
    for arch in run.space.all_archs():
        chosen = _params_of(net, arch)
        lp = sum(float(probs[n][index_of[n][chosen[n]]]) for n in probs)
        if lp > best_lp and fits(arch):
            best, best_lp = arch, lp
    if best is None:
        within = f"{budget_ms:.2f} ms" if budget_ms is not None else "budget.max_params"
        raise UserError(f"budget: no architecture of the space fits the budget ({within}); "
                        "relax the budget or add smaller choices to space")
    return best, ("the most likely within the budget (the most likely overall, "
                  f"{top.name if top else 'invalid'}, is not)")


def _params_of(net: Supernet, arch: ArchConfig) -> dict:
    """The trial params (the space's choice values) of ``arch``."""
    out = {"num_layers": arch.num_layers, "hidden_size": arch.hidden_size,
           "intermediate_size": arch.intermediate_size}
    dims = dict(net.dims())
    emb, grp = dims["embedding_size"], dims["num_hidden_groups"]
    out["embedding_size"] = "hidden" if arch.embedding_size == arch.hidden_size and \
        "hidden" in emb else arch.embedding_size
    out["num_hidden_groups"] = "all" if arch.num_hidden_groups == arch.num_layers and \
        "all" in grp else arch.num_hidden_groups
    return out


def differentiable_search(run: Run, study: optuna.Study, *, timeout: float | None = None) -> dict:
    """Run (or resume) the search, derive the architecture, record it in ``study``.
    ``timeout`` (seconds of this process) ends the steps early; the architecture is then
    derived from the distributions as they stand."""
    cfg, d, p = run.cfg, run.cfg.differentiable, run.cfg.proxy
    done = [t for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get("strategy") == "differentiable"
            and t.user_attrs.get("status") in TRAINED]
    if done:
        log.info("study %s already holds the derived architecture (trial %d)",
                 study.study_name, done[0].number)
        return {"trained": 1, "target": 1, "exhausted": False,
                "budget_ms": study.user_attrs.get("budget_ms"), "trial": done[0].number}
    if run.table is None:
        raise UserError("search.strategy: differentiable needs the latency model "
                        "(budget.latency: predict)")
    if d.warmup_steps >= d.steps:
        raise UserError(f"differentiable.warmup_steps={d.warmup_steps}: must be below "
                        f"differentiable.steps={d.steps}, or no architecture step is taken")
    budget_ms = resolve_budget(run, study)
    objective = Objective(run, study, budget_ms=budget_ms)
    torch.manual_seed(cfg.seed)
    net = Supernet(run.space, run.teacher.model)
    alpha = ArchParams(net.dims())
    expected = ExpectedLatency(run.table, run.space)
    if expected.names != list(alpha.choices):
        raise UserError("space: the differentiable search needs a fixed head size "
                        "(space.head_size: teacher or an int)")
    opt_w = torch.optim.AdamW(net.parameters(), lr=d.lr, weight_decay=0.01)
    opt_a = torch.optim.Adam(alpha.parameters(), lr=d.arch_lr, betas=(0.5, 0.999))

    folder = run_folder(cfg.run_dir, study.study_name) / "checkpoints" / "differentiable"
    state = {"step": 0, "arch_steps": 0, "history": [], "seconds": 0.0}
    parts = {"modules": {"supernet": net, "arch": alpha},
             "objects": {"opt_w": opt_w, "opt_a": opt_a}}
    saved = read_state(folder)
    if saved is not None:
        state = saved
        load_checkpoint(folder, **parts)
        log.info("resuming the differentiable search at step %d of %d", state["step"], d.steps)

    data = run.data
    train = shuffled_batches(len(data.train), d.batch_size, cfg.seed, data.train.lengths)
    dev = shuffled_batches(len(data.dev), d.batch_size, cfg.seed + 1, data.dev.lengths)
    for _ in range(state["step"]):
        next(train)
    for _ in range(state["arch_steps"]):
        next(dev)
    scale = run.latency_scale
    bar = tqdm(total=d.steps, initial=state["step"], desc=f"differentiable {study.study_name}",
               unit="step", disable=not run.progress)
    start = time.perf_counter() - state["seconds"]
    began = time.perf_counter()
    net.train()
    timed_out = False
    while state["step"] < d.steps:
        if timeout is not None and time.perf_counter() - began > timeout:
            timed_out = True
            log.warning("timeout: the differentiable search stops at step %d of %d",
                        state["step"], d.steps)
            state["seconds"] = time.perf_counter() - start
            save_checkpoint(folder, **parts, state=state)
            break
        step = state["step"]
        tau = d.tau_start * (d.tau_end / d.tau_start) ** (step / max(1, d.steps - 1))
        warm = step < d.warmup_steps
        # 1. weights: the slice of a drawn architecture on a train batch
        arch = _draw(net, alpha, uniform=warm)
        idx = next(train)
        logits = net(arch, **data.train.batch(idx)).logits
        loss_w = kd_loss(logits, run.proxy.train_logits[idx], data.train.labels[idx],
                         temperature=p.temperature, alpha_ce=p.alpha_ce)
        opt_w.zero_grad(set_to_none=True)
        loss_w.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt_w.step()
        opt_w.zero_grad(set_to_none=True)
        # 2. architecture: gated supernet on a dev batch, KD + latency hinge
        record = None
        if not warm:
            gates = _gates(net, alpha, tau)
            didx = next(dev)
            state["arch_steps"] += 1
            logits = net.gated_forward(gates, **data.dev.batch(didx))
            l_kd = kd_loss(logits, run.proxy.dev_logits[didx], data.dev.labels[didx],
                           temperature=p.temperature, alpha_ce=p.alpha_ce)
            e_lat = expected(alpha.probs()) * scale
            l_lat = torch.relu(e_lat / budget_ms - 1.0) if budget_ms else e_lat * 0
            loss_a = l_kd + d.latency_weight * l_lat
            opt_a.zero_grad(set_to_none=True)
            loss_a.backward()
            opt_a.step()
            opt_w.zero_grad(set_to_none=True)  # the weights are not moved by dev data
            record = {"kd_dev": float(l_kd), "expected_ms": float(e_lat)}
        state["step"] += 1
        bar.update(1)
        if state["step"] % d.log_every == 0 or state["step"] == d.steps:
            ent = alpha.entropy()
            with torch.no_grad():
                e_ms = float(expected(alpha.probs()) * scale)
            state["history"].append({"step": state["step"], "tau": tau, "kd_train": float(loss_w),
                                     "expected_ms": e_ms, "entropy": ent,
                                     "probs": alpha.readable(), **(record or {})})
            bar.set_postfix(kd=f"{float(loss_w):.3f}", ms=f"{e_ms:.2f}",
                            H=f"{sum(ent.values()):.2f}")
        if state["step"] % d.checkpoint_every == 0 or state["step"] == d.steps:
            state["seconds"] = time.perf_counter() - start
            save_checkpoint(folder, **parts, state=state)
    bar.close()
    train_seconds = state["seconds"]

    # derive, check, record
    arch, how = derive(run, net, alpha, budget_ms, objective)
    latency, source = objective.latency(arch)  # measured if within the guard band
    model = net.extract(arch)
    metrics = compute_metrics(predict_logits(model, data.dev), data.dev.labels,
                              run.proxy.dev_logits)
    score = metrics[data.metric]
    study.enqueue_trial(_params_of(net, arch))
    trial = study.ask()
    sampled = run.space.sample(trial)
    if sampled != arch:  # a bug, never a user error
        raise RuntimeError(f"enqueued {arch.name}, the study gave {sampled.name}")
    attrs = {"worker": WORKER, "strategy": "differentiable", "arch": arch.to_dict(),
             "arch_name": arch.name, "latency_ms": latency, "latency_source": source,
             "predicted_ms": run.table.predict_ms(arch), "latency_scale": run.latency_scale,
             "budget_ms": objective.budget_ms, "params": run.params_of(arch), "score": score,
             "metrics": metrics, "train_seconds": train_seconds, "derived": how,
             "final_probs": alpha.readable(), "final_entropy": alpha.entropy(),
             "steps": state["step"], "timed_out": timed_out, "status": "trained"}
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    violation = max(objective._violations(latency, attrs["params"]))
    trial.set_constraint("budget", violation)
    model.save_pretrained(checkpoint_dir(cfg.run_dir, study.study_name, trial.number))
    (folder.parent / "differentiable_history.json").write_text(
        json.dumps(state["history"], indent=1))
    study.tell(trial, score)
    if violation > 0:
        log.warning("%s measured %.2f ms, over the budget of %.2f ms (the model predicted it "
                    "within): pick another with `status`/`export --trial`", arch.name, latency,
                    objective.budget_ms)
    run.meter.close()
    return {"trained": 1, "target": 1, "exhausted": False, "budget_ms": budget_ms,
            "trial": trial.number, "arch": arch.name, "derived": how, "score": score,
            "latency_ms": latency, "seconds": train_seconds}


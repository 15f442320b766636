"""Differentiable, AdaBERT-style search over the weight-sharing supernet, under the budget.

Architecture parameters are one logit vector per dimension of the space (layers, hidden size,
FFN size, embedding size, sharing groups; heads follow the hidden size). Each step:

1. a weight step: an architecture is drawn, uniformly (``weights: uniform``, the default, as the
   supernet proxy trains: SPOS's decoupling) or, after the warm-up, from the current
   distributions (``weights: sampled``, AdaBERT/DARTS), and its slice of the supernet is
   trained on a train batch with the distillation loss (T²·KL + alpha_ce·CE against the
   cached teacher logits);
2. after the warm-up, an architecture step on a dev batch, with
   ``L = L_KD + beta * E[max(0, latency / budget - 1)]``: the expectation under the
   distributions of each architecture's latency-table excess over the budget
   (``ExpectedLatency``, calibrated as the search's predictions are), exact and
   differentiable; and the gradient of the KD term by one of two estimators:

   - ``estimator: reinforce`` (the default): ``samples`` architectures drawn from the
     distributions, each slice's KD loss on the same dev batch (no gradient into the
     weights), and the score function ``(loss - the others' mean) * grad log p(arch)``;
   - ``estimator: gumbel`` (AdaBERT): a hard, straight-through Gumbel-softmax sample of every
     dimension gates the supernet (``Supernet.gated_forward``). The gated supernet skips the
     layers that the drawn architecture does not run and that only layer counts holding less
     than ``skip_below`` probability together would run: their output is multiplied by a zero
     gate, so the loss is unchanged and only those choices lose their gradient (it saves a
     fifth to a half of the search's time on the tweets task).

   On the tweets task at 4x@1 (benchmarks/differentiable_estimators.py) the straight-through
   gradient took the distributions to 3-layer, 256-wide students whichever way the weights
   were trained, ranking a band of 36 finished students at Kendall tau 0.15-0.26 by their
   likelihood, while the slices themselves ranked them at 0.33-0.50; the score function of
   the same slices went to the band's best region (2 layers, 320 wide, E = H).

The latency term is a hinge: below the budget it exerts no pull, so the distributions are not
dragged onto the smallest choices (a reproduction of AdaBERT collapsed onto parameter-free
operations); with ``budget.min_use`` the mirrored hinge ``E[max(0, min_use - latency /
budget)]`` pulls up below that share, so they settle where the derivation may pick; its
entropy per dimension is logged so that a collapse would show. It is the expected hinge, not
the hinge of the expected latency (``latency_loss: hinge_of_expected``, the earlier default):
under that one a mixture of an architecture over the budget and one under it sits at the
budget unpenalised, and on the tweets task the layer count stayed such a mixture (1 and 2
layers at 0.67/0.31 at 8x). The Gumbel temperature anneals exponentially from
``tau_start`` to ``tau_end``.

Under an accuracy floor (``budget.min_retention``) the latency term is linear instead,
``beta * E[latency] / teacher``, a pull towards fast choices that the KD loss resists; the
``floor_candidates`` most likely architectures within the budget are then each scored, and the
fastest that keeps the floor is the result.

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

import dataclasses
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping

import optuna
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tacnas.errors import UserError
from tacnas.evaluators.checkpoint import resume, save_checkpoint
from tacnas.evaluators.latency_table import LatencyTable
from tacnas.evaluators.metrics import se_key
from tacnas.evaluators.training import kd_loss, optimizer_step, shuffled_batches
from tacnas.nas.budget import Budget, floor_violation
from tacnas.nas.pipeline import Run
from tacnas.nas.record import WORKER, TrialRecord, TrialStatus
from tacnas.nas.study import best_trial, checkpoint_dir, floor_unmet, run_folder
from tacnas.searchspace.arch import ArchConfig, InvalidArch
from tacnas.searchspace.space import SearchSpace
from tacnas.searchspace.supernet import Supernet

log = logging.getLogger(__name__)


class ExpectedLatency:
    """The latency model as a differentiable function of one categorical distribution per
    dimension of the space: ``E[latency] = sum over every combination of choices of
    prediction(combination) * prod_d p_d(choice_d)``. At one-hot distributions it is exactly
    ``table.predict_ms`` of that architecture.

    Combinations that are not an architecture (an embedding wider than the hidden size, groups
    that do not divide the layers, heads that do not divide the hidden size) take the space's
    largest latency, so that mass on them is never attractive.
    """

    def __init__(self, table: LatencyTable, space: SearchSpace):
        self.dims: list[tuple[str, tuple]] = list(space.choices().items())
        self.space = space
        self.grid = self.grid_of(table.predict_ms)

    def grid_of(self, fn: Callable[[ArchConfig], float]) -> torch.Tensor:
        """``fn`` of every combination of choices (the largest value where the combination is
        not an architecture), shaped for ``__call__``'s ``grid``."""
        values, valid = [], []
        for combo in itertools.product(*(c for _, c in self.dims)):
            d = dict(zip((n for n, _ in self.dims), combo))
            hidden = d["hidden_size"]
            try:
                arch = self.space._resolve(
                    d["num_layers"], hidden, d.get("num_heads") or hidden // self.space.head_size,
                    d["intermediate_size"], d["embedding_size"], d["num_hidden_groups"])
            except InvalidArch:
                arch = None
            values.append(math.nan if arch is None else fn(arch))
            valid.append(arch is not None)
        grid = torch.tensor(values, dtype=torch.float64)
        worst = grid[torch.tensor(valid)].max() if any(valid) else torch.tensor(0.0)
        grid = torch.where(torch.tensor(valid), grid, worst)
        return grid.reshape([len(c) for _, c in self.dims])

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.dims]

    def __call__(self, probs: Mapping[str, torch.Tensor],
                 grid: torch.Tensor | None = None) -> torch.Tensor:
        """``probs[name]``: a 1-D distribution over that dimension's choices (space order).
        ``grid``: the expectation of another function of the combinations (``over``)."""
        out = (self.grid if grid is None else grid).to(next(iter(probs.values())).dtype)
        for name, choices in self.dims:  # contract one leading dimension at a time
            p = probs[name]
            if p.shape != (len(choices),):
                raise ValueError(f"probs[{name!r}] has shape {tuple(p.shape)}, "
                                 f"expected ({len(choices)},)")
            out = torch.tensordot(p, out, dims=([0], [0]))
        return out

    def over(self, limit_ms: float) -> torch.Tensor:
        """The grid of ``max(0, prediction / limit_ms - 1)``: with ``__call__``, the expected
        hinge, which charges every architecture over the limit by its own excess."""
        return torch.relu(self.grid / limit_ms - 1.0)

    def under(self, limit_ms: float, share: float) -> torch.Tensor:
        """The grid of ``max(0, share - prediction / limit_ms)``: the expected hinge below
        ``budget.min_use``, which charges every architecture faster than that share of the
        budget by the share it leaves unused."""
        return torch.relu(share - self.grid / limit_ms)


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
        return {n: float(-(p * p.clamp_min(1e-12).log()).sum().detach())
                for n, p in self.probs().items()}

    def gumbel(self, tau: float) -> dict[str, torch.Tensor]:
        return {n: F.gumbel_softmax(p, tau=tau, hard=True) for n, p in self.logits.items()}

    def sample_index(self, uniform: bool) -> dict[str, int]:
        return {n: int(torch.multinomial(torch.ones_like(p) if uniform else p.softmax(-1), 1))
                for n, p in self.logits.items()}

    def log_prob_index(self, index: Mapping[str, int]) -> torch.Tensor:
        """The log joint probability of one choice index per dimension (with its gradient)."""
        return sum(p.log_softmax(-1)[index[n]] for n, p in self.logits.items())

    def readable(self) -> dict[str, dict[str, float]]:
        return {n: {str(c): round(float(v), 4) for c, v in zip(self.choices[n], p.detach())}
                for n, p in self.probs().items()}


def _valid(net: Supernet, index: dict[str, int]) -> ArchConfig | None:
    try:
        return net.arch_of(index)
    except InvalidArch:
        return None


def _draw(net: Supernet, alpha: ArchParams, *, uniform: bool,
          tries: int = 100) -> tuple[dict[str, int], ArchConfig]:
    """A valid architecture drawn uniformly or from the distributions, with its choice indices."""
    for _ in range(tries):
        index = alpha.sample_index(uniform)
        arch = _valid(net, index)
        if arch is not None:
            return index, arch
    raise RuntimeError("no valid architecture drawn in 100 tries")  # the space has none?


def _gates(net: Supernet, alpha: ArchParams, tau: float, tries: int = 100):
    for _ in range(tries):
        gates = alpha.gumbel(tau)
        if _valid(net, {n: int(g.argmax()) for n, g in gates.items()}) is not None:
            return gates
    raise RuntimeError("no valid architecture drawn in 100 tries")


def derive(run: Run, net: Supernet, alpha: ArchParams, budget: Budget) -> tuple[ArchConfig, str]:
    """The most likely architecture within every budget (see the module docstring). Each
    candidate passes the check it is recorded with (``Budget.confirm``: under the latency
    table, a measurement), so the derived architecture fits as measured."""
    top = _valid(net, {n: int(p.argmax()) for n, p in alpha.logits.items()})
    if top is not None and budget.confirm(top).fits:
        return top, "most likely"
    return likely(run, net, alpha, budget, 1)[0], (
        "the most likely within the budget (the most likely overall, "
        f"{top.name if top else 'invalid'}, is not)")


def size_term(expected: ExpectedLatency, probs: Mapping[str, torch.Tensor], size: torch.Tensor,
              dims: list[str] | None) -> torch.Tensor:
    """The expected ``size`` grid (parameters over the teacher's) under ``probs``, with a
    gradient only towards the logits of ``dims`` (None: every dimension); the others'
    probabilities enter as constants (``differentiable.size_dims``)."""
    return expected({n: p if dims is None or n in dims else p.detach()
                     for n, p in probs.items()}, size)


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




@dataclasses.dataclass
class _Search:
    """The search's trainable parts, optimizers, checkpoint folder and progress state."""

    net: Supernet
    alpha: ArchParams
    expected: ExpectedLatency
    opt_w: torch.optim.Optimizer
    opt_a: torch.optim.Optimizer
    folder: object
    state: dict
    size: torch.Tensor | None = None  # parameters / the teacher's, per combination

    def save(self) -> None:
        save_checkpoint(self.folder, modules={"supernet": self.net, "arch": self.alpha},
                        objects={"opt_w": self.opt_w, "opt_a": self.opt_a}, state=self.state)


def _start(run: Run, study: optuna.Study) -> _Search:
    """A fresh search, or the one checkpointed in the study's run folder."""
    d = run.cfg.differentiable
    torch.manual_seed(run.cfg.seed)
    net = Supernet(run.space, run.teacher.model)
    alpha = ArchParams(net.dims())
    expected = ExpectedLatency(run.latency.table, run.space)
    if expected.names != list(alpha.choices):
        raise UserError("space: the differentiable search needs a fixed head size "
                        "(space.head_size: teacher or an int)")
    search = _Search(
        net, alpha, expected, torch.optim.AdamW(net.parameters(), lr=d.lr, weight_decay=0.01),
        torch.optim.Adam(alpha.parameters(), lr=d.arch_lr, betas=(d.arch_beta1, 0.999)),
        run_folder(run.cfg.run_dir, study.study_name) / "checkpoints" / "differentiable",
        {"step": 0, "arch_steps": 0, "history": [], "seconds": 0.0},
        expected.grid_of(lambda a: run.params_of(a) / run.teacher_params) if d.size_weight
        else None)
    saved = resume(search.folder, modules={"supernet": net, "arch": alpha},
                   objects={"opt_w": search.opt_w, "opt_a": search.opt_a})
    if saved is not None:
        search.state = saved
        log.info("resuming the differentiable search at step %d of %d", saved["step"], d.steps)
    return search


def _step(run: Run, s: _Search, budget_ms: float | None, train, dev,
          floor_ref: float | None = None) -> dict:
    """One weight step and, after the warm-up, one architecture step; what to log."""
    d, p, data = run.cfg.differentiable, run.cfg.proxy, run.data
    use = run.cfg.budget.min_use  # a floor on the budget's use: the latency term charges it too
    step = s.state["step"]
    tau = d.tau_start * (d.tau_end / d.tau_start) ** (step / max(1, d.steps - 1))
    warm = step < d.warmup_steps
    # 1. weights: the slice of a drawn architecture on a train batch
    _, arch = _draw(s.net, s.alpha, uniform=warm or d.weights == "uniform")
    idx = next(train)
    logits = s.net(arch, **data.train.batch(idx)).logits
    loss_w = kd_loss(logits, run.proxy.train_logits[idx], data.train.labels[idx],
                     temperature=p.temperature, alpha_ce=p.alpha_ce)
    optimizer_step(loss_w, s.opt_w, params=s.net.parameters(), lr_key="differentiable.lr")
    out = {"tau": tau, "kd_train": loss_w.detach().item()}
    if warm:
        return out
    # 2. architecture: on a dev batch, KD + latency hinge
    didx = next(dev)
    s.state["arch_steps"] += 1
    probs = s.alpha.probs()
    if d.estimator == "reinforce":
        l_kd = _score_function(run, s, didx)
    else:  # the gated supernet
        gates = _gates(s.net, s.alpha, tau)
        logits = s.net.gated_forward(gates, **data.dev.batch(didx),
                                     layer_probs=probs["num_layers"].detach(),
                                     skip_below=d.skip_below)
        l_kd = kd_loss(logits, run.proxy.dev_logits[didx], data.dev.labels[didx],
                       temperature=p.temperature, alpha_ce=p.alpha_ce)
    table_ms = s.expected(probs)  # the table's expected latency (uncalibrated)
    e_lat = table_ms * run.latency.scale
    if floor_ref is not None:  # an accuracy floor: every millisecond saved counts
        l_lat = table_ms / floor_ref  # over the teacher, both by the table
    elif not budget_ms:
        l_lat = e_lat * 0
    elif d.latency_loss == "expected_hinge":  # E[max(0, lat / budget - 1)]
        table_budget = budget_ms / run.latency.scale
        l_lat = s.expected(probs, s.expected.over(table_budget))
        if use is not None:  # + E[max(0, min_use - lat / budget)]
            l_lat = l_lat + s.expected(probs, s.expected.under(table_budget, use))
    else:  # max(0, E[lat] / budget - 1)
        l_lat = torch.relu(e_lat / budget_ms - 1.0)
        if use is not None:
            l_lat = l_lat + torch.relu(use - e_lat / budget_ms)
    # AdaBERT's efficiency loss also charges model size: a pull towards fewer parameters, which
    # decides what latency and KD leave tied (embedding width, sharing)
    l_size = d.size_weight * size_term(s.expected, probs, s.size, d.size_dims) \
        if s.size is not None else 0.0
    optimizer_step(l_kd + d.latency_weight * l_lat + l_size, s.opt_a, max_norm=None,
                   lr_key="differentiable.arch_lr")
    s.opt_w.zero_grad(set_to_none=True)  # the weights are not moved by dev data
    return {**out, "kd_dev": l_kd.detach().item(), "expected_ms": e_lat.detach().item()}


def _score_function(run: Run, s: _Search, didx) -> torch.Tensor:
    """REINFORCE's surrogate of the expected KD loss on a dev batch: ``samples`` architectures
    drawn from the distributions, each slice's loss on the same batch (no gradient into the
    weights), against the others' mean (a leave-one-out baseline); its gradient is the score
    function's. Returned with the slices' mean loss as its value, for the log."""
    d, p, data = run.cfg.differentiable, run.cfg.proxy, run.data
    drawn = [_draw(s.net, s.alpha, uniform=False) for _ in range(d.samples)]
    batch = data.dev.batch(didx)
    was = s.net.training
    s.net.eval()
    with torch.no_grad():
        losses = torch.stack([kd_loss(s.net(arch, **batch).logits, run.proxy.dev_logits[didx],
                                      data.dev.labels[didx], temperature=p.temperature,
                                      alpha_ce=p.alpha_ce) for _, arch in drawn])
    s.net.train(was)
    n = len(drawn)
    advantage = (losses - losses.mean()) * n / (n - 1)  # loss - the mean of the others
    logp = torch.stack([s.alpha.log_prob_index(index) for index, _ in drawn])
    surrogate = (advantage * logp).mean()
    return surrogate - surrogate.detach() + losses.mean()


def _train(run: Run, s: _Search, budget: Budget, timeout: float | None,
           name: str, floor_ref: float | None = None) -> None:
    """Steps until ``differentiable.steps`` or ``timeout`` (a search stopped short is recorded
    as timed out: its checkpoint's step is below ``differentiable.steps``). At every
    checkpoint of the architecture phase the teacher is measured again (``Budget.tighten``),
    as an Optuna search does after every trained candidate: the loss is unchanged (a
    ``speedup`` budget over the calibrated table is the table's teacher over the speedup,
    whatever was measured), but the checks that choose the result measure against the
    lowest teacher reading, not the one taken when the search began."""
    d, data, state = run.cfg.differentiable, run.data, s.state
    train = shuffled_batches(len(data.train), d.batch_size, run.cfg.seed, data.train.lengths,
                             start=state["step"])
    dev = shuffled_batches(len(data.dev), d.batch_size, run.cfg.seed + 1, data.dev.lengths,
                           start=state["arch_steps"])
    bar = tqdm(total=d.steps, initial=state["step"], desc=f"differentiable {name}",
               unit="step", disable=not run.progress)
    start = time.perf_counter() - state["seconds"]
    began = time.perf_counter()
    s.net.train()
    while state["step"] < d.steps:
        if timeout is not None and time.perf_counter() - began > timeout:
            log.warning("timeout: the differentiable search stops at step %d of %d",
                        state["step"], d.steps)
            state["seconds"] = time.perf_counter() - start
            s.save()
            break
        logged = _step(run, s, budget.budget_ms, train, dev, floor_ref)
        state["step"] += 1
        bar.update(1)
        if state["step"] % d.log_every == 0 or state["step"] == d.steps:
            ent = s.alpha.entropy()
            with torch.no_grad():
                e_ms = float(s.expected(s.alpha.probs()) * run.latency.scale)
            entry = {"step": state["step"], "tau": logged["tau"],
                     "kd_train": logged["kd_train"], "expected_ms": e_ms, "entropy": ent,
                     "probs": s.alpha.readable()}
            # an architecture step's own figures (its expected latency before the update)
            entry.update({k: logged[k] for k in ("kd_dev", "expected_ms") if k in logged})
            state["history"].append(entry)
            bar.set_postfix(kd=f"{logged['kd_train']:.3f}", ms=f"{e_ms:.2f}",
                            H=f"{sum(ent.values()):.2f}")
        if state["step"] % d.checkpoint_every == 0 or state["step"] == d.steps:
            if state["step"] > d.warmup_steps:
                budget.tighten()
            state["seconds"] = time.perf_counter() - start
            s.save()
    bar.close()


def differentiable_search(run: Run, study: optuna.Study, *, timeout: float | None = None) -> dict:
    """Run (or resume) the search, derive the architecture, record it in ``study``.
    ``timeout`` (seconds of this process) ends the steps early; the architecture is then
    derived from the distributions as they stand."""
    d = run.cfg.differentiable
    done = [t for t in study.get_trials(deepcopy=False)
            if (r := TrialRecord.read(t)).strategy == "differentiable" and r.counts]
    if done and run.cfg.search.rescore_top_k:  # the finalists: record the rest, re-score
        try:
            return _finalists(run, study, None, Budget.resolve(run, study))
        finally:
            run.meter.close()
    if done:
        log.info("study %s already holds the derived architecture (trial %d)",
                 study.study_name, done[0].number)
        if (unmet := floor_unmet(study)) is not None:
            raise UserError(unmet)
        best = best_trial(study) or done[0]
        return {"trained": len(done), "target": len(done), "exhausted": False,
                "budget_ms": study.user_attrs.get("budget_ms"), "trial": best.number}
    if run.latency.source != "predicted":
        raise UserError("search.strategy: differentiable needs the latency model "
                        "(budget.latency: predict)")
    if d.warmup_steps >= d.steps:
        raise UserError(f"differentiable.warmup_steps={d.warmup_steps}: must be below "
                        f"differentiable.steps={d.steps}, or no architecture step is taken")
    budget = Budget.resolve(run, study)
    search = _start(run, study)
    # under an accuracy floor the latency term pulls down throughout, relative to the teacher
    # (the table's teacher: the term stays the same when a teacher reading tightens the budget)
    floor_ref = run.latency.teacher_predicted() if budget.floor is not None else None
    _train(run, search, budget, timeout, study.study_name, floor_ref)
    try:
        if run.cfg.search.rescore_top_k:
            return _finalists(run, study, search, budget)
        return _record(run, study, search, budget)
    finally:
        run.meter.close()


def _finalists(run: Run, study: optuna.Study, s: _Search | None, budget: Budget) -> dict:
    """``search.rescore_top_k: k``: the ``k`` most likely architectures within the budget
    (``budget.min_use`` included), each recorded as a trial scored as its supernet slice,
    then re-scored as an Optuna search's top k are (``search.rescore_recipe``, e.g. trained in
    full by the ``distill`` recipe and chosen by dev agreement). Their names are stored in the
    study first (user attribute ``differentiable_finalists``), so a search stopped while
    recording or re-scoring resumes with what it had: the missing ones are recorded from the
    supernet's checkpoint, without another search step, and only new scores are trained."""
    from tacnas.nas.optuna_search import rescore

    k = run.cfg.search.rescore_top_k
    names = study.user_attrs.get("differentiable_finalists")
    recorded = {r.arch_name: t.number for t in study.get_trials(deepcopy=False)
                if (r := TrialRecord.read(t)).strategy == "differentiable" and r.counts}
    if s is None and (names is None or set(names) - set(recorded)):
        # the finished search's checkpoint, not trained further
        s = _saved(run, study, "so its most likely architectures cannot be recorded; search "
                   "again under a new --study")
    if names is None:
        names = [a.name for a in likely(run, s.net, s.alpha, budget, k)]
        study.set_user_attr("differentiable_finalists", names)
    if missing := [n for n in names if n not in recorded]:
        for name in missing:
            recorded[name] = _record_one(
                run, study, s, ArchConfig.from_name(name),
                f"{names.index(name) + 1}. most likely within the budget", budget)["trial"]
        _write_history(s)
    trials = study.get_trials(deepcopy=False)
    finalists = [trials[recorded[n]] for n in names]
    longer = rescore(run, study, k, run.cfg.search.rescore_steps, budget, among=finalists)
    best = best_trial(study)
    if best is None:
        raise UserError(f"budget: none of the {len(names)} most likely architectures is within "
                        "the budget as measured; relax the budget")
    r = TrialRecord.read(best)
    how = (f"{r.extra.get('derived', '?')}; chosen among the {len(names)} most likely by "
           f"search.rescore_objective: {run.cfg.search.rescore_objective}")
    seconds = max(TrialRecord.read(t).train_seconds or 0.0 for t in finalists)
    return {"trained": len(names), "target": len(names), "exhausted": False,
            "budget_ms": budget.budget_ms, "trial": best.number, "arch": r.arch_name,
            "derived": how, "score": r.score, "latency_ms": r.latency_ms,
            "seconds": seconds, "rescored": longer}


def _write_history(s: _Search) -> None:
    """The logged steps (entropy, probabilities) beside the search's checkpoints."""
    (s.folder.parent / "differentiable_history.json").write_text(
        json.dumps(s.state["history"], indent=1))


def _record(run: Run, study: optuna.Study, s: _Search, budget: Budget) -> dict:
    """Derive the architecture, score its extracted slice, write it into the study as a trial.
    Under an accuracy floor, the ``floor_candidates`` most likely architectures within the
    budget are each scored and recorded, and the fastest that keeps the floor is the result."""
    if budget.floor is None:
        arch, how = derive(run, s.net, s.alpha, budget)
        ladder = [(arch, how)]
    else:
        ladder = [(a, f"{i + 1}. most likely within the budget")
                  for i, a in enumerate(likely(run, s.net, s.alpha, budget,
                                               run.cfg.differentiable.floor_candidates))]
    done = [_record_one(run, study, s, arch, how, budget) for arch, how in ladder]
    _write_history(s)
    if budget.floor is None:
        chosen = done[0]
    else:  # the study's own pick: the fastest feasible trial that keeps the floor
        best = best_trial(study)
        if best is None:
            raise UserError(floor_unmet(study))
        chosen = next(d for d in done if d["trial"] == best.number)
        log.info("accuracy floor %.4f: the fastest of %d likely candidates keeping it is %s "
                 "(%.2f ms)", budget.floor, len(done), chosen["arch"], chosen["latency_ms"])
    if not chosen["fits"]:
        log.warning("%s measured %.2f ms, over the budget of %.2f ms (the model predicted it "
                    "within): pick another with `status`/`export --trial`", chosen["arch"],
                    chosen["latency_ms"], budget.budget_ms)
    return {"trained": len(done), "target": len(done), "exhausted": False,
            "budget_ms": budget.budget_ms, **{k: v for k, v in chosen.items() if k != "fits"},
            "seconds": s.state["seconds"]}


def log_prob(net: Supernet, alpha: ArchParams) -> Callable[[ArchConfig], float]:
    """``arch -> `` its log joint probability under the distributions ``alpha``."""
    probs = {n: p.detach().log_softmax(-1) for n, p in alpha.logits.items()}
    index_of = {n: {c: i for i, c in enumerate(ch)} for n, ch in net.dims()}
    return lambda a: sum(float(probs[n][index_of[n][c]]) for n, c in _params_of(net, a).items())


def _saved(run: Run, study: optuna.Study, then: str) -> _Search:
    """The study's search from its last checkpoint; a user error (``then``: what that stops)
    where there is none."""
    s = _start(run, study)
    if s.state["step"] == 0:
        raise UserError(f"--study {study.study_name}: its differentiable search's checkpoint "
                        f"is gone, {then}")
    return s


def checkpointed(run: Run, study: optuna.Study) -> tuple[Supernet, ArchParams]:
    """A study's search as its last checkpoint left it: the supernet and the distributions
    (for a look at what it learned, e.g. how its slices rank architectures)."""
    s = _saved(run, study, "so there is no supernet to look at")
    return s.net, s.alpha


def likely(run: Run, net: Supernet, alpha: ArchParams, budget: Budget, k: int) -> list[ArchConfig]:
    """The ``k`` most likely architectures of the space (joint probability) within every
    latency/params budget, most likely first; checked in that order, so no more than needed.
    Each may be shipped, so one the latency table lets in is measured (``Budget.confirm``) and
    must fit as measured too."""
    logp = log_prob(net, alpha)
    ranked = sorted(run.space.all_archs(), key=lambda a: -logp(a))

    def ships(a: ArchConfig) -> bool:
        if not budget.check(a).fits:
            return False
        if not (v := budget.confirm(a)).fits:
            log.warning("%s measured %.2f ms, over the budget of %.2f ms (the latency table: "
                        "%.2f ms): the next most likely takes its place", a.name, v.latency_ms,
                        v.budget_ms, budget.latency.ms(a))
        return v.fits

    out = list(itertools.islice(filter(ships, ranked), k))
    if not out:
        within = (f"{budget.budget_ms:.2f} ms" if budget.budget_ms is not None
                  else "budget.max_params")
        raise UserError(f"budget: no architecture of the space fits the budget ({within}); "
                        "relax the budget or add smaller choices to space")
    return out


def _record_one(run: Run, study: optuna.Study, s: _Search, arch: ArchConfig, how: str,
                budget: Budget) -> dict:
    v = budget.confirm(arch)  # measured under the latency table (cached: derive/likely did)
    model = s.net.extract(arch)
    metrics, fp32 = run.proxy.final_scores(model)  # in the budget's runtime
    key = run.proxy.score_key
    score = metrics[key]
    study.enqueue_trial(_params_of(s.net, arch))
    trial = study.ask()
    sampled = run.space.sample(trial)
    if sampled != arch:  # a bug, never a user error
        raise RuntimeError(f"enqueued {arch.name}, the study gave {sampled.name}")
    TrialRecord(
        worker=WORKER, strategy="differentiable", status=TrialStatus.TRAINED, arch=arch,
        latency_ms=v.latency_ms, latency_source=v.source, predicted_ms=v.predicted_ms,
        latency_scale=v.latency_scale, budget_ms=v.budget_ms, params=v.params, score=score,
        score_se=metrics.get(se_key(key)), metrics=metrics, train_seconds=s.state["seconds"],
        fp32_score=None if fp32 is None else fp32[key],
        extra={"derived": how, "final_probs": s.alpha.readable(),
               "final_entropy": s.alpha.entropy(), "steps": s.state["step"],
               "timed_out": s.state["step"] < run.cfg.differentiable.steps},
    ).write(trial)
    trial.set_constraint("budget", v.violation)
    if budget.floor is not None:
        trial.set_constraint("min_retention", floor_violation(budget.floor, score))
    model.save_pretrained(checkpoint_dir(run.cfg.run_dir, study.study_name, trial.number))
    study.tell(trial, v.latency_ms if budget.floor is not None else score)
    return {"trial": trial.number, "arch": arch.name, "derived": how, "score": score,
            "latency_ms": v.latency_ms, "fits": v.fits}

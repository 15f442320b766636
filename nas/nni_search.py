"""``search.strategy: nni-<name>``: NNI's multi-trial strategies proposing the candidates.

NNI (3.0, the last release; its repository is archived) proposes architectures of the same
space, and every proposal is run as an ordinary trial of the Optuna study: the same budget check,
reuse of an architecture already trained, proxy, checkpoint and stopping rules as the Optuna
search, because each one goes through ``Objective`` inside ``study.optimize`` with its values
fixed by ``optuna.samplers.PartialFixedSampler``. So ``status``, ``export``, ``distill`` and
``resume`` work unchanged, and several workers can share the study.

How NNI is driven: its strategy runs on NNI's ``SequentialExecutionEngine`` (in this process, no
NNI manager and no web server; the 'ts' engine would open one on all interfaces), the space's
dimensions are ``nni.choice`` arguments of a ``FunctionalEvaluator`` whose function runs the
trial and reports its score with ``nni.report_final_result``. Over-budget and invalid candidates
report the metric's worst value, so evolution discards them.

Offered: ``nni-evolution`` (regularized evolution), ``nni-random``, ``nni-tpe`` (NNI's TPE tuner),
``nni-grid``. Not offered, and why (README "NNI"): NNI's one-shot strategies (DARTS, GumbelDARTS,
ENAS, RandomOneShot, Proxyless) train a model built from NNI's own mutable layers with PyTorch
Lightning; over this space DARTS refuses a mutable head count and Proxyless mutable linear
layers. ``search.strategy: differentiable`` is this project's one-shot search over the space.

Resume: NNI's strategy state is not persisted; a resumed search starts NNI's strategy afresh,
and every architecture the study already trained is answered from the study in milliseconds.
"""

from __future__ import annotations

import logging
import time
import warnings

import optuna

from tacnas.errors import UserError
from tacnas.evaluators.metrics import worst as worst_of
from tacnas.nas.pipeline import Run
from tacnas.nas.record import TrialRecord

log = logging.getLogger(__name__)

INSTALL = "pip install 'tacnas[nni]' (nni 3.0 with pytorch-lightning 2.6.6)"


def import_nni():
    """NNI's pieces used here; a UserError naming the extra if NNI is not installed."""
    try:
        with warnings.catch_warnings():  # nni 3.0 warns about torch classes it predates
            warnings.simplefilter("ignore")
            import nni
            from nni.nas.evaluator import FunctionalEvaluator
            from nni.nas.execution import SequentialExecutionEngine
            from nni.nas.nn.pytorch import ModelSpace
            from nni.nas.space import RawFormatModelSpace
            from nni.nas.strategy import TPE, GridSearch, Random, RegularizedEvolution
    except ImportError as e:
        raise UserError(f"search.strategy: NNI is not installed ({e}); {INSTALL}") from None
    logging.getLogger("nni").setLevel(logging.WARNING)
    return {
        "nni": nni, "FunctionalEvaluator": FunctionalEvaluator, "ModelSpace": ModelSpace,
        "RawFormatModelSpace": RawFormatModelSpace, "Engine": SequentialExecutionEngine,
        "TPE": TPE, "GridSearch": GridSearch, "Random": Random,
        "RegularizedEvolution": RegularizedEvolution,
    }


def make_strategy(name: str, cfg, api: dict):
    """NNI's strategy for ``search.strategy`` (the config admits only these names)."""
    seed, n = cfg.seed, cfg.nni
    return {
        "nni-evolution": lambda: api["RegularizedEvolution"](
            population_size=n.population_size, sample_size=n.sample_size,
            mutation_prob=n.mutation_prob, seed=seed),
        "nni-random": lambda: api["Random"](seed=seed),
        "nni-tpe": lambda: api["TPE"](optimize_mode="maximize", seed=seed),
        "nni-grid": lambda: api["GridSearch"](seed=seed),
    }[name]()


def nni_value(trial: optuna.trial.FrozenTrial, worst: float) -> float:
    """What NNI is told: the proxy score of a trained, reused or pruned candidate, else the
    metric's worst value (over budget, invalid)."""
    score = TrialRecord.read(trial).score
    return worst if score is None else float(score)


def nni_driver(run: Run, study: optuna.Study):
    """A ``run_search`` driver: NNI's strategy proposes, ``study.optimize`` runs each proposal."""
    name = run.cfg.search.strategy
    api = import_nni()
    nni = api["nni"]
    dims = run.space.choices()
    worst = worst_of(run.cfg)

    def drive(objective, callback, timeout, stopped) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        base = study.sampler
        done: dict = {}

        def tagged(trial: optuna.Trial):
            TrialRecord(strategy=name).write(trial)
            return objective(trial)

        def record(_study, trial) -> None:
            done["trial"] = trial

        def evaluate(_model, **params) -> None:
            fixed = {k: dims[k][list(dims[k]).index(v)] for k, v in params.items()}
            study.sampler = optuna.samplers.PartialFixedSampler(fixed, base)
            done.clear()
            try:
                study.optimize(tagged, n_trials=1, callbacks=[callback, record])
            finally:
                study.sampler = base
            nni.report_final_result(nni_value(done["trial"], worst))

        class Engine(api["Engine"]):
            """Sequential, in this process; NNI asks it whether to go on."""

            def budget_available(self) -> bool:
                return not stopped() and (deadline is None or time.monotonic() < deadline)

        class Space(api["ModelSpace"]):
            """No module choices: the candidates are the evaluator's ``nni.choice`` arguments."""

        evaluator = api["FunctionalEvaluator"](
            evaluate, **{k: nni.choice(k, list(v)) for k, v in dims.items()})
        model_space = api["RawFormatModelSpace"].from_model(Space(), evaluator)
        strategy = make_strategy(name, run.cfg, api)
        log.info("NNI %s over %s", strategy, ", ".join(f"{k} {list(v)}" for k, v in dims.items()))
        strategy(model_space, Engine())

    return drive

"""One entry point for every search strategy: ``search.strategy`` picks who proposes the
candidates (Optuna's sampler, NNI's strategy, or the differentiable search); the budget, the
trial record and the study are the same for all of them."""

from __future__ import annotations

import optuna

from tacnas.nas.pipeline import Run


def search(run: Run, study: optuna.Study, *, n_trials: int | None = None,
           timeout: float | None = None) -> dict:
    """Run (or resume) ``run.cfg.search.strategy`` on ``study``; returns its summary."""
    strategy = run.cfg.search.strategy
    if strategy == "differentiable":
        from tacnas.nas.differentiable import differentiable_search

        return differentiable_search(run, study, timeout=timeout)
    from tacnas.nas.optuna_search import run_search

    driver = None
    if strategy.startswith("nni-"):
        from tacnas.nas.nni_search import nni_driver

        driver = nni_driver(run, study)
    return run_search(run, study, n_trials=n_trials, timeout=timeout, driver=driver)

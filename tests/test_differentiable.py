"""The differentiable search: the latency hinge, derivation under the budget, resume, and the
trial it writes for status/export."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import optuna
import pytest
import torch

import tacnas.nas.differentiable as diff_mod
from tacnas.nas.budget import Budget
from tacnas.nas.config import load_config
from tacnas.nas.differentiable import (
    ArchParams,
    ExpectedLatency,
    checkpointed,
    derive,
    differentiable_search,
    size_term,
)
from tacnas.nas.pipeline import prepare
from tacnas.nas.study import create_or_load, default_storage
from tacnas.searchspace.arch import ArchConfig
from tacnas.searchspace.space import SearchSpace
from tacnas.searchspace.supernet import Supernet
from tests.conftest import checkpoint_step, cli_here, interrupt_when

SPACE = SearchSpace(num_layers=(1, 2, 4), hidden_size=(32, 48, 64), intermediate_size=(64, 128),
                    head_size=16, embedding_size=(16, "hidden"), num_hidden_groups=(1, "all"))


class FlopsTable:
    """A stand-in latency table: milliseconds proportional to FLOPs."""

    def predict_ms(self, arch):
        return arch.flops(batch_size=1, seq_len=32) / 1e6


def test_the_latency_hinge_pulls_down_over_budget_and_not_below(random_teacher):
    net = Supernet(SPACE, random_teacher)
    expected = ExpectedLatency(FlopsTable(), SPACE)
    alpha = ArchParams(net.dims())
    start = float(expected(alpha.probs()))
    opt = torch.optim.Adam(alpha.parameters(), lr=0.05)
    budget = 0.5 * start
    for _ in range(100):
        loss = torch.relu(expected(alpha.probs()) / budget - 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = float(expected(alpha.probs()))
    assert end < 0.6 * start and end <= 1.05 * budget, (start, end, budget)
    # under the budget the hinge is flat: no pull toward the smallest choices (no collapse)
    fresh = ArchParams(net.dims())
    loss = torch.relu(expected(fresh.probs()) / (2 * start) - 1.0)
    loss.backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in fresh.parameters())


def test_the_expected_hinge_charges_a_mixture_that_sits_at_the_budget(random_teacher):
    net = Supernet(SPACE, random_teacher)
    expected = ExpectedLatency(FlopsTable(), SPACE)
    alpha = ArchParams(net.dims())
    names = expected.names
    fixed = {n: torch.nn.functional.one_hot(torch.tensor(0), len(c)).double()
             for n, c in expected.dims}

    def with_layers(p):  # everything at its first choice, num_layers mixed
        return {**fixed, "num_layers": torch.tensor(p, dtype=torch.float64)}

    one, four = (float(expected(with_layers(p))) for p in ([1, 0, 0], [0, 0, 1]))
    budget = (one + four) / 2  # a half/half mixture of 1 and 4 layers sits on it
    mix = with_layers([0.5, 0, 0.5])
    assert float(expected(mix)) == pytest.approx(budget)
    assert float(torch.relu(expected(mix) / budget - 1)) == 0.0  # the hinge of E: no pull
    charged = float(expected(mix, expected.over(budget)))
    assert charged == pytest.approx(0.5 * (four / budget - 1))  # E[hinge]: the 4 layers pay
    # at one-hot distributions it is the hinge of that architecture's prediction
    assert float(expected(with_layers([0, 0, 1]), expected.over(budget))) == \
        pytest.approx(four / budget - 1)
    assert float(expected(with_layers([1, 0, 0]), expected.over(budget))) == 0.0
    assert len(names) == len(alpha.logits)


def _probe(diff_run):
    """The tiny run's latency table and space, its expected latency, uniform distributions."""
    _, probe = diff_run()
    probe.meter.close()
    table, space = probe.latency.table, probe.space
    return probe, table, space, ExpectedLatency(table, space), \
        ArchParams(list(space.choices().items())).probs()


def _final_probs(cfg, study_name: str, space) -> dict:
    """A finished search's last logged distributions, from its history file."""
    history = json.loads((Path(cfg.run_dir) / study_name / "checkpoints" /
                          "differentiable_history.json").read_text())
    return {n: torch.tensor([history[-1]["probs"][n][str(c)] for c in ch])
            for n, ch in space.choices().items()}


def test_the_expected_hinge_moves_a_search_under_its_budget(diff_run):
    # a budget 4/5 of the way from the fastest architecture to the uniform mixture, as a speedup
    # (a ratio of the latency table's predictions: the calibration to this run cancels)
    probe, table, space, expected, uniform = _probe(diff_run)
    fastest = min(table.predict_ms(a) for a in space.all_archs())
    limit = fastest + 0.8 * (float(expected(uniform).detach()) - fastest)
    cfg, run = diff_run("differentiable.latency_loss=expected_hinge",
                        f"budget.speedup={probe.latency.teacher_predicted() / limit}",
                        "differentiable.arch_lr=0.3", "differentiable.latency_weight=50")
    study = create_or_load("d", default_storage(cfg.run_dir, "d"), cfg)
    out = differentiable_search(run, study)
    final = _final_probs(cfg, "d", space)
    before, after = (float(expected(p, expected.over(limit))) for p in (uniform, final))
    assert before > 0 and after < 0.5 * before, (before, after)  # the excess is paid down
    assert out["latency_ms"] <= out["budget_ms"]


def test_a_floor_on_the_budgets_use_pulls_a_search_up_into_it(diff_run, monkeypatch):
    """``budget.min_use`` above the uniform mixture's expected latency: the mirrored hinge
    pays the unused share down, and the derived architecture lies in the band. The KD loss is
    zero here (on tiny random data it favours the larger choices anyway), so the latency term
    alone moves the distributions."""
    monkeypatch.setattr(diff_mod, "kd_loss", lambda logits, *args, **kwargs: 0 * logits.sum())
    probe, table, space, expected, uniform = _probe(diff_run)
    slowest = max(table.predict_ms(a) for a in space.all_archs())
    mix = float(expected(uniform).detach())
    use = (mix + 0.5 * (slowest - mix)) / slowest  # halfway from the mixture to the slowest
    cfg, run = diff_run(f"budget.speedup={probe.latency.teacher_predicted() / slowest}",
                        f"budget.min_use={use}", "differentiable.arch_lr=0.3",
                        "differentiable.latency_weight=50")
    study = create_or_load("u", default_storage(cfg.run_dir, "u"), cfg)
    out = differentiable_search(run, study)
    final = _final_probs(cfg, "u", space)
    before, after = (float(expected(p, expected.under(slowest, use))) for p in (uniform, final))
    assert before > 0 and after < 0.5 * before, (before, after)
    assert use * out["budget_ms"] <= out["latency_ms"] <= out["budget_ms"]


def test_the_size_term_pulls_towards_fewer_parameters(diff_run):
    """``size_weight``: the expected parameter count (over the teacher's) falls, the embedding
    narrows, where the latency hinge exerts no pull (the whole space is within the budget)."""
    cfg, run = diff_run("differentiable.size_weight=20", "differentiable.arch_lr=0.3")
    run.meter.close()
    space = run.space
    expected = ExpectedLatency(run.latency.table, space)
    size = expected.grid_of(lambda a: run.params_of(a) / run.teacher_params)
    # at one-hot distributions it is that architecture's parameter count
    one_hot = {n: torch.nn.functional.one_hot(torch.tensor(len(c) - 1), len(c)).double()
               for n, c in expected.dims}
    largest = Supernet(space, run.teacher.model).arch_of({n: len(c) - 1
                                                          for n, c in expected.dims})
    assert float(expected(one_hot, size)) == pytest.approx(
        run.params_of(largest) / run.teacher_params)
    study = create_or_load("s", default_storage(cfg.run_dir, "s"), cfg)
    differentiable_search(run, study)
    history = json.loads((Path(cfg.run_dir) / "s" / "checkpoints" /
                          "differentiable_history.json").read_text())
    first, last = ({n: torch.tensor([h["probs"][n][str(c)] for c in ch])
                    for n, ch in space.choices().items()} for h in (history[0], history[-1]))
    assert float(expected(last, size)) < 0.9 * float(expected(first, size))
    emb = history[-1]["probs"]["embedding_size"]
    assert emb["16"] > emb["hidden"], emb


def test_the_size_term_pulls_only_its_dimensions(diff_run):
    """``size_dims``: the size term's gradient reaches the listed dimensions' logits, exactly as
    the term over every dimension does, and no other dimension's."""
    cfg, run = diff_run()
    run.meter.close()
    expected = ExpectedLatency(run.latency.table, run.space)
    size = expected.grid_of(lambda a: run.params_of(a) / run.teacher_params)
    grads = {}
    for dims in (None, ["embedding_size", "num_hidden_groups"]):
        alpha = ArchParams(expected.dims)
        with torch.no_grad():
            for p in alpha.logits.values():
                p.copy_(torch.linspace(-1.0, 1.0, len(p)))
        value = size_term(expected, alpha.probs(), size, dims)
        value.backward()
        grads[None if dims is None else "ties"] = {n: p.grad for n, p in alpha.logits.items()}
        assert float(value) > 0
    for name in ("embedding_size", "num_hidden_groups"):
        assert grads["ties"][name].abs().sum() > 0, name
        assert torch.allclose(grads["ties"][name], grads[None][name]), name
    for name in ("num_layers", "hidden_size", "intermediate_size"):
        assert grads[None][name].abs().sum() > 0, name  # the full term moves them
        assert grads["ties"][name] is None or not grads["ties"][name].any(), name


def test_the_score_function_moves_the_distributions_to_the_slices_that_lose_less(
        diff_run, monkeypatch):
    """``estimator: reinforce``: each architecture step scores slices drawn from the
    distributions on one dev batch. With a loss that is the slice's layer count (and no
    latency pull: the whole space fits), the mass moves to the fewest layers, and every
    weight step still trains a uniformly drawn slice (``weights: uniform``)."""
    drawn = []
    real_forward = Supernet.forward

    def forward(self, arch, **inputs):
        drawn.append(arch)
        return real_forward(self, arch, **inputs)

    monkeypatch.setattr(Supernet, "forward", forward)
    monkeypatch.setattr(diff_mod, "kd_loss", lambda logits, *args, **kwargs:
                        0 * logits.sum() + drawn[-1].num_layers)
    cfg, run = diff_run("differentiable.estimator=reinforce", "differentiable.weights=uniform",
                        "differentiable.samples=4", "differentiable.arch_lr=0.3",
                        "differentiable.steps=40")
    study = create_or_load("r", default_storage(cfg.run_dir, "r"), cfg)
    out = differentiable_search(run, study)
    final = _final_probs(cfg, "r", run.space)["num_layers"]
    assert final[0] > 0.8, final  # the fewest layers
    assert out["arch"].startswith("L1-"), out
    # 10 warm-up weight steps, then 30 steps of one weight slice and 4 scored slices each
    weights = drawn[10:10 + 5 * 30:5]
    assert len(weights) == 30
    layers = set(run.space.choices()["num_layers"])
    assert len(layers) > 2 and {a.num_layers for a in weights[15:]} == layers  # uniform


@pytest.fixture
def diff_run(project, monkeypatch):
    monkeypatch.chdir(project)

    def make(*overrides):
        cfg = load_config("tiny.yaml", [
            "search.strategy=differentiable", "differentiable.steps=30",
            "differentiable.warmup_steps=10", "differentiable.log_every=5",
            "differentiable.checkpoint_every=10", "differentiable.batch_size=16",
            "budget.speedup=1.0", *overrides])
        return cfg, prepare(cfg, progress=False)
    return make


def _all_mass_on(net: Supernet, pick) -> tuple[ArchParams, ArchConfig]:
    """Architecture parameters with the mass of each dimension on its ``pick`` (max or min)
    choice ("hidden" and "all" above every number), and the architecture they make."""
    alpha = ArchParams(net.dims())
    with torch.no_grad():
        for name, choices in net.dims():
            at = pick(range(len(choices)), key=lambda i: (
                choices[i] in ("hidden", "all"), choices[i] if isinstance(choices[i], int) else 0))
            alpha.logits[name][at] = 5.0
    return alpha, net.arch_of({n: int(p.argmax()) for n, p in alpha.logits.items()})


def test_derivation_respects_the_budget(diff_run):
    cfg, run = diff_run()
    net = Supernet(run.space, run.teacher.model)
    alpha, largest = _all_mass_on(net, max)  # the largest choices
    free = Budget(run.cfg.budget, run.latency, run.params_of, budget_ms=None)
    assert derive(run, net, alpha, free)[0] == largest
    budget = 0.7 * run.latency.ms(largest)
    tight = Budget(run.cfg.budget, run.latency, run.params_of, budget_ms=budget)
    arch, how = derive(run, net, alpha, tight)
    assert arch != largest and run.latency.ms(arch) <= budget and "within the budget" in how
    # no other architecture within the budget is more likely
    lp = {n: p.log_softmax(-1) for n, p in alpha.logits.items()}
    index = {n: {c: i for i, c in enumerate(ch)} for n, ch in net.dims()}

    def logp(a):
        params = diff_mod._params_of(net, a)
        return sum(float(lp[n][index[n][params[n]]]) for n in lp)
    fitting = [a for a in run.space.all_archs() if run.latency.ms(a) <= budget]
    assert logp(arch) == pytest.approx(max(logp(a) for a in fitting))
    # budget.min_use: the mass on the smallest choices, a budget twice the slowest architecture
    # (none near it, so every check is the table's prediction, never a measurement) and the
    # floor mid-way through the space's latencies: the most likely architecture at or above the floor
    small, smallest = _all_mass_on(net, min)
    ms = {a: run.latency.ms(a) for a in run.space.all_archs()}
    roomy = 2 * max(ms.values())
    distinct = sorted(set(ms.values()))
    floor = (distinct[len(distinct) // 2 - 1] + distinct[len(distinct) // 2]) / 2  # none on it
    assert ms[smallest] < floor
    floored = Budget(dataclasses.replace(run.cfg.budget, min_use=floor / roomy), run.latency,
                     run.params_of, budget_ms=roomy)
    arch, how = derive(run, net, small, floored)
    lp = {n: p.log_softmax(-1) for n, p in small.logits.items()}
    assert arch != smallest and ms[arch] >= floor and "within the budget" in how
    assert logp(arch) == pytest.approx(max(logp(a) for a in ms if ms[a] >= floor))


def test_a_killed_search_resumes_at_its_checkpoint_step(diff_run, project, monkeypatch):
    cfg, run = diff_run()
    whole = create_or_load("whole", default_storage(cfg.run_dir, "whole"), cfg)
    full = differentiable_search(run, whole)

    cfg, run = diff_run()
    cut = create_or_load("cut", default_storage(cfg.run_dir, "cut"), cfg)
    folder = project / "runs" / "cut" / "checkpoints" / "differentiable"
    # Ctrl-C (a real SIGINT) right after the step-10 checkpoint is written
    with pytest.raises(KeyboardInterrupt), interrupt_when(lambda: checkpoint_step(folder) == 10):
        differentiable_search(run, cut)
    assert checkpoint_step(folder) in (10, 20)  # the last checkpoint before the interrupt
    cfg, run = diff_run()
    resumed = differentiable_search(run, create_or_load("cut", default_storage(cfg.run_dir, "cut"),
                                                        cfg))
    assert resumed["arch"] == full["arch"]
    a = json.loads((project / "runs" / "whole" / "checkpoints" /
                    "differentiable_history.json").read_text())
    b = json.loads((project / "runs" / "cut" / "checkpoints" /
                    "differentiable_history.json").read_text())
    assert [h["step"] for h in b] == [5, 10, 15, 20, 25, 30]
    for x, y in zip(a, b):  # the same run: same losses and distributions at every log point
        assert x["kd_train"] == pytest.approx(y["kd_train"], rel=1e-4)
        assert x["probs"] == y["probs"]


def test_a_slow_first_teacher_reading_is_tightened_during_the_search(diff_run):
    """The machine was busy when the search measured the teacher (30% slow): the readings at
    the architecture phase's checkpoints tighten the budget, and the derived architecture is
    checked and recorded against the tightest, as an Optuna search's trials are."""
    cfg, run = diff_run()
    true_ms = run.meter.teacher_ms()
    readings = iter([1.3 * true_ms] + [true_ms] * 100)
    run.meter.teacher_ms = lambda: next(readings)
    study = create_or_load("t", default_storage(cfg.run_dir, "t"), cfg)
    out = differentiable_search(run, study)
    assert study.user_attrs["teacher_ms"] == pytest.approx(true_ms)
    assert out["budget_ms"] == pytest.approx(true_ms)  # budget.speedup: 1.0
    (trial,) = study.trials
    assert trial.user_attrs["budget_ms"] == pytest.approx(true_ms)


def test_cli_search_status_export_of_a_differentiable_study(project):
    common = ["--set", "search.strategy=differentiable", "--set", "differentiable.steps=24",
              "--set", "differentiable.warmup_steps=8", "--set", "differentiable.batch_size=16"]
    out = cli_here("search", "--config", "tiny.yaml", "--study", "gumbel", *common, cwd=project).stdout
    assert "derived L" in out and "budget" in out
    study = optuna.load_study(study_name="gumbel",
                              storage=f"sqlite:///{project}/runs/gumbel/study.db")
    (trial,) = study.trials
    assert trial.user_attrs["strategy"] == "differentiable" and trial.constraints["budget"] <= 0
    assert trial.user_attrs["latency_ms"] <= trial.user_attrs["budget_ms"]
    assert set(trial.user_attrs["final_entropy"]) == {"num_layers", "hidden_size",
                                                      "intermediate_size", "embedding_size",
                                                      "num_hidden_groups"}
    assert "best: #0" in cli_here("status", "--study", "gumbel", cwd=project).stdout
    again = cli_here("resume", "--study", "gumbel", cwd=project).stdout  # nothing left to do
    assert len(optuna.load_study(study_name="gumbel", storage=f"sqlite:///{project}/runs/"
                                 "gumbel/study.db").trials) == 1 and "best: #0" in again
    cli_here("export", "--study", "gumbel", "--out", "exp", "--runtimes", "torch", cwd=project)
    report = json.loads((project / "exp" / "report.json").read_text())
    assert report["student"]["arch"] == trial.user_attrs["arch_name"]
    # the export is the extracted supernet slice the trial recorded
    assert report["student"]["dev"]["accuracy"] == pytest.approx(trial.user_attrs["score"])


def test_supernet_proxy_trains_once_and_candidates_inherit_its_slices(diff_run, monkeypatch):
    import tacnas.evaluators.proxy as proxy_mod

    overrides = ("search.strategy=optuna", "proxy.kind=supernet", "proxy.supernet_steps=30",
                 "proxy.steps=5")
    cfg, run = diff_run(*overrides)
    net = run.proxy.supernet(progress=False)
    assert (run.proxy.path / "supernet.safetensors").is_file()
    arch = ArchConfig(2, 48, 3, 64, 16, 1)
    start = run.proxy.initial_model(arch)
    x = torch.randint(5, run.teacher.model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(start(input_ids=x).logits, net.extract(arch)(input_ids=x).logits)
    result, model = run.proxy.evaluate(arch, progress=False)
    assert 0 <= result.score <= 1 and result.curve[-1][0] == 5
    # the same candidate after the global RNG moved (another candidate, a latency measurement)
    # trains to the same weights: dropout is seeded per candidate
    assert model.config.hidden_dropout_prob > 0
    torch.rand(1000)
    twice, model2 = run.proxy.evaluate(arch, progress=False)
    assert twice.score == result.score
    for (name, p), q in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(p, q), name

    # another process (a resumed study, another worker) loads it instead of training again
    calls = {"n": 0}
    real = proxy_mod.kd_loss

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(proxy_mod, "kd_loss", counting)
    _, again = diff_run(*overrides)
    again.proxy.evaluate(arch, progress=False)
    assert calls["n"] == 5  # the candidate's 5 steps; no supernet training

    # proxy.repeats: the candidate trained 3 times, at seeds 0, 1, 2 (batch order and dropout),
    # from the one supernet, and scored by the mean; the first run is the single run above and
    # the model is its model
    seeds, real_batches = [], proxy_mod.shuffled_batches

    def recording(n, batch_size, seed, *a, **k):
        seeds.append(seed)
        return real_batches(n, batch_size, seed, *a, **k)

    monkeypatch.setattr(proxy_mod, "shuffled_batches", recording)
    calls["n"] = 0
    _, thrice = diff_run(*overrides, "proxy.repeats=3", "proxy.eval_every=0")
    assert "the mean of 3 runs" in thrice.proxy.score_name()
    mean, model3 = thrice.proxy.evaluate(arch, progress=False)
    assert calls["n"] == 15 and seeds == [0, 1, 2]
    assert len(mean.repeat_scores) == 3 and mean.repeat_scores[0] == result.score
    assert mean.score == pytest.approx(sum(mean.repeat_scores) / 3)
    assert mean.metrics["accuracy"] == pytest.approx(mean.score)
    assert mean.metrics["n"] == result.metrics["n"] and isinstance(mean.metrics["n"], int)
    for (name, p), q in zip(model.state_dict().items(), model3.state_dict().values()):
        assert torch.equal(p, q), name
    # a lost checkpoint is trained again by the first run alone (export): 5 steps, not 15
    calls["n"] = 0
    again3 = thrice.proxy.repeat(0).evaluate(arch, progress=False)[1]
    assert calls["n"] == 5 and thrice.proxy.repeats == 3
    for (name, p), q in zip(model3.state_dict().items(), again3.state_dict().values()):
        assert torch.equal(p, q), name


def test_differentiable_finalists_are_its_most_likely_re_scored_and_a_stop_resumes(
        tmp_path, monkeypatch):
    """``search.rescore_top_k`` with the differentiable search: its k most likely architectures
    within the budget are recorded and re-scored, the best by the longer score is the pick; a
    search stopped while recording them records only the rest, and trains nothing twice."""
    from tacnas.nas.record import TrialRecord
    from tacnas.nas.study import best_trial, rescored
    from tests.conftest import fake_run, true_score

    def with_finalists():
        run = fake_run(tmp_path, strategy="differentiable")
        run.cfg = dataclasses.replace(run.cfg, search=dataclasses.replace(
            run.cfg.search, rescore_top_k=3, rescore_steps=50))
        return run, create_or_load("fin", default_storage(run.cfg.run_dir, "fin"), run.cfg)

    real = diff_mod._record_one
    calls = []

    def stop_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(args[3].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(diff_mod, "_record_one", stop_after_one)
    run, study = with_finalists()
    with pytest.raises(KeyboardInterrupt):
        differentiable_search(run, study)
    monkeypatch.setattr(diff_mod, "_record_one", real)
    names = study.user_attrs["differentiable_finalists"]
    assert len(names) == 3 and calls == names[:1] and len(study.trials) == 1

    run, study = with_finalists()
    summary = differentiable_search(run, study)
    recs = {t.number: TrialRecord.read(t) for t in study.trials}
    assert sorted(r.arch_name for r in recs.values()) == sorted(names)  # each once
    # they are the most likely architectures within the budget, most likely first
    probs = recs[0].extra["final_probs"]

    def log_p(trial):
        return sum(math.log(probs[d][str(v)]) for d, v in trial.params.items())

    by_name = {r.arch_name: study.trials[n] for n, r in recs.items()}
    chances = [log_p(by_name[n]) for n in names]
    assert chances == sorted(chances, reverse=True)
    budget = Budget.resolve(run, study)
    others = [a for a in run.space.all_archs() if a.name not in names and budget.check(a).fits]
    assert others, "a budget only the finalists fit does not test which ones are likely"
    for a in others:
        p = diff_mod._params_of(Supernet(run.space, run.teacher.model), a)
        assert sum(math.log(probs[d][str(v)]) for d, v in p.items()) <= chances[-1] + 1e-9
    # every finalist re-scored by the longer proxy (the true score here), the best picked
    longer = rescored(study)
    assert set(longer) == set(recs) and len(run.proxy.rescorer.trained) == 3
    assert all(v == pytest.approx(true_score(recs[n].arch)) for n, v in longer.items())
    pick = best_trial(study)
    assert summary["trial"] == pick.number and longer[pick.number] == max(longer.values())
    assert "chosen among the 3 most likely" in summary["derived"]
    # a third run records and trains nothing
    run, study = with_finalists()
    assert differentiable_search(run, study)["trial"] == pick.number
    assert run.proxy.rescorer is None and len(study.trials) == 3


def test_differentiable_finalists_without_the_search_checkpoint_are_a_user_error(tmp_path):
    """A study whose search finished without finalists, resumed with ``search.rescore_top_k``
    after its run folder's checkpoint was deleted: one line naming the study, no traceback."""
    import shutil

    from tacnas.errors import UserError
    from tests.conftest import fake_run

    run = fake_run(tmp_path, strategy="differentiable")
    study = create_or_load("plain", default_storage(run.cfg.run_dir, "plain"), run.cfg)
    differentiable_search(run, study)
    _, alpha = checkpointed(run, study)  # what the search learned, as the trial recorded it
    assert alpha.readable() == study.trials[0].user_attrs["final_probs"]
    shutil.rmtree(tmp_path / "plain" / "checkpoints" / "differentiable")
    with pytest.raises(UserError, match=r"^--study plain: its differentiable search's "
                                        r"checkpoint is gone, so there is no supernet"):
        checkpointed(run, study)
    run = fake_run(tmp_path, strategy="differentiable")
    run.cfg = dataclasses.replace(run.cfg, search=dataclasses.replace(
        run.cfg.search, rescore_top_k=3))
    with pytest.raises(UserError, match=r"^--study plain: its differentiable search's "
                                        r"checkpoint is gone"):
        differentiable_search(run, study)
    assert len(study.trials) == 1 and "differentiable_finalists" not in study.user_attrs


def test_what_the_differentiable_search_may_ship_fits_as_measured(tmp_path):
    """Under a latency table 15% optimistic and no guard band, the most likely architectures
    the table lets in include some over the true budget: each finalist is measured
    (``Budget.confirm``) and recorded as measured, and those over the budget give their place to
    the next most likely."""
    from tacnas.nas.budget import PredictedLatency
    from tacnas.nas.record import TrialRecord
    from tests.conftest import OptimisticTable, fake_run

    run = fake_run(tmp_path, strategy="differentiable", speedup=11.0)
    run.cfg = dataclasses.replace(
        run.cfg, budget=dataclasses.replace(run.cfg.budget, guard_band=0.0),
        search=dataclasses.replace(run.cfg.search, rescore_top_k=4, rescore_steps=50))
    run.latency = PredictedLatency(OptimisticTable(), run.meter)
    study = create_or_load("m", default_storage(run.cfg.run_dir, "m"), run.cfg)
    differentiable_search(run, study)
    budget_ms = study.user_attrs["budget_ms"]
    recs = [TrialRecord.read(t) for t in study.trials]
    names = study.user_attrs["differentiable_finalists"]
    assert sorted(r.arch_name for r in recs) == sorted(names) and len(names) == 4
    for r in recs:
        assert r.latency_source == "measured (finalist, paired)"
        assert r.latency_ms == pytest.approx(run.meter.arch_ms(r.arch))
        assert r.latency_ms <= budget_ms
    # the architectures more likely than the last finalist that the table let in were all
    # measured over the budget, and there were some
    probs = recs[0].extra["final_probs"]
    net = Supernet(run.space, run.teacher.model)

    def log_p(a):
        return sum(math.log(probs[d][str(v)]) for d, v in diff_mod._params_of(net, a).items())

    last = min(log_p(r.arch) for r in recs)
    passed = [a for a in run.space.all_archs() if a.name not in names and log_p(a) > last
              and run.latency.ms(a) <= budget_ms]
    assert passed, "the test needs a likely architecture the table lets in wrongly"
    assert all(run.meter.arch_ms(a) > budget_ms for a in passed)

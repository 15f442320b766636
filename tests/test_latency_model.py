"""The latency table: persistence, refusal elsewhere, real profiling, the differentiable form,
sharing invariance, and the search's guard band."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig

from tacnas.errors import UserError
from tacnas.evaluators.latency import LatencyMeter
from tacnas.evaluators.latency_table import (
    MIN_LAYERS_FOR_MODEL,
    Block,
    LatencyTable,
    arch_blocks,
    device_fingerprint,
    fit_correction,
    fit_layer_model,
    layer_terms,
    teacher_arch,
)
from tacnas.evaluators.profile import ensure_profiled
from tacnas.nas.budget import PredictedLatency
from tacnas.nas.differentiable import ExpectedLatency
from tacnas.nas.optuna_search import run_search
from tacnas.nas.study import create_or_load, default_storage
from tacnas.searchspace.arch import ArchConfig
from tacnas.searchspace.space import SearchSpace
from tests.conftest import OptimisticTable, fake_run

SPACE = SearchSpace(num_layers=(1, 2, 4), hidden_size=(64, 128), intermediate_size=(128, 256),
                    head_size=16, embedding_size=(32, "hidden"), num_hidden_groups=(1, 2, "all"))


def synthetic_table(space: SearchSpace = SPACE, seed: int = 0) -> LatencyTable:
    """Random (positive) block times for every block the space needs."""
    rng = random.Random(seed)
    table = LatencyTable(device_fingerprint(batch_size=1, seq_len=16, threads=1))
    for arch in space.all_archs():
        for block, _ in arch_blocks(arch):
            table.blocks.setdefault(block.key, rng.uniform(0.05, 2.0))
    table.correction = {"bert": [0.2, 1.1], "albert": [0.1, 0.9]}
    return table


def test_table_round_trip(tmp_path):
    table = synthetic_table()
    table.fit_points = {"L1-H64-A4-F128-E64-G1": 1.5}
    table.unit_ms, table.profile_seconds = 0.7, 12.5
    path = tmp_path / "t.json"
    table.save(path)
    back = LatencyTable.load(path, expect=table.fingerprint)
    assert back == table
    for arch in SPACE.all_archs():
        assert back.predict_ms(arch) == table.predict_ms(arch)


def test_table_from_another_device_is_refused(tmp_path):
    table = synthetic_table()
    path = tmp_path / "t.json"
    table.save(path)
    here = {**table.fingerprint, "cpu": "Some Other CPU", "threads": 8}
    with pytest.raises(UserError) as e:
        LatencyTable.load(path, expect=here)
    msg = str(e.value)
    assert "budget.latency_table" in msg and "cpu" in msg and "profile" in msg
    assert "\n" not in msg
    with pytest.raises(UserError, match="not a latency table"):
        (tmp_path / "bad.json").write_text("{}")
        LatencyTable.load(tmp_path / "bad.json", expect=here)


def test_sharing_does_not_change_the_prediction():
    table = synthetic_table()
    for groups in (1, 2):
        shared = ArchConfig(4, 128, 8, 256, 32, groups)
        assert table.predict_ms(shared) == table.predict_ms(ArchConfig(4, 128, 8, 256, 32, 4))
    # ... but a missing block is named, never silently guessed
    with pytest.raises(KeyError, match="embedding:bert:E96:H96"):
        table.predict_ms(ArchConfig(1, 96, 6, 128, 96, 1))


def test_correction_is_chosen_by_leave_one_out():
    xs = [1.0, 2.0, 3.5, 5.0, 8.0]
    how, (c0, c1) = fit_correction(xs, [x + 0.3 for x in xs])  # a fixed overhead
    assert how == "offset" and c0 == pytest.approx(0.3) and c1 == 1.0
    how, (c0, c1) = fit_correction(xs, [0.1 + 1.25 * x for x in xs])  # overhead and a slope
    assert how == "affine" and (c0, c1) == (pytest.approx(0.1), pytest.approx(1.25))
    how, _ = fit_correction(xs, xs)
    assert how == "none"
    how, (c0, c1) = fit_correction(xs, [1.1 * x for x in xs])  # the machine 10% slower
    assert how == "scale" and c0 == 0.0 and c1 == pytest.approx(1.1)


WIDE = SearchSpace(num_layers=(1, 2), hidden_size=(64, 96, 128, 192, 256),
                   intermediate_size=(128, 256, 512, 768, 1024), head_size=32,
                   embedding_size=("hidden",), num_hidden_groups=("all",))


def _layer_blocks(space):
    return {b.key: b for a in space.all_archs() for b, n in arch_blocks(a) if b.kind == "layer"}


def test_layer_model_averages_out_block_noise():
    """Layer times that follow the layer terms, each timed with up to ±15% noise: the fitted
    layer model is closer to the truth than the noisy timings it was fitted on."""
    table = LatencyTable(device_fingerprint(batch_size=4, seq_len=32, threads=1))
    true_coef = [2e-9, 2.5e-9, 4e-9, 1e-7, 5e-8, 3e-8, 0.05]
    rng = random.Random(0)
    truth = {}
    for key, b in _layer_blocks(WIDE).items():
        truth[key] = sum(c * x for c, x in zip(true_coef, layer_terms(b.hidden, b.heads, b.ffn,
                                                                        4, 32)))
        table.blocks[key] = truth[key] * (1 + rng.uniform(-0.15, 0.15))
    assert len(truth) >= MIN_LAYERS_FOR_MODEL
    assert fit_layer_model(table) == {"bert": len(truth)}
    raw = [abs(table.blocks[k] - t) / t for k, t in truth.items()]
    fitted = [abs(table.layer_ms(b, table.blocks[k]) - truth[k]) / truth[k]
              for k, b in _layer_blocks(WIDE).items()]
    assert sum(fitted) / len(fitted) < 0.5 * sum(raw) / len(raw)
    assert all(c >= 0 for c in table.layer_model["bert"])
    # time grows along every dimension of a layer
    ms = lambda h, a, f: table.layer_ms(Block("layer", False, h, heads=a, ffn=f), 0.0)  # noqa: E731
    assert ms(128, 4, 512) < ms(192, 6, 512) and ms(128, 4, 512) < ms(128, 4, 768)


def test_a_class_with_few_profiled_layers_keeps_its_block_times(tmp_path):
    table = synthetic_table()  # 4 layer shapes per class: too few to fit a layer model
    assert fit_layer_model(table) == {} and table.layer_model == {}
    arch = ArchConfig(2, 128, 8, 256, 128, 2)
    layer = table.blocks["layer:bert:H128:A8:F256"]
    c0, c1 = table.coefficients(False)
    assert table.predict_ms(arch) == pytest.approx(
        c0 + c1 * (table.blocks["embedding:bert:E128:H128"] + 2 * layer
                   + table.blocks["head:bert:H128"]))
    # a table saved before the layer model existed is fitted when loaded
    path = tmp_path / "old.json"
    d = synthetic_table(WIDE).to_dict()
    del d["layer_model"]
    path.write_text(json.dumps(d))
    assert LatencyTable.load(path).layer_model.keys() == {"bert"}


def test_expected_latency_equals_the_table_at_one_hot_and_has_a_gradient():
    table = synthetic_table()
    expected = ExpectedLatency(table, SPACE)
    choices = dict(expected.dims)
    for arch in SPACE.all_archs():
        pick = {"num_layers": arch.num_layers, "hidden_size": arch.hidden_size,
                "intermediate_size": arch.intermediate_size,
                "embedding_size": "hidden" if arch.embedding_size == arch.hidden_size
                else arch.embedding_size,
                "num_hidden_groups": "all" if arch.num_hidden_groups == arch.num_layers
                else arch.num_hidden_groups}
        if arch.embedding_size == arch.hidden_size and arch.embedding_size in choices[
                "embedding_size"]:
            continue  # two spellings of one architecture; the other is checked too
        probs = {n: torch.nn.functional.one_hot(torch.tensor(list(c).index(pick[n])),
                                                len(c)).double() for n, c in choices.items()}
        assert expected(probs).item() == pytest.approx(table.predict_ms(arch), rel=1e-12)

    logits = {n: torch.zeros(len(c), dtype=torch.float64, requires_grad=True)
              for n, c in choices.items()}
    start = expected({n: v.softmax(0) for n, v in logits.items()})
    start.backward()
    for name in ("num_layers", "hidden_size", "intermediate_size"):
        assert logits[name].grad.abs().sum() > 0
    opt = torch.optim.SGD(logits.values(), lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        loss = expected({n: v.softmax(0) for n, v in logits.items()})
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * start.item()  # descending the expected latency works
    assert logits["num_layers"].softmax(0).argmax().item() == 0  # toward fewer layers


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """A real table: this machine, batch 4, seq_len 32, one thread, well-separated sizes."""
    space = SearchSpace(num_layers=(1, 3), hidden_size=(64, 256), intermediate_size=(128, 1024),
                        head_size=16, embedding_size=(32, 128, "hidden"),
                        num_hidden_groups=(1, "all"))
    tc = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4,
                    num_attention_heads=16, intermediate_size=1024, num_labels=2)
    meter = LatencyMeter(tc, batch_size=4, seq_len=32, threads=1, warmup=2, repeats=5, rounds=2)
    table = LatencyTable(device_fingerprint(batch_size=4, seq_len=32, threads=1))
    path = tmp_path_factory.mktemp("lat") / "table.json"
    try:
        done = ensure_profiled(table, meter, [*space.all_archs(), teacher_arch(tc)], path=path,
                               fit_per_class=4, progress=False)
        again = ensure_profiled(table, meter, list(space.all_archs()), path=path,
                                progress=False)
        measured = {a: meter.arch_ms(a) for a in (ArchConfig(3, 256, 16, 1024, 256, 3),
                                                  ArchConfig(1, 64, 4, 128, 64, 1))}
    finally:
        meter.close()
    return SimpleNamespace(table=table, path=Path(path), done=done, again=again, space=space,
                           measured=measured)


def test_profile_is_saved_and_reused(profiled):
    assert profiled.done["blocks"] > 0 and profiled.done["whole_models"] > 0
    assert profiled.again["blocks"] == 0 and profiled.again["whole_models"] == 0
    loaded = LatencyTable.load(profiled.path, expect=profiled.table.fingerprint)
    assert loaded.blocks == profiled.table.blocks and loaded.unit_ms > 0
    assert all(v > 0 for v in loaded.blocks.values())


def test_a_real_profile_predicts_every_candidate_of_its_space(profiled):
    """Profiled on this machine: every candidate (and the teacher) is predicted from the
    table's own blocks and correction, positive and finite. How the times compare with each
    other is the latency benchmark's to measure, not a test's (this machine is shared)."""
    table = profiled.table
    for arch in profiled.space.all_archs():
        c0, c1 = table.coefficients(arch.is_albert)
        assert table.predict_ms(arch) == pytest.approx(c0 + c1 * table.block_sum(arch))
        assert 0 < table.predict_ms(arch) < math.inf and c1 > 0
    assert set(table.fit_points) and all(v > 0 for v in profiled.measured.values())


def test_fitted_predictions_grow_with_size_along_every_dimension():
    """Block times proportional to the work, with ±15% noise: after the fit, a bigger
    candidate along any dimension is predicted slower (the non-negative layer terms)."""
    space = SearchSpace(num_layers=(1, 3), hidden_size=(64, 128, 192, 256),
                        intermediate_size=(128, 256, 384, 512, 768, 1024), head_size=16,
                        embedding_size=(32, 128, "hidden"), num_hidden_groups=(1, "all"))
    table = LatencyTable(device_fingerprint(batch_size=4, seq_len=32, threads=1))
    rng = random.Random(0)
    for block in table.missing(space.all_archs()):
        work = layer_terms(block.hidden, block.heads or 1, block.ffn, 4, 32)
        table.blocks[block.key] = (1e-6 * (work[0] + work[1]) + 0.01 * block.hidden / 64
                                   + 0.02) * rng.uniform(0.85, 1.15)
    fit_layer_model(table)
    assert set(table.layer_model) == {"bert", "albert"}
    predict = table.predict_ms
    base = dict(num_layers=1, hidden_size=64, num_heads=4, intermediate_size=128,
                embedding_size=64, num_hidden_groups=1)
    grown = {
        "num_layers": dict(num_layers=3, num_hidden_groups=3),
        "hidden_size": dict(hidden_size=256, num_heads=16, embedding_size=256),
        "intermediate_size": dict(intermediate_size=1024),
    }
    for dim, change in grown.items():
        small, big = ArchConfig(**base), ArchConfig(**{**base, **change})
        assert predict(big) > predict(small), dim


def test_guard_band_measures_candidates_near_the_budget(tmp_path):
    """A table 15% optimistic (``OptimisticTable``): the guard band (25% here) must catch what
    the error would let in."""
    import dataclasses

    run = fake_run(tmp_path, sampler="random", n_trials=12, speedup=3.0)
    run.cfg = dataclasses.replace(
        run.cfg, budget=dataclasses.replace(run.cfg.budget, guard_band=0.25))
    table = OptimisticTable()
    run.meter.teacher_config = BertConfig(hidden_size=128, num_hidden_layers=4,
                                          num_attention_heads=8, intermediate_size=256)
    run.latency = PredictedLatency(table, run.meter)
    study = create_or_load("g", default_storage(run.cfg.run_dir, "g"), run.cfg)
    run_search(run, study, n_trials=12, timeout=None)
    budget = study.user_attrs["budget_ms"]
    checked = [t for t in study.trials if "budget_ms" in t.user_attrs]
    near = [t for t in checked
            if abs(t.user_attrs["predicted_ms"] / t.user_attrs["budget_ms"] - 1) <= 0.25]
    assert near, "the test needs candidates near the budget"
    for t in checked:
        source = t.user_attrs["latency_source"]
        assert (source == "measured (guard band)") == (t in near)
    # only the guard band's candidates were built and measured
    assert {a.name for a in run.meter.measured} == {t.user_attrs["arch_name"] for t in near}
    # nothing trained is over the true budget
    assert all(run.meter.arch_ms(a) <= budget for a in run.proxy.trained)


def _finalist_run(tmp_path, budget="speedup"):
    """A random search of 16 trained candidates, its 4 best re-scored (the fake proxy), under
    a latency table 15% optimistic and no guard band; ``budget``: ``speedup`` (3x, finalists
    measured paired with the teacher) or ``latency_ms`` (the same budget in ms)."""
    import dataclasses

    run = fake_run(tmp_path, sampler="random", n_trials=16, speedup=3.0)
    b = run.cfg.budget
    if budget == "latency_ms":
        b = dataclasses.replace(b, speedup=None, latency_ms=run.meter.teacher_ms() / 3.0)
    run.cfg = dataclasses.replace(
        run.cfg, budget=dataclasses.replace(b, guard_band=0.0),
        search=dataclasses.replace(run.cfg.search, rescore_top_k=4, rescore_steps=50))
    run.meter.teacher_config = BertConfig(hidden_size=128, num_hidden_layers=4,
                                          num_attention_heads=8, intermediate_size=256)
    run.latency = PredictedLatency(OptimisticTable(), run.meter)
    return run, create_or_load("f", default_storage(run.cfg.run_dir, "f"), run.cfg)


@pytest.mark.parametrize("given,source", [("speedup", "measured (finalist, paired)"),
                                          ("latency_ms", "measured (finalist)")])
def test_finalists_are_measured_and_one_over_the_budget_gives_its_place(tmp_path, given,
                                                                         source):
    """``search.rescore_top_k`` under a latency table 15% optimistic and no guard band: the
    search lets in candidates over the true budget; before re-scoring, each finalist is
    measured (paired with the teacher under a speedup budget), one over the budget is not
    re-scored, the next best takes its place, and the pick fits as measured (also after a
    resume, which measures nothing again)."""
    from tacnas.nas.export import search_summary
    from tacnas.nas.study import best_trial, feasible_trained, finalist_ms

    def finalist_run():
        return _finalist_run(tmp_path, given)

    run, study = finalist_run()
    summary = run_search(run, study, n_trials=16, timeout=None)
    budget = study.user_attrs["budget_ms"]
    trained = [t for t in study.trials if t.user_attrs.get("status") == "trained"]
    truth = {t.number: run.meter.arch_ms(ArchConfig.from_name(t.user_attrs["arch_name"]))
             for t in trained}
    assert all(t.user_attrs["latency_source"] == "predicted" for t in trained)
    # the finalists: the proxy's best in order, measured until 4 fit; only they were measured
    ranked = sorted(trained, key=lambda t: (-t.value, t.number))
    measured = finalist_ms(study)
    expect, fits = [], 0
    for t in ranked:
        if fits == 4:
            break
        expect.append(t.number)
        fits += truth[t.number] <= budget
    assert sorted(measured) == sorted(expect)
    assert all(measured[n] == pytest.approx(truth[n]) for n in measured)
    over = {n for n in measured if truth[n] > budget}
    assert over, "the test needs a finalist the table lets in over the true budget"
    assert set(summary["rescored"]) == set(measured) - over and len(summary["rescored"]) == 4
    assert not over & {t.number for t in feasible_trained(study)}
    pick = best_trial(study)
    assert truth[pick.number] <= budget and pick.number in summary["rescored"]
    assert search_summary(study, pick)["search_latency_source"] == source
    # a resumed search measures and re-scores nothing again
    run, study = finalist_run()
    run.meter.measured.clear()
    run_search(run, study, n_trials=16, timeout=None)
    assert run.meter.measured == [] and run.proxy.rescorer is None
    assert best_trial(study).number == pick.number


def test_onnxruntime_backend_runs_the_same_model_and_is_measured(random_teacher, tmp_path):
    pytest.importorskip("onnxruntime", reason="budget.backend onnxruntime needs tacnas[onnx]")
    from tacnas.evaluators.latency import make_runner, model_inputs

    module, inputs = model_inputs(random_teacher, 2, 16)
    ort_logits = make_runner(module, inputs, backend="onnxruntime", threads=1)()[0]
    with torch.inference_mode():
        torch_logits = module(*inputs)
    assert torch.allclose(torch.from_numpy(ort_logits), torch_logits, atol=1e-4)
    # only the latency worker joins ONNX Runtime's process-wide pool: a user's own plain session
    # in this process still runs (with the pool made here, ONNX Runtime refuses it)
    import onnxruntime as ort

    from tacnas.evaluators.runtime import export_module

    plain = ort.InferenceSession(str(export_module(module, inputs, tmp_path / "plain.onnx")),
                                 providers=["CPUExecutionProvider"])
    assert plain.run(None, {i.name: x.numpy() for i, x in zip(plain.get_inputs(), inputs)})

    meter = LatencyMeter(random_teacher.config, batch_size=1, seq_len=16, threads=1, warmup=1,
                         repeats=3, rounds=1, backend="onnxruntime")
    table = LatencyTable(device_fingerprint(batch_size=1, seq_len=16, threads=1,
                                            backend="onnxruntime"))
    space = SearchSpace(num_layers=(1, 2), hidden_size=(32, 64), intermediate_size=(128,),
                        head_size=16)
    try:
        ensure_profiled(table, meter, list(space.all_archs()), fit_per_class=2, progress=False,
                        path=tmp_path / "ort.json")
        big, small = ArchConfig(2, 64, 4, 128, 64, 2), ArchConfig(1, 32, 2, 128, 32, 1)
        assert table.predict_ms(big) > table.predict_ms(small) > 0
        assert meter.arch_ms(big) > 0
    finally:
        meter.close()
    assert table.fingerprint["backend"] == "onnxruntime" and "onnxruntime" in table.fingerprint



def test_several_budgets_at_once_all_hold(tmp_path):
    import dataclasses

    run = fake_run(tmp_path, sampler="random", n_trials=6, speedup=1.5)
    teacher = run.meter.teacher_ms()
    tight = teacher / 3  # tighter than the speedup's teacher / 1.5
    max_params = 60_000
    run.cfg = dataclasses.replace(run.cfg, budget=dataclasses.replace(
        run.cfg.budget, latency_ms=tight, max_params=max_params))
    study = create_or_load("b", default_storage(run.cfg.run_dir, "b"), run.cfg)
    run_search(run, study, n_trials=6, timeout=None)
    assert study.user_attrs["budget_ms"] == pytest.approx(tight)
    assert run.proxy.trained
    for arch in run.proxy.trained:
        assert run.meter.arch_ms(arch) <= tight and run.params_of(arch) <= max_params


def test_a_teacher_read_faster_mid_search_moves_no_finalist_measured_paired(tmp_path):
    """The teacher reads 20% faster from the fourth reading on (a quieter spell of the machine
    for the teacher alone: at batch 32 here the teacher read 215-351 ms within sittings while the
    students moved less). The speedup budget tightens by 20% for the search's checks, but a
    finalist is measured paired with the teacher (its true share of the teacher's time), so
    the finalists between the two budgets are re-scored and one may be the pick, and every
    finalist has at most 1/3 of the teacher's time."""
    from tacnas.nas.study import best_trial, finalist_ms, finalist_source

    run, study = _finalist_run(tmp_path)
    slow, readings = run.meter.teacher_ms, iter(range(10**6))
    true_teacher = slow()
    run.meter.teacher_ms = lambda: slow() * (1.0 if next(readings) < 3 else 0.8)
    summary = run_search(run, study, n_trials=16, timeout=None)
    teacher = study.user_attrs["teacher_ms"]
    assert teacher == pytest.approx(0.8 * true_teacher)
    assert study.user_attrs["budget_ms"] == pytest.approx(teacher / 3.0)
    rescored = set(summary["rescored"])
    assert len(rescored) == 4
    shares = {n: run.meter.arch_ms(ArchConfig.from_name(study.trials[n].user_attrs["arch_name"]))
              / true_teacher for n in rescored}
    assert all(share <= 1 / 3.0 for share in shares.values())
    assert any(share > 0.8 / 3.0 for share in shares.values()), \
        "the test needs a finalist between the two budgets"
    ms = finalist_ms(study)
    assert all(ms[n] == pytest.approx(shares[n] * teacher) for n in rescored)
    assert all(finalist_source(study, n) == "measured (finalist, paired)" for n in rescored)
    assert best_trial(study).number in rescored

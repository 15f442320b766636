from pathlib import Path

import pytest

from tacnas.errors import UserError
from tacnas.nas.config import apply_overrides, config_from_dict, load_config

BASE = dict(task=dict(dataset="x.csv"), teacher=dict(model="t"), budget=dict(speedup=2),
            space=dict(num_layers=[1, 2], hidden_size=[64], intermediate_size=[128]))


@pytest.mark.parametrize("patch, where", [
    ({"bogus": 1}, "bogus: unknown key"),
    ({"space": {**BASE["space"], "hiden_size": [3]}}, "space.hiden_size: unknown key"),
    ({"budget": {"speedup": "fast"}}, "budget.speedup"),
    ({"search": {"n_trials": 2.5}}, "search.n_trials"),
    ({"search": {"sampler": "cmaes"}}, "search.sampler"),
    ({"teacher": {}}, "teacher.model or teacher.finetune_from"),
    ({"budget": {"batch_size": 1}}, "at least one of budget.latency_ms"),
    ({"proxy": {"repeats": 2, "eval_every": 50}}, "proxy.repeats: repeated candidates"),
    ({"proxy": {"repeats": 0}}, "proxy.repeats"),
])
def test_bad_configs_name_the_key(patch, where):
    with pytest.raises(UserError, match=where.replace(".", r"\.")):
        config_from_dict({**BASE, **patch})


def test_overrides_parse_yaml_values(tmp_path):
    data = apply_overrides({"search": {"n_trials": 3}}, ["search.n_trials=7", "proxy.lr=0.001"])
    assert data == {"search": {"n_trials": 7}, "proxy": {"lr": 0.001}}
    with pytest.raises(UserError, match="key=value"):
        apply_overrides({}, ["oops"])


def test_shipped_configs_validate():
    for name in ("demo", "tiny"):
        cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml")
        assert cfg.to_dict()["space"]["num_layers"]


@pytest.mark.parametrize("search", [dict(sampler="nsga2", pruner="hyperband"),
                                    dict(sampler="tpe", multi_objective=True, pruner="median")])
def test_a_pruner_needs_a_single_objective(search):
    with pytest.raises(UserError, match="search.*pruner"):
        config_from_dict({**BASE, "search": search})
    ok = config_from_dict({**BASE, "search": {**search, "pruner": "none"}})
    assert ok.search.pruner == "none"


def test_latency_and_speedup_budgets_together_are_accepted():
    cfg = config_from_dict({**BASE, "budget": dict(speedup=2, latency_ms=5, max_params=10**6)})
    assert (cfg.budget.speedup, cfg.budget.latency_ms, cfg.budget.latency) == (2, 5, "predict")

import optuna
import pytest

from tacnas.errors import UserError
from tacnas.nas.config import config_from_dict
from tacnas.searchspace.arch import ArchConfig, InvalidArch
from tacnas.searchspace.space import SearchSpace


def space(**kw):
    base = dict(num_layers=(1, 2, 4), hidden_size=(32, 64), intermediate_size=(64, 128),
                head_size=16, embedding_size=(16, "hidden"), num_hidden_groups=(1, "all"))
    return SearchSpace(**{**base, **kw})


def test_fixed_trial_rebuilds_every_sampled_architecture():
    sp = space()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        arch = sp.sample(trial)
        assert sp.sample(optuna.trial.FixedTrial(trial.params)) == arch
        assert sp.contains(arch)
        assert arch.head_size == 16
        study.tell(trial, 0.0)


def test_size_counts_distinct_valid_architectures():
    sp = space()
    # 3 layers x 2 hidden x 2 ffn x 2 emb x 2 groups, but L=1 has groups 1 == all
    assert sp.size == 3 * 2 * 2 * 2 * 2 - 2 * 2 * 2
    assert len(set(sp.all_archs())) == sp.size


def test_free_head_count_rejects_combinations_that_do_not_divide():
    sp = space(head_size=None, num_heads=(3, 4), hidden_size=(64,))
    with pytest.raises(InvalidArch, match="not divisible"):
        sp.sample(optuna.trial.FixedTrial({"num_layers": 1, "hidden_size": 64, "num_heads": 3,
                                           "intermediate_size": 64, "embedding_size": "hidden",
                                           "num_hidden_groups": "all"}))
    assert all(a.hidden_size % a.num_heads == 0 for a in sp.all_archs())
    assert sp.size == 3 * 2 * 2 * 2 - 2 * 2  # heads 4 only


def test_groups_must_divide_layers():
    sp = space(num_hidden_groups=(2,))
    archs = list(sp.all_archs())
    assert archs and all(a.num_layers % 2 == 0 for a in archs)


def test_contains_and_smallest():
    sp = space()
    assert not sp.contains(ArchConfig(3, 64, 4, 64, 64, 3))
    small = sp.smallest()
    assert (small.num_layers, small.hidden_size, small.intermediate_size) == (1, 32, 64)


def test_hidden_sizes_must_be_whole_heads():
    with pytest.raises(UserError, match="not divisible by head_size"):
        space(hidden_size=(40,))


def test_config_space_resolves_teacher_head_size():
    cfg = config_from_dict(dict(
        task=dict(dataset="x.csv"), teacher=dict(model="t"), budget=dict(speedup=2),
        space=dict(num_layers=[1], hidden_size=[64, 96], intermediate_size=[64])))
    sp = cfg.space.build(teacher_head_size=32)
    assert [a.num_heads for a in sp.all_archs()] == [2, 3]

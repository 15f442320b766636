import itertools

import pytest
import torch

from tacnas.searchspace.arch import ArchConfig, InvalidArch
from tacnas.searchspace.build import build_student

ARCHS = [
    ArchConfig(2, 64, 4, 128, 64, 2),  # BERT
    ArchConfig(2, 64, 4, 128, 16, 2),  # factorized embedding
    ArchConfig(4, 32, 2, 64, 32, 1),  # all layers share one group
    ArchConfig(4, 48, 3, 96, 24, 2),  # both
]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(hidden_size=60, num_heads=8), "not divisible by num_heads"),
        (dict(num_layers=4, num_hidden_groups=3), "does not divide"),
        (dict(embedding_size=128), "exceeds hidden_size"),
        (dict(num_layers=0), "positive integer"),
    ],
)
def test_validate_names_the_problem(kwargs, fragment):
    base = dict(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128,
                embedding_size=64, num_hidden_groups=2)
    with pytest.raises(InvalidArch, match=fragment):
        ArchConfig(**{**base, **kwargs}).validate()


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_json_round_trip(arch):
    assert ArchConfig.from_json(arch.to_json()) == arch
    with pytest.raises(InvalidArch, match="unknown"):
        ArchConfig.from_dict({**arch.to_dict(), "bogus": 1})


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_param_count_matches_the_built_model(arch, random_teacher):
    model = build_student(arch, random_teacher, init="random")
    assert type(model).__name__ == ("AlbertForSequenceClassification" if arch.is_albert
                                    else "BertForSequenceClassification")
    c = random_teacher.config
    assert arch.num_params(vocab_size=c.vocab_size, num_labels=3,
                           max_position_embeddings=c.max_position_embeddings,
                           type_vocab_size=c.type_vocab_size) == sum(p.numel() for p in model.parameters())


def test_flops_grow_along_every_dimension_and_ignore_sharing():
    base = ArchConfig(2, 64, 4, 128, 64, 2)
    f = base.flops(batch_size=1, seq_len=32)
    for bigger in (ArchConfig(3, 64, 4, 128, 64, 3), ArchConfig(2, 96, 6, 128, 96, 2),
                   ArchConfig(2, 64, 4, 256, 64, 2)):
        assert bigger.flops(batch_size=1, seq_len=32) > f
    assert base.flops(batch_size=4, seq_len=32) == 4 * f
    shared = ArchConfig(2, 64, 4, 128, 64, 1)
    # sharing changes parameters, not compute (only ALBERT's projection is added)
    assert shared.flops(batch_size=1, seq_len=32) == f + 2 * 32 * 64 * 64


def test_flops_match_a_direct_count_of_matmuls():
    arch = ArchConfig(1, 64, 4, 128, 64, 1)
    s = 10
    h, f = 64, 128
    expected = 2 * s * h * h * 4 + 2 * s * h * f * 2 + 2 * 2 * s * s * h + 2 * h * h + 2 * h * 2
    assert arch.flops(batch_size=1, seq_len=s, num_labels=2) == expected


def test_builds_forward_for_every_kind(random_teacher):
    x = torch.randint(0, 99, (2, 7))
    for arch, init in itertools.product(ARCHS, ("random", "teacher")):
        if init == "teacher" and arch.head_size != 16:
            continue
        out = build_student(arch, random_teacher, init=init).eval()(input_ids=x).logits
        assert out.shape == (2, 3) and torch.isfinite(out).all()

"""The weight-sharing supernet: slices equal extracted models, init equals teacher init,
gradients reach only the slice, checkpoints round-trip."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tacnas.errors import UserError
from tacnas.searchspace.arch import ArchConfig
from tacnas.searchspace.build import build_student
from tacnas.searchspace.space import SearchSpace
from tacnas.searchspace.supernet import Supernet

# the random_teacher fixture: 4 layers, hidden 64, 4 heads of 16, FFN 128, vocab 99
SPACE = SearchSpace(num_layers=(1, 2, 4), hidden_size=(32, 48, 64), intermediate_size=(64, 128),
                    head_size=16, embedding_size=(16, 24, "hidden"), num_hidden_groups=(1, "all"))
ARCHS = [ArchConfig(4, 64, 4, 128, 64, 4), ArchConfig(2, 48, 3, 64, 48, 2),
         ArchConfig(4, 32, 2, 128, 16, 4), ArchConfig(4, 64, 4, 64, 24, 1),
         ArchConfig(2, 48, 3, 128, 48, 1), ArchConfig(1, 32, 2, 64, 32, 1)]


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 99, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_a_slice_computes_what_the_extracted_model_computes(random_teacher, arch):
    net = Supernet(SPACE, random_teacher).eval()
    x = _inputs()
    with torch.no_grad():
        sliced = net(arch, **x).logits
        extracted = net.extract(arch)(**x).logits
    assert type(net.extract(arch)).__name__ == ("AlbertForSequenceClassification"
                                               if arch.is_albert else
                                               "BertForSequenceClassification")
    torch.testing.assert_close(sliced, extracted, rtol=0, atol=1e-6)


def test_a_fresh_supernet_is_teacher_initialised(random_teacher):
    """The full slice is the teacher (dims reordered by importance, the same function); a
    narrower full-depth slice keeps the same top-k dims, heads and neurons as build_student."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # distinct LayerNorm scales (a fresh model's are all 1: ties)
        for name, p in random_teacher.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    net = Supernet(SPACE, random_teacher).eval()
    x = _inputs()
    with torch.no_grad():
        full = net(ArchConfig(4, 64, 4, 128, 64, 4), **x).logits
        torch.testing.assert_close(full, random_teacher(**x).logits, rtol=1e-4, atol=1e-5)
        arch = ArchConfig(4, 48, 3, 64, 48, 4)
        built = build_student(arch, random_teacher).eval()(**x).logits
        torch.testing.assert_close(net(arch, **x).logits, built, rtol=1e-4, atol=1e-5)


def test_gradients_reach_only_the_slice_and_weights_are_shared(random_teacher):
    net = Supernet(SPACE, random_teacher)
    small = ArchConfig(2, 32, 2, 64, 32, 2)
    net(small, **_inputs()).logits.sum().backward()
    word = net.word.grad
    assert word[:, :32].abs().sum() > 0 and word[:, 32:].abs().sum() == 0
    used = net.layer_map(small)  # [0, 3]
    fi = net.layers[used[0]].fi_w.grad
    assert fi[:64, :32].abs().sum() > 0 and fi[64:].abs().sum() == 0 and fi[:, 32:].abs().sum() == 0
    assert all(net.layers[i].fi_w.grad is None for i in range(4) if i not in used)
    assert net.f_word.grad is None  # the factorized table is not part of this slice

    # training one slice moves the weights every other slice shares
    big = ArchConfig(4, 64, 4, 128, 64, 4)
    before = net.extract(big).state_dict()["bert.encoder.layer.0.intermediate.dense.weight"]
    with torch.no_grad():
        net.layers[used[0]].fi_w -= 0.1 * net.layers[used[0]].fi_w.grad
    after = net.extract(big).state_dict()["bert.encoder.layer.0.intermediate.dense.weight"]
    assert not torch.equal(before[:64, :32], after[:64, :32])
    assert torch.equal(before[64:], after[64:])


def test_state_round_trips_through_safetensors(random_teacher, tmp_path):
    net = Supernet(SPACE, random_teacher)
    with torch.no_grad():
        net.cls_b += 1.0
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "s.safetensors")
    other = Supernet(SPACE, random_teacher)
    other.load_state_dict(load_file(tmp_path / "s.safetensors"))
    x = _inputs()
    arch = ARCHS[2]
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(arch, **x).logits, net.eval()(arch, **x).logits)


def test_architectures_outside_the_supernet_are_refused(random_teacher):
    net = Supernet(SPACE, random_teacher)
    with pytest.raises(UserError, match="larger than the supernet"):
        net.state(ArchConfig(6, 64, 4, 128, 64, 6))
    with pytest.raises(UserError, match="embedding size"):
        net.state(ArchConfig(2, 64, 4, 128, 32, 2))
    with pytest.raises(UserError, match="exceed the teacher"):
        Supernet(SearchSpace(num_layers=(1,), hidden_size=(128,), intermediate_size=(64,),
                             head_size=16), random_teacher)


def _one_hot(net: Supernet, arch: ArchConfig) -> dict[str, torch.Tensor]:
    want = {"num_layers": arch.num_layers, "hidden_size": arch.hidden_size,
            "intermediate_size": arch.intermediate_size,
            "embedding_size": "hidden" if arch.embedding_size == arch.hidden_size
            else arch.embedding_size,
            "num_hidden_groups": "all" if arch.num_hidden_groups == arch.num_layers
            else arch.num_hidden_groups}
    return {n: torch.tensor([float(c == want[n]) for c in choices], requires_grad=True)
            for n, choices in net.dims()}


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_gated_forward_at_one_hot_gates_is_the_slice(random_teacher, arch):
    net = Supernet(SPACE, random_teacher).eval()
    x = _inputs()
    with torch.no_grad():
        want = net(arch, **x).logits
    gates = _one_hot(net, arch)
    got = net.gated_forward(gates, **x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    got.square().sum().backward()  # every choice's gate of a gated dimension hears the loss
    for name in ("num_layers", "hidden_size", "intermediate_size", "embedding_size"):
        assert (gates[name].grad != 0).sum() >= 2, (name, gates[name].grad)


def test_a_gated_forward_skips_only_layers_that_unlikely_choices_run(random_teacher):
    """With the 1-layer choice nearly certain, the 4-layer choice's extra layers are skipped:
    the logits are the same, the likely choices' gradients too; only the 4-layer gate's
    gradient loses those layers (and the layers' weights get none)."""
    net = Supernet(SPACE, random_teacher).eval()
    arch = ArchConfig(1, 64, 4, 128, 64, 1)
    x = _inputs()
    likely = torch.tensor([0.98, 0.015, 0.005])  # num_layers (1, 2, 4)
    runs = []
    for skip in (0.0, 0.01):
        net.zero_grad()
        gates = _one_hot(net, arch)
        out = net.gated_forward(gates, **x, layer_probs=likely, skip_below=skip)
        out.square().sum().backward()
        runs.append((out.detach(), gates["num_layers"].grad.clone(),
                     [layer.q_w.grad for layer in net.layers]))
    (full, g_full, w_full), (skipped, g_skip, w_skip) = runs
    torch.testing.assert_close(skipped, full)
    # 1 and 2 layers (0.98 + 0.015 run the teacher's first and last) keep their gradient
    torch.testing.assert_close(g_skip[:2], g_full[:2])
    assert g_skip[2] != g_full[2]  # the 4-layer choice lost its middle layers' signal
    assert all(w is not None for w in w_full)
    assert w_skip[1] is None and w_skip[2] is None  # the middle layers did not run

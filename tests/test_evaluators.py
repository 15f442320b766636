import math
import os

import pytest
import torch
from transformers import AutoTokenizer

from tacnas.evaluators.config import TaskConfig
from tacnas.evaluators.data import load_task
from tacnas.evaluators.latency import LatencyMeter, measure_ms
from tacnas.evaluators.proxy import DistillationProxy, Stopped
from tacnas.evaluators.teacher import Teacher, teacher_logits
from tacnas.evaluators.training import kd_loss, shuffled_batches
from tacnas.searchspace.arch import ArchConfig
from tacnas.searchspace.build import build_student
from tests.conftest import alive, children


def test_kd_loss_is_zero_only_when_student_matches_teacher():
    t = torch.randn(8, 3)
    y = torch.randint(0, 3, (8,))
    assert kd_loss(t.clone(), t, y, temperature=2.0, alpha_ce=0.0).abs() < 1e-6
    assert kd_loss(torch.randn(8, 3), t, y, temperature=2.0, alpha_ce=0.0) > 0.01


def test_grouped_batches_cover_an_epoch_with_similar_lengths():
    lengths = torch.randint(3, 60, (640,))
    it = shuffled_batches(640, 32, seed=0, lengths=lengths, group=4)
    batches = [next(it) for _ in range(20)]
    assert sorted(torch.cat(batches).tolist()) == list(range(640))
    spread = sum(int(lengths[b].max() - lengths[b].min()) for b in batches) / 20
    assert spread < 20  # random batches would spread ~50


def _setup(tiny_dir, tiny_teacher, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir / "tiny" / "teacher")
    data = load_task(TaskConfig(dataset=str(tiny_dir / "tiny" / "data.csv"), max_length=32), tok,
                     teacher_config=tiny_teacher.config)
    teacher = Teacher(tiny_teacher, tok, str(tiny_dir / "tiny" / "teacher"), "tiny")
    train = teacher_logits(teacher, data.train, name="train", cache_dir=tmp_path, progress=False)
    dev = teacher_logits(teacher, data.dev, name="dev", cache_dir=tmp_path, progress=False)
    return data, train, dev


def test_teacher_logits_are_cached_on_disk(tiny_dir, tiny_teacher, tmp_path):
    data, train, _ = _setup(tiny_dir, tiny_teacher, tmp_path)
    files = list((tmp_path / "logits").glob("*.safetensors"))
    assert len(files) == 2
    broken = Teacher(None, None, "", "tiny")  # a cache hit never touches the model
    assert torch.equal(teacher_logits(broken, data.train, name="train", cache_dir=tmp_path,
                                      progress=False), train)


def test_distillation_raises_the_dev_score_and_reports_a_curve(tiny_dir, tiny_teacher, tmp_path):
    data, train, dev = _setup(tiny_dir, tiny_teacher, tmp_path)
    proxy = DistillationProxy(teacher=tiny_teacher, data=data, train_logits=train, dev_logits=dev,
                              steps=60, batch_size=32, lr=1e-3, warmup_ratio=0.1, temperature=2.0,
                              alpha_ce=0.5, eval_every=20, init="random", seed=0)
    arch = ArchConfig(1, 32, 2, 64, 32, 1)
    start = proxy.score(build_student(arch, tiny_teacher, init="random", seed=0))["accuracy"]
    reports = []
    result, _ = proxy.evaluate(arch, report=lambda s, v: reports.append((s, v)) and False,
                               progress=False)
    assert [s for s, _ in reports] == [20, 40, 60]
    assert result.score > start + 0.1, (start, result.score)
    with pytest.raises(Stopped) as stopped:  # a pruner's "stop" ends training early
        proxy.evaluate(arch, report=lambda s, v: s >= 20, progress=False)
    assert stopped.value.step == 20


def test_latency_is_measured_in_a_subprocess_and_cached(random_teacher, tmp_path):
    """What the meter guarantees, not how two timings of this shared machine compare."""
    meter = LatencyMeter(random_teacher.config, batch_size=4, seq_len=48, threads=1, warmup=2,
                         repeats=7)
    try:
        small = meter.arch_ms(ArchConfig(1, 32, 2, 64, 32, 1))
        assert 0 < small < math.inf
        assert meter.arch_ms(ArchConfig(1, 32, 2, 64, 32, 1)) == small  # cached
        workers = children(os.getpid())
        assert workers  # measured in the latency subprocess
        assert 0 < meter.teacher_ms() < math.inf  # built from the teacher's config
        random_teacher.save_pretrained(tmp_path / "t")
        assert 0 < meter.folder_ms(tmp_path / "t") < math.inf  # loaded as a user loads it
        ratio, ref_ms = meter.arch_ratio(ArchConfig(1, 32, 2, 64, 32, 1))
        assert ratio > 0 and ref_ms > 0  # one timing against the reference
        share = meter.arch_share(ArchConfig(1, 32, 2, 64, 32, 1))  # paired with the teacher
        assert 0 < share < math.inf
        assert meter.arch_share(ArchConfig(1, 32, 2, 64, 32, 1)) == share  # cached
        assert 0 < meter.arch_share(ArchConfig(1, 32, 2, 64, 32, 1), fresh=True) < math.inf
        assert children(os.getpid()) == workers  # in the same worker, with no new one
    finally:
        meter.close()
    assert not [p for p in workers if alive(p)]  # close() ends the worker
    assert measure_ms(random_teacher, batch_size=1, seq_len=8, threads=1, repeats=3) > 0

"""Final distillation: intermediate losses, training that helps, resume from a checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tacnas.evaluators.metrics import compute_metrics
from tacnas.evaluators.training import predict_logits
from tacnas.nas.config import load_config
from tacnas.nas.distill import (
    TeacherFeatures,
    distill,
    intermediate_losses,
    teacher_targets,
    train_student,
)
from tacnas.nas.pipeline import prepare
from tacnas.searchspace.arch import ArchConfig
from tacnas.searchspace.build import build_student, select_layers, uniform_layers
from tests.conftest import checkpoint_step, interrupt_when

SMALL = ArchConfig(1, 32, 2, 64, 32, 1)


def _outputs(model, batch):
    with torch.no_grad():
        return model(**batch, output_hidden_states=True, output_attentions=True)


def test_intermediate_losses_vanish_when_the_student_is_the_teacher(tiny_teacher):
    c = tiny_teacher.config
    full = ArchConfig(c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
                      c.intermediate_size, c.hidden_size, c.num_hidden_layers)
    teacher = build_student(full, tiny_teacher, init="teacher")  # a copy, to switch to eager
    student = build_student(full, tiny_teacher, init="teacher")
    for m in (teacher, student):
        m.set_attn_implementation("eager")
        m.eval()
    ids = torch.randint(5, c.vocab_size, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    mapping = select_layers(c.num_hidden_layers, c.num_hidden_layers)
    h, a = intermediate_losses(_outputs(student, batch),
                               teacher_targets(_outputs(teacher, batch), mapping),
                               torch.nn.Identity(), mask)
    assert h.item() == pytest.approx(0.0, abs=1e-10) and a.item() == pytest.approx(0.0, abs=1e-10)

    small = build_student(SMALL, tiny_teacher, init="teacher").eval()  # no dropout
    small.set_attn_implementation("eager")
    proj = torch.nn.Linear(SMALL.hidden_size, c.hidden_size)
    targets = teacher_targets(_outputs(teacher, batch), select_layers(c.num_hidden_layers, 1))
    h, a = intermediate_losses(_outputs(small, batch), targets, proj, mask)
    assert h.item() > 0 and a.item() > 0

    # the epoch cache serves the same targets (fp16, trimmed, re-padded), so the same losses
    cache = TeacherFeatures(max_bytes=1e9)
    idx = torch.tensor([7, 3, 11])
    assert cache.get(idx, 12) is None
    cache.put(idx, mask, targets)
    h2, a2 = intermediate_losses(_outputs(small, batch), cache.get(idx, 12), proj, mask)
    assert h2.item() == pytest.approx(h.item(), rel=1e-3)
    assert a2.item() == pytest.approx(a.item(), rel=1e-3)
    full = TeacherFeatures(max_bytes=1000)  # too small for one example: nothing is kept
    full.put(idx, mask, targets)
    assert full.full and full.get(idx, 12) is None


@pytest.fixture
def tiny_run(project, monkeypatch):
    monkeypatch.chdir(project)

    def make(*overrides):
        cfg = load_config("tiny.yaml", ["budget.latency=measure", "distill.eval_every=10",
                                        "distill.checkpoint_every=10", "distill.lr=5e-4",
                                        "distill.hidden_weight=1.0", "distill.attention_weight=1.0",
                                        *overrides])
        return prepare(cfg, progress=False)
    return make


def test_the_uniform_map_matches_the_first_layer_student_against_the_teachers_last(
        tiny_run, project):
    assert uniform_layers(6, 1) == [5] and uniform_layers(6, 2) == [2, 5]
    assert uniform_layers(12, 4) == [2, 5, 8, 11]  # TinyBERT-4 on BERT-base
    assert uniform_layers(2, 4) == [0, 0, 0, 1]  # a deeper student repeats teacher layers
    run = tiny_run("distill.max_steps=2", "distill.patience=0", "distill.attention_weight=0")
    c = run.teacher.model.config
    last = c.num_hidden_layers - 1
    first = ArchConfig(1, c.hidden_size, c.num_attention_heads, c.intermediate_size,
                       c.hidden_size, 1)  # the teacher's first layer at full width
    start = build_student(first, run.teacher.model, init="teacher", layers=[0]).eval()
    batch = run.data.dev.batch(torch.arange(4))
    teacher = run.teacher.model.eval()
    hidden = {}
    for how, want in (("init", [0]), ("uniform", [last])):
        extra = train_student(tiny_run("distill.max_steps=2", "distill.patience=0",
                                       "distill.attention_weight=0",
                                       f"distill.intermediate_map={how}"),
                              first, project / how, layers=[0])
        assert extra["teacher_layers"] == [0] and extra["matched_layers"] == want
        with torch.no_grad():
            targets = teacher_targets(teacher(**batch, output_hidden_states=True), want)
            hidden[how] = intermediate_losses(start(**batch, output_hidden_states=True), targets,
                                              torch.nn.Identity(), batch["attention_mask"])[0]
    # matched against the layer it starts as, its hidden-state loss starts at zero (nothing to
    # learn from it); against the teacher's last layer it is what the student must learn
    assert hidden["init"].item() == pytest.approx(0.0, abs=1e-6)
    assert hidden["uniform"].item() > 1e-3


def test_distillation_raises_the_dev_score_and_writes_a_loadable_folder(tiny_run, project):
    run = tiny_run("distill.max_steps=60", "distill.patience=0")
    start = build_student(SMALL, run.teacher.model, init="teacher")
    before = compute_metrics(predict_logits(start, run.data.dev), run.data.dev.labels)["accuracy"]
    report = distill(run, SMALL, project / "out", runtimes=("torch",))
    after = report["student"]["dev"]["accuracy"]
    assert after > before + 0.05, (before, after)
    assert report["distill"]["steps_run"] == 60 and report["student"]["latency_ms"] > 0
    saved = json.loads((project / "out" / "report.json").read_text())
    assert saved["student"]["arch"] == SMALL.name
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(project / "out")
    assert model.num_parameters() == report["student"]["params"]
    # beside dev accuracy: agreement with the teacher's dev predictions, computed from them
    teacher_pred = run.proxy.dev_logits.argmax(-1)
    agree = (predict_logits(model, run.data.dev).argmax(-1) == teacher_pred).float().mean()
    assert report["student"]["dev"]["agreement"] == pytest.approx(agree.item())


def test_a_killed_distillation_resumes_at_the_checkpoint_step(tiny_run, project, monkeypatch):
    whole = distill(tiny_run("distill.max_steps=40", "distill.patience=0"), SMALL,
                    project / "whole", runtimes=("torch",))

    folder = project / "cut" / "checkpoint"
    # Ctrl-C (a real SIGINT) right after the step-20 checkpoint is written
    with pytest.raises(KeyboardInterrupt), interrupt_when(lambda: checkpoint_step(folder) == 20):
        distill(tiny_run("distill.max_steps=40", "distill.patience=0"), SMALL, project / "cut",
                runtimes=("torch",))
    assert checkpoint_step(folder) in (20, 30)  # the last checkpoint before the interrupt

    resumed = distill(tiny_run("distill.max_steps=40", "distill.patience=0"), SMALL,
                      project / "cut", runtimes=("torch",))
    assert resumed["distill"]["steps_run"] == 40
    assert resumed["distill"]["curve"] == whole["distill"]["curve"]  # same scores, same steps
    a = load_file(project / "whole" / "checkpoint" / "weights.safetensors")
    b = load_file(project / "cut" / "checkpoint" / "weights.safetensors")
    # attention key biases get a zero gradient in exact arithmetic (softmax is shift-invariant):
    # Adam turns float noise into their updates, and they cannot change any output
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a if "key.bias" not in k)


def test_a_gpu_the_machine_lacks_is_refused_naming_distill_device(tiny_run, project):
    import torch

    from tacnas.errors import UserError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: distill.device: cuda is valid here")
    run = tiny_run("distill.max_steps=5", "distill.device=cuda")
    with pytest.raises(UserError, match=r"^distill\.device: cuda is not available"):
        distill(run, SMALL, project / "out", runtimes=("torch",))
    assert not (project / "out" / "best").exists()
    with pytest.raises(Exception, match="device"):
        tiny_run("distill.device=tpu")  # not a device torch trains on here


def test_a_checkpoint_killed_at_any_point_of_its_swap_reads_and_saves_again(tmp_path):
    from tacnas.evaluators.checkpoint import read_state, resume, save_checkpoint

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    folder = tmp_path / "checkpoint"
    old = tmp_path / "checkpoint.old"

    def save(step):
        save_checkpoint(folder, modules={"net": net}, objects={"opt": opt}, state={"step": step})

    save(1)
    save(2)
    # killed while the replaced checkpoint was being removed: part of it left beside the new one
    old.mkdir()
    (old / "net.safetensors").write_bytes(b"partial")
    assert read_state(folder) == {"step": 2} and not old.exists()
    old.mkdir()
    (old / "state.json").write_text('{"step": 1}')
    save(3)  # the next save is not stopped by it
    assert read_state(folder) == {"step": 3} and not old.exists()
    # killed between the two renames: only the old one is complete, and it is put back
    folder.rename(old)
    assert resume(folder, modules={"net": net}, objects={"opt": opt}) == {"step": 3}
    save(4)
    assert read_state(folder) == {"step": 4} and not old.exists()


def test_an_early_stopped_distillation_run_again_is_done(tiny_run, project):
    # no learning (lr ~0): the second evaluation brings nothing, and patience 1 stops it there
    run = tiny_run("distill.max_steps=100", "distill.eval_every=5", "distill.patience=1",
                   "distill.lr=1e-12", "distill.hidden_weight=0", "distill.attention_weight=0")
    first = train_student(run, SMALL, project / "out")
    assert first["early_stopped"] and first["steps_run"] == 10
    again = train_student(run, SMALL, project / "out")
    assert again["early_stopped"] and again["steps_run"] == 10
    assert again["train_seconds"] == first["train_seconds"]


def test_a_finalist_below_the_lead_stops_there_and_resumes_only_when_the_lead_is_gone(
        tiny_run, project):
    run = tiny_run("distill.max_steps=40", "distill.patience=0", "distill.hidden_weight=0",
                   "distill.attention_weight=0")
    whole = train_student(run, SMALL, project / "whole")
    assert whole["pruned_at"] is None and whole["steps_run"] == 40
    at20 = dict(whole["curve"])[20]
    # a lead no student can keep up with at step 20 (one above its own score there); none at 10
    lead = {10: -1.0, 20: at20 + 1e-6, 30: -1.0}
    first = train_student(run, SMALL, project / "cut", prune_below=lead)
    assert first["pruned_at"] == 20 and first["steps_run"] == 20
    assert not first["early_stopped"] and first["curve"] == whole["curve"][:2]
    # the same lead: pruned, nothing trained again
    again = train_student(run, SMALL, project / "cut", prune_below=lead)
    assert again["pruned_at"] == 20 and again["steps_run"] == 20
    assert again["train_seconds"] == first["train_seconds"]
    # a lead it keeps up with (or none): it goes on from its checkpoint, as if never stopped
    on = train_student(run, SMALL, project / "cut", prune_below={20: at20 - 0.01})
    assert on["pruned_at"] is None and on["steps_run"] == 40
    assert on["curve"] == whole["curve"]

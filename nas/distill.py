"""Final distillation of a chosen student: train it properly, not for the proxy's few steps.

Teacher-initialised (as in the search); loss = T²·KL(teacher_T ‖ student_T) + alpha_ce·CE, plus,
optionally, TinyBERT's intermediate-layer transfer: hidden states (embedding output and each
student layer against its mapped teacher layer, through one learned projection where the widths
differ) and attention maps (averaged over heads, so any head counts match; both models run with
``attn_implementation="eager"``, since sdpa returns no attention maps in transformers 5). The
layer mapping (``distill.intermediate_map``) is by default the one teacher initialisation used:
student layer i <- teacher layer ``select_layers(teacher_layers, student_layers)[i]``, or the
``layers`` given (e.g. DistilBERT's every other layer); ``uniform`` is TinyBERT's m * N / M, the
student's last layer against the teacher's last whatever the student starts from.

Learning-rate warm-up and linear decay; dev score every ``eval_every`` steps with early stopping
after ``patience`` evaluations without improvement (the best model is what is written);
``distill.device`` trains the student on a GPU where there is one (the teacher's logits come from
the cache; the teacher itself moves there only for intermediate losses). Checkpoints every
``checkpoint_every`` steps (weights in safetensors, optimizer state loaded with
``weights_only=True``), and a killed run resumes from the last one at the same step and the same
batch order. Teacher logits come from the cache the search built; the teacher's hidden states
and attention maps (only with intermediate losses) are computed in the first epoch and kept in
memory for the later ones (the mapped layers only, fp16, trimmed to each example's length, up to
``distill.feature_cache_gb``).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from tacnas.errors import UserError
from tacnas.evaluators.checkpoint import read_state, resume, save_checkpoint
from tacnas.evaluators.metrics import compute_metrics
from tacnas.evaluators.training import (
    kd_loss,
    make_optimizer,
    optimizer_step,
    predict_logits,
    shuffled_batches,
)
from tacnas.searchspace.arch import ArchConfig
from tacnas.searchspace.build import build_student, student_layers, uniform_layers

if TYPE_CHECKING:  # the training loop runs without the pipeline (benchmarks/on_device.py)
    from tacnas.nas.pipeline import Run

log = logging.getLogger(__name__)


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the real (unpadded) tokens of ``(batch, seq, ...)`` tensors."""
    m = mask.to(a.dtype)
    while m.dim() < a.dim():
        m = m.unsqueeze(-1)
    per = (a - b) ** 2 * m
    return per.sum() / (m.sum() * (a[0, 0].numel() if a.dim() > 2 else 1)).clamp_min(1)


def teacher_targets(teacher_out, mapping: list[int]) -> tuple[list | None, list | None]:
    """What the student is matched against: the teacher's embedding output and the hidden state
    of each mapped layer; the head-averaged attention map of each mapped layer (None: not asked)."""
    hidden = attn = None
    if teacher_out.hidden_states is not None:
        th = teacher_out.hidden_states
        hidden = [th[0]] + [th[t + 1] for t in mapping]
    if teacher_out.attentions is not None:
        attn = [teacher_out.attentions[t].mean(1) for t in mapping]  # (batch, seq, seq)
    return hidden, attn


def intermediate_losses(student_out, targets: tuple[list | None, list | None], projection,
                        mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden-state loss, attention loss) against ``teacher_targets``; zero where not asked."""
    t_hidden, t_attn = targets
    zero = student_out.logits.new_zeros(())
    hidden = attn = zero
    if student_out.hidden_states is not None and t_hidden is not None:
        sh = student_out.hidden_states
        hidden = sum(_masked_mse(projection(s), t, mask) for s, t in zip(sh, t_hidden, strict=True))
        hidden = hidden / len(t_hidden)
    if student_out.attentions is not None and t_attn is not None:
        key = mask[:, None, :].to(t_attn[0].dtype)  # attention over padded keys is zero anyway
        losses = [_masked_mse(s.mean(1) * key, t * key, mask)
                  for s, t in zip(student_out.attentions, t_attn, strict=True)]
        attn = sum(losses) / len(losses)
    return hidden, attn


class TeacherFeatures:
    """The teacher's intermediate targets per training example (trimmed to its real length,
    fp16), kept in memory up to ``max_bytes``: the first epoch computes them, later epochs read
    them instead of running the teacher again. Examples past the cap are computed every time."""

    def __init__(self, max_bytes: float):
        self.max_bytes, self.bytes, self.full = max_bytes, 0, False
        self.store: dict[int, tuple[list | None, list | None]] = {}

    @staticmethod
    def rounded(targets):
        """Targets at the cache's precision. Fresh targets are rounded too, so a batch sees the
        same targets whether it was cached or not (and a resumed run, whose cache starts empty,
        repeats an uninterrupted one)."""
        return tuple(None if ts is None else [t.half().float() for t in ts] for ts in targets)

    def get(self, idx: torch.Tensor, seq_len: int) -> tuple[list | None, list | None] | None:
        rows = [self.store.get(int(i)) for i in idx]
        if any(r is None for r in rows):
            return None
        hidden, attn = rows[0]

        def stack(k: int, j: int, square: bool):
            first = rows[0][k][j]
            shape = (len(rows), seq_len, seq_len) if square else (len(rows), seq_len,
                                                                  first.shape[-1])
            out = torch.zeros(shape)
            for b, r in enumerate(rows):
                x = r[k][j]
                if square:
                    out[b, :x.shape[0], :x.shape[1]] = x
                else:
                    out[b, :x.shape[0]] = x
            return out

        return ([stack(0, j, False) for j in range(len(hidden))] if hidden is not None else None,
                [stack(1, j, True) for j in range(len(attn))] if attn is not None else None)

    def put(self, idx: torch.Tensor, mask: torch.Tensor, targets) -> None:
        if self.full:
            return
        hidden, attn = targets
        for b, i in enumerate(idx.tolist()):
            n = int(mask[b].sum())
            h = [t[b, :n].half().cpu() for t in hidden] if hidden is not None else None
            a = [t[b, :n, :n].half().cpu() for t in attn] if attn is not None else None
            size = sum(x.numel() * 2 for x in (h or []) + (a or []))
            if self.bytes + size > self.max_bytes:
                self.full = True
                log.info("teacher feature cache full at %.2f GB (distill.feature_cache_gb): "
                         "the remaining examples run the teacher every epoch", self.bytes / 1e9)
                return
            self.store[i] = (h, a)
            self.bytes += size


def _distill_settings(run: Run) -> dict:
    d = run.cfg.distill
    n = len(run.data.train)
    per_epoch = max(1, n // d.batch_size)
    total = d.max_steps or max(1, math.ceil(d.epochs * per_epoch))
    return {"total": total, "per_epoch": per_epoch}


def device_of(name: str) -> torch.device:
    """``distill.device`` as a torch device; a GPU this machine lacks is the user's mistake."""
    dev = torch.device(name)
    if dev.type == "cuda" and (not torch.cuda.is_available()
                               or (dev.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"distill.device: {name} is not available here (torch sees "
                        f"{torch.cuda.device_count()} CUDA devices); set distill.device: cpu")
    return dev


def distill(run: Run, arch: ArchConfig, out: Path, *, label: str = "student (distilled)",
            search: dict | None = None, budget_ms: float | None = None,
            layers: list[int] | None = None, runtimes: tuple[str, ...] | None = None) -> dict:
    """Train ``arch`` fully and write ``out`` as export does. Resumes from ``out/checkpoint``.
    ``layers``: the teacher layer each student layer starts from (default: spread over the
    teacher's depth, as in the search) and, under the default ``distill.intermediate_map``, is
    matched against."""
    from transformers import AutoModelForSequenceClassification

    from tacnas.nas.export import check_out, write_folder

    check_out(out)
    if not run.space.contains(arch):
        log.warning("%s is not in the config's space; distilling it anyway", arch.name)
    extra = train_student(run, arch, out, layers=layers)
    best = AutoModelForSequenceClassification.from_pretrained(out / "best").eval()
    return write_folder(run, best, arch, out, label=label, budget_ms=budget_ms, search=search,
                        title=f"distilled {arch.name}", extra={"distill": extra},
                        lr_key="distill.lr", runtimes=runtimes)


def train_student(run, arch: ArchConfig, out: Path, *, layers: list[int] | None = None,
                  prune_below: dict[int, float] | None = None) -> dict:
    """The training loop of ``distill``: the best student (on dev) is saved to ``out/best``;
    returns the recipe and its curve. ``run`` needs only ``cfg.distill``, ``cfg.seed``,
    ``cfg.proxy.init``, ``data``, ``teacher.model``, ``proxy.train_logits`` and ``progress``.
    ``prune_below``: step -> dev score; an evaluation at that step scoring below it stops the
    run as pruned (``pruned_at`` in the result and the checkpoint: a resume under which that
    score is still below trains no more; one under another lead, or none, trains on)."""
    d, data, teacher = run.cfg.distill, run.data, run.teacher.model
    dev = device_of(d.device)
    if d.hidden_weight or d.attention_weight:
        if teacher.config.model_type != "bert" or run.cfg.proxy.init != "teacher":
            raise UserError("distill.hidden_weight/attention_weight: intermediate transfer needs a "
                            "BERT teacher and proxy.init: teacher; set both weights to 0")
    torch.manual_seed(run.cfg.seed)
    mapping = student_layers(arch, teacher.config.num_hidden_layers, layers)
    model = build_student(arch, teacher, init=run.cfg.proxy.init, seed=run.cfg.seed,
                          layers=mapping)
    intermediate = bool(d.hidden_weight or d.attention_weight)
    # the teacher layers the intermediate losses match (the start's, or TinyBERT's uniform map)
    matched = (uniform_layers(teacher.config.num_hidden_layers, arch.num_layers)
               if d.intermediate_map == "uniform" else mapping) if intermediate else None
    if d.attention_weight > 0:
        model.set_attn_implementation("eager")
        teacher.set_attn_implementation("eager")
    t_hidden = teacher.config.hidden_size
    projection = (torch.nn.Linear(arch.hidden_size, t_hidden) if arch.hidden_size != t_hidden
                  else torch.nn.Identity())
    params = torch.nn.ModuleList([model, projection]).to(dev)
    plan = _distill_settings(run)
    total = plan["total"]
    opt, sched = make_optimizer(params, lr=d.lr, steps=total, warmup_ratio=d.warmup_ratio)

    ckpt = out / "checkpoint"
    state = _resume(ckpt, {"step": 0, "best": None, "best_step": 0, "bad": 0, "curve": [],
                           "seconds": 0.0, "arch": arch.name, "total": total, "layers": mapping,
                           "matched": matched},
                    modules={"weights": params}, objects={"optimizer": opt, "scheduler": sched})
    best_dir = out / "best"

    batches = shuffled_batches(len(data.train), d.batch_size, run.cfg.seed, data.train.lengths,
                               start=state["step"])  # the batch order of an uninterrupted run
    bar = tqdm(total=total, initial=state["step"], desc=f"distill {arch.name}", unit="step",
               disable=not run.progress)
    start = time.perf_counter() - state["seconds"]
    params.train()
    teacher.eval()
    teacher_device = next(teacher.parameters()).device
    if intermediate:
        teacher.to(dev)
    if (at := state.get("pruned_at")) and not fell_behind(
            [p for p in state["curve"] if p[0] == at], prune_below):
        del state["pruned_at"]  # pruned against a lead it now keeps up with (or none): go on
    features = TeacherFeatures(d.feature_cache_gb * 1e9)
    try:
        # a run that stopped early (patience) or was pruned is done
        while state["step"] < total and not _done(state):
            idx = next(batches)
            loss = _loss(run, model, projection, features, idx, matched, dev)
            optimizer_step(loss, opt, params=params.parameters(), scheduler=sched,
                           lr_key="distill.lr")
            state["step"] += 1
            bar.update(1)
            step = state["step"]
            if step % d.eval_every == 0 or step == total:
                early = _evaluate(run, model, state, best_dir)
                if fell_behind(state["curve"][-1:], prune_below):
                    log.info("%s pruned at step %d: dev %.4f, below %.4f", arch.name, step,
                             state["curve"][-1][1], prune_below[step])
                    state["pruned_at"] = step
                state["early_stopped"] = early and not state.get("pruned_at")
                bar.set_postfix(loss=f"{loss.item():.3f}", dev=f"{state['curve'][-1][1]:.4f}",
                                best=f"{state['best']:.4f}")
            if step % d.checkpoint_every == 0 or step == total or _done(state):
                state["seconds"] = time.perf_counter() - start
                save_checkpoint(ckpt, modules={"weights": params},
                                objects={"optimizer": opt, "scheduler": sched}, state=state)
    finally:
        if intermediate:
            teacher.to(teacher_device)
    bar.close()
    if state.get("early_stopped"):
        log.info("early stop at step %d: no dev improvement in %d evaluations (best %.4f at %d)",
                 state["step"], d.patience, state["best"], state["best_step"])
    return {**_plain(d), "steps_run": state["step"], "planned_steps": total,
            "teacher_layers": mapping, "matched_layers": matched,
            "best_step": state["best_step"], "pruned_at": state.get("pruned_at"),
            "early_stopped": bool(state.get("early_stopped")),
            "curve": state["curve"], "train_seconds": state["seconds"]}


def _done(state: dict) -> bool:
    return bool(state.get("early_stopped") or state.get("pruned_at"))


def lead_of(curves, margin: float) -> dict[int, float]:
    """``search.rescore_prune``'s bar: step -> the best dev score the ``curves`` (each
    ``[(step, score)]``, the finished finalists') had at that step, less ``margin``."""
    lead: dict[int, float] = {}
    for curve in curves:
        for step, score in curve:
            lead[step] = max(lead.get(step, score), score)
    return {step: score - margin for step, score in lead.items()}


def fell_behind(curve, prune_below: dict[int, float] | None) -> int | None:
    """The first step of ``curve`` whose score is below ``prune_below``'s at that step (a
    finalist pruned there), or None."""
    return next((step for step, score in curve
                 if prune_below and step in prune_below and score < prune_below[step]), None)


def _plain(d) -> dict:
    """The distill settings as a dict (a pydantic dataclass or a plain namespace)."""
    import dataclasses

    return dataclasses.asdict(d) if dataclasses.is_dataclass(d) else dict(vars(d))


def _loss(run: Run, model, projection, features: TeacherFeatures, idx: torch.Tensor,
          mapping: list[int], dev: torch.device) -> torch.Tensor:
    """The batch's KD loss, plus TinyBERT's hidden-state and attention transfer if asked."""
    d, data, teacher = run.cfg.distill, run.data, run.teacher.model
    use_hidden, use_attn = d.hidden_weight > 0, d.attention_weight > 0
    batch = {k: v.to(dev) for k, v in data.train.batch(idx).items()}
    s_out = model(**batch, output_hidden_states=use_hidden, output_attentions=use_attn)
    loss = kd_loss(s_out.logits, run.proxy.train_logits[idx].to(dev),
                   data.train.labels[idx].to(dev), temperature=d.temperature,
                   alpha_ce=d.alpha_ce)
    if not (use_hidden or use_attn):
        return loss
    mask = batch["attention_mask"]
    targets = features.get(idx, mask.shape[1])
    if targets is not None:
        targets = tuple(None if ts is None else [t.to(dev) for t in ts] for ts in targets)
    else:
        with torch.no_grad():
            targets = features.rounded(teacher_targets(
                teacher(**batch, output_hidden_states=use_hidden, output_attentions=use_attn),
                mapping))
        features.put(idx, mask, targets)
    h, a = intermediate_losses(s_out, targets, projection, mask)
    return loss + d.hidden_weight * h + d.attention_weight * a


def _evaluate(run: Run, model, state: dict, best_dir: Path) -> bool:
    """Score on dev; keep the best model; True when ``patience`` evaluations brought nothing."""
    d, data = run.cfg.distill, run.data
    score = compute_metrics(predict_logits(model, data.dev), data.dev.labels)[data.metric]
    state["curve"].append([state["step"], score])
    stopped = False
    if state["best"] is None or score > state["best"]:
        state.update(best=score, best_step=state["step"], bad=0)
        model.save_pretrained(best_dir)
    else:
        state["bad"] += 1
        stopped = d.patience > 0 and state["bad"] >= d.patience
    model.train()
    return stopped


def _resume(ckpt: Path, fresh: dict, *, modules: dict, objects: dict) -> dict:
    """The checkpoint's state (weights, optimizer and RNG loaded), or ``fresh``; a checkpoint
    of another student, length, layer mapping or matched layers is refused."""
    saved = read_state(ckpt)
    if saved is None:
        return fresh
    keys = ("arch", "total", "layers", "matched")
    kept = {"matched": fresh["matched"], **saved}  # one written before "matched" was kept: as now
    if [kept.get(k) for k in keys] != [fresh[k] for k in keys]:
        raise UserError(f"--out {ckpt.parent}: holds a checkpoint of {saved.get('arch')} "
                        f"({saved.get('total')} steps, teacher layers {saved.get('layers')}, "
                        f"matched against {saved.get('matched')}); use another --out or delete it")
    saved = resume(ckpt, modules=modules, objects=objects)
    if saved is None:
        return fresh
    log.info("resuming %s from step %d of %d", fresh["arch"], saved["step"], fresh["total"])
    return saved

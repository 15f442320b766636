"""The training toolkit of every trainer (teacher fine-tuning, the distillation proxy, the
supernet, the differentiable search, the final distillation): one resumable batch stream, one
KD loss, one optimizer step."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers import get_linear_schedule_with_warmup

from tacnas.errors import UserError
from tacnas.evaluators.data import Split


def shuffled_batches(n: int, batch_size: int, seed: int, lengths: torch.Tensor | None = None,
                     group: int = 50, *, start: int = 0) -> Iterator[torch.Tensor]:
    """Index batches forever, reshuffled every epoch by a seeded generator; ``start`` skips
    that many batches, so a resumed run sees the batches an uninterrupted one would.

    With ``lengths``, each run of ``group`` batches is sorted by length before it is cut into
    batches (then the batches are shuffled): rows of a batch have similar lengths, so dynamic
    padding pads little. Batches stay random in content, as in transformers' group_by_length.
    """
    stream = _batches(n, batch_size, seed, lengths, group)
    for _ in range(start):
        next(stream)
    return stream


def _batches(n, batch_size, seed, lengths, group) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        batches = []
        for i in range(0, n, batch_size * group):
            chunk = perm[i:i + batch_size * group]
            if lengths is not None:
                chunk = chunk[torch.argsort(lengths[chunk], descending=True, stable=True)]
            batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
        if n >= batch_size:  # drop ragged batches (at most one per group)
            batches = [b for b in batches if len(b) == batch_size]
        for k in torch.randperm(len(batches), generator=g).tolist():
            yield batches[k]


class Diverged(UserError):
    """Training produced a non-finite loss, gradient, weight or output: nothing it made can be
    used. The message names the learning rate to lower."""


def optimizer_step(loss: torch.Tensor, optimizer, *, params=None, scheduler=None,
                   max_norm: float | None = 1.0, lr_key: str = "the learning rate") -> None:
    """The one update every trainer makes: backward, clip the gradient norm of ``params`` to
    ``max_norm`` (None: no clipping), step, advance the schedule, clear the gradients. A
    non-finite loss or gradient raises ``Diverged`` before the weights are touched."""
    if not torch.isfinite(loss.detach()).all():
        raise Diverged(f"{lr_key}: training diverged (loss {loss.item()}); lower {lr_key}")
    loss.backward()
    if max_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            raise Diverged(f"{lr_key}: training diverged (gradient norm {norm.item()}); "
                           f"lower {lr_key}")
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def check_finite(model, *, what: str, lr_key: str = "the learning rate") -> None:
    """Raise ``Diverged`` if any weight of ``model`` is NaN or infinite."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
    if bad:
        raise Diverged(f"{lr_key}: {what} has non-finite weights ({len(bad)} tensors, e.g. "
                       f"{bad[0]}): the training diverged; lower {lr_key}")


def make_optimizer(model, *, lr: float, steps: int, warmup_ratio: float, weight_decay: float = 0.01):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
    )
    sched = get_linear_schedule_with_warmup(opt, int(warmup_ratio * steps), steps)
    return opt, sched


@torch.inference_mode()
def predict_logits(model, split: Split, *, batch_size: int = 256, progress=None) -> torch.Tensor:
    """Logits for every row of ``split``; rows are run sorted by length (little padding)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device  # batches go where the model is; logits come back
    order = torch.argsort(split.lengths, descending=True)
    out = torch.empty(len(split), model.config.num_labels)
    for i in range(0, len(split), batch_size):
        idx = order[i:i + batch_size]
        batch = {k: v.to(dev) for k, v in split.batch(idx).items()}
        out[idx] = model(**batch).logits.float().cpu()
        if progress is not None:
            progress.update(len(idx))
    model.train(was_training)
    return out


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha_ce: float,
) -> torch.Tensor:
    """Hinton et al.: T² · KL(teacher_T || student_T) + alpha · CE(student, labels); for
    regression (one output) MSE to the teacher's output + alpha · MSE to the labels."""
    if student_logits.shape[-1] == 1:
        s = student_logits[:, 0]
        loss = F.mse_loss(s, teacher_logits[:, 0].to(s.dtype))
        return loss + alpha_ce * F.mse_loss(s, labels.to(s.dtype)) if alpha_ce else loss
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=-1),
        F.log_softmax(teacher_logits / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    loss = kl * t * t
    if alpha_ce:
        loss = loss + alpha_ce * F.cross_entropy(student_logits, labels)
    return loss

"""Task metrics on dev/test logits (scikit-learn does the arithmetic), each with its standard
error on that split.

The standard error of a classification metric is the bootstrap's: every metric here (accuracy,
macro-F1, MCC, agreement with the teacher) is a function of the counts of (label, prediction,
teacher prediction) cells, so resampling the examples with replacement is resampling those
counts from a multinomial — 2,000 resamples cost microseconds, whatever the split's size.
Pearson and Spearman use Fisher's z: ``(1 - r^2) / sqrt(n - 3)``. A difference between two
candidates smaller than about twice these is not a ranking (``overlapping``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

# The worst value each metric can take: the objective value recorded for an untrained candidate.
WORST = {"accuracy": 0.0, "f1_macro": 0.0, "mcc": -1.0, "pearson": -1.0, "spearman": -1.0,
         "agreement": 0.0}
BOOTSTRAP = 2000  # resamples behind each classification standard error
Z95 = 1.96  # a 95% interval is the score +- Z95 standard errors


def worst(cfg) -> float:
    """The objective value of an untrained candidate under ``cfg`` (a RunConfig)."""
    return WORST["agreement" if cfg.proxy.objective == "agreement" else cfg.task.metric]


def _finite(x: float) -> float:
    return 0.0 if math.isnan(x) else float(x)  # a constant prediction has no correlation


def se_key(metric: str) -> str:
    """Where a metrics dict keeps ``metric``'s standard error."""
    return f"{metric}_se"


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, teacher_logits=None) -> dict:
    """Classification metrics, or (one output column) regression's Pearson and Spearman; each
    with its standard error (``<metric>_se``) and the number of examples ``n``."""
    n = int(labels.shape[0])
    if logits.shape[-1] == 1:
        pred, y = logits[:, 0].double().numpy(), labels.double().numpy()
        out = {"pearson": _finite(pearsonr(pred, y)[0]), "spearman": _finite(spearmanr(pred, y)[0])}
        if teacher_logits is not None:
            out["teacher_pearson"] = _finite(pearsonr(pred, teacher_logits[:, 0].double().numpy())[0])
        for k in list(out):
            out[se_key(k)] = (1 - out[k] ** 2) / math.sqrt(n - 3) if n > 3 else float("nan")
        out["n"] = n
        return out
    pred = logits.argmax(dim=-1).numpy()
    y = labels.numpy()
    out = {
        "accuracy": float(accuracy_score(y, pred)),
        "f1_macro": float(f1_score(y, pred, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(y, pred)),
    }
    teacher = None
    if teacher_logits is not None:  # the least seed-noisy proxy signal (shared/README.md)
        teacher = teacher_logits.argmax(dim=-1).numpy()
        out["agreement"] = float((teacher == pred).mean())
    out.update(bootstrap_se(y, pred, teacher, logits.shape[-1]))
    out["n"] = n
    return out


def agreement_metrics(logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict:
    """Agreement of ``logits``' predictions with the teacher's (no labels), with its standard
    error and ``n``: the label-free score on an unlabeled pool."""
    pred = logits.argmax(dim=-1).numpy()
    teacher = teacher_logits.argmax(dim=-1).numpy()
    p = float((pred == teacher).mean())
    n = len(pred)
    return {"agreement": p, se_key("agreement"): math.sqrt(p * (1 - p) / max(n - 1, 1)), "n": n}


def _from_counts(c: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Metrics of ``(B, k, k, t)`` cell counts (label, prediction, teacher prediction)."""
    conf = c.sum(-1).astype(np.float64)  # (B, k, k): label x prediction
    n = conf.sum((1, 2))
    tp = np.diagonal(conf, axis1=1, axis2=2)
    true, predicted = conf.sum(2), conf.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = true + predicted
        f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
        # sklearn's multiclass MCC (Gorodkin's R_K) from the confusion matrix
        cov_yp = tp.sum(1) * n - (true * predicted).sum(1)
        cov_pp = n ** 2 - (predicted ** 2).sum(1)
        cov_yy = n ** 2 - (true ** 2).sum(1)
        mcc = np.where(cov_pp * cov_yy > 0, cov_yp / np.sqrt(cov_pp * cov_yy), 0.0)
    out = {"accuracy": tp.sum(1) / n, "f1_macro": f1.mean(1), "mcc": mcc}
    if c.shape[-1] > 1:
        idx = np.arange(k)
        out["agreement"] = c[:, :, idx, idx].sum((1, 2)) / n  # prediction == teacher's
    return out


def bootstrap_se(y: np.ndarray, pred: np.ndarray, teacher: np.ndarray | None, k: int,
                 *, resamples: int = BOOTSTRAP, seed: int = 0) -> dict:
    """The bootstrap standard error of each classification metric (``<metric>_se``)."""
    k = int(max(k, y.max(initial=0) + 1, pred.max(initial=0) + 1))
    t = k if teacher is not None else 1
    cell = (y.astype(np.int64) * k + pred) * t + (teacher if teacher is not None else 0)
    counts = np.bincount(cell, minlength=k * k * t)
    n = counts.sum()
    if n < 2:
        return {}
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts / n, size=resamples).reshape(resamples, k, k, t)
    return {se_key(m): float(v.std(ddof=1)) for m, v in _from_counts(draws, k).items()}


def interval(metrics: dict, metric: str) -> tuple[float, float] | None:
    """The 95% interval of ``metric`` in a metrics dict (None if it has no standard error)."""
    se = metrics.get(se_key(metric))
    if se is None or not math.isfinite(se):
        return None
    v = metrics[metric]
    return v - Z95 * se, v + Z95 * se


def fmt_score(value: float | None, se: float | None, spec: str = ".4f") -> str:
    """``0.7530 ± 0.0070`` (the standard error), or the value alone where none is known."""
    if value is None:
        return "-"
    if se is None or not math.isfinite(se):
        return format(value, spec)
    return f"{format(value, spec)} ± {format(se, spec)}"


# ------------------------------------------------------------------------ warnings on scores

WEAK_SHARE = 0.25  # a teacher that covers less of the way from the baseline to perfect is weak


def baseline_metrics(train_labels: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict:
    """What answering without reading the text scores on ``labels``: always the most frequent
    class of train (classification), or always train's mean (regression: no correlation)."""
    n = len(labels)
    if train_labels.is_floating_point():
        return {"pearson": 0.0, "spearman": 0.0}
    majority = int(torch.bincount(train_labels, minlength=num_labels).argmax())
    logits = torch.zeros(n, num_labels)
    logits[:, majority] = 1.0
    return compute_metrics(logits, labels)


def weak_teacher(teacher: dict, baseline: dict, metric: str) -> str | None:
    """One line if the teacher's dev ``metric`` is within two standard errors of the baseline,
    or covers less than ``WEAK_SHARE`` of the way from it to a perfect score; else None."""
    t, b = teacher[metric], baseline[metric]
    se = teacher.get(se_key(metric)) or 0.0
    share = (t - b) / (1 - b) if b < 1 else 0.0
    if t - b >= 2 * se and share >= WEAK_SHARE:
        return None
    return (f"weak teacher: dev {metric} {fmt_score(t, se, '.3f')} against {b:.3f} for always "
            f"answering the majority class ({100 * share:.0f}% of the way to a perfect score; "
            f"warned under {100 * WEAK_SHARE:.0f}% or within 2 standard errors): a student can "
            "only learn what the teacher knows; fine-tune it longer (teacher.epochs), on more "
            "data, or from a stronger checkpoint before searching")


FIX_DEV = ("more dev data (task.split.dev), or an unlabeled pool (task.unlabeled) with "
           "proxy.objective: agreement, would separate them")


def overlapping(scored: list[tuple[str, float, float | None]], *, n: int | None,
                what: str, fix: str = FIX_DEV) -> str | None:
    """One line if the best of ``scored`` ((name, score, standard error) per candidate) has a
    95% interval that overlaps another's: the split cannot rank them. None if it is separated,
    or there is fewer than two or no standard error."""
    ranked = sorted((s for s in scored if s[2] is not None and math.isfinite(s[2])),
                    key=lambda s: -s[1])
    if len(ranked) < 2:
        return None
    name, v, se = ranked[0]
    tied = [r for r in ranked[1:] if r[1] + Z95 * r[2] >= v - Z95 * se]
    if not tied:
        return None
    size = f" ({n:,} examples)" if n else ""
    return (f"not separated: the best candidate {name} ({fmt_score(v, se, '.4f')}) and "
            f"{len(tied)} other{'s' if len(tied) > 1 else ''} (down to {tied[-1][0]}, "
            f"{tied[-1][1]:.4f}) have overlapping 95% intervals on {what}{size}, so their order "
            f"is noise; {fix}")

"""Task metrics on dev/test logits (scikit-learn does the arithmetic)."""

from __future__ import annotations

import math

import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

# The worst value each metric can take: the objective value recorded for an untrained candidate.
WORST = {"accuracy": 0.0, "f1_macro": 0.0, "mcc": -1.0, "pearson": -1.0, "spearman": -1.0}


def _finite(x: float) -> float:
    return 0.0 if math.isnan(x) else float(x)  # a constant prediction has no correlation


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, teacher_logits=None) -> dict:
    """Classification metrics, or (one output column) regression's Pearson and Spearman."""
    if logits.shape[-1] == 1:
        pred, y = logits[:, 0].double().numpy(), labels.double().numpy()
        out = {"pearson": _finite(pearsonr(pred, y)[0]), "spearman": _finite(spearmanr(pred, y)[0])}
        if teacher_logits is not None:
            out["teacher_pearson"] = _finite(pearsonr(pred, teacher_logits[:, 0].double().numpy())[0])
        return out
    pred = logits.argmax(dim=-1).numpy()
    y = labels.numpy()
    out = {
        "accuracy": float(accuracy_score(y, pred)),
        "f1_macro": float(f1_score(y, pred, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(y, pred)),
    }
    if teacher_logits is not None:  # the least seed-noisy proxy signal (shared/README.md)
        out["agreement"] = float((teacher_logits.argmax(dim=-1).numpy() == pred).mean())
    return out

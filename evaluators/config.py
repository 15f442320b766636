"""The task's and the teacher's config types: what ``evaluators/`` consumes. They are sections
of the run's config (``nas/config.py``), validated once at the door like the rest.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

_STRICT = ConfigDict(extra="forbid", strict=False)
CLASSIFICATION_METRICS = ("accuracy", "f1_macro", "mcc")
REGRESSION_METRICS = ("pearson", "spearman")


@dataclass(frozen=True, config=_STRICT)
class SplitConfig:
    """Fractions for the seeded, deduplicated, stratified split made when the data has none."""

    dev: float = Field(0.1, gt=0, lt=1)
    test: float = Field(0.1, gt=0, lt=1)


@dataclass(frozen=True, config=_STRICT)
class TaskConfig:
    dataset: str  # "tweets", a hub dataset id, or a local .csv/.json/.jsonl/.parquet file
    subset: str | None = None  # the hub dataset's configuration, e.g. "sst2" for "nyu-mll/glue"
    data_files: dict[str, str] | None = None  # {train: a.csv, dev: b.csv, test: c.csv}
    text_fields: tuple[str, ...] = ("text",)  # one field, or two for sentence pairs
    label_field: str = "label"
    labels: tuple[str, ...] | None = None  # explicit label order (default: the teacher's, sorted)
    max_length: int = Field(128, ge=8, le=512)
    problem: Literal["classification", "regression"] = "classification"
    metric: Literal["accuracy", "f1_macro", "mcc", "pearson", "spearman"] | None = None
    split: SplitConfig = SplitConfig()
    max_train_samples: int | None = Field(None, ge=1)  # a seeded subsample of train
    encoding: str | None = None  # for CSV files, e.g. latin-1
    # unlabeled text in the task's domain (a .csv/.tsv/.json/.jsonl/.parquet file with
    # text_fields; any label column is ignored): the teacher labels it, and proxy.objective:
    # agreement scores candidates on it; texts also in dev or test are dropped
    unlabeled: str | None = None
    max_unlabeled_samples: int | None = Field(None, ge=1)  # a seeded subsample of that pool

    @model_validator(mode="after")
    def _metric_fits_problem(self):
        allowed = REGRESSION_METRICS if self.problem == "regression" else CLASSIFICATION_METRICS
        if self.metric is None:  # frozen: set the default once, here
            object.__setattr__(self, "metric", allowed[0])
        elif self.metric not in allowed:
            raise ValueError(f"task.metric {self.metric!r} does not fit a {self.problem} task; "
                             f"use one of {list(allowed)}")
        return self


@dataclass(frozen=True, config=_STRICT)
class TeacherConfig:
    model: str | None = None  # a fine-tuned classifier: folder or hub id
    finetune_from: str | None = None  # a pretrained checkpoint ("minilm", folder or hub id)
    epochs: float = Field(1.0, gt=0)
    lr: float = Field(5e-5, gt=0)
    batch_size: int = Field(32, ge=1)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self):
        if (self.model is None) == (self.finetune_from is None):
            raise ValueError("give exactly one of teacher.model or teacher.finetune_from")
        return self

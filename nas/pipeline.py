"""The one function that wires config -> data, teacher, latency meter, space and proxy."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tacnas.errors import UserError
from tacnas.evaluators.checkpoint import discard
from tacnas.evaluators.data import TaskData, length_percentile, load_task
from tacnas.evaluators.latency import LatencyMeter
from tacnas.evaluators.latency_table import (
    CorruptTable,
    LatencyTable,
    default_table_path,
    device_fingerprint,
    teacher_arch,
)
from tacnas.evaluators.metrics import baseline_metrics, compute_metrics, weak_teacher
from tacnas.evaluators.profile import ensure_profiled
from tacnas.evaluators.proxy import DistillationProxy, SupernetProxy
from tacnas.evaluators.runtime import require_onnx
from tacnas.evaluators.teacher import (
    Teacher,
    cache_root,
    load_teacher,
    load_tokenizer,
    resolve_source,
    teacher_logits,
)
from tacnas.nas.budget import LatencyModel, MeasuredLatency, PredictedLatency
from tacnas.nas.config import RunConfig
from tacnas.searchspace.build import check_width
from tacnas.searchspace.space import SearchSpace

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What a search, export or distillation works with, prepared once from the config."""

    cfg: RunConfig  # as given, except budget.seq_len: task resolved to the task's length
    cache: Path
    data: TaskData
    teacher: Teacher
    space: SearchSpace
    latency: LatencyModel  # the table's predictions (budget.latency: predict) or measurements
    proxy: DistillationProxy
    teacher_dev: dict
    progress: bool
    warnings: list[str] = field(default_factory=list)  # one line each, for status and reports

    @property
    def meter(self) -> LatencyMeter:
        return self.latency.meter

    def teacher_test(self) -> dict:
        logits = teacher_logits(self.teacher, self.data.test, name="test", cache_dir=self.cache,
                                progress=self.progress)
        return compute_metrics(logits, self.data.test.labels)

    def params_of(self, arch) -> int:
        """The parameter count of ``arch`` built with the teacher's vocabulary and labels."""
        tc = self.teacher.model.config
        return arch.num_params(vocab_size=tc.vocab_size, num_labels=self.data.num_labels,
                               max_position_embeddings=tc.max_position_embeddings,
                               type_vocab_size=tc.type_vocab_size)

    @property
    def teacher_params(self) -> int:
        return sum(p.numel() for p in self.teacher.model.parameters())


def prepare(cfg: RunConfig, *, progress: bool = True) -> Run:
    torch.manual_seed(cfg.seed)
    cache = cache_root(cfg.cache_dir)
    t = cfg.teacher
    source = t.model if t.model is not None else resolve_source(t.finetune_from)
    tokenizer = load_tokenizer(source, trust_remote_code=t.trust_remote_code)
    teacher_config = None
    if t.model is not None:  # a fine-tuned teacher's label order is the one to follow
        from transformers import AutoConfig

        teacher_config = AutoConfig.from_pretrained(source, trust_remote_code=t.trust_remote_code)
    data = load_task(cfg.task, tokenizer, teacher_config=teacher_config, seed=cfg.seed)
    cfg = resolve_seq_len(cfg, data)
    teacher = load_teacher(t, data, tokenizer=tokenizer, cache_dir=cache, seed=cfg.seed,
                           progress=progress)
    train_logits = teacher_logits(teacher, data.train, name="train", cache_dir=cache,
                                  progress=progress)
    dev_logits = teacher_logits(teacher, data.dev, name="dev", cache_dir=cache, progress=progress)
    teacher_dev = compute_metrics(dev_logits, data.dev.labels)
    log.info("teacher dev: %s", {k: round(v, 4) for k, v in teacher_dev.items()})
    warnings = []
    baseline = baseline_metrics(data.train.labels, data.dev.labels, data.num_labels)
    if (weak := weak_teacher(teacher_dev, baseline, data.metric)) is not None:
        log.warning(weak)
        warnings.append(weak)
    pool_logits = None
    if data.pool is not None:
        pool_logits = teacher_logits(teacher, data.pool, name="unlabeled", cache_dir=cache,
                                     progress=progress)

    space = cfg.space.build(teacher.head_size)
    space.check_valid()
    if cfg.proxy.init == "teacher":
        tc = teacher.model.config
        check_width(max(space.hidden_size), max(space.intermediate_size), tc.hidden_size,
                    tc.intermediate_size, what="the space")
    b = cfg.budget
    check_backend(b.backend)
    meter = LatencyMeter(teacher.model.config, batch_size=b.batch_size, seq_len=b.seq_len,
                         threads=b.threads, warmup=b.warmup, repeats=b.repeats, rounds=b.rounds,
                         backend=b.backend)
    if b.latency == "predict":
        table, table_path = latency_table(cfg, meter, space, cache, progress=progress)
        latency = PredictedLatency(table, meter, table_path)
    else:
        latency = MeasuredLatency(meter)
    p = cfg.proxy
    common = dict(
        teacher=teacher.model, data=data, train_logits=train_logits, dev_logits=dev_logits,
        steps=p.steps, batch_size=p.batch_size, lr=p.lr, warmup_ratio=p.warmup_ratio,
        temperature=p.temperature, alpha_ce=p.alpha_ce, eval_every=p.eval_every, init=p.init,
        seed=cfg.seed, backend=b.backend, objective=p.objective, pool_logits=pool_logits,
        repeats=p.repeats,
    )
    if p.kind == "supernet":
        if p.init != "teacher":
            raise UserError("proxy.kind: supernet is initialised from the teacher; set "
                            "proxy.init: teacher")
        import hashlib
        import json

        key = json.dumps([teacher.fingerprint, data.train.fingerprint(), cfg.to_dict()["space"],
                          p.supernet_steps, p.supernet_lr, p.batch_size, p.temperature,
                          p.alpha_ce, cfg.seed], sort_keys=True)
        path = cache / "supernet" / hashlib.sha256(key.encode()).hexdigest()[:16]
        proxy = SupernetProxy(space=space, path=path, supernet_steps=p.supernet_steps,
                              supernet_lr=p.supernet_lr, **common)
    else:
        proxy = DistillationProxy(**common)
    return Run(cfg, cache, data, teacher, space, latency, proxy, teacher_dev, progress, warnings)


def resolve_seq_len(cfg: RunConfig, data: TaskData) -> RunConfig:
    """``budget.seq_len: task`` -> the dev split's length at ``budget.seq_len_percentile``."""
    b = cfg.budget
    if b.seq_len != "task":
        return cfg
    n = length_percentile(data.dev, b.seq_len_percentile, cfg.task.max_length)
    log.info("budget.seq_len: task -> %d tokens (percentile %g of %d dev lengths, median %d, "
             "task.max_length %d)", n, b.seq_len_percentile, len(data.dev),
             int(data.dev.lengths.median()), cfg.task.max_length)
    return dataclasses.replace(cfg, budget=dataclasses.replace(b, seq_len=n))


def check_backend(backend: str) -> None:
    if backend != "torch":
        require_onnx(f"budget.backend={backend}")


def open_table(cfg: RunConfig, cache: Path, *, fresh: bool = False) -> tuple[LatencyTable, Path]:
    """This device's latency table for the budget's settings (empty if there is none yet, or
    with ``fresh``). A table given in ``budget.latency_table`` that was profiled elsewhere is
    refused; the cached one, if it does not load, is profiled again."""
    b = cfg.budget
    fp = device_fingerprint(batch_size=b.batch_size, seq_len=b.seq_len, threads=b.threads,
                            backend=b.backend)
    path = Path(b.latency_table) if b.latency_table else default_table_path(cache, fp)
    if fresh or not path.is_file():
        return LatencyTable(fp), path
    try:
        return LatencyTable.load(path, expect=fp), path
    except CorruptTable as e:
        if b.latency_table:  # the user's own file: theirs to replace (profile --fresh)
            raise
        discard(path, e)
        return LatencyTable(fp), path


def latency_table(cfg: RunConfig, meter: LatencyMeter, space: SearchSpace, cache: Path, *,
                  progress: bool) -> tuple[LatencyTable, Path]:
    """Open the table and profile whatever blocks the space (and the teacher) need."""
    table, path = open_table(cfg, cache)
    archs = [*space.all_archs(), teacher_arch(meter.teacher_config)]
    done = ensure_profiled(table, meter, archs, path=path, progress=progress)
    if done["blocks"]:
        log.info("profiled %d blocks and %d whole models in %.0f s: %s", done["blocks"],
                 done["whole_models"], done["seconds"], path)
    meter.unit_ms = table.unit_ms
    return table, path


def profile_device(cfg: RunConfig, *, fresh: bool = False, progress: bool = True):
    """``run_search.py profile``: the table for the config's space and teacher on this device,
    without the data or a fine-tuned teacher (latency depends only on the architecture)."""
    from transformers import AutoConfig

    t = cfg.teacher
    source = t.model if t.model is not None else resolve_source(t.finetune_from)
    try:
        tc = AutoConfig.from_pretrained(source, trust_remote_code=t.trust_remote_code)
    except OSError as e:
        raise UserError(f"teacher: cannot read the config of {source} ({e})") from None
    space = cfg.space.build(tc.hidden_size // tc.num_attention_heads)
    if cfg.budget.seq_len == "task":  # the data's lengths, tokenized as a search does
        tokenizer = load_tokenizer(source, trust_remote_code=t.trust_remote_code)
        cfg = resolve_seq_len(cfg, load_task(cfg.task, tokenizer, seed=cfg.seed))
    b = cfg.budget
    check_backend(b.backend)
    meter = LatencyMeter(tc, batch_size=b.batch_size, seq_len=b.seq_len, threads=b.threads,
                         warmup=b.warmup, repeats=b.repeats, rounds=b.rounds, backend=b.backend)
    cache = cache_root(cfg.cache_dir)
    table, path = open_table(cfg, cache, fresh=fresh)
    try:
        archs = [*space.all_archs(), teacher_arch(tc)]
        done = ensure_profiled(table, meter, archs, path=path, progress=progress)
    finally:
        meter.close()
    return table, path, done, space, tc

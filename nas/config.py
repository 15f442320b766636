"""RunConfig: the YAML config as a tree of frozen dataclasses, validated once at the door.

Unknown keys and wrong types are errors naming the key (``UserError`` -> exit code 2).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from tacnas.errors import UserError
from tacnas.evaluators.config import SplitConfig, TaskConfig, TeacherConfig  # noqa: F401
from tacnas.searchspace.space import SearchSpace

_STRICT = ConfigDict(extra="forbid", strict=False)


@dataclass(frozen=True, config=_STRICT)
class SpaceConfig:
    num_layers: tuple[int, ...]
    hidden_size: tuple[int, ...]
    intermediate_size: tuple[int, ...]
    num_heads: tuple[int, ...] = ()
    head_size: int | Literal["teacher"] | None = "teacher"
    embedding_size: tuple[int | Literal["hidden"], ...] = ("hidden",)
    num_hidden_groups: tuple[int | Literal["all"], ...] = ("all",)

    def build(self, teacher_head_size: int) -> SearchSpace:
        head = teacher_head_size if self.head_size == "teacher" else self.head_size
        return SearchSpace(
            num_layers=self.num_layers, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_heads=self.num_heads, head_size=head,
            embedding_size=self.embedding_size, num_hidden_groups=self.num_hidden_groups,
        )


@dataclass(frozen=True, config=_STRICT)
class BudgetConfig:
    """Any of latency_ms, speedup and max_params; every one given must hold. With
    min_retention the search looks for the fastest student keeping that fraction of the
    teacher's dev score, within the others where given."""

    latency_ms: float | None = Field(None, gt=0)
    speedup: float | None = Field(None, gt=0)  # over the teacher, measured in the same run
    max_params: int | None = Field(None, ge=1)
    batch_size: int = Field(1, ge=1)
    # the sequence length latency is measured at: a number, or task: the seq_len_percentile-th
    # percentile of the dev split's tokenized lengths (up to task.max_length, rounded up to a
    # multiple of 8). At batch 1 with dynamic padding a request costs its own length, so that
    # share of the task's requests is served within the budget.
    seq_len: Annotated[int, Field(ge=1)] | Literal["task"] = 64
    seq_len_percentile: float = Field(90.0, gt=0, le=100)
    threads: int = Field(2, ge=1)
    warmup: int = Field(5, ge=0)
    repeats: int = Field(20, ge=1)  # timed passes per round, alternating with the reference
    rounds: int = Field(3, ge=1)  # the median of the rounds' ratios to the reference
    # predict: the latency table (profiled once per device) checks each candidate in
    # microseconds, and candidates within guard_band of the budget are measured directly;
    # measure: build and measure every candidate
    latency: Literal["predict", "measure"] = "predict"
    guard_band: float = Field(0.05, ge=0, lt=1)
    latency_table: str | None = None  # default: <cache>/latency/<device fingerprint>.json
    # where the budget is measured: torch (PyTorch eager, fp32), onnxruntime (the exported
    # graph in ONNX Runtime, fp32) or onnxruntime-int8 (that graph, linear layers in int8);
    # see evaluators/runtime.py. The speedup is over the teacher in the same backend.
    backend: Literal["torch", "onnxruntime", "onnxruntime-int8"] = "torch"
    # an accuracy floor: the fastest student whose dev score (task.metric, or agreement with
    # the teacher under proxy.objective: agreement) is at least this fraction of the teacher's
    min_retention: float | None = Field(None, gt=0, le=1)
    # a floor on using the latency budget: a candidate predicted faster than this fraction of
    # it is rejected untrained, like one over it, so the search samples the top of the budget
    # (the differentiable search's latency term charges the share left unused below it)
    # (with the finalist search, 0.85 chose a student +1.10 points over the hand-designed one
    # at 4x@1, where the search without it chose +0.27, and added 0.72 points at 8x@1:
    # benchmarks/best_in_space.py, benchmarks/finalist_search.py)
    min_use: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _some_budget(self):
        if self.latency_ms is None and self.speedup is None and self.max_params is None \
                and self.min_retention is None:
            raise ValueError("give at least one of budget.latency_ms, budget.speedup, "
                             "budget.max_params, budget.min_retention")
        if self.min_use is not None and (self.latency_ms is None and self.speedup is None
                                         or self.min_retention is not None):
            raise ValueError("budget.min_use: it is a share of a latency budget to use; give "
                             "budget.latency_ms or budget.speedup, and no budget.min_retention "
                             "(that one looks for the fastest student)")
        return self


@dataclass(frozen=True, config=_STRICT)
class SearchConfig:
    # optuna: TPE / random / NSGA-II over trained candidates; differentiable: Gumbel-softmax
    # over a weight-sharing supernet with a latency loss (the `differentiable` section)
    # nni-*: NNI 3.0's multi-trial strategies propose, each proposal an Optuna trial (the `nni`
    # section; needs the [nni] extra)
    strategy: Literal["optuna", "differentiable", "nni-evolution", "nni-random", "nni-tpe",
                      "nni-grid"] = "optuna"
    sampler: Literal["tpe", "random", "nsga2"] = "tpe"
    n_trials: int | None = Field(20, ge=1)  # trained candidates; rejected ones do not count
    timeout: float | None = Field(None, gt=0)  # seconds of this process's search
    pruner: Literal["none", "median", "hyperband"] = "none"
    n_startup_trials: int = Field(5, ge=0)
    max_rejections: int = Field(200, ge=1)  # consecutive untrained candidates before giving up
    heartbeat_interval: int = Field(10, ge=1)  # seconds; a RUNNING trial silent for
    grace_period: int = Field(30, ge=2)  # this long is marked FAIL and re-run
    # (score, latency) as two objectives: a Pareto front (nsga2 always; tpe if set)
    multi_objective: bool = False
    # multi-fidelity: once the trials are in, the `rescore_top_k` best by the proxy are trained
    # again, and the best by that longer score is exported (0: the proxy's best, as scored);
    # with strategy differentiable: its `rescore_top_k` most likely architectures within the
    # budget (in place of the one derived), each re-scored so
    rescore_top_k: int = Field(0, ge=0)
    # how: "proxy" the distillation proxy for `rescore_steps` KD steps (teacher-initialised);
    # "distill" the config's `distill` recipe in full, each finalist as `compress` trains the
    # winner (kept in the run folder under finalists/: `compress` ships the winner's without
    # training it again)
    rescore_recipe: Literal["proxy", "distill"] = "proxy"
    rescore_steps: int = Field(800, ge=1)
    # what decides among them: "proxy" the proxy's objective (proxy.objective), "metric" the
    # task metric on dev, "agreement" agreement with the teacher's predictions (on the dev
    # texts, or on task.unlabeled where it is given). benchmarks/best_in_space.py: among
    # fully trained finalists, dev agreement separated the best student by 0.80 points where
    # dev accuracy did by 0.05
    rescore_objective: Literal["proxy", "metric", "agreement"] = "proxy"
    # with rescore_recipe: distill, the finalists train one after another; a finalist whose
    # dev score (task.metric) at an evaluation is more than this below the best that earlier,
    # fully trained finalists had at the same step stops there and is not chosen (None: every
    # finalist trains in full). benchmarks/finalist_pruning.py: 0.01 kept the pick of 6 finished
    # finalist searches at 0.49-0.65 of their finalists' training time; finalist_search.py at
    # 8x@1: both searches kept their pick with 5 of 8 finalists stopped at step 200
    rescore_prune: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _differentiable_is_one_objective(self):
        if self.strategy == "differentiable" and (self.multi_objective or self.sampler == "nsga2"
                                                  or self.pruner != "none"):
            raise ValueError("search.strategy: differentiable derives one architecture; set "
                             "search.sampler: tpe, multi_objective: false and pruner: none")
        return self

    @model_validator(mode="after")
    def _nni_is_one_objective(self):
        if self.strategy.startswith("nni-") and (self.multi_objective or self.sampler == "nsga2"):
            raise ValueError(f"search.strategy: {self.strategy} optimises one score; set "
                             "search.multi_objective: false and search.sampler: tpe")
        return self

    @model_validator(mode="after")
    def _rescore_settings_need_a_top_k(self):
        if not self.rescore_top_k and (self.rescore_recipe != "proxy"
                                       or self.rescore_objective != "proxy"):
            raise ValueError("search.rescore_recipe/rescore_objective: they set how the top k "
                             "are re-scored; set search.rescore_top_k to k (e.g. 8)")
        return self

    @model_validator(mode="after")
    def _prune_needs_full_training(self):
        # (without finalists, rescore_top_k: 0, it is inert, as rescore_steps is: a config that
        # ships it can turn the finalists off with rescore_top_k alone)
        if self.rescore_prune is not None and self.rescore_top_k \
                and self.rescore_recipe != "distill":
            raise ValueError("search.rescore_prune: it stops finalists trained in full; set "
                             "search.rescore_recipe: distill, or rescore_prune: null")
        return self

    @model_validator(mode="after")
    def _rescore_needs_one_score(self):
        if self.rescore_top_k and (self.multi_objective or self.sampler == "nsga2"):
            raise ValueError("search.rescore_top_k: re-scoring picks one best score; set it to "
                             "0, or use sampler tpe or random and no multi_objective")
        return self

    @model_validator(mode="after")
    def _pruner_needs_one_objective(self):
        if self.pruner != "none" and (self.multi_objective or self.sampler == "nsga2"):
            raise ValueError("search.pruner: Optuna prunes single-objective studies only; set "
                             "search.pruner: none, or use sampler tpe without multi_objective")
        return self


@dataclass(frozen=True, config=_STRICT)
class ProxyConfig:
    # distill: each candidate is teacher-initialised and distilled for `steps` steps;
    # supernet: it inherits a trained supernet's weights, then takes `steps` KD steps
    kind: Literal["distill", "supernet"] = "distill"
    init: Literal["teacher", "random"] = "teacher"
    steps: int = Field(200, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    temperature: float = Field(2.0, gt=0)
    alpha_ce: float = Field(0.5, ge=0)
    eval_every: int = Field(0, ge=0)  # steps between intermediate dev scores (0: only at the end)
    supernet_steps: int = Field(1000, ge=1)  # kind supernet: its one-off training
    supernet_lr: float = Field(5e-4, gt=0)
    # what ranks the candidates: metric (task.metric on the labelled dev split) or agreement
    # (with the teacher's predictions, no labels needed: on task.unlabeled's texts where given,
    # else on the dev texts); with a small dev split, agreement on a large pool is far less noisy
    objective: Literal["metric", "agreement"] = "metric"
    # each candidate trained and scored this many times, at seeds seed, seed+1, ... (its batch
    # order and dropout masks), and ranked by the mean of the scores (its checkpoint is the
    # first's): the supernet proxy's 20 steps ranked 36 tweet students of one latency at tau
    # 0.47 ± 0.11 over 9 seeds scored by dev accuracy, the mean agreement of 3 runs at
    # 0.62 ± 0.03, of 5 at 0.64 ± 0.03 (benchmarks/proxy_objectives.py); it costs `repeats`
    # times the training
    repeats: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _repeats_score_at_the_end(self):
        if self.repeats > 1 and self.eval_every:
            raise ValueError("proxy.repeats: repeated candidates are scored at their end only "
                             "(no pruning); set proxy.eval_every: 0 or proxy.repeats: 1")
        return self


@dataclass(frozen=True, config=_STRICT)
class DistillConfig:
    """``run_search.py distill``: the final training of a chosen student."""

    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    temperature: float = Field(2.0, gt=0)
    alpha_ce: float = Field(0.5, ge=0)
    hidden_weight: float = Field(0.0, ge=0)  # TinyBERT hidden-state transfer (0: off)
    attention_weight: float = Field(0.0, ge=0)  # TinyBERT attention-map transfer (0: off)
    # the teacher layer each student layer is matched against by those two: "init" the one it
    # starts from (the first-layer student: teacher layer 0), "uniform" TinyBERT's m * N / M
    # (every student's last layer against the teacher's last one)
    intermediate_map: Literal["init", "uniform"] = "init"
    eval_every: int = Field(200, ge=1)  # steps between dev scores (early stopping)
    patience: int = Field(5, ge=0)  # evaluations without improvement before stopping (0: never)
    checkpoint_every: int = Field(200, ge=1)
    feature_cache_gb: float = Field(4.0, ge=0)  # teacher hidden states/attention kept in memory
    # where the student trains: "cpu", or "cuda" / "cuda:N" on a machine with a GPU (only the
    # final distillation; the search, the latency model and the export stay on the CPU)
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")


@dataclass(frozen=True, config=_STRICT)
class NNIConfig:
    """``search.strategy: nni-evolution``: NNI's regularized evolution (Real et al. 2019)."""

    population_size: int = Field(8, ge=2)  # NNI's default, 100, exceeds most trial budgets here
    sample_size: int = Field(3, ge=1)  # tournament size: the best of these is mutated
    mutation_prob: float = Field(0.3, gt=0, le=1)  # per dimension (NNI's 0.05 rarely mutates
    # any of the space's 5-6 dimensions, so most children would repeat their parent)

    @model_validator(mode="after")
    def _sample_fits(self):
        if self.sample_size > self.population_size:
            raise ValueError("nni.sample_size: must not exceed nni.population_size")
        return self


@dataclass(frozen=True, config=_STRICT)
class DifferentiableConfig:
    """``search.strategy: differentiable``: AdaBERT-style search over a weight-sharing supernet.
    Each step trains the slice of a sampled architecture on a train batch; after the warm-up,
    an architecture step on a dev batch updates one categorical distribution per dimension with
    L_KD + latency_weight * E[max(0, latency / budget - 1)] (``latency_loss``)."""

    steps: int = Field(600, ge=1)  # supernet weight steps in all
    warmup_steps: int = Field(200, ge=0)  # weights only, architectures drawn uniformly
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-4, gt=0)  # supernet weights (AdamW)
    arch_lr: float = Field(0.1, gt=0)  # architecture logits (Adam)
    # Adam's beta1 for the logits (DARTS's 0.5 follows each step's gradient; 0.9 averages the
    # Gumbel samples' noise over about 10 steps, so a weak but steady preference accumulates)
    arch_beta1: float = Field(0.5, ge=0, lt=1)
    tau_start: float = Field(5.0, gt=0)  # Gumbel-softmax temperature, annealed exponentially
    tau_end: float = Field(0.5, gt=0)
    latency_weight: float = Field(1.0, ge=0)  # beta of the latency loss
    # what the weight steps train after the warm-up: slices drawn uniformly throughout, as the
    # supernet proxy trains (SPOS), or drawn from the distributions (AdaBERT/DARTS)
    weights: Literal["uniform", "sampled"] = "uniform"
    # the architecture gradient of the KD loss: the score function (REINFORCE) of ``samples``
    # slices drawn from the distributions, each scored on the same dev batch against the
    # others' mean, or the straight-through Gumbel-softmax through the gated supernet (AdaBERT;
    # on tweets it ranked finished students by likelihood at tau 0.15-0.26, the score function
    # at 0.37: benchmarks/differentiable_estimators.py)
    estimator: Literal["reinforce", "gumbel"] = "reinforce"
    samples: int = Field(8, ge=2)
    # the latency term under a budget: the hinge of the expected latency lets a mixture of an
    # architecture over the budget and one under it sit at the budget; the expected hinge
    # charges each architecture over the budget by its own excess
    latency_loss: Literal["expected_hinge", "hinge_of_expected"] = "expected_hinge"
    # an architecture step skips a supernet layer the drawn architecture does not run when the
    # layer-count choices that would run it hold less than this probability together (0: never);
    # its value is unchanged, only those unlikely choices lose that layer's gradient (on tweets:
    # the same 4x student in 224 s instead of 357, 8x in 178 s instead of 328)
    skip_below: float = Field(0.01, ge=0, lt=1)
    # AdaBERT's size term: + size_weight * E[parameters] / the teacher's parameters in every
    # architecture step, a linear pull towards smaller models that decides the dimensions the
    # latency and KD losses leave tied (embedding width, cross-layer sharing)
    size_weight: float = Field(0.0, ge=0)
    # the dimensions the size term pulls (the others' probabilities enter it as constants);
    # null: every one. [embedding_size, num_hidden_groups], the two latency leaves tied, was
    # measured on tweets (seed 0): no better than without it (the 4x@32 embedding stayed at
    # 0.78 of uniform entropy; the 4x@1 student still narrowed; differentiable_ties.py)
    size_dims: list[Literal["num_layers", "hidden_size", "intermediate_size", "embedding_size",
                            "num_hidden_groups"]] | None = None
    floor_candidates: int = Field(8, ge=1)  # under budget.min_retention: likely ones scored
    log_every: int = Field(20, ge=1)
    checkpoint_every: int = Field(100, ge=1)


@dataclass(frozen=True, config=_STRICT)
class RunConfig:
    task: TaskConfig
    teacher: TeacherConfig
    space: SpaceConfig
    budget: BudgetConfig
    search: SearchConfig = SearchConfig()
    proxy: ProxyConfig = ProxyConfig()
    distill: DistillConfig = DistillConfig()
    differentiable: DifferentiableConfig = DifferentiableConfig()
    nni: NNIConfig = NNIConfig()
    seed: int = 0  # sampling, data splits and initialisation
    run_dir: str = "runs"
    cache_dir: str | None = None  # default: $TACNAS_CACHE or ~/.cache/tacnas

    @model_validator(mode="after")
    def _floor_ranks_by_latency(self):
        if self.budget.min_retention is not None and self.search.pruner != "none":
            raise ValueError("search.pruner: with budget.min_retention the search minimises "
                             "latency, and a pruner compares scores; set search.pruner: none")
        if self.budget.min_retention is not None and self.search.strategy.startswith("nni-"):
            raise ValueError(f"search.strategy: {self.search.strategy} maximises a score and "
                             "cannot hold budget.min_retention; use search.strategy: optuna or "
                             "differentiable")
        if self.budget.min_retention is not None and self.search.rescore_top_k:
            raise ValueError("search.rescore_top_k: with budget.min_retention the search picks "
                             "the fastest student that keeps the floor, not the best score; set "
                             "search.rescore_top_k: 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


_ADAPTER = TypeAdapter(RunConfig)


def config_from_dict(data: Any, *, source: str = "config") -> RunConfig:
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of sections (task, teacher, space, budget, ...)")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "unexpected_keyword_argument" or err["type"] == "extra_forbidden":
            msg = "unknown key; check its spelling against the config reference in README.md"
        elif err["type"] == "missing":
            msg = "missing required key"
        raise UserError(f"{source}: {where}: {msg}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``--set search.n_trials=5`` style overrides; the value is parsed as YAML."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key=value, e.g. search.n_trials=5")
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {p} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise UserError(f"--set {key}: the value {raw!r} is not valid YAML "
                            f"({str(e).splitlines()[0]}); quote it, e.g. --set {key}='\"...\"'"
                            ) from None
    return data


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--config {path}: not UTF-8 text (byte {e.start}); save it as UTF-8"
                        ) from None
    return config_from_dict(apply_overrides(data, list(overrides)), source=str(path))

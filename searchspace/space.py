"""SearchSpace: one choice list per dimension, sampled define-by-run through Optuna.

Head width is fixed (by default to the teacher's): ``num_heads = hidden_size / head_size``, so a
student made by selecting whole teacher heads never slices across a head boundary. With
``head_size: null`` the head count is a free dimension and combinations that do not divide are
invalid (recorded as infeasible, never trained).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from tacnas.errors import UserError
from tacnas.searchspace.arch import ArchConfig, InvalidArch

HIDDEN = "hidden"  # embedding_size choice meaning "no factorization"
ALL = "all"  # num_hidden_groups choice meaning "no sharing" (one group per layer)


class SuggestsCategorical(Protocol):
    def suggest_categorical(self, name: str, choices: Sequence) -> object: ...


@dataclass(frozen=True)
class SearchSpace:
    num_layers: tuple[int, ...]
    hidden_size: tuple[int, ...]
    intermediate_size: tuple[int, ...]
    num_heads: tuple[int, ...] = ()
    head_size: int | None = None
    embedding_size: tuple[int | str, ...] = (HIDDEN,)
    num_hidden_groups: tuple[int | str, ...] = (ALL,)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "intermediate_size"):
            if not getattr(self, name):
                raise UserError(f"space.{name}: give at least one choice")
        if self.head_size is None and not self.num_heads:
            raise UserError("space.num_heads: give choices, or set space.head_size")
        if self.head_size is not None:
            bad = [h for h in self.hidden_size if h % self.head_size]
            if bad:
                raise UserError(
                    f"space.hidden_size: {bad} not divisible by head_size={self.head_size}; "
                    "use multiples of the head size"
                )
        for e in self.embedding_size:
            if e != HIDDEN and not (isinstance(e, int) and e > 0):
                raise UserError(f"space.embedding_size: {e!r} is not a positive int or 'hidden'")
        for g in self.num_hidden_groups:
            if g != ALL and not (isinstance(g, int) and g > 0):
                raise UserError(f"space.num_hidden_groups: {g!r} is not a positive int or 'all'")

    def choices(self) -> dict[str, tuple]:
        """Each dimension's choices, under the names and in the order ``sample`` suggests them
        (``num_heads`` only where heads are a free dimension)."""
        dims = {"num_layers": self.num_layers, "hidden_size": self.hidden_size}
        if self.head_size is None:
            dims["num_heads"] = self.num_heads
        dims["intermediate_size"] = self.intermediate_size
        dims["embedding_size"] = self.embedding_size
        dims["num_hidden_groups"] = self.num_hidden_groups
        return {k: tuple(v) for k, v in dims.items()}

    def sample(self, trial: SuggestsCategorical) -> ArchConfig:
        """Suggest every dimension on ``trial`` (a Trial or FixedTrial); raise InvalidArch if the
        combination does not fit together."""
        layers = trial.suggest_categorical("num_layers", self.num_layers)
        hidden = trial.suggest_categorical("hidden_size", self.hidden_size)
        if self.head_size is not None:
            heads = hidden // self.head_size
        else:
            heads = trial.suggest_categorical("num_heads", self.num_heads)
        ffn = trial.suggest_categorical("intermediate_size", self.intermediate_size)
        emb = trial.suggest_categorical("embedding_size", self.embedding_size)
        groups = trial.suggest_categorical("num_hidden_groups", self.num_hidden_groups)
        return self._resolve(layers, hidden, heads, ffn, emb, groups)

    @staticmethod
    def _resolve(layers, hidden, heads, ffn, emb, groups) -> ArchConfig:
        return ArchConfig(
            num_layers=layers,
            hidden_size=hidden,
            num_heads=heads,
            intermediate_size=ffn,
            embedding_size=hidden if emb == HIDDEN else emb,
            num_hidden_groups=layers if groups == ALL else groups,
        ).validate()

    def _raw(self) -> Iterator[tuple]:
        heads = self.num_heads if self.head_size is None else (None,)
        yield from itertools.product(
            self.num_layers, self.hidden_size, heads, self.intermediate_size,
            self.embedding_size, self.num_hidden_groups,
        )

    def all_archs(self) -> Iterator[ArchConfig]:
        """Every valid, distinct architecture of the space."""
        seen = set()
        for layers, hidden, heads, ffn, emb, groups in self._raw():
            if heads is None:
                heads = hidden // self.head_size
            try:
                arch = self._resolve(layers, hidden, heads, ffn, emb, groups)
            except InvalidArch:
                continue
            if arch not in seen:
                seen.add(arch)
                yield arch

    @property
    def size(self) -> int:
        return sum(1 for _ in self.all_archs())

    def contains(self, arch: ArchConfig) -> bool:
        emb_ok = arch.embedding_size in self.embedding_size or (
            HIDDEN in self.embedding_size and arch.embedding_size == arch.hidden_size
        )
        grp_ok = arch.num_hidden_groups in self.num_hidden_groups or (
            ALL in self.num_hidden_groups and arch.num_hidden_groups == arch.num_layers
        )
        heads_ok = (
            arch.num_heads in self.num_heads
            if self.head_size is None
            else arch.head_size == self.head_size and arch.hidden_size % self.head_size == 0
        )
        return (
            arch.num_layers in self.num_layers
            and arch.hidden_size in self.hidden_size
            and arch.intermediate_size in self.intermediate_size
            and heads_ok and emb_ok and grp_ok
        )

    def check_valid(self) -> list[ArchConfig]:
        """Every architecture of the space; a space without one is an error naming why its
        combinations fail (heads, sharing groups, embedding width)."""
        archs = list(self.all_archs())
        if archs:
            return archs
        reasons = []
        for layers, hidden, heads, ffn, emb, groups in self._raw():
            try:
                self._resolve(layers, hidden, heads or max(1, hidden // self.head_size), ffn,
                              emb, groups)
            except InvalidArch as e:
                reason = str(e).split(":")[0] if "exceeds" in str(e) else str(e)
                if reason not in reasons:
                    reasons.append(reason)
        raise UserError(f"space: no valid architecture ({'; '.join(reasons[:3])}); change those "
                        "choices")

    def smallest(self) -> ArchConfig:
        """The cheapest architecture to run: the budget is unreachable if this one misses it."""
        return min(self.check_valid(), key=lambda a: a.flops(batch_size=1, seq_len=64))

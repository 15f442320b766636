"""ArchConfig: the one representation of a student architecture."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from tacnas.errors import UserError


class InvalidArch(UserError):
    """An architecture whose dimensions do not fit together."""


@dataclass(frozen=True)
class ArchConfig:
    """A BERT-family student encoder.

    ``embedding_size == hidden_size`` means no factorized embedding; ``num_hidden_groups ==
    num_layers`` means no cross-layer sharing. With neither, the student is a plain BERT;
    otherwise an ALBERT (which has both axes natively).
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    embedding_size: int
    num_hidden_groups: int

    def validate(self) -> ArchConfig:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidArch(f"{f.name}={v!r}: must be a positive integer")
        if self.hidden_size % self.num_heads:
            raise InvalidArch(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.num_layers % self.num_hidden_groups:
            raise InvalidArch(
                f"num_hidden_groups={self.num_hidden_groups} does not divide "
                f"num_layers={self.num_layers}"
            )
        if self.embedding_size > self.hidden_size:
            raise InvalidArch(
                f"embedding_size={self.embedding_size} exceeds hidden_size={self.hidden_size}: "
                "a factorized embedding must be narrower than the hidden size"
            )
        return self

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def is_albert(self) -> bool:
        return self.embedding_size != self.hidden_size or self.num_hidden_groups != self.num_layers

    @property
    def name(self) -> str:
        """A short, unique, human-readable key, e.g. ``L4-H256-A8-F1024-E128-G1``."""
        return (
            f"L{self.num_layers}-H{self.hidden_size}-A{self.num_heads}-F{self.intermediate_size}"
            f"-E{self.embedding_size}-G{self.num_hidden_groups}"
        )

    @classmethod
    def from_name(cls, name: str) -> ArchConfig:
        """The inverse of ``name``; raises ``InvalidArch`` for anything else."""
        parts = name.split("-")
        if [p[:1] for p in parts] != list("LHAFEG") or not all(p[1:].isdigit() for p in parts):
            raise InvalidArch(f"{name!r} is not an architecture name like L4-H256-A8-F1024-E128-G1")
        return cls(*(int(p[1:]) for p in parts)).validate()

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        missing = names - set(d)
        if unknown or missing:
            raise InvalidArch(
                f"architecture keys: unknown {sorted(unknown)}, missing {sorted(missing)}"
            )
        return cls(**{k: d[k] for k in names}).validate()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ArchConfig:
        return cls.from_dict(json.loads(text))

    def num_params(
        self,
        *,
        vocab_size: int,
        num_labels: int,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
    ) -> int:
        """Exact parameter count of the transformers model ``build`` makes (tested)."""
        h, e = self.hidden_size, self.embedding_size
        emb = (vocab_size + max_position_embeddings + type_vocab_size) * e + 2 * e
        if self.is_albert:
            emb += e * h + h  # embedding_hidden_mapping_in
        unique_layers = self.num_hidden_groups if self.is_albert else self.num_layers
        pooler = h * h + h
        classifier = h * num_labels + num_labels
        return emb + unique_layers * self.layer_params() + pooler + classifier

    def layer_params(self) -> int:
        h, f = self.hidden_size, self.intermediate_size
        # q, k, v, o (weights + biases), two LayerNorms, FFN in and out
        return 4 * (h * h + h) + 2 * (2 * h) + (h * f + f) + (f * h + h)

    def flops(self, *, batch_size: int, seq_len: int, num_labels: int = 2) -> int:
        """Forward FLOPs (2 per multiply-add) of matmuls. Sharing changes parameters, not compute."""
        h, e, f, s = self.hidden_size, self.embedding_size, self.intermediate_size, seq_len
        per_layer = 2 * s * h * (4 * h + 2 * f) + 2 * 2 * s * s * h  # projections+FFN, QK^T and AV
        total = self.num_layers * per_layer + 2 * h * h + 2 * h * num_labels
        if self.is_albert:
            total += 2 * s * e * h
        return batch_size * total

"""Build a student as a plain transformers model, initialised from the teacher or at random.

Teacher initialisation keeps the residual stream consistent: one set of hidden dimensions is
chosen once and used by every embedding, layer, LayerNorm and the pooler; attention keeps whole
teacher heads (never a slice across a head boundary); the FFN keeps whole neurons; layers are
spread over the teacher's depth; a shared ALBERT group starts from the teacher layer of its first
member; a factorized embedding starts from a truncated SVD of the teacher's (centred) embeddings.
"""

from __future__ import annotations

import math

import torch
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
)

from tacnas.errors import UserError
from tacnas.searchspace.arch import ArchConfig

_COPIED = (
    "vocab_size", "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps",
    "pad_token_id", "hidden_dropout_prob", "attention_probs_dropout_prob", "id2label", "label2id",
    "problem_type",
)


def student_config(arch: ArchConfig, teacher_config) -> BertConfig | AlbertConfig:
    """The transformers config of ``arch`` with the teacher's vocabulary, labels and activation."""
    common = {k: getattr(teacher_config, k) for k in _COPIED if hasattr(teacher_config, k)}
    common.update(
        num_hidden_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads,
        intermediate_size=arch.intermediate_size,
    )
    if arch.is_albert:
        return AlbertConfig(
            embedding_size=arch.embedding_size,
            num_hidden_groups=arch.num_hidden_groups,
            inner_group_num=1,
            classifier_dropout_prob=common.get("hidden_dropout_prob", 0.1),
            **common,
        )
    return BertConfig(**common)


def build_student(
    arch: ArchConfig,
    teacher: PreTrainedModel,
    *,
    init: str = "teacher",
    seed: int = 0,
    layers: list[int] | None = None,
) -> PreTrainedModel:
    """A ``Bert``/``AlbertForSequenceClassification`` for ``arch``; ``init`` is teacher or random.
    ``layers``: the teacher layer each student layer starts from (default: spread over the
    teacher's depth, ``select_layers``), e.g. ``[0, 2, 4]`` for DistilBERT's every other layer."""
    arch.validate()
    config = student_config(arch, teacher.config)
    torch.manual_seed(seed)
    cls = AlbertForSequenceClassification if arch.is_albert else BertForSequenceClassification
    model = cls(config)
    if init == "random":
        return model
    if init != "teacher":
        raise UserError(f"proxy.init: {init!r} is not one of teacher, random")
    state = teacher_init_state(arch, teacher, layers=layers)
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers = {n for n, _ in model.named_buffers()}
    missing = [k for k in missing if k not in buffers]
    if missing or unexpected:  # a bug in the mapping below, never a user error
        raise RuntimeError(f"teacher init mapping: missing {missing}, unexpected {unexpected}")
    return model


# ---------------------------------------------------------------- teacher's weights, canonically


def teacher_parts(teacher: PreTrainedModel) -> dict:
    """The teacher's weights as plain tensors, per layer, independent of module names."""
    if not isinstance(teacher, BertForSequenceClassification):
        raise UserError(
            f"proxy.init: teacher initialisation needs a BERT teacher, got "
            f"{type(teacher).__name__}; set proxy.init: random"
        )
    sd = {k: v.detach() for k, v in teacher.state_dict().items()}
    n_layers = teacher.config.num_hidden_layers
    layers = []
    for i in range(n_layers):
        p = f"bert.encoder.layer.{i}."
        layers.append({
            "q": (sd[p + "attention.self.query.weight"], sd[p + "attention.self.query.bias"]),
            "k": (sd[p + "attention.self.key.weight"], sd[p + "attention.self.key.bias"]),
            "v": (sd[p + "attention.self.value.weight"], sd[p + "attention.self.value.bias"]),
            "o": (sd[p + "attention.output.dense.weight"], sd[p + "attention.output.dense.bias"]),
            "ln1": (sd[p + "attention.output.LayerNorm.weight"],
                    sd[p + "attention.output.LayerNorm.bias"]),
            "fi": (sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"]),
            "fo": (sd[p + "output.dense.weight"], sd[p + "output.dense.bias"]),
            "ln2": (sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"]),
        })
    e = "bert.embeddings."
    return {
        "word": sd[e + "word_embeddings.weight"],
        "pos": sd[e + "position_embeddings.weight"],
        "type": sd[e + "token_type_embeddings.weight"],
        "emb_ln": (sd[e + "LayerNorm.weight"], sd[e + "LayerNorm.bias"]),
        "layers": layers,
        "pooler": (sd["bert.pooler.dense.weight"], sd["bert.pooler.dense.bias"]),
        "cls": (sd["classifier.weight"], sd["classifier.bias"]),
        "head_size": teacher.config.hidden_size // teacher.config.num_attention_heads,
    }


def select_layers(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layers spread evenly over its depth, first and last included."""
    if n_student >= n_teacher:
        return list(range(n_teacher)) + [n_teacher - 1] * (n_student - n_teacher)
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def uniform_layers(n_teacher: int, n_student: int) -> list[int]:
    """TinyBERT's layer mapping g(m) = m * N / M (1-based): student layer m is matched against
    teacher layer m * N / M, so the last against the last (a deeper student repeats layers)."""
    return [max(0, (m + 1) * n_teacher // n_student - 1) for m in range(n_student)]


def group_layers(arch: ArchConfig, layers: list[int]) -> list[int]:
    """Of the layer each student layer would start from, the one each weight holder takes: a
    BERT layer its own, a shared ALBERT group the layer of its first member."""
    if not arch.is_albert:
        return layers
    per_group = arch.num_layers // arch.num_hidden_groups
    return [layers[g * per_group] for g in range(arch.num_hidden_groups)]


def check_width(hidden: int, ffn: int, t_hidden: int, t_ffn: int, *, what: str) -> None:
    """The one width check of teacher initialisation: a student keeps whole teacher
    dimensions, so none can be wider than the teacher's."""
    if hidden > t_hidden or ffn > t_ffn:
        raise UserError(
            f"space: {what} is wider than the teacher: hidden_size {hidden} / intermediate_size "
            f"{ffn} exceed the teacher's ({t_hidden}, {t_ffn}); remove the larger choices or set "
            "proxy.init: random")


def embedding_basis(word: torch.Tensor, pos: torch.Tensor, typ: torch.Tensor, rank: int):
    """A factorized embedding from a truncated SVD: the rank-``rank`` basis V (H, rank; by
    singular value) of the centred embedding rows (word, position and type share it, so their
    sum stays in it) and the rows in that basis, ``(basis, word, pos, type)``."""
    stacked = torch.cat([word, pos, typ]).detach().double()
    centred = stacked - stacked.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    basis = vh[:rank].T
    low = (centred @ basis).float()
    n_w, n_p = word.shape[0], pos.shape[0]
    return basis, low[:n_w].contiguous(), low[n_w:n_w + n_p].contiguous(), low[n_w + n_p:].contiguous()


def student_layers(arch: ArchConfig, n_teacher: int, layers: list[int] | None = None) -> list[int]:
    """The teacher layer each student layer starts from: ``layers`` checked, or the default."""
    if layers is None:
        return select_layers(n_teacher, arch.num_layers)
    layers = [int(i) for i in layers]
    if len(layers) != arch.num_layers or not all(0 <= i < n_teacher for i in layers):
        raise UserError(
            f"teacher layers {layers}: need {arch.num_layers} indices (one per student layer of "
            f"{arch.name}), each in 0..{n_teacher - 1}"
        )
    return layers


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order."""
    return torch.sort(torch.topk(scores, k).indices).values


def residual_scores(parts: dict) -> torch.Tensor:
    """How much the teacher's LayerNorms scale each hidden dim (this ranking keeps BERT's few
    large-magnitude "outlier" dimensions)."""
    score = parts["emb_ln"][0].pow(2).clone()
    for layer in parts["layers"]:
        score += layer["ln1"][0].pow(2) + layer["ln2"][0].pow(2)
    return score


def head_scores(layer: dict, head_size: int) -> torch.Tensor:
    """Per whole head: how much it can write into the residual stream."""
    wv, wo = layer["v"][0], layer["o"][0]
    return torch.stack([
        wv[h * head_size:(h + 1) * head_size].norm() * wo[:, h * head_size:(h + 1) * head_size].norm()
        for h in range(wv.shape[0] // head_size)
    ])


def ffn_scores(layer: dict) -> torch.Tensor:
    return layer["fi"][0].norm(dim=1) * layer["fo"][0].norm(dim=0)


def head_dims(heads: torch.Tensor, head_size: int) -> torch.Tensor:
    """The dims of the given whole heads, in that order."""
    return torch.cat([torch.arange(h * head_size, (h + 1) * head_size) for h in heads.tolist()])


def _residual_dims(parts: dict, hidden: int) -> torch.Tensor:
    """One set of hidden dims for the whole student: the teacher's top-scoring ones."""
    return _top(residual_scores(parts), hidden)


def _head_dims(layer: dict, n_heads: int, head_size: int) -> torch.Tensor:
    return head_dims(_top(head_scores(layer, head_size), n_heads), head_size)


def _ffn_dims(layer: dict, ffn: int) -> torch.Tensor:
    return _top(ffn_scores(layer), ffn)


def _layer_state(layer: dict, res: torch.Tensor, heads: torch.Tensor, ffn: torch.Tensor) -> dict:
    def rows_cols(wb, rows, cols):
        w, b = wb
        return w[rows][:, cols].clone(), b[rows].clone()

    out = {}
    for name in ("q", "k", "v"):
        out[name] = rows_cols(layer[name], heads, res)
    out["o"] = rows_cols(layer["o"], res, heads)
    out["fi"] = rows_cols(layer["fi"], ffn, res)
    out["fo"] = rows_cols(layer["fo"], res, ffn)
    for name in ("ln1", "ln2"):
        w, b = layer[name]
        out[name] = (w[res].clone(), b[res].clone())
    return out


def teacher_init_state(arch: ArchConfig, teacher: PreTrainedModel, *,
                       layers: list[int] | None = None) -> dict[str, torch.Tensor]:
    """The student's state dict, made from the teacher's weights (see the module docstring)."""
    parts = teacher_parts(teacher)
    head_size = parts["head_size"]
    t_hidden = parts["word"].shape[1]
    t_ffn = parts["layers"][0]["fi"][0].shape[0]
    if arch.head_size != head_size:
        raise UserError(
            f"space: {arch.name} has head size {arch.head_size} but the teacher's is {head_size}; "
            f"set space.head_size: {head_size} (or proxy.init: random)"
        )
    check_width(arch.hidden_size, arch.intermediate_size, t_hidden, t_ffn, what=arch.name)
    res = _residual_dims(parts, arch.hidden_size)
    chosen = group_layers(arch, student_layers(arch, len(parts["layers"]), layers))
    layer_states = []
    for t in chosen:
        layer = parts["layers"][t]
        layer_states.append(_layer_state(
            layer, res,
            _head_dims(layer, arch.num_heads, head_size),
            _ffn_dims(layer, arch.intermediate_size),
        ))

    state: dict[str, torch.Tensor] = {}
    prefix = "albert" if arch.is_albert else "bert"
    state.update(_embedding_state(arch, parts, res, prefix))
    for i, ls in enumerate(layer_states):
        names = albert_names(i) if arch.is_albert else bert_names(i)
        for key, (w, b) in ls.items():
            state[names[key] + ".weight"] = w
            state[names[key] + ".bias"] = b
    pw, pb = parts["pooler"]
    pooler = "albert.pooler" if arch.is_albert else "bert.pooler.dense"
    state[pooler + ".weight"] = pw[res][:, res].clone()
    state[pooler + ".bias"] = pb[res].clone()
    cw, cb = parts["cls"]
    state["classifier.weight"] = cw[:, res].clone()
    state["classifier.bias"] = cb.clone()
    return state


def bert_names(i: int) -> dict[str, str]:
    p = f"bert.encoder.layer.{i}."
    return {
        "q": p + "attention.self.query", "k": p + "attention.self.key",
        "v": p + "attention.self.value", "o": p + "attention.output.dense",
        "ln1": p + "attention.output.LayerNorm", "fi": p + "intermediate.dense",
        "fo": p + "output.dense", "ln2": p + "output.LayerNorm",
    }


def albert_names(g: int) -> dict[str, str]:
    p = f"albert.encoder.albert_layer_groups.{g}.albert_layers.0."
    return {
        "q": p + "attention.query", "k": p + "attention.key", "v": p + "attention.value",
        "o": p + "attention.dense", "ln1": p + "attention.LayerNorm", "fi": p + "ffn",
        "fo": p + "ffn_output", "ln2": p + "full_layer_layer_norm",
    }


def _embedding_state(arch: ArchConfig, parts: dict, res: torch.Tensor, prefix: str) -> dict:
    word, pos, typ = (parts[k][:, res] for k in ("word", "pos", "type"))
    ln_w, ln_b = (t[res] for t in parts["emb_ln"])
    e = f"{prefix}.embeddings."
    state = {}
    h, emb = arch.hidden_size, arch.embedding_size
    if emb == h:
        # no factorization: copy; an ALBERT (sharing only) gets an identity projection
        state.update({
            e + "word_embeddings.weight": word.clone(), e + "position_embeddings.weight": pos.clone(),
            e + "token_type_embeddings.weight": typ.clone(),
            e + "LayerNorm.weight": ln_w.clone(), e + "LayerNorm.bias": ln_b.clone(),
        })
        if arch.is_albert:
            state["albert.encoder.embedding_hidden_mapping_in.weight"] = torch.eye(h)
            state["albert.encoder.embedding_hidden_mapping_in.bias"] = torch.zeros(h)
        return state
    # Factorized (``embedding_basis``). ALBERT normalises in E space, then projects back: the
    # projection sqrt(H/E)·diag(gamma)·V maps unit-variance E coordinates to BERT's LayerNorm scale.
    basis, f_word, f_pos, f_type = embedding_basis(word, pos, typ, emb)  # basis: (H, E)
    state.update({
        e + "word_embeddings.weight": f_word,
        e + "position_embeddings.weight": f_pos,
        e + "token_type_embeddings.weight": f_type,
        e + "LayerNorm.weight": torch.ones(emb),
        e + "LayerNorm.bias": torch.zeros(emb),
        "albert.encoder.embedding_hidden_mapping_in.weight":
            (math.sqrt(h / emb) * ln_w[:, None].double() * basis).float().contiguous(),
        "albert.encoder.embedding_hidden_mapping_in.bias": ln_b.clone(),
    })
    return state

"""A weight-sharing supernet over the search space (as in HAT and AutoFormer).

One set of weights at the space's largest choice in every dimension, initialised from the
teacher, with every dimension *ordered by importance*: residual dims by how much the teacher's
LayerNorms scale them, each layer's heads (whole heads) and FFN neurons by the norms of what
they read and write, a factorized embedding by singular value. An architecture of the space is
then the *leading slice* of every dimension: the same top-k selection that teacher
initialisation (``searchspace/build.py``) makes, so a fresh supernet's slice of an architecture
is that architecture's teacher-initialised student (up to the layer mapping).

An architecture runs as a slice, with gradients into the shared weights: ``forward(arch, ...)``
calls the very ``transformers`` class that ``extract(arch)`` returns (built once per architecture
on the meta device, then run with ``torch.func.functional_call`` on views of the supernet's
weights), so the slice and the extracted model compute the same function by construction.

Layers: the supernet has ``max(space.num_layers)`` layers, taken from the teacher's spread over
its depth; a student of L layers uses supernet layers ``select_layers(L_max, L)``; an ALBERT
group uses the layer of its first member. Factorized embeddings (ALBERT's E < H) share one
E_max-wide table and projection; E = H uses the BERT embedding.

For the differentiable search, ``gated_forward(gates, ...)`` runs the whole supernet with every
dimension's choice applied as a mask built from that dimension's gate vector (a straight-through
Gumbel-softmax sample, one entry per choice): hidden dims, heads and FFN neurons are masked,
LayerNorms normalise over the active dims, a layer is applied or skipped by its gate, sharing
groups select the weights, the embedding is the gated sum of its forms. At one-hot gates it
computes exactly the architecture's slice (tested); the gradient reaches every choice's gate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AlbertForSequenceClassification,
    BertForSequenceClassification,
    PreTrainedModel,
)

from tacnas.errors import UserError
from tacnas.searchspace.arch import ArchConfig
from tacnas.searchspace.build import (
    albert_names,
    bert_names,
    check_width,
    embedding_basis,
    ffn_scores,
    group_layers,
    head_dims,
    head_scores,
    residual_scores,
    select_layers,
    student_config,
    teacher_parts,
)
from tacnas.searchspace.space import ALL, HIDDEN, SearchSpace

_LAYER_KEYS = ("q", "k", "v", "o", "ln1", "fi", "fo", "ln2")


def _descending(scores: torch.Tensor) -> torch.Tensor:
    return torch.argsort(scores, descending=True, stable=True)


class Supernet(nn.Module):
    """Shared weights for every architecture of ``space``; see the module docstring."""

    def __init__(self, space: SearchSpace, teacher: PreTrainedModel):
        super().__init__()
        parts = teacher_parts(teacher)  # a BERT teacher, or a random BERT at the max dims
        self.space, self.teacher_config = space, teacher.config
        self.head_size = parts["head_size"]
        archs = space.check_valid()
        if any(a.head_size != self.head_size for a in archs):
            raise UserError(f"space: the supernet needs every head {self.head_size} wide (the "
                            f"teacher's); set space.head_size: {self.head_size}")
        t_hidden = parts["word"].shape[1]
        t_ffn = parts["layers"][0]["fi"][0].shape[0]
        self.max_layers = max(a.num_layers for a in archs)
        self.max_hidden = max(a.hidden_size for a in archs)
        self.max_ffn = max(a.intermediate_size for a in archs)
        factorized = [a.embedding_size for a in archs if a.embedding_size != a.hidden_size]
        self.max_emb = max(factorized, default=0)
        check_width(self.max_hidden, self.max_ffn, t_hidden, t_ffn, what="the supernet")

        # residual dims: the teacher's top-H_max by LayerNorm scale, most important first
        res = _descending(residual_scores(parts))[:self.max_hidden]

        def param(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.detach().clone().contiguous())

        self.word = param(parts["word"][:, res])
        self.pos = param(parts["pos"][:, res])
        self.typ = param(parts["type"][:, res])
        self.emb_ln_w, self.emb_ln_b = (param(t[res]) for t in parts["emb_ln"])
        if self.max_emb:
            basis, f_word, f_pos, f_type = embedding_basis(self.word, self.pos, self.typ,
                                                           self.max_emb)  # (H_max, E_max)
            self.f_word, self.f_pos, self.f_type = param(f_word), param(f_pos), param(f_type)
            self.f_ln_w = nn.Parameter(torch.ones(self.max_emb))
            self.f_ln_b = nn.Parameter(torch.zeros(self.max_emb))
            # scaled by sqrt(H_max / E) at slice time: see build._embedding_state
            self.f_proj_w = param((self.emb_ln_w.detach()[:, None].double() * basis).float())
            self.f_proj_b = param(self.emb_ln_b.detach())

        self.teacher_layers = select_layers(len(parts["layers"]), self.max_layers)
        self.layers = nn.ModuleList()
        hs = self.head_size
        for t in self.teacher_layers:
            layer = parts["layers"][t]
            heads = head_dims(_descending(head_scores(layer, hs))[:self.max_hidden // hs], hs)
            ffn = _descending(ffn_scores(layer))[:self.max_ffn]
            rows_cols = {"q": (heads, res), "k": (heads, res), "v": (heads, res),
                         "o": (res, heads), "fi": (ffn, res), "fo": (res, ffn)}
            m = nn.Module()
            for key in _LAYER_KEYS:
                w, b = layer[key]
                if key in rows_cols:
                    rows, cols = rows_cols[key]
                    w, b = w[rows][:, cols], b[rows]
                else:  # LayerNorm
                    w, b = w[res], b[res]
                m.register_parameter(key + "_w", param(w))
                m.register_parameter(key + "_b", param(b))
            self.layers.append(m)
        pw, pb = parts["pooler"]
        self.pooler_w, self.pooler_b = param(pw[res][:, res]), param(pb[res])
        cw, cb = parts["cls"]
        self.cls_w, self.cls_b = param(cw[:, res]), param(cb)
        self._skeletons: dict[ArchConfig, PreTrainedModel] = {}

    # ------------------------------------------------------------------------------ slicing

    def layer_map(self, arch: ArchConfig) -> list[int]:
        """The supernet layer each student layer (ALBERT: each group) uses."""
        return group_layers(arch, select_layers(self.max_layers, arch.num_layers))

    def check(self, arch: ArchConfig) -> None:
        arch.validate()
        if arch.head_size != self.head_size:
            raise UserError(f"{arch.name}: head size {arch.head_size}, the supernet's is "
                            f"{self.head_size}")
        if arch.num_layers > self.max_layers or arch.hidden_size > self.max_hidden or \
                arch.intermediate_size > self.max_ffn:
            raise UserError(f"{arch.name}: larger than the supernet (L{self.max_layers}, "
                            f"H{self.max_hidden}, F{self.max_ffn})")
        if arch.embedding_size != arch.hidden_size and arch.embedding_size > self.max_emb:
            raise UserError(f"{arch.name}: embedding size {arch.embedding_size} is not in the "
                            f"supernet (factorized up to {self.max_emb or 'none'})")

    def state(self, arch: ArchConfig) -> dict[str, torch.Tensor]:
        """The student's state dict as slices (views) of the shared weights: what ``forward``
        runs and ``extract`` copies."""
        self.check(arch)
        h, f, e = arch.hidden_size, arch.intermediate_size, arch.embedding_size
        nh = arch.num_heads * self.head_size
        prefix = "albert" if arch.is_albert else "bert"
        emb = f"{prefix}.embeddings."
        out: dict[str, torch.Tensor] = {}
        if e == h:
            out.update({emb + "word_embeddings.weight": self.word[:, :h],
                        emb + "position_embeddings.weight": self.pos[:, :h],
                        emb + "token_type_embeddings.weight": self.typ[:, :h],
                        emb + "LayerNorm.weight": self.emb_ln_w[:h],
                        emb + "LayerNorm.bias": self.emb_ln_b[:h]})
            if arch.is_albert:  # sharing only: an identity projection, as in build
                out["albert.encoder.embedding_hidden_mapping_in.weight"] = torch.eye(h)
                out["albert.encoder.embedding_hidden_mapping_in.bias"] = torch.zeros(h)
        else:
            out.update({emb + "word_embeddings.weight": self.f_word[:, :e],
                        emb + "position_embeddings.weight": self.f_pos[:, :e],
                        emb + "token_type_embeddings.weight": self.f_type[:, :e],
                        emb + "LayerNorm.weight": self.f_ln_w[:e],
                        emb + "LayerNorm.bias": self.f_ln_b[:e],
                        "albert.encoder.embedding_hidden_mapping_in.weight":
                            self.f_proj_w[:h, :e] * math.sqrt(self.max_hidden / e),
                        "albert.encoder.embedding_hidden_mapping_in.bias": self.f_proj_b[:h]})
        slices = {"q": (nh, h), "k": (nh, h), "v": (nh, h), "o": (h, nh), "fi": (f, h),
                  "fo": (h, f)}
        for i, s in enumerate(self.layer_map(arch)):
            layer = self.layers[s]
            names = albert_names(i) if arch.is_albert else bert_names(i)
            for key in _LAYER_KEYS:
                w, b = getattr(layer, key + "_w"), getattr(layer, key + "_b")
                rows, cols = slices.get(key, (h, None))
                out[names[key] + ".weight"] = w[:rows, :cols] if cols else w[:rows]
                out[names[key] + ".bias"] = b[:rows]
        pooler = "albert.pooler" if arch.is_albert else "bert.pooler.dense"
        out[pooler + ".weight"] = self.pooler_w[:h, :h]
        out[pooler + ".bias"] = self.pooler_b[:h]
        out["classifier.weight"] = self.cls_w[:, :h]
        out["classifier.bias"] = self.cls_b
        return out

    def _skeleton(self, arch: ArchConfig) -> PreTrainedModel:
        """The architecture's ``transformers`` model without weights (meta device), with its
        real buffers, built once per architecture."""
        if arch not in self._skeletons:
            config = student_config(arch, self.teacher_config)
            cls = AlbertForSequenceClassification if arch.is_albert else \
                BertForSequenceClassification
            with torch.device("meta"):
                model = cls(config)
            for name, buf in list(model.named_buffers()):
                module_name, _, attr = name.rpartition(".")
                module = model.get_submodule(module_name)
                if attr == "position_ids":
                    real = torch.arange(buf.shape[-1]).expand(buf.shape)
                elif attr == "token_type_ids":
                    real = torch.zeros(buf.shape, dtype=torch.long)
                else:
                    raise RuntimeError(f"supernet: unknown buffer {name} in {cls.__name__}")
                module.register_buffer(attr, real.contiguous(), persistent=False)
            self._skeletons[arch] = model
        return self._skeletons[arch]

    def forward(self, arch: ArchConfig, **inputs):
        """Run ``arch`` as a slice of the shared weights (gradients reach them)."""
        model = self._skeleton(arch)
        model.train(self.training)
        return torch.func.functional_call(model, self.state(arch), args=(), kwargs=inputs,
                                          strict=False)

    def extract(self, arch: ArchConfig) -> PreTrainedModel:
        """A standalone ``Bert``/``AlbertForSequenceClassification`` with the sliced weights
        (the same classes as a trial's student; ``export`` writes it)."""
        config = student_config(arch, self.teacher_config)
        cls = AlbertForSequenceClassification if arch.is_albert else BertForSequenceClassification
        model = cls(config)
        state = {k: v.detach().clone().contiguous() for k, v in self.state(arch).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        buffers = {n for n, _ in model.named_buffers()}
        if [k for k in missing if k not in buffers] or unexpected:
            raise RuntimeError(f"supernet slicing: missing {missing}, unexpected {unexpected}")
        return model.eval()

    # ------------------------------------------------------------------- gated (differentiable)

    def dims(self) -> list[tuple[str, tuple]]:
        """The dimensions a gate vector is given for, with their choices (space order)."""
        # heads follow hidden (one head width throughout), so they get no gate of their own
        return [(k, v) for k, v in self.space.choices().items() if k != "num_heads"]

    def arch_of(self, index: dict[str, int]) -> ArchConfig:
        """The architecture of one choice index per dimension (may raise InvalidArch)."""
        c = {n: choices[index[n]] for n, choices in self.dims()}
        return self.space._resolve(c["num_layers"], c["hidden_size"],
                                   c["hidden_size"] // self.head_size, c["intermediate_size"],
                                   c["embedding_size"], c["num_hidden_groups"])

    def _masked_ln(self, x, w, b, mask):
        """LayerNorm over the active dims (``mask``, 0/1 forward, differentiable)."""
        n = mask.sum()
        mean = (x * mask).sum(-1, keepdim=True) / n
        var = (((x - mean) * mask) ** 2).sum(-1, keepdim=True) / n
        eps = self.teacher_config.layer_norm_eps
        return ((x - mean) / torch.sqrt(var + eps) * w + b) * mask

    def gated_forward(self, gates: dict[str, torch.Tensor], input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None, *,
                      layer_probs: torch.Tensor | None = None,
                      skip_below: float = 0.0) -> torch.Tensor:
        """Logits of the supernet under ``gates`` (one vector per ``dims()`` entry, summing to
        one; the chosen architecture is each vector's argmax). With ``layer_probs`` (the
        probability of each ``num_layers`` choice), a layer the chosen architecture does not run
        is skipped where the choices that run it hold less than ``skip_below`` together: with
        hard gates its output is multiplied by zero anyway, so only their gradient is lost."""
        from transformers.activations import ACT2FN

        act = ACT2FN[self.teacher_config.hidden_act]
        sp, hs = self.space, self.head_size
        choice = {n: int(gates[n].argmax()) for n, _ in self.dims()}
        arch = self.arch_of(choice)
        self.check(arch)
        dev = self.word.device
        ar_h = torch.arange(self.max_hidden, device=dev)
        ar_f = torch.arange(self.max_ffn, device=dev)
        ar_a = torch.arange(self.max_hidden // hs, device=dev)
        g_h, g_f = gates["hidden_size"], gates["intermediate_size"]
        m_h = sum(g * (ar_h < h).float() for g, h in zip(g_h, sp.hidden_size))
        m_a = sum(g * (ar_a < h // hs).float() for g, h in zip(g_h, sp.hidden_size))
        m_f = sum(g * (ar_f < f).float() for g, f in zip(g_f, sp.intermediate_size))
        drop = self.teacher_config.hidden_dropout_prob if self.training else 0.0
        a_drop = self.teacher_config.attention_probs_dropout_prob if self.training else 0.0

        bsz, seq = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        pos_ids = torch.arange(seq, device=dev)

        # embeddings: the gated sum of the BERT form and each factorized width
        emb = 0.0
        for g, e in zip(gates["embedding_size"], sp.embedding_size):
            if e == HIDDEN:
                x = self.word[input_ids] + self.typ[token_type_ids] + self.pos[pos_ids]
                x = self._masked_ln(x, self.emb_ln_w, self.emb_ln_b, m_h)
            else:
                m_e = (torch.arange(self.max_emb, device=dev) < e).float()
                z = self.f_word[input_ids] + self.f_type[token_type_ids] + self.f_pos[pos_ids]
                z = self._masked_ln(z, self.f_ln_w, self.f_ln_b, m_e)
                z = F.dropout(z, drop, self.training)
                x = (F.linear(z, self.f_proj_w * math.sqrt(self.max_hidden / e), self.f_proj_b)
                     * m_h)
            emb = emb + g * x
        x = F.dropout(emb, drop, self.training) if arch.embedding_size == arch.hidden_size \
            else emb  # ALBERT drops out in E space (above); BERT after its LayerNorm

        key_bias = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(x.dtype).min
        layers = arch.num_layers
        active = select_layers(self.max_layers, layers)
        for i in range(self.max_layers):
            uses = [float(i in select_layers(self.max_layers, n)) for n in sp.num_layers]
            if layer_probs is not None and i not in active and \
                    float(sum(p * u for p, u in zip(layer_probs, uses))) < skip_below:
                continue
            gate = sum(g * u for g, u in zip(gates["num_layers"], uses))
            j = active.index(i) if i in active else None
            weights = {}
            for key in _LAYER_KEYS:  # the sharing groups choose whose weights layer i runs
                w = b = 0.0
                for g, groups in zip(gates["num_hidden_groups"], sp.num_hidden_groups):
                    n_groups = layers if groups == ALL else groups
                    if j is None or layers % n_groups:
                        src = i
                    else:
                        per = layers // n_groups
                        src = active[(j // per) * per]
                    w = w + g * getattr(self.layers[src], key + "_w")
                    b = b + g * getattr(self.layers[src], key + "_b")
                weights[key] = (w, b)
            y = self._gated_layer(x, weights, key_bias, m_h, m_a, m_f, act, drop, a_drop)
            x = x + gate * (y - x)
        pooled = torch.tanh(F.linear(x[:, 0], self.pooler_w, self.pooler_b)) * m_h
        pooled = F.dropout(pooled, drop, self.training)
        return F.linear(pooled, self.cls_w, self.cls_b)

    def _gated_layer(self, x, w, key_bias, m_h, m_a, m_f, act, drop, a_drop):
        bsz, seq, _ = x.shape
        hs = self.head_size
        n_heads = self.max_hidden // hs

        def heads(t):
            return t.view(bsz, seq, n_heads, hs).transpose(1, 2)

        q, k, v = (heads(F.linear(x, *w[n])) for n in ("q", "k", "v"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hs) + key_bias
        probs = F.dropout(scores.softmax(-1), a_drop, self.training)
        ctx = (probs @ v) * m_a[None, :, None, None]
        ctx = ctx.transpose(1, 2).reshape(bsz, seq, n_heads * hs)
        attn = F.dropout(F.linear(ctx, *w["o"]) * m_h, drop, self.training)
        attn = self._masked_ln(attn + x, *w["ln1"], m_h)
        inter = act(F.linear(attn, *w["fi"])) * m_f
        out = F.dropout(F.linear(inter, *w["fo"]) * m_h, drop, self.training)
        return self._masked_ln(out + attn, *w["ln2"], m_h)

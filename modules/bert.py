"""A prunable BERT encoder for sequence classification that loads Hugging Face BERT weights.

transformers 5 has no ``head_mask`` or ``prune_heads`` and hides attention
probabilities behind its attention dispatch, so the encoder layers here are our own.
Parameter names match ``transformers.BertForSequenceClassification`` exactly, so HF
state dicts load unchanged, and with nothing pruned the logits equal HF's.

What the encoder adds over HF BERT:

* per-layer token importance scores (attention *received*, arXiv 2306.14393 Sec. 3.1),
* a ``token_pruner`` hook that returns a keep mask before each pruning layer:
  soft (float in [0, 1]) masks re-weight keys during training, hard (bool) masks
  exclude keys, and with ``remove_pruned=True`` the closed tokens are gathered out
  so later layers really run on shorter sequences,
* analytic MACs per layer (:func:`layer_macs`).

Shapes: ``B`` batch, ``N`` sequence length (tokens), ``H`` hidden size, ``A`` heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.activations import ACT2FN
from transformers.models.bert.modeling_bert import BertEmbeddings, BertPooler


class TokenPrunerHook(Protocol):
    """What the encoder asks of a token pruner (implemented by ``pruners.top.TokenGates``)."""

    pruning_layers: tuple[int, ...]

    def token_keep(self, layer: int, scores: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """Keep mask for the tokens entering ``layer``.

        Args:
            layer: index of the encoder layer about to run.
            scores: (B, N) importance of each token from the previous layer.
            alive: (B, N) bool, tokens still present (not padding, not pruned).

        Returns:
            (B, N) keep mask: float in [0, 1] while training, bool at evaluation.
        """


def layer_macs(
    seq_len: torch.Tensor | float, hidden: int, intermediate: int, attention_width: int | None = None
) -> torch.Tensor | float:
    """Multiply-accumulates of one BERT encoder layer on ``seq_len`` tokens.

    QKV and output projections ``4 N H W``, attention scores and context ``2 N^2 W``,
    feed-forward ``2 N H I``, where ``W`` (= H unless heads were removed) is the total
    width of the attention heads. Softmax, LayerNorm and biases are left out, as in the
    analytic FLOPs constraint of arXiv 2306.14393 Sec. 3.3.

    Args:
        seq_len: tokens in the layer, a float or a tensor of any shape (per sample).
        hidden: hidden size H.
        intermediate: feed-forward size I (neurons present).
        attention_width: A * head_dim of the heads present; None means H.

    Returns:
        MACs, same type and shape as ``seq_len``.
    """
    n = seq_len
    w = hidden if attention_width is None else attention_width
    return 4 * n * hidden * w + 2 * n * n * w + 2 * n * hidden * intermediate


@dataclass
class EncoderOutput:
    """What :class:`PrunableBertForSequenceClassification` returns.

    Attributes:
        logits: (B, num_labels).
        scores: per layer, (B, N_l) attention received by each token in that layer
            (mean over heads and over present queries); only filled when requested.
        kept_lengths: per layer, (B,) number of tokens (CLS included, padding
            excluded) that the layer computed on; with soft masks, the expected number.
    """

    logits: torch.Tensor
    scores: list[torch.Tensor] = field(default_factory=list)
    kept_lengths: list[torch.Tensor] = field(default_factory=list)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention whose keys can be masked or softly re-weighted.

    Args:
        config: a ``transformers.BertConfig``.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                f"{config.num_attention_heads}; fix the BertConfig."
            )
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    @property
    def num_heads(self) -> int:
        """Heads currently present (derived from the projection size, so it follows shrinking)."""
        return self.query.out_features // self.head_dim

    def forward(
        self,
        hidden: torch.Tensor,
        key_mask: torch.Tensor | None,
        key_weight: torch.Tensor | None = None,
        need_probs: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend.

        Args:
            hidden: (B, N, H).
            key_mask: (B, N) bool, keys that may be attended to; None means all.
            key_weight: (B, N) float soft keep weights in [0, 1]; the attention
                probabilities are multiplied by them and renormalised.
            need_probs: return the attention probabilities.

        Returns:
            context (B, N, A * head_dim) and probabilities (B, A, N, N) or None.
        """
        b, n, _ = hidden.shape
        a, d = self.num_heads, self.head_dim
        q = self.query(hidden).view(b, n, a, d).transpose(1, 2)
        k = self.key(hidden).view(b, n, a, d).transpose(1, 2)
        v = self.value(hidden).view(b, n, a, d).transpose(1, 2)
        additive = None
        if key_mask is not None:
            additive = torch.zeros(b, 1, 1, n, dtype=hidden.dtype, device=hidden.device)
            additive.masked_fill_(~key_mask[:, None, None, :], torch.finfo(hidden.dtype).min)
        dropout = self.dropout_p if self.training else 0.0
        if not need_probs and key_weight is None:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, dropout_p=dropout)
            return context.transpose(1, 2).reshape(b, n, a * d), None
        logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
        if additive is not None:
            logits = logits + additive
        probs = logits.softmax(dim=-1)
        if key_weight is not None:
            # Soft token gates: p_ij * w_j / sum_k p_ik * w_k. Equals masking when w is 0/1.
            probs = probs * key_weight[:, None, None, :]
            probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        context = torch.matmul(F.dropout(probs, p=dropout, training=self.training), v)
        return context.transpose(1, 2).reshape(b, n, a * d), probs


class ProjectResidualNorm(nn.Module):
    """Linear projection to the hidden size, dropout, residual add and LayerNorm.

    Serves as HF's ``BertSelfOutput`` (after attention, ``in_features`` = A * head_dim)
    and ``BertOutput`` (after the feed-forward expansion, ``in_features`` = I); the
    attribute names match HF's so weights load unchanged.
    """

    def __init__(self, in_features: int, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """(B, N, in_features), (B, N, H) -> (B, N, H)."""
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    """Self-attention plus its output block, named as in HF so weights load unchanged."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = ProjectResidualNorm(config.hidden_size, config)


class BertIntermediate(nn.Module):
    """Feed-forward expansion H -> I with the configured activation."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, N, H) -> (B, N, I)."""
        return self.act(self.dense(hidden))


class BertLayer(nn.Module):
    """One post-LayerNorm transformer encoder layer."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = ProjectResidualNorm(config.intermediate_size, config)

    def forward(
        self,
        hidden: torch.Tensor,
        key_mask: torch.Tensor | None,
        key_weight: torch.Tensor | None = None,
        need_probs: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N, H) -> (B, N, H), plus attention probabilities (B, A, N, N) if asked."""
        context, probs = self.attention.self(hidden, key_mask, key_weight, need_probs)
        attended = self.attention.output(context, hidden)
        return self.output(self.intermediate(attended), attended), probs


class BertEncoder(nn.Module):
    """The stack of encoder layers (HF name ``encoder.layer.{i}``)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class PrunableBertModel(nn.Module):
    """Embeddings, encoder and pooler; parameter names as in HF ``BertModel``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)


def attention_received(probs: torch.Tensor, query_present: torch.Tensor) -> torch.Tensor:
    """Token importance: attention each token receives, averaged over heads and present queries.

    arXiv 2306.14393 Sec. 3.1 (the score ToP ranks tokens by).

    Args:
        probs: (B, A, N, N) attention probabilities (query, key).
        query_present: (B, N) bool or float weights of the queries to average over.

    Returns:
        (B, N) scores; padding keys get about 0.
    """
    per_query = probs.mean(dim=1)  # (B, N, N)
    w = query_present.to(probs.dtype)
    return (per_query * w[:, :, None]).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp_min(1e-12)


def gather_tokens(keep: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Physically remove closed tokens: keep the open ones, in order, padded to the batch maximum.

    Args:
        keep: (B, N) bool.
        tensors: tensors of shape (B, N, ...) to gather along dim 1.

    Returns:
        the new presence mask (B, N') bool and the gathered tensors (B, N', ...),
        where N' is the largest number of kept tokens in the batch.
    """
    counts = keep.sum(dim=1)
    n_new = int(counts.max())
    # Stable sort puts kept tokens first in their original order (CLS stays at 0).
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :n_new]
    new_keep = torch.gather(keep, 1, order)
    out = []
    for t in tensors:
        idx = order.view(*order.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
        out.append(torch.gather(t, 1, idx))
    return new_keep, out


class PrunableBertForSequenceClassification(nn.Module):
    """BERT with a classification head on the pooled [CLS] state, with token pruning hooks.

    Parameter names equal ``transformers.BertForSequenceClassification`` so HF
    checkpoints load with ``load_state_dict``.

    Args:
        config: ``transformers.BertConfig`` (``num_labels`` sets the head size).
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = PrunableBertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    @classmethod
    def from_pretrained(cls, path: str | Path, num_labels: int) -> "PrunableBertForSequenceClassification":
        """Load a local HF BERT folder (config.json + weights); the classifier head is new.

        Args:
            path: folder holding a BERT ``config.json`` and ``model.safetensors`` or
                ``pytorch_model.bin`` (e.g. a user's ``bert-base-uncased``).
            num_labels: classes of the task.

        Raises:
            FileNotFoundError: the folder or its config.json does not exist.
            ValueError: the folder holds a model that is not BERT.
        """
        from transformers import BertForSequenceClassification
        from transformers.utils import logging as hf_logging

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"No BERT checkpoint at {path}: expected config.json and weights there. "
                "Set model.pretrained to a local Hugging Face BERT folder."
            )
        config = BertConfig.from_pretrained(path, num_labels=num_labels)
        if config.model_type != "bert":
            raise ValueError(f"{path} holds a {config.model_type!r} model; model.pretrained must be a BERT folder.")
        verbosity = hf_logging.get_verbosity()
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # the "newly initialised classifier" warning is expected
        hf_logging.disable_progress_bar()
        try:
            hf = BertForSequenceClassification.from_pretrained(path, config=config)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bar:
                hf_logging.enable_progress_bar()
        model = cls(config)
        model.load_state_dict(hf.state_dict(), strict=True)
        return model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        token_pruner: TokenPrunerHook | None = None,
        remove_pruned: bool = False,
        return_scores: bool = False,
    ) -> EncoderOutput:
        """Classify.

        Args:
            input_ids: (B, N) token ids.
            attention_mask: (B, N) 1 for tokens, 0 for padding; None means no padding.
            token_type_ids: (B, N) segment ids; None means all 0.
            token_pruner: asked for a keep mask before each of its pruning layers.
            remove_pruned: gather out tokens whose (bool) keep mask is False, so later
                layers run on shorter sequences. Requires the pruner to return bool masks.
            return_scores: also return the per-layer token scores.

        Returns:
            :class:`EncoderOutput`.

        Raises:
            ValueError: ``remove_pruned`` with a pruner that returns soft masks.
        """
        b, n = input_ids.shape
        present = (
            torch.ones(b, n, dtype=torch.bool, device=input_ids.device)
            if attention_mask is None
            else attention_mask.bool()
        )
        hidden = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        pruning_layers = set(token_pruner.pruning_layers) if token_pruner is not None else set()
        # Scores of layer l are needed when layer l + 1 prunes.
        need_scores = {l - 1 for l in pruning_layers}
        has_padding = not bool(present.all())
        key_mask = present if has_padding else None
        weight: torch.Tensor | None = None  # cumulative soft keep, training only
        out = EncoderOutput(logits=torch.empty(0))
        scores = None
        for i, layer in enumerate(self.bert.encoder.layer):
            if i in pruning_layers:
                alive = present if weight is None else present & (weight > 0)
                keep = token_pruner.token_keep(i, scores, alive)
                if keep.dtype == torch.bool:
                    present = present & keep
                    if remove_pruned:
                        present, (hidden,) = gather_tokens(present, hidden)
                    key_mask = present
                else:
                    if remove_pruned:
                        raise ValueError("remove_pruned needs hard (bool) keep masks: call model.eval() first.")
                    weight = keep if weight is None else weight * keep
            n_tokens = present.sum(dim=1).to(hidden.dtype) if weight is None else (weight * present).sum(dim=1)
            out.kept_lengths.append(n_tokens)
            want = return_scores or i in need_scores
            hidden, probs = layer(hidden, key_mask, weight, need_probs=want)
            if want:
                scores = attention_received(probs, present if weight is None else weight * present)
                if return_scores:
                    out.scores.append(scores)
        pooled = self.bert.pooler(hidden)
        out.logits = self.classifier(self.dropout(pooled))
        return out

    def macs(self, kept_lengths: list[torch.Tensor]) -> torch.Tensor:
        """MACs per sample of the encoder layers plus pooler and classifier.

        Args:
            kept_lengths: per layer, (B,) tokens computed on (from :class:`EncoderOutput`).

        Returns:
            (B,) MACs.
        """
        c = self.config
        total = sum(
            layer_macs(n, c.hidden_size, layer.intermediate.dense.out_features, layer.attention.self.query.out_features)
            for n, layer in zip(kept_lengths, self.bert.encoder.layer)
        )
        return total + c.hidden_size * c.hidden_size + c.hidden_size * c.num_labels


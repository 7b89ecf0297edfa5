"""A prunable BERT encoder for sequence classification that loads Hugging Face BERT weights.

transformers 5 has no ``head_mask`` or ``prune_heads`` and hides attention
probabilities behind its attention dispatch, so the encoder layers here are our own.
Parameter names match ``transformers.BertForSequenceClassification`` exactly, so HF
state dicts load unchanged, and with nothing pruned the logits equal HF's.

What the encoder adds over HF BERT:

* per-layer token importance scores (attention *received*, arXiv 2306.14393 Sec. 3.1),
* a ``token_pruner`` hook asked for pruning layer ``l``'s keep mask right after layer
  ``l - 1``'s attention (which ranks the tokens), so layer ``l - 1``'s token-wise FFN
  already runs on the kept tokens, as ToP's reference code counts it (arXiv 2306.14393,
  ``calculate_mac_for_encoder``). Soft (float) masks re-weight keys in training, hard
  (bool) masks exclude keys, and ``remove_pruned=True`` gathers closed tokens out,
* analytic MACs per layer (:func:`layer_macs`), each FFN counted on the tokens it runs on,
* structured masks for training without changing parameter shapes: per layer a
  head mask (A,) and an FFN neuron mask (I,), float 0/1 buffers saved in the state
  dict (``...attention.self.head_mask``, ``...intermediate.neuron_mask``). A head
  mask multiplies each head's context before the attention output projection
  (the mask variable xi_h of Michel et al. 2019, arXiv 1905.10650); a neuron mask
  multiplies the intermediate activations. With all-ones masks (the default) they
  are not applied at all, so the forward is exactly the unmasked one. Masks never
  speed anything up: ``modules.nn.structured.shrink_structured`` builds the physically
  smaller copy whose latency and :meth:`~PrunableBertForSequenceClassification.macs`
  really drop.

Shapes: ``B`` batch, ``N`` sequence length (tokens), ``H`` hidden size, ``A`` heads,
``I`` intermediate (FFN) neurons, ``L`` encoder layers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig

from modules.core.errors import MissingFileError, UserError
from modules.nn.tokens import attention_received, gather_tokens
from transformers.activations import ACT2FN
from transformers.models.bert.modeling_bert import BertEmbeddings, BertPooler


class NotBertError(UserError, ValueError):
    """``model.pretrained`` holds a model that is not BERT."""


class TokenPrunerHook(Protocol):
    """What the encoder asks of a token pruner (implemented by :class:`modules.nn.gates.TokenGates`)."""

    pruning_layers: tuple[int, ...]

    def token_keep(self, layer: int, scores: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """Keep mask for pruning layer ``layer``, asked after layer ``layer - 1``'s attention sublayer.

        The mask applies from layer ``layer - 1``'s feed-forward block on.

        Args:
            layer: index of the pruning layer (>= 1).
            scores: (B, N) importance of each token from layer ``layer - 1``'s attention.
            alive: (B, N) bool, tokens still present (not padding, not pruned).

        Returns:
            (B, N) keep mask: float in [0, 1] while training, bool at evaluation.
        """


def layer_macs(
    seq_len: torch.Tensor | float,
    hidden: int,
    intermediate: int,
    attention_width: int | None = None,
    ffn_len: torch.Tensor | float | None = None,
) -> torch.Tensor | float:
    """Multiply-accumulates of one BERT encoder layer: attention on ``seq_len`` tokens, FFN on ``ffn_len``.

    QKV and output projections ``4 N H W``, attention scores and context ``2 N^2 W``,
    feed-forward ``2 N_f H I``, where ``W`` (= H unless heads were removed) is the total
    width of the attention heads and ``N_f`` the tokens the feed-forward block runs on
    (fewer than ``N`` when tokens are dropped right after this layer's attention, as
    before a pruning layer). Softmax, LayerNorm and biases are left out, as in the
    analytic FLOPs constraint of arXiv 2306.14393 Sec. 3.3.

    Args:
        seq_len: tokens in the attention sublayer, a float or a tensor of any shape (per sample).
        hidden: hidden size H.
        intermediate: feed-forward size I (neurons present).
        attention_width: A * head_dim of the heads present; None means H.
        ffn_len: tokens in the feed-forward block, same type and shape as ``seq_len``;
            None means ``seq_len``.

    Returns:
        MACs, same type and shape as ``seq_len``.
    """
    n = seq_len
    n_ffn = seq_len if ffn_len is None else ffn_len
    w = hidden if attention_width is None else attention_width
    return 4 * n * hidden * w + 2 * n * n * w + 2 * n_ffn * hidden * intermediate


@dataclass
class EncoderOutput:
    """What :class:`PrunableBertForSequenceClassification` returns.

    Attributes:
        logits: (B, num_labels).
        scores: per layer, (B, N_l) attention received by each token in that layer
            (mean over heads and over present queries); only filled when requested.
        kept_lengths: per layer, (B,) number of tokens (CLS included, padding
            excluded) that the layer's attention sublayer computed on; with soft masks,
            the expected number. Layer i's feed-forward block runs on layer i+1's count
            (the last layer's on its own), see
            :meth:`PrunableBertForSequenceClassification.macs`.
        kept_masks: per layer, (B, N) bool in the input's token positions, the tokens in
            the layer's attention (with soft masks: not fully closed); with ``return_kept_masks``.
    """

    logits: torch.Tensor
    scores: list[torch.Tensor] = field(default_factory=list)
    kept_lengths: list[torch.Tensor] = field(default_factory=list)
    kept_masks: list[torch.Tensor] = field(default_factory=list)


def _check_unit_mask(mask: torch.Tensor, expected: int, what: str) -> torch.Tensor:
    """Validate a structured mask: 1-D, ``expected`` entries, every value 0 or 1.

    Raises:
        ValueError: wrong shape or a value other than 0/1; the message names ``what``.
    """
    mask = torch.as_tensor(mask)
    if mask.dim() != 1 or mask.shape[0] != expected:
        raise ValueError(f"{what}: got shape {tuple(mask.shape)}, expected ({expected},) (one entry per unit present).")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{what}: values must be 0 (removed) or 1 (kept), got {mask.tolist()}.")
    return mask


def _masks_missing_means_ones(module: nn.Module, name: str, prefix: str, missing_keys: list[str]) -> None:
    """After loading a state dict without mask ``name`` (HF weights, older checkpoints): all ones."""
    key = prefix + name
    if key in missing_keys:
        missing_keys.remove(key)
        with torch.no_grad():
            getattr(module, name).fill_(1.0)


def _slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new ``nn.Linear`` holding the given output rows / input columns of ``linear`` (copies, same dtype/device).

    Zero rows or columns are allowed (a linear map from or to an empty space).
    """
    w = linear.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    with warnings.catch_warnings():  # no init happens, but torch warns for zero-size layers
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        out = nn.utils.skip_init(
            nn.Linear, w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype
        )
    with torch.no_grad():
        out.weight.copy_(w)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach() if rows is None else linear.bias.detach()[rows])
    out.weight.requires_grad_(linear.weight.requires_grad)
    if linear.bias is not None:
        out.bias.requires_grad_(linear.bias.requires_grad)
    return out


class BertSelfAttention(nn.Module):
    """Multi-head self-attention whose keys can be masked or softly re-weighted.

    Holds ``head_mask`` (A,), a float 0/1 buffer (saved in the state dict; missing in
    HF state dicts, which then load as all ones). Set it with :meth:`set_head_mask`,
    which also switches its application on or off; a mask that requires grad is
    always applied (how :func:`modules.nn.structured.taylor_importance` takes dL/dm).

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
        self.register_buffer("head_mask", torch.ones(config.num_attention_heads))
        self._head_masked = False  # True when head_mask holds a 0 (kept in sync by set_head_mask / loading)

    @property
    def head_mask_applied(self) -> bool:
        """Whether forward multiplies the heads' context by ``head_mask``."""
        return self._head_masked or self.head_mask.requires_grad

    def set_head_mask(self, mask: torch.Tensor, what: str = "head mask") -> None:
        """Copy a (A,) float 0/1 mask into ``head_mask`` (A = heads present).

        Raises:
            ValueError: wrong length or a value other than 0/1 (message starts with ``what``).
        """
        mask = _check_unit_mask(mask, self.num_heads, what)
        with torch.no_grad():
            self.head_mask.copy_(mask)
        self._head_masked = not bool((self.head_mask == 1).all())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *rest):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *rest)
        _masks_missing_means_ones(self, "head_mask", prefix, missing_keys)
        self._head_masked = not bool((self.head_mask == 1).all())

    def keep_heads(self, heads: torch.Tensor) -> None:
        """Physically keep only ``heads`` (1-D long indices, ascending): slices Q/K/V output rows.

        In place and shape-changing: an optimizer holding the old parameters goes stale
        (call it on a copy, see :func:`modules.nn.structured.shrink_structured`). The caller
        also slices the columns of the attention output projection. ``head_mask``
        becomes all ones of the new length.
        """
        d = self.head_dim
        rows = (heads[:, None] * d + torch.arange(d, device=heads.device)[None, :]).reshape(-1)
        self.query = _slice_linear(self.query, rows=rows)
        self.key = _slice_linear(self.key, rows=rows)
        self.value = _slice_linear(self.value, rows=rows)
        self.head_mask = torch.ones(len(heads), dtype=self.head_mask.dtype, device=self.head_mask.device)
        self._head_masked = False

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
            context (B, N, A * head_dim), masked heads' context zero, and probabilities
            (B, A, N, N) or None (masked heads' probabilities are not zeroed).
            With A = 0 (every head removed) the context is (B, N, 0) and the
            probabilities (B, 0, N, N).
        """
        b, n, _ = hidden.shape
        a, d = self.num_heads, self.head_dim
        if a == 0:
            probs = hidden.new_zeros(b, 0, n, n) if need_probs else None
            return hidden.new_zeros(b, n, 0), probs
        gate = self.head_mask[None, :, None, None] if self.head_mask_applied else None
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
            if gate is not None:
                context = context * gate.to(context.dtype)
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
        if gate is not None:
            context = context * gate.to(context.dtype)
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
    """Feed-forward expansion H -> I with the configured activation.

    Holds ``neuron_mask`` (I,), a float 0/1 buffer multiplying the activations
    (saved in the state dict; missing in HF state dicts, which then load as all
    ones). Set it with :meth:`set_neuron_mask`; a mask that requires grad is always applied.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.register_buffer("neuron_mask", torch.ones(config.intermediate_size))
        self._neuron_masked = False

    @property
    def neuron_mask_applied(self) -> bool:
        """Whether forward multiplies the activations by ``neuron_mask``."""
        return self._neuron_masked or self.neuron_mask.requires_grad

    def set_neuron_mask(self, mask: torch.Tensor, what: str = "neuron mask") -> None:
        """Copy a (I,) float 0/1 mask into ``neuron_mask`` (I = neurons present).

        Raises:
            ValueError: wrong length or a value other than 0/1 (message starts with ``what``).
        """
        mask = _check_unit_mask(mask, self.dense.out_features, what)
        with torch.no_grad():
            self.neuron_mask.copy_(mask)
        self._neuron_masked = not bool((self.neuron_mask == 1).all())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *rest):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *rest)
        _masks_missing_means_ones(self, "neuron_mask", prefix, missing_keys)
        self._neuron_masked = not bool((self.neuron_mask == 1).all())

    def keep_neurons(self, neurons: torch.Tensor) -> None:
        """Physically keep only ``neurons`` (1-D long indices, ascending): slices the dense rows.

        In place and shape-changing (use on a copy, see
        :func:`modules.nn.structured.shrink_structured`); the caller slices the columns of
        the FFN output projection. ``neuron_mask`` becomes all ones of the new length.
        """
        self.dense = _slice_linear(self.dense, rows=neurons)
        self.neuron_mask = torch.ones(len(neurons), dtype=self.neuron_mask.dtype, device=self.neuron_mask.device)
        self._neuron_masked = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, N, H) -> (B, N, I); masked neurons give 0."""
        out = self.act(self.dense(hidden))
        if self.neuron_mask_applied:
            out = out * self.neuron_mask.to(out.dtype)
        return out


class BertLayer(nn.Module):
    """One post-LayerNorm transformer encoder layer."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = ProjectResidualNorm(config.intermediate_size, config)

    def keep_units(self, heads: torch.Tensor, neurons: torch.Tensor) -> None:
        """Physically keep only the given heads and FFN neurons (1-D long indices, ascending).

        Slices Q/K/V output rows and the attention output projection's input columns
        per kept head, the intermediate dense rows and the FFN output projection's
        input columns per kept neuron. Empty index tensors remove every head (the
        attention sublayer then adds only its output bias before the LayerNorm) or
        every neuron (likewise for the FFN). In place and shape-changing: use on a
        copy (:func:`modules.nn.structured.shrink_structured`).
        """
        attn = self.attention.self
        d = attn.head_dim
        cols = (heads[:, None] * d + torch.arange(d, device=heads.device)[None, :]).reshape(-1)
        attn.keep_heads(heads)
        self.attention.output.dense = _slice_linear(self.attention.output.dense, cols=cols)
        self.intermediate.keep_neurons(neurons)
        self.output.dense = _slice_linear(self.output.dense, cols=neurons)

    def attend(
        self,
        hidden: torch.Tensor,
        key_mask: torch.Tensor | None,
        key_weight: torch.Tensor | None = None,
        need_probs: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention sublayer: (B, N, H) -> (B, N, H), plus probabilities (B, A, N, N) if asked."""
        context, probs = self.attention.self(hidden, key_mask, key_weight, need_probs)
        return self.attention.output(context, hidden), probs

    def feed_forward(self, attended: torch.Tensor) -> torch.Tensor:
        """The feed-forward block, token-wise: (B, N, H) -> (B, N, H)."""
        return self.output(self.intermediate(attended), attended)

    def forward(
        self,
        hidden: torch.Tensor,
        key_mask: torch.Tensor | None,
        key_weight: torch.Tensor | None = None,
        need_probs: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N, H) -> (B, N, H), plus attention probabilities (B, A, N, N) if asked."""
        attended, probs = self.attend(hidden, key_mask, key_weight, need_probs)
        return self.feed_forward(attended), probs


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
            raise MissingFileError(
                f"No BERT checkpoint at {path}: expected config.json and weights there. "
                "Set model.pretrained to a local Hugging Face BERT folder."
            )
        config = BertConfig.from_pretrained(path, num_labels=num_labels)
        if config.model_type != "bert":
            raise NotBertError(f"{path} holds a {config.model_type!r} model; model.pretrained must be a BERT folder.")
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
        return_kept_masks: bool = False,
    ) -> EncoderOutput:
        """Classify.

        Args:
            input_ids: (B, N) token ids.
            attention_mask: (B, N) 1 for tokens, 0 for padding; None means no padding.
            token_type_ids: (B, N) segment ids; None means all 0.
            token_pruner: asked for the keep mask of each of its pruning layers ``l`` right
                after layer ``l - 1``'s attention sublayer; the mask applies from layer
                ``l - 1``'s feed-forward block on.
            remove_pruned: gather out tokens whose (bool) keep mask is False, so later
                sublayers run on shorter sequences. Requires the pruner to return bool masks.
            return_scores: also return the per-layer token scores, always (B, N) in the
                input's token positions (removed tokens score 0, as masked ones do; all 0 in a headless layer).
            return_kept_masks: also return the per-layer masks of the tokens present
                (``kept_masks``), in the input's token positions.

        Returns:
            :class:`EncoderOutput`.

        Raises:
            ValueError: ``remove_pruned`` with a pruner that returns soft masks; a pruning layer scored by a headless layer.
        """
        b, n = input_ids.shape
        present = (
            torch.ones(b, n, dtype=torch.bool, device=input_ids.device)
            if attention_mask is None
            else attention_mask.bool()
        )
        hidden = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        pruning_layers = set(token_pruner.pruning_layers) if token_pruner is not None else set()
        has_padding = not bool(present.all())
        key_mask = present if has_padding else None
        weight: torch.Tensor | None = None  # cumulative soft keep, training only
        out = EncoderOutput(logits=torch.empty(0))
        # Input position of each current token; gathered along with the tokens so
        # returned scores stay in input coordinates after a removal.
        positions: torch.Tensor | None = None
        for i, layer in enumerate(self.bert.encoder.layer):
            n_tokens = present.sum(dim=1).to(hidden.dtype) if weight is None else (weight * present).sum(dim=1)
            out.kept_lengths.append(n_tokens)
            if return_kept_masks:
                here = present if weight is None else present & (weight > 0)
                out.kept_masks.append(
                    here if positions is None else here.new_zeros(b, n).scatter(1, positions, here)
                )
            prunes_next = (i + 1) in pruning_layers  # layer i's attention ranks the tokens layer i + 1 keeps
            want = return_scores or prunes_next
            attended, probs = layer.attend(hidden, key_mask, weight, need_probs=want)
            scores = None
            if want:
                attn = layer.attention.self
                try:
                    scores = attention_received(
                        probs,
                        present if weight is None else weight * present,
                        attn.head_mask if attn.head_mask_applied else None,
                    )
                except ValueError as err:  # a headless layer scores no token: zeros, unless a layer prunes by them
                    if prunes_next:
                        raise ValueError(f"Encoder layer {i} has every attention head removed or masked, so it gives "
                                         "no token scores; token pruning right after it needs them.") from err
                    scores = torch.zeros_like(present, dtype=hidden.dtype)
                if return_scores:
                    if positions is None:
                        out.scores.append(scores)
                    else:
                        full = scores.new_zeros(b, n)
                        out.scores.append(full.scatter(1, positions, scores * present.to(scores.dtype)))
            if prunes_next:
                # Tokens leave here, before layer i's feed-forward block (token-wise, so the kept
                # tokens' values are the same as when they leave at layer i + 1's input).
                alive = present if weight is None else present & (weight > 0)
                keep = token_pruner.token_keep(i + 1, scores, alive)
                if keep.dtype == torch.bool:
                    present = present & keep
                    if remove_pruned:
                        if (return_scores or return_kept_masks) and positions is None:
                            positions = torch.arange(n, device=hidden.device).expand(b, n)
                        if positions is None:
                            present, (attended,) = gather_tokens(present, attended)
                        else:
                            present, (attended, positions) = gather_tokens(present, attended, positions)
                    key_mask = present
                else:
                    if remove_pruned:
                        raise ValueError("remove_pruned needs hard (bool) keep masks: call model.eval() first.")
                    weight = keep if weight is None else weight * keep
            hidden = layer.feed_forward(attended)
        pooled = self.bert.pooler(hidden)
        out.logits = self.classifier(self.dropout(pooled))
        return out

    # ------------------------------------------------------- structured masks
    def set_structured_masks(
        self,
        heads: torch.Tensor | list[torch.Tensor] | None = None,
        neurons: torch.Tensor | list[torch.Tensor] | None = None,
    ) -> None:
        """Set the per-layer head and FFN neuron masks (training-time gates; shapes unchanged).

        Args:
            heads: (L, A) float 0/1, or a list of L tensors (A_l,) with A_l the heads
                present in layer l; None leaves the head masks as they are.
            neurons: (L, I) float 0/1, or a list of L tensors (I_l,); None leaves them.

        Raises:
            ValueError: not one mask per layer, a mask of the wrong length (the message
                names the layer and the expected length), or a value other than 0/1.
        """
        layers = self.bert.encoder.layer
        # Validate everything first, so a bad mask leaves every layer as it was.
        for kind, masks in (("head", heads), ("neuron", neurons)):
            if masks is None:
                continue
            if len(masks) != len(layers):
                raise ValueError(f"{kind} masks: got {len(masks)}, expected one per encoder layer ({len(layers)}).")
            for i, (layer, mask) in enumerate(zip(layers, masks)):
                size = layer.attention.self.num_heads if kind == "head" else layer.intermediate.dense.out_features
                _check_unit_mask(mask, size, f"encoder layer {i} {kind} mask")
        for i, layer in enumerate(layers):
            if heads is not None:
                layer.attention.self.set_head_mask(heads[i], f"encoder layer {i} head mask")
            if neurons is not None:
                layer.intermediate.set_neuron_mask(neurons[i], f"encoder layer {i} neuron mask")

    def clear_structured_masks(self) -> None:
        """Reset every head and neuron mask to all ones (no masking)."""
        self.set_structured_masks(
            [torch.ones_like(l.attention.self.head_mask) for l in self.bert.encoder.layer],
            [torch.ones_like(l.intermediate.neuron_mask) for l in self.bert.encoder.layer],
        )

    def structured_masks(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of the per-layer head masks [(A_l,)] and neuron masks [(I_l,)], float 0/1."""
        layers = self.bert.encoder.layer
        return (
            [l.attention.self.head_mask.detach().clone() for l in layers],
            [l.intermediate.neuron_mask.detach().clone() for l in layers],
        )

    def layer_structure(self) -> list[tuple[int, int]]:
        """Per layer, (heads present, FFN neurons present): the physical sizes, masks ignored."""
        return [(l.attention.self.num_heads, l.intermediate.dense.out_features) for l in self.bert.encoder.layer]

    def macs(self, kept_lengths: list[torch.Tensor]) -> torch.Tensor:
        """MACs per sample of the encoder layers plus pooler and classifier.

        Counts the layers' physical sizes: masked heads and neurons still count (masks
        do not speed anything up); shrink the model to count (and get) the saving. Layer
        i's attention runs on ``kept_lengths[i]`` tokens and its feed-forward block on
        ``kept_lengths[i + 1]`` (the last layer's on its own): tokens pruned for layer
        i + 1 leave right after layer i's attention (:meth:`forward`; ToP's reference
        count, arXiv 2306.14393, ``calculate_mac_for_encoder``).

        Args:
            kept_lengths: per layer, (B,) tokens its attention computed on (from
                :class:`EncoderOutput`); never increasing from one layer to the next.

        Returns:
            (B,) MACs.
        """
        c = self.config
        layers = self.bert.encoder.layer
        total = sum(
            layer_macs(
                n,
                c.hidden_size,
                layer.intermediate.dense.out_features,
                layer.attention.self.query.out_features,
                ffn_len=kept_lengths[min(i + 1, len(kept_lengths) - 1)],
            )
            for i, (n, layer) in enumerate(zip(kept_lengths, layers))
        )
        return total + c.hidden_size * c.hidden_size + c.hidden_size * c.num_labels


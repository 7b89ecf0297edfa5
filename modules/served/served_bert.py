"""The served BERT classifier as one plain tensor function, for ONNX export.

:class:`ExportableBert` wraps a served :class:`modules.nn.bert.PrunableBertForSequenceClassification`
(heads and FFN neurons already physically removed, :func:`modules.nn.structured.shrink_structured`)
and its frozen ToP token gates, and computes ``(input_ids, attention_mask, token_type_ids)
-> logits`` with no Python decision that depends on the data, so ``torch.onnx.export``
records every step in the graph:

* for each pruning layer ``l`` whose layer gate is on, right after layer ``l - 1``'s
  attention sublayer, each sample's tokens are ranked by the attention they received
  there (arXiv 2306.14393 Sec. 3.1), binned by normalised rank, and kept when their bin's
  gate is open ([CLS] always stays);
* the kept tokens are then gathered out in their original order with ``TopK`` (K = the
  largest number of kept tokens in the batch, computed in the graph) and ``Gather``, so
  layer ``l - 1``'s feed-forward block and every later layer of the exported model really
  run on fewer tokens, at every batch size.

It computes what :meth:`~modules.nn.bert.PrunableBertForSequenceClassification.forward`
computes with ``remove_pruned=True`` (same ranking, ties broken by position, same
gather order); a test checks the logits agree.

Shapes: ``B`` batch, ``N`` tokens, ``H`` hidden size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modules.nn.bert import PrunableBertForSequenceClassification
from modules.nn.tokens import attention_received
from modules.nn.gates import TokenGates, bin_of_rank


class ExportableBert(nn.Module):
    """``(B, N)`` input ids, attention mask and token type ids -> ``(B, num_labels)`` logits.

    Args:
        model: the served network (eval mode; its head and neuron masks all ones, i.e.
            already shrunk). Its weights are shared, not copied.
        token_gates: the frozen or evaluation-mode ToP gates, or None (no token pruning).

    Raises:
        ValueError: a head or neuron mask is still applied (shrink the model first), or
            a layer right before a pruning layer has no attention head left.
    """

    def __init__(self, model: PrunableBertForSequenceClassification, token_gates: TokenGates | None = None):
        super().__init__()
        layers = model.bert.encoder.layer
        if any(l.attention.self.head_mask_applied or l.intermediate.neuron_mask_applied for l in layers):
            raise ValueError("ExportableBert needs the served (shrunk) model: call BertClassifier.served_model() first.")
        self.model = model.eval()
        self.bin_count = token_gates.bin_count if token_gates is not None else 0
        self.pruning_slots: dict[int, int] = {}
        kept_bins = []
        if token_gates is not None:
            layer_on, kept = token_gates.deterministic()
            for slot, layer in enumerate(token_gates.pruning_layers):
                if bool(layer_on[slot]):  # a layer gate that is off keeps every token: nothing to do there
                    self.pruning_slots[layer] = len(kept_bins)
                    kept_bins.append(kept[slot].detach().clone())
        for layer in self.pruning_slots:
            if layers[layer - 1].attention.self.num_heads == 0:
                raise ValueError(f"Encoder layer {layer - 1} has no attention head left, so layer {layer} cannot rank tokens.")
        self.register_buffer(
            "kept_bins",
            torch.stack(kept_bins) if kept_bins else torch.zeros(0, max(self.bin_count, 1), dtype=torch.bool),
        )

    input_names = ("input_ids", "attention_mask", "token_type_ids")

    @staticmethod
    def feeds(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's inputs from a collated text batch: (B, N) int64 each (``token_type_ids`` zeros
        when the batch has none)."""
        ids = batch["input_ids"]
        return {
            "input_ids": ids,
            "attention_mask": batch.get("attention_mask", torch.ones_like(ids)),
            "token_type_ids": batch.get("token_type_ids", torch.zeros_like(ids)),
        }

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Batch and sequence axes of the inputs, batch axis of the logits (for ``torch.onnx.export``)."""
        return {**{n: {0: "batch", 1: "sequence"} for n in self.input_names}, "logits": {0: "batch"}}

    def io_meta(self) -> dict[str, Any]:
        """``inputs`` and ``outputs`` of the exported graph: names, dtypes, shapes (symbolic axes as strings)."""
        return {
            "inputs": [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]} for n in self.input_names],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", self.model.config.num_labels]}],
        }

    def select_tokens(
        self, slot: int, scores: torch.Tensor, present: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens a pruning layer keeps, gathered to the front in their order (ToP's evaluation gates,
        arXiv 2306.14393 Sec. 3.2).

        Candidates (present tokens but [CLS]) are ranked by score (``TopK`` over all N:
        candidates first, ties to the earlier position); rank ``j`` falls in bin
        ``floor(j * bin_count / candidates)`` and stays when that bin's gate is open; [CLS]
        always stays. The kept tokens are then the K smallest of ``position`` (kept) or
        ``N + position`` (closed), K the largest kept count in the batch, computed in the graph
        (``TopK`` with K as an input, then ``GatherElements``).

        Args:
            slot: index of the pruning layer among those whose layer gate is on.
            scores: (B, N) attention received in layer ``l - 1``.
            present: (B, N) bool, tokens present (not padding).
            hidden: (B, N, H) layer ``l - 1``'s attention-sublayer output (its FFN's input).

        Returns:
            (B, K) bool presence and (B, K, H) hidden states of the kept tokens.
        """
        n = scores.shape[1]
        positions = torch.arange(n, device=scores.device)[None, :]
        candidates = present & (positions != 0)  # [CLS] is never pruned
        order = torch.topk(scores.masked_fill(~candidates, float("-inf")), n, dim=1).indices  # token at each rank
        count = candidates.sum(dim=1, keepdim=True)
        bins = bin_of_rank(positions, count.clamp_min(1), self.bin_count)  # (B, N): bin of each rank
        open_rank = self.kept_bins[slot].index_select(0, bins.reshape(-1)).view_as(bins) & (positions < count)
        kept = open_rank | (order == 0)
        k = kept.sum(dim=1).max()
        picked = torch.topk(torch.where(kept, order, order + n), k, dim=1, largest=False).values
        new_present = picked < n
        idx = torch.where(new_present, picked, picked - n)
        return new_present, torch.gather(hidden, 1, idx[:, :, None].expand(-1, -1, hidden.shape[2]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        """(B, N) int64 ids, (B, N) int64 mask (1 token, 0 padding), (B, N) int64 segment ids -> (B, C) logits."""
        present = attention_mask.bool()
        hidden = self.model.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        for i, layer in enumerate(self.model.bert.encoder.layer):
            prunes_next = (i + 1) in self.pruning_slots
            attended, probs = layer.attend(hidden, present, None, need_probs=prunes_next)
            if prunes_next:  # tokens leave before this layer's feed-forward block
                scores = attention_received(probs, present)
                present, attended = self.select_tokens(self.pruning_slots[i + 1], scores, present, attended)
            hidden = layer.feed_forward(attended)
        return self.model.classifier(self.model.bert.pooler(hidden))

    def summary(self) -> dict[str, Any]:
        """The pruning this model serves: per layer heads and FFN neurons present, and the token gates.

        Returns:
            ``heads_per_layer``, ``ffn_neurons_per_layer`` (lists of ints), ``token_pruning``:
            null or ``{"bin_count", "layers": {layer: open bins (list of bin indices)}}``.
        """
        structure = self.model.layer_structure()
        token = None
        if self.pruning_slots:
            token = {
                "bin_count": self.bin_count,
                "layers": {
                    str(layer): torch.nonzero(self.kept_bins[slot]).flatten().tolist()
                    for layer, slot in self.pruning_slots.items()
                },
                "rule": "for each listed layer l, tokens are ranked by attention received in layer l-1 and leave "
                "right after that attention, before layer l-1's feed-forward block; a token is kept when its rank bin "
                "floor(rank * bin_count / candidates) is listed; [CLS] always stays",
            }
        return {
            "heads_per_layer": [h for h, _ in structure],
            "ffn_neurons_per_layer": [f for _, f in structure],
            "token_pruning": token,
        }

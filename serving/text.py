"""Text requests for an exported BERT classifier: tokenize with ``tokenizers``, run, give class probabilities.

Tokenization uses the exported ``tokenizer.json`` (the model's own WordPiece tokenizer,
with its [CLS]/[SEP] template) with truncation to the ``max_length`` the model was
trained with, as the training data module did.
"""

from __future__ import annotations

import numpy as np

from serving.runtime import ServedModel, ServedModelError, softmax

TOKENIZER_FILE = "tokenizer.json"


class TextClassifier:
    """Classify texts with a served text model.

    Args:
        served: a loaded served folder of kind ``text``.

    Raises:
        ServedModelError: the folder is not a text model or has no tokenizer.json.
    """

    def __init__(self, served: ServedModel):
        from tokenizers import Tokenizer

        if served.kind != "text":
            raise ServedModelError(f"{served.folder} holds a {served.kind} model, not a text classifier.")
        path = served.folder / TOKENIZER_FILE
        if not path.is_file():
            raise ServedModelError(f"{served.folder} has no {TOKENIZER_FILE}; re-export the run.")
        self.served = served
        self.labels = list(served.meta["labels"])
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.enable_truncation(int(served.meta["max_length"]))
        pad = served.meta["pad_token"]
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id(pad), pad_token=pad)

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, np.ndarray]:
        """(B, N) int64 ``input_ids``, ``attention_mask`` and ``token_type_ids``, padded to the longest.

        Raises:
            ServedModelError: an empty batch, a text that is not a string, or pairs of another length.
        """
        if not texts:
            raise ServedModelError("No texts to classify.")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ServedModelError(f"Input {bad[0]} is {texts[bad[0]]!r}, not a text; every row needs a text.")
        if pairs is not None and len(pairs) != len(texts):
            raise ServedModelError(f"{len(pairs)} second texts for {len(texts)} texts.")
        enc = self.tokenizer.encode_batch(list(zip(texts, pairs)) if pairs is not None else texts)
        return {
            "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
        }

    def predict_proba(self, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
        """(B, C) class probabilities (softmax of the logits), in the order of :attr:`labels`."""
        return softmax(self.served.run(self.encode(texts, pairs)))

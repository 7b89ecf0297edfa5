"""Per-layer latency lookup table (LUT) of the prunable BERT, for SwiftPruner's search.

SwiftPruner (Zhang et al., CIKM 2022, arXiv 2209.00625) searches per-layer sparsities
under a latency budget; timing every candidate model is far too slow, so the latency
of a candidate is *predicted* from a table measured once per (batch size, sequence
length) on the target machine:

    predicted ms = fixed_ms + sum over layers l of attention_ms[l][h_l] + ffn_ms[l][n_l]

with ``h_l`` kept heads and ``n_l`` kept FFN neurons of layer ``l``.

* :class:`LatencyTable` measures the table (:meth:`LatencyTable.measure`), predicts
  (:meth:`LatencyTable.predict_ms`) and saves as plain Python values.
* The isolated block timings are calibrated against two whole-model anchors (every
  layer at the smallest / largest choices), see :meth:`LatencyTable.measure`.
* :func:`measure_model_ms` times a whole model directly, to check the prediction on
  physically shrunk models (:func:`modules.nn.structured.shrink_structured`).

Every figure is a median over interleaved timed calls of
:func:`modules.served.latency.measure_latency_ms` (CPU, ``torch.inference_mode``, fixed
thread count, warm-up), in milliseconds.

Shapes: ``B`` batch, ``N`` sequence length, ``H`` hidden size, ``A`` heads per layer,
``I`` FFN neurons per layer, ``L`` encoder layers.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from modules.nn.bert import PrunableBertForSequenceClassification
from modules.served.latency import measure_latency_ms
from pruners.base import PrunerConfigError, check_choice, check_positive_int

#: version of the :meth:`LatencyTable.state_dict` layout
STATE_FORMAT = 1

LAYER_MODES = ("shared", "each")


def synthetic_inputs(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random unpadded model inputs for timing (latency depends on shapes, not on token values).

    Args:
        batch_size: B >= 1.
        seq_len: N >= 1.
        vocab_size: token ids are drawn uniformly from [0, vocab_size).
        seed: seed of the token ids.

    Returns:
        ``input_ids`` (B, N) int64, ``attention_mask`` (B, N) int64 all ones (no padding),
        ``token_type_ids`` (B, N) int64 all zeros; on CPU.

    Raises:
        PrunerConfigError (a ValueError): a size below 1.
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("seq_len", seq_len)
    check_positive_int("vocab_size", vocab_size)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "token_type_ids": torch.zeros(batch_size, seq_len, dtype=torch.long),
    }


def _check_timing_args(
    model: PrunableBertForSequenceClassification, batch_size: int, seq_len: int, warmup: int, repeats: int, threads
) -> None:
    """Validate the shared timing settings (PrunerConfigError names the setting and what is allowed)."""
    check_positive_int("batch_size", batch_size)
    check_positive_int("seq_len", seq_len)
    check_positive_int("warmup", warmup, minimum=0)
    check_positive_int("repeats", repeats)
    if threads is not None:
        check_positive_int("threads", threads)
    max_len = model.config.max_position_embeddings
    if seq_len > max_len:
        raise PrunerConfigError(f"seq_len={seq_len} is out of range; the model takes at most {max_len} tokens.")


def _model_inputs(model: PrunableBertForSequenceClassification, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in synthetic_inputs(batch_size, seq_len, model.config.vocab_size).items()}


def measure_model_ms(
    model: PrunableBertForSequenceClassification,
    batch_size: int = 1,
    seq_len: int = 64,
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
) -> float:
    """Median latency in ms of one whole forward of ``model`` (eval mode, inference) on :func:`synthetic_inputs`.

    The direct measurement the table's prediction is checked against; pass the
    physically shrunk model (masks alone do not change latency). The model is put in
    eval mode for the measurement and restored afterwards; nothing else changes.

    Args:
        model: full-size or shrunk model, on any device (inputs follow it).
        batch_size, seq_len: input shape (B, N), unpadded.
        warmup, repeats, threads: as in :func:`modules.served.latency.measure_latency_ms`
            (threads None keeps the current torch setting).

    Returns:
        median ms per forward.

    Raises:
        PrunerConfigError (a ValueError): a size below 1, ``warmup`` < 0, or ``seq_len``
            above the model's ``max_position_embeddings``.
    """
    _check_timing_args(model, batch_size, seq_len, warmup, repeats, threads)
    inputs = _model_inputs(model, batch_size, seq_len)
    was_training = model.training
    model.eval()
    try:
        ms = measure_latency_ms({"model": lambda: model(**inputs)}, warmup=warmup, repeats=repeats, threads=threads)
    finally:
        model.train(was_training)
    return ms["model"]


def _as_int(value: Any, what: str) -> int:
    """``value`` as a Python int if it is an integer (int, numpy or 0-d integer tensor; not bool), else ValueError."""
    if isinstance(value, bool):
        raise PrunerConfigError(f"{what}={value!r} must be an integer.")
    try:
        return operator.index(value)
    except TypeError:
        raise PrunerConfigError(f"{what}={value!r} must be an integer.") from None


def _check_choices(name: str, choices: Sequence[int], units: int, unit_name: str) -> list[int]:
    """Sorted unique ints in [0, units]; PrunerConfigError names the setting and the allowed range."""
    try:
        values = [_as_int(c, f"{name} entry") for c in choices]
    except TypeError:
        raise PrunerConfigError(f"{name}={choices!r} must be a list of integers.") from None
    if not values:
        raise PrunerConfigError(f"{name} is empty; give at least one count of {unit_name} in [0, {units}].")
    bad = [v for v in values if not 0 <= v <= units]
    if bad:
        raise PrunerConfigError(
            f"{name}={list(choices)} holds {bad}, out of range; counts of {unit_name} must be in [0, {units}]."
        )
    values.sort()
    dups = sorted({v for a, v in zip(values, values[1:]) if a == v})
    if dups:
        raise PrunerConfigError(f"{name}={list(choices)} repeats {dups}; give each count once.")
    return values


def _running_max(row: Sequence[float]) -> list[float]:
    """Non-decreasing copy of ``row``: each entry is the maximum of itself and every earlier entry."""
    out, top = [], float("-inf")
    for v in row:
        top = max(top, float(v))
        out.append(top)
    return out


@dataclass
class LatencyTable:
    """Per-layer latency lookup table of the prunable BERT at one (batch size, sequence length).

    Built by :meth:`measure` (or :meth:`from_state_dict`). All latencies are median
    milliseconds per forward of the whole batch.

    Attributes:
        head_choices: kept-head counts measured, ascending, e.g. [0, 2, ..., 12].
        neuron_choices: kept FFN-neuron counts measured, ascending, e.g. [0, 192, ..., 1536].
        attention_ms: [L][len(head_choices)]: ms of layer l's attention block
            (self-attention + output projection + residual LayerNorm) with
            ``head_choices[i]`` heads kept, as it counts inside the whole model
            (``scale`` times the monotone isolated timing). Non-decreasing along each
            row (see ``raw_attention_ms``).
        ffn_ms: [L][len(neuron_choices)]: ms of layer l's FFN block (intermediate +
            activation + output projection + residual LayerNorm) with
            ``neuron_choices[j]`` neurons kept (likewise scaled); non-decreasing along each row.
        fixed_ms: everything outside the layers' blocks: embeddings, pooler, classifier
            and the Python work of the model's forward (the per-layer loop and token
            counts). It is the intercept fitted by :meth:`measure` (see there), so it
            can come out slightly negative when the isolated blocks overstate the
            smallest model.
        batch_size, seq_len: the input shape (B, N) the table holds for (unpadded inputs).
        threads: torch intra-op threads during the measurement.
        warmup, repeats: untimed and timed calls per entry.
        raw_attention_ms, raw_ffn_ms: the isolated blocks' medians as measured, before
            the running maximum that makes the rows monotone (timing noise can make a
            larger block look faster) and before ``scale``.
        scale: factor from isolated block timings to their share of a whole-model
            forward (1.0 without calibration).
        layers: "shared" (layer 0 measured, its rows reused for every layer) or "each";
            "manual" for a table built by hand.
        smallest_model_ms, largest_model_ms: measured ms of the whole model with every
            layer at the smallest (largest) choices, the calibration anchors; None if
            not measured.
        calibration_points: whole-model measurements ``scale`` and ``fixed_ms`` were
            fitted to (2: the anchors; more after :meth:`refit`).

    Raises:
        ValueError: on construction, when the rows do not match the choices or the
            layer count (e.g. a hand-edited state).
    """

    head_choices: list[int]
    neuron_choices: list[int]
    attention_ms: list[list[float]]
    ffn_ms: list[list[float]]
    fixed_ms: float
    batch_size: int
    seq_len: int
    threads: int
    warmup: int
    repeats: int
    raw_attention_ms: list[list[float]] = field(default_factory=list)
    raw_ffn_ms: list[list[float]] = field(default_factory=list)
    layers: str = "manual"
    scale: float = 1.0
    smallest_model_ms: float | None = None
    largest_model_ms: float | None = None
    calibration_points: int = 2

    def __post_init__(self) -> None:
        self.head_choices = [int(c) for c in self.head_choices]
        self.neuron_choices = [int(c) for c in self.neuron_choices]
        for name, choices in (("head_choices", self.head_choices), ("neuron_choices", self.neuron_choices)):
            if not choices or any(a >= b for a, b in zip(choices, choices[1:])) or choices[0] < 0:
                raise ValueError(f"{name}={choices} must be non-empty, >= 0, strictly ascending.")
        self.attention_ms = [[float(v) for v in row] for row in self.attention_ms]
        self.ffn_ms = [[float(v) for v in row] for row in self.ffn_ms]
        if not self.raw_attention_ms:
            self.raw_attention_ms = [list(r) for r in self.attention_ms]
        if not self.raw_ffn_ms:
            self.raw_ffn_ms = [list(r) for r in self.ffn_ms]
        self.raw_attention_ms = [[float(v) for v in row] for row in self.raw_attention_ms]
        self.raw_ffn_ms = [[float(v) for v in row] for row in self.raw_ffn_ms]
        n_layers = len(self.attention_ms)
        if n_layers == 0:
            raise ValueError("attention_ms has no rows; the table needs one row per encoder layer.")
        for name, rows, width in (
            ("attention_ms", self.attention_ms, len(self.head_choices)),
            ("raw_attention_ms", self.raw_attention_ms, len(self.head_choices)),
            ("ffn_ms", self.ffn_ms, len(self.neuron_choices)),
            ("raw_ffn_ms", self.raw_ffn_ms, len(self.neuron_choices)),
        ):
            if len(rows) != n_layers or any(len(r) != width for r in rows):
                raise ValueError(
                    f"{name} must be {n_layers} rows (one per layer) of {width} values (one per choice), "
                    f"got row lengths {[len(r) for r in rows]}."
                )
        self.fixed_ms = float(self.fixed_ms)
        self.scale = float(self.scale)

    @property
    def num_layers(self) -> int:
        """L, the encoder layers the table covers."""
        return len(self.attention_ms)

    # ------------------------------------------------------------- measuring
    @classmethod
    def measure(
        cls,
        model: PrunableBertForSequenceClassification,
        head_choices: Sequence[int],
        neuron_choices: Sequence[int],
        batch_size: int = 1,
        seq_len: int = 64,
        warmup: int = 5,
        repeats: int = 30,
        threads: int | None = None,
        layers: str = "shared",
        calibrate: bool = True,
    ) -> "LatencyTable":
        """Measure the table on this machine.

        Each block is timed in isolation on realistic inputs: the hidden states
        (B, N, H) (model dtype and device) that enter that layer's attention block,
        respectively its FFN block, for :func:`synthetic_inputs`, computed by the model
        itself. The inputs are unpadded, so, as in the model's forward, the attention
        gets no key mask (``key_mask=None``). For a head count h a deep copy of the
        layer keeps its first h heads physically (``keep_units``; which heads does not
        matter for latency, only how many) and its attention block is timed; likewise
        for n FFN neurons. All choices of one layer are timed interleaved in one
        :func:`~modules.served.latency.measure_latency_ms` call, so machine noise hits them
        alike.

        ``layers="shared"``: every encoder layer of a full-size BERT has the same
        shapes, and a block's latency depends on its shapes, not on its weights, so
        layer 0 is measured once and its rows are reused for every layer (L times
        cheaper). ``layers="each"`` measures every layer separately.

        Timing noise can make a measured row non-monotone (a block with more units
        looking faster). The table's rows are made non-decreasing in the kept units by a
        running maximum from the smallest choice upward; the raw medians are kept in
        ``raw_attention_ms`` / ``raw_ffn_ms``.

        Anchors: two physically shrunk copies of the whole model, every layer at the
        smallest choices and every layer at the largest, are timed interleaved
        (``smallest_model_ms``, ``largest_model_ms``). Blocks timed alone do not cost
        exactly what they cost inside the model's forward (caches, the forward's
        Python work, and on a busy machine a long forward is time-sliced more often
        than a short block call; the ratio depends on the load from other processes).
        So, with ``calibrate=True`` (default), the prediction is
        fitted through both anchors: every table entry is the monotone isolated timing
        times ``scale`` = (largest - smallest) / (isolated blocks of largest - isolated
        blocks of smallest), and ``fixed_ms`` = smallest - ``scale`` * its isolated
        blocks. :meth:`predict_ms` then equals the measurement at both ends and
        interpolates linearly in the summed block timings between them. A table
        predicts the machine as it was while measured (threads, load): re-measure it
        where the model will run. With ``calibrate=False`` (or when the fit is degenerate:
        one choice each, or a non-positive slope from noise) ``scale`` is 1 and
        ``fixed_ms`` = smallest - its blocks (embeddings, pooler, classifier and the
        forward's Python work).

        The model is put in eval mode during the measurement and restored afterwards;
        it is not modified (only deep copies are shrunk). Its masks are ignored.

        Args:
            model: the full-size model (every layer with the same heads and neurons;
                masks may be set). Not a shrunk copy.
            head_choices: kept-head counts to measure, each in [0, A]; sorted here.
            neuron_choices: kept-neuron counts to measure, each in [0, I]; sorted here.
            batch_size, seq_len: the input shape (B, N) the table is for.
            warmup, repeats: untimed / timed calls per entry.
            threads: torch intra-op threads while timing (None: the current setting,
                recorded in the table).
            layers: "shared" or "each" (see above).
            calibrate: fit ``scale`` and ``fixed_ms`` through both whole-model anchors
                (see above); False keeps the isolated block timings.

        Returns:
            the measured :class:`LatencyTable`.

        Raises:
            PrunerConfigError (a ValueError): empty, non-integer, duplicate or
                out-of-range choices (the message gives the allowed range), a size
                below 1, ``seq_len`` above ``max_position_embeddings``, or ``layers``
                not one of "shared", "each".
            ValueError: layers of different sizes (a shrunk model was passed).
        """
        check_choice("layers", layers, LAYER_MODES)
        _check_timing_args(model, batch_size, seq_len, warmup, repeats, threads)
        structure = model.layer_structure()
        if len(set(structure)) != 1:
            raise ValueError(
                f"LatencyTable.measure needs the full-size model (equal layers), got per-layer (heads, neurons) "
                f"{structure}; pass the unshrunk model (masks may be set)."
            )
        n_heads, n_neurons = structure[0]
        heads = _check_choices("head_choices", head_choices, n_heads, "heads")
        neurons = _check_choices("neuron_choices", neuron_choices, n_neurons, "FFN neurons")
        used_threads = threads if threads is not None else torch.get_num_threads()
        timing = dict(warmup=warmup, repeats=repeats, threads=threads)
        enc_layers = model.bert.encoder.layer
        n_layers = len(enc_layers)
        was_training = model.training
        model.eval()
        try:
            inputs = _model_inputs(model, batch_size, seq_len)
            with torch.inference_mode():
                # Hidden states entering each layer's attention and FFN blocks.
                hidden = model.bert.embeddings(input_ids=inputs["input_ids"], token_type_ids=inputs["token_type_ids"])
                block_inputs = []
                for layer in enc_layers:
                    context, _ = layer.attention.self(hidden, None)
                    attended = layer.attention.output(context, hidden)
                    block_inputs.append((hidden, attended))
                    hidden = layer.output(layer.intermediate(attended), attended)
            measured = [0] if layers == "shared" else list(range(n_layers))
            raw_att, raw_ffn = [], []
            for i in measured:
                att_row, ffn_row = _measure_layer(enc_layers[i], *block_inputs[i], heads, neurons, timing)
                raw_att.append(att_row)
                raw_ffn.append(ffn_row)
            if layers == "shared":
                raw_att, raw_ffn = raw_att * n_layers, raw_ffn * n_layers
            anchors = {}
            for name, h, n in (("smallest", heads[0], neurons[0]), ("largest", heads[-1], neurons[-1])):
                copy_ = copy.deepcopy(model)  # keep_units also resets the masks to all ones
                for layer in copy_.bert.encoder.layer:
                    layer.keep_units(torch.arange(h), torch.arange(n))
                anchors[name] = lambda m=copy_: m(**inputs)
            anchor_ms = measure_latency_ms(anchors, **timing)
            del anchors
        finally:
            model.train(was_training)
        att = [_running_max(r) for r in raw_att]
        ffn = [_running_max(r) for r in raw_ffn]
        blocks_small = sum(a[0] + f[0] for a, f in zip(att, ffn))
        blocks_large = sum(a[-1] + f[-1] for a, f in zip(att, ffn))
        scale = 1.0
        if calibrate and blocks_large > blocks_small:
            slope = (anchor_ms["largest"] - anchor_ms["smallest"]) / (blocks_large - blocks_small)
            scale = slope if slope > 0 else 1.0
        return cls(
            head_choices=heads,
            neuron_choices=neurons,
            attention_ms=[[scale * v for v in r] for r in att],
            ffn_ms=[[scale * v for v in r] for r in ffn],
            fixed_ms=anchor_ms["smallest"] - scale * blocks_small,
            batch_size=batch_size,
            seq_len=seq_len,
            threads=used_threads,
            warmup=warmup,
            repeats=repeats,
            raw_attention_ms=[list(r) for r in raw_att],
            raw_ffn_ms=[list(r) for r in raw_ffn],
            layers=layers,
            scale=scale,
            smallest_model_ms=anchor_ms["smallest"],
            largest_model_ms=anchor_ms["largest"],
        )

    # ------------------------------------------------------------ predicting
    def _index(self, kind: str, counts: Sequence[int], choices: list[int]) -> list[int]:
        if len(counts) != self.num_layers:
            raise ValueError(f"{kind}: got {len(counts)} counts, expected one per encoder layer ({self.num_layers}).")
        where = {c: i for i, c in enumerate(choices)}
        out = []
        for layer, count in enumerate(counts):
            try:
                k = _as_int(count, f"{kind}[{layer}]")
            except ValueError as err:
                raise ValueError(f"encoder layer {layer}: {err}") from None
            if k not in where:
                raise ValueError(
                    f"encoder layer {layer}: {kind}={k} was not measured; the table holds {choices}."
                )
            out.append(where[k])
        return out

    def predict_ms(self, heads_kept: Sequence[int], neurons_kept: Sequence[int]) -> float:
        """Predicted latency in ms of the model with these kept units per layer (physically shrunk).

        ``fixed_ms + sum_l attention_ms[l][heads_kept[l]] + ffn_ms[l][neurons_kept[l]]``
        (indexing by the position of the count in the choices).

        Args:
            heads_kept: L counts, each one of ``head_choices``.
            neurons_kept: L counts, each one of ``neuron_choices``.

        Returns:
            predicted ms per forward at (``batch_size``, ``seq_len``).

        Raises:
            ValueError: not L counts, or a count not in the choices (the message names
                the layer and the allowed values).
        """
        hi = self._index("heads_kept", heads_kept, self.head_choices)
        ni = self._index("neurons_kept", neurons_kept, self.neuron_choices)
        total = self.fixed_ms
        for layer, (h, n) in enumerate(zip(hi, ni)):
            total += self.attention_ms[layer][h] + self.ffn_ms[layer][n]
        return total

    def refit(self, samples: Sequence[tuple[Sequence[int], Sequence[int], float]]) -> "LatencyTable":
        """A copy whose ``scale`` and ``fixed_ms`` are fitted by least squares to whole-model measurements.

        Extends the two-anchor calibration of :meth:`measure` to any number of measured
        models: with ``x`` the summed (monotone, unscaled) isolated block timings of a
        configuration, fits ``measured_ms = scale * x + fixed_ms`` over ``samples`` and the
        table's own anchors. Averaging over many configurations corrects the bias of the
        isolated timings instead of trusting two single measurements. A fit with a
        negative ``fixed_ms`` is redone through the origin (``fixed_ms = 0``), so
        predictions stay positive. A degenerate fit (fewer than two distinct ``x``, or a
        non-positive slope) returns an unchanged copy.

        Args:
            samples: (heads kept per layer, neurons kept per layer, measured ms) of
                physically shrunk models at the table's shape.

        Returns:
            the refitted table (``calibration_points`` records how many models it used).

        Raises:
            ValueError: a configuration not in the table's choices (see :meth:`predict_ms`).
        """
        def isolated(heads, neurons) -> float:
            return (self.predict_ms(heads, neurons) - self.fixed_ms) / self.scale

        points = [(isolated(h, n), float(ms)) for h, n, ms in samples]
        L = self.num_layers
        for counts, ms in (((self.head_choices[0], self.neuron_choices[0]), self.smallest_model_ms),
                           ((self.head_choices[-1], self.neuron_choices[-1]), self.largest_model_ms)):
            if ms is not None:
                points.append((isolated([counts[0]] * L, [counts[1]] * L), float(ms)))
        out = copy.deepcopy(self)
        xs = torch.tensor([p[0] for p in points], dtype=torch.float64)
        ys = torch.tensor([p[1] for p in points], dtype=torch.float64)
        if len(points) < 2 or float(xs.max() - xs.min()) <= 0:
            return out
        xc = xs - xs.mean()
        slope = float((xc * (ys - ys.mean())).sum() / (xc * xc).sum())
        fixed = float(ys.mean()) - slope * float(xs.mean())
        if fixed < 0:  # a negative fixed part is unphysical (and predicts <= 0 ms): fit through the origin
            slope, fixed = float((xs * ys).sum() / (xs * xs).sum()), 0.0
        if slope <= 0:
            return out
        rescale = slope / self.scale
        out.attention_ms = [[rescale * v for v in r] for r in self.attention_ms]
        out.ffn_ms = [[rescale * v for v in r] for r in self.ffn_ms]
        out.fixed_ms = fixed
        out.scale = slope
        out.calibration_points = len(points)
        return out

    def min_ms(self) -> float:
        """Smallest achievable predicted ms: every layer at its fastest choices (the smallest, rows being monotone)."""
        return self.fixed_ms + sum(min(a) + min(f) for a, f in zip(self.attention_ms, self.ffn_ms))

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The table as plain Python values (ints, floats, strings, lists), loadable with ``weights_only=True``."""
        return {
            "format": STATE_FORMAT,
            "head_choices": list(self.head_choices),
            "neuron_choices": list(self.neuron_choices),
            "attention_ms": [list(r) for r in self.attention_ms],
            "ffn_ms": [list(r) for r in self.ffn_ms],
            "raw_attention_ms": [list(r) for r in self.raw_attention_ms],
            "raw_ffn_ms": [list(r) for r in self.raw_ffn_ms],
            "fixed_ms": self.fixed_ms,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "threads": self.threads,
            "warmup": self.warmup,
            "repeats": self.repeats,
            "layers": self.layers,
            "scale": self.scale,
            "smallest_model_ms": self.smallest_model_ms,
            "largest_model_ms": self.largest_model_ms,
            "calibration_points": self.calibration_points,
        }

    @classmethod
    def from_state_dict(cls, d: dict) -> "LatencyTable":
        """Rebuild a table from :meth:`state_dict` (or a hand-built dict with the same keys).

        ``raw_attention_ms``, ``raw_ffn_ms``, ``layers``, ``scale``, ``smallest_model_ms``
        and ``largest_model_ms`` are optional (raw rows default to the table's rows,
        ``scale`` to 1).

        Raises:
            ValueError: an unknown ``format``, a missing key (the message lists them), or
                rows that do not match the choices.
        """
        fmt = d.get("format", STATE_FORMAT)
        if fmt != STATE_FORMAT:
            raise ValueError(f"LatencyTable state format {fmt!r} is not supported; this code reads {STATE_FORMAT}.")
        required = (
            "head_choices", "neuron_choices", "attention_ms", "ffn_ms", "fixed_ms",
            "batch_size", "seq_len", "threads", "warmup", "repeats",
        )  # fmt: skip
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"LatencyTable state is missing {missing}.")
        optional = (
            "raw_attention_ms", "raw_ffn_ms", "layers", "scale", "smallest_model_ms", "largest_model_ms",
            "calibration_points",
        )  # fmt: skip
        return cls(**{k: d[k] for k in required}, **{k: d[k] for k in optional if k in d})


def _measure_layer(
    layer: torch.nn.Module,
    attn_in: torch.Tensor,
    ffn_in: torch.Tensor,
    heads: list[int],
    neurons: list[int],
    timing: dict,
) -> tuple[list[float], list[float]]:
    """Raw median ms of one layer's attention block per head count and FFN block per neuron count.

    Args:
        layer: a full-size ``BertLayer`` (not modified; copies are shrunk).
        attn_in: (B, N, H) hidden states entering the layer.
        ffn_in: (B, N, H) hidden states entering the FFN (attention block output).
        heads, neurons: the choices.
        timing: warmup / repeats / threads for ``measure_latency_ms``.

    Returns:
        ([len(heads)] ms, [len(neurons)] ms).
    """
    all_heads = layer.attention.self.num_heads
    all_neurons = layer.intermediate.dense.out_features
    calls = {}
    for h in heads:
        small = copy.deepcopy(layer)
        small.keep_units(torch.arange(h), torch.arange(all_neurons))
        att = small.attention
        # As in BertLayer.forward: self-attention (no key mask: unpadded), then output + residual LayerNorm.
        calls[f"attention/{h}"] = lambda att=att: att.output(att.self(attn_in, None)[0], attn_in)
    for n in neurons:
        small = copy.deepcopy(layer)
        small.keep_units(torch.arange(all_heads), torch.arange(n))
        inter, out = small.intermediate, small.output
        calls[f"ffn/{n}"] = lambda inter=inter, out=out: out(inter(ffn_in), ffn_in)
    ms = measure_latency_ms(calls, **timing)
    return [ms[f"attention/{h}"] for h in heads], [ms[f"ffn/{n}"] for n in neurons]

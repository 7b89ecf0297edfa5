"""ONNX export: the exportable forms equal the served models, and ONNX Runtime equals PyTorch.

Tiny random models for every kind of pruning the pruners produce: ToP token gates
(tokens removed inside the graph, one layer keeping only [CLS]), removed heads and FFN
neurons (SwiftPruner and its uniform baseline), D2S's shrunk and unstructured MLPs;
batch sizes 1-4, padded and unpadded inputs, one exported file for all of them.
"""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
from transformers import BertConfig

from modules.nn.bert import PrunableBertForSequenceClassification
from modules.nn.dlrm import DLRM, export_served
from modules.nn.gates import TokenGates
from modules.served.onnx_export import OPSET, export_onnx
from modules.served.served_bert import ExportableBert
from modules.served.served_dlrm import ExportableDLRM
from modules.nn.structured import shrink_structured
from serving.runtime import make_session

TOL = 1e-4


def tiny_bert(config: dict) -> PrunableBertForSequenceClassification:
    torch.manual_seed(0)
    return PrunableBertForSequenceClassification(BertConfig(**config, num_labels=3)).eval()


def frozen_gates(kept: list[list[int]], layer_on=(True, True)) -> TokenGates:
    """ToP gates of a 3-layer model pruning before layers 1 and 2 with the given open bins (4 bins)."""
    gates = TokenGates(num_layers=3, pruning_layers=[1, 2], bin_count=4)
    gates.freeze(torch.tensor(layer_on), torch.tensor(kept, dtype=torch.bool))
    return gates.eval()


def text_batch(batch_size: int, padded: bool, seed: int = 0, n: int = 12) -> dict[str, torch.Tensor]:
    """(B, N) ids starting with [CLS]=101, lengths varying when ``padded``."""
    g = torch.Generator().manual_seed(seed + batch_size)
    ids = torch.randint(1000, 5000, (batch_size, n), generator=g)
    ids[:, 0] = 101
    lengths = torch.randint(3, n + 1, (batch_size,), generator=g) if padded else torch.full((batch_size,), n)
    if padded:
        lengths[0] = n  # the longest sets the padded width
    mask = (torch.arange(n)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


VARIANTS = {
    "dense": lambda m: (m, None),
    "top": lambda m: (m, frozen_gates([[1, 0, 1, 0], [1, 1, 0, 0]])),
    "top_only_cls": lambda m: (m, frozen_gates([[0, 0, 0, 0], [1, 1, 1, 1]])),
    "top_layer_off": lambda m: (m, frozen_gates([[1, 0, 0, 0], [0, 1, 1, 0]], layer_on=(False, True))),
    "heads_neurons": lambda m: (shrunk(m), None),
    "heads_neurons_and_tokens": lambda m: (shrunk(m), frozen_gates([[1, 1, 0, 0], [1, 0, 1, 0]])),
}


def shrunk(model: PrunableBertForSequenceClassification) -> PrunableBertForSequenceClassification:
    """Per-layer different heads and neurons removed (as SwiftPruner chooses), physically."""
    heads = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float)
    g = torch.Generator().manual_seed(1)
    neurons = (torch.rand(3, 64, generator=g) > 0.4).float()
    model.set_structured_masks(heads, neurons)
    return shrink_structured(model).eval()


def reference_logits(model, gates, batch) -> torch.Tensor:
    """The served PyTorch forward: pruned tokens gathered out (remove_pruned)."""
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                     token_pruner=gates, remove_pruned=gates is not None).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("padded", [False, True])
def test_exportable_bert_equals_the_served_forward(tiny_bert_config, variant, padded):
    model, gates = VARIANTS[variant](tiny_bert(tiny_bert_config))
    exportable = ExportableBert(model, gates)
    for bs in (1, 2, 3, 4):
        batch = text_batch(bs, padded)
        with torch.no_grad():
            got = exportable(**exportable.feeds(batch))
        torch.testing.assert_close(got, reference_logits(model, gates, batch), atol=1e-5, rtol=1e-5)


def test_only_cls_kept_really_leaves_one_token(tiny_bert_config):
    model, gates = VARIANTS["top_only_cls"](tiny_bert(tiny_bert_config))
    exportable = ExportableBert(model, gates)
    batch = text_batch(3, padded=True)
    hidden = torch.randn(3, 12, 32)
    present, kept = exportable.select_tokens(0, torch.rand(3, 12), batch["attention_mask"].bool(), hidden)
    assert kept.shape == (3, 1, 32) and present.all() and torch.equal(kept[:, 0], hidden[:, 0])  # [CLS] alone


def test_exportable_bert_refuses_an_unshrunk_masked_model(tiny_bert_config):
    model = tiny_bert(tiny_bert_config)
    model.set_structured_masks(heads=torch.tensor([[1, 0, 1, 1]] * 3, dtype=torch.float))
    with pytest.raises(ValueError, match="served"):
        ExportableBert(model)


@pytest.fixture(scope="module")
def exported_berts(tmp_path_factory):
    """Each variant exported once to ONNX: name -> (exportable, ORT session)."""
    from tests.conftest import TINY_BERT_CONFIG

    out = {}
    folder = tmp_path_factory.mktemp("onnx_bert")
    for name, make in VARIANTS.items():
        model, gates = make(tiny_bert(TINY_BERT_CONFIG.copy()))
        exportable = ExportableBert(model, gates)
        path = export_onnx(exportable, exportable.feeds(text_batch(2, True, seed=7)), folder / f"{name}.onnx",
                           exportable.dynamic_axes(), ["logits"])
        out[name] = (exportable, make_session(path, threads=1), path)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_onnx_runtime_equals_pytorch_for_every_batch_size_padded_or_not(exported_berts, variant):
    exportable, session, _ = exported_berts[variant]
    for padded in (False, True):
        for bs in (1, 2, 3, 4):
            batch = text_batch(bs, padded, seed=11)
            with torch.no_grad():
                ref = exportable(**exportable.feeds(batch)).numpy()
            got = session.run(None, {k: v.numpy() for k, v in exportable.feeds(batch).items()})[0]
            assert got.shape == ref.shape
            assert abs(got - ref).max() <= TOL, (variant, padded, bs)


def test_token_removal_is_in_the_graph_and_the_file_is_valid(exported_berts):
    import onnx

    _, _, path = exported_berts["top"]
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17 and OPSET >= 17
    ops = {n.op_type for n in model.graph.node}
    assert {"TopK", "GatherElements"} <= ops  # kept-token count computed and tokens gathered in the graph
    dense_ops = {n.op_type for n in onnx.load(str(exported_berts["dense"][2])).graph.node}
    assert "TopK" not in dense_ops
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]


def test_later_layers_run_on_fewer_tokens_in_onnx_runtime(exported_berts):
    """The graph's intermediate hidden states really shrink: ask ORT for the gathered tensor's shape."""
    import onnx

    exportable, _, path = exported_berts["top_only_cls"]
    model = onnx.load(str(path))
    gathers = [n.output[0] for n in model.graph.node if n.op_type == "GatherElements"]
    for name in gathers:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = text_batch(2, padded=False, seed=3)
    outs = session.run(gathers, {k: v.numpy() for k, v in exportable.feeds(batch).items()})
    assert any(o.ndim == 3 and o.shape[1] == 1 for o in outs)  # only [CLS] left after the first pruning layer


# ----------------------------------------------------------------------------- DLRM
def tiny_dlrm(multi: bool) -> DLRM:
    torch.manual_seed(0)
    return DLRM(num_dense=3, num_embeddings=[20, 30], multi_num_embeddings=[25] if multi else [], embedding_dim=4,
                bottom_mlp=[8], top_mlp=[16, 8]).eval()


def dlrm_inputs(bs: int, multi: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed + bs)
    dense = torch.randn(bs, 3, generator=g)
    sparse = torch.randint(1, 60, (bs, 2), generator=g)  # ids beyond the tables wrap
    bags = torch.randint(0, 40, (bs, 1, 5), generator=g) if multi else None
    if multi:
        bags[0, 0] = 0  # an empty bag
    return dense, sparse, bags


def prune_dlrm(model: DLRM, kind: str) -> DLRM:
    layers = model.mlp_layers()
    g = torch.Generator().manual_seed(2)
    if kind == "neuron":
        layers["top.0"].mask[torch.tensor([1, 4, 5, 9])] = False  # whole neurons: removed when served
        layers["top.0"].bias_mask[torch.tensor([1, 4, 5, 9])] = False
    elif kind == "unstructured":
        for layer in layers.values():
            layer.mask &= torch.rand(layer.mask.shape, generator=g) > 0.6
    return model


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("kind", ["dense", "neuron", "unstructured"])
def test_dlrm_exports_and_onnx_runtime_equals_the_served_copy(tmp_path, multi, kind):
    served = export_served(prune_dlrm(tiny_dlrm(multi), kind))
    exportable = ExportableDLRM(served)
    if kind == "neuron":
        assert served.mlp_layers()["top.0"].weight.shape[0] == 12  # physically shrunk
    path = export_onnx(exportable, exportable.feeds(*dlrm_inputs(4, multi, seed=5)), tmp_path / "m.onnx",
                       exportable.dynamic_axes(), ["logit"])
    session = make_session(path, threads=1)
    for bs in (1, 2, 3, 4):
        x = dlrm_inputs(bs, multi)
        with torch.no_grad():
            ref = served(*x)
            torch.testing.assert_close(exportable(*x), ref, atol=1e-6, rtol=1e-6)
        got = session.run(None, {k: v.numpy() for k, v in exportable.feeds(*x).items()})[0]
        assert got.shape == (bs,) and abs(got - ref.numpy()).max() <= TOL
    summary = exportable.summary()["mlp_layers"]
    if kind == "unstructured":
        # the masked zeros stay in the exported kernels (the output layer keeps only live inputs)
        assert all(v["sparsity"] > 0.3 for k, v in summary.items() if k != "top.2")


def test_a_model_with_every_head_removed_drops_the_mask_input_and_still_serves(tiny_bert_config, tmp_path):
    from serving.runtime import graph_feeds

    model = tiny_bert(tiny_bert_config)
    model.set_structured_masks(heads=torch.zeros(3, 4))
    model = shrink_structured(model).eval()
    exportable = ExportableBert(model)
    path = export_onnx(exportable, exportable.feeds(text_batch(2, True)), tmp_path / "m.onnx", exportable.dynamic_axes(), ["logits"])
    session = make_session(path, threads=1)
    assert "attention_mask" not in {i.name for i in session.get_inputs()}  # no attention left: the mask is unused
    batch = text_batch(3, True)
    got = session.run(None, graph_feeds(session, {k: v.numpy() for k, v in exportable.feeds(batch).items()}))[0]
    assert abs(got - reference_logits(model, None, batch).numpy()).max() <= TOL

"""ToP pieces: hard-concrete gate statistics, deterministic eval gates, ARP-2, Lagrangian, constraint."""

from __future__ import annotations

import math

import pytest
import torch

from modules.nn.bert import layer_macs
from pruners.base import PrunerConfigError
from modules.nn.gates import LOG_ALPHA_MAX, LOG_ALPHA_MIN, HardConcreteGates, TokenGates, rank_bins
from pruners.top import (
    ToPPruner,
    arp2_loss,
    default_pruning_layers,
    deterministic_kept_lengths,
    expected_macs,
    expected_macs_dense,
    lagrangian,
    project_to_sparsity,
)


def test_hard_concrete_samples_match_their_analytic_statistics():
    torch.manual_seed(0)
    gates = HardConcreteGates(3, init_log_alpha=0.0)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([-2.0, 0.0, 2.0]))
    z = torch.stack([gates.sample() for _ in range(20000)])
    assert z.min() >= 0 and z.max() <= 1
    assert (z == 0).any() and (z == 1).any()  # the stretch puts real mass on exact 0 and 1
    torch.testing.assert_close((z > 0).float().mean(0), gates.prob_nonzero().detach(), atol=0.015, rtol=0)
    torch.testing.assert_close((z > 0.5).float().mean(0), gates.prob_above(0.5).detach(), atol=0.015, rtol=0)
    # log_alpha = 0 is symmetric: P(z > 0.5) = 1/2
    assert gates.prob_above(0.5)[1].item() == pytest.approx(0.5)


def test_sample_is_differentiable_and_clamp_bounds_log_alpha():
    gates = HardConcreteGates(4, init_log_alpha=0.5)
    gates.sample().sum().backward()
    assert gates.log_alpha.grad is not None
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([-10.0, -1.0, 1.0, 10.0]))
    gates.clamp_()
    assert gates.log_alpha.tolist() == pytest.approx([LOG_ALPHA_MIN, -1.0, 1.0, LOG_ALPHA_MAX])


def test_deterministic_gates_keep_expected_count_of_largest_log_alpha():
    gates = HardConcreteGates(8)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([4.6, -4.6, 4.6, -4.6, 4.6, 4.6, -4.6, -4.6]))
    first = gates.deterministic_topk(groups=2)
    second = gates.deterministic_topk(groups=2)
    assert torch.equal(first, second)
    expected_k = torch.round(gates.prob_nonzero().view(2, 4).sum(1)).tolist()
    assert first.view(2, 4).sum(1).tolist() == expected_k == [2.0, 2.0]
    assert first.tolist() == [True, False, True, False, True, True, False, False]


def _pruning_gates() -> TokenGates:
    """Gates of a 4-layer model whose layers all prune, with random bin log_alphas (seeded)."""
    torch.manual_seed(0)
    gates = TokenGates(4, [1, 2, 3], bin_count=5)
    with torch.no_grad():
        gates.layer.log_alpha.fill_(2.0)
        gates.token.log_alpha.uniform_(-3, 3)
    return gates


def test_token_gates_are_deterministic_at_eval_and_never_drop_cls():
    gates = _pruning_gates()
    gates.eval()
    scores = torch.rand(3, 10)
    alive = torch.ones(3, 10, dtype=torch.bool)
    alive[2, 6:] = False
    a = gates.token_keep(2, scores, alive)
    b = gates.token_keep(2, scores, alive)
    assert a.dtype == torch.bool and torch.equal(a, b)
    assert a[:, 0].all()
    assert not (a & ~alive).any()  # padding stays out
    gates.train()
    soft = gates.token_keep(2, scores, alive)
    assert soft.dtype == torch.float32 and (soft[:, 0] == 1).all() and (soft[~alive] == 0).all()


def test_rank_bins_follow_score_order():
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.3, 0.9]])
    cand = torch.tensor([[False, True, True, True, True]])
    # ranks among candidates: 0.9 -> 0, 0.5 -> 1, 0.3 -> 2, 0.1 -> 3; 4 candidates, 2 bins
    assert rank_bins(scores, cand, 2).tolist() == [[0, 1, 0, 1, 0]]


def test_arp2_loss_on_a_hand_computed_example():
    teacher = torch.tensor([[0.0, 0.5, 0.3, 0.2]])
    student = torch.tensor([[0.0, 0.1, 0.2, 0.0]])
    valid = torch.tensor([[False, True, True, True]])
    # Both score vectors are scaled by the 3 valid tokens: y = (1.5, 0.9, 0.6), s = (0.3, 0.6, 0.0).
    y, s = (1.5, 0.9, 0.6), (0.3, 0.6, 0.0)
    pairs = [(0, 1), (0, 2), (1, 2)]
    want = sum(abs(y[i] - y[j]) * math.log2(1 + math.exp(-(s[i] - s[j]))) for i, j in pairs) / 9
    assert arp2_loss(student, teacher, valid, top_k=20).item() == pytest.approx(want, rel=1e-5)


def test_arp2_loss_with_rank_relevance_on_a_hand_computed_example():
    """ToP's reference relevance: y = K - rank inside the teacher's top-K, raw student scores, / K^2."""
    teacher = torch.tensor([[0.0, 0.5, 0.3, 0.2]])
    student = torch.tensor([[0.0, 0.1, 0.2, 0.0]])
    valid = torch.tensor([[False, True, True, True]])
    y, s = (3.0, 2.0, 1.0), (0.1, 0.2, 0.0)  # K = 3 (top_k=3): the three valid tokens in teacher order
    pairs = [(0, 1), (0, 2), (1, 2)]
    want = sum(abs(y[i] - y[j]) * math.log2(1 + math.exp(-(s[i] - s[j]))) for i, j in pairs) / 9
    got = arp2_loss(student, teacher, valid, top_k=3, relevance="rank")
    assert got.item() == pytest.approx(want, rel=1e-5)
    # With K = 20 the labels are 20, 19, 18: the same gaps, normalised by 400.
    assert arp2_loss(student, teacher, valid, top_k=20, relevance="rank").item() == pytest.approx(want * 9 / 400, rel=1e-5)
    with pytest.raises(ValueError, match="relevance"):
        arp2_loss(student, teacher, valid, relevance="ndcg")


def test_arp2_loss_prefers_the_teacher_ranking_and_uses_only_top_k():
    teacher = torch.tensor([[0.0, 0.4, 0.3, 0.2, 0.1]])
    valid = torch.tensor([[False, True, True, True, True]])
    agree = arp2_loss(torch.tensor([[0.0, 0.4, 0.3, 0.2, 0.1]]), teacher, valid)
    reverse = arp2_loss(torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4]]), teacher, valid)
    assert agree < reverse
    # With K = 2 only the teacher's two best tokens are ranked: the last two do not matter.
    a = arp2_loss(torch.tensor([[0.0, 0.4, 0.3, 0.0, 9.0]]), teacher, valid, top_k=2)
    b = arp2_loss(torch.tensor([[0.0, 0.4, 0.3, 5.0, -9.0]]), teacher, valid, top_k=2)
    assert a.item() == pytest.approx(b.item())


def test_lagrangian_ascent_and_descent_push_sparsity_towards_target():
    log_alpha = torch.zeros(4, requires_grad=True)
    l1 = torch.zeros((), requires_grad=True)
    l2 = torch.zeros((), requires_grad=True)
    gate_opt = torch.optim.SGD([log_alpha], lr=0.1)
    mult_opt = torch.optim.SGD([l1, l2], lr=0.1, maximize=True)
    target = 0.8
    for _ in range(5):
        sparsity = 1 - torch.sigmoid(log_alpha).mean()  # 0.5 < target
        loss = lagrangian(sparsity, target, l1, l2)
        gate_opt.zero_grad()
        mult_opt.zero_grad()
        loss.backward()
        gate_opt.step()
        mult_opt.step()
    assert l1.item() < 0  # ascent on lambda1 (s - t) with s < t drives lambda1 negative
    assert l2.item() > 0  # ascent on lambda2 (s - t)^2 is always upwards
    assert 1 - torch.sigmoid(log_alpha).mean().item() > 0.5  # and the gates raised the sparsity


def test_expected_macs_bounds():
    lengths = torch.tensor([10, 20])
    gates = TokenGates(4, [1, 2, 3], bin_count=4)
    dense = expected_macs_dense(lengths, 4, 8, 16)
    torch.testing.assert_close(dense, torch.tensor([4 * layer_macs(10.0, 8, 16), 4 * layer_macs(20.0, 8, 16)]))
    with torch.no_grad():
        gates.layer.log_alpha.fill_(LOG_ALPHA_MIN)  # layers almost surely do not prune
    off = expected_macs(gates, lengths, 8, 16)
    assert ((dense - off) / dense < 0.01).all()
    with torch.no_grad():
        gates.layer.log_alpha.fill_(LOG_ALPHA_MAX)
        gates.token.log_alpha.fill_(LOG_ALPHA_MIN)  # prune almost everything but CLS
    on = expected_macs(gates, lengths, 8, 16)
    # Layer 0's attention sees every token; its FFN and every later layer run on [CLS]
    # alone, since tokens pruned for layer 1 leave right after layer 0's attention.
    floor = layer_macs(lengths.float(), 8, 16, ffn_len=1.0) + 3 * layer_macs(1.0, 8, 16)
    assert (on >= floor - 1e-3).all() and ((on - floor) / floor < 0.2).all()


@pytest.mark.parametrize(
    "kwargs, setting",
    [
        ({"target_sparsity": 1.0}, "pruner.target_sparsity"),
        ({"target_sparsity": -0.1}, "pruner.target_sparsity"),
        ({"bin_count": 1}, "pruner.bin_count"),
        ({"gate_lr": 0}, "pruner.gate_lr"),
        ({"warmup_fraction": 1.5}, "pruner.warmup_fraction"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_setting(kwargs, setting):
    with pytest.raises(PrunerConfigError, match=setting.replace(".", r"\.")):
        ToPPruner(**kwargs)


def test_pruning_layer_zero_is_rejected_by_the_gates_and_before_training_by_the_pruner(tiny_bert_config):
    from modules.lit.bert_classifier import BertClassifier

    with pytest.raises(ValueError, match="pruning_layers"):
        TokenGates(4, [0, 1])
    module = BertClassifier(bert_config=tiny_bert_config)  # 3 layers
    with pytest.raises(PrunerConfigError, match=r"pruning_layers=\[0, 1\]"):
        ToPPruner(pruning_layers=[0, 1]).check(module, None)
    with pytest.raises(PrunerConfigError, match="distill_layers"):
        ToPPruner(distill_layers=[2]).check(module, None)  # layer 2 scores no pruning layer of 2..2
    ToPPruner().check(module, None)


def test_default_pruning_layers_follow_top_and_leave_layers_0_and_1_whole():
    assert default_pruning_layers(12) == list(range(2, 12))  # ToP's layers 2-11 of BERT-base
    assert default_pruning_layers(6) == [2, 3, 4, 5]
    assert default_pruning_layers(2) == [1]  # the only layer with scores before it
    with pytest.raises(PrunerConfigError, match="at least 2 encoder layers"):
        default_pruning_layers(1)


def test_pruner_state_round_trip():
    a = ToPPruner(teacher_ckpt="teacher.ckpt")
    with torch.no_grad():
        a.lambda1.fill_(-0.7)
        a.lambda2.fill_(0.3)
    a.distill_layers = [0, 1]
    b = ToPPruner()
    b.load_state_dict(a.state_dict())
    assert b.lambda1.item() == pytest.approx(-0.7) and b.lambda2.item() == pytest.approx(0.3)
    assert b.teacher_ckpt == "teacher.ckpt" and b.distill_layers == [0, 1]


def test_frozen_gates_train_under_the_evaluation_pruning():
    gates = _pruning_gates()
    scores, alive = torch.rand(3, 10), torch.ones(3, 10, dtype=torch.bool)
    served = gates.eval().token_keep(2, scores, alive)
    gates.train()
    gates.freeze()
    trained = gates.token_keep(2, scores, alive)
    assert trained.dtype == torch.bool and torch.equal(trained, served)
    # The frozen gates are a snapshot: later log_alpha changes do not move them.
    with torch.no_grad():
        gates.token.log_alpha.neg_()
    assert torch.equal(gates.token_keep(2, scores, alive), served)


def test_frozen_snapshot_survives_a_state_dict_round_trip_and_old_state_dicts_load_unfrozen():
    gates = _pruning_gates()
    layer_on = torch.tensor([True, False, True])
    kept = torch.rand(3, 5) > 0.5
    gates.freeze(layer_on, kept)
    fresh = TokenGates(**gates.config())
    fresh.load_state_dict(gates.state_dict())
    assert fresh.frozen and torch.equal(fresh.deterministic()[0], layer_on) and torch.equal(fresh.deterministic()[1], kept)
    old = {k: v for k, v in gates.state_dict().items() if not k.startswith("frozen")}
    legacy = TokenGates(**gates.config())
    legacy.load_state_dict(old)
    assert not legacy.frozen


def test_deterministic_kept_lengths_equal_the_encoders_at_eval(tiny_bert_config):
    from transformers import BertConfig

    from modules.nn.bert import PrunableBertForSequenceClassification

    torch.manual_seed(1)
    model = PrunableBertForSequenceClassification(BertConfig(**tiny_bert_config, num_labels=2)).eval()
    gates = TokenGates(3, [1, 2], bin_count=4)
    with torch.no_grad():
        gates.token.log_alpha.uniform_(-3, 3)
    gates.eval()
    lengths = torch.tensor([2, 3, 7, 12, 20])
    ids = torch.randint(1000, 2000, (5, 20))
    mask = (torch.arange(20)[None, :] < lengths[:, None]).long()
    for layer_on in (torch.tensor([True, True]), torch.tensor([False, True])):
        gates.freeze(layer_on, torch.rand(2, 4) > 0.4)
        out = model(ids, mask, token_pruner=gates, remove_pruned=True)
        analytic = deterministic_kept_lengths(gates, *gates.deterministic(), lengths)
        assert [a.tolist() for a in analytic] == [n.float().tolist() for n in out.kept_lengths]


def test_projection_closes_the_weakest_bins_under_target_and_reopens_the_strongest_over_it():
    gates = _pruning_gates()
    lengths = torch.randint(5, 60, (50,))

    def macs(kept):
        return sum(layer_macs(n, 32, 64) for n in kept)

    start_on, start_kept = (t.clone() for t in gates.deterministic())
    start = 1 - macs(deterministic_kept_lengths(gates, start_on, start_kept, lengths)).sum() / macs([lengths.float()] * 4).sum()
    target = float(start) + 0.2
    layer_on, kept, reached, changed = project_to_sparsity(gates, lengths, macs, target)
    assert reached >= target and changed > 0
    assert not (kept & ~start_kept).any()  # only closes bins
    closed = start_kept & ~kept
    la = gates.token.log_alpha.detach().view(3, 5)
    assert la[closed].max() <= la[kept & layer_on[:, None]].min()  # the weakest ones
    # Over the target: the strongest closed bins reopen while the target holds; one more would break it.
    lower = float(start) - 0.1
    on2, kept2, reached2, opened = project_to_sparsity(gates, lengths, macs, lower)
    assert lower <= reached2 < float(start) and opened > 0
    assert not (start_kept & ~kept2).any()  # only opens bins
    still_closed = ~kept2 & on2[:, None]
    if still_closed.any():
        la_closed = torch.where(still_closed, la, torch.full_like(la, -math.inf))
        nxt = kept2.clone()
        nxt.view(-1)[la_closed.argmax()] = True
        assert 1 - macs(deterministic_kept_lengths(gates, on2, nxt, lengths)).sum() / macs([lengths.float()] * 4).sum() < lower


def test_cached_teacher_outputs_equal_fresh_ones_whatever_the_padding(tiny_setup):
    from pruners.distillation import load_teacher_model

    dm, teacher_ckpt, _ = tiny_setup
    dm.setup("fit")
    pruner = ToPPruner(teacher_ckpt=str(teacher_ckpt))
    pruner.teacher = load_teacher_model(teacher_ckpt)
    ds = dm.datasets["train"]
    batch = dm.collate([ds[i] for i in range(6)])
    logits, scores = pruner.teacher_forward(batch)
    pruner.teacher_outputs(batch)  # fills the cache
    assert len(pruner._teacher_cache) == 6
    # The same rows in another order and padded to another length come from the cache.
    reordered = dm.collate([ds[i] for i in [5, 3, 1]])
    pruner.teacher = None  # a cache miss would fail
    cached_logits, cached_scores = pruner.teacher_outputs(reordered)
    torch.testing.assert_close(cached_logits, logits[[5, 3, 1]])
    mask = reordered["attention_mask"].bool()
    for row, i in enumerate([5, 3, 1]):
        torch.testing.assert_close(cached_scores[row][mask[row]], scores[i][batch["attention_mask"][i].bool()])
        assert (cached_scores[row][~mask[row]] == 0).all()


def _tiny_model_with_frozen_gates(tiny_bert_config, layer_on, kept, seed=1):
    from transformers import BertConfig

    from modules.nn.bert import PrunableBertForSequenceClassification

    torch.manual_seed(seed)
    model = PrunableBertForSequenceClassification(BertConfig(**tiny_bert_config, num_labels=2)).eval()
    gates = TokenGates(model.config.num_hidden_layers, [1, 2], bin_count=4)
    gates.freeze(layer_on, kept)
    gates.eval()
    return model, gates


@pytest.mark.parametrize("layer_on", [[True, True], [False, True], [True, False]])
def test_served_macs_equal_an_independent_flop_count(tiny_bert_config, layer_on):
    """The analytic count (each FFN on the tokens it runs on) equals torch's FlopCounterMode / 2
    on the served model at batch 1: the scoring layer's FFN really runs on the kept tokens.

    Run broken once: with tokens removed at the pruning layer's input (the old removal point)
    the flop count exceeded the analytic count by the scoring layers' FFN on the dropped tokens."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    kept = torch.tensor([[True, False, True, False], [True, True, False, False]])
    model, gates = _tiny_model_with_frozen_gates(tiny_bert_config, torch.tensor(layer_on), kept)
    for n in (2, 5, 11, 20):
        ids = torch.randint(1000, 2000, (1, n))
        with torch.no_grad():
            out = model(ids, token_pruner=gates, remove_pruned=True)
            # The math kernel runs attention as matmuls the counter sees (the fused CPU kernel it skips).
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                model(ids, token_pruner=gates, remove_pruned=True)
        assert counter.get_total_flops() == 2 * int(model.macs(out.kept_lengths).item())


def test_scoring_layers_feed_forward_runs_on_the_kept_tokens(tiny_bert_config):
    """Hooks on every FFN: layer l-1's feed-forward block runs on as many tokens as pruning layer l keeps,
    and the kept tokens' values equal those of the masked (not removed) model."""
    kept = torch.tensor([[True, False, True, False], [True, False, False, False]])
    model, gates = _tiny_model_with_frozen_gates(tiny_bert_config, torch.tensor([True, True]), kept)
    seen: list[int] = []
    hooks = [l.intermediate.dense.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
             for l in model.bert.encoder.layer]
    ids = torch.randint(1000, 2000, (1, 17))
    with torch.no_grad():
        removed = model(ids, token_pruner=gates, remove_pruned=True)
    for h in hooks:
        h.remove()
    lengths = [int(n) for n in removed.kept_lengths]
    assert lengths[0] == 17 and lengths[1] < 17 and lengths[2] < lengths[1]
    assert seen == [lengths[1], lengths[2], lengths[2]]
    with torch.no_grad():
        masked = model(ids, token_pruner=gates, remove_pruned=False)
    torch.testing.assert_close(removed.logits, masked.logits, atol=1e-5, rtol=1e-5)


def test_what_each_layer_reads_counts_token_kinds_of_the_kept_tokens(tmp_path, tiny_bert_config):
    """``kept_token_kinds_per_layer``: layer 0 reads every token, counted by kind straight from the
    tokenizer; kinds sum to the kept tokens of each layer; [CLS] is read by every layer; later layers
    read what the deterministic gates keep (``deterministic_kept_lengths``)."""
    import pandas as pd

    from modules.lit.bert_classifier import BertClassifier
    from modules.core.packages import default_bert_dir
    from modules.data.text_data import TextFileDataModule
    from pipelines.tasks.text_classification import kept_tokens_per_layer

    texts = ["An unbelievably dull, overlong film!", "Great acting; the plot, however, meanders.",
             "I loved it.", "Boring... truly boring", "a masterpiece of understatement"] * 8
    path = tmp_path / "kinds.csv"
    pd.DataFrame({"text": texts, "label": [i % 2 for i in range(len(texts))]}).to_csv(path, index=False)
    dm = TextFileDataModule(path=str(path), tokenizer=default_bert_dir(), batch_size=4, eval_batch_size=4)
    dm.setup("fit")
    torch.manual_seed(0)
    module = BertClassifier(bert_config=tiny_bert_config, num_labels=2)
    module.token_gates = TokenGates(3, [1, 2], bin_count=4)
    module.token_gates.freeze(torch.tensor([True, True]), torch.tensor([[True, True, False, True], [True, False, False, False]]))
    module.eval()
    got = kept_tokens_per_layer(module, dm)
    tok = dm.tokenizer
    test_ids = [dm.datasets["test"][i]["input_ids"] for i in range(len(dm.datasets["test"]))]
    pieces = [tok.convert_ids_to_tokens(ids) for ids in test_ids]
    n = len(pieces)
    expected0 = {
        "cls": 1.0, "sep": 1.0,
        "punctuation": sum(sum(p in ",.;!" for p in t) for t in pieces) / n,
        "subword": sum(sum(p.startswith("##") for p in t) for t in pieces) / n,
    }
    expected0["word"] = sum(len(t) for t in pieces) / n - sum(expected0.values())
    assert got["kept_token_kinds_per_layer"][0] == pytest.approx(expected0)
    lengths = torch.tensor([len(t) for t in pieces])
    analytic = deterministic_kept_lengths(module.token_gates, *module.token_gates.deterministic(), lengths)
    assert got["kept_tokens_per_layer"] == pytest.approx([float(a.mean()) for a in analytic])
    for kinds, kept in zip(got["kept_token_kinds_per_layer"], got["kept_tokens_per_layer"]):
        assert sum(kinds.values()) == pytest.approx(kept) and kinds["cls"] == pytest.approx(1.0)
    assert got["kept_tokens_per_layer"][2] < got["kept_tokens_per_layer"][1] < got["kept_tokens_per_layer"][0]


def test_evaluation_gates_keep_the_bins_with_the_largest_log_alpha_not_a_ranking_prefix():
    """What the evaluation gates keep: the k = round(sum P(open)) bins with the largest log_alpha, even
    when that skips a top-ranked bin (bin 1 closed, bin 3 open here), as the docstring says."""
    gates = TokenGates(3, [1, 2], bin_count=4)
    with torch.no_grad():
        gates.layer.log_alpha.fill_(LOG_ALPHA_MAX)
        gates.token.log_alpha.copy_(torch.tensor([5.0, -5.0, -5.0, 5.0, 5.0, 5.0, -5.0, -5.0]))
    gates.eval()
    layer_on, kept = gates.deterministic()
    assert layer_on.tolist() == [True, True]
    assert kept.tolist() == [[True, False, False, True], [True, True, False, False]]


# ----------------------------------------------------------------------------- known values (issue 33)
def _hand_layer_macs(n: float, h: int, i: int, n_ffn: float | None = None) -> float:
    """One encoder layer's MACs written out: Q, K, V, output projections, scores and context on ``n``
    tokens, FFN on ``n_ffn`` (default ``n``)."""
    return 4 * n * h * h + 2 * n * n * h + 2 * (n if n_ffn is None else n_ffn) * h * i


def test_expected_macs_equals_a_hand_computed_value():
    """Two pruning layers with gate probabilities chosen to be exact fractions.

    log_alpha = -(2/3) ln 11 gives P(z != 0) = 1/2 (the stretch (-0.1, 1.1) puts 0 at logit -ln 11);
    adding ln 3 gives 3/4. A layer gate's P(on) = P(z > 0.5) = sigmoid(log_alpha). So layer 1 keeps
    1 - 1/2 (1 - (1/2 + 3/4) / 2) = 13/16 of the non-[CLS] tokens, layer 2 1 - 3/4 (1 - 1/2) = 5/8 of
    what is left. A sample of 11 tokens ([CLS] + 10) attends on 11, 1 + 10 * 13/16 and
    1 + 10 * 13/16 * 5/8 tokens, each layer's FFN on the next layer's count (the last layer's on its
    own); a sample of [CLS] alone on 1 token in every layer. Counting [CLS] among the pruned tokens
    (``m_0 = length``) gives other values: checked, it fails; so does the FFN on its own layer's count.
    """
    half = -(2.0 / 3.0) * math.log(11.0)
    gates = TokenGates(3, [1, 2], bin_count=2)
    with torch.no_grad():
        gates.token.log_alpha.copy_(torch.tensor([half, half + math.log(3.0), half, half]))
        gates.layer.log_alpha.copy_(torch.tensor([0.0, math.log(3.0)]))
    torch.testing.assert_close(gates.token_keep_prob(), torch.tensor([[0.5, 0.75], [0.5, 0.5]]))
    torch.testing.assert_close(gates.keep_ratio(), torch.tensor([13 / 16, 5 / 8]))
    h, i = 8, 16
    got = expected_macs(gates, torch.tensor([11, 1]), h, i)
    tokens = [11.0, 1 + 10 * 13 / 16, 1 + 10 * 13 / 16 * 5 / 8]
    ffn = tokens[1:] + tokens[-1:]
    want = [sum(_hand_layer_macs(n, h, i, f) for n, f in zip(tokens, ffn)), 3 * _hand_layer_macs(1.0, h, i)]
    assert want[0] == pytest.approx(7088 + 5224.25 + 3703.09765625)  # the arithmetic, spelled out
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=0)


def test_prob_nonzero_at_log_alpha_zero_is_the_closed_form_and_the_sampled_rate():
    """P(z != 0) at log_alpha = 0 with ToP's constants (stretch (-0.1, 1.1), T = 2/3) is
    sigmoid((2/3) ln 11) = 0.8318 (the issue's "about 0.8305" is this value, rounded loosely); 4 million
    samples of the gate agree within 0.001 (their standard error is 0.0002). Dividing by the temperature
    instead of multiplying in ``prob_above``: checked, it fails."""
    gates = HardConcreteGates(1, init_log_alpha=0.0)
    closed = 1.0 / (1.0 + 11.0 ** (-2.0 / 3.0))
    assert closed == pytest.approx(0.83183, abs=1e-5)
    assert gates.prob_nonzero().item() == pytest.approx(closed, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    u = torch.rand(4_000_000, generator=g, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    z = (torch.sigmoid((torch.log(u) - torch.log1p(-u)) / (2.0 / 3.0)) * 1.2 - 0.1).clamp(0, 1)
    assert (z > 0).double().mean().item() == pytest.approx(closed, abs=1e-3)


def test_lagrangian_value_and_sign():
    """``lambda1 (s - t) + lambda2 (s - t)^2`` at s = 0.3, t = 0.5, lambda = (-2, 3): 0.4 + 0.12 = 0.52; its
    derivative in s, lambda1 + 2 lambda2 (s - t) = -3.2, is negative, so the gates' descent raises the
    sparsity towards the target. Swapping s and t gives -0.28: checked, it fails."""
    s = torch.tensor(0.3, requires_grad=True)
    value = lagrangian(s, 0.5, torch.tensor(-2.0), torch.tensor(3.0))
    assert value.item() == pytest.approx(0.52)
    value.backward()
    assert s.grad.item() == pytest.approx(-3.2)


def test_kd_loss_at_t2_equals_kl_div_and_the_hand_formula():
    """KD at T = 2: T^2 KL(softmax(teacher / T) || softmax(student / T)) averaged over the batch, against
    torch.nn.functional.kl_div on log-probabilities (log_target, summed then divided by B) and the sum
    p (log p - log q) written out in float64. Without the T^2 factor: checked, it fails."""
    from pruners.distillation import kd_loss

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    got = kd_loss(student, teacher, 2.0)
    log_q, log_p = torch.log_softmax(student / 2, -1), torch.log_softmax(teacher / 2, -1)
    ref = torch.nn.functional.kl_div(log_q, log_p, reduction="sum", log_target=True) / 5 * 4
    torch.testing.assert_close(got, ref)
    hand = 0.0
    for srow, trow in zip(student.double().tolist(), teacher.double().tolist()):
        zs = [math.exp(x / 2) for x in srow]
        zt = [math.exp(x / 2) for x in trow]
        p = [x / sum(zt) for x in zt]
        q = [x / sum(zs) for x in zs]
        hand += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    assert got.item() == pytest.approx(4 * hand / 5, rel=1e-5)


def test_schedule_ramps_the_target_linearly_and_decays_the_ranking_weight():
    """100 steps, warm-up fraction 0.3: the target is 0.5 * step / 30 until step 30, then 0.5; the ranking
    weight alpha (1 - 0.99 step / 30), then 0.01 alpha. A quadratic ramp: checked, it fails."""
    pruner = ToPPruner(target_sparsity=0.5, warmup_fraction=0.3, rank_alpha=0.01)
    pruner._total_steps = 100
    for step, target, alpha in [(0, 0.0, 0.01), (15, 0.25, 0.01 * (1 - 0.495)), (30, 0.5, 0.0001), (99, 0.5, 0.0001)]:
        got = pruner.schedule(step)
        assert got[0] == pytest.approx(target) and got[1] == pytest.approx(alpha), step


def test_training_loss_is_task_plus_kd_plus_lagrangian_of_expected_sparsity_minus_target(tiny_setup):
    """ToP's objective on a batch of the tiny setup, each term recomputed here: the expected sparsity from
    :func:`expected_macs` (itself checked by value above), the target from the schedule, the Lagrangian
    ``lambda1 (s - t) + lambda2 (s - t)^2`` with lambda = (-2, 3) (swapping s and t in ``training_loss``
    changes it: checked, it fails), the KD loss against the teacher's logits, and the total."""
    from types import SimpleNamespace

    from modules.lit.bert_classifier import BertClassifier
    from pruners.distillation import kd_loss, load_teacher_model

    dm, teacher_ckpt, _ = tiny_setup
    dm.setup("fit")
    student = BertClassifier.load_from_checkpoint(teacher_ckpt)
    pruner = ToPPruner(target_sparsity=0.6, teacher_ckpt=str(teacher_ckpt), bin_count=4, warmup_fraction=0.5)
    pruner.teacher = load_teacher_model(teacher_ckpt)
    gates = pruner.attach(student)
    pruner._total_steps = 10
    with torch.no_grad():
        gates.token.log_alpha.fill_(-0.5)
        gates.layer.log_alpha.fill_(1.0)
        pruner.lambda1.fill_(-2.0)
        pruner.lambda2.fill_(3.0)
    module = SimpleNamespace(token_gates=gates, model=student.model, trainer=SimpleNamespace(global_step=3))
    ds = dm.datasets["train"]
    batch = dm.collate([ds[i] for i in range(6)])
    student.train()
    torch.manual_seed(0)
    outputs = student(batch, return_scores=True)
    task = torch.tensor(0.7)
    loss, logs = pruner.training_loss(module, batch, outputs, task)

    cfg = student.model.config
    lengths = batch["attention_mask"].sum(1)
    s = 1 - expected_macs(gates, lengths, cfg.hidden_size, cfg.intermediate_size).sum() / (
        3 * sum(_hand_layer_macs(float(n), cfg.hidden_size, cfg.intermediate_size) for n in lengths))
    t = 0.6 * 3 / 5
    assert logs["expected_sparsity"].item() == pytest.approx(s.item(), rel=1e-5) and logs["target_sparsity"] == pytest.approx(t)
    assert abs(s.item() - t) > 0.05  # the check below can tell (s - t) from (t - s)
    lag = -2.0 * (s.item() - t) + 3.0 * (s.item() - t) ** 2
    assert logs["lagrangian"].item() == pytest.approx(lag, rel=1e-5)
    kd = kd_loss(outputs.logits, pruner.teacher_forward(batch)[0], 2.0)
    assert logs["kd_loss"].item() == pytest.approx(kd.item(), rel=1e-5)
    _, alpha = pruner.schedule(3)
    assert loss.item() == pytest.approx(0.7 + kd.item() + lag + alpha * logs["rank_loss"].item(), rel=1e-5)


def _pruned_tiny_model(teacher_ckpt):
    """The tiny teacher with frozen token gates (both pruning layers on, 2 of 4 rank bins kept, then 3),
    a head removed from layers 0 and 2 and a quarter of every layer's FFN neurons masked: its served copy."""
    from modules.lit.bert_classifier import BertClassifier

    module = BertClassifier.load_from_checkpoint(teacher_ckpt)
    module.token_gates = TokenGates(3, [1, 2], bin_count=4)
    module.token_gates.freeze(torch.tensor([True, True]),
                              torch.tensor([[True, False, True, False], [True, True, False, True]]))
    heads = [torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.ones(4), torch.tensor([0.0, 1.0, 1.0, 1.0])]
    neurons = [(torch.arange(64) % 4 != k).float() for k in range(3)]
    module.model.set_structured_masks(heads=heads, neurons=neurons)
    served = module.served_model()
    assert served.model.layer_structure() == [(3, 48), (4, 48), (3, 48)]  # physically smaller
    return served


def test_served_macs_equal_an_independent_count_of_multiply_accumulates(tiny_setup):
    """The MACs the run reports (test/macs_per_sample of the served model, from ``model.macs`` on the
    kept lengths) against torch.utils.flop_counter.FlopCounterMode, which counts the matrix products the
    served model really runs (FLOPs = 2 MACs), one test sample at a time: equal per sample and on average.
    Counting the removed heads as present (``macs`` without the attention width): checked, it fails."""
    import lightning as L
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    dm, teacher_ckpt, _ = tiny_setup
    dm.setup("test")
    served = _pruned_tiny_model(teacher_ckpt)
    ds = dm.datasets["test"]
    counted = []
    with torch.no_grad():
        for i in range(len(ds)):
            batch = dm.collate([ds[i]])
            # the math backend's attention is two counted batched products (the CPU's fused kernel is not counted)
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as flops:
                out = served(batch)
            counted.append(flops.get_total_flops() / 2)
            assert served.model.macs(out.kept_lengths).item() == pytest.approx(counted[-1], rel=1e-6), i
    dense_macs = served.dense_macs_per_sample(dm.collate([ds[0]])).item()
    assert counted[0] < dense_macs  # the pruning removes work
    (reported,) = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        served, datamodule=dm, verbose=False)
    assert reported["test/macs_per_sample"] == pytest.approx(sum(counted) / len(counted), rel=1e-5)


def test_kept_tokens_per_layer_equal_the_tokens_each_served_layer_receives(tiny_setup):
    """``kept_tokens_per_layer`` (the results' per-layer token counts) against the sequence length each
    encoder layer's attention in the served model receives, read by forward hooks on one test sample at a time (no
    padding), averaged over the test split. Counting each batch's longest sample for every sample (padding
    included): checked, it fails."""
    from pipelines.tasks.text_classification import kept_tokens_per_layer

    dm, teacher_ckpt, _ = tiny_setup
    dm.setup("test")
    served = _pruned_tiny_model(teacher_ckpt)
    seen: list[int] = []
    hooks = [layer.attention.self.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
             for layer in served.model.bert.encoder.layer]
    ds = dm.datasets["test"]
    per_sample = []
    with torch.no_grad():
        for i in range(len(ds)):
            seen.clear()
            served(dm.collate([ds[i]]))
            per_sample.append(list(seen))
    for h in hooks:
        h.remove()
    counted = [sum(col) / len(per_sample) for col in zip(*per_sample)]
    assert counted[0] > counted[1] > counted[2]  # both pruning layers remove tokens
    assert kept_tokens_per_layer(served, dm)["kept_tokens_per_layer"] == pytest.approx(counted, rel=1e-6)


def test_one_distillation_component_gives_the_known_loss_and_every_distilling_pruner_takes_it():
    """``pruner.distillation`` (:class:`pruners.distillation.Distillation`): ``task_weight * task + kd_weight * T^2 KL``
    by value (for logits (1, 0) against the teacher's (0, 1) at T = 2 the KL is tanh(1/4) / 2), the same
    value through MaskedDistillation's training loss, one config node per distilling pruner, settings checked once."""
    import math
    from types import SimpleNamespace

    from conftest import build_pruner

    from pruners.base import PrunerConfigError
    from pruners.distillation import Distillation
    from pruners.swiftpruner.finetune import MaskedDistillation

    student, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    task = torch.tensor(0.3)
    dist = Distillation(temperature=2.0, kd_weight=2.0, task_weight=0.5)
    loss, kd = dist.loss(task, student, teacher)
    assert float(kd) == pytest.approx(4 * math.tanh(0.25) / 2, rel=1e-6)
    assert float(loss) == pytest.approx(0.5 * 0.3 + 2.0 * 2 * math.tanh(0.25), rel=1e-6)

    pruner = MaskedDistillation(distillation=dist)
    pruner.teacher = lambda ids, mask, types: SimpleNamespace(logits=teacher)
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3)}
    got, logs = pruner.training_loss(None, batch, SimpleNamespace(logits=student), task)
    assert torch.equal(got, loss) and torch.equal(logs["kd_loss"], kd)

    for name in ("top", "swiftpruner", "layerdrop"):
        built = build_pruner(f"pruner={name}", "pruner.distillation.temperature=4")
        assert isinstance(built.distillation, Distillation) and built.distillation.temperature == 4.0
        assert built.distillation.settings() == {"temperature": 4.0, "kd_weight": 1.0, "task_weight": 1.0}
    composite = build_pruner("pruner=swiftpruner_top", "pruner.stages.tokens.distillation.kd_weight=0.5")
    assert composite.stages["tokens"].distillation.kd_weight == 0.5
    with pytest.raises(PrunerConfigError, match=r"pruner\.distillation\.temperature=0\.0 is out of range"):
        Distillation(temperature=0.0)
    with pytest.raises(PrunerConfigError, match=r"pruner\.distillation\.kd_weight=-1"):
        Distillation(kd_weight=-1)

"""DDP (issue 21): `trainer=ddp` on 2 CPU processes (gloo) through run.py, for every pruner's tiny config.

Each run must finish with exactly one results.json (rank 0 writes), the same mask digest on both
ranks (each rank hashes the masks and gates of the models it holds in memory after each phase's
fit, before anything is reloaded from the checkpoints rank 0 alone writes), and, where the algorithm is deterministic given the data (D2S on a stream, the dense DLRM),
the same decisions and figures as one process (SwiftPruner's search, with its latency table and
budget fixed, evaluates the same candidates). The helpers are checked on 2 spawned gloo processes
and in one process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from processes import run_script

from modules.lit.distributed import broadcast, gather_objects, gather_rows, mean_, state_digest, world_size
from modules.lit.dlrm import rank_share
from modules.nn.dlrm import MaskedLinear

TINY_BERT = ("model.module.bert_config={vocab_size:30522,hidden_size:32,num_hidden_layers:3,num_attention_heads:4,"
             "intermediate_size:64,max_position_embeddings:128}")
# a tiny random BERT on 32 examples trains no real teacher: these runs check the plumbing (issue 35)
TEXT = [TINY_BERT, "data.limit_per_split=32", "trainer.val_check_interval=1.0", "trainer.num_sanity_val_steps=0",
        "latency.batch_sizes=[1]", "latency.examples=4", "allow_majority_class_teacher=true"]
STREAM = ["model=dlrm", "data.limit_rows=2400", "data.window=400", "latency.batch_sizes=[1]"]
D2S = ["pruner=d2s", "pruner.update_every=5", "pruner.target_sparsity=0.8"]
SWIFT = ["pruner.latency.repeats=2", "pruner.latency.warmup=0", "pruner.latency.calibration_models=0",
         # A 1 ms budget on a shared machine: whichever candidate fits its single timing is taken
         # (verification and its refusal of noisy picks have their own tests in test_swiftpruner.py).
         "pruner.latency.verify_rounds=0", "pruner.latency.budget_fraction=1.0", "pruner.latency.margin=0",
         "pruner.latency.seq_len=16",
         "pruner.search.generations=1", "pruner.search.population_size=4", "pruner.search.parents=2",
         "pruner.importance.examples=16", "pruner.proxy.examples=16",
         "pruner.latency.runtime=torch"]  # DDP sharing is the point here; ORT timing has its own test


def run_py(run_dir: Path, *overrides: str, ddp: bool = True) -> dict:
    """``python run.py`` (2 gloo processes with ``ddp``) into ``run_dir``; returns its results.json."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    args = [*(["trainer=ddp"] if ddp else []), "logger=csv", "threads=1", "trainer.enable_progress_bar=false",
            "latency.repeats=2", "latency.warmup=1", f"hydra.run.dir={run_dir}", *overrides]
    proc = run_script("run.py", args, env)
    if proc.returncode != 0:  # every rank's traceback (the one that crashed first is not the last printed)
        run_dir.mkdir(parents=True, exist_ok=True)  # a run that failed before Hydra made it
        (run_dir / "stderr.txt").write_text(proc.stderr)
        tracebacks = proc.stderr.split("Traceback (most recent call last)")[1:]
        shown = "\n---\n".join(t[-2500:] for t in tracebacks) if tracebacks else proc.stderr[-3000:]
        pytest.fail(f"run.py exited with {proc.returncode}; every rank's traceback:\n{shown}")
    assert proc.stdout.count("results: ") == 1, "rank 0 alone prints the table"
    files = list(run_dir.rglob("results.json"))
    assert files == [run_dir / "results.json"], files
    return json.loads(files[0].read_text())


def check_ranks_agree(results: dict, world: int = 2) -> None:
    d = results["distributed"]
    assert d["world_size"] == world and len(d["mask_digest_per_rank"]) == world
    assert len(set(d["mask_digest_per_rank"])) == 1 and d["digests_agree"]


# ----------------------------------------------------------------------------- end to end, 2 processes
@pytest.mark.slow
def test_d2s_on_two_ranks_equals_one_process(tmp_path):
    """Every window on every rank, in time order; the same masks, per-window figures and history as one process."""
    two = run_py(tmp_path / "ddp", *STREAM, *D2S)
    one = run_py(tmp_path / "one", *STREAM, *D2S, ddp=False)
    check_ranks_agree(two)
    assert two["distributed"]["mask_digest_per_rank"][0] == one["distributed"]["mask_digest_per_rank"][0]
    for name in ("dense", "pruned"):
        assert two[name]["per_window"]["window"] == list(range(6))  # prequential order kept, whole stream
        assert two[name]["per_window"]["rows"] == one[name]["per_window"]["rows"]
        for key in ("auc", "ne", "log_loss"):
            assert two[name]["per_window"][key] == pytest.approx(one[name]["per_window"][key], abs=1e-5)
    assert [h["step"] for h in two["pruner"]["history"]] == [h["step"] for h in one["pruner"]["history"]]
    assert two["pruner"]["masked"] == pytest.approx(one["pruner"]["masked"])
    assert (tmp_path / "ddp" / "sparsity_history.png").is_file() and (tmp_path / "ddp" / "stream_auc.png").is_file()


@pytest.mark.slow
def test_dense_stream_model_on_two_ranks(tmp_path):
    """``pruner=none``: the dense DLRM alone; digests agree, one results.json."""
    results = run_py(tmp_path, *STREAM, "pruner=none", "data.limit_rows=1200")
    check_ranks_agree(results)
    assert results["dense"]["per_window"]["window"] == list(range(3))
    assert set(results["dense"]["latency_ms"]) == {"1"}


@pytest.mark.slow
def test_top_on_two_ranks_freezes_alike_and_survives_the_freeze(tmp_path):
    """ToP trains on, after its gates freeze (no unused-parameters error), and both ranks freeze the same gates.

    The digests are of each rank's in-memory gates (log_alpha, frozen snapshot): with ToP's all-reduce of
    the gate and multiplier gradients removed (``ToPPruner.on_before_optimizer_step``), each rank steps its
    gates on its own shard and ``check_ranks_agree`` fails (checked once).
    """
    # batches of 4: 4 steps per rank before the gates freeze (Adam's first step is lr * sign(grad), the same on
    # both ranks whenever the signs agree, so one step could not tell whether the ranks shared their gradients)
    results = run_py(tmp_path, "model=bert", "pruner=top", *TEXT, "pruner.pruning_epochs=2", "data.batch_size=4")
    check_ranks_agree(results)
    assert results["pruner"]["gates_frozen_at_step"] is not None
    assert results["pruner"]["last_train_step"]["lagrangian"] == 0.0  # a step ran with frozen gates
    assert set(results["pruned"]["latency_ms"]) == {"1"}
    # The test split, run whole on each rank with synced metrics, gives one process's figures.
    from conftest import compose_config
    from modules.lit.bert_classifier import BertClassifier
    from pipelines.common import build
    from pipelines.tasks.text_classification import evaluate_test_split

    cfg = compose_config("model=bert", "pruner=top", "logger=csv", "data.limit_per_split=32", output_dir=tmp_path / "one")
    datamodule = build(cfg.data)
    datamodule.setup("fit")
    served = BertClassifier.load_from_checkpoint(tmp_path / results["pruned"]["checkpoint"], map_location="cpu").served_model()
    one = evaluate_test_split(cfg, served, datamodule)
    for key in ("accuracy", "f1", "sparsity"):
        assert one[key] == pytest.approx(results["pruned"]["metrics"][key])
    assert one["macs_per_sample"] == pytest.approx(results["pruned"]["macs_per_sample"])


@pytest.mark.slow
def test_swiftpruner_on_two_ranks_searches_as_one_process(tmp_path):
    """Both ranks search in lockstep (importance and proxy in shares, rank 0 times). With the dense model,
    the lookup table and the budget fixed the search does not depend on timings: two ranks evaluate the
    candidates one process evaluates, with the same proxy scores, and fine-tune a choice of the same
    quality on both ranks."""
    fixed = [*SWIFT, "pruner.latency.budget_ms=1000"]  # every candidate is within it
    one = run_py(tmp_path / "one", "model=bert", "pruner=swiftpruner", *TEXT, *fixed, ddp=False)
    # the same dense model (two ranks would fine-tune their own: text batches are sharded) and lookup table
    same = [f"pruner.teacher_ckpt={tmp_path / 'one' / 'checkpoints' / 'dense' / 'final.ckpt'}",
            f"pruner.latency.table={tmp_path / 'one' / 'latency_table.json'}"]
    two = run_py(tmp_path / "two", "model=bert", "pruner=swiftpruner", *TEXT, *fixed, *same)
    check_ranks_agree(two)
    assert two["pruner"]["chosen"]["heads"] and "uniform" in two
    assert (tmp_path / "two" / "search_history.json").is_file() and (tmp_path / "two" / "search_pareto.png").is_file()
    searched = [json.loads((tmp_path / run / "search_history.json").read_text()) for run in ("one", "two")]
    evaluated = [[(c["genes"], c["quality"]) for c in h["candidates"]] for h in searched]
    assert len(evaluated[0]) > 1 and len({q for _, q in evaluated[0]}) > 1
    assert evaluated[1] == evaluated[0]
    # ties in proxy quality go to the faster timing, so the genes may differ; the quality may not
    assert two["pruner"]["chosen"]["quality"] == one["pruner"]["chosen"]["quality"]


@pytest.mark.slow
def test_composite_on_two_ranks_keeps_one_decision_per_stage(tmp_path):
    """``pruner=swiftpruner_top`` under DDP: both stages run on both ranks with equal mask digests (the structure
    search in lockstep, the token gates frozen alike), and the tokens phase keeps the structure's masks."""
    structure = [s.replace("pruner.", "pruner.stages.structure.", 1) for s in SWIFT]
    results = run_py(tmp_path, "model=bert", "pruner=swiftpruner_top", *TEXT, *structure,
                     "pruner.stages.structure.latency.budget_ms=1000", "pruner.stages.structure.head_choices=[2,4]", "pruner.stages.tokens.pruning_epochs=2",
                     "pruner.stages.tokens.bin_count=4",
                     # int8 export tests the int8 model's metrics with torchmetrics on rank 0 alone, whose sync then
                     # waits for the rank that has finished (a failure of main's quantization under DDP, not of the composite)
                     "export.quantize=none")
    check_ranks_agree(results)
    assert results["phases"] == {"structure": "structure", "tokens": "pruned"}
    assert results["pruner"]["stages"]["tokens"]["gates_frozen_at_step"] is not None
    states = [torch.load(tmp_path / "checkpoints" / p / "final.ckpt", weights_only=True)["state_dict"] for p in ("structure", "tokens")]
    masks = [k for k in states[0] if k.endswith(("head_mask", "neuron_mask"))]
    assert masks and all(torch.equal(states[0][k], states[1][k]) for k in masks)


# ----------------------------------------------------------------------------- helpers, one process
def test_helpers_are_the_identity_in_one_process():
    t = torch.arange(6.0).view(3, 2)
    assert world_size() == 1 and torch.equal(gather_rows(t), t)
    mean_([t, None])
    assert torch.equal(t, torch.arange(6.0).view(3, 2))
    assert broadcast({"a": 1}) == {"a": 1} and gather_objects(3) == [3]


def test_rank_shares_cover_the_minibatch_and_weights_give_its_mean():
    idx = torch.arange(7)
    shares = [rank_share(idx, 3, r) for r in range(3)]
    assert sorted(torch.cat([s for s, _ in shares]).tolist()) == list(range(7))
    losses = torch.rand(7)
    # DDP averages the ranks' weighted (mean) losses' gradients: that is the minibatch mean
    assert sum(w * float(losses[s].mean()) for s, w in shares) / 3 == pytest.approx(float(losses.mean()))
    assert rank_share(torch.arange(1), 2, 1)[1] == 0.0  # a rank without rows still steps, at weight 0
    assert rank_share(idx, 1, 0) == (idx, 1.0)


def test_digest_changes_with_a_mask_or_a_shape_and_not_with_weights():
    layer = MaskedLinear(4, 3)
    before = state_digest(layer)
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert state_digest(layer) == before  # weights are not decisions
    layer.mask[0, 0] = False
    assert state_digest(layer) != before
    assert state_digest(MaskedLinear(4, 2)) != state_digest(MaskedLinear(4, 3))


def test_digest_covers_top_gates_and_their_frozen_snapshot(tiny_bert_config):
    """The digest of a ToP model changes with any gate's log_alpha and with the frozen evaluation gates."""
    from modules.lit.bert_classifier import BertClassifier
    from modules.nn.gates import TokenGates
    from pipelines.distributed import memory_digest

    module = BertClassifier(bert_config=tiny_bert_config, num_labels=2)
    module.token_gates = TokenGates(3, [1, 2], bin_count=4)
    before = memory_digest(module)
    with torch.no_grad():
        module.token_gates.token.log_alpha[5] += 1e-3
    after_token = memory_digest(module)
    with torch.no_grad():
        module.token_gates.layer.log_alpha[0] -= 1e-3
    after_layer = memory_digest(module)
    module.token_gates.freeze(torch.tensor([True, False]), torch.ones(2, 4, dtype=torch.bool))
    frozen = memory_digest(module)
    module.token_gates.freeze(torch.tensor([True, False]), torch.eye(2, 4, dtype=torch.bool))
    assert len({before, after_token, after_layer, frozen, memory_digest(module)}) == 5


def test_collectives_on_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    from ddp_worker import collectives_worker  # a light module: the spawned processes import only it and torch

    mp.spawn(collectives_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["rows"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]  # rank order, padding trimmed
        assert got["mean"] == 1.5 and got["b"] == "from 0" and got["all"] == [0, 1] and got["world"] == 2
        assert got["shared"] == [[0, 0], [1, 1], [4, 0], [9, 1], [16, 0]]  # item i computed by rank i % 2, in order
        assert got["zero"] == 7  # rank 0's value on both
        assert got["raised"] == "ValueError: bad input on rank 0"  # rank 0's failure fails both ranks
    assert json.loads((tmp_path / "0.json").read_text())["raised_unpicklable"] == "Local: cannot travel"
    assert json.loads((tmp_path / "1.json").read_text())["raised_unpicklable"] == "RankZeroError: Local on rank 0: cannot travel"


def test_swiftpruner_importance_and_proxy_in_shares_equal_one_process(tmp_path):
    """Two ranks each take every other batch of the Taylor importance and of each candidate's proxy
    logits; both get the one-process values bit for bit."""
    import torch.multiprocessing as mp

    from ddp_worker import swiftpruner_worker

    (tmp_path / "one").mkdir()
    swiftpruner_worker(0, None, str(tmp_path / "one"))
    mp.spawn(swiftpruner_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    one = torch.load(tmp_path / "one" / "0.pt")
    assert len(set(one["scores"])) > 1, "the candidates must score differently for the comparison to mean something"
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(got["heads"], one["heads"]) and torch.equal(got["neurons"], one["neurons"])
        assert got["scores"] == one["scores"]

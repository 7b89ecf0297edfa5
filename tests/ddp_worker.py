"""A worker for tests/test_ddp.py's 2-process gloo test of modules.lit.distributed (kept light: spawned processes import it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from modules.lit.distributed import (  # noqa: E402
    broadcast,
    gather_objects,
    gather_rows,
    mean_,
    on_rank_zero,
    shared_map,
    world_size,
)


def join(rank: int, init_file: str) -> None:
    """Join the 2-rank gloo group of the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)


def raised_on_every_rank(fn) -> str:
    """``"<exception type>: <message>"`` of what :func:`on_rank_zero` raises here for ``fn``."""
    try:
        on_rank_zero(fn)
    except Exception as exc:  # noqa: BLE001 - the test compares what each rank got
        return f"{type(exc).__name__}: {exc}"
    return "nothing raised"


def collectives_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Join a 2-rank gloo group, run every collective helper, write what this rank got to ``<out_dir>/<rank>.json``."""
    import torch.distributed as dist

    join(rank, init_file)
    try:
        rows = gather_rows(torch.full((rank + 1, 2), float(rank)))  # uneven: 1 row on rank 0, 2 on rank 1
        t = torch.tensor([1.0 + rank])
        mean_([t])
        got = {"rows": rows.tolist(), "mean": t.item(), "b": broadcast(f"from {rank}"), "all": gather_objects(rank),
               "world": world_size(), "shared": shared_map(lambda x: [x * x, rank], list(range(5))),
               "zero": on_rank_zero(lambda: 10 * rank + 7)}

        def refuse():
            raise ValueError(f"bad input on rank {rank}")

        class Local(Exception):  # a local class: the exception cannot be pickled
            pass

        def refuse_unpicklable():
            raise Local("cannot travel")

        got["raised"] = raised_on_every_rank(refuse)
        got["raised_unpicklable"] = raised_on_every_rank(refuse_unpicklable)
        Path(out_dir, f"{rank}.json").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


#: a 3-layer, hidden-32 BERT (tests/conftest.py's TINY_BERT_CONFIG, without dropout)
TINY_BERT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
#: the candidates :func:`swiftpruner_worker` scores (genes of SearchSpace(3, (0, 2, 4), (0, 32, 64)))
GENES = [(2, 2, 2, 2, 2, 2), (1, 0, 2, 1, 2, 0), (0, 1, 1, 2, 0, 1)]


def swiftpruner_worker(rank: int, init_file: str | None, out_dir: str) -> None:
    """SwiftPruner's importance and proxy scores of a seeded tiny BERT on 5 seeded batches, in a 2-rank gloo
    group (``init_file``) or in one process (None); written to ``<out_dir>/<rank>.pt``."""
    from transformers import BertConfig

    from modules.nn.bert import PrunableBertForSequenceClassification
    from pruners.swiftpruner.evolution import SearchSpace
    from pruners.swiftpruner.importance import Importance
    from pruners.swiftpruner.proxy import Proxy

    if init_file is not None:
        join(rank, init_file)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the same reduction order in the spawned ranks and in the test process
        torch.manual_seed(0)
        model = PrunableBertForSequenceClassification(BertConfig(**TINY_BERT)).eval()
        g = torch.Generator().manual_seed(1)
        batches = [{"input_ids": torch.randint(1000, 2000, (b, 8), generator=g), "attention_mask": torch.ones(b, 8, dtype=torch.long),
                    "token_type_ids": torch.zeros(b, 8, dtype=torch.long), "labels": torch.tensor([i % 2 for i in range(b)])}
                   for b in (3, 2, 4, 1, 3)]
        importance = Importance().estimate(model, batches)
        score = Proxy(metric="auroc").scorer(model, importance, SearchSpace(3, (0, 2, 4), (0, 32, 64)), batches)
        torch.save({"heads": importance.heads, "neurons": importance.neurons, "scores": [score(genes) for genes in GENES]},
                   Path(out_dir, f"{rank}.pt"))
    finally:
        torch.set_num_threads(threads)  # the test process's setting, when it runs this in-process
        if init_file is not None:
            import torch.distributed as dist

            dist.destroy_process_group()

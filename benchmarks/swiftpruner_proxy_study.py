"""Which cheap proxy of a SwiftPruner pick predicts its test accuracy after fine-tuning?

    python benchmarks/swiftpruner_proxy_study.py benchmarks/results/swiftpruner_search_margin_rerank \
        benchmarks/results/swiftpruner_search_dense_ref
    # writes benchmarks/results/swiftpruner_proxy_study.json

The search ranks candidates by a proxy measured before fine-tuning; the benchmark compares
them after it. This study takes every searched and uniform pick of the given
``benchmarks/swiftpruner_search.py`` outputs (the exact masks, read from the runs'
fine-tuned checkpoints), applies them to the dense teacher, and scores each on the whole
validation split with several proxies: accuracy, ROC AUC, minus cross-entropy and minus
the distillation KL to the teacher at temperature 1 and 2, each without recovery
(``proxy``), after least-squares mask tuning on the search's calibration set
(``proxy_mask_tuned``: ``pruner.mask_tuning=lsq``, :func:`pruners.mask_tuning.tune_unit_scales`)
and after ``--recovery-steps`` steps of the fine-tuning's loss (``proxy_recovered``: task +
distillation at T = 2, :meth:`pruners.swiftpruner.SwiftPruner.recover`, the search's own
recovery; 0 skips it) on one fixed set of training batches. Each pick's target is its test
accuracy after fine-tuning, the mean over its fine-tunings when
``<bench dir>_finetune_seeds.json`` (``benchmarks/swiftpruner_finetune_seeds.py``) exists.
Figures per proxy: the Spearman rank correlation with the target over all picks, and in
how many runs the proxy orders the run's searched and uniform picks as their test
accuracies do.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchmetrics.functional import spearman_corrcoef  # noqa: E402

from modules.bert_classifier import BertClassifier  # noqa: E402
from modules.structured import shrink_structured  # noqa: E402
from pipelines.common import build, register_resolvers  # noqa: E402
from pruners.distillation import kd_loss  # noqa: E402
from pruners.mask_tuning import dense_targets, tune_unit_scales  # noqa: E402
from pruners.swiftpruner import collated, proxy_score  # noqa: E402
from swiftpruner_finetune_seeds import PICKS, pick_masks  # noqa: E402
from swiftpruner_search import benchmark_runs, compose_config  # noqa: E402


def proxies(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, float]:
    """Proxy scores of one model, higher is better.

    Args:
        logits: (N, C) the model's logits; labels: (N,) class indices; teacher_logits: (N, C).

    Returns:
        ``accuracy`` and ``auroc`` (fractions, :func:`pruners.swiftpruner.proxy_score`),
        ``neg_ce`` (minus mean cross-entropy, nats), ``neg_kl_t1`` and ``neg_kl_t2`` (minus
        the distillation loss to the teacher at temperature 1 and 2, :func:`kd_loss`).
    """
    return {
        "accuracy": proxy_score(logits, labels, "accuracy"),
        "auroc": proxy_score(logits, labels, "auroc"),
        "neg_ce": -float(F.cross_entropy(logits, labels)),
        "neg_kl_t1": -float(kd_loss(logits, teacher_logits, 1.0)),
        "neg_kl_t2": -float(kd_loss(logits, teacher_logits, 2.0)),
    }


def agreement(picks: list[dict], score: str) -> dict:
    """How well ``pick[score]`` ranks the picks by their ``test`` accuracy.

    Args:
        picks: dicts with ``run`` (picks of one run share it), ``test`` (fraction) and the
            ``score`` key (a number).

    Returns:
        ``spearman``: rank correlation of score and test accuracy over all picks;
        ``pairs_agree`` / ``pairs``: runs whose two picks the score orders as their test
        accuracies do, out of the runs whose test accuracies differ.

    Raises:
        ValueError: fewer than 3 picks.
    """
    if len(picks) < 3:
        raise ValueError(f"agreement needs at least 3 picks, got {len(picks)}.")
    rho = float(spearman_corrcoef(torch.tensor([p[score] for p in picks], dtype=torch.float64),
                                  torch.tensor([p["test"] for p in picks], dtype=torch.float64)))
    runs: dict[str, list[dict]] = {}
    for p in picks:
        runs.setdefault(p["run"], []).append(p)
    pairs = [(a, b) for a, b in (r for r in runs.values() if len(r) == 2) if a["test"] != b["test"]]
    agree = sum((a[score] - b[score]) * (a["test"] - b["test"]) > 0 for a, b in pairs)
    return {"spearman": rho, "pairs_agree": agree, "pairs": len(pairs)}


def load_picks(bench_dirs: list[Path]) -> tuple[list[dict], set[str]]:
    """Every run's searched and uniform pick (run folder, pick, checkpoint, test accuracy and its
    fine-tunings), and the set of the runs' dense teacher checkpoints."""
    picks, teachers = [], set()
    for bench in bench_dirs:
        seeds_file = bench.parent / f"{bench.name}_finetune_seeds.json"
        averaged = {}
        if seeds_file.is_file():
            averaged = {e["seed"]: e for e in json.loads(seeds_file.read_text())["test_accuracy"]}
        for run_dir in benchmark_runs(bench):
            results = json.loads((run_dir / "results.json").read_text())
            seed = int(run_dir.name[4:])
            teachers.add(results["dense"]["checkpoint"])
            for pick, phase in PICKS.items():
                accs = averaged[seed][pick] if seed in averaged else [results[phase]["metrics"]["accuracy"]]
                picks.append({"run": str(run_dir), "pick": pick, "checkpoint": results[phase]["checkpoint"],
                              "test": sum(accs) / len(accs), "finetunings": len(accs)})
    return picks, teachers


def main() -> None:
    """Score every pick with every proxy and write the agreement figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench_dirs", nargs="+", help="benchmarks/swiftpruner_search.py output folders")
    parser.add_argument("--recovery-steps", type=int, default=100, help="0: no proxy_recovered figures")
    parser.add_argument("--seed", type=int, default=0, help="seed of the recovery batches")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "swiftpruner_proxy_study.json"))
    args = parser.parse_args()
    register_resolvers()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    picks, teachers = load_picks([Path(b) for b in args.bench_dirs])
    if len(picks) < 3:
        parser.error("found fewer than 3 picks: give benchmarks/swiftpruner_search.py output folders (seed<N>/results.json)")
    if len(teachers) != 1:
        parser.error(f"the runs have different dense teachers {sorted(teachers)}; give runs of one teacher")
    teacher_ckpt = teachers.pop()
    cfg = compose_config(["pruner=swiftpruner", f"pruner.teacher_ckpt={teacher_ckpt}", "pruner.mask_tuning=lsq"])
    swift = build(cfg.pruner)  # its recovery steps and mask tuning: the search's
    dm = build(cfg.data)
    dm.setup("fit")
    val = dm.datasets["validation"]
    order = sorted(range(len(val)), key=lambda i: len(val[i]["input_ids"]))  # length-sorted: little padding
    val_batches = collated(dm, val, order, 64)
    labels = torch.cat([b["labels"] for b in val_batches])
    train = dm.datasets["train"]
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.recovery_steps * dm.batch_size].tolist()
    recovery = collated(dm, train, chosen, dm.batch_size)
    dense = BertClassifier.load_from_checkpoint(teacher_ckpt, map_location="cpu").model.eval()
    calibration = swift._calibration(dm)
    targets = dense_targets(dense, calibration)

    def forward(model, batch):
        return model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")).logits

    def scored(model) -> dict[str, float]:
        with torch.inference_mode():
            return proxies(torch.cat([forward(model, b) for b in val_batches]), labels, teacher_val)

    with torch.inference_mode():
        teacher_val = torch.cat([forward(dense, b) for b in val_batches])
        teacher_rec = [forward(dense, b) for b in recovery]
    started = time.time()
    for p in picks:
        heads, neurons = pick_masks(p["checkpoint"])
        work = copy.deepcopy(dense)
        work.set_structured_masks(heads, neurons)
        small = shrink_structured(work).eval()
        p["proxy"] = scored(small)
        tuned = copy.deepcopy(small)
        tune_unit_scales(tuned, targets, calibration, swift.mask_tuning_damping)
        p["proxy_mask_tuned"] = scored(tuned)
        if args.recovery_steps:
            swift.recover(small, recovery, teacher_rec)
            p["proxy_recovered"] = scored(small)
        print(Path(p["run"]).name, p["pick"], round(p["test"], 4), {k: round(v, 4) for k, v in p["proxy"].items()}, flush=True)
    figures = {}
    for kind in ("proxy", "proxy_mask_tuned", "proxy_recovered")[: 3 if args.recovery_steps else 2]:
        for name in picks[0][kind]:
            figures[f"{kind}.{name}"] = agreement([{**p, "score": p[kind][name]} for p in picks], "score")
    report = {
        "what": "rank agreement of proxies (masks on the dense teacher, whole validation split) with test accuracy after fine-tuning",
        "bench_dirs": args.bench_dirs, "teacher": teacher_ckpt, "recovery_steps": args.recovery_steps,
        "mask_tuning_examples": sum(len(b["input_ids"]) for b in calibration), "mask_tuning_damping": swift.mask_tuning_damping,
        "validation_examples": len(val), "picks": len(picks),
        "spearman_standard_error_if_uncorrelated": 1 / math.sqrt(len(picks) - 1),
        "figures": figures, "per_pick": picks, "wall_clock_s": math.floor(time.time() - started),
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(figures, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""How stable is SwiftPruner's unit selection? Taylor importance from disjoint example sets.

SwiftPruner keeps, in every layer, the heads and FFN neurons with the largest first-order
Taylor importance (:func:`modules.nn.structured.taylor_importance`) of the dense teacher. This
script estimates that importance several times, each on its own disjoint seeded set of
examples, for several (split, number of examples) settings, and reports for the uniform
configurations near the benchmark's budget (50% of dense batch-1 latency) how many of the kept
units two estimates share: ``|kept_a & kept_b| / |kept_a|`` for heads and for neurons, over all
layers, averaged over the pairs of sets.

    python benchmarks/swiftpruner_importance_stability.py --teacher-ckpt T

writes ``benchmarks/results/swiftpruner_importance_stability.json`` (``--out``): the command that
regenerates it, and per setting the number of sets (``--sets``, fewer where the split is too
small), the per-pair overlaps, their mean, and the seconds one estimate took on this machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402

from hydra.utils import instantiate  # noqa: E402

from modules.nn.structured import taylor_importance, top_unit_masks  # noqa: E402
from pruners.distillation import load_teacher_model  # noqa: E402
from pruners.swiftpruner.proxy import by_length, collated  # noqa: E402
from swiftpruner_search import command_line, compose_config, relative  # noqa: E402

#: (split, examples per set): the search's old default (256 validation sentences) and larger sets
SETTINGS = (("validation", 256), ("validation", 512), ("train", 1024), ("train", 2048), ("train", 4096))
#: uniform (heads, FFN neurons) picks of the 50%-latency benchmarks
CONFIGS = ((8, 384), (6, 576), (10, 192), (4, 768))


def kept_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of the units kept by mask ``a`` that mask ``b`` keeps too.

    Args:
        a, b: 0/1 masks of the same shape, e.g. (L, A) heads or (L, I) neurons, keeping the
            same number of units.

    Returns:
        ``|a & b| / |a|`` in [0, 1]; 1.0 when ``a`` keeps nothing.
    """
    kept = int(a.bool().sum())
    return 1.0 if kept == 0 else float((a.bool() & b.bool()).sum()) / kept


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-ckpt", required=True, help="dense BertClassifier checkpoint (the benchmark's teacher)")
    parser.add_argument("--sets", type=int, default=3, help="disjoint example sets per setting (pairs: sets choose 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/swiftpruner_importance_stability.json"))
    args = parser.parse_args(argv)
    if args.sets < 2:
        parser.error(f"--sets={args.sets}: need at least 2 sets to compare.")
    torch.set_num_threads(args.threads)
    cfg = compose_config(["model=bert", "pruner=swiftpruner", f"pruner.teacher_ckpt={args.teacher_ckpt}"])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    model = load_teacher_model(args.teacher_ckpt)
    layers = len(model.layer_structure())

    report = {"command": command_line("benchmarks/swiftpruner_importance_stability.py", argv),
              "teacher_ckpt": relative(args.teacher_ckpt), "sets": args.sets, "configs": [list(c) for c in CONFIGS], "settings": []}
    for split, n in SETTINGS:
        ds = dm.datasets[split]
        sets = min(args.sets, len(ds) // n)  # as many disjoint sets as the split holds, up to --sets
        if sets < 2:
            print(f"skip {split} x {n}: two disjoint sets need {2 * n} examples, the split has {len(ds)}")
            continue
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
        estimates, seconds = [], []
        for k in range(sets):
            idx = by_length(ds, order[k * n : (k + 1) * n])
            start = time.perf_counter()
            estimates.append(taylor_importance(model, collated(dm, ds, idx, 64)))
            seconds.append(time.perf_counter() - start)
        per_config = {}
        for heads, neurons in CONFIGS:
            masks = [top_unit_masks(e, [heads] * layers, [neurons] * layers) for e in estimates]
            pairs = list(itertools.combinations(range(sets), 2))
            h = [kept_overlap(masks[i][0], masks[j][0]) for i, j in pairs]
            u = [kept_overlap(masks[i][1], masks[j][1]) for i, j in pairs]
            per_config[f"{heads}x{neurons}"] = {
                "heads_overlap": h, "neurons_overlap": u,
                "heads_overlap_mean": sum(h) / len(h), "neurons_overlap_mean": sum(u) / len(u),
            }
        row = {"split": split, "examples": n, "sets": sets, "seconds_per_estimate": seconds, "overlap": per_config}
        report["settings"].append(row)
        print(split, n, "%.1f s" % (sum(seconds) / len(seconds)),
              {c: (round(v["heads_overlap_mean"], 3), round(v["neurons_overlap_mean"], 3)) for c, v in per_config.items()},
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print("wrote", args.out)
    return report


if __name__ == "__main__":
    main()

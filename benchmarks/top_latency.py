"""Benchmark: dense versus ToP-pruned BERT inference latency, from a finished `pruner=top` run.

    python benchmarks/top_latency.py RUN_DIR [--batch-sizes 1 8 32 64] [--repeats 30] [--threads 2]
        [--onnxruntime-only] [--int8]

Reads RUN_DIR/results.json for the dense and pruned checkpoints, rebuilds the run's
test split, exports both served models to ONNX (RUN_DIR/served/, as export.py does), times
them in PyTorch eager and in ONNX Runtime interleaved in this process (pruned tokens
physically removed in both; ``--onnxruntime-only``: the two ONNX Runtime models alone, as a
server runs them; ``--int8``: also the run's int8 copies, ``served/dense-int8/`` and
``served/pruned-int8/`` as the run's ``export.quantize`` wrote them, in the same rounds) and
writes RUN_DIR/benchmark_top_latency.json, printing a table. Every
speedup is given twice: the ratio of the median latencies, and the mean and standard error
of the per-round ratio over the ``--repeats`` interleaved rounds
(:func:`modules.served.latency.ratio_over_rounds`), which says whether it differs from a target by
more than the timing noise. It is a benchmark, not a test: it asserts nothing and only
reports what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import pipelines.configs  # noqa: E402,F401  (registers the resolvers the run's config uses)
from modules.lit.bert_classifier import BertClassifier  # noqa: E402
from pipelines.common import build  # noqa: E402
from pipelines.reexport import load_run  # noqa: E402
from modules.served.latency import ratio_over_rounds  # noqa: E402
from pipelines.flow import build_task, export_served, median_ms, time_models_rounds  # noqa: E402
from pipelines.quantize import INT8_SUFFIX  # noqa: E402
from serving.runtime import MODEL_FILE, make_session  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns what it wrote.

    Raises:
        FileNotFoundError: RUN_DIR has no results.json or no Hydra config (.hydra/config.yaml).
        ValueError: the run has no pruned model (it was not a pruning run).
    """
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--onnxruntime-only", action="store_true", help="time the ONNX Runtime models alone (no PyTorch eager in the rounds)")
    ap.add_argument("--int8", action="store_true", help="also time the run's int8 copies (served/<name>-int8/) in the same rounds")
    args = ap.parse_args(argv)
    results_path = args.run_dir / "results.json"
    config_path = args.run_dir / ".hydra" / "config.yaml"
    for p in (results_path, config_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: RUN_DIR must be the output folder of a finished run.py run.")
    results = json.loads(results_path.read_text())
    if "pruned" not in results:
        raise ValueError(f"{results_path} has no pruned model; benchmark a run with a pruner (e.g. pruner=top).")
    cfg, _ = load_run(args.run_dir.resolve())
    cfg.threads = args.threads
    for key, value in (("threads", args.threads), ("batch_sizes", args.batch_sizes), ("warmup", args.warmup),
                       ("repeats", args.repeats), ("examples", args.examples)):
        OmegaConf.update(cfg, f"latency.{key}", value, force_add=True)
    task = build_task(cfg)
    datamodule = build(cfg.data)
    datamodule.setup("test")
    models = {  # checkpoints are recorded relative to the run dir
        name: BertClassifier.load_from_checkpoint(args.run_dir / results[name]["checkpoint"], map_location="cpu").served_model()
        for name in ("dense", "pruned")
    }
    served, sessions, exportables = export_served(cfg, task, args.run_dir.resolve(), models, datamodule, results)
    if args.int8:
        for name in ("dense", "pruned"):
            path = args.run_dir / "served" / f"{name}{INT8_SUFFIX}" / MODEL_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: --int8 needs a run made with export.quantize=dynamic or static.")
            sessions[f"{name}{INT8_SUFFIX}"] = make_session(path, args.threads)  # timed on its source's inputs
    torch.manual_seed(0)
    rounds, proto = time_models_rounds(cfg, task, {} if args.onnxruntime_only else models, datamodule, sessions, exportables)
    latency = median_ms(rounds)
    pairs = {"speedup_onnxruntime": ("dense@onnxruntime", "pruned@onnxruntime")}
    if not args.onnxruntime_only:
        pairs = {"speedup": ("dense", "pruned"), **pairs, "speedup_vs_dense_torch": ("dense", "pruned@onnxruntime")}
    if args.int8:  # int8 against dense fp32 (the reference of every speedup), and pruned int8 against dense int8
        pairs = {
            **pairs,
            "dense_int8_vs_dense_onnxruntime": ("dense@onnxruntime", f"dense{INT8_SUFFIX}@onnxruntime"),
            "pruned_int8_vs_dense_onnxruntime": ("dense@onnxruntime", f"pruned{INT8_SUFFIX}@onnxruntime"),
            "pruned_int8_vs_dense_int8": (f"dense{INT8_SUFFIX}@onnxruntime", f"pruned{INT8_SUFFIX}@onnxruntime"),
        }
    out = {
        "command": "python benchmarks/top_latency.py RUN_DIR " + " ".join((argv if argv is not None else sys.argv[1:])[1:]),
        "latency_ms": latency,
        **{key: {bs: latency[a][bs] / latency[b][bs] for bs in latency[a]} for key, (a, b) in pairs.items()},
        "speedup_rounds": {
            key: {bs: ratio_over_rounds(rounds[a][bs], rounds[b][bs]) for bs in rounds[a]} for key, (a, b) in pairs.items()
        },
        "max_abs_diff": {name: e["max_abs_diff"] for name, e in served.items()},
        "macs_reduction": results.get("macs_reduction"),
        "accuracy": {name: results[name]["metrics"]["accuracy"] for name in ("dense", "pruned", *((f"dense{INT8_SUFFIX}", f"pruned{INT8_SUFFIX}") if args.int8 else ()))},
        "protocol": {**proto, "rounds": "onnxruntime models alone" if args.onnxruntime_only else "PyTorch eager and onnxruntime models"},
    }
    (args.run_dir / "benchmark_top_latency.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'batch':>6} " + " ".join(f"{name:>18}" for name in latency) + "   " + "   ".join(f"{key} (median; mean +- SE)" for key in pairs))
    for bs in latency["dense@onnxruntime"]:
        figures = "   ".join(
            f"{out[key][bs]:.2f}x; {out['speedup_rounds'][key][bs]['mean']:.3f} +- {out['speedup_rounds'][key][bs]['se']:.3f}"
            for key in pairs
        )
        print(f"{bs:>6} " + " ".join(f"{latency[name][bs]:>15.2f} ms" for name in latency) + "   " + figures)
    print(f"written: {args.run_dir / 'benchmark_top_latency.json'}")
    return out


if __name__ == "__main__":
    main()

"""Benchmark: does SwiftPruner's latency budget, met in PyTorch eager, also hold in ONNX Runtime?

    python benchmarks/swiftpruner_onnx.py --teacher-ckpt T [--search benchmarks/results/swiftpruner_search_train_importance.json]

The search summary lists, per seed, the configuration SwiftPruner chose at its default
budget (50% of the dense model's batch-1 x 64-token latency, PyTorch eager) and the
uniform baseline's. Latency depends on the layer sizes, not on which units are kept, so
each configuration is rebuilt from the dense checkpoint T (the most important units are
not needed: the first ones are kept), physically shrunk, exported to ONNX as a run
exports it, and timed against the dense model in both runtimes, interleaved in this
process, at the budget's shape (batch 1 x 64 unpadded tokens) and at batch 32 x 64.
Writes ``benchmarks/results/swiftpruner_onnx.json``: per configuration its fraction of
dense latency in each runtime, and the mean, standard error and count within budget over
the seeds. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from modules.lit.bert_classifier import BertClassifier  # noqa: E402
from modules.served.latency import measure_latency_ms, protocol  # noqa: E402
from modules.served.onnx_export import export_onnx  # noqa: E402
from modules.served.served_bert import ExportableBert  # noqa: E402
from modules.nn.structured import shrink_structured  # noqa: E402
from pruners.swiftpruner.latency_table import synthetic_inputs  # noqa: E402
from serving.runtime import make_session  # noqa: E402


def configured(dense: BertClassifier, heads: list[int], neurons: list[int]):
    """The dense network with the first ``heads[l]`` heads and ``neurons[l]`` FFN neurons of each layer kept, shrunk."""
    layers = dense.model.bert.encoder.layer
    a, i = layers[0].attention.self.num_heads, layers[0].intermediate.dense.out_features
    head_masks = torch.stack([(torch.arange(a) < h).float() for h in heads])
    neuron_masks = torch.stack([(torch.arange(i) < n).float() for n in neurons])
    dense.model.set_structured_masks(head_masks, neuron_masks)
    shrunk = shrink_structured(dense.model).eval()
    dense.model.clear_structured_masks()
    return shrunk


def mean_se(xs: list[float]) -> dict[str, float]:
    """Mean, standard error and count."""
    return {"mean": statistics.fmean(xs), "se": statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0, "n": len(xs)}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns what it wrote."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-ckpt", type=Path, required=True, help="the dense checkpoint (any run's checkpoints/dense/*.ckpt)")
    ap.add_argument("--search", type=Path, default=ROOT / "benchmarks" / "results" / "swiftpruner_search_train_importance.json")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "swiftpruner_onnx.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    search = json.loads(args.search.read_text())
    budget = float(search["budget_fraction_of_dense_batch1"])
    dense = BertClassifier.load_from_checkpoint(args.teacher_ckpt, map_location="cpu").eval()
    nets = {"dense": dense.model.eval()}
    for run in search["per_seed"]:
        nets[f"seed{run['seed']}/searched"] = configured(dense, run["chosen"]["heads"], run["chosen"]["ffn_neurons"])
        layers = len(run["chosen"]["heads"])
        u = run["uniform"]
        nets[f"seed{run['seed']}/uniform"] = configured(dense, [u["heads"]] * layers, [u["ffn_neurons"]] * layers)
    exportables = {k: ExportableBert(n) for k, n in nets.items()}
    fractions: dict[str, dict[str, dict[str, float]]] = {}
    raw: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        example = synthetic_inputs(2, args.seq_len, dense.model.config.vocab_size)
        sessions = {
            k: make_session(export_onnx(e, e.feeds(example), Path(tmp) / f"{k.replace('/', '_')}.onnx", e.dynamic_axes(), ["logits"]), args.threads)
            for k, e in exportables.items()
        }
        for bs in args.batch_sizes:
            x = synthetic_inputs(bs, args.seq_len, dense.model.config.vocab_size)
            feeds = {k: v.numpy() for k, v in x.items()}
            calls = {}
            for k, e in exportables.items():
                calls[f"{k}@torch"] = lambda e=e, x=x: e(**x)
                calls[f"{k}@onnxruntime"] = lambda s=sessions[k], feeds=feeds: s.run(None, feeds)
            ms = measure_latency_ms(calls, args.warmup, args.repeats, args.threads)
            raw[str(bs)] = ms
            for k in exportables:
                if k == "dense":
                    continue
                fractions.setdefault(k, {})[str(bs)] = {
                    rt: ms[f"{k}@{rt}"] / ms[f"dense@{rt}"] for rt in ("torch", "onnxruntime")
                }
    summary = {}
    for kind in ("searched", "uniform"):
        for bs in map(str, args.batch_sizes):
            for rt in ("torch", "onnxruntime"):
                xs = [v[bs][rt] for k, v in fractions.items() if k.endswith(kind)]
                summary[f"{kind}/bs{bs}/{rt}"] = {**mean_se(xs), "within_budget": sum(x <= budget for x in xs)}
    out = {
        "command": "python benchmarks/swiftpruner_onnx.py --teacher-ckpt T " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--teacher-ckpt") and a != str(args.teacher_ckpt)
        ),
        "search_summary": str(args.search.relative_to(ROOT)) if args.search.is_relative_to(ROOT) else args.search.name,
        "budget_fraction_of_dense_batch1": budget,
        "dense_ms": {bs: {rt: raw[bs][f"dense@{rt}"] for rt in ("torch", "onnxruntime")} for bs in raw},
        "fraction_of_dense": fractions,
        "summary": summary,
        "protocol": {
            **protocol(args.threads, args.warmup, args.repeats, f"whole forward on batch x {args.seq_len} unpadded random tokens "
                       "(the budget's shape at batch 1); every model in PyTorch eager and in ONNX Runtime, interleaved"),
            "onnxruntime": "serving.runtime.make_session: CPU, ORT_ENABLE_ALL, sequential, intra-op threads = threads, no spinning",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"fraction of dense latency (budget {budget}), mean ± SE over seeds [within budget / n]")
    for k, v in summary.items():
        print(f"  {k:32s} {v['mean']:.3f} ± {v['se']:.3f}  [{v['within_budget']}/{v['n']}]")
    print(f"written: {args.out}")
    return out


if __name__ == "__main__":
    main()

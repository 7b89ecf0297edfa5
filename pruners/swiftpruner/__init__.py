"""SwiftPruner (arXiv 2209.00625): latency-budgeted evolutionary search of per-layer kept heads and FFN neurons."""

from pruners.swiftpruner.pruner import MaskedDistillation, SwiftPruner

__all__ = ["MaskedDistillation", "SwiftPruner"]

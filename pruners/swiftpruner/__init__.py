"""SwiftPruner (arXiv 2209.00625): latency-budgeted evolutionary search of per-layer kept heads and FFN neurons.

``_target_: pruners.swiftpruner.SwiftPruner`` with its components as nested nodes:
``pruner.latency`` (:class:`LatencyMeter`), ``pruner.proxy`` (:class:`Proxy`),
``pruner.importance`` (:class:`Importance`) and ``pruner.search`` (:class:`Search`).
"""

from pruners.swiftpruner.evolution import EvolutionarySearch, SearchSpace, reward
from pruners.swiftpruner.finetune import MaskedDistillation
from pruners.swiftpruner.importance import Importance
from pruners.swiftpruner.latency import DenseReference, LatencyMeter
from pruners.swiftpruner.latency_table import LatencyTable, measure_model_ms
from pruners.swiftpruner.mutators import RandomMutator, ReinforcedMutator
from pruners.swiftpruner.proxy import Proxy, proxy_score
from pruners.swiftpruner.pruner import SwiftPruner
from pruners.swiftpruner.search import Search, run_search

__all__ = [
    "DenseReference",
    "EvolutionarySearch",
    "Importance",
    "LatencyMeter",
    "LatencyTable",
    "MaskedDistillation",
    "Proxy",
    "RandomMutator",
    "ReinforcedMutator",
    "Search",
    "SearchSpace",
    "SwiftPruner",
    "measure_model_ms",
    "proxy_score",
    "reward",
    "run_search",
]

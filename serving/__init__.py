"""Serving an exported model with ONNX Runtime: no torch, no Lightning, no transformers.

Everything here imports only onnxruntime, tokenizers, numpy, pandas (and modules.core.features,
which is numpy and pandas only), so ``predict.py`` runs where only requirements-serve.txt
is installed.
"""

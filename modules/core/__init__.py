"""Torch-free basics every layer may use, the served predictor included: errors, feature encodings,
atomic file writes, the plot setup, data-package lookup and the version. Nothing here imports torch."""

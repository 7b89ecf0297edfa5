"""Served models as plain tensor functions for ONNX export, the ONNX writer and the latency protocol."""

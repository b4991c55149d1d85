"""Checkpoint reading and export to ONNX / MLX."""

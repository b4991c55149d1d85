"""Runtimes behind the Backend protocol: onnx (ORT CPU/CUDA), mlx, torch_ref (tests and `check`)."""

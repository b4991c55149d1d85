"""dgport: a portable inference runtime for DiffusionGemma (block diffusion) on ONNX Runtime and MLX."""
__version__ = "0.1.0"

from .api import GenerationResult, Generator, load  # noqa: E402

__all__ = ["load", "Generator", "GenerationResult", "__version__"]

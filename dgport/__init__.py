"""dgport: a portable inference runtime for DiffusionGemma (block diffusion) on ONNX Runtime and MLX."""
__version__ = "0.1.0"

from . import ort_env  # noqa: E402,F401  (first: ONNX Runtime telemetry off before anything imports it)

from .api import GenerationResult, Generator, load  # noqa: E402
from .canvas_template import Hole, Template  # noqa: E402

__all__ = ["load", "Generator", "GenerationResult", "Template", "Hole", "__version__"]

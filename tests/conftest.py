"""Shared fixtures: preset checkpoints are built once per test session (random weights, fixed seeds)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # hf_reference helper

import dgport.ort_env  # noqa: E402,F401  (ONNX Runtime telemetry off before any test imports onnxruntime)

os.environ.setdefault("DGPORT_CACHE_DIR", str(Path(__file__).parent / ".." / ".pytest_cache" / "dgport"))

from models.fixtures import PRESETS, build_fixture  # noqa: E402

# The suite runs on two pytest-xdist workers (the README's command); tests that take several GB each
# share this group, so they run one after another on one worker and the suite's peak stays one of them
# plus an ordinary test.
BIG_MEMORY = pytest.mark.xdist_group("big-memory")


def mem_available_gb() -> float:
    """The machine's available memory (0 where /proc/meminfo cannot be read): the big tests skip below
    their peak."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> folder of every fixture preset, built on first use."""
    root = tmp_path_factory.mktemp("checkpoints")
    built = {}

    class Lazy(dict):
        def __missing__(self, name):
            built[name] = build_fixture(name, root / name)
            return built[name]

    return Lazy()


@pytest.fixture(scope="session")
def hf_models(checkpoints):
    """name -> DiffusionGemmaForBlockDiffusion loaded from the fixture folder (float32)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    class Lazy(dict):
        def __missing__(self, name):
            self[name] = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoints[name],
                                                                         use_safetensors=True).eval()
            return self[name]

    return Lazy()


@pytest.fixture(scope="session")
def torch_gens(checkpoints, hf_models):
    """name -> dgport Generator on the torch reference backend (the HF model loaded once)."""
    import dgport

    class Lazy(dict):
        def __missing__(self, name):
            self[name] = dgport.load(checkpoints[name], backend="torch", model=hf_models[name])
            return self[name]

    return Lazy()


ALL_PRESETS = list(PRESETS)

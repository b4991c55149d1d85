"""ONNX Runtime with its telemetry off: every dgport module that uses onnxruntime imports it from here.

onnxruntime's official Linux and macOS builds (1.29 and later) start a 1DS telemetry uploader when the
runtime's environment is created: it writes a device id and an event database under
~/.cache/Microsoft/DeveloperTools/.onnxruntime and, a few seconds later, resolves and posts to
mobile.events.data.microsoft.com. `onnxruntime.disable_telemetry_events()` does not stop it (the
ProcessInfo event is logged regardless, and the uploader is already running). The one switch that does
is the environment variable ORT_DISABLE_TELEMETRY, read when the environment is created, so it must be
set before the first `import onnxruntime` in the process. `dgport/__init__.py` imports this module
first, so any dgport entry point (CLI, `dgport.load`, the exporter, bench scripts) sets it in time.
Values other than "0" and empty disable it; "1" is forced over whatever the caller set, because dgport
opens no network connection at run time.
"""
from __future__ import annotations

import os
import sys
import warnings

TELEMETRY_VAR = "ORT_DISABLE_TELEMETRY"

# onnxruntime imported before dgport (by the embedding application) with telemetry still on: too late
# to stop the uploader from here
_IMPORTED_TOO_EARLY = sys.modules.get("onnxruntime") is not None and os.environ.get(TELEMETRY_VAR, "") in ("", "0")
os.environ[TELEMETRY_VAR] = "1"


def onnxruntime():
    """The onnxruntime module (ImportError when it is not installed), telemetry off."""
    import onnxruntime as ort

    ort.disable_telemetry_events()  # the in-process event switch too, for runtimes built without the variable
    if _IMPORTED_TOO_EARLY:
        warnings.warn(f"onnxruntime was imported before dgport with its telemetry on; set {TELEMETRY_VAR}=1 in "
                      "the environment (or import dgport first) to keep this process off the network",
                      RuntimeWarning, stacklevel=2)
    return ort

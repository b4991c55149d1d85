"""User-facing errors: one line that names the file or argument and says what to do."""


class DgportError(Exception):
    """An error caused by the user's input. The CLI prints it as one line and exits non-zero."""


class CheckpointError(DgportError):
    """The Hugging Face checkpoint folder is missing, incomplete or not a DiffusionGemma checkpoint."""


class ExportError(DgportError):
    """An export folder is missing, partial, tampered with, or lacks the format a backend needs."""


class BackendUnavailable(DgportError):
    """The runtime package or device a backend needs is not available."""

"""Domain errors. The CLI turns any `MammoDPError` into one line and exit code 1.

Every error names what the user has to fix: a file (`path`) or a setting (`field`).
"""

from __future__ import annotations

from pathlib import Path


class MammoDPError(Exception):
    """Base class for user-facing errors (bad input, bad config, missing file)."""

    def __init__(self, message: str, *, path: str | Path | None = None, field: str | None = None):
        self.path = str(path) if path is not None else None
        self.field = field
        prefix = ""
        if self.path is not None:
            prefix = f"{self.path}: "
        elif field is not None:
            prefix = f"{field}: "
        super().__init__(prefix + message)


class ConfigError(MammoDPError):
    """A params.yaml key is unknown, missing or has a bad value."""


class DataError(MammoDPError):
    """Input data is missing, corrupt, mislabelled or inconsistent."""


class DicomError(DataError):
    """A DICOM file cannot be read or decoded."""


class ValidationFailed(MammoDPError):
    """The data validation suite found failed expectations."""


class PrivacyError(MammoDPError):
    """A privacy budget cannot be met or a run lacks its privacy record."""


class WeightsError(MammoDPError):
    """Pretrained weights named in params are missing or do not fit the model."""


class ServingError(MammoDPError):
    """A serving request is malformed."""


class DistributedError(MammoDPError):
    """A data-parallel job lost a rank, or its torchrun environment is unusable."""
class Interrupted(KeyboardInterrupt):
    """The process got SIGTERM (or SIGHUP): raised like Ctrl-C's KeyboardInterrupt, so every
    `with` block unwinds (temporary outputs removed, the MLflow run marked KILLED)."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

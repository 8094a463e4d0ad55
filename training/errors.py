"""Typed errors of the training engine, each carrying the job error code it ends a job with.

The codes are the ones in `training.protocol.ERROR_CODES`; the entry points write them to
`error.json` so that the service can show the user what went wrong and what to change.
"""

from __future__ import annotations

from training.protocol import ERROR_CODES


class TrainingError(Exception):
    """Base class: a job failed for a reason the user can act on."""

    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        assert self.code in ERROR_CODES, self.code


class SpecError(TrainingError):
    """A field of the job spec was refused (the message names every field and why)."""

    code = "invalid_spec"


class DataError(TrainingError):
    """The data could not be read or does not fit the task; the message names the file and line
    (or archive entry) that is wrong."""

    code = "invalid_data"


class ModelError(TrainingError):
    """The model loads but cannot be trained or evaluated for the requested task."""

    code = "unsupported_model"


class DiskFullError(TrainingError):
    """No space was left to write a checkpoint or an output file; earlier checkpoints are intact."""

    code = "disk_full"


class DivergedError(TrainingError):
    """The loss became NaN or infinite."""

    code = "diverged"


class OutOfMemoryError(TrainingError):
    """The device ran out of memory."""

    code = "out_of_memory"

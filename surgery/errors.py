"""The exceptions surgery raises; every one says what was wrong and how to fix it."""

from __future__ import annotations


class SurgeryError(Exception):
    """Base class of every error raised by `surgery`."""


class UnknownModelError(SurgeryError):
    """A model reference is malformed or names nothing that can be found here."""


class UnsupportedModelError(SurgeryError):
    """The model loads, but cannot be converted (or loaded for the requested task)."""


class RemoteCodeRefusedError(SurgeryError):
    """The model needs code from its repository and the caller has not allowed that."""


class ConversionError(SurgeryError):
    """A conversion was asked for something it cannot do (bad plan, settings or model state)."""


class UnmatchedPatternError(ConversionError):
    """An include pattern matches no site of the model (a typo, or a path that is not a site)."""


class ManifestError(SurgeryError):
    """A saved directory is incomplete or its manifest does not match the model it describes."""

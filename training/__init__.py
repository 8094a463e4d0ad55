"""The training engine: conversion, fine-tuning and evaluation jobs described by one JSON spec.

No web imports: the service runs this package's entry points (`gmnm-convert`, `gmnm-train`,
`gmnm-eval`) as job processes and reads what they write (see `training.protocol`).
"""

from training.errors import DataError, SpecError, TrainingError
from training.spec import ConvertSpec, EvaluateSpec, FineTuneSpec, load_spec, parse_spec

__all__ = [
    "ConvertSpec",
    "DataError",
    "EvaluateSpec",
    "FineTuneSpec",
    "SpecError",
    "TrainingError",
    "load_spec",
    "parse_spec",
]

"""Model surgery: find, replace, audit, save and load the nonlinearities of a model.

loaded = surgery.load_model("google/vit-base-patch16-224")
plan = surgery.plan(loaded.model, exclude=["*.se.*"])
report = surgery.convert(loaded.model, plan, config=gmnm.GMNMConfig(num_components=8))
surgery.save(loaded.model, "out/vit-gmnm")
model = surgery.load("out/vit-gmnm")
"""

from surgery.audit import Finding, audit
from surgery.convert import Report, convert, gmnm_parameter_names, is_converted
from surgery.errors import (
    ConversionError,
    ManifestError,
    RemoteCodeRefusedError,
    SurgeryError,
    UnknownModelError,
    UnmatchedPatternError,
    UnsupportedModelError,
)
from surgery.inputs import example_inputs
from surgery.loading import LoadedModel, SourceInfo, load_model, validate_reference
from surgery.persistence import load, save
from surgery.plan import Plan, Site, plan
from surgery.registry import DEFAULT_TARGETS, KINDS

__all__ = [
    "DEFAULT_TARGETS",
    "KINDS",
    "ConversionError",
    "Finding",
    "LoadedModel",
    "ManifestError",
    "Plan",
    "RemoteCodeRefusedError",
    "Report",
    "Site",
    "SourceInfo",
    "SurgeryError",
    "UnknownModelError",
    "UnmatchedPatternError",
    "UnsupportedModelError",
    "audit",
    "convert",
    "example_inputs",
    "gmnm_parameter_names",
    "is_converted",
    "load",
    "load_model",
    "plan",
    "save",
    "validate_reference",
]

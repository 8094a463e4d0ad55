"""From an API request to a job spec: every reference checked, every id turned into a path.

Problems are collected and reported together, each naming the request field, so a client fixes
them in one round trip.
"""

from __future__ import annotations

import importlib
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import CheckpointRecord, FileRecord
from service.errors import ApiError
from service.layout import CHECKPOINT_PREFIX
from service.schemas import (
    ConversionCreate,
    ConversionOptions,
    EvaluationCreate,
    FineTuningJobCreate,
    Hyperparameters,
)
from service.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class Problems:
    items: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, param: str, message: str, code: str = "invalid_value") -> None:
        self.items.append((param, message, code))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        param, _, code = self.items[0]
        message = " ".join(text for _, text, _ in self.items)
        raise ApiError(400, message, param=param, code=code)


class SpecBuilder:
    """Checks the references in a request against the caller's objects and builds the spec."""

    def __init__(self, settings: Settings, session: Session, owner: str, data_root: Path) -> None:
        self.settings = settings
        self.session = session
        self.owner = owner
        self.root = data_root
        self.problems = Problems()

    # references

    def model(self, reference: str, param: str = "model") -> str | None:
        """A checkpoint id becomes its directory; anything else must be a valid model reference."""
        if reference.startswith(f"{CHECKPOINT_PREFIX}-"):
            record = self.session.get(CheckpointRecord, reference)
            if record is None or record.owner != self.owner:
                self.problems.add(
                    param,
                    f"{param}: no checkpoint '{reference}' exists for this API key; list a job's "
                    "checkpoints with GET /v1/fine_tuning/jobs/{id}/checkpoints.",
                    "model_not_found",
                )
                return None
            return str(self.root / record.path)
        message = reference_problem(reference, self.settings.model_dirs)
        if message is None:
            message = _surgery_problem(reference)
        if message is not None:
            self.problems.add(param, f"{param}: {message}", "model_not_found")
            return None
        return reference

    def file(self, file_id: str | None, param: str) -> str | None:
        if file_id is None:
            return None
        record = self.session.get(FileRecord, file_id)
        if record is None or record.owner != self.owner:
            self.problems.add(
                param,
                f"{param}: no file '{file_id}' exists for this API key; upload one with "
                "POST /v1/files and use the id it returns.",
                "file_not_found",
            )
            return None
        return str(self.root / "files" / record.id)

    def steps(self, hyperparameters: Hyperparameters | None, param: str) -> None:
        if hyperparameters is None or hyperparameters.max_steps is None:
            return
        if hyperparameters.max_steps > self.settings.max_steps:
            self.problems.add(
                f"{param}.max_steps",
                f"{param}.max_steps: {hyperparameters.max_steps} is above this server's limit of "
                f"{self.settings.max_steps} (GMNM_MAX_STEPS); ask for fewer steps.",
            )


def reference_problem(reference: str, model_dirs: list[Path]) -> str | None:
    """Why a model reference is refused before anything is loaded, or None when it may be used."""
    if not reference.strip() or any(ord(char) < 32 for char in reference):
        return "a model reference must be a non-empty name without control characters."
    if "://" in reference or reference.startswith(("http:", "https:", "file:")):
        return (
            f"'{reference}' is a URL; give a Hugging Face id (org/name), a timm name, or a "
            "checkpoint id instead."
        )
    looks_like_path = reference.startswith(("/", ".", "~")) or "\\" in reference
    if ".." in Path(reference).parts or looks_like_path:
        resolved = Path(reference).expanduser().resolve()
        allowed = [directory.resolve() for directory in model_dirs]
        if not any(resolved.is_relative_to(directory) for directory in allowed):
            where = ", ".join(str(directory) for directory in allowed) or "none configured"
            return (
                f"the local path '{reference}' is outside the directories models may be loaded "
                f"from (GMNM_MODEL_DIRS: {where})."
            )
    return None


def _surgery_problem(reference: str) -> str | None:
    try:
        surgery = importlib.import_module("surgery")
        errors = importlib.import_module("surgery.errors")
    except ImportError:
        return None  # the surgery package checks the reference again when the job loads it
    validate = getattr(surgery, "validate_reference", None)
    unknown = getattr(errors, "UnknownModelError", None)
    if validate is None or unknown is None:
        return None
    try:
        validate(reference)
    except unknown as error:
        return str(error)
    return None


# specs


def _clean(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _conversion(options: ConversionOptions | None) -> dict[str, Any] | None:
    return None if options is None else options.model_dump(exclude_none=True)


def fine_tune_spec(builder: SpecBuilder, request: FineTuningJobCreate) -> dict[str, Any]:
    hyperparameters = request.hyperparameters
    if request.method is not None and request.method.supervised is not None:
        hyperparameters = request.method.supervised.hyperparameters or hyperparameters
    model = builder.model(request.model)
    training_file = builder.file(request.training_file, "training_file")
    validation_file = builder.file(request.validation_file, "validation_file")
    if (request.training_file is None) == (request.dataset is None):
        builder.problems.add(
            "training_file",
            "training_file: give exactly one of training_file (an uploaded file id) or dataset "
            "(a named data set).",
        )
    if request.integrations:
        builder.problems.add(
            "integrations", "integrations: this server has no integrations; leave it empty."
        )
    builder.steps(hyperparameters, "hyperparameters")
    builder.problems.raise_if_any()
    params = {} if hyperparameters is None else hyperparameters.model_dump(exclude_none=True)
    params = {key: value for key, value in params.items() if value != "auto"}
    return _clean(
        {
            "task": request.task,
            "model": model,
            "revision": request.revision,
            "pretrained": request.pretrained,
            "training_file": training_file,
            "validation_file": validation_file,
            "dataset": request.dataset,
            "hyperparameters": params,
            "conversion": _conversion(request.conversion),
            "seed": request.seed if request.seed is not None else secrets.randbelow(2**31),
            "device": request.device,
        }
    )


def conversion_spec(builder: SpecBuilder, request: ConversionCreate) -> dict[str, Any]:
    model = builder.model(request.model)
    builder.problems.raise_if_any()
    gmnm = None if request.gmnm is None else request.gmnm.model_dump(exclude_none=True)
    return _clean(
        {
            "model": model,
            "revision": request.revision,
            "pretrained": request.pretrained,
            "targets": request.targets,
            "include": request.include,
            "exclude": request.exclude,
            "gmnm": gmnm,
            "dry_run": request.dry_run,
        }
    )


def evaluation_spec(builder: SpecBuilder, request: EvaluationCreate) -> dict[str, Any]:
    model = builder.model(request.model)
    compare_to = None
    if request.compare_to is not None:
        compare_to = builder.model(request.compare_to, "compare_to")
    data_file = builder.file(request.file, "file")
    if (request.file is None) == (request.dataset is None):
        builder.problems.add(
            "dataset", "dataset: give exactly one of dataset (a named data set) or file."
        )
    builder.problems.raise_if_any()
    return _clean(
        {
            "task": request.task,
            "model": model,
            "compare_to": compare_to,
            "dataset": request.dataset,
            "data_file": data_file,
            "batch_size": request.batch_size,
            "max_samples": request.max_samples,
            "device": request.device,
        }
    )


def owned_checkpoints(session: Session, job_id: str) -> list[CheckpointRecord]:
    return list(
        session.scalars(
            select(CheckpointRecord)
            .where(CheckpointRecord.job_id == job_id)
            .order_by(CheckpointRecord.step)
        )
    )

"""From an API request to a job spec: every reference checked, every id turned into a path.

Problems are collected and reported together, each naming the request field, so a client fixes
them in one round trip.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from service.db import CheckpointRecord, FileRecord
from service.errors import ApiError
from service.layout import CHECKPOINT_PREFIX
from service.schemas import (
    ConversionCreate,
    ConversionOptions,
    DataOptions,
    EvaluationCreate,
    FineTuningJobCreate,
    Limits,
)
from service.settings import Settings
from surgery import UnknownModelError, validate_reference
from training.spec import ConvertSpec, EvaluateSpec, FineTuneSpec, describe_errors

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
        message = " ".join(text if text.endswith(".") else f"{text}." for _, text, _ in self.items)
        raise ApiError(400, message, param=param, code=code)


class SpecBuilder:
    """Checks the references in a request against the caller's objects and builds the spec."""

    def __init__(self, settings: Settings, session: Session, owner: str, data_root: Path) -> None:
        self.settings = settings
        self.session = session
        self.owner = owner
        self.root = data_root
        self.problems = Problems()
        # checkpoint directories by the ids the caller used, so that no server path shows
        self.model_names: dict[str, str] = {}

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
            directory = str(self.root / record.path)
            self.model_names[directory] = reference
            return directory
        message = reference_problem(reference, self.settings.model_dirs)
        if message is not None:
            self.problems.add(param, f"{param}: {message}", "model_not_found")
            return None
        remote = remote_code_problem(reference) if is_local_reference(reference) else None
        if remote is not None:
            self.problems.add(param, f"{param}: {remote}", "remote_code_refused")
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


def reference_problem(reference: str, model_dirs: list[Path]) -> str | None:
    """Why a model reference is refused before anything is loaded, or None when it may be used.

    Local paths are accepted only inside the operator's GMNM_MODEL_DIRS; everything else must
    be a well-formed Hugging Face id or timm name.
    """
    if any(ord(char) < 32 for char in reference):
        return "a model reference must not contain control characters."
    path_text = reference.removeprefix("local-dir:")
    if is_local_reference(reference):
        if ".." in Path(path_text).parts:
            return f"the local path '{reference}' contains '..'; give the directory itself."
        resolved = Path(path_text).expanduser().resolve()
        allowed = [directory.resolve() for directory in model_dirs]
        if not any(resolved.is_relative_to(directory) for directory in allowed):
            where = ", ".join(str(directory) for directory in allowed) or "none configured"
            return (
                f"the local path '{reference}' is outside the directories models may be loaded "
                f"from (GMNM_MODEL_DIRS: {where})."
            )
        if not resolved.is_dir():
            return f"the local path '{reference}' does not exist or is not a directory."
        return None
    try:
        validate_reference(reference, allow_local=False)
    except UnknownModelError as error:
        return str(error)
    return None


def is_local_reference(reference: str) -> bool:
    path_text = reference.removeprefix("local-dir:")
    return path_text.startswith(("/", "./", "~")) or path_text != reference


def remote_code_problem(reference: str) -> str | None:
    """Why a local model directory is refused for needing code of its own, or None.

    A config whose `auto_map` names classes transformers does not have can only be built by
    running the Python files beside it, which this service never does.
    """
    config_file = Path(reference.removeprefix("local-dir:")).expanduser() / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None  # the job reports a missing or unreadable config in its own words
    if not isinstance(config, dict) or not config.get("auto_map"):
        return None
    from transformers import CONFIG_MAPPING

    if config.get("model_type") in CONFIG_MAPPING:
        return None
    return (
        f"the model in '{reference}' needs remote code: its config.json maps its classes to "
        "Python files shipped with it (auto_map), and this server never runs a model's own "
        "code; use a model that transformers or timm can build by itself."
    )


# specs

# Base learning rate that OpenAI-style `learning_rate_multiplier` scales (the engine's default).
BASE_LEARNING_RATE = 5e-5
BUILTIN_SETS = ("digits", "mnist1d")

# Spec field paths shown under the request field a client sent.
_SPEC_TO_REQUEST = {
    "data.train": "training_file",
    "data.validation": "validation_file",
    "hyperparameters.epochs": "hyperparameters.n_epochs",
}


def _clean(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _request_param(path: str, kind: str) -> str:
    if kind == "evaluation" and path.startswith("data.validation"):
        return "file"
    for spec_path, request_path in _SPEC_TO_REQUEST.items():
        if path == spec_path or path.startswith(spec_path + "."):
            return request_path + path[len(spec_path) :]
    return path


def _validated(kind: str, spec_class: type[BaseModel], spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as the engine will read it; every problem is refused here, naming the field."""
    try:
        model = spec_class.model_validate(spec)
    except ValidationError as error:
        problems = Problems()
        for path, message in describe_errors(error):
            param = _request_param(path, kind)
            problems.add(param, f"{param}: {message}.")
        problems.raise_if_any()
        raise  # unreachable: raise_if_any raised
    return model.model_dump(mode="json", exclude_none=True)


def _source(builder: SpecBuilder, file_id: str | None, param: str) -> dict[str, Any] | None:
    path = builder.file(file_id, param)
    if path is None:
        return None
    record = builder.session.get(FileRecord, file_id)
    assert record is not None
    return _clean({"path": path, "format": record.format or "auto"})


def _named_source(dataset: str) -> dict[str, Any]:
    return {"builtin": dataset} if dataset in BUILTIN_SETS else {"hf_dataset": dataset}


def _data_options(options: DataOptions | None) -> dict[str, Any]:
    return {} if options is None else options.model_dump(exclude_none=True)


def _per_source(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split data options into those of each source (columns) and those of the data spec."""
    columns = ("text_column", "label_column", "image_column")
    return (
        {key: value for key, value in options.items() if key in columns},
        {key: value for key, value in options.items() if key not in columns},
    )


def _conversion(options: ConversionOptions | None) -> dict[str, Any] | None:
    return None if options is None else options.model_dump(exclude_none=True)


def _hyperparameters(request: FineTuningJobCreate) -> dict[str, Any]:
    given = request.hyperparameters
    if request.method is not None and request.method.supervised is not None:
        given = request.method.supervised.hyperparameters or given
    values = {} if given is None else given.model_dump(exclude_none=True)
    values = {key: value for key, value in values.items() if value != "auto"}
    if "n_epochs" in values:
        values["epochs"] = values.pop("n_epochs")
    multiplier = values.pop("learning_rate_multiplier", None)
    if multiplier is not None and "learning_rate" not in values:
        values["learning_rate"] = BASE_LEARNING_RATE * float(multiplier)
    return values


def _limits(builder: SpecBuilder, limits: Limits | None) -> dict[str, Any]:
    values = {} if limits is None else limits.model_dump(exclude_none=True)
    # The engine stops itself (with a checkpoint) before the supervisor's hard limit.
    ceiling = builder.settings.max_job_minutes
    values["max_minutes"] = min(values.get("max_minutes", ceiling), ceiling)
    return values


def _device(requested: str | None) -> str:
    # The supervisor replaces "auto" with the device it assigns; "cpu" keeps a job off GPUs.
    return requested or "auto"


def _check_placement(builder: SpecBuilder, hyperparameters: dict[str, Any]) -> None:
    """`num_nodes` is the service's, not the engine's: it says where a Ray cluster puts the
    job's `num_processes` processes (the supervisor reads it from the request)."""
    nodes = hyperparameters.pop("num_nodes", None)
    if nodes is None:
        return
    param = "hyperparameters.num_nodes"
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        builder.problems.add(param, f"{param}: must be a positive whole number, got {nodes!r}.")
        return
    processes = hyperparameters.get("num_processes", 1)
    if nodes > 1 and builder.settings.executor != "ray":
        builder.problems.add(
            param,
            f"{param}: this server runs each job on one host (GMNM_EXECUTOR="
            f"{builder.settings.executor}); spreading a job over {nodes} nodes needs a Ray "
            "cluster (GMNM_EXECUTOR=ray). On one host use num_processes alone.",
        )
    elif isinstance(processes, int) and (processes < nodes or processes % nodes):
        builder.problems.add(
            param,
            f"{param}: {nodes} nodes need num_processes to be a multiple of {nodes} (the "
            f"processes in all, spread evenly), got num_processes {processes}.",
        )


def fine_tune_spec(builder: SpecBuilder, request: FineTuningJobCreate) -> dict[str, Any]:
    model = builder.model(request.model)
    if (request.training_file is None) == (request.dataset is None):
        builder.problems.add(
            "training_file",
            "training_file: give exactly one of training_file (an uploaded file id) or dataset "
            "(digits, mnist1d, or a Hugging Face data set id).",
        )
    train = _source(builder, request.training_file, "training_file")
    if request.dataset is not None:
        train = _named_source(request.dataset)
    validation = _source(builder, request.validation_file, "validation_file")
    if request.integrations:
        builder.problems.add(
            "integrations", "integrations: this server has no integrations; leave it empty."
        )
    hyperparameters = _hyperparameters(request)
    _check_placement(builder, hyperparameters)
    if hyperparameters.get("max_steps", 0) > builder.settings.max_steps:
        builder.problems.add(
            "hyperparameters.max_steps",
            f"hyperparameters.max_steps: {hyperparameters['max_steps']} is above this server's "
            f"limit of {builder.settings.max_steps} steps (GMNM_MAX_STEPS); ask for fewer.",
        )
    builder.problems.raise_if_any()
    columns, data_options = _per_source(_data_options(request.data))
    data = {
        **data_options,
        "train": None if train is None else {**train, **columns},
        "validation": None if validation is None else {**validation, **columns},
    }
    spec = {
        "model": model,
        "model_names": builder.model_names or None,
        "revision": request.revision,
        "pretrained": request.pretrained,
        "task": request.task,
        "data": _clean(data),
        "hyperparameters": hyperparameters,
        "conversion": _conversion(request.conversion),
        # max_steps given outright is checked above; the steps that epochs come to depend on
        # the data's size, which only the engine knows, so it refuses those itself
        "limits": {**_limits(builder, request.limits), "max_steps": builder.settings.max_steps},
        "seed": request.seed if request.seed is not None else secrets.randbelow(2**31),
        "device": _device(request.device),
    }
    return _validated("fine_tune", FineTuneSpec, _clean(spec))


def conversion_spec(builder: SpecBuilder, request: ConversionCreate) -> dict[str, Any]:
    model = builder.model(request.model)
    builder.problems.raise_if_any()
    conversion = _clean(
        {
            "targets": request.targets,
            "include": request.include,
            "exclude": request.exclude,
            "gmnm": None if request.gmnm is None else request.gmnm.model_dump(exclude_none=True),
        }
    )
    spec = {
        "model": model,
        "model_names": builder.model_names or None,
        "revision": request.revision,
        "pretrained": request.pretrained,
        "task": request.task,
        "num_labels": request.num_labels,
        "conversion": conversion,
        "dry_run": request.dry_run,
        "device": "auto",
    }
    return _validated("conversion", ConvertSpec, _clean(spec))


def evaluation_spec(builder: SpecBuilder, request: EvaluationCreate) -> dict[str, Any]:
    model = builder.model(request.model)
    compare_to = None
    if request.compare_to is not None:
        compare_to = builder.model(request.compare_to, "compare_to")
    if (request.file is None) == (request.dataset is None):
        builder.problems.add(
            "dataset", "dataset: give exactly one of dataset (a named data set) or file."
        )
    source = _source(builder, request.file, "file")
    if request.dataset is not None:
        source = _named_source(request.dataset)
    builder.problems.raise_if_any()
    columns, data_options = _per_source(_data_options(request.data))
    limits = _limits(builder, None)
    if request.max_samples is not None:
        limits["max_eval_samples"] = request.max_samples
    spec = {
        "model": model,
        "model_names": builder.model_names or None,
        "compare_to": compare_to,
        "task": request.task,
        "data": _clean({**data_options, "validation": {**(source or {}), **columns}}),
        "batch_size": request.batch_size,
        "limits": limits,
        "seed": request.seed,
        "device": _device(request.device),
    }
    return _validated("evaluation", EvaluateSpec, _clean(spec))

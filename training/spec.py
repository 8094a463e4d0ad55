"""Job specs: one JSON document describes a conversion, a fine-tune or an evaluation completely.

The service builds these from API requests and writes them to `spec.json`; the entry points
(`gmnm-convert`, `gmnm-train`, `gmnm-eval`) read them back with `load_spec`. Every model refuses
unknown fields, and every problem is reported at once with the field's path: field-level problems
by pydantic, combinations of fields by the `@combination` checks below. Those run on every
validation, also when other fields failed (on the fields that did validate), so a user fixing a
spec sees the whole list in one go.

The hyperparameters follow the fine-tuning APIs people know (`epochs`, `batch_size`,
`learning_rate`), with the GMNM-specific ones beside them.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import re
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, TypeVar, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError
from pydantic_core.core_schema import ErrorType

from gmnm.config import GMNMConfig
from training.errors import SpecError

logger = logging.getLogger(__name__)

Task = Literal["image-classification", "text-classification", "causal-lm"]
Target = Literal["activation", "softmax"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
BuiltinSet = Literal["digits", "mnist1d"]
FileFormat = Literal["auto", "jsonl", "csv", "text", "image-archive"]

TASKS: tuple[str, ...] = ("image-classification", "text-classification", "causal-lm")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

# File name endings and the format (and so the task) they imply when `format` is "auto".
SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
    ".zip": "image-archive",
    ".tar": "image-archive",
    ".tar.gz": "image-archive",
    ".tgz": "image-archive",
}
FORMAT_TASKS = {
    "jsonl": ("text-classification", "causal-lm"),
    "csv": ("text-classification", "causal-lm"),
    "text": ("causal-lm",),
    "image-archive": ("image-classification",),
}


Loc = tuple[str | int, ...]
Problem = tuple[Loc, str]  # (field path, message)
Problems = Iterator[Problem]
CheckT = TypeVar("CheckT", bound=Callable[..., Problems])

_CORE_ERROR_TYPES = frozenset(get_args(ErrorType))


def combination(check: CheckT) -> CheckT:
    """Mark a method of a spec model as a check of fields in combination.

    It yields (field path, message) problems. It runs after every validation of the model, on the
    model itself, or, when some fields failed, on a `_Validated` view of the fields that did; a
    check that reads a field that failed is skipped, since that field has its own error.
    """
    check.__combination_check__ = True  # type: ignore[attr-defined]
    return check


@functools.cache
def _checks_of(model: type[BaseModel]) -> tuple[Callable[[Any], Problems], ...]:
    found = []
    for klass in reversed(model.__mro__):
        found += [f for f in vars(klass).values() if getattr(f, "__combination_check__", False)]
    return tuple(found)


class _FailedFieldError(Exception):
    """A combination check read a field that failed on its own."""


@functools.cache
def _field_adapter(model: type[BaseModel], name: str) -> TypeAdapter[Any]:
    annotation: Any = model.model_fields[name].annotation
    return TypeAdapter(annotation)


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The spec model inside a field's type (`DataSource | None` gives DataSource)."""
    if get_origin(annotation) in (Union, types.UnionType):
        return next(filter(None, (_nested_model(arg) for arg in get_args(annotation))), None)
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    return None


class _Validated:
    """The fields of a refused input that validated on their own, read like the model itself.

    A field reads as its validated value (its default when absent), a nested model that failed
    inside as such a view of itself, and a field that failed raises `_FailedFieldError`. The
    model's methods work on the view too, so a combination check reads the same either way.
    """

    def __init__(self, model: type[BaseModel], data: dict[str, Any], failed: list[Loc]) -> None:
        self._model = model
        self._data = data
        self._failed = failed  # error paths relative to this model

    def __getattr__(self, name: str) -> Any:
        field = self._model.model_fields.get(name)
        if field is None:
            found = inspect.getattr_static(self._model, name)
            return types.MethodType(found, self) if inspect.isfunction(found) else found
        below = [loc[1:] for loc in self._failed if loc[:1] == (name,)]
        if not below:
            if name not in self._data:
                return field.get_default(call_default_factory=True)
            return _field_adapter(self._model, name).validate_python(self._data[name])
        nested = _nested_model(field.annotation)
        if () in below or nested is None or not isinstance(self._data[name], dict):
            raise _FailedFieldError(name)
        return _Validated(nested, self._data[name], below)


def _combination_problems(model: type[BaseModel], fields: Any) -> list[Problem]:
    problems: list[Problem] = []
    for check in _checks_of(model):
        try:
            for problem in check(fields):  # problems found before a failed field still count
                problems.append(problem)
        except _FailedFieldError:
            continue  # it reads a field that failed, which carries its own error
    return problems


def _as_given(error: ErrorDetails) -> InitErrorDetails:
    """One of pydantic's errors, to be raised again beside the combination problems."""
    if error["type"] not in _CORE_ERROR_TYPES:  # ours, from a nested model: keep the message
        custom = PydanticCustomError(error["type"], error["msg"])
        return InitErrorDetails(type=custom, loc=error["loc"], input=error["input"])
    detail = InitErrorDetails(type=error["type"], loc=error["loc"], input=error["input"])
    if "ctx" in error:
        detail["ctx"] = error["ctx"]
    return detail


def _refuse(title: str, errors: list[ErrorDetails], problems: list[Problem], value: Any) -> None:
    """Raise every problem of one model at once, each at its own field path."""
    if errors or problems:
        raise ValidationError.from_exception_data(
            title,
            [_as_given(error) for error in errors]
            + [
                InitErrorDetails(
                    type=PydanticCustomError("invalid_combination", message),
                    loc=loc,
                    input=value,
                )
                for loc, message in problems
            ],
        )


class _Strict(BaseModel):
    """Refuses unknown fields, and runs the model's `@combination` checks on every validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="wrap")
    @classmethod
    def _every_problem(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        # pydantic skips a model's after-validators once one field failed; this wrap runs the
        # combination checks on the fields that validated and adds their problems to the rest
        try:
            model = handler(data)
        except ValidationError as error:
            if not isinstance(data, dict):
                raise
            errors = error.errors()
            view = _Validated(cls, data, [item["loc"] for item in errors])
            _refuse(cls.__name__, errors, _combination_problems(cls, view), data)
            raise  # unreachable: _refuse raised
        _refuse(cls.__name__, [], _combination_problems(cls, model), data)
        return model


class GMNMSettings(_Strict):
    """Settings of the GMNM modules a conversion inserts (see `gmnm.GMNMConfig`)."""

    num_components: int = Field(
        default=8, ge=1, le=64, description="Gaussian components per mixture."
    )
    init: Literal["residual", "fit", "random"] = Field(
        default="residual",
        description="'residual': the converted model computes exactly what the original did; "
        "'fit': a least-squares fit of each replaced activation; 'random': from scratch.",
    )
    init_range: tuple[float, float] = Field(
        default=(-3.0, 3.0),
        description="Where the components are spread at init (and the fit range).",
    )

    @field_validator("init_range")
    @classmethod
    def _ordered_range(cls, init_range: tuple[float, float]) -> tuple[float, float]:
        low, high = init_range
        if not low < high:
            raise ValueError(f"must be (low, high) with low < high, got {init_range}")
        return init_range

    def to_config(self) -> GMNMConfig:
        return GMNMConfig(
            num_components=self.num_components, init=self.init, init_range=self.init_range
        )


class ConversionSpec(_Strict):
    """Which sites to convert and how; applied when the model is not converted yet."""

    targets: list[Target] = Field(
        default=["activation", "softmax"],
        min_length=1,
        description="Kinds of sites to convert.",
    )
    include: list[str] | None = Field(
        default=None, description="Only sites whose module path matches one of these patterns."
    )
    exclude: list[str] | None = Field(
        default=None, description="Skip sites whose module path matches one of these patterns."
    )
    gmnm: GMNMSettings = GMNMSettings()
    groups: int | Literal["channel"] = Field(
        default=1,
        description="Parameter sets per activation site along its channel (last) dimension: 1 "
        "(one per layer), a number dividing every site's channels, or 'channel'.",
    )
    share_calls: bool = Field(
        default=False,
        description="One parameter set for an activation module its caller calls several times.",
    )
    calibrate: bool = Field(
        default=False,
        description="Centre each module's components on the values it sees on one batch of the "
        "job's data (fine-tunes and evaluations).",
    )

    @field_validator("groups")
    @classmethod
    def _positive_groups(cls, groups: int | str) -> int | str:
        if isinstance(groups, int) and groups < 1:
            raise ValueError(f"must be a positive integer or 'channel', got {groups}")
        return groups

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, targets: list[str]) -> list[str]:
        if len(set(targets)) != len(targets):
            raise ValueError(f"each target may appear once, got {targets}")
        return targets


class DataSource(_Strict):
    """Exactly one of `builtin`, `path` or `hf_dataset`."""

    builtin: BuiltinSet | None = Field(
        default=None, description="'digits' (scikit-learn) or 'mnist1d' (generated locally)."
    )
    path: str | None = Field(
        default=None,
        description="A JSONL, CSV or plain-text file, or a zip/tar archive of an image folder "
        "tree with one folder per class.",
    )
    hf_dataset: str | None = Field(
        default=None,
        description="A Hugging Face data set id (from the hub or its cache) or a directory "
        "written by `datasets.save_to_disk`.",
    )
    split: str | None = Field(
        default=None,
        description="Split of a Hugging Face data set (default: train, or validation/test).",
    )
    format: FileFormat = Field(
        default="auto", description="Format of `path`; 'auto' uses the suffix."
    )
    text_column: str = Field(default="text", min_length=1)
    label_column: str = Field(default="label", min_length=1)
    image_column: str = Field(default="image", min_length=1)

    @combination
    def _one_source(self) -> Problems:
        given = [name for name in ("builtin", "path", "hf_dataset") if getattr(self, name)]
        if len(given) != 1:
            where = ", ".join(given) if given else "none"
            yield (), f"give exactly one of builtin, path or hf_dataset (got {where})"

    @combination
    def _format_known(self) -> Problems:
        if self.path and self.format == "auto" and suffix_format(self.path) is None:
            yield (
                ("format",),
                f"cannot tell the format of {self.path!r} from its name; set format to one of "
                "jsonl, csv, text, image-archive",
            )

    @combination
    def _split_of_a_data_set(self) -> Problems:
        if self.split is not None and not self.hf_dataset:
            yield ("split",), "split applies to hf_dataset sources only"

    def resolved_format(self) -> str | None:
        """The file format of a `path` source (None for the other kinds)."""
        if not self.path:
            return None
        return suffix_format(self.path) if self.format == "auto" else self.format

    def implied_tasks(self) -> tuple[str, ...] | None:
        """The tasks this source can serve, or None when only the data itself can tell."""
        if self.builtin:
            return ("image-classification",)
        fmt = self.resolved_format()
        return FORMAT_TASKS.get(fmt) if fmt else None

    def describe(self) -> str:
        if self.builtin:
            return f"built-in set {self.builtin!r}"
        if self.path:
            return f"file {self.path!r}"
        return f"data set {self.hf_dataset!r}" + (f" split {self.split!r}" if self.split else "")


def suffix_format(path: str) -> str | None:
    name = path.lower()
    for suffix in sorted(SUFFIX_FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return SUFFIX_FORMATS[suffix]
    return None


class DataSpec(_Strict):
    """Training and validation data.

    Validation is, in order: the `validation` source, the set's own held-out split (MNIST-1D's
    test split, a Hugging Face data set's validation or test split), or a seeded
    `validation_fraction` of the training data.
    """

    train: DataSource | None = None
    validation: DataSource | None = None
    validation_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    labels: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Class names in head order; default: the sorted labels found in the data.",
    )
    max_length: int = Field(
        default=128, ge=4, le=32768, description="Tokens per text example, or per causal-LM block."
    )

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, labels: list[str] | None) -> list[str] | None:
        if labels is not None and len(set(labels)) != len(labels):
            raise ValueError("class names must be unique")
        return labels

    def sources(self) -> list[DataSource]:
        return [s for s in (self.train, self.validation) if s is not None]


class Hyperparameters(_Strict):
    """Optimisation settings. `batch_size` is the global batch of one forward pass (split over
    `num_processes`); an optimizer step sees `batch_size * gradient_accumulation_steps` examples."""

    epochs: int = Field(default=1, ge=1, le=10_000)
    batch_size: int = Field(default=8, ge=1, le=65_536)
    learning_rate: float = Field(default=5e-5, gt=0.0, le=10.0)
    max_steps: int | None = Field(
        default=None, ge=1, description="Optimizer steps; overrides epochs when set."
    )
    warmup_steps: int = Field(default=0, ge=0)
    warmup_ratio: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Warm-up as a share of steps."
    )
    weight_decay: float = Field(default=0.01, ge=0.0)
    gmnm_learning_rate: float | None = Field(
        default=None, gt=0.0, le=10.0, description="Learning rate of GMNM parameters (default 10x)."
    )
    gmnm_weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float | None = Field(
        default=1.0, gt=0.0, description="Gradient clipping; null: off."
    )
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=4096)
    gmnm_only_steps: int = Field(
        default=0, ge=0, description="First steps that train only the GMNM parameters."
    )
    eval_interval: int | None = Field(
        default=None, ge=1, description="Evaluate every N steps (and always at the end)."
    )
    checkpoint_interval: int | None = Field(
        default=None, ge=1, description="Checkpoint every N steps (and always at the end)."
    )
    log_interval: int = Field(
        default=10, ge=1, description="One training metrics event every N steps."
    )
    num_processes: int = Field(
        default=1, ge=1, le=256, description="Data-parallel processes (DDP)."
    )

    @combination
    def _one_warmup(self) -> Problems:
        if self.warmup_steps and self.warmup_ratio:
            yield ("warmup_ratio",), "set warmup_steps or warmup_ratio, not both"

    @combination
    def _equal_shares(self) -> Problems:
        if self.batch_size % self.num_processes:
            yield (
                ("batch_size",),
                f"batch_size {self.batch_size} must be divisible by num_processes "
                f"{self.num_processes} (each process takes an equal share)",
            )

    @combination
    def _full_model_steps(self) -> Problems:
        if self.max_steps is not None and self.gmnm_only_steps >= self.max_steps:
            yield (
                ("gmnm_only_steps",),
                f"gmnm_only_steps {self.gmnm_only_steps} leaves no full-model steps within "
                f"max_steps {self.max_steps}; lower it or raise max_steps",
            )

    def gmnm_lr(self) -> float:
        return self.gmnm_learning_rate or 10.0 * self.learning_rate


class Limits(_Strict):
    max_minutes: float | None = Field(
        default=None,
        gt=0.0,
        description="Stop (with a checkpoint and a final evaluation) after this.",
    )
    max_train_samples: int | None = Field(default=None, ge=1)
    max_eval_samples: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(
        default=None,
        ge=1,
        description="Refuse, before training, a fine-tune whose optimizer steps (max_steps, or "
        "epochs x steps per epoch) would exceed this.",
    )


class _ModelJob(_Strict):
    model: str = Field(
        min_length=1,
        description="A Hugging Face id, a timm name, or a directory (a converted model or a "
        "checkpoint of an earlier job).",
    )
    revision: str | None = None
    pretrained: bool = Field(
        default=True, description="false: random weights from the config alone."
    )
    trust_remote_code: bool = False
    model_names: dict[str, str] = Field(
        default_factory=dict,
        description="What events and results call a model reference (the service names its "
        "checkpoint directories by their ids); a reference not listed is shown as it is.",
    )
    seed: int = Field(default=0, ge=0, lt=2**32)
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N.")
    precision: Precision = Field(
        default="auto", description="auto: bf16 on CUDA when supported, else fp32."
    )

    def name_of(self, reference: str) -> str:
        return self.model_names.get(reference, reference)

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not DEVICE_PATTERN.match(device):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {device!r}")
        return device

    @field_validator("precision")
    @classmethod
    def _precision_fits_device(cls, precision: str, info: ValidationInfo) -> str:
        if precision == "fp16" and info.data.get("device") == "cpu":
            raise ValueError(
                "fp16 needs a CUDA device (its loss scaling is CUDA-only); use bf16 or fp32 on cpu"
            )
        return precision


def _task_problems(task: str | None, data: DataSpec) -> Problems:
    for name in ("train", "validation"):
        source = getattr(data, name)
        implied = source.implied_tasks() if source is not None else None
        if task is not None and implied is not None and task not in implied:
            yield (
                ("data", name),
                f"task {task} cannot use {source.describe()}; it suits {' or '.join(implied)}",
            )
    if task == "causal-lm" and data.labels is not None:
        yield ("data", "labels"), "causal-lm has no classes; remove labels"


def _infer_task(data: DataSpec) -> str | None:
    """The task the data implies when the spec leaves it out (None when it cannot tell)."""
    candidates: set[str] | None = None
    for source in data.sources():
        implied = source.implied_tasks()
        if implied is None:
            return None
        candidates = set(implied) if candidates is None else candidates & set(implied)
    if candidates and len(candidates) == 1:
        return next(iter(candidates))
    if candidates == {"text-classification", "causal-lm"}:
        return "text-classification"
    return None


class _DataJob(_ModelJob):
    conversion: ConversionSpec | None = Field(
        default=None, description="Convert the model first (ignored when it is already converted)."
    )
    task: Task | None = Field(default=None, description="Inferred from the data when left out.")
    data: DataSpec

    _needs_train: ClassVar[bool] = False

    def _has_data(self) -> bool:
        return self.data.train is not None or (not self._needs_train and bool(self.data.sources()))

    @combination
    def _data_given(self) -> Problems:
        if self._needs_train and self.data.train is None:
            yield ("data", "train"), "a fine-tune needs training data"
        elif not self._has_data():
            yield ("data",), "give data.validation or data.train to evaluate on"

    @combination
    def _data_fits_task(self) -> Problems:
        yield from _task_problems(self.task, self.data)
        if self.task is None and self._has_data() and _infer_task(self.data) is None:
            yield (
                ("data",),
                "cannot infer the task from this data; set task to one of " + ", ".join(TASKS),
            )

    def resolved_task(self) -> str:
        task = self.task or _infer_task(self.data)
        assert task is not None  # the validator refused specs where it cannot be inferred
        return task


class FineTuneSpec(_DataJob):
    """A fine-tuning job: `gmnm-train --spec spec.json --out DIR`."""

    hyperparameters: Hyperparameters = Hyperparameters()
    limits: Limits = Limits()

    _needs_train: ClassVar[bool] = True

    @combination
    def _fits_device(self) -> Problems:
        processes = self.hyperparameters.num_processes
        if processes > 1 and re.fullmatch(r"cuda:\d+", self.device):
            yield (
                ("hyperparameters", "num_processes"),
                f"num_processes {processes} runs one process per GPU; use device 'cuda' (or "
                f"'auto'), not a single device {self.device!r}",
            )

    @combination
    def _steps_within_limit(self) -> Problems:
        # the steps that epochs come to are checked once the data is read
        steps, limit = self.hyperparameters.max_steps, self.limits.max_steps
        if steps is not None and limit is not None and steps > limit:
            yield (
                ("limits", "max_steps"),
                f"hyperparameters.max_steps {steps} is above the limit of {limit} steps; ask for "
                "fewer steps",
            )


class EvaluateSpec(_DataJob):
    """An evaluation job: `gmnm-eval --spec spec.json --out DIR`.

    The model is evaluated on `data.validation`, or on the validation part of `data.train`
    chosen as in a fine-tune with the same seed. With `compare_to`, the same is done for a second
    model (typically the unconverted original) and the differences are reported.
    """

    compare_to: str | None = Field(
        default=None, description="A second model reference evaluated on the same data."
    )
    batch_size: int = Field(default=32, ge=1, le=65_536)
    latency_batches: int = Field(default=5, ge=1, le=1000, description="Batches timed for latency.")
    limits: Limits = Limits()


class ConvertSpec(_ModelJob):
    """A conversion job: `gmnm-convert --spec spec.json --out DIR`.

    Writes the converted model to `checkpoints/step-0/` and the plan and conversion report to
    `result.json`; with `dry_run` only the plan.
    """

    task: Task | Literal["feature-extraction"] | None = None
    num_labels: int | None = Field(
        default=None, ge=1, description="Resize the classification head."
    )
    conversion: ConversionSpec = ConversionSpec()
    dry_run: bool = False

    @combination
    def _no_calibration_data(self) -> Problems:
        if self.conversion.calibrate:
            yield (
                ("conversion",),
                "calibrate needs the job's data, which a conversion job has none of; set it in "
                "the fine-tune or evaluation spec instead",
            )


SpecT = TypeVar("SpecT", FineTuneSpec, EvaluateSpec, ConvertSpec)


def describe_errors(error: ValidationError) -> list[tuple[str, str]]:
    """(field path, message) for every problem of a refused spec, e.g.
    ("hyperparameters.batch_size", "must be divisible by ...")."""
    described = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(spec)"
        message = item["msg"]
        message = message.removeprefix("Value error, ")
        described.append((path, message))
    return described


def parse_spec(kind: type[SpecT], data: Any) -> SpecT:
    """Validate a decoded JSON document as a spec, raising `SpecError` listing every problem."""
    try:
        return kind.model_validate(data)
    except ValidationError as error:
        lines = [f"{path}: {message}" for path, message in describe_errors(error)]
        noun = "problem" if len(lines) == 1 else "problems"
        raise SpecError(
            f"the {kind.__name__} has {len(lines)} {noun}:\n" + "\n".join(lines)
        ) from None


def load_spec(kind: type[SpecT], path: str | Path) -> SpecT:
    """Read and validate a spec file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SpecError(f"cannot read the spec file {str(path)!r}: {error.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise SpecError(
            f"the spec file {str(path)!r} is not valid JSON: {error.msg} at line {error.lineno} "
            f"column {error.colno}"
        ) from None
    return parse_spec(kind, data)

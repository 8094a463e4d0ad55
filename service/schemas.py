"""Request and response bodies. Names follow `ThingCreate` (what a client sends) and
`ThingPublic` (what the API returns); fields follow OpenAI's fine-tuning API where it has one, and
the service's own fields sit beside them."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

Auto = Literal["auto"]
# Longer than any Hugging Face id, timm name or sensible local path; a longer reference is a
# mistake (or an attack) and is refused before it reaches a log line or a job.
MAX_REFERENCE_CHARS = 1024
Task = Literal["image-classification", "text-classification", "causal-lm"]


class Page(BaseModel, Generic[T]):
    """One page of a list; ask for the next with `after=<id of the last item>`."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


# files


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    sha256: str
    format: str | None = None
    rows: int | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# shared pieces of jobs


class GMNMOptions(BaseModel):
    """How each site's mixture is built."""

    model_config = ConfigDict(extra="allow")

    num_components: int | None = Field(default=None, ge=1, le=64)
    init: Literal["residual", "fit", "random"] | None = None
    init_range: tuple[float, float] | None = None


class ConversionOptions(BaseModel):
    """Which sites to convert and how; the defaults convert every activation and softmax."""

    model_config = ConfigDict(extra="forbid")

    targets: list[str] | None = Field(default=None, description="site kinds to convert")
    include: list[str] | None = Field(default=None, description="module path patterns to keep")
    exclude: list[str] | None = Field(default=None, description="module path patterns to skip")
    gmnm: GMNMOptions | None = None


class Progress(BaseModel):
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    percent: float | None = None


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobBase(BaseModel):
    id: str
    status: str
    model: str
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    estimated_finish: int | None = None
    progress: Progress
    metrics: dict[str, Any] | None = None
    error: JobError | None = None
    attempts: int
    device: str | None = None
    metadata: dict[str, str] | None = None


# fine-tuning jobs


class Hyperparameters(BaseModel):
    """OpenAI's three hyperparameters plus the training engine's own (passed through)."""

    model_config = ConfigDict(extra="allow")

    n_epochs: int | Auto | None = None
    batch_size: int | Auto | None = None
    learning_rate_multiplier: float | Auto | None = None
    max_steps: int | None = Field(default=None, ge=1)


class DataOptions(BaseModel):
    """How the data files are read (the files themselves are `training_file` and friends)."""

    model_config = ConfigDict(extra="forbid")

    labels: list[str] | None = Field(default=None, description="class names in head order")
    max_length: int | None = Field(default=None, description="tokens per text example")
    validation_fraction: float | None = Field(
        default=None, description="held out of the training data when there is no validation"
    )
    text_column: str | None = None
    label_column: str | None = None
    image_column: str | None = None


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_minutes: float | None = Field(default=None, gt=0)
    max_train_samples: int | None = Field(default=None, ge=1)
    max_eval_samples: int | None = Field(default=None, ge=1)


class SupervisedMethod(BaseModel):
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedMethod | None = None


class FineTuningJobCreate(BaseModel):
    """A fine-tune of a model reference or of a checkpoint id from an earlier job."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        max_length=MAX_REFERENCE_CHARS,
        description="a Hugging Face id, a timm name, or a checkpoint id",
    )
    task: Task | None = Field(default=None, description="inferred from the data when left out")
    training_file: str | None = Field(default=None, description="an uploaded file id")
    dataset: str | None = Field(
        default=None,
        description="instead of a file: 'digits', 'mnist1d', or a Hugging Face data set id",
    )
    validation_file: str | None = None
    data: DataOptions | None = None
    hyperparameters: Hyperparameters | None = None
    limits: Limits | None = None
    method: Method | None = None
    conversion: ConversionOptions | None = Field(
        default=None, description="convert the model first (ignored for a converted checkpoint)"
    )
    revision: str | None = None
    pretrained: bool | None = None
    seed: int | None = None
    device: str | None = None
    suffix: str | None = Field(default=None, max_length=64)
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None


class FineTuningHyperparameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    n_epochs: int | Auto | None = None
    batch_size: int | Auto | None = None
    learning_rate_multiplier: float | Auto | None = None


class FineTuningJobPublic(JobBase):
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    organization_id: str
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    result_files: list[str]
    training_file: str | None = None
    validation_file: str | None = None
    dataset: str | None = None
    hyperparameters: FineTuningHyperparameters
    seed: int
    task: str | None = None
    conversion: ConversionOptions | None = None
    checkpoint_id: str | None = None
    integrations: list[dict[str, Any]] = Field(default_factory=list)
    method: Method | None = None
    user_provided_suffix: str | None = None


class EventPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None = None
    step: int | None = None


class CheckpointMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    step: float | None = None
    train_loss: float | None = None
    valid_loss: float | None = None


class CheckpointPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: CheckpointMetrics
    sha256: str | None = None
    size: int | None = None
    content_url: str


# conversions


class ConversionCreate(BaseModel):
    """Convert a model; `dry_run` returns only the plan."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=MAX_REFERENCE_CHARS)
    revision: str | None = None
    pretrained: bool | None = None
    task: Task | Literal["feature-extraction"] | None = Field(
        default=None, description="load the model with the head for this task"
    )
    num_labels: int | None = Field(default=None, ge=1, description="resize the classifier head")
    targets: list[str] | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    gmnm: GMNMOptions | None = None
    dry_run: bool = False
    metadata: dict[str, str] | None = None


class ConversionPublic(JobBase):
    object: Literal["conversion"] = "conversion"
    dry_run: bool
    plan: Any | None = None
    report: Any | None = None
    checkpoint_id: str | None = None


# evaluations


class EvaluationCreate(BaseModel):
    """Evaluate a model, optionally against another (`compare_to`), on a data set or a file."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=MAX_REFERENCE_CHARS)
    task: Task | None = Field(default=None, description="inferred from the data when left out")
    dataset: str | None = None
    file: str | None = Field(default=None, description="an uploaded file id")
    compare_to: str | None = Field(default=None, max_length=MAX_REFERENCE_CHARS)
    data: DataOptions | None = None
    batch_size: int | None = Field(default=None, ge=1)
    max_samples: int | None = Field(default=None, ge=1)
    seed: int | None = None
    device: str | None = None
    metadata: dict[str, str] | None = None


class EvaluationPublic(JobBase):
    object: Literal["evaluation"] = "evaluation"
    task: str | None = None
    dataset: str | None = None
    file: str | None = None
    compare_to: str | None = None
    result: Any | None = None

"""The model side of a job: load (and convert) through `surgery`, run a batch, count parameters.

Everything model-specific the loop needs lives here, so that the recipes in `finetune.py` and
`evaluate.py` read the same for timm and transformers models and for every task.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

import surgery
from training.errors import ModelError
from training.protocol import CHECKPOINT_INFO_FILE
from training.spec import ConversionSpec

logger = logging.getLogger(__name__)

# The task name surgery.load_model understands for each job task.
SURGERY_TASKS = {
    "image-classification": "image-classification",
    "text-classification": "text-classification",
    "causal-lm": "causal-lm",
}


@dataclass
class JobModel:
    """A loaded model with what a job needs to feed, train and save it."""

    model: nn.Module
    library: str
    reference: str
    task: str
    processor: Any
    data_config: dict[str, Any] | None
    converted: bool
    classes: list[str] | None = None
    plan: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def saved_classes(reference: str) -> list[str] | None:
    """Class names a checkpoint of this engine recorded, when `reference` is one."""
    info = Path(reference) / CHECKPOINT_INFO_FILE
    if not info.is_file():
        return None
    try:
        labels = json.loads(info.read_text(encoding="utf-8")).get("labels")
    except (OSError, ValueError):
        return None
    return [str(label) for label in labels] if isinstance(labels, list) else None


def load_job_model(
    reference: str,
    *,
    task: str,
    classes: Sequence[str] | None,
    revision: str | None = None,
    pretrained: bool = True,
    trust_remote_code: bool = False,
    conversion: ConversionSpec | None = None,
) -> JobModel:
    """Load the model for `task` (the head sized to `classes`), converting it when asked.

    A conversion with `calibrate` is left to the caller, which has the data for it
    (`convert_job_model` with a batch).
    """
    loaded = surgery.load_model(
        reference,
        pretrained=pretrained,
        revision=revision,
        task=SURGERY_TASKS[task],
        trust_remote_code=trust_remote_code,
        num_labels=len(classes) if classes is not None else None,
    )
    job = JobModel(
        model=loaded.model,
        library=loaded.library,
        reference=reference,
        task=task,
        processor=loaded.processor,
        data_config=loaded.data_config,
        converted=bool(loaded.converted),
        classes=list(classes) if classes is not None else None,
    )
    if classes is not None:
        set_class_names(job.model, job.classes or [])
    if conversion is not None and conversion.calibrate:
        pass  # the caller converts once it has a batch of data: see convert_job_model
    elif conversion is not None and not job.converted:
        convert_job_model(job, conversion)
    elif conversion is not None:
        logger.info("model %s is already converted; the conversion settings are ignored", reference)
    return job


def convert_job_model(
    job: JobModel, conversion: ConversionSpec, calibration_batch: dict[str, Tensor] | None = None
) -> None:
    """Plan and convert in place; the plan and report are kept on the job for result.json.

    `calibration_batch` (a batch of the job's data) centres the components on real values.
    """
    plan = surgery.plan(
        job.model,
        targets=tuple(conversion.targets),
        include=conversion.include,
        exclude=conversion.exclude,
    )
    report = surgery.convert(
        job.model,
        plan,
        conversion.gmnm.to_config(),
        groups=conversion.groups,
        share_calls=conversion.share_calls,
        calibration_inputs=model_inputs(job.library, calibration_batch)
        if calibration_batch is not None
        else None,
    )
    job.plan = plan.to_dict()
    job.report = report.to_dict()
    job.converted = True


def set_class_names(model: nn.Module, classes: Sequence[str]) -> None:
    """Record class names in a transformers config, so a saved checkpoint carries them."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "id2label"):
        config.id2label = dict(enumerate(classes))
        config.label2id = {name: i for i, name in enumerate(classes)}


def model_inputs(library: str, batch: dict[str, Tensor]) -> Any:
    """What the model is called with: the image tensor for timm, keyword arguments otherwise."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    return inputs["pixel_values"] if library == "timm" else inputs


def forward(model: nn.Module, library: str, batch: dict[str, Tensor]) -> Tensor:
    """The logits of a batch: (B, classes) for classification, (B, T, vocab) for causal LM."""
    inputs = model_inputs(library, batch)
    if library == "timm":
        return model(inputs)
    output = model(**inputs)
    logits = output.logits if hasattr(output, "logits") else output[0]
    return logits


def loss_and_stats(task: str, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss, per-unit losses, per-unit predictions) where a unit is an example, or a
    predicted token for causal LM (each position predicts the next token of its block)."""
    if task == "causal-lm":
        logits = logits[:, :-1, :].float()
        targets = labels[:, 1:]
        losses = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
        )
        predictions = logits.argmax(-1).reshape(-1)
        return losses.mean(), losses, predictions
    logits = logits.float()
    losses = nn.functional.cross_entropy(logits, labels, reduction="none")
    return losses.mean(), losses, logits.argmax(-1)


def gmnm_parameter_names(model: nn.Module) -> set[str]:
    return set(surgery.gmnm_parameter_names(model))


def parameter_counts(model: nn.Module) -> dict[str, int]:
    gmnm_names = gmnm_parameter_names(model)
    total = gmnm = 0
    for name, parameter in model.named_parameters():
        total += parameter.numel()
        if name in gmnm_names:
            gmnm += parameter.numel()
    return {"parameters": total, "gmnm_parameters": gmnm}


def save_model(model: nn.Module, directory: Path) -> None:
    surgery.save(model, directory)


def load_saved(directory: Path) -> nn.Module:
    model: nn.Module = surgery.load(directory)
    return model


def check_head(job: JobModel, logits: Tensor) -> None:
    """Refuse a model whose output does not fit the task before any training starts."""
    if job.task == "causal-lm":
        if logits.dim() != 3:
            raise ModelError(
                f"model {job.reference!r} does not produce next-token logits (got shape "
                f"{tuple(logits.shape)}); causal-lm needs a language-model head"
            )
        return
    expected = len(job.classes or [])
    if logits.dim() != 2 or logits.shape[-1] != expected:
        raise ModelError(
            f"model {job.reference!r} produces outputs of shape {tuple(logits.shape)}, not one "
            f"score per class for {expected} classes; is it a {job.task} model?"
        )

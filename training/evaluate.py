"""The evaluation recipe: metrics of a model on a data set, and of a second one to compare.

`gmnm-eval` evaluates `spec.model` (converting it first when the spec asks) on the validation
data, and with `compare_to` the second model on the same examples, then writes both metric sets,
their differences, the parameter counts and the inference latency per batch to `result.json`
and the first model's metrics to `metrics.json`.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from training import distributed
from training.checkpoint import write_json_atomic
from training.data import Examples
from training.events import EventLog
from training.finetune import JobResult, calibration_batch
from training.metrics import evaluate, to_device
from training.models import (
    check_head,
    convert_job_model,
    forward,
    load_job_model,
    parameter_counts,
    saved_classes,
)
from training.preprocess import Preprocessor
from training.protocol import METRICS_FILE, RESULT_FILE
from training.runtime import (
    CancelToken,
    autocast_factory,
    prepare_data,
    resolve_precision,
    seed_everything,
    work_directory,
)
from training.spec import ConversionSpec, EvaluateSpec

logger = logging.getLogger(__name__)


def run_evaluation(
    spec: EvaluateSpec,
    out_dir: Path,
    *,
    resume: bool = False,
    cancel: CancelToken | None = None,
) -> JobResult:
    """Run an evaluation job (short: a resumed one simply runs again)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cancel = cancel or CancelToken(out_dir)
    ctx = distributed.setup(spec.device)
    try:
        with work_directory(out_dir) as work_dir:
            return _evaluate_job(spec, out_dir, work_dir, cancel, ctx)
    finally:
        distributed.teardown()


def _evaluate_job(
    spec: EvaluateSpec,
    out_dir: Path,
    work_dir: Path,
    cancel: CancelToken,
    ctx: distributed.DistContext,
) -> JobResult:
    task = spec.resolved_task()
    precision = resolve_precision(spec.precision, ctx.device)
    events = EventLog(out_dir, enabled=ctx.is_main)
    events.message(
        f"evaluating {spec.name_of(spec.model)} for {task} on {ctx.device} ({precision})"
    )

    # read the data; a checkpoint of this engine brings its own class list
    seed_everything(spec.seed)
    splits = prepare_data(spec.data, task, spec.seed, work_dir, classes=saved_classes(spec.model))
    examples = splits.validation or splits.train
    assert examples is not None
    if splits.validation is None:
        events.message("no validation split: evaluating on all of data.train")
    if spec.limits.max_eval_samples and len(examples) > spec.limits.max_eval_samples:
        examples = examples.subset(range(spec.limits.max_eval_samples))

    # the model itself, then the one it is compared to, on the same examples
    models = [(spec.model, spec.conversion, spec.revision)]
    if spec.compare_to:
        models.append((spec.compare_to, None, None))
    results = []
    for reference, conversion, revision in models:
        if cancel.is_set():
            events.message("cancelled")
            return JobResult("cancelled", 0)
        result = _evaluate_one(
            spec, reference, conversion, revision, task, examples, splits.classes, ctx, precision
        )
        events.metrics(
            None,
            dict(result["metrics"]),
            f"{spec.name_of(reference)}: "
            + ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items())
            + f"; {result['latency_ms_per_batch']:.1f} ms per batch of {spec.batch_size}",
        )
        results.append(result)

    # both metric sets and their differences
    primary = results[0]
    summary: dict[str, Any] = {
        "task": task,
        "labels": splits.classes,
        "examples": len(examples),
        "model": primary,
        "compare_to": None,
        "difference": None,
    }
    if len(results) > 1:
        other = results[1]
        summary["compare_to"] = other
        summary["difference"] = {
            key: primary["metrics"][key] - other["metrics"][key]
            for key in primary["metrics"]
            if key in other["metrics"] and key not in ("samples", "tokens")
        }
        summary["difference"]["latency_ms_per_batch"] = (
            primary["latency_ms_per_batch"] - other["latency_ms_per_batch"]
        )
    if ctx.is_main:
        write_json_atomic(out_dir / METRICS_FILE, primary["metrics"])
        write_json_atomic(out_dir / RESULT_FILE, summary)
    events.message("evaluation done")
    events.close()
    return JobResult("succeeded", 0, primary["metrics"])


def _evaluate_one(
    spec: EvaluateSpec,
    reference: str,
    conversion: ConversionSpec | None,
    revision: str | None,
    task: str,
    examples: Examples,
    classes: list[str] | None,
    ctx: distributed.DistContext,
    precision: str,
) -> dict[str, Any]:
    autocast = autocast_factory(precision, ctx.device)
    # the same seed before each load: a head created for the task starts equal in both models,
    # so that their difference shows the models, not two random heads
    seed_everything(spec.seed)
    job = load_job_model(
        reference,
        task=task,
        classes=classes,
        revision=revision,
        pretrained=spec.pretrained,
        trust_remote_code=spec.trust_remote_code,
        conversion=conversion,
    )
    model = job.model.to(ctx.device).eval()
    pre = Preprocessor(
        model, job.library, task, job.processor, job.data_config, reference, spec.data.max_length
    )
    dataset = pre.dataset(examples, classes)
    if conversion is not None and conversion.calibrate and not job.converted:
        convert_job_model(job, conversion, calibration_batch(dataset, pre, ctx))
        model = job.model.to(ctx.device).eval()
    first = pre.collate([dataset[i] for i in range(min(2, len(dataset)))])
    with torch.no_grad():
        check_head(job, forward(model, job.library, to_device(first, ctx.device)))
    metrics = evaluate(
        model,
        job.library,
        task,
        dataset,
        pre.collate,
        spec.batch_size,
        ctx,
        autocast,
        len(classes) if classes else None,
    )
    latency = _latency_ms(model, job.library, dataset, pre.collate, spec, ctx, autocast)
    return {
        "reference": spec.name_of(reference),
        "converted": job.converted,
        "conversion": job.report,
        "metrics": metrics,
        **parameter_counts(model),
        "latency_ms_per_batch": latency,
        "batch_size": spec.batch_size,
    }


@torch.no_grad()
def _latency_ms(
    model: torch.nn.Module,
    library: str,
    dataset: Any,
    collate: Any,
    spec: EvaluateSpec,
    ctx: distributed.DistContext,
    autocast: Any,
) -> float:
    """Median forward time of one batch (inputs already on the device; one warm-up batch)."""
    size = min(spec.batch_size, len(dataset))
    batch = to_device(collate([dataset[i] for i in range(size)]), ctx.device)
    timings = []
    for attempt in range(spec.latency_batches + 1):
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        tick = time.perf_counter()
        with autocast():
            forward(model, library, batch)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        if attempt > 0:
            timings.append((time.perf_counter() - tick) * 1000.0)
    return statistics.median(timings)

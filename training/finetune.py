"""The fine-tuning recipe: one job from spec to final checkpoint, read top to bottom.

Supports: image classification, text classification and causal LM; timm and transformers
models, converted by surgery before training when the spec asks for it; AdamW with its own
learning rate and weight decay for GMNM parameters; linear warm-up then cosine decay; gradient
clipping and accumulation; bf16/fp16 autocast on CUDA (bf16 also on CPU); an optional first
phase that trains only the GMNM parameters; evaluation and checkpoints every N steps and at the
end; exact resume from the newest checkpoint; data parallelism over `torchrun` ranks;
cancellation (SIGTERM or a CANCEL file) between steps, with a checkpoint; a time limit.

Refused up front: fp16 without CUDA, GMNM-only steps on a model without GMNM parameters, data
too small for one optimizer step, and an output directory that already holds checkpoints when
`--resume` was not given.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from training import checkpoint as ckpt
from training import distributed
from training.errors import DataError, DivergedError, SpecError
from training.events import EventLog, Progress, plot_curves
from training.metrics import Batch, evaluate, to_device
from training.models import (
    JobModel,
    check_head,
    convert_job_model,
    forward,
    gmnm_parameter_names,
    load_job_model,
    loss_and_stats,
    parameter_counts,
    save_model,
)
from training.preprocess import ExampleDataset, Preprocessor
from training.protocol import CURVES_FILE, EVENTS_FILE, METRICS_FILE, RESULT_FILE
from training.runtime import (
    CancelToken,
    autocast_factory,
    peak_memory_mb,
    prepare_data,
    resolve_precision,
    rng_state,
    seed_everything,
    set_rng_state,
    work_directory,
)
from training.spec import FineTuneSpec, Hyperparameters

logger = logging.getLogger(__name__)


@dataclass
class JobResult:
    status: str  # "succeeded" or "cancelled"
    step: int
    metrics: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# the pieces the recipe is built from


class BatchOrder:
    """Which examples each global batch holds: a seeded permutation per epoch, batches taken in
    order, the incomplete last batch dropped. Its state (epoch, position) is what a resume needs.
    """

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = size // batch_size
        self.epoch = 0
        self.position = 0

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def remaining_in_epoch(self) -> list[list[int]]:
        order = self._permutation(self.epoch)
        return [
            order[b * self.batch_size : (b + 1) * self.batch_size].tolist()
            for b in range(self.position, self.batches_per_epoch)
        ]

    def advance(self) -> None:
        self.position += 1
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "size": self.size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["size"]) != self.size:
            raise SpecError(
                f"data: the training set now has {self.size} examples, but the checkpoint was "
                f"trained on {state['size']}; resume with the same data"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class BatchFeeder:
    """This rank's share of each global batch, loaded (and prefetched by `workers`) in order."""

    def __init__(
        self,
        dataset: ExampleDataset,
        order: BatchOrder,
        collate: Callable[[list[dict[str, Tensor]]], Batch],
        ctx: distributed.DistContext,
        workers: int,
    ) -> None:
        self.dataset = dataset
        self.order = order
        self.collate = collate
        self.ctx = ctx
        self.workers = workers
        self._iterator: Iterator[Batch] | None = None

    def _share(self, indices: list[int]) -> list[int]:
        per_rank = len(indices) // self.ctx.world_size
        return indices[self.ctx.rank * per_rank : (self.ctx.rank + 1) * per_rank]

    def next(self) -> Batch:
        if self._iterator is None:
            batches = [self._share(b) for b in self.order.remaining_in_epoch()]
            # A loader draws its workers' base seed from the generator it is given; the global
            # one would shift dropout masks whenever a resumed run starts a loader mid-epoch.
            seeds = torch.Generator().manual_seed(self.order.seed * 1_000_003 + self.order.epoch)
            loader = DataLoader(
                self.dataset,
                batch_sampler=batches,
                collate_fn=self.collate,
                num_workers=self.workers,
                generator=seeds,
            )
            self._iterator = iter(loader)
        batch = next(self._iterator)
        self.order.advance()
        if self.order.position == 0:
            self._iterator = None  # a new epoch: a new permutation
        return batch


def parameter_groups(
    model: nn.Module, gmnm_names: set[str], hp: Hyperparameters
) -> list[dict[str, Any]]:
    """AdamW groups: GMNM parameters with their own rate and decay; no decay on biases and
    normalisation weights (1-D tensors), the usual practice for transformers and ViTs."""
    decay, no_decay, gmnm = [], [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name in gmnm_names:
            gmnm.append(parameter)
        elif parameter.dim() < 2:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": hp.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
        {
            "name": "gmnm",
            "params": gmnm,
            "weight_decay": hp.gmnm_weight_decay,
            "lr": hp.gmnm_lr(),
        },
    ]
    return [group for group in groups if group["params"]]


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier after `done` steps: linear warm-up, then cosine decay to zero."""

    def multiplier(done: int) -> float:
        if done < warmup_steps:
            return (done + 1) / (warmup_steps + 1)
        progress = (done - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return multiplier


def _batch_tokens(batch: Batch, task: str) -> int:
    if task == "causal-lm":
        return int(batch["input_ids"].numel())
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return 0


@dataclass
class _Window:
    """Training figures since the last metrics event."""

    losses: list[float] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    correct: int = 0  # right predictions of a classification task, over all ranks
    predicted: int = 0

    def reset(self) -> None:
        self.losses.clear()
        self.samples = self.tokens = self.correct = self.predicted = 0
        self.seconds = 0.0


# ---------------------------------------------------------------------------------------------
# the recipe


def run_fine_tune(
    spec: FineTuneSpec,
    out_dir: Path,
    *,
    resume: bool = False,
    cancel: CancelToken | None = None,
    on_step: Callable[[int], None] | None = None,
) -> JobResult:
    """Run a fine-tuning job, writing the protocol's files under `out_dir`.

    `on_step(step)` is called on every rank after each optimizer step (progress hooks).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    cancel = cancel or CancelToken(out_dir)
    ctx = distributed.setup(spec.device)
    try:
        with work_directory(out_dir) as work_dir:
            return _fine_tune(spec, out_dir, work_dir, resume, cancel, on_step, ctx)
    finally:
        distributed.teardown()


def _fine_tune(
    spec: FineTuneSpec,
    out_dir: Path,
    work_dir: Path,
    resume: bool,
    cancel: CancelToken,
    on_step: Callable[[int], None] | None,
    ctx: distributed.DistContext,
) -> JobResult:
    started = time.monotonic()
    hp = spec.hyperparameters
    task = spec.resolved_task()
    precision = resolve_precision(spec.precision, ctx.device)
    autocast = autocast_factory(precision, ctx.device)
    events = EventLog(out_dir, enabled=ctx.is_main)

    # find where to start: the newest complete checkpoint when resuming, else a clean directory
    if ctx.is_main:
        ckpt.remove_partial(out_dir)
    distributed.barrier(ctx)
    start = ckpt.newest_resumable(out_dir) if resume else None
    if not resume and ckpt.list_checkpoints(out_dir):
        raise SpecError(
            f"the output directory {out_dir} already holds checkpoints; pass --resume to "
            "continue that job, or use a new directory"
        )
    if resume and start is None:
        events.message("no checkpoint to resume from; starting from the beginning")
    where = f"from checkpoint step {start.step}" if start else "from the beginning"
    events.message(
        f"fine-tuning {spec.name_of(spec.model)} for {task} on {ctx.device} ({precision}, "
        f"{ctx.world_size} process{'es' if ctx.world_size > 1 else ''}), {where}",
        step=start.step if start else 0,
    )

    # read the data (each rank extracts archives into its own work directory)
    seed_everything(spec.seed)
    saved_classes = start.info.get("labels") if start else None
    splits = prepare_data(
        spec.data,
        task,
        spec.seed,
        work_dir,
        classes=saved_classes,
        max_train=spec.limits.max_train_samples,
        max_eval=spec.limits.max_eval_samples,
    )
    assert splits.train is not None
    if cancel.is_set():
        events.message("cancelled before training started")
        return JobResult("cancelled", start.step if start else 0)

    # load the model (converting it when asked), or the checkpoint being resumed
    job = load_job_model(
        str(start.path) if start else spec.model,
        task=task,
        classes=splits.classes,
        revision=None if start else spec.revision,
        pretrained=True if start else spec.pretrained,
        trust_remote_code=spec.trust_remote_code,
        conversion=None if start else spec.conversion,
    )
    model = job.model.to(ctx.device)

    # preprocess with the model's own tokenizer or image pipeline
    pre = Preprocessor(
        model, job.library, task, job.processor, job.data_config, spec.model, spec.data.max_length
    )
    train_set = pre.dataset(splits.train, splits.classes)
    valid_set = pre.dataset(splits.validation, splits.classes) if splits.validation else None
    per_rank = hp.batch_size // ctx.world_size

    # a calibrated conversion waits for a batch of the data; then report it and check the head
    if start is None and spec.conversion is not None and spec.conversion.calibrate:
        if not job.converted:
            convert_job_model(job, spec.conversion, calibration_batch(train_set, pre, ctx))
        model = job.model.to(ctx.device)
    if job.report is not None:
        events.message(_conversion_summary(job.report))
    conversion_report = job.report or (start.info.get("conversion") if start else None)
    counts = parameter_counts(model)
    events.message(
        f"model: {counts['parameters']:,} parameters, {counts['gmnm_parameters']:,} of them GMNM"
    )
    _check_outputs(job, model, train_set, pre, per_rank, ctx)
    events.message(
        f"data: {len(train_set)} training {_unit(task)}, "
        f"{len(valid_set) if valid_set else 0} validation"
        + (f", classes {', '.join(splits.classes[:10])}" if splits.classes else "")
        + (" ..." if splits.classes and len(splits.classes) > 10 else "")
    )

    # optimizer, schedule and loss scaler
    gmnm_names = gmnm_parameter_names(model)
    if hp.gmnm_only_steps and not gmnm_names:
        raise SpecError(
            "hyperparameters.gmnm_only_steps: the model has no GMNM parameters to train alone; "
            "add a conversion to the spec or set gmnm_only_steps to 0"
        )
    optimizer = torch.optim.AdamW(parameter_groups(model, gmnm_names, hp), lr=hp.learning_rate)
    order = BatchOrder(len(train_set), hp.batch_size, spec.seed)
    steps_per_epoch = order.batches_per_epoch // hp.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise DataError(
            f"{splits.train.source}: {len(train_set)} training {_unit(task)} are fewer "
            f"than one optimizer step needs (batch_size {hp.batch_size} x "
            f"gradient_accumulation_steps {hp.gradient_accumulation_steps}); lower them or add data"
        )
    total_steps = hp.max_steps or hp.epochs * steps_per_epoch
    if spec.limits.max_steps is not None and total_steps > spec.limits.max_steps:
        # an explicit max_steps over the limit was refused with the spec; epochs meet it here
        raise SpecError(
            f"hyperparameters.epochs: {hp.epochs} epochs of {steps_per_epoch} optimizer steps "
            f"are {total_steps} steps, above this job's limit of {spec.limits.max_steps} "
            "(limits.max_steps); ask for fewer epochs or set hyperparameters.max_steps"
        )
    warmup = hp.warmup_steps or int(hp.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup))
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    # restore the training state of the checkpoint being resumed
    step, trained_samples, trained_tokens = 0, 0, 0
    state: dict[str, Any] | None = None
    if start is not None:
        state = ckpt.read_training_state(start)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        order.load_state_dict(state["data_order"])
        step = int(state["step"])
        trained_samples, trained_tokens = (
            int(state["trained_samples"]),
            int(state["trained_tokens"]),
        )
        if step >= total_steps:
            events.message(f"checkpoint step {step} already reached the last step {total_steps}")

    # wrap for data parallelism, then put every generator where the run left it
    train_model: nn.Module = model
    if ctx.enabled:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=device_ids)
    if state is not None and len(state["rng"]) == ctx.world_size:
        set_rng_state(state["rng"][ctx.rank])
    else:
        if state is not None:
            events.message(
                "the checkpoint's RNG state is for another number of processes; reseeding"
            )
        seed_everything(spec.seed + ctx.rank + step)
    model.train()

    # the training loop
    feeder = BatchFeeder(train_set, order, pre.collate, ctx, _loader_workers(ctx))
    progress = Progress(total_steps, step, ctx.is_main)
    window = _Window()
    history: dict[str, Any] = {"train_loss": None, "evaluated_step": None, "evaluation": {}}
    last_checkpoint = start.step if start else None
    deadline = started + spec.limits.max_minutes * 60 if spec.limits.max_minutes else None
    stop_reason = None
    gmnm_only_announced = step >= hp.gmnm_only_steps

    def evaluate_now(at_step: int) -> dict[str, float]:
        if valid_set is None:
            return {}
        if history["evaluated_step"] != at_step:
            metrics = evaluate(
                model,
                job.library,
                task,
                valid_set,
                pre.collate,
                per_rank,
                ctx,
                autocast,
                len(splits.classes) if splits.classes else None,
            )
            history["evaluated_step"], history["evaluation"] = at_step, metrics
            events.metrics(
                at_step,
                {f"valid_{k}": v for k, v in metrics.items()},
                f"step {at_step}/{total_steps} evaluation: " + _format(metrics),
                total_steps=total_steps,
                epoch=trained_samples / len(train_set),
            )
        return dict(history["evaluation"])

    def checkpoint_now(at_step: int, reason: str, metrics: dict[str, Any]) -> None:
        nonlocal last_checkpoint
        training_state = {
            "step": at_step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "data_order": order.state_dict(),
            "trained_samples": trained_samples,
            "trained_tokens": trained_tokens,
            "rng": distributed.gather_objects(rng_state(), ctx),
        }
        info = {
            "metrics": metrics,
            "reason": reason,
            "task": task,
            "labels": splits.classes,
            "total_steps": total_steps,
            "epoch": round(trained_samples / len(train_set), 4),
            "model": spec.name_of(spec.model),
            "converted": job.converted,
            "conversion": conversion_report,
        }
        outcome: object = None
        if ctx.is_main:
            try:
                ckpt.write_checkpoint(
                    out_dir, at_step, lambda d: save_model(model, d), info, training_state
                )
            except Exception as error:  # every rank must learn that the write failed
                outcome = error
        outcome = distributed.broadcast_object(outcome, ctx)
        if isinstance(outcome, Exception):
            raise outcome
        last_checkpoint = at_step
        events.message(f"checkpoint step-{at_step} written ({reason})", step=at_step)

    while step < total_steps:
        stop_reason = _agree_to_stop(cancel, deadline, ctx)
        if stop_reason:
            break
        if not gmnm_only_announced and step + 1 > hp.gmnm_only_steps:
            events.message("GMNM-only phase over: training every parameter from now on", step=step)
            gmnm_only_announced = True

        # one optimizer step over gradient_accumulation_steps micro-batches
        tick = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        micro_losses = []
        hits = torch.zeros(2, device=ctx.device)  # right predictions, examples (classification)
        step_tokens = 0
        for micro in range(hp.gradient_accumulation_steps):
            batch = to_device(feeder.next(), ctx.device)
            last_micro = micro == hp.gradient_accumulation_steps - 1
            sync = nullcontext() if last_micro or not ctx.enabled else train_model.no_sync()  # type: ignore[operator]
            with sync:
                with autocast():
                    logits = forward(train_model, job.library, batch)
                loss, _, predictions = loss_and_stats(task, logits, batch["labels"])
                scaler.scale(loss / hp.gradient_accumulation_steps).backward()
            micro_losses.append(loss.detach().float())
            if task != "causal-lm":
                hits[0] += (predictions == batch["labels"]).sum()
                hits[1] += batch["labels"].numel()
            step_tokens += _batch_tokens(batch, task) * ctx.world_size

        # the step's loss (a mean over ranks) and right predictions (a sum), in one reduction
        step_figures = torch.cat([torch.stack(micro_losses).mean().reshape(1), hits])
        distributed.all_reduce(step_figures, ctx)
        loss_value = float(step_figures[0]) / ctx.world_size
        if not math.isfinite(loss_value):
            raise DivergedError(
                f"the training loss became {loss_value} at step {step + 1}; lower "
                "learning_rate or gmnm_learning_rate, or use fp32/bf16 instead of fp16"
            )
        if step < hp.gmnm_only_steps:  # only the GMNM parameters move in the first phase
            for name, parameter in model.named_parameters():
                if name not in gmnm_names:
                    parameter.grad = None
        scaler.unscale_(optimizer)
        grad_norm = None
        if hp.max_grad_norm is not None:
            with_grad = [p for p in model.parameters() if p.grad is not None]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(with_grad, hp.max_grad_norm))
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        samples = hp.batch_size * hp.gradient_accumulation_steps
        trained_samples += samples
        trained_tokens += step_tokens
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        window.losses.append(loss_value)
        window.correct += int(step_figures[1])
        window.predicted += int(step_figures[2])
        window.samples += samples
        window.tokens += step_tokens
        window.seconds += time.perf_counter() - tick
        history["train_loss"] = loss_value
        progress.update(step, loss_value)

        # log, evaluate and checkpoint on their intervals
        if step % hp.log_interval == 0 or step == total_steps:
            _log_training(
                events,
                window,
                step,
                total_steps,
                optimizer,
                grad_norm,
                task,
                ctx,
                trained_samples,
                trained_tokens,
                len(train_set),
            )
        if hp.eval_interval and step % hp.eval_interval == 0 and step < total_steps:
            evaluate_now(step)
        if hp.checkpoint_interval and step % hp.checkpoint_interval == 0 and step < total_steps:
            checkpoint_now(step, "interval", _prefixed(evaluate_now(step), history))
        if on_step is not None:
            on_step(step)
    progress.close()

    # a cancelled job keeps its progress in a checkpoint and stops without evaluating
    if stop_reason == "cancelled":
        if step > 0 and last_checkpoint != step:
            checkpoint_now(step, "cancelled", {"train_loss": history["train_loss"]})
        events.message(f"cancelled at step {step}", step=step)
        return JobResult("cancelled", step)
    if stop_reason == "time_limit":
        events.message(f"stopping at step {step}: max_minutes reached", step=step)

    # final evaluation, checkpoint, metrics, curves and result
    final_metrics = _prefixed(evaluate_now(step), history)
    if last_checkpoint != step:
        checkpoint_now(step, "final", final_metrics)
    if ctx.is_main:
        metrics_out = {"step": step, **final_metrics}
        ckpt.write_json_atomic(out_dir / METRICS_FILE, metrics_out)
        plot_curves(out_dir / EVENTS_FILE, out_dir / CURVES_FILE)
        ckpt.write_json_atomic(
            out_dir / RESULT_FILE,
            {
                "task": task,
                "labels": splits.classes,
                "steps": step,
                "total_steps": total_steps,
                "stopped_by": stop_reason,
                "final_checkpoint": str(ckpt.checkpoint_dir(out_dir, step).relative_to(out_dir)),
                "metrics": final_metrics,
                "trained_samples": trained_samples,
                "trained_tokens": trained_tokens,
                "converted": job.converted,
                "conversion": conversion_report,
                **counts,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
    events.message(f"done at step {step}: " + _format(final_metrics), step=step)
    events.close()
    return JobResult("succeeded", step, final_metrics)


# ---------------------------------------------------------------------------------------------
# helpers of the recipe


def _loader_workers(ctx: distributed.DistContext) -> int:
    # On CPU the data loading competes with the model for the same cores.
    return 2 if ctx.device.type == "cuda" else 0


def _unit(task: str) -> str:
    return "blocks" if task == "causal-lm" else "examples"


def calibration_batch(
    dataset: ExampleDataset, pre: Preprocessor, ctx: distributed.DistContext, size: int = 32
) -> Batch:
    """The first examples of a split as one batch on the device: the same on every rank, so that
    every rank's calibrated modules start equal."""
    items = [dataset[i] for i in range(min(size, len(dataset)))]
    batch = to_device(pre.collate(items), ctx.device)
    return {key: value for key, value in batch.items() if key != "labels"}


def _check_outputs(
    job: JobModel,
    model: nn.Module,
    dataset: ExampleDataset,
    pre: Preprocessor,
    batch_size: int,
    ctx: distributed.DistContext,
) -> None:
    """Run one batch before training, so that a model unfit for the task fails here."""
    sample = [dataset[i] for i in range(min(batch_size, 2))]
    model.eval()
    with torch.no_grad():
        logits = forward(model, job.library, to_device(pre.collate(sample), ctx.device))
    model.train()
    check_head(job, logits)


def _agree_to_stop(
    cancel: CancelToken, deadline: float | None, ctx: distributed.DistContext
) -> str | None:
    """Every rank stops at the same step: the flags are reduced across ranks."""
    flags = torch.tensor(
        [float(cancel.is_set()), float(deadline is not None and time.monotonic() > deadline)],
        device=ctx.device,
    )
    distributed.all_reduce(flags, ctx, op="max")
    if flags[0] > 0:
        return "cancelled"
    if flags[1] > 0:
        return "time_limit"
    return None


def _prefixed(evaluation: dict[str, float], history: dict[str, Any]) -> dict[str, Any]:
    metrics: dict[str, Any] = {"train_loss": history["train_loss"]}
    metrics.update({f"valid_{key}": value for key, value in evaluation.items()})
    return metrics


def _format(metrics: dict[str, Any]) -> str:
    shown = []
    for key, value in metrics.items():
        if isinstance(value, float):
            shown.append(f"{key} {value:.4g}")
        elif value is not None:
            shown.append(f"{key} {value}")
    return ", ".join(shown) or "no validation data"


def _log_training(
    events: EventLog,
    window: _Window,
    step: int,
    total_steps: int,
    optimizer: torch.optim.Optimizer,
    grad_norm: float | None,
    task: str,
    ctx: distributed.DistContext,
    trained_samples: int,
    trained_tokens: int,
    train_size: int,
) -> None:
    rates = {
        group.get("name", str(i)): group["lr"] for i, group in enumerate(optimizer.param_groups)
    }
    seconds = max(window.seconds, 1e-9)
    values: dict[str, float | int | None] = {
        "train_loss": float(np.mean(window.losses)) if window.losses else None,
        "learning_rate": rates.get("decay", rates.get("no_decay")),
        "gmnm_learning_rate": rates.get("gmnm"),
        "grad_norm": grad_norm,
        "samples_per_second": window.samples / seconds,
        "peak_memory_mb": peak_memory_mb(ctx.device),
        "trained_samples": trained_samples,
    }
    if task != "image-classification":
        values["tokens_per_second"] = window.tokens / seconds
        values["trained_tokens"] = trained_tokens
    if window.predicted:  # classification: the interval's training batches, all ranks
        values["train_accuracy"] = window.correct / window.predicted
    accuracy = f"accuracy {values['train_accuracy']:.3f} " if "train_accuracy" in values else ""
    message = (
        f"step {step}/{total_steps} loss {values['train_loss']:.4f} {accuracy}"
        f"lr {values['learning_rate'] or 0:.3g} {values['samples_per_second']:.1f} samples/s "
        f"{values['peak_memory_mb']:.0f} MB"
    )
    events.metrics(step, values, message, total_steps, trained_samples / train_size)
    window.reset()


def _conversion_summary(report: dict[str, Any]) -> str:
    replaced = report.get("sites_replaced", {})
    sites = ", ".join(f"{count} {kind}" for kind, count in replaced.items()) or "no sites"
    return (
        f"converted: {sites} replaced, {report.get('params_added', 0):,} parameters added, "
        f"max output difference {report.get('max_abs_diff', float('nan')):.3g}"
    )

"""What a job process leaves in its output directory, and how it exits.

The training engine writes this layout; the service's supervisor reads it. Both import the names
from here so that neither side can drift from the other.

    OUT/
      events.jsonl          one JSON object per line (see `Event`), appended and flushed per event
      checkpoints/step-N/   complete checkpoints only (written under a temporary name, renamed)
      checkpoints/step-N/checkpoint.json   {"step", "metrics", "created_at"} for that checkpoint
      metrics.json          the final evaluation
      result.json           what the job produced besides checkpoints (plan and report for a
                            conversion, both metric sets for an evaluation)
      curves.png            training/validation curves (fine-tunes)
      error.json            {"code", "message"} when the job failed
      CANCEL                created by whoever wants the job to stop between steps

What the engine puts in them (beyond the fields above):

- training metrics events: values `train_loss`, `learning_rate`, `gmnm_learning_rate`,
  `grad_norm`, `samples_per_second`, `peak_memory_mb`, `trained_samples`, and for text tasks
  `tokens_per_second` and `trained_tokens`; evaluation events: the evaluation's metrics prefixed
  `valid_` (`valid_loss`, `valid_accuracy`, `valid_macro_f1`, `valid_samples` for
  classification; `valid_loss`, `valid_perplexity`, `valid_token_accuracy`, `valid_tokens` for
  causal LM). An evaluation job's metrics event carries the same names without the prefix.
- checkpoint.json: also `reason` (interval, final, cancelled, conversion), `task`, `labels` (class
  names in head order), `total_steps`, `epoch`, `model` (the spec's reference), `converted`, and
  `conversion` (the conversion report); its `metrics` are `train_loss` and the `valid_*` values
  of that checkpoint's weights (`train_loss` alone for a cancelled job's checkpoint).
- metrics.json: a fine-tune's `step`, `train_loss` and final `valid_*` values; an evaluation's
  metrics of `spec.model`, unprefixed.
- TRAINING_STATE_FILE inside a fine-tune's checkpoint is the engine's own resume state (a torch
  file); leave it out of anything a user downloads.

Exit statuses: `EXIT_OK`, `EXIT_FAILED` (error.json says why), `EXIT_INVALID` (the spec or the
data was refused before any work; error.json says which field or line), `EXIT_CANCELLED`
(stopped on request after writing a checkpoint).
"""

from __future__ import annotations

EVENTS_FILE = "events.jsonl"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
CHECKPOINT_INFO_FILE = "checkpoint.json"
METRICS_FILE = "metrics.json"
RESULT_FILE = "result.json"
CURVES_FILE = "curves.png"
ERROR_FILE = "error.json"
CANCEL_FILE = "CANCEL"
SPEC_FILE = "spec.json"
TRAINING_STATE_FILE = "training_state.pt"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_CANCELLED = 3

# Event types: a human-readable line, or numbers. Every event has "type", "time" (Unix seconds),
# "step" (int or null) and "message" (str); metrics events add "values" ({name: number}) and,
# during training, "total_steps" and "epoch" so that progress can be derived from the newest one.
EVENT_MESSAGE = "message"
EVENT_METRICS = "metrics"

# Error codes a job writes to error.json, each one a user can act on.
ERROR_CODES = (
    "invalid_spec",  # a field of the spec was refused
    "invalid_data",  # the data could not be read (the message names the file and line)
    "model_not_found",  # the model reference resolves to nothing here
    "unsupported_model",  # the model loads but cannot be converted or trained for the task
    "remote_code_refused",  # the model needs trust_remote_code and the operator has not allowed it
    "out_of_memory",  # the device ran out of memory (lower batch_size)
    "disk_full",  # no space left to write a checkpoint (earlier checkpoints are intact)
    "diverged",  # the loss became NaN or infinite
    "internal_error",  # a bug: the message carries the exception
)

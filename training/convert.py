"""The conversion recipe: load, plan, convert, save to `checkpoints/step-0/`.

`result.json` holds the plan and the conversion report; a dry run writes the plan alone and no
checkpoint. The saved directory is what `surgery.load` opens and what a fine-tune or an
evaluation accepts as its model.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import surgery
from training.checkpoint import checkpoint_dir, write_checkpoint, write_json_atomic
from training.errors import SpecError
from training.events import EventLog
from training.finetune import JobResult
from training.models import save_model
from training.protocol import RESULT_FILE
from training.runtime import CancelToken, seed_everything
from training.spec import ConvertSpec

logger = logging.getLogger(__name__)


def run_conversion(
    spec: ConvertSpec,
    out_dir: Path,
    *,
    resume: bool = False,
    cancel: CancelToken | None = None,
) -> JobResult:
    """Run a conversion job (short: a resumed one simply runs again)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cancel = cancel or CancelToken(out_dir)
    events = EventLog(out_dir)
    started = time.monotonic()
    seed_everything(spec.seed)

    # load the model as the spec describes it
    loaded = surgery.load_model(
        spec.model,
        pretrained=spec.pretrained,
        revision=spec.revision,
        task=spec.task,
        trust_remote_code=spec.trust_remote_code,
        num_labels=spec.num_labels,
    )
    if loaded.converted:
        raise SpecError(
            f"model: {spec.model!r} is already converted; convert the original model instead"
        )
    events.message(
        f"loaded {spec.name_of(spec.model)} ({loaded.library}, revision {loaded.revision or '-'})"
    )

    # plan: which sites would be replaced
    conversion = spec.conversion
    plan = surgery.plan(
        loaded.model,
        targets=tuple(conversion.targets),
        include=conversion.include,
        exclude=conversion.exclude,
    )
    plan_dict = plan.to_dict()
    sites = plan_dict.get("sites", [])
    chosen = sum(1 for site in sites if site.get("replace"))
    events.message(f"plan: {chosen} of {len(sites)} sites will be replaced")
    if spec.dry_run or cancel.is_set():
        write_json_atomic(out_dir / RESULT_FILE, {"dry_run": spec.dry_run, "plan": plan_dict})
        events.message("dry run: plan written, nothing converted" if spec.dry_run else "cancelled")
        events.close()
        return JobResult("succeeded" if spec.dry_run else "cancelled", 0)

    # convert and save as checkpoint step-0
    report = surgery.convert(loaded.model, plan, conversion.gmnm.to_config()).to_dict()
    events.message(
        f"converted: {report.get('params_added', 0):,} parameters added, max output difference "
        f"{report.get('max_abs_diff', float('nan')):.3g}"
    )
    info = {
        "metrics": {},
        "reason": "conversion",
        "task": spec.task,
        "labels": None,
        "model": spec.name_of(spec.model),
        "converted": True,
        "conversion": report,
    }
    write_checkpoint(out_dir, 0, lambda d: save_model(loaded.model, d), info)
    write_json_atomic(
        out_dir / RESULT_FILE,
        {
            "dry_run": False,
            "plan": plan_dict,
            "report": report,
            "checkpoint": str(checkpoint_dir(out_dir, 0).relative_to(out_dir)),
            "seconds": round(time.monotonic() - started, 3),
        },
    )
    events.message("conversion saved to checkpoints/step-0", step=0)
    events.close()
    return JobResult("succeeded", 0)

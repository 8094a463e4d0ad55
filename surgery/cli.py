"""`gmnm convert`: load a model, plan, convert and save it from the command line.

    gmnm convert MODEL --out DIR [--targets activation,softmax] [--include PATTERN]
        [--exclude PATTERN] [--components K] [--init residual|fit|random] [--groups N|channel]
        [--calibrate] [--no-pretrained] [--dry-run] [--json]

The plan is printed as a table (or, with --json, the plan and report as one JSON object on
stdout); progress goes to the log.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2


def register(subparsers: Any) -> None:
    """Add the `convert` subcommand to the `gmnm` command's subparsers."""
    parser = subparsers.add_parser(
        "convert",
        help="replace a model's activations and attention softmax with GMNM modules",
        description=(
            "Load MODEL (a Hugging Face id, a timm name, or a local directory), list its sites, "
            "replace them with GMNM modules and save the result to --out (load it again with "
            "surgery.load). Residual initialisation leaves the outputs unchanged."
        ),
    )
    parser.add_argument("model", help="Hugging Face id, timm name, hf-hub: name, or directory")
    parser.add_argument("--out", help="directory to write the converted model to")
    parser.add_argument(
        "--targets",
        default="activation,softmax",
        help="kinds of site to replace, comma-separated, from activation, softmax, gate, head "
        "(default activation,softmax)",
    )
    parser.add_argument(
        "--include", action="append", metavar="PATTERN", help="only sites matching this glob"
    )
    parser.add_argument(
        "--exclude", action="append", metavar="PATTERN", help="skip sites matching this glob"
    )
    parser.add_argument(
        "--components", type=int, default=8, help="Gaussian components per mixture (default 8)"
    )
    parser.add_argument(
        "--init", choices=("residual", "fit", "random"), default="residual", help="initialisation"
    )
    parser.add_argument(
        "--groups",
        default="1",
        help='parameter sets per activation along its channels: 1, a divisor, or "channel"',
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="centre the components (and fit, with --init fit) on the values a probe batch gives",
    )
    parser.add_argument(
        "--no-pretrained", action="store_true", help="random weights from the config alone"
    )
    parser.add_argument("--revision", help="branch, tag or commit of a Hugging Face repository")
    parser.add_argument("--task", help="transformers head: image-classification, ...")
    parser.add_argument("--num-labels", type=int, help="size of the classification head")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow the repository's own model code"
    )
    parser.add_argument(
        "--share-calls",
        action="store_true",
        help="one parameter set for an activation module called several times per forward",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gmnm import GMNMConfig
    from surgery import (
        KINDS,
        RemoteCodeRefusedError,
        SurgeryError,
        UnknownModelError,
        UnmatchedPatternError,
        UnsupportedModelError,
        convert,
        example_inputs,
        load_model,
        plan,
        save,
    )

    problems = _option_problems(args, KINDS)
    if problems:
        logger.error("invalid options: %s", "; ".join(problems))
        return EXIT_INVALID
    targets = _targets(args.targets)
    groups = _groups(args.groups)
    assert groups is not None
    config = GMNMConfig(num_components=args.components, init=args.init)
    try:
        loaded = load_model(
            args.model,
            pretrained=not args.no_pretrained,
            revision=args.revision,
            task=args.task,
            trust_remote_code=args.trust_remote_code,
            num_labels=args.num_labels,
        )
        found = plan(
            loaded.model,
            targets=targets,
            include=args.include,
            exclude=args.exclude,
            config=config,
        )
        if args.dry_run:
            _write(found.to_dict() if args.json else found.table(), args.json)
            return EXIT_OK
        report = convert(
            loaded.model,
            found,
            config,
            share_calls=args.share_calls,
            groups=groups,
            calibration_inputs=example_inputs(loaded) if args.calibrate else None,
        )
        out = save(loaded.model, args.out)
    except (
        UnknownModelError,
        UnsupportedModelError,
        RemoteCodeRefusedError,
        UnmatchedPatternError,
    ) as error:
        logger.error("%s", error)
        return EXIT_INVALID
    except SurgeryError as error:
        logger.error("%s", error)
        return EXIT_FAILED
    if args.json:
        _write({"plan": found.to_dict(), "report": report.to_dict(), "out": str(out)}, True)
    else:
        _write(found.table(), False)
        summary = report.to_dict()
        lines = [
            f"replaced: {summary['sites_replaced']}; parameters added: {summary['params_added']}",
            f"max abs diff on the probe batch: {summary['max_abs_diff']:.3g}; audit findings: "
            f"{len(summary['audit'])}; {summary['seconds']:.2f}s",
            f"saved to {out}",
        ]
        _write("\n".join(lines), False)
    return EXIT_OK


def _targets(text: str) -> list[str]:
    return [kind.strip() for kind in text.split(",") if kind.strip()]


def _groups(text: str) -> int | str | None:
    """--groups as convert takes it, or None when it is neither "channel" nor a positive int."""
    if text == "channel":
        return text
    try:
        groups = int(text)
    except ValueError:
        return None
    return groups if groups >= 1 else None


def _option_problems(args: argparse.Namespace, kinds: tuple[str, ...]) -> list[str]:
    """Every problem with the options, each naming its flag, so that all are reported at once."""
    problems = []
    if not args.dry_run and not args.out:
        problems.append("--out is required to save the converted model (or use --dry-run)")
    targets = _targets(args.targets)
    unknown = [kind for kind in targets if kind not in kinds]
    if unknown or not targets:
        problems.append(
            f"--targets {args.targets!r} names unknown kinds {unknown}; valid kinds are "
            f"{', '.join(kinds)}"
        )
    if args.components < 1:
        problems.append(
            f"--components must be at least 1 (Gaussian components per mixture), got "
            f"{args.components}"
        )
    if _groups(args.groups) is None:
        problems.append(
            f'--groups must be 1, a larger number of groups or "channel", got {args.groups!r}'
        )
    if args.num_labels is not None and args.num_labels < 1:
        problems.append(f"--num-labels must be at least 1, got {args.num_labels}")
    return problems


def _write(content: Any, as_json: bool) -> None:
    text = json.dumps(content, indent=2, default=str) if as_json else str(content)
    sys.stdout.write(text + "\n")

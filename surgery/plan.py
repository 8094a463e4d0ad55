"""The plan: every site of a model, found before anything changes.

A site is a place where a nonlinearity runs: an activation or softmax module (found by walking
the module tree and matched by exact class), or a functional call inside some module's `forward`
(found by one traced forward pass on probe inputs). Each site says whether the conversion will
replace it and, when not, why.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from gmnm import GMNMConfig
from surgery.errors import ConversionError, UnmatchedPatternError, UnsupportedModelError
from surgery.registry import (
    ACTIVATION,
    GATE,
    HEAD,
    KINDS,
    OP_FAMILIES,
    SOFTMAX,
    SOFTMAX_CLASSES,
    class_name,
    is_head_path,
    module_kind,
)
from surgery.trace import (
    ModuleRecord,
    Trace,
    call_site_path,
    fingerprint,
    is_gmnm_module,
    trace_model,
)

logger = logging.getLogger(__name__)

# How a site is reached: its module is swapped ("module"), its call inside the owner's forward
# is routed ("forward"), or the transformers attention function routes it ("attention").
ROUTE_MODULE = "module"
ROUTE_FORWARD = "forward"
ROUTE_ATTENTION = "attention"


@dataclass
class Site:
    """One place where a nonlinearity runs.

    `path` is the module path for module sites and `owner:op#index` for a functional call (the
    index-th call of that op family within one call of the owner's forward). `shared` marks an
    activation module called from several places; the conversion then gives each call its own
    parameters (or one set, with `share_calls=True`). `callers` holds the modules whose forward
    calls it, each with the most calls within one call of that module: the conversion gives each
    of those calls its own parameters. A module registered at several paths becomes one module
    per path and which path a caller goes through is not traced, so there `callers` only names
    a single caller above the path.
    """

    path: str
    kind: str
    implementation: str
    replace: bool = True
    reason: str | None = None
    shared: bool = False
    route: str = ROUTE_MODULE
    owner: str = ""
    op: str | None = None
    index: int = 0
    calls: int = 0
    calls_per_caller: int = 1
    caller: str | None = None
    callers: dict[str, int] = field(default_factory=dict)
    shape: list[int] | None = None
    heads: int | None = None
    dim: int | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    check_frames: bool = False
    params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Site:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def key(self) -> tuple[str, str, int]:
        """What the audit matches a run call against: (module path, op family, call index)."""
        return (self.owner, self.op or "module", self.index)


@dataclass
class Plan:
    sites: list[Site]
    targets: tuple[str, ...]
    include: list[str] | None = None
    exclude: list[str] | None = None
    config: GMNMConfig = field(default_factory=GMNMConfig)
    model_class: str = ""
    # attention layers routed through the transformers registry -> their family's eager function
    attention_functions: dict[str, Any] = field(default_factory=dict, repr=False)
    # the probe and what the model returned on it while planning (attention unfused and eager,
    # as the conversion computes it), so that convert need not run the original again
    probe: Any = field(default=None, repr=False)
    reference: Any = field(default=None, repr=False)
    model_fingerprint: tuple[tuple[int, int], ...] = field(default=(), repr=False)

    @property
    def replaced(self) -> list[Site]:
        return [site for site in self.sites if site.replace]

    def summary(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for site in self.sites:
            entry = counts.setdefault(site.kind, {"found": 0, "replace": 0})
            entry["found"] += 1
            entry["replace"] += int(site.replace)
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_class": self.model_class,
            "targets": list(self.targets),
            "include": self.include,
            "exclude": self.exclude,
            "num_components": self.config.num_components,
            "summary": self.summary(),
            "params_to_add": sum(site.params for site in self.replaced),
            "sites": [site.to_dict() for site in self.sites],
        }

    def table(self) -> str:
        """The plan as a fixed-width text table, one site per line."""
        rows = [("path", "kind", "replace", "params", "implementation / reason")]
        for site in self.sites:
            note = site.implementation if site.replace else f"{site.implementation}: {site.reason}"
            if site.shared:
                note += f" (shared: {_calls_note(site)})"
            rows.append(
                (site.path, site.kind, "yes" if site.replace else "no", str(site.params), note)
            )
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True))
            + "  "
            + row[4]
            for row in rows
        ]
        totals = ", ".join(
            f"{kind}: {c['replace']}/{c['found']}" for kind, c in self.summary().items()
        )
        params = sum(site.params for site in self.replaced)
        lines.append(
            f"sites replaced/found per kind: {totals or 'none'}; parameters to add: {params}"
        )
        return "\n".join(lines)


def plan(
    model: nn.Module,
    targets: Sequence[str] = (ACTIVATION, SOFTMAX),
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    *,
    config: GMNMConfig | None = None,
    probe_inputs: Any = None,
) -> Plan:
    """Find every site of `model` and decide which the conversion replaces.

    Args:
        targets: the kinds to replace: "activation", "softmax", "gate" (sigmoid gates, and
            softmax over other dimensions than attention's), "head" (activations in pooling and
            classification heads).
        include, exclude: glob patterns on site paths (and on the owner module's path for calls
            inside a forward); a site is replaced when its kind is targeted, it matches an include
            pattern (when any is given) and no exclude pattern. An include pattern that matches
            no site raises `UnmatchedPatternError`; an exclude pattern that matches none is
            logged as a warning (it excludes nothing, which changes nothing).
        config: the GMNM settings the conversion will use (for the parameter counts).
        probe_inputs: inputs for the traced forward pass; by default `example_inputs(model)`.
    """
    from surgery.inputs import example_inputs

    config = config or GMNMConfig()
    targets = _check_targets(targets)
    include_list = list(include) if include is not None else None
    exclude_list = list(exclude) if exclude is not None else None
    if any(is_gmnm_module(module) for module in model.modules()):
        raise ConversionError(
            f"{type(model).__name__} already contains GMNM modules; plan the original model, or "
            "use surgery.load to rebuild a converted one from its directory"
        )

    # one forward pass shows which calls happen where
    inputs = probe_inputs if probe_inputs is not None else example_inputs(model)
    try:
        trace = trace_model(model, inputs, discover=True)
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError) as error:
        raise UnsupportedModelError(
            f"{type(model).__name__} failed on the probe inputs ({type(error).__name__}: "
            f"{error}); pass probe_inputs the model accepts (a tensor, a tuple of arguments or a "
            "dict of keyword arguments)"
        ) from error

    task_model = getattr(model, "base_model", model) is not model
    sites = _module_sites(model, trace) + _call_sites(trace, task_model)
    sites += _unreached_attention(model, trace)
    _check_patterns(type(model).__name__, sites, include_list, exclude_list)
    for site in sites:
        _decide(site, targets, include_list, exclude_list)
        site.params = _parameter_count(site, config)
    result = Plan(
        sites=sites,
        targets=targets,
        include=include_list,
        exclude=exclude_list,
        config=config,
        model_class=type(model).__name__,
        attention_functions=dict(trace.attention_functions),
        probe=inputs,
        reference=trace.output,
        model_fingerprint=fingerprint(model),
    )
    logger.info(
        "plan for %s: %d sites, %d to replace",
        type(model).__name__,
        len(result.sites),
        len(result.replaced),
    )
    return result


def _check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = [part.strip() for part in targets.split(",") if part.strip()]
    unknown = [kind for kind in targets if kind not in KINDS]
    if unknown:
        raise ConversionError(
            f"unknown target kind(s) {', '.join(map(repr, unknown))}; valid kinds are "
            f"{', '.join(KINDS)}"
        )
    return tuple(targets)


def _module_sites(model: nn.Module, trace: Trace) -> list[Site]:
    sites: list[Site] = []
    first_path: dict[int, str] = {}
    aliases: dict[int, int] = {}
    named = list(model.named_modules(remove_duplicate=False))
    for path, module in named:
        if module_kind(module) is not None:
            first_path.setdefault(id(module), path)
            aliases[id(module)] = aliases.get(id(module), 0) + 1
    for path, module in named:
        kind = module_kind(module)
        if kind is None or not path:
            continue
        record = trace.modules.get(first_path[id(module)], ModuleRecord())
        site = Site(
            path=path,
            kind=kind,
            implementation=class_name(module),
            owner=path,
            calls=record.calls,
            calls_per_caller=max(record.max_calls_per_caller_call, 1),
            caller=next(iter(record.callers)) if len(record.callers) == 1 else None,
            shape=list(record.shape) if record.shape else None,
        )
        site.shared = (
            aliases[id(module)] > 1 or site.calls_per_caller > 1 or len(record.callers) > 1
        )
        site.callers = _callers(path, record, aliased=aliases[id(module)] > 1)
        if kind == SOFTMAX:
            _classify_softmax(site, getattr(module, "dim", None), record.shape)
        elif kind == ACTIVATION and is_head_path(path):
            site.kind = HEAD
        sites.append(site)
    return sites


def _callers(path: str, record: ModuleRecord, *, aliased: bool) -> dict[str, int]:
    """The callers of a module site whose calls get parameters of their own, in path order."""
    callers = dict(sorted(record.callers.items()))
    if not aliased:
        return callers
    # the module's other paths are sites of their own, and which path a caller goes through is
    # not traced: only a single caller above this path is known to go through it
    caller = next(iter(callers)) if len(callers) == 1 else None
    if caller is not None and (not caller or path.startswith(caller + ".")):
        return callers
    return {}


def _calls_note(site: Site) -> str:
    if len(site.callers) > 1:
        calls = ", ".join(f"{caller or '<model>'} x{n}" for caller, n in site.callers.items())
        return f"called by {calls}"
    return f"{site.calls_per_caller} calls per call of its caller"


def _call_sites(trace: Trace, task_model: bool) -> list[Site]:
    """Sites of functional calls; in a transformers task model, calls made by the root model's
    own forward are head code (DistilBERT's classification head builds `nn.ReLU()` there)."""
    sites: list[Site] = []
    for (owner, family, index), record in sorted(trace.ops.items()):
        kind = OP_FAMILIES[family].kind
        registry_attention = owner in trace.attention_functions and family == "softmax"
        if registry_attention:
            eager = trace.attention_functions[owner]
            implementation = f"softmax in {eager.__module__}.{eager.__name__} (attention registry)"
        elif family == "sdpa":
            implementation = f"scaled_dot_product_attention in {record.owner_class}.forward"
        else:
            implementation = f"{family} call in {record.owner_class}.forward"
        site = Site(
            path=call_site_path(owner, family, index),
            kind=kind,
            implementation=implementation,
            route=ROUTE_ATTENTION if registry_attention else ROUTE_FORWARD,
            owner=owner,
            op=family,
            index=index,
            calls=record.calls,
            shape=list(record.shape) if record.shape else None,
            arguments=dict(record.arguments),
            check_frames=family in trace.nested.get(owner, set()),
        )
        if kind == SOFTMAX:
            dim = record.arguments.get("dim", -1) if family == "softmax" else -1
            _classify_softmax(site, dim, record.shape)
            if family == "sdpa" and record.shape and len(record.shape) == 4:
                site.kind, site.heads, site.dim = SOFTMAX, record.shape[1], -1
        elif kind == ACTIVATION and (is_head_path(owner) or (not owner and task_model)):
            site.kind = HEAD
        sites.append(site)
    return sites


def _runs_attention(module: nn.Module) -> bool:
    """An attention layer whose softmax only shows when it runs: timm's (it has a fused_attn
    switch) or a transformers layer that calls the attention registry."""
    if isinstance(getattr(module, "fused_attn", None), bool):
        return True
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _unreached_attention(model: nn.Module, trace: Trace) -> list[Site]:
    """Attention layers the probe did not run (a decoder's cross-attention, say), listed so that
    they are not skipped silently."""
    sites = []
    for path, module in model.named_modules():
        if path and path not in trace.called and _runs_attention(module):
            sites.append(
                Site(
                    path=call_site_path(path, "softmax", 0),
                    kind=SOFTMAX,
                    implementation=f"attention of {type(module).__name__}",
                    replace=False,
                    reason="not reached by the probe inputs, so its softmax could not be traced; "
                    "pass probe_inputs that run it",
                    route=ROUTE_FORWARD,
                    owner=path,
                    op="softmax",
                )
            )
    return sites


def _classify_softmax(site: Site, dim: int | None, shape: tuple[int, ...] | None) -> None:
    """Attention softmax (over the last dim of scores) or a softmax used as a gate."""
    if shape is None:
        site.kind = SOFTMAX
        site.dim = dim
        site.replace = False
        site.reason = "not reached by the probe inputs, so its shape (head count) is unknown"
        return
    ndim = len(shape)
    site.dim = dim if dim is not None else -1
    if ndim >= 3 and site.dim % ndim == ndim - 1:
        site.kind = SOFTMAX
        site.heads = shape[1] if ndim == 4 else None
    else:
        # channel/radix/spatial softmax (selective kernel, split attention, global context)
        site.kind = GATE
        site.heads = None


def _matched_names(site: Site) -> list[str]:
    """The names include/exclude patterns are matched against: the path, and a call's owner."""
    return [site.path, site.owner] if site.owner != site.path else [site.path]


def _check_patterns(
    model_name: str, sites: list[Site], include: list[str] | None, exclude: list[str] | None
) -> None:
    """Refuse include patterns that match no site; warn about exclude patterns that match none."""
    names = [name for site in sites for name in _matched_names(site)]

    def unmatched(patterns: list[str] | None) -> list[str]:
        return [p for p in patterns or [] if not any(fnmatch.fnmatchcase(n, p) for n in names)]

    examples = ", ".join(repr(site.path) for site in sites[:5]) or "none"
    hint = (
        f"patterns match whole site paths such as {examples}; list every site with "
        "surgery.plan(model).table() or `gmnm convert MODEL --dry-run`"
    )
    missing = unmatched(include)
    if missing:
        raise UnmatchedPatternError(
            f"include pattern(s) {', '.join(map(repr, missing))} match no site of {model_name}, "
            f"so nothing they name would be converted; {hint}"
        )
    for pattern in unmatched(exclude):
        logger.warning("exclude pattern %r matches no site of %s; %s", pattern, model_name, hint)


def _decide(
    site: Site, targets: tuple[str, ...], include: list[str] | None, exclude: list[str] | None
) -> None:
    if not site.replace:  # already refused for a reason of its own
        return
    if site.kind not in targets:
        site.replace = False
        site.reason = (
            f"kind {site.kind!r} is not in targets ({', '.join(targets)}); add {site.kind!r} to "
            "targets to convert it"
        )
        return
    names = _matched_names(site)
    if include is not None and not any(
        fnmatch.fnmatchcase(name, pattern) for name in names for pattern in include
    ):
        site.replace = False
        site.reason = f"matches no include pattern ({', '.join(include)})"
        return
    for pattern in exclude or []:
        if any(fnmatch.fnmatchcase(name, pattern) for name in names):
            site.replace = False
            site.reason = f"excluded by pattern {pattern!r}"
            return


def is_softmax_site(site: Site) -> bool:
    return site.op in ("softmax", "sdpa") or site.implementation in SOFTMAX_CLASSES


def _parameter_count(site: Site, config: GMNMConfig) -> int:
    k = config.num_components
    if is_softmax_site(site):
        return 3 * k * (site.heads or 1)
    per_call = 3 * k + (2 if config.init == "fit" else 0)
    copies = sum(site.callers.values()) if site.shared and site.callers else 1
    return per_call * copies

"""Converting a model: every swap, the routes, and the report that checks the result.

`convert` turns a plan into manifest entries (one per replaced site: the site, its GMNM config
and where its parameters live) and hands them to `apply_entries`, which `surgery.load` also uses
to rebuild a saved model, so a converted model and a reloaded one have the same structure.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gmnm import GMNMActivation, GMNMConfig, GMNMSoftmax
from gmnm.config import MODULE_BASE_PREFIX
from surgery.errors import ConversionError, ManifestError
from surgery.inputs import example_inputs, max_abs_diff
from surgery.plan import ROUTE_ATTENTION, ROUTE_FORWARD, ROUTE_MODULE, Plan, Site, is_softmax_site
from surgery.registry import FunctionalActivation, class_name
from surgery.routing import (
    CONTAINER,
    GMNM_ATTENTION,
    CallSiteActivations,
    Route,
    install_attention_route,
    install_forward_route,
    register_attention,
)
from surgery.trace import eager_attention, evaluation, fingerprint, run_model, trace_model

logger = logging.getLogger(__name__)

STATE_ATTR = "_gmnm_surgery"

# GMNMConfig fields that convert does not take from the config (each site gets its own), and what
# to use instead; a config that changes one of them is refused rather than silently overridden
_SET_PER_SITE = {
    ("base",): "the base of each replaced activation is the activation itself, in residual form; "
    "for a learned linear base fitted to it use init='fit'",
    ("channels", "groups"): "use convert's own groups= argument (a number, or 'channel'); "
    "each site's channels come from the plan",
    ("dim", "heads", "head_dim"): "each softmax site's dimension and head count come from the plan",
    ("extra",): "convert does not read it",
}


@dataclass
class Report:
    """What a conversion did, and the check that it computes what the original did."""

    sites_replaced: dict[str, int]
    sites_kept: dict[str, int]
    params_added: int
    max_abs_diff: float
    audit: list[dict[str, Any]]
    seconds: float
    reference: str
    init: str
    num_components: int
    fit_max_error: float | None = None
    calibrated: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def surgery_state(model: nn.Module) -> dict[str, Any] | None:
    """The conversion record a converted model carries (what the manifest stores), or None."""
    state = getattr(model, STATE_ATTR, None)
    return state if isinstance(state, dict) else None


def is_converted(model: nn.Module) -> bool:
    state = surgery_state(model)
    if state is not None and state.get("sites"):
        return True
    return any(isinstance(m, (GMNMActivation, GMNMSoftmax)) for m in model.modules())


def gmnm_modules(model: nn.Module) -> Iterator[tuple[str, GMNMActivation | GMNMSoftmax]]:
    for name, module in model.named_modules():
        if isinstance(module, (GMNMActivation, GMNMSoftmax)):
            yield name, module


def gmnm_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in `model.named_parameters()`) of the GMNM parameters, for optimizer groups.

    Parameters of a replaced module that lives on as the GMNM module's base (PReLU's slope) belong
    to the base model and are not included.
    """
    names: set[str] = set()
    for prefix, module in gmnm_modules(model):
        for name, _ in module.named_parameters():
            if not name.startswith("base_module."):
                names.add(f"{prefix}.{name}" if prefix else name)
    return names


def convert(
    model: nn.Module,
    plan: Plan,
    config: GMNMConfig | None = None,
    probe_inputs: Any = None,
    *,
    share_calls: bool = False,
    calibration_inputs: Any = None,
    groups: int | str = 1,
) -> Report:
    """Replace every site the plan marks `replace`, in place, and check the result.

    Args:
        config: GMNM settings for every new module: `num_components`, `init`, `init_range`.
            The other fields are set per site (the base of an activation is always the replaced
            activation itself; channels and heads come from the plan; grouping from `groups`),
            and a config that changes one of them is refused. Softmax replacements always start
            in residual form (exact softmax at step 0).
        probe_inputs: the batch the original and converted outputs are compared on (default:
            `example_inputs(model)`).
        groups: parameter sets per activation site along its last (channel) dimension: 1 (one
            per layer), a number dividing every site's channels, or "channel" (one per channel).
        share_calls: give an activation module that its caller calls several times one set of
            parameters instead of one per call.
        calibration_inputs: when given, each new module's components are centred on the
            quantiles of the values it sees on this batch, and `fit` fits each activation over
            the whole range of values it sees there (a little wider), not over `init_range`.

    The reference output is the original model with attention computed unfused and eagerly, the
    computation the GMNM softmax replaces (SDPA differs from it by rounding alone).
    """
    start = time.perf_counter()
    config = config or plan.config
    if is_converted(model):
        raise ConversionError(
            f"{type(model).__name__} is already converted; convert the original model (a "
            "second conversion would wrap GMNM modules in GMNM modules)"
        )
    _check_config(config)
    _check_plan(model, plan)
    _check_groups(plan.replaced, groups)
    ranges: dict[str, tuple[float, float]] = {}
    if calibration_inputs is not None and config.init == "fit":
        ranges = trace_model(model, calibration_inputs, discover=True, record_ranges=True).ranges
    entries = [
        _entry(site, config, share_calls, ranges.get(site.path), groups) for site in plan.replaced
    ]
    attention = _attention_record(model, plan)
    unfused = _unfuse(model, plan)

    # the reference: the original, with attention computed the way the conversion computes it
    probe, reference = _reference(model, plan, probe_inputs)
    if reference is None:
        with eager_attention(model, enabled=bool(attention)), evaluation(model):
            reference = run_model(model, probe)

    # every swap and route
    new_modules = apply_entries(model, entries, attention_functions=plan.attention_functions)
    if attention:
        register_attention()
        model.set_attn_implementation(GMNM_ATTENTION)  # type: ignore[operator]
    for entry, module in zip(entries, new_modules, strict=True):
        entry["config"] = _module_config(module).to_dict()
    kept = [site.to_dict() for site in plan.sites if not site.replace]
    state = {"sites": entries, "kept": kept, "attention": attention, "unfused": unfused}
    setattr(model, STATE_ATTR, {**state, "targets": list(plan.targets)})
    if calibration_inputs is not None:
        calibrate(model, calibration_inputs)

    # the check: same outputs on the probe batch, and nothing left unrouted
    from surgery.audit import audit_run

    findings, converted = audit_run(model, probe)
    report = Report(
        sites_replaced=dict(Counter(site.kind for site in plan.replaced)),
        sites_kept=dict(Counter(site.kind for site in plan.sites if not site.replace)),
        params_added=_count_parameters(model),
        max_abs_diff=max_abs_diff(reference, converted),
        audit=[finding.to_dict() for finding in findings],
        seconds=time.perf_counter() - start,
        reference="original model, attention unfused and eager"
        if attention or unfused
        else "original model",
        init=config.init,
        num_components=config.num_components,
        fit_max_error=_fit_error(new_modules),
        calibrated=calibration_inputs is not None,
    )
    if config.init != "residual" and any(is_softmax_site(s) for s in plan.replaced):
        report.notes.append(
            f"softmax sites start in residual form whatever the init ({config.init!r} applies "
            "to activations)"
        )
    logger.info(
        "converted %s: %s sites, %d parameters, max abs diff %.3g, %d audit findings, %.2fs",
        type(model).__name__,
        report.sites_replaced,
        report.params_added,
        report.max_abs_diff,
        len(findings),
        report.seconds,
    )
    return report


def _fit_error(modules: list[nn.Module]) -> float | None:
    """The largest fit error of the fitted activations (None when nothing was fitted)."""
    errors = [
        m.fit_max_error
        for module in modules
        for m in module.modules()
        if isinstance(m, GMNMActivation) and m.fit_max_error is not None
    ]
    return max(errors) if errors else None


def _reference(model: nn.Module, plan: Plan, probe_inputs: Any) -> tuple[Any, Any]:
    """The probe, and the plan's output on it when still valid for this conversion.

    The plan ran every attention unfused and eagerly; that is the reference only when no softmax
    site is kept (a kept one runs fused again) and the weights have not changed since.
    """
    if probe_inputs is not None and probe_inputs is not plan.probe:
        return probe_inputs, None
    if plan.probe is None:
        return example_inputs(model), None
    reusable = (
        plan.reference is not None
        and plan.model_fingerprint == fingerprint(model)
        and all(site.replace for site in plan.sites if is_softmax_site(site))
    )
    return plan.probe, plan.reference if reusable else None


def _count_parameters(model: nn.Module) -> int:
    named = dict(model.named_parameters())
    return sum(named[name].numel() for name in gmnm_parameter_names(model) if name in named)


def _module_config(module: nn.Module) -> GMNMConfig:
    if isinstance(module, CallSiteActivations):
        first = module.calls[0]
        assert isinstance(first, GMNMActivation)
        return first.config
    assert isinstance(module, (GMNMActivation, GMNMSoftmax))
    return module.config


def _check_config(config: GMNMConfig) -> None:
    """Refuse settings convert would not apply, naming each one and what to use instead."""
    default = GMNMConfig()
    problems = []
    for names, instead in _SET_PER_SITE.items():
        changed = [n for n in names if getattr(config, n) != getattr(default, n)]
        if changed:
            settings = ", ".join(f"{n}={getattr(config, n)!r}" for n in changed)
            problems.append(f"{settings} ({instead})")
    if problems:
        raise ConversionError(
            "convert applies num_components, init and init_range of a GMNMConfig and sets the "
            "other fields per site; leave these at their defaults: " + "; ".join(problems)
        )


def _check_plan(model: nn.Module, plan: Plan) -> None:
    if plan.model_class and plan.model_class != type(model).__name__:
        raise ConversionError(
            f"the plan was made for {plan.model_class}, not {type(model).__name__}; make the "
            "plan with surgery.plan(model) for the model you convert"
        )
    missing = []
    for site in plan.replaced:
        try:
            model.get_submodule(site.owner)
        except AttributeError:
            missing.append(site.path)
    if missing:
        raise ConversionError(
            f"the plan names sites this model does not have: {', '.join(missing[:5])}; make the "
            "plan again for this model"
        )


def _entry(
    site: Site,
    config: GMNMConfig,
    share_calls: bool,
    observed: tuple[float, float] | None,
    groups: int | str,
) -> dict[str, Any]:
    """The manifest entry of one site: the site, the GMNM config, where the module lives."""
    k, init_range = config.num_components, config.init_range
    if observed is not None and observed[1] > observed[0] and not is_softmax_site(site):
        # a fit is only good where it was fitted: cover every value seen, with a margin
        margin = 0.05 * (observed[1] - observed[0])
        init_range = (observed[0] - margin, observed[1] + margin)
    if is_softmax_site(site):
        module_config = GMNMConfig(
            num_components=k,
            base=None,
            dim=site.dim if site.dim is not None else -1,
            heads=site.heads,
            head_dim=1,
            init_range=init_range,
        )
    else:
        channels = site.shape[-1] if groups != 1 and site.shape else None
        count = channels if groups == "channel" else int(groups)
        base_class = (
            site.implementation if site.route == ROUTE_MODULE else class_name(FunctionalActivation)
        )
        module_config = GMNMConfig(
            num_components=k,
            base=MODULE_BASE_PREFIX + base_class,
            init=config.init,
            channels=channels,
            groups=count or 1,
            init_range=init_range,
        )
    per_call = site.route == ROUTE_MODULE and site.shared and not share_calls
    copies = sum(site.callers.values()) if per_call and site.callers else 1
    if site.route == ROUTE_MODULE:
        module_path = site.path
    else:
        prefix = f"{site.owner}." if site.owner else ""
        module_path = f"{prefix}{CONTAINER}.{site.op}_{site.index}"
    return {
        "site": site.to_dict(),
        "config": module_config.to_dict(),
        "module": module_path,
        "copies": copies,
    }


def _check_groups(sites: list[Site], groups: int | str) -> None:
    """Refuse a grouping that cannot apply to some activation site, naming all of them."""
    if groups == 1:
        return
    if groups != "channel" and not (isinstance(groups, int) and groups > 1):
        raise ConversionError(f'groups must be a positive integer or "channel", got {groups!r}')
    problems = []
    for site in sites:
        if is_softmax_site(site):
            continue
        shape = site.shape
        if not shape:
            problems.append(f"{site.path}: not reached by the probe, so its channels are unknown")
        elif len(shape) == 4:
            problems.append(
                f"{site.path}: its input {shape} is not channels-last, so groups along the last "
                "dimension would group image columns"
            )
        elif isinstance(groups, int) and shape[-1] % groups:
            problems.append(f"{site.path}: {shape[-1]} channels are not divisible by {groups}")
    if problems:
        raise ConversionError(
            f"groups={groups!r} gives each group of channels its own parameters, which these "
            "sites cannot take: " + "; ".join(problems) + ". Use groups=1, or exclude them."
        )


def _attention_record(model: nn.Module, plan: Plan) -> dict[str, Any]:
    """What the manifest records about the transformers attention implementation."""
    if not any(site.route == ROUTE_ATTENTION for site in plan.replaced):
        return {}
    config = getattr(model, "config", None)
    return {
        "implementation": GMNM_ATTENTION,
        "original": getattr(config, "_attn_implementation", None),
        "eager": {
            path: f"{fn.__module__}:{fn.__qualname__}"
            for path, fn in plan.attention_functions.items()
        },
    }


def _unfuse(model: nn.Module, plan: Plan) -> list[str]:
    """Turn fused attention off on the owners whose softmax is routed (timm)."""
    paths = []
    for site in plan.replaced:
        if site.route != ROUTE_FORWARD or not is_softmax_site(site):
            continue
        owner = model.get_submodule(site.owner)
        if isinstance(getattr(owner, "fused_attn", None), bool):
            setattr(owner, "fused_attn", False)  # noqa: B010 (nn.Module types it as Tensor)
            paths.append(site.owner)
    return sorted(set(paths))


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """The one place where a module of the model is swapped for another; returns the old one."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    old = parent.get_submodule(name)
    setattr(parent, name, new)
    return old


def _container(owner: nn.Module) -> nn.ModuleDict:
    existing = getattr(owner, CONTAINER, None)
    if existing is None:
        owner.add_module(CONTAINER, nn.ModuleDict())
        existing = getattr(owner, CONTAINER)
    if not isinstance(existing, nn.ModuleDict):
        raise ConversionError(
            f"{type(owner).__name__} already has an attribute {CONTAINER!r}; GMNM modules of its "
            "calls cannot be attached to it"
        )
    return existing


def _placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in model.parameters():
        # GMNM parameters stay fp32 under half-precision models: cast to bf16, large cancelling
        # mixture weights lose their precision
        dtype = tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32
        return tensor.device, dtype
    return torch.device("cpu"), torch.float32


def _build(entry: dict[str, Any], model: nn.Module) -> nn.Module:
    site = Site.from_dict(entry["site"])
    config = GMNMConfig.from_dict(entry["config"])
    if is_softmax_site(site):
        return GMNMSoftmax.from_config(config)
    if site.route == ROUTE_MODULE:
        base = model.get_submodule(site.path)
        if isinstance(base, (GMNMActivation, CallSiteActivations)):
            raise ManifestError(
                f"site {site.path} is listed twice (its module is a GMNM module already); the "
                "manifest was edited or damaged: remove the duplicate entry, or save the model "
                "again from the converted original"
            )
    else:
        base = FunctionalActivation(site.op or "", site.arguments)
    copies = int(entry.get("copies", 1))
    activations = [GMNMActivation.from_config(config, base_module=base) for _ in range(copies)]
    if copies == 1:
        return activations[0]
    callers = _callers(site, copies)
    return CallSiteActivations(activations, list(callers.values()))


def _callers(site: Site, copies: int) -> dict[str, int]:
    """Who calls a site with per-call modules, and how often per call of theirs.

    Manifests from before sites recorded `callers` had per-call modules for a single caller only.
    """
    callers = site.callers or ({site.caller: copies} if site.caller is not None else {})
    if sum(callers.values()) != copies:
        raise ManifestError(
            f"site {site.path} has {copies} per-call modules but its callers {callers} make "
            f"{sum(callers.values())} calls; the manifest was edited or is damaged, save the "
            "model again from the converted original"
        )
    return callers


def apply_entries(
    model: nn.Module,
    entries: list[dict[str, Any]],
    *,
    attention_functions: dict[str, Callable[..., Any]],
) -> list[nn.Module]:
    """Build every entry's GMNM module, put it in place and install the routes it needs."""
    device, dtype = _placement(model)
    built = []
    forward_routes: dict[str, Route] = {}
    attention_routes: dict[str, Route] = {}
    for entry in entries:
        site = Site.from_dict(entry["site"])
        module = _build(entry, model).to(device=device, dtype=dtype)
        built.append(module)
        if site.route == ROUTE_MODULE:
            _replace_module(model, site.path, module)
            if isinstance(module, CallSiteActivations):
                for index, caller in enumerate(_callers(site, len(module.calls))):
                    forward_routes.setdefault(caller, Route()).calls.append((module, index))
            continue
        owner = model.get_submodule(site.owner)
        key = f"{site.op}_{site.index}"
        _container(owner)[key] = module
        routes = attention_routes if site.route == ROUTE_ATTENTION else forward_routes
        route = routes.setdefault(site.owner, Route())
        route.targets.setdefault(site.op or "", {})[site.index] = key
        route.check_frames = route.check_frames or site.check_frames

    for path, eager in attention_functions.items():
        attention_routes.setdefault(path, Route()).eager = eager
    for path, route in attention_routes.items():
        install_attention_route(model.get_submodule(path), route)
    for path, route in forward_routes.items():
        install_forward_route(model.get_submodule(path), route)
    return built


def resolve_eager(reference: str) -> Callable[..., Any]:
    """The eager attention function a manifest names, imported from transformers only."""
    module_name, _, qualname = reference.partition(":")
    if not module_name.startswith("transformers.") or not qualname.endswith("attention_forward"):
        raise ManifestError(
            f"the manifest names {reference!r} as an attention function; only transformers' own "
            "eager attention functions are accepted"
        )
    try:
        function = getattr(importlib.import_module(module_name), qualname)
    except (ImportError, AttributeError) as error:
        raise ManifestError(
            f"the manifest's attention function {reference!r} does not exist in this "
            f"transformers version ({error}); load the model with the version it was saved with"
        ) from error
    return function


def calibrate(model: nn.Module, inputs: Any) -> None:
    """Centre every GMNM module's components on the values it sees on `inputs`."""
    seen: dict[int, Tensor] = {}
    modules = [m for _, m in gmnm_modules(model)]

    def remember(module: nn.Module, args: tuple[Any, ...]) -> None:
        if id(module) not in seen and args and isinstance(args[0], Tensor):
            seen[id(module)] = args[0].detach()

    handles = [m.register_forward_pre_hook(remember) for m in modules]
    try:
        with evaluation(model):
            run_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    for module in modules:
        # fitted activations were fitted over the whole observed range already
        fitted = isinstance(module, GMNMActivation) and module.config.init == "fit"
        if id(module) in seen and not fitted:
            module.calibrate(seen[id(module)])
    logger.info("calibrated %d of %d GMNM modules", len(seen), len(modules))

"""The settings of a GMNM module, as one serialisable dataclass.

The surgery manifest stores a `GMNMConfig` per site with `to_dict()` and rebuilds the module with
`from_dict()`, so every setting that changes what a module computes lives here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

INIT_MODES = ("residual", "fit", "random")

# Names a base activation can be given by; `gmnm.functional.BASE_FUNCTIONS` maps them to functions.
BASE_NAMES = (
    "gelu",
    "gelu_tanh",
    "quick_gelu",
    "relu",
    "relu6",
    "leaky_relu",
    "silu",
    "mish",
    "elu",
    "softplus",
    "hardswish",
    "hardsigmoid",
    "tanh",
    "sigmoid",
    "identity",
)
# Base settings that are not a fixed function: a learned `a*x + c`, or no base at all (None).
LINEAR_BASE = "linear"
MODULE_BASE_PREFIX = "module:"


@dataclass
class GMNMConfig:
    """Every setting of `GMNMActivation` and `GMNMSoftmax`.

    `base` is a name from `BASE_NAMES`, `"linear"`, `None`, or `"module:<class path>"` when the
    replaced activation module itself is the base (the module is then passed separately).
    `groups`/`channels` share one parameter set per group of channels along the last dimension;
    `heads`/`head_dim` give `GMNMSoftmax` one parameter set per attention head.
    """

    num_components: int = 8
    base: str | None = "gelu"
    init: str = "residual"
    channels: int | None = None
    groups: int = 1
    init_range: tuple[float, float] = (-3.0, 3.0)
    dim: int = -1
    heads: int | None = None
    head_dim: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.init_range = (float(self.init_range[0]), float(self.init_range[1]))
        problems = self.problems()
        if problems:
            raise ValueError("invalid GMNMConfig: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every reason this config is invalid, so that all can be reported at once."""
        problems = []
        if not isinstance(self.num_components, int) or self.num_components < 1:
            problems.append(f"num_components must be an integer >= 1, got {self.num_components!r}")
        if self.init not in INIT_MODES:
            problems.append(f"init must be one of {', '.join(INIT_MODES)}; got {self.init!r}")
        if not _valid_base(self.base):
            problems.append(
                f"base must be one of {', '.join(BASE_NAMES)}, {LINEAR_BASE!r}, None, or an "
                f"activation module; got {self.base!r}"
            )
        if self.init == "fit" and self.base in (None, LINEAR_BASE):
            problems.append(
                "init='fit' fits the mixture to the base activation, so base must name an "
                f"activation (e.g. 'gelu'), not {self.base!r}"
            )
        low, high = self.init_range
        if not low < high:
            problems.append(
                f"init_range must be (low, high) with low < high, got {self.init_range}"
            )
        problems.extend(_sharing_problems(self.groups, self.channels))
        if self.heads is not None and self.heads < 1:
            problems.append(f"heads must be None or >= 1, got {self.heads}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that `from_dict` turns back into an equal config."""
        data = dataclasses.asdict(self)
        data["init_range"] = list(self.init_range)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GMNMConfig:
        """Build a config from `to_dict()` output; unknown keys are refused, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown GMNMConfig field(s) {', '.join(unknown)}; valid fields are "
                f"{', '.join(sorted(known))}"
            )
        values = dict(data)
        if "init_range" in values:
            values["init_range"] = tuple(values["init_range"])
        return cls(**values)

    def replace(self, **changes: Any) -> GMNMConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _valid_base(base: str | None) -> bool:
    if base is None or base == LINEAR_BASE or base in BASE_NAMES:
        return True
    return isinstance(base, str) and base.startswith(MODULE_BASE_PREFIX)


def _sharing_problems(groups: int, channels: int | None) -> list[str]:
    if not isinstance(groups, int) or groups < 1:
        return [f"groups must be an integer >= 1, got {groups!r}"]
    if groups == 1:
        return []
    if channels is None:
        return [
            f"groups={groups} needs channels (the size of the last dimension); valid settings are "
            "groups=1 (one set per layer), or channels=C with groups dividing C "
            "(groups=C for one set per channel)"
        ]
    if channels % groups:
        return [
            f"groups={groups} does not divide channels={channels}; use a divisor of {channels} "
            f"(1 for one set per layer, {channels} for one set per channel)"
        ]
    return []

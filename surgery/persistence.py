"""Saving and loading converted (and unconverted) models as self-contained directories.

    DIR/
      config.json, model.safetensors   the base model in its library's own format
                                       (transformers: save_pretrained; timm: its hub format)
      tokenizer / processor files      when the model was loaded with one
      gmnm.safetensors                 the GMNM parameters (empty for an unconverted model)
      gmnm_manifest.json               source, library, task, every site with its GMNM config,
                                       attention routing, versions

Loading rebuilds the base model with its library's loader, re-applies the manifest (including
the attention implementation, which transformers does not persist) and loads the GMNM parameters
with strict key checking. Only safetensors files and JSON are read; nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from surgery.convert import (
    STATE_ATTR,
    apply_entries,
    gmnm_parameter_names,
    resolve_eager,
    surgery_state,
)
from surgery.errors import ManifestError, UnsupportedModelError
from surgery.inputs import is_timm_model, is_transformers_model
from surgery.loading import (
    MANIFEST_FILE,
    TASKS,
    LoadedModel,
    SourceInfo,
    check_timm_task,
    infer_task,
    load_processor,
    source_info,
    task_class,
)
from surgery.plan import ROUTE_MODULE
from surgery.registry import is_head_path
from surgery.routing import GMNM_ATTENTION, register_attention
from surgery.trace import call_site_path

logger = logging.getLogger(__name__)

FORMAT = "gmnm-surgery"
FORMAT_VERSION = 1
GMNM_WEIGHTS = "gmnm.safetensors"
ALIGNMENT = 64  # bytes: what torch's CPU allocator gives every tensor
BASE_WEIGHTS = "model.safetensors"
# An extra tensor in a converted transformers model's weights: a plain `from_pretrained` lists it
# as an unexpected key in its load report, which is how that report says the model is converted.
CONVERTED_MARKER = "gmnm.converted_model.load_it_with_surgery_load"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _split_state(
    model: nn.Module, entries: list[dict[str, Any]]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The base model's state dict (as before conversion) and the GMNM tensors."""
    modules = {entry["module"]: int(entry.get("copies", 1)) for entry in entries}
    base: dict[str, Tensor] = {}
    gmnm: dict[str, Tensor] = {}
    for key, tensor in model.state_dict().items():
        owner = next((m for m in modules if key.startswith(m + ".")), None)
        if owner is None:
            base[key] = tensor
            continue
        rest = key[len(owner) + 1 :]
        if modules[owner] > 1:
            index, _, rest = rest.removeprefix("calls.").partition(".")
            if rest.startswith("base_module.") and index != "0":
                continue  # every copy shares the one replaced module
        if rest.startswith("base_module."):
            base[f"{owner}.{rest.removeprefix('base_module.')}"] = tensor
        else:
            gmnm[key] = tensor
    return base, gmnm


def _contiguous(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: tensor.detach().contiguous().cpu() for key, tensor in tensors.items()}


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write `model` (converted or not) to `directory` so that `surgery.load` rebuilds it.

    Everything needed to rebuild is inside the directory: the base model in its library's format,
    the processor files, the GMNM parameters and the manifest.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = surgery_state(model) or {"sites": [], "kept": [], "attention": {}, "unfused": []}
    source = source_info(model) or _infer_source(model)
    base_state, gmnm_state = _split_state(model, state["sites"])
    if gmnm_parameter_names(model) - set(gmnm_state):
        raise ManifestError(
            "the model's GMNM modules do not match its conversion record (a module was added or "
            "replaced after convert); convert the original model again"
        )

    # the base model in its library's own format
    if source.library == "transformers":
        _save_transformers(model, directory, base_state, converted=bool(state["sites"]))
    else:
        _save_timm(model, directory, base_state)
    if source.processor is not None:
        source.processor.save_pretrained(str(directory))

    # the GMNM parameters and the manifest
    safetensors.torch.save_file(
        _contiguous(gmnm_state), str(directory / GMNM_WEIGHTS), metadata={"format": "pt"}
    )
    manifest = _manifest(model, source, state, sorted(gmnm_state))
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    logger.info("saved %s (%d sites) to %s", type(model).__name__, len(state["sites"]), directory)
    return directory


def _infer_source(model: nn.Module) -> SourceInfo:
    if is_transformers_model(model):
        reference = getattr(model.config, "_name_or_path", "") or type(model).__name__
        return SourceInfo(library="transformers", reference=reference, task=infer_task(model))
    if is_timm_model(model):
        cfg: Any = model.pretrained_cfg
        reference = cfg.get("hf_hub_id") or cfg["architecture"]
        return SourceInfo(library="timm", reference=reference, task="image-classification")
    raise UnsupportedModelError(
        f"cannot save {type(model).__name__}: only transformers and timm models can be saved "
        "in their library's format"
    )


def _save_transformers(
    model: nn.Module, directory: Path, base_state: dict[str, Tensor], converted: bool
) -> None:
    weights = dict(base_state)
    if converted:
        weights[CONVERTED_MARKER] = torch.zeros(1)
    model.save_pretrained(str(directory), state_dict=weights)  # type: ignore[operator]


def _save_timm(model: nn.Module, directory: Path, base_state: dict[str, Tensor]) -> None:
    from timm.models._hub import save_config_for_hf

    safetensors.torch.save_file(
        _contiguous(base_state), str(directory / BASE_WEIGHTS), metadata={"format": "pt"}
    )
    save_config_for_hf(model, str(directory / "config.json"))


def _manifest(
    model: nn.Module, source: SourceInfo, state: dict[str, Any], gmnm_keys: list[str]
) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "project_version": _version("gmnm-surgery"),
        "library": source.library,
        "reference": source.reference,
        "revision": source.revision,
        "task": source.task,
        "num_labels": source.num_labels,
        "model_class": type(model).__name__,
        "converted": bool(state["sites"]),
        "sites": state["sites"],
        "kept": state.get("kept", []),
        "attention": state.get("attention", {}),
        "unfused": state.get("unfused", []),
        "targets": state.get("targets"),
        "gmnm_weights": GMNM_WEIGHTS,
        "gmnm_keys": gmnm_keys,
        "versions": {
            name: _version(name) for name in ("torch", "transformers", "timm", "gmnm-surgery")
        },
    }
    if source.library == "transformers":
        manifest["base_model_prefix"] = getattr(model, "base_model_prefix", "")
        manifest["task_model"] = getattr(model, "base_model", model) is not model
        manifest["base_model_class"] = type(getattr(model, "base_model", model)).__name__
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(
            f"{directory} has no {MANIFEST_FILE}; it was not written by surgery.save (load a "
            "plain model directory with surgery.load_model)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path} is not valid JSON ({error})") from error
    problems = []
    if manifest.get("format") != FORMAT:
        problems.append(f"format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        problems.append(
            f"format_version {manifest.get('format_version')} is newer than this project reads "
            f"({FORMAT_VERSION}); upgrade gmnm-surgery"
        )
    if manifest.get("library") not in ("transformers", "timm"):
        problems.append(f"library is {manifest.get('library')!r}, expected transformers or timm")
    for name in ("sites", "gmnm_keys"):
        if not isinstance(manifest.get(name), list):
            problems.append(f"{name} is missing or not a list")
    if problems:
        raise ManifestError(f"{path} is not a usable manifest: " + "; ".join(problems))
    return manifest


def load(directory: str | Path, *, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild the model saved in `directory` by `surgery.save`."""
    loaded = load_saved(Path(directory))
    if device is not None:
        loaded.model.to(device)
    return loaded.model


def load_saved(
    directory: Path, *, task: str | None = None, num_labels: int | None = None
) -> LoadedModel:
    """Rebuild a saved model; with another task or num_labels only the head is new."""
    manifest = read_manifest(directory)
    if task is not None and task not in TASKS:
        raise UnsupportedModelError(f"unknown task {task!r}; valid tasks are {', '.join(TASKS)}")
    changed = (task is not None and task != manifest.get("task")) or (
        num_labels is not None and num_labels != manifest.get("num_labels")
    )
    if manifest["library"] == "transformers":
        model = _load_transformers_base(directory, manifest, task, num_labels, changed)
    else:
        check_timm_task(str(directory), task)
        model = _load_timm_base(directory, manifest, num_labels, changed)

    # re-apply the conversion with its paths as they are in this model, then its parameters
    record, modules = conversion_record(model, manifest)
    _apply_record(model, record)
    _load_gmnm_weights(model, directory, manifest, record, modules)

    processor = load_processor(directory) if manifest["library"] == "transformers" else None
    data_config = None
    if manifest["library"] == "timm":
        import timm

        data_config = dict(timm.data.resolve_model_data_config(model))
    source = SourceInfo(
        library=manifest["library"],
        reference=manifest.get("reference") or str(directory),
        revision=manifest.get("revision"),
        task=task or manifest.get("task"),
        num_labels=num_labels if num_labels is not None else manifest.get("num_labels"),
        processor=processor,
        data_config=data_config,
    )
    return LoadedModel.attach(model, source, converted=bool(record["sites"]), manifest=manifest)


def _quiet_transformers() -> Any:
    import transformers

    class Quiet:
        def __enter__(self) -> None:
            self.level = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()

        def __exit__(self, *exc: object) -> None:
            transformers.logging.set_verbosity(self.level)

    return Quiet()


def _load_transformers_base(
    directory: Path,
    manifest: dict[str, Any],
    task: str | None,
    num_labels: int | None,
    changed: bool,
) -> nn.Module:
    import transformers
    from transformers import AutoConfig, PreTrainedModel

    overrides = {"num_labels": num_labels} if num_labels is not None else {}
    config = AutoConfig.from_pretrained(str(directory), **overrides)
    if task is not None and task != manifest.get("task"):
        cls = task_class(task, config, str(directory))
    else:
        cls = getattr(transformers, manifest.get("model_class", ""), None)
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
            raise ManifestError(
                f"the manifest names model class {manifest.get('model_class')!r}, which this "
                "transformers version does not have"
            )
    with _quiet_transformers():
        model, info = cls.from_pretrained(
            str(directory),
            config=config,
            use_safetensors=True,
            output_loading_info=True,
            ignore_mismatched_sizes=changed,
        )
    _check_same_base_model(model, manifest, directory, task)
    _check_transformers_load(model, manifest, info, changed, directory)
    _realign(model)
    return model


def _realign(model: nn.Module) -> None:
    """Copy tensors the loader left at unaligned CPU addresses into memory of their own.

    Weights read from a safetensors file sit wherever the file put them (a 4-byte tensor before
    them shifts every later one), and CPU matrix kernels take other code paths for unaligned
    operands whose rounding differs in the last bit: without this a reloaded model would not
    always reproduce the saved model's outputs exactly.
    """
    with torch.no_grad():
        for module in model.modules():
            for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
                if tensor is None or tensor.device.type != "cpu":
                    continue
                if tensor.data_ptr() % ALIGNMENT:
                    if isinstance(tensor, nn.Parameter):
                        tensor.data = tensor.data.clone()
                    else:
                        module._buffers[name] = tensor.clone()


def _check_same_base_model(
    model: nn.Module, manifest: dict[str, Any], directory: Path, task: str | None
) -> None:
    """Refuse a task class that is not built around the saved model's base model.

    Sites can only be carried over when both models share the base model: CLIP's image
    classifier holds the vision tower alone, Whisper's causal LM the decoder alone.
    """
    if type(model).__name__ == manifest.get("model_class"):
        return
    saved = manifest.get("base_model_class")
    if saved is None and not manifest.get("task_model"):
        saved = manifest.get("model_class")
    loaded = type(getattr(model, "base_model", model)).__name__
    if saved is not None and saved != loaded:
        around = f" (base model {saved})" if saved != manifest.get("model_class") else ""
        raise UnsupportedModelError(
            f"{directory} holds a converted {manifest.get('model_class')}{around}, which "
            f"{type(model).__name__} (task {task!r}, base model {loaded}) does not contain, so "
            f"the conversion cannot be carried over; load it for task {manifest.get('task')!r}, "
            f"or convert the original model loaded for {task!r}"
        )


def _check_transformers_load(
    model: nn.Module, manifest: dict[str, Any], info: dict[str, Any], changed: bool, directory: Path
) -> None:
    """Strict loading: only the marker may be unexpected, and only the head may be new.

    With another task the head is the part outside the base model, and the parts inside it that
    only some task classes build (BERT's pooler): those weights may be new, or left unused.
    """
    prefix = _base_path(model)
    saved_prefix = manifest.get("base_model_prefix", "") if manifest.get("task_model") else ""
    unexpected = set(info.get("unexpected_keys", [])) - {CONVERTED_MARKER}
    new = set(info.get("missing_keys", [])) | {
        k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])
    }

    def in_head(key: str, base: str) -> bool:
        outside = bool(base) and key != base and not key.startswith(base + ".")
        return outside or is_head_path(key.rpartition(".")[0])

    if changed:
        bad_new = sorted(k for k in new if not in_head(k, prefix))
        bad_unexpected = sorted(k for k in unexpected if not in_head(k, saved_prefix))
        if new or unexpected:
            logger.info(
                "loaded %s with a new head: initialised %s, left unused %s",
                type(model).__name__,
                sorted(new),
                sorted(unexpected),
            )
    else:
        bad_new, bad_unexpected = sorted(new), sorted(unexpected)
    if bad_new or bad_unexpected:
        raise ManifestError(
            f"the weights in {directory} do not match {type(model).__name__}: missing "
            f"{bad_new[:5]}, unexpected {bad_unexpected[:5]}; the directory is incomplete or was "
            "edited after surgery.save"
        )


def _load_timm_base(
    directory: Path, manifest: dict[str, Any], num_labels: int | None, changed: bool
) -> nn.Module:
    import timm

    if not (directory / BASE_WEIGHTS).is_file():
        raise ManifestError(f"{directory} has no {BASE_WEIGHTS}; the directory is incomplete")
    kwargs: dict[str, Any] = {"num_classes": num_labels} if num_labels is not None else {}
    model: Any = timm.create_model(f"local-dir:{directory}", pretrained=False, **kwargs)
    state = safetensors.torch.load_file(str(directory / BASE_WEIGHTS))
    classifier = model.pretrained_cfg.get("classifier")
    head_keys: set[str] = set()
    if changed and classifier:
        names = [classifier] if isinstance(classifier, str) else list(classifier)
        head_keys = {k for k in state if any(k.startswith(n + ".") for n in names)}
        own = model.state_dict()
        head_keys = {k for k in head_keys if k not in own or own[k].shape != state[k].shape}
        for key in head_keys:
            del state[key]
    result = model.load_state_dict(state, strict=False)
    allowed = {k for k in result.missing_keys if k in head_keys}
    if set(result.missing_keys) - allowed or result.unexpected_keys:
        raise ManifestError(
            f"the weights in {directory} do not match {manifest.get('model_class')}: missing "
            f"{sorted(set(result.missing_keys) - allowed)[:5]}, unexpected "
            f"{sorted(result.unexpected_keys)[:5]}; the directory is incomplete or was edited"
        )
    if head_keys:
        logger.info(
            "re-initialised the classifier of %s (%d tensors)",
            manifest["model_class"],
            len(head_keys),
        )
    return model


@dataclass(frozen=True)
class PathMap:
    """Carries module paths of the saved model over to the model it is loaded into.

    A transformers task model holds its base model at `base_model_prefix` ("bert", "transformer")
    with the head around it, and loading for another task keeps the base model and builds another
    head. A path inside the saved base model therefore moves to the same place inside the loaded
    base model, and a path in the saved head has no counterpart (None). When both models are of
    one class, and for timm models (whose head changes keep every path), paths stay as they are.
    """

    saved_base: str | None = None  # where the base model sits in each model ("" at the root)
    loaded_base: str | None = None

    def __call__(self, path: str) -> str | None:
        if self.saved_base is None or self.loaded_base is None:
            return path
        inner = path
        if self.saved_base:
            if path != self.saved_base and not path.startswith(self.saved_base + "."):
                return None
            inner = path[len(self.saved_base) + 1 :]
        return ".".join(part for part in (self.loaded_base, inner) if part)

    @property
    def moves(self) -> bool:
        return self.saved_base is not None and self.saved_base != self.loaded_base


def _base_path(model: nn.Module) -> str:
    """Where the base model sits in a transformers model: its prefix, or "" when it is one."""
    if getattr(model, "base_model", model) is model:
        return ""
    return str(getattr(model, "base_model_prefix", ""))


def path_map(manifest: dict[str, Any], model: nn.Module) -> PathMap:
    """How paths of the model a manifest describes map into `model`."""
    if manifest["library"] != "transformers" or manifest.get("model_class") == type(model).__name__:
        return PathMap()
    saved = manifest.get("base_model_prefix", "") if manifest.get("task_model") else ""
    return PathMap(saved_base=saved, loaded_base=_base_path(model))


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _moved_site(site: dict[str, Any], paths: PathMap) -> dict[str, Any] | None:
    """A site's record with its paths in the loaded model (None when it was in the saved head)."""
    owner = paths(site["owner"])
    if owner is None:
        return None
    moved = {**site, "owner": owner}
    if site.get("caller") is not None:
        moved["caller"] = paths(site["caller"])
        if moved["caller"] is None:
            return None
    if site.get("callers"):
        callers = {paths(caller): calls for caller, calls in site["callers"].items()}
        if None in callers:
            return None  # its per-call modules include the calls of a head that is gone
        moved["callers"] = callers
    if site.get("route", ROUTE_MODULE) == ROUTE_MODULE:
        moved["path"] = paths(site["path"])
        if moved["path"] is None:
            return None
    else:
        moved["path"] = call_site_path(owner, site.get("op") or "", int(site.get("index", 0)))
    return moved


def _built_by(model: nn.Module, site: dict[str, Any]) -> bool:
    """Whether `model` has the modules a site lives in (a task class may leave out the pooler)."""
    modules = (
        [site["owner"], site["path"]] if site.get("route") == ROUTE_MODULE else [site["owner"]]
    )
    return all(_has_module(model, path) for path in modules)


def _spelled_as_sites(path: str, owners: set[str], prefix: str) -> str:
    """An attention-record path spelled the way the manifest's sites spell their owners.

    Manifests written before the attention record moved with the sites (a directory loaded for
    another task, then saved) kept its paths with or without the base model's prefix as the
    first model had them; the sites' owners, which did move, say which spelling is right.
    """
    if path in owners or not prefix:
        return path
    for candidate in (f"{prefix}.{path}", path.removeprefix(prefix + ".")):
        if candidate in owners:
            logger.warning(
                "the manifest spells attention layer %s as %s; reading it as %s (a directory "
                "saved by an earlier version: saving it again writes the corrected manifest)",
                candidate,
                path,
                candidate,
            )
            return candidate
    return path


def conversion_record(
    model: nn.Module, manifest: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, str | None]]:
    """The manifest's conversion record with every path as it is in `model`.

    Returns the record (what `convert` leaves on a model, so that saving the loaded model writes
    paths that load again) and where each saved GMNM module went (None: dropped with the head
    of the saved model, or not built by the loaded task class).
    """
    paths = path_map(manifest, model)
    prefix = str(manifest.get("base_model_prefix", ""))
    owners = {e["site"]["owner"] for e in manifest["sites"]} | {
        s["owner"] for s in manifest.get("kept", [])
    }

    entries: list[dict[str, Any]] = []
    modules: dict[str, str | None] = {}
    for entry in manifest["sites"]:
        site = _moved_site(entry["site"], paths)
        module = paths(entry["module"])
        if site is None or module is None or (paths.moves and not _built_by(model, site)):
            logger.info(
                "dropped site %s: %s has no counterpart of the module it was in",
                entry["site"]["path"],
                type(model).__name__,
            )
            modules[entry["module"]] = None
            continue
        modules[entry["module"]] = module
        entries.append({**entry, "site": site, "module": module})

    kept = [moved for s in manifest.get("kept", []) if (moved := _moved_site(s, paths))]
    attention = dict(manifest.get("attention") or {})
    if attention.get("eager"):
        eager = {_spelled_as_sites(p, owners, prefix): f for p, f in attention["eager"].items()}
        attention["eager"] = {paths(p): f for p, f in eager.items() if paths(p) is not None}
    unfused = [paths(_spelled_as_sites(p, owners, prefix)) for p in manifest.get("unfused", [])]
    record = {
        "sites": entries,
        "kept": kept,
        "attention": attention,
        "unfused": [path for path in unfused if path is not None],
        "targets": manifest.get("targets"),
    }
    return record, modules


def _apply_record(model: nn.Module, record: dict[str, Any]) -> None:
    attention = record["attention"]
    eager = {path: resolve_eager(ref) for path, ref in (attention.get("eager") or {}).items()}
    for path in record["unfused"]:
        owner = model.get_submodule(path) if _has_module(model, path) else None
        if not isinstance(getattr(owner, "fused_attn", None), bool):
            raise ManifestError(
                f"{path} is not an attention module with a fused_attn switch in "
                f"{type(model).__name__}; the manifest is for another model"
            )
        setattr(owner, "fused_attn", False)  # noqa: B010
    try:
        apply_entries(model, record["sites"], attention_functions=eager)
    except AttributeError as error:
        raise ManifestError(
            f"the manifest names a module this {type(model).__name__} does not have ({error}); "
            "the directory was saved from another model"
        ) from error
    if attention.get("implementation") == GMNM_ATTENTION and record["sites"]:
        register_attention()
        model.set_attn_implementation(GMNM_ATTENTION)  # type: ignore[operator]
    setattr(model, STATE_ATTR, record)


def _load_gmnm_weights(
    model: nn.Module,
    directory: Path,
    manifest: dict[str, Any],
    record: dict[str, Any],
    modules: dict[str, str | None],
) -> None:
    path = directory / manifest.get("gmnm_weights", GMNM_WEIGHTS)
    if not path.is_file():
        raise ManifestError(f"{directory} has no {path.name}; the directory is incomplete")
    saved = safetensors.torch.load_file(str(path))

    # each tensor moves with the GMNM module it belongs to (longest module path first)
    owners = sorted(modules, key=len, reverse=True)
    mapped: dict[str, Tensor] = {}
    stray: list[str] = []
    for key, tensor in saved.items():
        owner = next((m for m in owners if key.startswith(m + ".")), None)
        if owner is None:
            stray.append(key)
        elif modules[owner] is not None:
            mapped[f"{modules[owner]}{key[len(owner) :]}"] = tensor
    expected = set(_split_state(model, record["sites"])[1])
    missing = sorted(expected - set(mapped))
    unexpected = sorted(stray) + sorted(set(mapped) - expected)
    if missing or unexpected:
        raise ManifestError(
            f"{path} does not match the manifest's sites: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; the directory is incomplete or was edited after surgery.save"
        )
    parameters = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for key, tensor in mapped.items():
            target = parameters.get(key, buffers.get(key))
            if target is None or target.shape != tensor.shape:
                raise ManifestError(
                    f"{key} in {path.name} has shape {tuple(tensor.shape)}, which the model's "
                    "module does not have; the directory was saved from another model"
                )
            target.copy_(tensor)

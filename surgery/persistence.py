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
    SOURCE_ATTR,
    TASKS,
    LoadedModel,
    SourceInfo,
    infer_task,
    load_processor,
    source_info,
)
from surgery.routing import GMNM_ATTENTION, register_attention

logger = logging.getLogger(__name__)

FORMAT = "gmnm-surgery"
FORMAT_VERSION = 1
GMNM_WEIGHTS = "gmnm.safetensors"
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
        model = _load_timm_base(directory, manifest, num_labels, changed)

    # re-apply the conversion, then its parameters, strictly
    entries = _entries_for(model, manifest)
    _apply_manifest(model, manifest, entries)
    _load_gmnm_weights(model, directory, manifest, entries)

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
    setattr(model, SOURCE_ATTR, source)
    return LoadedModel(
        model=model,
        library=source.library,
        reference=source.reference,
        revision=source.revision,
        task=source.task,
        num_labels=source.num_labels,
        processor=processor,
        data_config=data_config,
        converted=bool(entries),
        manifest=manifest,
    )


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

    from surgery.loading import _TASK_CLASSES

    if task is not None and task != manifest.get("task"):
        cls = getattr(transformers, _TASK_CLASSES[task])
    else:
        cls = getattr(transformers, manifest.get("model_class", ""), None)
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
            raise ManifestError(
                f"the manifest names model class {manifest.get('model_class')!r}, which this "
                "transformers version does not have"
            )
    overrides = {"num_labels": num_labels} if num_labels is not None else {}
    config = AutoConfig.from_pretrained(str(directory), **overrides)
    with _quiet_transformers():
        model, info = cls.from_pretrained(
            str(directory),
            config=config,
            use_safetensors=True,
            output_loading_info=True,
            ignore_mismatched_sizes=changed,
        )
    _check_transformers_load(model, manifest, info, changed, directory)
    return model


def _check_transformers_load(
    model: nn.Module, manifest: dict[str, Any], info: dict[str, Any], changed: bool, directory: Path
) -> None:
    """Strict loading: only the marker may be unexpected, and only the head may be new."""
    prefix = getattr(model, "base_model_prefix", "")
    is_task_model = getattr(model, "base_model", model) is not model
    unexpected = set(info.get("unexpected_keys", [])) - {CONVERTED_MARKER}
    new = set(info.get("missing_keys", [])) | {
        k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])
    }

    def in_head(key: str) -> bool:
        return is_task_model and not key.startswith(prefix + ".")

    saved_head = (
        [k for k in unexpected if not k.startswith(prefix + ".")]
        if manifest.get("task_model")
        else []
    )
    if changed:
        bad_new = sorted(k for k in new if not in_head(k))
        bad_unexpected = sorted(set(unexpected) - set(saved_head))
        if new:
            logger.info("re-initialised the head of %s: %s", type(model).__name__, sorted(new))
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


def _map_path(path: str, manifest: dict[str, Any], model: nn.Module) -> str | None:
    """A path of the saved model in the loaded one (None when it belonged to a dropped head)."""
    if manifest["library"] != "transformers" or manifest.get("model_class") == type(model).__name__:
        return path
    prefix = manifest.get("base_model_prefix", "")
    if manifest.get("task_model"):
        if path != prefix and not path.startswith(prefix + "."):
            return None
        inner = path[len(prefix) + 1 :] if path != prefix else ""
    else:
        inner = path
    if getattr(model, "base_model", model) is not model:
        return f"{prefix}.{inner}" if inner else prefix
    return inner


def _entries_for(model: nn.Module, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's entries with paths as they are in `model` (sites in a dropped head go)."""
    entries = []
    for entry in manifest["sites"]:
        site = dict(entry["site"])
        fields = {"path": site["path"], "owner": site["owner"], "module": entry["module"]}
        mapped = {name: _map_path(value, manifest, model) for name, value in fields.items()}
        if site.get("caller") is not None:
            mapped["caller"] = _map_path(site["caller"], manifest, model)
        if any(value is None for value in mapped.values()):
            logger.info("dropped site %s: it was in the head of the saved model", site["path"])
            continue
        if site.get("route") != "module" and site["path"].startswith(site["owner"]):
            mapped["path"] = str(mapped["owner"]) + site["path"][len(site["owner"]) :]
        site.update({k: v for k, v in mapped.items() if k != "module"})
        entries.append({**entry, "site": site, "module": mapped["module"]})
    return entries


def _apply_manifest(
    model: nn.Module, manifest: dict[str, Any], entries: list[dict[str, Any]]
) -> None:
    attention = manifest.get("attention") or {}
    eager = {}
    for path, reference in (attention.get("eager") or {}).items():
        mapped = _map_path(path, manifest, model)
        if mapped is not None:
            eager[mapped] = resolve_eager(reference)
    for path in manifest.get("unfused", []):
        mapped = _map_path(path, manifest, model)
        if mapped is not None:
            owner = model.get_submodule(mapped)
            if not isinstance(getattr(owner, "fused_attn", None), bool):
                raise ManifestError(
                    f"{mapped} has no fused_attn switch; the manifest is for another model"
                )
            setattr(owner, "fused_attn", False)  # noqa: B010
    try:
        apply_entries(model, entries, attention_functions=eager)
    except AttributeError as error:
        raise ManifestError(
            f"the manifest names a module this {type(model).__name__} does not have ({error}); "
            "the directory was saved from another model"
        ) from error
    if attention.get("implementation") == GMNM_ATTENTION and entries:
        register_attention()
        model.set_attn_implementation(GMNM_ATTENTION)  # type: ignore[operator]
    setattr(
        model,
        STATE_ATTR,
        {
            "sites": entries,
            "kept": manifest.get("kept", []),
            "attention": attention,
            "unfused": manifest.get("unfused", []),
            "targets": manifest.get("targets"),
        },
    )


def _load_gmnm_weights(
    model: nn.Module, directory: Path, manifest: dict[str, Any], entries: list[dict[str, Any]]
) -> None:
    path = directory / manifest.get("gmnm_weights", GMNM_WEIGHTS)
    if not path.is_file():
        raise ManifestError(f"{directory} has no {path.name}; the directory is incomplete")
    saved = safetensors.torch.load_file(str(path))
    mapped: dict[str, Tensor] = {}
    for key, tensor in saved.items():
        new_key = _map_path(key, manifest, model)
        if new_key is not None:
            mapped[new_key] = tensor
    expected = set(_split_state(model, entries)[1])
    missing, unexpected = sorted(expected - set(mapped)), sorted(set(mapped) - expected)
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

"""Loading a model by reference: a Hugging Face id, a timm name, or a local directory.

Loading goes through the libraries' own loaders and caches (`HF_HOME`, `HF_HUB_OFFLINE` are
honoured), reads weights from safetensors files only, and never runs a repository's own code
unless the caller allows it. What was loaded travels on the model (`SourceInfo`), so that
`surgery.save` can write a directory that rebuilds it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from surgery.errors import (
    RemoteCodeRefusedError,
    UnknownModelError,
    UnsupportedModelError,
)

logger = logging.getLogger(__name__)

SOURCE_ATTR = "_gmnm_source"
TASKS = ("image-classification", "text-classification", "causal-lm", "feature-extraction")
_TASK_CLASSES = {
    "image-classification": "AutoModelForImageClassification",
    "text-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "feature-extraction": "AutoModel",
}
_ACCEPTED_FORMS = (
    "a Hugging Face id ('org/name'), a timm name ('resnet50.a1_in1k'), a timm hub name "
    "('hf-hub:timm/resnet50.a1_in1k'), or a local directory of a transformers, timm or "
    "surgery.save model"
)
_HUB_ID_RULES = (
    "a Hugging Face id is 'name' or 'org/name', each part 1 to 96 letters, digits, '-', '_' or "
    "'.', not starting or ending with '-' or '.', without '--' or '..', not ending in '.git'"
)
# one part of a hub id as the hub itself accepts it (huggingface_hub's validate_repo_id)
_HUB_ID_PART = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?$")
_TIMM_NAME = re.compile(r"^[a-z0-9_]+(\.[A-Za-z0-9_]+)?$")
MANIFEST_FILE = "gmnm_manifest.json"


@dataclass
class SourceInfo:
    """Where a model came from; `surgery.save` writes it into the manifest."""

    library: str
    reference: str
    revision: str | None = None
    task: str | None = None
    num_labels: int | None = None
    processor: Any = field(default=None, repr=False)
    data_config: dict[str, Any] | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> SourceInfo:
        # a copied model shares its processor and source; neither is mutated after loading
        return self


@dataclass
class LoadedModel:
    model: nn.Module
    library: str
    reference: str
    revision: str | None
    task: str | None
    num_labels: int | None
    processor: Any
    data_config: dict[str, Any] | None
    converted: bool
    manifest: dict[str, Any] | None

    @classmethod
    def attach(
        cls,
        model: nn.Module,
        source: SourceInfo,
        *,
        converted: bool = False,
        manifest: dict[str, Any] | None = None,
    ) -> LoadedModel:
        """Record where `model` came from on the model itself (`surgery.save` reads it back)."""
        setattr(model, SOURCE_ATTR, source)
        return cls(
            model=model,
            library=source.library,
            reference=source.reference,
            revision=source.revision,
            task=source.task,
            num_labels=source.num_labels,
            processor=source.processor,
            data_config=source.data_config,
            converted=converted,
            manifest=manifest,
        )


def validate_reference(ref: str, *, allow_local: bool = True) -> None:
    """Check the syntax of a model reference without loading anything.

    Refuses URLs, anything containing `..`, empty names, hub ids the Hugging Face hub would
    refuse, and (with `allow_local=False`, as a service taking references from users would)
    local paths.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise UnknownModelError(f"the model reference is empty; give {_ACCEPTED_FORMS}")
    if "://" in ref or ref.lower().startswith(("http:", "https:", "file:", "www.")):
        raise UnknownModelError(
            f"model reference {ref!r} is a URL, which is not accepted; give {_ACCEPTED_FORMS}"
        )
    # refused anywhere, not only as a path component: no hub id has it, and a path with it could
    # step out of the directories models are loaded from
    if ".." in ref:
        raise UnknownModelError(
            f"model reference {ref!r} contains '..', which is not accepted; give {_ACCEPTED_FORMS}"
        )
    if ref.startswith("hf-hub:"):
        if not is_hub_id(ref.removeprefix("hf-hub:")):
            raise UnknownModelError(
                f"{ref!r} is not a valid timm hub name; write it as 'hf-hub:org/name' ("
                f"{_HUB_ID_RULES})"
            )
        return
    if _is_local_path(ref):
        if not allow_local:
            raise UnknownModelError(
                f"model reference {ref!r} is a local path, which is not accepted here; give a "
                "Hugging Face id ('org/name') or a timm name ('resnet50.a1_in1k')"
            )
        return
    if not is_hub_id(ref):
        raise UnknownModelError(
            f"model reference {ref!r} is malformed; give {_ACCEPTED_FORMS} ({_HUB_ID_RULES})"
        )


def is_hub_id(ref: str) -> bool:
    """Whether the Hugging Face hub would accept `ref` as a repository id."""
    parts = ref.split("/")
    return (
        len(parts) <= 2
        and "--" not in ref
        and ".." not in ref
        and not ref.endswith(".git")
        and all(_HUB_ID_PART.match(part) for part in parts)
    )


def _is_local_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "~", "local-dir:")) or Path(ref).is_dir()


def load_model(
    ref: str,
    *,
    pretrained: bool = True,
    revision: str | None = None,
    task: str | None = None,
    trust_remote_code: bool = False,
    num_labels: int | None = None,
) -> LoadedModel:
    """Load a model by reference and return it with its processor and source.

    Args:
        ref: a Hugging Face id, a timm name or `hf-hub:` name, a local directory of either
            library, or a directory written by `surgery.save` (the converted model is rebuilt).
        pretrained: False builds the architecture with random weights from its config alone.
        revision: a branch, tag or commit of a Hugging Face repository.
        task: picks the transformers head ("image-classification", "text-classification",
            "causal-lm", "feature-extraction"); without it, the config's architecture.
        trust_remote_code: allow a repository's own modelling code to run.
        num_labels: size of the classification head (created or resized).
    """
    validate_reference(ref)
    if task is not None and task not in TASKS:
        raise UnsupportedModelError(f"unknown task {task!r}; valid tasks are {', '.join(TASKS)}")
    if num_labels is not None and num_labels < 1:
        raise UnsupportedModelError(f"num_labels must be at least 1, got {num_labels}")

    local = Path(ref.removeprefix("local-dir:")).expanduser()
    if _is_local_path(ref):
        if not local.is_dir():
            raise UnknownModelError(f"{ref!r} is not a directory; give {_ACCEPTED_FORMS}")
        if (local / MANIFEST_FILE).is_file():
            from surgery.persistence import load_saved

            return load_saved(local, task=task, num_labels=num_labels)
        library = _directory_library(local)
        return _load(library, str(local), pretrained, revision, task, trust_remote_code, num_labels)
    if ref.startswith("hf-hub:"):
        return _load("timm", ref, pretrained, revision, task, trust_remote_code, num_labels)
    if "/" not in ref and _is_timm_name(ref):
        return _load("timm", ref, pretrained, revision, task, trust_remote_code, num_labels)
    config = _hub_config(ref, revision)
    library = "timm" if "architecture" in config and "model_type" not in config else "transformers"
    reference = f"hf-hub:{ref}" if library == "timm" else ref
    return _load(library, reference, pretrained, revision, task, trust_remote_code, num_labels)


def _is_timm_name(ref: str) -> bool:
    import timm

    return bool(_TIMM_NAME.match(ref)) and timm.is_model(ref.split(".")[0])


def _directory_library(directory: Path) -> str:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UnknownModelError(
            f"directory {str(directory)!r} has no config.json, so it is not a transformers or "
            f"timm model directory; give {_ACCEPTED_FORMS}"
        )
    config = json.loads(config_file.read_text())
    if "model_type" in config:
        return "transformers"
    if "architecture" in config:
        return "timm"
    raise UnknownModelError(
        f"{config_file} names neither a transformers model_type nor a timm architecture; give "
        "a directory written by transformers' save_pretrained (config.json with model_type) or "
        "by timm's save_for_hf (config.json with architecture)"
    )


def _hub_config(ref: str, revision: str | None) -> dict[str, Any]:
    """The repository's config.json, from the local cache when the hub is offline."""
    path = hub_file(ref, "config.json", revision)
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise UnknownModelError(
            f"{ref!r} has a config.json that is not a JSON object, so it is not a transformers or "
            f"timm model repository; give {_ACCEPTED_FORMS}"
        )
    return data


def hub_file(ref: str, filename: str, revision: str | None) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return hf_hub_download(ref, filename, revision=revision)
    except HFValidationError as error:
        # validate_reference follows the hub's rules; this catches whatever they add later
        raise UnknownModelError(
            f"the Hugging Face hub does not accept {ref!r} ({error}); give {_ACCEPTED_FORMS}"
        ) from error
    # (a subclass of EntryNotFoundError, so it comes first)
    except LocalEntryNotFoundError as error:
        raise UnknownModelError(
            f"model {ref!r} ({filename}) is not in the local Hugging Face cache and the hub "
            "cannot be reached (offline); download it into HF_HOME first, or give a local "
            "directory"
        ) from error
    except RevisionNotFoundError as error:
        raise UnknownModelError(
            f"{ref!r} has no revision {revision!r}; give a branch, tag or commit hash of the "
            "repository, or no revision for its default branch"
        ) from error
    except EntryNotFoundError as error:
        raise UnknownModelError(
            f"{ref!r} has no file {filename!r}; {_missing_file_hint(filename)}"
        ) from error
    except RepositoryNotFoundError as error:
        raise UnknownModelError(
            f"model {ref!r} was not found on the Hugging Face hub; give {_ACCEPTED_FORMS}"
        ) from error


def _missing_file_hint(filename: str) -> str:
    if filename == "config.json":
        return f"it is not a transformers or timm model repository; give {_ACCEPTED_FORMS}"
    return (
        "weights are only read from safetensors files; load it with pretrained=False for random "
        "weights, or give a repository that publishes safetensors"
    )


def revision_of(path: str) -> str | None:
    """The commit hash of a file in the Hugging Face cache (`.../snapshots/<hash>/file`)."""
    parts = Path(path).parts
    if "snapshots" in parts:
        index = parts.index("snapshots")
        if index + 1 < len(parts):
            return parts[index + 1]
    return None


def _load(
    library: str,
    ref: str,
    pretrained: bool,
    revision: str | None,
    task: str | None,
    trust_remote_code: bool,
    num_labels: int | None,
) -> LoadedModel:
    if library == "timm":
        check_timm_task(ref, task)
        model, source = _load_timm(ref, pretrained, revision, num_labels)
    else:
        model, source = _load_transformers(
            ref, pretrained, revision, task, trust_remote_code, num_labels
        )
    source.task = task or source.task
    return LoadedModel.attach(model, source)


def check_timm_task(ref: str, task: str | None) -> None:
    if task not in (None, "image-classification", "feature-extraction"):
        raise UnsupportedModelError(
            f"{ref!r} is a timm image model; it can be loaded for image-classification or "
            f"feature-extraction, not {task!r}"
        )


def _load_timm(
    ref: str, pretrained: bool, revision: str | None, num_labels: int | None
) -> tuple[nn.Module, SourceInfo]:
    import timm
    from timm.models import get_pretrained_cfg

    kwargs: dict[str, Any] = {}
    if num_labels is not None:
        kwargs["num_classes"] = num_labels
    resolved_revision = None
    name = ref
    if ref.startswith("/") or Path(ref).is_dir():
        name = f"local-dir:{ref}"
        if pretrained and not (Path(ref) / "model.safetensors").is_file():
            raise UnsupportedModelError(
                f"{ref} has no model.safetensors; only safetensors weights are loaded (convert "
                "the checkpoint, or load with pretrained=False)"
            )
    elif revision is not None and not ref.startswith("hf-hub:"):
        raise UnsupportedModelError(
            f"timm registry name {ref!r} loads the weights timm pins for it; to choose a "
            "revision, give the repository as 'hf-hub:org/name'"
        )
    elif pretrained:
        hub_id = ref.removeprefix("hf-hub:") if ref.startswith("hf-hub:") else None
        if hub_id is None:
            cfg = get_pretrained_cfg(ref)
            hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not hub_id:
            raise UnsupportedModelError(
                f"timm model {ref!r} publishes no weights on the Hugging Face hub, and weights "
                "are only loaded from safetensors files there; use pretrained=False"
            )
        resolved_revision = revision_of(hub_file(hub_id, "model.safetensors", revision))
        if ref.startswith("hf-hub:") and revision is not None:
            name = f"{ref}@{revision}"  # timm's own syntax for a hub revision
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as error:
        raise UnknownModelError(f"timm could not build {ref!r}: {error}") from error
    data_config = timm.data.resolve_model_data_config(model)
    source = SourceInfo(
        library="timm",
        reference=ref,
        revision=resolved_revision,
        task="image-classification" if getattr(model, "num_classes", 0) else "feature-extraction",
        num_labels=getattr(model, "num_classes", None) or None,
        data_config=dict(data_config),
    )
    return model, source


def task_class(task: str, config: Any, ref: str) -> Any:
    """The transformers Auto class of `task`, refused when the config's family has no such head."""
    import transformers

    def has_head(name: str) -> bool:
        mapping = getattr(getattr(transformers, name), "_model_mapping", None)
        try:
            return mapping is None or type(config) in mapping
        except (KeyError, ValueError, AttributeError):
            return True  # let from_pretrained decide, and report its error

    if not has_head(_TASK_CLASSES[task]):
        possible = [name for name, cls in _TASK_CLASSES.items() if has_head(cls)]
        raise UnsupportedModelError(
            f"{ref!r} is a {config.model_type} model, and transformers has no {task} head for "
            f"that family; load it for one of: {', '.join(possible)}"
        )
    return getattr(transformers, _TASK_CLASSES[task])


def _transformers_class(task: str | None, config: Any, ref: str) -> Any:
    import transformers
    from transformers import PreTrainedModel

    if task is not None:
        return task_class(task, config, ref)
    for architecture in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, architecture, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return transformers.AutoModel


def _load_transformers(
    ref: str,
    pretrained: bool,
    revision: str | None,
    task: str | None,
    trust_remote_code: bool,
    num_labels: int | None,
) -> tuple[nn.Module, SourceInfo]:
    from transformers import AutoConfig

    raw = _raw_config(ref, revision)
    if raw.get("auto_map") and not trust_remote_code and _needs_remote_code(raw):
        raise RemoteCodeRefusedError(
            f"{ref!r} maps its model to code in its repository (auto_map); pass "
            "trust_remote_code=True (the service operator must allow it) only if you trust that "
            "repository"
        )
    overrides: dict[str, Any] = {"num_labels": num_labels} if num_labels is not None else {}
    try:
        config = AutoConfig.from_pretrained(
            ref, revision=revision, trust_remote_code=trust_remote_code, **overrides
        )
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise RemoteCodeRefusedError(
                f"{ref!r} needs its repository's own code to run; pass trust_remote_code=True "
                "(the service operator must allow it) only if you trust that repository"
            ) from error
        raise UnknownModelError(f"{ref!r} has no usable transformers config: {error}") from error
    except OSError as error:
        raise UnknownModelError(
            f"{ref!r} could not be found ({error}); give {_ACCEPTED_FORMS}"
        ) from error

    cls = _transformers_class(task, config, ref)
    try:
        if pretrained:
            model = cls.from_pretrained(
                ref,
                config=config,
                revision=revision,
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
                ignore_mismatched_sizes=num_labels is not None,
            )
        elif hasattr(cls, "from_config"):
            model = cls.from_config(config, trust_remote_code=trust_remote_code)
        else:
            model = cls._from_config(config)
    except ValueError as error:
        raise UnsupportedModelError(
            f"{ref!r} ({config.model_type}) cannot be loaded for task {task!r}: {error}"
        ) from error
    except OSError as error:
        raise UnsupportedModelError(
            f"{ref!r} could not be loaded with safetensors weights ({error}); only safetensors "
            "files are read, never pickled checkpoints"
        ) from error

    source = SourceInfo(
        library="transformers",
        reference=ref,
        revision=_transformers_revision(ref, revision),
        task=task or infer_task(model),
        num_labels=num_labels if num_labels is not None else _num_labels(model),
        processor=load_processor(ref, revision, trust_remote_code=trust_remote_code),
    )
    return model, source


def _raw_config(ref: str, revision: str | None) -> dict[str, Any]:
    if Path(ref).is_dir():
        data = json.loads((Path(ref) / "config.json").read_text())
        return data if isinstance(data, dict) else {}
    return _hub_config(ref, revision)


def _needs_remote_code(raw: dict[str, Any]) -> bool:
    """Whether transformers would need the repository's code to build this config's model."""
    from transformers import CONFIG_MAPPING

    return raw.get("model_type") not in CONFIG_MAPPING


def _transformers_revision(ref: str, revision: str | None) -> str | None:
    if Path(ref).is_dir():
        return None
    try:
        return revision_of(hub_file(ref, "config.json", revision))
    except UnknownModelError:
        return revision


def _num_labels(model: nn.Module) -> int | None:
    name = type(model).__name__
    if "Classification" in name:
        return int(getattr(model, "config").num_labels)  # noqa: B009
    return None


def infer_task(model: nn.Module) -> str | None:
    """The task a transformers model class is for, as load_model names it."""
    name = type(model).__name__
    if name.endswith("ForImageClassification"):
        return "image-classification"
    if name.endswith("ForSequenceClassification"):
        return "text-classification"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal-lm"
    if "For" not in name:
        return "feature-extraction"
    return None


def load_processor(
    ref: str | Path, revision: str | None = None, *, trust_remote_code: bool = False
) -> Any:
    """The processor, tokenizer or image processor saved with a model, or None.

    `trust_remote_code` is passed on as the caller allowed it for the model: without it
    transformers asks on stdin before running a repository's processor code.
    """
    import transformers

    for loader in ("AutoProcessor", "AutoTokenizer", "AutoImageProcessor"):
        try:
            auto = getattr(transformers, loader)
            return auto.from_pretrained(
                str(ref), revision=revision, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            logger.debug("no %s for %s: %s", loader, ref, error)
    return None


def source_info(model: nn.Module) -> SourceInfo | None:
    source = getattr(model, SOURCE_ATTR, None)
    return source if isinstance(source, SourceInfo) else None

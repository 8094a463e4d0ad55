"""Probe inputs for a model, and comparing what two forward passes returned.

The probe batch exercises what a conversion can break: text inputs carry a padded second row (so
a dropped padding mask shows up as a difference), encoder-decoder models get decoder inputs, and
vision models get images of the size they were built for. Inputs without tokens are probed with
one row by default: in eval mode the rows of an image or audio batch never interact, so a second
row would check nothing more, and every conversion runs the probe through the whole model twice
(ViT-B/16 at 224 px: about 0.5 s of one CPU thread per row per pass).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from surgery.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

SEQUENCE_LENGTH = 8
DECODER_LENGTH = 5
PADDED = 3  # tokens masked out at the end of the second row
TEXT_BATCH = 2  # rows of a default text probe: one full, one padded
MAX_FREE_IMAGE_SIZE = 64  # probe size cap for convolutional models that take any image size


def _model_of(model_or_loaded: Any) -> nn.Module:
    model = getattr(model_or_loaded, "model", model_or_loaded)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module or a LoadedModel, got {type(model_or_loaded)}")
    return model


def _device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def is_timm_model(model: nn.Module) -> bool:
    cfg = getattr(model, "pretrained_cfg", None)
    return isinstance(cfg, dict) and "architecture" in cfg


def example_inputs(model_or_loaded: Any, batch_size: int | None = None) -> Any:
    """Probe inputs for a transformers or timm model: a dict of keyword arguments or a tensor.

    Random but seeded, on the model's device. `batch_size` defaults to 2 for models that take
    tokens (the second row padded) and 1 for the others. Other models need their inputs passed
    explicitly (`probe_inputs=` of `plan`/`convert`).
    """
    model = _model_of(model_or_loaded)
    generator = torch.Generator().manual_seed(0)
    if is_transformers_model(model):
        if batch_size is None:
            takes_tokens = "input_ids" in inspect.signature(model.forward).parameters
            batch_size = TEXT_BATCH if takes_tokens else 1
        return _transformers_inputs(model, batch_size, generator)
    if is_timm_model(model):
        return _timm_inputs(model, batch_size or 1, generator)
    raise UnsupportedModelError(
        f"cannot build probe inputs for {type(model).__name__}: it is neither a transformers nor "
        "a timm model; pass probe_inputs (a tensor, a tuple of arguments or a dict of keyword "
        "arguments) to plan/convert/audit"
    )


def _timm_inputs(model: nn.Module, batch_size: int, generator: torch.Generator) -> Tensor:
    from timm.models._input import get_model_input_config

    config = get_model_input_config(model)
    channels, height, width = config["input_size"]
    if not config.get("fixed_input_size", False):
        height, width = min(height, MAX_FREE_IMAGE_SIZE), min(width, MAX_FREE_IMAGE_SIZE)
    images = torch.randn(batch_size, channels, height, width, generator=generator)
    return images.to(_device(model))


def _image_size(config: Any) -> tuple[int, int, int]:
    size = getattr(config, "image_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return int(getattr(config, "num_channels", 3)), int(size[0]), int(size[1])


def _sub_config(config: Any, name: str) -> Any:
    sub = getattr(config, name, None)
    return sub if sub is not None else config


def _transformers_inputs(
    model: nn.Module, batch_size: int, generator: torch.Generator
) -> dict[str, Tensor]:
    config: Any = model.config
    accepted = set(inspect.signature(model.forward).parameters)
    inputs: dict[str, Tensor] = {}
    pad_token_id = getattr(config, "pad_token_id", None)
    if (
        batch_size > 1
        and pad_token_id is None
        and type(model).__name__.endswith("ForSequenceClassification")
    ):
        # these heads find each row's last token through the pad token, which this model lacks
        logger.info("%s has no pad_token_id; probing with one sequence", type(model).__name__)
        batch_size = 1

    if "input_ids" in accepted:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = int(getattr(text, "vocab_size", 1000) or 1000)
        ids = torch.randint(
            1, max(2, min(vocab, 1000)), (batch_size, SEQUENCE_LENGTH), generator=generator
        )
        if pad_token_id is not None:
            ids[ids == pad_token_id] = (pad_token_id + 1) % vocab
        mask = torch.ones(batch_size, SEQUENCE_LENGTH, dtype=torch.long)
        if batch_size > 1:
            mask[1, -PADDED:] = 0
            if pad_token_id is not None:
                ids[1, -PADDED:] = pad_token_id
        inputs["input_ids"] = ids
        if "attention_mask" in accepted:
            inputs["attention_mask"] = mask
    if "pixel_values" in accepted:
        channels, height, width = _image_size(_sub_config(config, "vision_config"))
        inputs["pixel_values"] = torch.randn(
            batch_size, channels, height, width, generator=generator
        )
    if "input_features" in accepted:
        frames = 2 * int(getattr(config, "max_source_positions", 1500))
        mels = int(getattr(config, "num_mel_bins", 80))
        inputs["input_features"] = torch.randn(batch_size, mels, frames, generator=generator)
    if "input_values" in accepted and not inputs:
        inputs["input_values"] = torch.randn(batch_size, 16000, generator=generator)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in accepted:
        decoder = _sub_config(config, "decoder")
        vocab = int(getattr(decoder, "vocab_size", getattr(config, "vocab_size", 1000)) or 1000)
        inputs["decoder_input_ids"] = torch.randint(
            1, max(2, min(vocab, 1000)), (batch_size, DECODER_LENGTH), generator=generator
        )
    if not inputs:
        raise UnsupportedModelError(
            f"cannot build probe inputs for {type(model).__name__}: its forward takes none of "
            "input_ids, pixel_values, input_features, input_values; pass probe_inputs explicitly"
        )
    device = _device(model)
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def output_tensors(output: Any) -> Iterator[Tensor]:
    """Every floating-point tensor in a model output (ModelOutput, tuple, dict, tensor)."""
    if isinstance(output, Tensor):
        if output.is_floating_point():
            yield output
    elif isinstance(output, dict):
        for value in output.values():
            yield from output_tensors(value)
    elif isinstance(output, (tuple, list)):
        for value in output:
            yield from output_tensors(value)


def max_abs_diff(reference: Any, other: Any) -> float:
    """The largest absolute difference between matching tensors of two outputs."""
    pairs = list(zip(output_tensors(reference), output_tensors(other), strict=False))
    if not pairs:
        return 0.0
    worst = 0.0
    for a, b in pairs:
        if a.shape != b.shape:
            return float("inf")
        if not a.numel():
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        # positions where both hold the same infinity, or both NaN, agree
        same = (a64 == b64) | (a64.isnan() & b64.isnan())
        diff = torch.where(same, torch.zeros_like(a64), (a64 - b64).abs())
        worst = max(worst, float(diff.nan_to_num(nan=float("inf")).max()))
    return worst

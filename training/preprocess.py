"""Turn raw examples into the tensors a model takes, with the model's own preprocessing.

- Images: timm's data config and eval transforms, or the transformers image processor. Grey
  images and the built-in sets' arrays are resized to the model's input size and expanded to
  its channel count.
- Text classification: the model's tokenizer, truncated to `max_length`, padded per batch.
- Causal LM: the tokenized texts joined (an end-of-text token between documents) and cut into
  blocks of `max_length` tokens; the loss predicts each next token within a block.

Every dataset item is a dict of tensors plus `labels` (class index, or the block itself).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from training.data import Examples
from training.errors import DataError, ModelError

logger = logging.getLogger(__name__)

Item = dict[str, Tensor]


@dataclass(frozen=True)
class ImageGeometry:
    """What a vision model expects: channels, height, width, and the normalisation."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _tokenizer_of(processor: Any) -> Any:
    if processor is None:
        return None
    if hasattr(processor, "tokenizer") and processor.tokenizer is not None:
        return processor.tokenizer
    return processor if callable(getattr(processor, "pad", None)) else None


def _image_processor_of(processor: Any) -> Any:
    if processor is None:
        return None
    if getattr(processor, "image_processor", None) is not None:
        return processor.image_processor
    return processor if hasattr(processor, "image_mean") else None


def tokenizer_for(model: torch.nn.Module, processor: Any, reference: str) -> Any:
    """The model's tokenizer, with a padding token when it has none (GPT-style)."""
    tokenizer = _tokenizer_of(processor)
    if tokenizer is None:
        raise ModelError(
            f"model {reference!r} has no tokenizer; text tasks need the tokenizer files "
            "(tokenizer.json, or vocab files) next to the model's config"
        )
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        # transformers builds a tokenizer with special tokens alone when the files are missing;
        # every word would become the unknown token.
        raise ModelError(
            f"model {reference!r} has no tokenizer vocabulary (only special tokens); text tasks "
            "need the tokenizer files (tokenizer.json, or vocab files) next to the model's config"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                f"the tokenizer of {reference!r} has neither a padding nor an end-of-text token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


class ExampleDataset(Dataset[Item]):
    """Items computed on access from one split's examples."""

    def __init__(self, size: int, item: Callable[[int], Item]) -> None:
        self._size = size
        self._item = item

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> Item:
        return self._item(index)


class Preprocessor:
    """Builds datasets and batches for one model and task."""

    def __init__(
        self,
        model: torch.nn.Module,
        library: str,
        task: str,
        processor: Any,
        data_config: dict[str, Any] | None,
        reference: str,
        max_length: int = 128,
    ) -> None:
        self.library = library
        self.task = task
        self.reference = reference
        self.max_length = max_length
        self.tokenizer: Any = None
        self._transform: Callable[[Image.Image], Tensor] | None = None
        if task == "image-classification":
            self.geometry, self._transform = _image_pipeline(
                model, library, processor, data_config, reference
            )
        else:
            self.tokenizer = tokenizer_for(model, processor, reference)

    # -- datasets ---------------------------------------------------------------------------

    def dataset(self, examples: Examples, classes: Sequence[str] | None) -> ExampleDataset:
        if self.task == "causal-lm":
            return self._lm_dataset(examples)
        assert classes is not None and examples.labels is not None
        index = {name: i for i, name in enumerate(classes)}
        targets = [index[label] for label in examples.labels]
        if self.task == "text-classification":
            return self._text_dataset(examples, targets)
        return self._image_dataset(examples, targets)

    def _image_dataset(self, examples: Examples, targets: list[int]) -> ExampleDataset:
        if examples.kind == "text":
            raise DataError(f"{examples.source}: holds text, but the task is image-classification")

        def item(i: int) -> Item:
            pixels = self.image_tensor(examples.inputs[i], examples.locations[i])
            return {"pixel_values": pixels, "labels": torch.tensor(targets[i])}

        return ExampleDataset(len(examples), item)

    def image_tensor(self, value: Any, where: str) -> Tensor:
        """One example as a normalised (C, H, W) float tensor."""
        if isinstance(value, np.ndarray):
            return self._array_tensor(value, where)
        if isinstance(value, str | Path):
            try:
                with Image.open(value) as opened:
                    image = opened.copy()
            except OSError as error:
                raise DataError(f"{where} is not a readable image ({error})") from None
        elif isinstance(value, Image.Image):
            image = value
        else:
            raise DataError(f"{where}: expected an image, got {type(value).__name__}")
        mode = "L" if self.geometry.channels == 1 else "RGB"
        if image.mode != mode:
            image = image.convert(mode)
        assert self._transform is not None
        return self._transform(image)

    def _array_tensor(self, array: np.ndarray, where: str) -> Tensor:
        """Grey arrays with values in [0, 1] (built-in sets): resize, expand, normalise."""
        grey = torch.as_tensor(array, dtype=torch.float32)
        if grey.dim() != 2:
            raise DataError(f"{where}: expected a 2-D grey array, got shape {tuple(array.shape)}")
        g = self.geometry
        resized = F.interpolate(
            grey[None, None], size=(g.height, g.width), mode="bilinear", align_corners=False
        )[0]  # (1, H, W)
        pixels = resized.expand(g.channels, -1, -1)
        mean = torch.tensor(g.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(g.std, dtype=torch.float32).view(-1, 1, 1)
        return ((pixels - mean) / std).contiguous()

    def _text_dataset(self, examples: Examples, targets: list[int]) -> ExampleDataset:
        if examples.kind != "text":
            raise DataError(f"{examples.source}: holds images, but the task is text-classification")
        encoded = self.tokenizer(list(examples.inputs), truncation=True, max_length=self.max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        for i, ids in enumerate(encoded["input_ids"]):
            if len(ids) == 0:
                raise DataError(f"{examples.locations[i]}: the text gives no tokens")

        def item(i: int) -> Item:
            values = {k: torch.tensor(encoded[k][i]) for k in keys}
            values["labels"] = torch.tensor(targets[i])
            return values

        return ExampleDataset(len(examples), item)

    def _lm_dataset(self, examples: Examples) -> ExampleDataset:
        if examples.kind != "text":
            raise DataError(f"{examples.source}: holds images, but the task is causal-lm")
        blocks = self.lm_blocks(examples)

        def item(i: int) -> Item:
            return {"input_ids": blocks[i], "labels": blocks[i]}

        return ExampleDataset(len(blocks), item)

    def lm_blocks(self, examples: Examples) -> Tensor:
        """All texts as one token stream cut into (N, max_length) blocks."""
        plain = bool(examples.extras.get("plain_text"))
        separator = [] if plain else [self.tokenizer.eos_token_id or self.tokenizer.sep_token_id]
        separator = [t for t in separator if t is not None]
        encoded = self.tokenizer(list(examples.inputs), add_special_tokens=False)["input_ids"]
        stream: list[int] = []
        for ids in encoded:
            stream.extend(ids)
            stream.extend(separator)
        count = len(stream) // self.max_length
        if count == 0:
            raise DataError(
                f"{examples.source}: gives {len(stream)} tokens, fewer than one block of "
                f"max_length {self.max_length}; lower data.max_length or add text"
            )
        kept = torch.tensor(stream[: count * self.max_length], dtype=torch.long)
        return kept.view(count, self.max_length)

    # -- batches ----------------------------------------------------------------------------

    def collate(self, items: list[Item]) -> dict[str, Tensor]:
        if self.task == "text-classification":
            labels = torch.stack([item["labels"] for item in items])
            features = [{k: v for k, v in item.items() if k != "labels"} for item in items]
            batch = dict(self.tokenizer.pad(features, return_tensors="pt"))
            batch["labels"] = labels
            return batch
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def _image_pipeline(
    model: torch.nn.Module,
    library: str,
    processor: Any,
    data_config: dict[str, Any] | None,
    reference: str,
) -> tuple[ImageGeometry, Callable[[Image.Image], Tensor]]:
    if library == "timm":
        import timm.data

        config = data_config or timm.data.resolve_data_config({}, model=model)
        channels, height, width = config["input_size"]
        transform = timm.data.create_transform(**config, is_training=False)
        geometry = ImageGeometry(
            channels, height, width, tuple(config["mean"]), tuple(config["std"])
        )
        return geometry, transform

    config = getattr(model, "config", None)
    image_processor = _image_processor_of(processor)
    channels = int(getattr(config, "num_channels", 3) or 3)
    if image_processor is None:
        size = getattr(config, "image_size", None)
        if size is None:
            raise ModelError(
                f"model {reference!r} has neither an image processor nor an image_size in its "
                "config; add a preprocessor_config.json to the model directory"
            )
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        logger.warning(
            "model %s has no image processor; resizing to %dx%d with mean/std 0.5",
            reference,
            height,
            width,
        )
        geometry = ImageGeometry(channels, height, width, (0.5,) * channels, (0.5,) * channels)
        return geometry, _plain_transform(geometry)

    height, width = _processor_size(image_processor, config)
    mean = tuple(image_processor.image_mean or (0.5,) * channels)
    std = tuple(image_processor.image_std or (0.5,) * channels)
    geometry = ImageGeometry(channels, height, width, mean, std)

    def process(image: Image.Image) -> Tensor:
        pixels = image_processor(images=image, return_tensors="pt")["pixel_values"]
        return pixels[0]

    return geometry, process


def _processor_size(image_processor: Any, config: Any) -> tuple[int, int]:
    size = getattr(image_processor, "crop_size", None) or getattr(image_processor, "size", None)
    height = getattr(size, "height", None) if size is not None else None
    width = getattr(size, "width", None) if size is not None else None
    if isinstance(size, dict):
        height, width = size.get("height"), size.get("width")
        edge = size.get("shortest_edge")
        if height is None and edge is not None:
            height = width = edge
    if height is None or width is None:
        image_size = getattr(config, "image_size", 224)
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    return int(height), int(width)


def _plain_transform(geometry: ImageGeometry) -> Callable[[Image.Image], Tensor]:
    def transform(image: Image.Image) -> Tensor:
        resized = image.resize((geometry.width, geometry.height), Image.Resampling.BILINEAR)
        array = np.asarray(resized, dtype=np.float32) / 255.0
        pixels = torch.from_numpy(array)
        pixels = pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)
        mean = torch.tensor(geometry.mean).view(-1, 1, 1)
        std = torch.tensor(geometry.std).view(-1, 1, 1)
        return (pixels - mean) / std

    return transform

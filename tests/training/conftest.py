"""Tiny models and data sets for the training tests, built once per session.

Models come from configs (no download): a 2-layer ViT on 16 px images, a 2-layer BERT and a
2-layer GPT-2, all 32 wide, saved as ordinary transformers directories with a small word-level
tokenizer or an image processor beside them. Torch runs on one thread: on a shared two-core
machine a second thread mostly waits for the other jobs.
"""

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

POSITIVE = ["good", "great", "excellent", "happy", "fine", "lovely", "superb", "nice"]
NEGATIVE = ["bad", "awful", "terrible", "sad", "poor", "nasty", "dreadful", "ugly"]
NEUTRAL = ["the", "a", "movie", "film", "was", "is", "very", "quite", "plot", "acting"]
STORY = ["the", "cat", "sat", "on", "mat", "dog", "ran", "to", "park", "and", "slept", "."]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]


@pytest.fixture(scope="session", autouse=True)
def _one_thread_and_a_private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    cache = tmp_path_factory.mktemp("gmnm-cache")
    saved = {key: os.environ.get(key) for key in ("GMNM_CACHE_DIR", "OMP_NUM_THREADS")}
    os.environ["GMNM_CACHE_DIR"] = str(cache)
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the job processes the tests start
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + sorted(set(POSITIVE + NEGATIVE + NEUTRAL + STORY))
    vocab = {word: i for i, word in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="[EOS]",
    )


def build_bert(directory: Path, dropout: float = 0.1) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = _tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_bert_no_dropout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bert(tmp_path_factory.mktemp("tiny-bert-nodrop"), dropout=0.0)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = _tokenizer()
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    directory = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.2,  # the default 0.02 leaves a model this small stuck for 100 steps
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(directory)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(directory)
    return directory


def _review(rng: random.Random, words: list[str]) -> str:
    picked = [rng.choice(words) for _ in range(rng.randint(1, 3))]
    filler = [rng.choice(NEUTRAL) for _ in range(rng.randint(2, 5))]
    mixed = picked + filler
    rng.shuffle(mixed)
    return " ".join(mixed)


def write_reviews(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for i in range(count):
            label = "pos" if i % 2 == 0 else "neg"
            text = _review(rng, POSITIVE if label == "pos" else NEGATIVE)
            handle.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


@pytest.fixture(scope="session")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("reviews")
    return (
        write_reviews(directory / "train.jsonl", 192, seed=1),
        write_reviews(directory / "valid.jsonl", 48, seed=2),
    )


@pytest.fixture(scope="session")
def story(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(3)
    lines = []
    for _ in range(300):
        animal, verb, place = (
            rng.choice(["cat", "dog"]),
            rng.choice(["sat", "ran"]),
            rng.choice(["mat", "park"]),
        )
        lines.append(f"the {animal} {verb} on the {place} and slept .")
    path = tmp_path_factory.mktemp("story") / "story.txt"
    path.write_text("\n".join(lines) + "\n")
    return path

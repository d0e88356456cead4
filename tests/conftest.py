"""Shared fixtures: a tiny random BERT (for fast unit tests) and small local data files."""

from __future__ import annotations

import csv
import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT with MiniLM's tokenizer, saved as a local folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedlora.tasks import minilm_path

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


WORDS_POS = "great wonderful moving superb brilliant charming funny".split()
WORDS_NEG = "dull boring awful tedious clumsy bland messy".split()


def write_reviews(path: Path, n: int, seed: int = 0, fmt: str = "csv") -> Path:
    """A small synthetic, learnable sentiment file (text, label in {negative, positive})."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pos = i % 2 == 0
        words = rng.sample(WORDS_POS if pos else WORDS_NEG, 3)
        rows.append({"text": f"the film was {' and '.join(words)}", "label":
                     "positive" if pos else "negative", "site": f"s{i % 3}"})
    if fmt == "csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label", "site"])
            w.writeheader()
            w.writerows(rows)
    else:
        import json
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def reviews_csv(tmp_path) -> Path:
    return write_reviews(tmp_path / "reviews.csv", 120)

